#!/usr/bin/env python3
"""Names and shapes of every tensor in the real Qwen2.5-VL-3B-Instruct and -7B-Instruct
checkpoints, without downloading them.

Writes ``plugins/qwen2_vl/tests/qwen2.5-vl-{3b,7b}.weights.json``:
``{"source": "...", "weights": {name: shape}}``.

Inputs, kept next to this script: ``qwen2.5-vl-3b.config.json`` and ``qwen2.5-vl-7b.config.json``,
the hub ``config.json`` of ``Qwen/Qwen2.5-VL-3B-Instruct`` and ``Qwen/Qwen2.5-VL-7B-Instruct``
(written from their published values, no download: text 2048 / 3584 wide, 36 / 28 layers,
16 / 28 heads, 2 / 4 key-value heads, MLP 11008 / 18944, vocabulary 151936 / 152064, tied / untied
head; the same vision tower: depth 32, width 1280, MLP 3420, 16 heads, windows of 112 pixels,
full attention in blocks 7, 15, 23, 31, merger out 2048 / 3584). No index file was available, so
unlike Qwen2-VL-2B's the names are not checked against one; olmOCR-2-7B-1025 is a fine-tune of
the 7B with its architecture.

How: ``Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(config))`` on the meta
device with transformers 5.23, cast to bfloat16; the names ``save_pretrained`` writes
(``state_dict()`` minus tied aliases, then ``revert_weight_conversion``: the hub layout) with
their shapes.

Usage::

    .venv/bin/python plugins/qwen2_vl/tests/real_names_qwen2_5_vl.py
"""

import json
import math
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

HERE = Path(__file__).resolve().parent


def main() -> None:
    for size in ("3b", "7b"):
        config = Qwen2_5_VLConfig.from_pretrained(str(HERE / f"qwen2.5-vl-{size}.config.json"))
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(config)
        model = model.to(torch.bfloat16)
        state = remove_tied_weights_from_state_dict(model.state_dict(), model)
        saved = revert_weight_conversion(model, state)
        weights = {k: list(v.shape) for k, v in sorted(saved.items())}
        params = sum(math.prod(s) for s in weights.values())
        source = (
            "plugins/qwen2_vl/tests/real_names_qwen2_5_vl.py: transformers "
            f"{__import__('transformers').__version__} Qwen2_5_VLForConditionalGeneration built on the meta device from "
            f"qwen2.5-vl-{size}.config.json (Qwen/Qwen2.5-VL-{size.upper()}-Instruct), cast to bfloat16; the names "
            "save_pretrained writes (hub layout: visual.*, model.*, lm_head unless tied); "
            f"{len(weights)} tensors, {params} parameters."
        )
        out = HERE / f"qwen2.5-vl-{size}.weights.json"
        out.write_text(json.dumps({"source": source, "weights": weights}, indent=1) + "\n")
        print(f"wrote {out} ({len(weights)} tensors, {params} parameters)")


if __name__ == "__main__":
    main()
