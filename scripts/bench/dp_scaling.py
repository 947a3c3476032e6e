#!/usr/bin/env python3
"""Benchmark: data-parallel scaling on the CPU, 1 rank against 2 (Gloo).

Both runs train the LLaVA fixture (target/fixtures/llava, or --model DIR with
--data FILE) with the same per-rank batch (`train.batch_size`, default 2),
LoRA on the LLM as `vlmhost train --mode llm` sets it, fp32, one thread per
rank (OMP_NUM_THREADS=1): a plain `vlmhost train` process, then
`torchrun --no-python --nproc-per-node 2 vlmhost train ...` (weak scaling: the
global batch doubles). Throughput is tokens per second of wall time over the
steps after the warm-up (--warmup, default 3): the tokens of those steps
(metrics.jsonl's `tokens`, summed over the ranks) over the difference of the
`elapsed_seconds` of the last step and of the last warm-up step, so the
gradient all-reduce, the optimizer step and rank 0's writes are in it. Both
runs happen side by side in this one script run; the ratio 2 ranks / 1 rank is
the scaling (2.0 ideal; expect less on a shared or 2-core machine, where the
ranks compete with everything else). Prints a table and writes
target/bench/dp_scaling.json.

    .venv/bin/python scripts/bench/dp_scaling.py [--steps 30] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(out: pathlib.Path, warmup: int) -> tuple[float, int]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[warmup:]
    tokens = sum(r["tokens"] for r in timed)
    seconds = rows[-1]["elapsed_seconds"] - rows[warmup - 1]["elapsed_seconds"]
    return tokens / seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--model", default=str(ROOT / "target/fixtures/llava/model"))
    ap.add_argument("--data", default=str(ROOT / "target/fixtures/llava/samples/data.jsonl"))
    ap.add_argument("--plugin", default="llava")
    a = ap.parse_args()
    binary = ROOT / "target/release/vlmhost"
    if not binary.exists():
        binary = ROOT / "target/debug/vlmhost"
    torchrun = ROOT / ".venv/bin/torchrun"
    work = pathlib.Path(tempfile.mkdtemp(prefix="dp-scaling-", dir=ROOT / "target"))
    cfg = work / "config.yaml"
    cfg.write_text(f"optimizer:\n  lr: 1.0e-3\ntrain:\n  batch_size: {a.batch}\n  save_every: 0\n  schedule: constant\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", VLMHOST_DIST_TIMEOUT="300")
    env.pop("VLMHOST_FAULT", None)
    train = [str(binary), "train", "--plugin", a.plugin, "--model", a.model, "--dataset", a.data, "--mode", "llm",
             "--config", str(cfg), "--device", "cpu", "--max-steps", str(a.steps)]
    runs = {
        "1 rank": [*train, "--output", str(work / "one")],
        "2 ranks": [str(torchrun), "--no-python", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                    "--master-port", str(free_port()), *train, "--output", str(work / "two")],
    }
    result = {"binary": str(binary.relative_to(ROOT)), "steps": a.steps, "warmup": a.warmup, "batch_per_rank": a.batch}
    for name, cmd in runs.items():
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
    for name, sub in (("1 rank", "one"), ("2 ranks", "two")):
        tps, tokens = throughput(work / sub, a.warmup)
        result[name] = {"tokens_per_second": tps, "tokens": tokens}
    result["scaling"] = result["2 ranks"]["tokens_per_second"] / result["1 rank"]["tokens_per_second"]
    print(f"binary {result['binary']}, {a.steps} steps ({a.warmup} warm-up), batch {a.batch} per rank, 1 thread per rank")
    for name in ("1 rank", "2 ranks"):
        print(f"{name:8} {result[name]['tokens_per_second']:10.0f} tokens/s")
    print(f"scaling 2 ranks / 1 rank: {result['scaling']:.2f} (ideal 2.00)")
    out = ROOT / "target/bench/dp_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
