#!/usr/bin/env bash
# How models/ocr-base was made: a tiny Fuyu-style (encoder-free) model
# pre-trained from random weights, everything fully, to read fixed-pitch text
# (random letter strings and English words; no digits), with vlmhost's own
# commands:
#
#   1. vlmhost init --plugin fuyu --preset tiny (seed 0);
#   2. vlmhost data synth-ocr --kinds letters,words --pitch 16, an 18-pixel
#      font: 8,000 training images (seed 11) and 16 held-out ones (seed 12).
#      The random letters leave no language to guess from, so the model must
#      read the image; the fixed pitch (a character per 16-pixel patch
#      column, like a receipt printer's or a form field's text) is what lets
#      a model this small learn to in minutes: with proportional text placed
#      anywhere it still wrote one guess for every image after 1,500 steps;
#   3. vlmhost train with config/examples/ocr_pretrain.yaml (projector and
#      LLM fully, seed 11, STEPS optimizer steps of 16 samples);
#   4. vlmhost merge of the last checkpoint into a complete checkpoint, in
#      OUTPUT (default models/ocr-base).
#
# It runs on one thread (OMP_NUM_THREADS=1): CPU runs are deterministic for a
# seed, so on one machine this gives the same weights every time; other CPU
# models differ in float rounding, not in what the model learns. About 15
# minutes on one core. Environment: OUTPUT, WORK (default runs/ocr-pretrain),
# STEPS (default: the config's), CHECKPOINT (default: the last), VLMHOST.
set -euo pipefail
export OMP_NUM_THREADS=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${VLMHOST:-target/release/vlmhost}"
[[ -x "$bin" ]] || { echo "pretrain: $bin is missing: run scripts/setup.sh (it builds target/release)" >&2; exit 1; }
work="${WORK:-runs/ocr-pretrain}"
output="${OUTPUT:-models/ocr-base}"

"$bin" init --plugin fuyu --preset tiny --output "$work/init" --force
text=(--kinds letters,words --pitch 16 --min-font-px 18 --max-font-px 18)
"$bin" data synth-ocr "${text[@]}" --count 8000 --seed 11 --output "$work/data/train" --force
"$bin" data synth-ocr "${text[@]}" --count 16 --seed 12 --output "$work/data/val" --force
rm -rf "$work/run"
"$bin" train --config config/examples/ocr_pretrain.yaml --model "$work/init" \
    --dataset "$work/data/train/data.jsonl" --val-dataset "$work/data/val/data.jsonl" \
    --output "$work/run" ${STEPS:+--max-steps "$STEPS"} > "$work/summary.json"
checkpoint="${CHECKPOINT:-$(ls -d "$work"/run/checkpoints/step-* | tail -1)}"
"$bin" merge --plugin fuyu --model "$work/init" --adapter "$checkpoint" --output "$output" --force
cp "$work/run/eval.json" "$output/eval-words.json"
echo "pretrain: $output from $checkpoint; its held-out reading of words:"
python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); print(f"CER {e[\"cer\"]:.3f}  exact match {e[\"exact_match\"]:.3f}")' "$output/eval-words.json"
