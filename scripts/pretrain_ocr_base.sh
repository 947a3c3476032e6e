#!/usr/bin/env bash
# How models/ocr-base was made: a tiny DeepSeek-OCR-shaped model pre-trained
# from random weights, every part fully, to read rendered English words and
# short lines (no digits), with vlmhost's own commands:
#
#   1. vlmhost init --plugin deepseek_ocr --preset tiny (seed 0);
#   2. vlmhost data synth-ocr --kinds words,lines: 8,000 training images
#      (seed 11) and 64 held-out ones (seed 12);
#   3. vlmhost train with config/examples/ocr_pretrain.yaml (mode both, every
#      role full, seed 11, STEPS optimizer steps of 16 samples);
#   4. vlmhost merge of the last checkpoint into a complete checkpoint, in
#      OUTPUT (default models/ocr-base).
#
# CPU runs are deterministic for a seed: on the same machine this gives the
# same weights; other CPUs differ in float rounding, not in what the model
# learns. About an hour on 2 CPU cores. Environment: OUTPUT, WORK (default
# runs/ocr-pretrain), STEPS (default: the config's), VLMHOST.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${VLMHOST:-target/release/vlmhost}"
[[ -x "$bin" ]] || { echo "pretrain: $bin is missing: run scripts/setup.sh (it builds target/release)" >&2; exit 1; }
work="${WORK:-runs/ocr-pretrain}"
output="${OUTPUT:-models/ocr-base}"

"$bin" init --plugin deepseek_ocr --preset tiny --output "$work/init" --force
"$bin" data synth-ocr --kinds words,lines --count 8000 --seed 11 --output "$work/data/train" --force
"$bin" data synth-ocr --kinds words,lines --count 64 --seed 12 --output "$work/data/val" --force
rm -rf "$work/run"
"$bin" train --config config/examples/ocr_pretrain.yaml --model "$work/init" \
    --dataset "$work/data/train/data.jsonl" --val-dataset "$work/data/val/data.jsonl" \
    --output "$work/run" ${STEPS:+--max-steps "$STEPS"} > "$work/summary.json"
checkpoint="$(ls -d "$work"/run/checkpoints/step-* | tail -1)"
"$bin" merge --plugin deepseek_ocr --model "$work/init" --adapter "$checkpoint" --output "$output" --force
cp "$work/run/eval.json" "$output/eval-words.json"
echo "pretrain: $output from $checkpoint; its held-out reading of words:"
python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); print(f"CER {e[\"cer\"]:.3f}  exact match {e[\"exact_match\"]:.3f}")' "$output/eval-words.json"
