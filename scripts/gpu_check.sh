#!/usr/bin/env bash
# The device check, for a GPU machine that has PyTorch 2.11.0 installed but
# not this project's .venv. Build here first (cargo build --release --workspace;
# scripts/fixtures.sh), then run this from the repository root there with
# target/release and target/fixtures carried. It builds nothing. Results go to
# $OUT (default /tmp/vlmhost-gpu):
#   torch.txt              the machine's torch and whether it sees CUDA
#   doctor.txt / .json     vlmhost doctor: must say "CUDA available"
#   train-{cuda,cpu}.*     the README's main job on CUDA (precision auto: bf16 weights and
#                          autocast, the allocator's peak memory in the summary) and on the CPU
#   eval-{cuda,cpu}.json   eval of the base model on both devices (parity of the CUDA path)
#   dp-*                   data parallel (#19): a world of 1 through torchrun on NCCL against
#                          the plain CUDA run (one GPU is lent, so one rank), and doctor under torchrun
# The real-size benchmark against transformers + PEFT is its own script, scripts/gpu_bench.sh
# (it needs its own carry list and most of a device session); GPU_BENCH=1 runs it after these checks.
set -euo pipefail
out="${OUT:-/tmp/vlmhost-gpu}"
mkdir -p "$out"
torch_dir="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
ln -sfn "$torch_dir" .libtorch   # the binaries' run path looks here
python3 -c 'import torch; print(torch.__version__, "cuda:", torch.cuda.is_available(), torch.version.cuda)' | tee "$out/torch.txt"
bin=target/release/vlmhost
{ python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|safetensors|numpy|pillow) ' || true; } > "$out/pip.txt"
{ nvidia-smi || true; } > "$out/nvidia-smi.txt" 2>&1
# The as-needed pitfall: libtorch_cuda must be NEEDED by the binary and the plugins.
for f in "$bin" target/release/lib*.so; do
    echo "== $f"; ldd "$f" | grep -E 'torch|c10' || true
done > "$out/ldd.txt" 2>&1
"$bin" doctor | tee "$out/doctor.txt" || true
"$bin" doctor --json > "$out/doctor.json" || true
data=target/fixtures/llava/samples/data.jsonl
for device in cuda cpu; do
    "$bin" eval --plugin llava --model target/fixtures/llava/model --dataset "$data" --device "$device" --json \
        > "$out/eval-$device.json" 2> "$out/eval-$device.log" || echo "eval on $device failed" | tee -a "$out/errors.txt"
    /usr/bin/time -v "$bin" train --config config/examples/demo.yaml --dataset "$data" --device "$device" \
        --output "$out/demo-$device" > "$out/train-$device.json" 2> "$out/train-$device.log" \
        || echo "train on $device failed" | tee -a "$out/errors.txt"
done
# Data parallel: the same 6 steps as a plain CUDA run and as a world of 1 under torchrun (NCCL).
printf 'lora:\n  lora_dropout: 0.0\noptimizer:\n  lr: 5.0e-3\ntrain:\n  batch_size: 2\n  save_every: 3\n' > "$out/dp.yaml"
dptrain=(train --plugin llava --model target/fixtures/llava/model --dataset "$data" --config "$out/dp.yaml" --max-steps 6)
"$bin" "${dptrain[@]}" --device cuda --output "$out/dp-plain" > "$out/dp-plain.json" 2> "$out/dp-plain.log" \
    || echo "dp plain run failed" | tee -a "$out/errors.txt"
VLMHOST_DIST_TIMEOUT=120 python3 -m torch.distributed.run --no-python --nnodes 1 --nproc-per-node 1 \
    --master-addr 127.0.0.1 --master-port 29533 "$bin" doctor > "$out/dp-doctor.txt" 2>&1 || true
VLMHOST_DIST_TIMEOUT=120 timeout 300 python3 -m torch.distributed.run --no-python --nnodes 1 --nproc-per-node 1 \
    --master-addr 127.0.0.1 --master-port 29534 "$bin" "${dptrain[@]}" --output "$out/dp-torchrun" \
    > "$out/dp-torchrun.json" 2> "$out/dp-torchrun.log" || echo "dp torchrun (NCCL) run failed" | tee -a "$out/errors.txt"
# DeepSeek-OCR: the original code's fixture evaluated on both devices, a
# tiny model trained on synthetic OCR data on both, greedy generation, and the
# MoE benchmark at the real layer's size on CUDA.
ds=target/fixtures/deepseek_ocr/model
dsopts=(--processor base_size=256 --processor image_size=128)
# The fixture's sample as a data set, written under $out (never into the source tree).
mkdir -p "$out/ds-fixture"
cp tests/fixtures/deepseek_ocr/image.png "$out/ds-fixture/"
printf '%s\n' '{"images": ["image.png"], "messages": [{"role": "user", "content": "<image>\nFree OCR. "}, {"role": "assistant", "content": "HELLO 42"}]}' \
    > "$out/ds-fixture/data.jsonl"
