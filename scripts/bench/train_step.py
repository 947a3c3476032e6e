#!/usr/bin/env python3
"""Benchmark: one training step, vlmhost against transformers + PEFT.

Both sides run the same recipe on the same data (the 6 samples of the LLaVA
fixture): `vlmhost train --mode llm` with `optimizer: {lr: 1.0e-2}` and
`train: {schedule: constant, batch_size: 2}` (LoRA r=16 on the LLM's linear
layers, projector trained fully, AdamW, clipping at 1.0, fp32, CPU), and its
transformers + PEFT equivalent, `scripts/fixtures/make_llava_train_fixture.py`
(the reference training run of the tests) with `--steps N`. Two models:

* `tiny`: the fixture's tiny LLaVA (148k parameters), 20 steps;
* `150m`: a LLaVA-shaped random model of about 145M parameters created here
  (CLIP 512 x 6 layers, image 30 / patch 6; Llama 768 x 8 layers, 12 heads,
  MLP 3072, vocab 32064; fp32; the fixture's tokenizer and processor),
  saved under target/bench/llava-150m, 8 steps.

Each run is a fresh process with the same number of threads (--threads;
OMP_NUM_THREADS for vlmhost, torch.set_num_threads for Python). Step time is
the median of the differences of consecutive per-step elapsed times
(vlmhost: `elapsed_seconds` in metrics.jsonl; Python: the same clock around
its loop), the first 2 steps excluded as warm-up; peak RSS is the process's
maximum resident set from `wait4` (model loading included on both sides).
The release binary is used when target/release/vlmhost exists, else the debug
one (noted in the output; debug timings mean little). Prints a table and the
ratios vlmhost / reference and writes target/bench/train_step.json
(train_step-bf16.json etc. for other options).

Options of the recipe, on both sides: `--precision fp32|bf16` (vlmhost
`--precision`; the reference loads the frozen weights in bf16, keeps the
trainable tensors as fp32 masters and runs under bf16 autocast),
`--gradient-checkpointing` (vlmhost `--gradient-checkpointing`, transformers'
non-reentrant checkpointing), `--attn-implementation eager|sdpa` (the
reference's attention; vlmhost always calls SDPA).

    .venv/bin/python scripts/bench/train_step.py [--threads 1] [--models tiny,150m] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "target/fixtures/llava"
DATA = FIXTURE / "samples/data.jsonl"
OUT = ROOT / "target/bench"
BIG = OUT / "llava-150m"
REFERENCE = ROOT / "scripts/fixtures/make_llava_train_fixture.py"
WARMUP = 2

CONFIG_YAML = """\
mode: llm
optimizer:
  lr: 1.0e-2
train:
  schedule: constant
  batch_size: 2
  seed: 42
