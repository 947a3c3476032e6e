#!/usr/bin/env python3
"""Benchmark: loading a 1-2 GB checkpoint, vlmhost against the `safetensors` package.

Both sides load the same sharded bf16 LLaVA-shaped checkpoint into CPU tensors
of the on-disk dtype that the process owns: vlmhost through its plugin and
weight loader (`host/examples/bench_load.rs`, release build), Python with
`safetensors.torch.load_file` on every shard followed by a copy of each tensor
(load_file in safetensors 0.8 returns tensors that may still read the mapped
file lazily; that variant is reported too, as "lazy", for reference). Each run is a fresh process;
wall time is measured around the load inside the process (start-up excluded)
and peak RSS is the process's maximum resident set (`wait4`). Runs alternate
between the two sides; the medians and their ratios are printed and written
to target/bench/load_weights.json.

    .venv/bin/python scripts/bench/load_weights.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "target/fixtures/llava/model"
OUT = ROOT / "target/bench"
MODEL = OUT / "llava-1.8g"

PY_LOADER = r"""
import json, sys, time, glob
from safetensors.torch import load_file
start = time.perf_counter()
tensors = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    loaded = load_file(f)
    if sys.argv[2] == "copy":
        # Own every tensor in memory, as vlmhost's loader does (load_file may
        # hand back tensors that read the file lazily).
        loaded = {k: v.clone() for k, v in loaded.items()}
    tensors.update(loaded)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tensors": len(tensors),
                  "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}))
"""


def make_checkpoint() -> None:
    """A LLaVA-shaped checkpoint of about 0.9B parameters, bf16, in two shards."""
    if (MODEL / "model.safetensors.index.json").is_file():
        return
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    fixture_cfg = json.loads((FIXTURE / "config.json").read_text())
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                              num_attention_heads=16, image_size=30, patch_size=6)
    text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                       num_attention_heads=16, num_key_value_heads=16, vocab_size=32064)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=fixture_cfg["image_token_index"], vision_feature_layer=-2)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    tmp = MODEL.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    for name in ["tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"]:
        if (FIXTURE / name).is_file():
            shutil.copy(FIXTURE / name, tmp / name)
    shutil.rmtree(MODEL, ignore_errors=True)
    tmp.rename(MODEL)


def measure(cmd: list[str]) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{cmd[0]} failed with status {status}")
    result = json.loads(out)
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    make_checkpoint()
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "vlmhost-plugin-llava"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "vlmhost", "--example", "bench_load"],
                   cwd=ROOT, check=True)
    rust = [str(ROOT / "target/release/examples/bench_load"),
            str(ROOT / "target/release/libvlmhost_plugin_llava.so"), str(MODEL), "bf16"]
    python = [sys.executable, "-c", PY_LOADER, str(MODEL), "copy"]
    lazy = [sys.executable, "-c", PY_LOADER, str(MODEL), "lazy"]
    runs = {"vlmhost": [], "safetensors+torch": [], "safetensors (lazy)": []}
    for _ in range(args.runs):
        runs["vlmhost"].append(measure(rust))
        runs["safetensors+torch"].append(measure(python))
        runs["safetensors (lazy)"].append(measure(lazy))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_rss_bytes")} for k, v in runs.items()}
    size = runs["vlmhost"][0]["bytes"]
    assert size == runs["safetensors+torch"][0]["bytes"], "the two sides loaded different amounts"
    report = {
        "checkpoint": str(MODEL.relative_to(ROOT)),
        "checkpoint_bytes": size,
        "runs": runs,
        "median": med,
        "ratio_time": med["vlmhost"]["seconds"] / med["safetensors+torch"]["seconds"],
        "ratio_peak_rss": med["vlmhost"]["peak_rss_bytes"] / med["safetensors+torch"]["peak_rss_bytes"],
    }
    (OUT / "load_weights.json").write_text(json.dumps(report, indent=2))
    gib = 1 << 30
    print(f"checkpoint: {size / gib:.2f} GiB of bf16 tensors in {len(list(MODEL.glob('*.safetensors')))} shards")
    for k, v in med.items():
        print(f"{k:>18}: {v['seconds']:.2f} s, peak RSS {v['peak_rss_bytes'] / gib:.2f} GiB (median of {args.runs})")
    print(f"ratio vlmhost / safetensors+torch: time {report['ratio_time']:.2f}x, peak RSS {report['ratio_peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
