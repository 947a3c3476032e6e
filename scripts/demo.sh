#!/usr/bin/env bash
# The main job: teach a DeepSeek-OCR-shaped model to read, on the CPU, in a
# few minutes, with nothing downloaded.
#
#   1. vlmhost init: a tiny random DeepSeek-OCR-shaped checkpoint (SAM + CLIP +
#      projector + MoE LLM, byte-level tokenizer);
#   2. vlmhost data synth-ocr: rendered words, numbers and short lines, with
#      their text as the answer (train and held-out sets);
#   3. the held-out character error rate (CER) before training;
#   4. stage 1: the projector alone (config/examples/ocr_stage1.yaml);
#   5. stage 2: projector + LLM with LoRA, from stage 1's checkpoint
#      (config/examples/ocr_stage2.yaml);
#   6. the held-out CER after, and a report of both stages.
#
# Environment: OUT (default runs/ocr-demo), MODEL (a real DeepSeek-OCR folder
# to fine-tune instead of the tiny one; then also set PROCESSOR, e.g.
# "--processor mode=gundam", and use your own data with DATA/VAL), VLMHOST
# (the binary, default target/release/vlmhost), TRAIN_STEPS (stage 2 steps).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="${VLMHOST:-target/release/vlmhost}"
[[ -x "$bin" ]] || { echo "demo: $bin is missing; build it: cargo build --release --workspace" >&2; exit 1; }
out="${OUT:-runs/ocr-demo}"
model="${MODEL:-$out/model}"
processor=(${PROCESSOR:-})
mkdir -p "$out"

if [[ -z "${MODEL:-}" ]]; then
    "$bin" init --plugin deepseek_ocr --preset tiny --output "$model" --force
fi
data="${DATA:-$out/data/train/data.jsonl}"
val="${VAL:-$out/data/val/data.jsonl}"
if [[ -z "${DATA:-}" ]]; then
    "$bin" data synth-ocr --count 2000 --seed 1 --output "$out/data/train" --force
    "$bin" data synth-ocr --count 24 --seed 2 --output "$out/data/val" --force
fi

echo "== held-out CER before training"
"$bin" eval --plugin deepseek_ocr --model "$model" "${processor[@]}" --dataset "$val" \
    --generate --max-new-tokens 32 --json > "$out/eval-before.json"
python3 - "$out/eval-before.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
print(f"loss {e['loss']:.3f}  CER {e['cer']:.3f}  WER {e['wer']:.3f}  exact match {e['exact_match']:.3f}")
PY

echo "== stage 1: projector"
rm -rf "$out/stage1" "$out/stage2"
"$bin" train --config config/examples/ocr_stage1.yaml --model "$model" "${processor[@]}" \
    --dataset "$data" --output "$out/stage1" > "$out/stage1.json"
stage1="$(ls -d "$out"/stage1/checkpoints/step-* | tail -1)"

echo "== stage 2: projector + LLM (LoRA), from $stage1"
"$bin" train --config config/examples/ocr_stage2.yaml --model "$model" "${processor[@]}" \
    --dataset "$data" --output "$out/stage2" --init-from "$stage1" \
    ${TRAIN_STEPS:+--max-steps "$TRAIN_STEPS"} > "$out/stage2.json"
stage2="$(ls -d "$out"/stage2/checkpoints/step-* | tail -1)"

echo "== held-out CER after training"
"$bin" eval --plugin deepseek_ocr --model "$model" "${processor[@]}" --adapter "$stage2" --dataset "$val" \
    --generate --max-new-tokens 32 --json > "$out/stage2/eval.json"
python3 - "$out/eval-before.json" "$out/stage2/eval.json" "$out/stage1.json" "$out/stage2.json" <<'PY'
import json, sys
before, after, s1, s2 = (json.load(open(p)) for p in sys.argv[1:])
print(f"loss {after['loss']:.3f}  CER {after['cer']:.3f}  WER {after['wer']:.3f}  exact match {after['exact_match']:.3f}")
print(f"training loss: stage 1 {s1['first_loss']:.3f} -> {s1['last_loss']:.3f}, stage 2 {s2['first_loss']:.3f} -> {s2['last_loss']:.3f}")
print(f"held-out CER: {before['cer']:.3f} before -> {after['cer']:.3f} after")
for g in after["generated"][:5]:
    print(f"  {g['reference']!r:32} read as {g['generated']!r}")
PY
"$bin" report "$out/stage1" "$out/stage2" --output "$out/report.png" > "$out/report.md"
echo "== wrote $out: stage2/loss.png, stage2/adapter/ (PEFT), report.md, report.png"