"""


def make_big_model() -> None:
    """A LLaVA-shaped fp32 checkpoint of about 145M parameters (the fixture's tokenizer)."""
    if (BIG / "model.safetensors").is_file() or (BIG / "model.safetensors.index.json").is_file():
        return
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig.from_pretrained(FIXTURE / "model")
    v = cfg.vision_config
    v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads = 512, 2048, 6, 8
    v.projection_dim = 512
    t = cfg.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 768, 3072, 8
    t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.vocab_size = 12, 12, 64, 32064
    model = LlavaForConditionalGeneration(cfg).to(torch.float32)
    tmp = BIG.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ["tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"]:
        if (FIXTURE / "model" / name).is_file():
            shutil.copy(FIXTURE / "model" / name, tmp / name)
    shutil.rmtree(BIG, ignore_errors=True)
    tmp.rename(BIG)


def vlmhost_binary() -> tuple[Path, str]:
    for profile in ("release", "debug"):
        b = ROOT / "target" / profile / "vlmhost"
        if b.is_file() and (b.parent / "libvlmhost_plugin_llava.so").is_file():
            return b, profile
    sys.exit("no vlmhost binary: cargo build --release -p vlmhost -p vlmhost-plugin-llava")


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    """Run cmd; (wall seconds, peak RSS bytes from wait4)."""
    start = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{cmd[0]} failed (status {status}); log: {log}\n{log.read_text(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def step_stats(elapsed: list[float]) -> dict:
    diffs = [b - a for a, b in zip(elapsed, elapsed[1:])]  # diffs[i] = time of step i+2 (1-based)
    timed = diffs[WARMUP - 1:]  # steps WARMUP+1 .. N
    return {
        "step_seconds_median": statistics.median(timed),
        "step_seconds_mean": statistics.fmean(timed),
        "step_seconds": timed,
        "timed_steps": len(timed),
    }


def run_vlmhost(binary: Path, model: Path, steps: int, threads: int, work: Path, opts: argparse.Namespace) -> dict:
    cfg = work / "config.yaml"
    cfg.write_text(CONFIG_YAML)
    out = work / "vlmhost-run"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [str(binary), "train", "--plugin", "llava", "--model", str(model), "--dataset", str(DATA),
           "--config", str(cfg), "--output", str(out), "--max-steps", str(steps), "--precision", opts.precision]
    if opts.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    wall, rss = run_measured(cmd, env, work / "vlmhost.log")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(metrics) == steps, f"vlmhost wrote {len(metrics)} steps, wanted {steps}"
    losses = [m["loss"] for m in metrics]
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_seconds": wall, "peak_rss_bytes": rss, "losses": losses,
            "model_flops_per_step": metrics[-1].get("model_flops"),
            "attention_kernels": summary.get("attention_kernels"),
            **step_stats([m["elapsed_seconds"] for m in metrics])}


def run_reference(model: Path, steps: int, threads: int, work: Path, opts: argparse.Namespace) -> dict:
    out = work / "reference-run"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(REFERENCE), "--output", str(out), "--model", str(model), "--data", str(DATA),
           "--steps", str(steps), "--threads", str(threads), "--nondeterministic", "--precision", opts.precision,
           "--attn-implementation", opts.attn_implementation]
    if opts.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    wall, rss = run_measured(cmd, env, work / "reference.log")
    ref = json.loads((out / "train_reference.json").read_text())
    return {"wall_seconds": wall, "peak_rss_bytes": rss, "losses": ref["losses"],
            "trainable_parameters": ref["model_counts"]["trainable_parameters"],
            **step_stats(ref["elapsed_seconds"])}


def count_params(model: Path) -> int:
    import math

    from safetensors import safe_open

    n = 0
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            n += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="tiny,150m")
    parser.add_argument("--steps-tiny", type=int, default=20)
    parser.add_argument("--steps-150m", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn-implementation", choices=["eager", "sdpa"], default="eager")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    binary, profile = vlmhost_binary()
    models = {"tiny": (FIXTURE / "model", args.steps_tiny), "150m": (BIG, args.steps_150m)}
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    if "150m" in chosen:
        make_big_model()

    report = {"binary": str(binary.relative_to(ROOT)), "profile": profile, "threads": args.threads,
              "precision": args.precision, "gradient_checkpointing": args.gradient_checkpointing,
              "reference_attn_implementation": args.attn_implementation,
              "warmup_steps_excluded": WARMUP, "config": CONFIG_YAML, "models": {}}
    for name in chosen:
        path, steps = models[name]
        with tempfile.TemporaryDirectory(prefix=f"train_step_{name}_", dir=OUT) as tmp:
            work = Path(tmp)
            print(f"[{name}] vlmhost ({profile}), {steps} steps ...", flush=True)
            vh = run_vlmhost(binary, path, steps, args.threads, work, args)
            print(f"[{name}] transformers+peft, {steps} steps ...", flush=True)
            rf = run_reference(path, steps, args.threads, work, args)
        report["models"][name] = {
            "model": str(path.relative_to(ROOT)),
            "parameters": count_params(path),
            "steps": steps,
            "vlmhost": vh,
            "reference": rf,
            "ratio_step_time": vh["step_seconds_median"] / rf["step_seconds_median"],
            "ratio_peak_rss": vh["peak_rss_bytes"] / rf["peak_rss_bytes"],
        }
    suffix = ("" if args.precision == "fp32" else f"-{args.precision}") + ("-gc" if args.gradient_checkpointing else "")
    result_file = OUT / f"train_step{suffix}.json"
    result_file.write_text(json.dumps(report, indent=2))

    mib = 1 << 20
    print(f"\nvlmhost binary: {report['binary']} ({profile}); threads {args.threads}; precision {args.precision}; "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; reference attention {args.attn_implementation}; "
          f"step time = median over steps {WARMUP + 1}..N")
    print(f"{'model':>6} {'params':>11} {'steps':>5} | {'vlmhost s/step':>14} {'ref s/step':>10} {'ratio':>6} | "
          f"{'vlmhost RSS':>11} {'ref RSS':>9} {'ratio':>6} | loss first->last (vlmhost / ref)")
    for name, r in report["models"].items():
        v, f = r["vlmhost"], r["reference"]
        print(f"{name:>6} {r['parameters']:>11,} {r['steps']:>5} | {v['step_seconds_median']:>14.4f} "
              f"{f['step_seconds_median']:>10.4f} {r['ratio_step_time']:>6.2f} | "
              f"{v['peak_rss_bytes'] / mib:>8.0f} MiB {f['peak_rss_bytes'] / mib:>5.0f} MiB {r['ratio_peak_rss']:>6.2f} | "
              f"{v['losses'][0]:.3f}->{v['losses'][-1]:.3f} / {f['losses'][0]:.3f}->{f['losses'][-1]:.3f}")
    print(f"wrote {result_file.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
