#!/usr/bin/env python3
"""Load a vlmhost-written adapter with PEFT (or a merged checkpoint with
transformers alone) and compute reference logits.

Used by the tests (the reference side of "vlmhost's adapter loads in PEFT with
equal logits"): checks that `AutoProcessor.from_pretrained(ADAPTER)` loads the
base's processor, tokenizer and chat template; loads the base model with transformers, wraps it with
`PeftModel.from_pretrained(model, ADAPTER)`, runs the inputs that the LLaVA
fixture stored for one sample, and writes the logits and loss.

    .venv/bin/python scripts/check_peft_adapter.py --model DIR --adapter DIR \
        --inputs reference/sample_0.safetensors --output out.safetensors
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", help="a PEFT adapter folder; omit for a merged checkpoint")
    p.add_argument("--inputs", required=True)
    p.add_argument("--output", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    base = LlavaForConditionalGeneration.from_pretrained(a.model, torch_dtype=torch.float32, attn_implementation="eager")
    model = (PeftModel.from_pretrained(base, a.adapter) if a.adapter else base).eval()
    if a.adapter:
        # The adapter folder carries the tokenizer, processor and chat template,
        # as a transformers Trainer's output folder does: it prepares inputs alone.
        ours, base_proc = AutoProcessor.from_pretrained(a.adapter), AutoProcessor.from_pretrained(a.model)
        assert type(ours) is type(base_proc), (type(ours), type(base_proc))
        assert ours.tokenizer.get_vocab() == base_proc.tokenizer.get_vocab(), "the adapter's tokenizer differs"
        assert ours.chat_template == base_proc.chat_template, "the adapter's chat template differs"
    x = load_file(a.inputs)
    with torch.no_grad():
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                    pixel_values=x["pixel_values"], labels=x["labels"])
    save_file({"logits": out.logits.float().contiguous(), "loss": out.loss.reshape(1).float()}, a.output)


if __name__ == "__main__":
    main()
