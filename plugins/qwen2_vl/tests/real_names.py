#!/usr/bin/env python3
"""Names and shapes of every tensor in the real Qwen2-VL-2B checkpoint, without downloading it.

Writes ``plugins/qwen2_vl/tests/qwen2-vl-2b.weights.json``: ``{"source": "...", "weights": {name: shape}}``.

Inputs, kept next to this script (copied from a public repository that vendors a ModelScope
download of ``Qwen/Qwen2-VL-2B``: github.com/whalefal1/ASR-LLM-TTS-Pipeline-with-live2d at
commit 5232608e03465d3a2d714f6949a00dbc3b3d94e3, folder models/qwen_vl/qwen/Qwen2-VL-2B):

* ``qwen2-vl-2b.config.json``               (git blob f74c2d569aa6de68f4c3c70d427ca2eeb9ab802c)
* ``qwen2-vl-2b.index.json``                (model.safetensors.index.json, git blob 293d54cd8408e82d1bdd2eabd07d9311eb406b52)
* ``qwen2-vl-2b.preprocessor_config.json``  (git blob c8bf52bdaee98b049e28da3ef94119f896b03a8d)

These are the base model's files. Qwen2-VL-2B-Instruct has the same architecture (same sizes,
tied embeddings, same tensor names); its own config.json and index were not found in the
searchable repositories, so the Instruct checkpoint is represented by these.

How: ``Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(config))`` on the meta
device with transformers 5.23, cast to bfloat16; the names ``save_pretrained`` writes
(``state_dict()`` minus tied aliases, then ``revert_weight_conversion``: the hub layout) with
their shapes. Checks: the names equal the index's 729 names, and the index's ``total_size``
equals the bfloat16 byte count of these shapes.

Usage::

    .venv/bin/python plugins/qwen2_vl/tests/real_names.py
"""

import json
import math
from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

HERE = Path(__file__).resolve().parent


def main() -> None:
    config = Qwen2VLConfig.from_pretrained(str(HERE / "qwen2-vl-2b.config.json"))
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    model = model.to(torch.bfloat16)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    saved = revert_weight_conversion(model, state)
    weights = {k: list(v.shape) for k, v in sorted(saved.items())}

    index = json.loads((HERE / "qwen2-vl-2b.index.json").read_text())
    names = set(index["weight_map"])
    assert set(weights) == names, sorted(set(weights) ^ names)[:10]
    total = sum(2 * math.prod(s) for s in weights.values())
    assert total == index["metadata"]["total_size"], (total, index["metadata"]["total_size"])
    params = sum(math.prod(s) for s in weights.values())

    source = (
        "plugins/qwen2_vl/tests/real_names.py: transformers "
        f"{__import__('transformers').__version__} Qwen2VLForConditionalGeneration built on the meta device from "
        "qwen2-vl-2b.config.json (Qwen/Qwen2-VL-2B, same architecture as Qwen2-VL-2B-Instruct), cast to bfloat16; "
        "the names save_pretrained writes (hub layout: visual.*, model.*; the tied lm_head has no key). "
        f"Checked: equal to the {len(names)} names of the real model.safetensors.index.json (qwen2-vl-2b.index.json), "
        f"whose total_size {index['metadata']['total_size']} equals bfloat16 storage of these shapes; "
        f"{params} parameters."
    )
    out = HERE / "qwen2-vl-2b.weights.json"
    out.write_text(json.dumps({"source": source, "weights": weights}, indent=1) + "\n")
    print(f"wrote {out} ({len(weights)} tensors, {params} parameters)")


if __name__ == "__main__":
    main()
