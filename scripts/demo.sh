#!/usr/bin/env bash
# The main job: teach a small OCR model to read a kind of text it has never
# seen, on the CPU, in a few minutes, with nothing downloaded.
#
# The base, models/ocr-base, is a tiny Fuyu-style model (encoder-free: 16-pixel
# patches projected straight into a 4-layer LLM; 1.0M parameters) that the
# project pre-trained itself to read fixed-pitch letters and words
# (scripts/pretrain_ocr_base.sh says exactly how). It has never seen a digit.
# This script:
#   1. renders a new domain with `vlmhost data synth-ocr --kinds numbers`:
#      integers, decimals and ISO dates (training and held-out sets);
#   2. stage 1 trains the projector alone, the patch embedding
#      (config/examples/ocr_stage1.yaml);
#   3. stage 2 trains the projector and the LLM with LoRA from stage 1's
#      checkpoint (config/examples/ocr_stage2.yaml);
#   each stage scores the held-out answers it generates before its first
#   step and after its last (train.eval_generate: CER, exact match);
#   4. prints the held-out readings before and after, and writes a report.
#
# Environment: OUT (default runs/ocr-demo), MODEL (another Fuyu checkpoint
# folder, e.g. adept/fuyu-8b; then also set DATA/VAL to your own data, and
# PROCESSOR to "--processor KEY=VALUE" options if needed),
# VLMHOST (the binary, default target/release/vlmhost), TRAIN_COUNT and
# VAL_COUNT (synthetic samples), STAGE1_STEPS and STAGE2_STEPS, and
# OMP_NUM_THREADS (default 1).
set -euo pipefail
# A model this small spends more time handing work between threads than
# computing: one thread is 3-4x faster here, and the numbers are the same.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${VLMHOST:-target/release/vlmhost}"
[[ -x "$bin" ]] || { echo "demo: $bin is missing: run scripts/setup.sh (it builds target/release)" >&2; exit 1; }
out="${OUT:-runs/ocr-demo}"
model="${MODEL:-models/ocr-base}"
processor=(${PROCESSOR:-})
mkdir -p "$out"
start=$SECONDS

data="${DATA:-$out/data/train/data.jsonl}"
val="${VAL:-$out/data/val/data.jsonl}"
if [[ -z "${DATA:-}" ]]; then
    echo "== the new domain: numbers, decimals and dates (the base model has only read words)"
    text=(--kinds numbers --pitch 16 --min-font-px 18 --max-font-px 18)
    "$bin" data synth-ocr "${text[@]}" --count "${TRAIN_COUNT:-2000}" --seed 1 --output "$out/data/train" --force
    "$bin" data synth-ocr "${text[@]}" --count "${VAL_COUNT:-48}" --seed 2 --output "$out/data/val" --force
fi

rm -rf "$out/stage1" "$out/stage2"
echo "== stage 1: the projector (patch embedding) alone"
"$bin" train --config config/examples/ocr_stage1.yaml --model "$model" "${processor[@]}" \
    --dataset "$data" --val-dataset "$val" --output "$out/stage1" \
    ${STAGE1_STEPS:+--max-steps "$STAGE1_STEPS"} > "$out/stage1.json"
stage1="$(ls -d "$out"/stage1/checkpoints/step-* | tail -1)"

echo "== stage 2: the projector and the LLM (LoRA), from $stage1"
"$bin" train --config config/examples/ocr_stage2.yaml --model "$model" "${processor[@]}" \
    --dataset "$data" --val-dataset "$val" --output "$out/stage2" --init-from "$stage1" \
    ${STAGE2_STEPS:+--max-steps "$STAGE2_STEPS"} > "$out/stage2.json"

"$bin" report "$out/stage1" "$out/stage2" --output "$out/report.png" > "$out/report.md"

python3 - "$out" $((SECONDS - start)) <<'PY'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
load = lambda p: json.load(open(f"{out}/{p}"))
before, after = load("stage1/eval-before.json"), load("stage2/eval.json")
s1, s2 = load("stage1.json"), load("stage2.json")
print(f"\n== held-out readings ({len(after['generated'])} images the model never trained on)")
print(f"  {'image text':14} {'before':22} after")
for b, a in list(zip(before["generated"], after["generated"]))[:8]:
    mark = "ok" if a["exact_match"] else "  "
    print(f"  {b['reference']!r:14} {b['generated'][:20]!r:22} {a['generated']!r} {mark}")
print(f"\ntraining loss: stage 1 {s1['first_loss']:.3f} -> {s1['last_loss']:.3f}, stage 2 {s2['first_loss']:.3f} -> {s2['last_loss']:.3f}")
print(f"held-out CER: {before['cer']:.3f} before -> {after['cer']:.3f} after; exact match {before['exact_match']:.2f} -> {after['exact_match']:.2f}")
print(f"done in {seconds // 60}m {seconds % 60:02d}s")
PY
cat <<EOF

Open:
  $out/stage2/loss.png     training and validation loss of both stages
  $out/report.md           the two stages side by side, CER before and after ($out/report.png: loss curves)
  $out/stage2/eval.json    every held-out image's reading after training
  $out/stage2/adapter/     the result, a PEFT adapter (vlmhost merge makes a full checkpoint)
EOF
