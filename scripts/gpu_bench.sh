#!/usr/bin/env bash
# The GPU benchmark of issue #18 (scripts/bench/gpu_train.py), for a device
# machine with PyTorch 2.11.0 and maybe without transformers/PEFT. Builds
# nothing. Here, first:
#   cargo build --release -p vlmhost -p vlmhost-plugin-qwen2-vl -p vlmhost-plugin-llava -p vlmhost-plugin-deepseek-ocr
#   .venv/bin/python scripts/bench/gpu_train.py prepare --site   # assets + packages zip; prints the carry list
# then on the device, from the repository root, with that carry list:
#   scripts/gpu_bench.sh            (results in $OUT: gpu_train.md, gpu_train.json, logs)
# BUDGET (seconds, default 450) bounds the benchmark; extra arguments go to gpu_train.py run
# (e.g. --families qwen2_vl --steps 4 --no-gradient-checkpointing).
set -euo pipefail
out="${OUT:-/tmp/vlmhost-gpu}"
mkdir -p "$out"
torch_dir="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
ln -sfn "$torch_dir" .libtorch   # the binaries' run path looks here
{ python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")';
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|transformers|peft|safetensors|numpy|pillow|tokenizers) ' || true; } > "$out/bench-env.txt" 2>&1
target/release/vlmhost doctor > "$out/bench-doctor.txt" 2>&1 || true
work="${VLMHOST_BENCH_WORK:-/tmp/vlmhost-bench}"
python3 scripts/bench/gpu_train.py run --out "$out" --work "$work" --budget "${BUDGET:-450}" "$@" 2>&1 | tee "$out/gpu_train.log"
# the logs of every run, next to the table
cp "$work"/*.log "$out/" 2>/dev/null || true