"$bin" init --plugin deepseek_ocr --preset tiny --output "$out/ds-tiny" --force > "$out/ds-init.txt" 2>&1 || echo "init failed" | tee -a "$out/errors.txt"
"$bin" data synth-ocr --count 256 --seed 1 --output "$out/ocr-data" --force > /dev/null
for device in cuda cpu; do
    "$bin" eval --plugin deepseek_ocr --model "$ds" "${dsopts[@]}" --dataset "$out/ds-fixture/data.jsonl" \
        --device "$device" --json > "$out/ds-eval-$device.json" 2> "$out/ds-eval-$device.log" || echo "ds eval on $device failed" | tee -a "$out/errors.txt"
    /usr/bin/time -v "$bin" train --config config/examples/ocr_stage1.yaml --plugin deepseek_ocr --model "$out/ds-tiny" --mode llm \
        --dataset "$out/ocr-data/data.jsonl" --device "$device" --max-steps 40 --output "$out/ds-train-$device" \
        > "$out/ds-train-$device.json" 2> "$out/ds-train-$device.log" || echo "ds train on $device failed" | tee -a "$out/errors.txt"
done
"$bin" generate --plugin deepseek_ocr --model "$ds" "${dsopts[@]}" --image tests/fixtures/deepseek_ocr/image.png \
    --prompt "Free OCR." --max-new-tokens 8 --device cuda --json > "$out/ds-generate-cuda.json" 2>&1 || echo "ds generate failed" | tee -a "$out/errors.txt"
if [[ -x target/release/examples/bench_moe ]]; then
    target/release/examples/bench_moe --device cuda --tokens 2048 --runs 5 > "$out/bench-moe-cuda.txt" 2>&1 || echo "bench_moe failed" | tee -a "$out/errors.txt"
fi
python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for d in ("cuda", "cpu"):
    try:
        e = json.loads((out / f"eval-{d}.json").read_text())
        t = json.loads((out / f"train-{d}.json").read_text())
        mem = t.get("cuda_peak_allocated_mib") if d == "cuda" else t.get("peak_rss_mib")
        print(f"{d}: eval loss {e['loss']:.6f}; train {t['first_loss']:.4f} -> {t['last_loss']:.4f}; peak memory {mem} MiB")
        if d == "cuda" and mem is None:
            print("cuda: the CUDA allocator's peak memory is missing from the summary")
    except Exception as err:  # report, never hide
        print(f"{d}: no result ({err})")
for d in ("cuda", "cpu"):
    try:
        e = json.loads((out / f"ds-eval-{d}.json").read_text())
        t = json.loads((out / f"ds-train-{d}.json").read_text())
        m = [json.loads(l) for l in (out / f"ds-train-{d}" / "metrics.jsonl").read_text().splitlines()]
        tps = sorted(x["tokens_per_second"] for x in m)[len(m) // 2]
        print(f"deepseek_ocr {d}: fixture loss {e['loss']:.6f} (original code: 6.798001); tiny train {t['first_loss']:.4f} -> {t['last_loss']:.4f}, median {tps:.0f} tok/s")
    except Exception as err:
        print(f"deepseek_ocr {d}: no result ({err})")
try:  # data parallel: a world of 1 on NCCL must match the plain CUDA run
    lines = lambda d: [json.loads(l) for l in (out / d / "metrics.jsonl").read_text().splitlines()]
    a, b = lines("dp-plain"), lines("dp-torchrun")
    assert [x["step"] for x in a] == [x["step"] for x in b], "different steps"
    dl = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    import torch
    from safetensors.torch import load_file
    ta = load_file(str(out / "dp-plain/checkpoints/step-00000006/trainable.safetensors"))
    tb = load_file(str(out / "dp-torchrun/checkpoints/step-00000006/trainable.safetensors"))
    dt = max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)
    print(f"data parallel world of 1 (NCCL) vs plain CUDA: max |loss diff| {dl:.3e}, max |tensor diff| {dt:.3e} "
          f"({'MATCH' if dl <= 1e-5 and dt <= 1e-5 else 'DIFFER'}; bound 1e-5: CUDA kernels are not bit-deterministic)")
except Exception as err:
    print(f"data parallel: no result ({err})")
for f in ("ds-generate-cuda.json", "bench-moe-cuda.txt"):
    p = out / f
    print(p.read_text().strip()[-600:] if p.exists() else f"{f}: missing")
PY
if [[ "${GPU_BENCH:-0}" == 1 ]]; then
    scripts/gpu_bench.sh || echo "gpu_bench failed" | tee -a "$out/errors.txt"
fi
