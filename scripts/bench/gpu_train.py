#!/usr/bin/env python3
"""GPU benchmark (issue #18, item 6): vlmhost against transformers + PEFT at real sizes.

Random weights at the REAL configs kept in `plugins/*/tests/` (Qwen2-VL-2B,
LLaVA-1.5-7B, DeepSeek-OCR 3.3B), synthetic OCR pages at real sizes
(`vlmhost data synth-ocr`, 1024 px), answers of 200-800 tokens (random words,
measured with each family's tokenizer); the stage-2 recipe on both sides:
LoRA r=16 (alpha 32, dropout 0.05) on every linear layer of the LLM, the
projector trained fully, everything else frozen; bf16 frozen weights, fp32
trainable masters and AdamW state, bf16 autocast, SDPA attention, gradient
checkpointing (vlmhost `--gradient-checkpointing`; transformers'
non-reentrant checkpointing), AdamW lr 1e-4, batch `--batch-size`.
Each side runs in its own process on the same GPU, one after the other.

Per run: tokens/s (the language model's input positions, padding excluded,
over the step time; median of the steps after `--warmup`), peak CUDA memory
allocated (the caching allocator's max_memory_allocated, counted from after
the model is loaded on both sides), first-step loss; vlmhost also reports its
achieved TFLOP/s, MFU and attention kernels (summary.json). DeepSeek-OCR has
no transformers class: vlmhost alone in `base` and `gundam` modes, and the
largest batch (doubling from 2) that trains two steps in gundam mode.

Two subcommands:

* `prepare` (here, where the repository is built): writes the small assets the
  device needs into target/bench/gpu-assets (per family: tokenizer, chat
  template, processor files, config.json at the real size with the token ids of
  the tokenizer used, and the list of weight names and shapes) and, with
  `--site`, target/bench/gpu-site.zip: transformers, PEFT and what they import,
  for a device that lacks them (pure-Python packages first on sys.path; the
  compiled ones only where the device's Python is this one's). Prints the
  `carry` list and its size (the device tool carries 64 MiB at most).
* `run` (the device; the default): builds nothing. Writes the random
  checkpoints (bf16 safetensors, drawn on the GPU) and the data under --work,
  runs target/release/vlmhost and the reference, and writes
  `gpu_train.json` and `gpu_train.md` (a Markdown table) under --out ($OUT).
  `--budget` seconds bound the whole run: a phase that would start after it
  is skipped (and says so), every process gets the time left.

    python3 scripts/bench/gpu_train.py prepare --site           # here
    python3 scripts/bench/gpu_train.py run --out "$OUT"          # on the device (scripts/gpu_bench.sh)
    # CPU smoke test of the whole path (tiny depth, small pages, fp32, no checkpointing):
    .venv/bin/python scripts/bench/gpu_train.py run --device cpu --precision fp32 --layers 1 --image-size 448 \\
        --answer-tokens 40,80 --samples 2 --steps 2 --warmup 1 --no-gradient-checkpointing \\
        --families qwen2_vl,llava --out target/bench/gpu-cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "target/bench/gpu-assets"
SITE_ZIP = ROOT / "target/bench/gpu-site.zip"
BIN = ROOT / "target/release/vlmhost"
PLUGINS = {f: ROOT / f"target/release/libvlmhost_plugin_{f}.so" for f in ("qwen2_vl", "llava", "deepseek_ocr")}

FAMILIES = {
    "qwen2_vl": {
        "config": "plugins/qwen2_vl/tests/qwen2-vl-2b.config.json",
        "weights": "plugins/qwen2_vl/tests/qwen2-vl-2b.weights.json",
        "tokenizer_from": "target/fixtures/qwen2_vl/model",
        "real": "Qwen2-VL-2B",
        "reference": True,
        "projector": "merger",
    },
    "llava": {
        "config": "plugins/llava/tests/llava-1.5-7b-hf.config.json",
        "weights": None,  # from transformers' module tree on the meta device (prepare)
        "tokenizer_from": "target/fixtures/llava/model",
        "real": "LLaVA-1.5-7B",
        "reference": True,
        "projector": "multi_modal_projector",
    },
    "deepseek_ocr": {
        "config": "plugins/deepseek_ocr/tests/deepseek-ocr.config.json",
        "weights": "plugins/deepseek_ocr/tests/deepseek-ocr.weights.json",
        "tokenizer_from": None,  # `vlmhost init --preset tiny` (prepare)
        "real": "DeepSeek-OCR (3.3B)",
        "reference": False,
        "projector": None,
    },
}
DEEPSEEK_MODES = {
    "base": ["base_size=1024", "image_size=1024", "crop_mode=false"],
    "gundam": ["base_size=1024", "image_size=640", "crop_mode=true"],
}
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKEN_KEY = re.compile(r".*_token_(id|index)$")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "processor_config.json", "preprocessor_config.json", "special_tokens_map.json", "generation_config.json"]
WORDS = ("invoice total amount date number page section table column row item price quantity customer address "
         "order reference account balance payment due paid tax net gross unit description code street city "
         "north south east west report summary figure chapter note january february march april may june "
         "alpha beta gamma delta 12 34 56 78 90 2024 2025 3.14 42.00 7 19 250 1000").split()


# --- prepare (here) ---------------------------------------------------------------------------


def token_ids(cfg: dict, out: dict | None = None) -> dict:
    """Every `*_token_id` / `*_token_index` leaf of a config, by key name (the first one met)."""
    out = {} if out is None else out
    for k, v in cfg.items():
        if isinstance(v, dict):
            token_ids(v, out)
        elif TOKEN_KEY.match(k) and isinstance(v, int):
            out.setdefault(k, v)
    return out


def patch_token_ids(cfg: dict, ids: dict, top: bool = True) -> None:
    """Set the token ids of the real config to those of the small tokenizer carried (sizes stay real)."""
    for k, v in list(cfg.items()):
        if isinstance(v, dict):
            patch_token_ids(v, ids, top=False)
        elif k in ids:
            cfg[k] = ids[k]
    if top:
        for k, v in ids.items():
            cfg.setdefault(k, v)


def llava_weight_shapes(config: dict) -> dict:
    """LLaVA-1.5-7B's tensor names (hub layout, as the fixture's checkpoint) and shapes, from transformers' module tree."""
    import torch
    from safetensors import safe_open
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    def hub(name: str) -> str:
        for a, b in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")):
            if name.startswith(a):
                return b + name[len(a):]
        return name

    fixture = ROOT / "target/fixtures/llava/model"
    with torch.device("meta"):
        tiny = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(fixture))
    with safe_open(str(fixture / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    mapped = {hub(k) for k in tiny.state_dict()}
    if mapped != saved:
        sys.exit(f"llava: the hub layout assumed here differs from the fixture's: {sorted(mapped ^ saved)[:5]}")
    with torch.device("meta"):
        big = LlavaForConditionalGeneration(LlavaConfig.from_dict(config))
    return {hub(k): list(v.shape) for k, v in big.state_dict().items()}


def prepare(args: argparse.Namespace) -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    for family, spec in FAMILIES.items():
        out = ASSETS / family
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if spec["tokenizer_from"]:
            src = ROOT / spec["tokenizer_from"]
        else:
            src = Path(tempfile.mkdtemp(prefix="gpu-assets-")) / "tiny"
            subprocess.run([str(vlmhost_binary()), "init", "--plugin", family, "--preset", "tiny", "--output", str(src)], check=True,
                           env=plugin_env())
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, out / name)
        tiny_cfg = json.loads((src / "config.json").read_text())
        cfg = json.loads((ROOT / spec["config"]).read_text())
        patch_token_ids(cfg, token_ids(tiny_cfg))
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        if spec["weights"]:
            shapes = json.loads((ROOT / spec["weights"]).read_text())["weights"]
        else:
            shapes = llava_weight_shapes(cfg)
        (out / "weights.json").write_text(json.dumps(shapes))
        if family == "qwen2_vl":
            real = json.loads((ROOT / "plugins/qwen2_vl/tests/qwen2-vl-2b.preprocessor_config.json").read_text())
            pre = json.loads((out / "preprocessor_config.json").read_text())
            pre.update(real)
            pre["size"] = {"shortest_edge": real["min_pixels"], "longest_edge": real["max_pixels"]}
            (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        if family == "llava":
            # CLIP ViT-L/14 at 336 px, as llava-hf/llava-1.5-7b-hf's processor.
            proc = json.loads((out / "processor_config.json").read_text())
            ip = proc["image_processor"]
            ip["crop_size"] = {"height": 336, "width": 336}
            ip["size"] = {"shortest_edge": 336}
            proc["patch_size"] = 14
            (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
        params = sum(math.prod(s) for k, s in shapes.items() if not k.endswith("position_ids"))
        print(f"{family}: {spec['real']} config, {params / 1e9:.2f}B parameters; tokenizer from {src}")
    if args.site:
        build_site_zip()
    carry = [BIN, *PLUGINS.values(), ASSETS] + ([SITE_ZIP] if SITE_ZIP.is_file() else [])
    total = 0
    for p in carry:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else (p.stat().st_size if p.exists() else 0)
        total += size
        print(f"  carry {p.relative_to(ROOT)}: {size / 2**20:.1f} MiB{'' if p.exists() else ' (MISSING: build it)'}")
    print(f"carry total {total / 2**20:.1f} MiB (limit 64 MiB)")
    print("carry: " + json.dumps([str(p.relative_to(ROOT)) for p in carry]))


# Packages transformers + PEFT import for these two models, and which are compiled.
PURE = ["transformers", "peft", "accelerate", "huggingface_hub", "tqdm", "packaging", "filelock", "fsspec",
        "typing_extensions.py", "jinja2", "typer", "click", "shellingham", "rich", "markdown_it", "mdurl", "pygments",
        "annotated_doc", "psutil", "httpx2", "httpcore2", "anyio", "h11", "idna", "certifi", "sniffio", "truststore"]
COMPILED = ["tokenizers", "safetensors", "regex", "yaml", "_yaml", "markupsafe", "PIL", "pillow.libs"]
DISTS = {"transformers", "peft", "accelerate", "huggingface-hub", "tqdm", "packaging", "filelock", "fsspec", "typing-extensions",
         "jinja2", "typer", "click", "shellingham", "rich", "markdown-it-py", "mdurl", "pygments", "annotated-doc", "psutil",
         "httpx2", "httpcore2", "anyio", "h11", "idna", "truststore", "tokenizers", "safetensors", "regex", "pyyaml",
         "markupsafe", "pillow"}
KEEP_MODELS = {"auto", "llava", "qwen2_vl", "clip", "llama", "qwen2", "encoder_decoder", "bloom"}


def build_site_zip() -> None:
    """target/bench/gpu-site.zip: pure/ (any Python 3) and cp3XY/ (compiled for this Python) package trees."""
    import importlib.util

    site = Path(importlib.util.find_spec("transformers").origin).parents[1]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    SITE_ZIP.parent.mkdir(parents=True, exist_ok=True)
    tmp = SITE_ZIP.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for group, names in (("pure", PURE), (tag, COMPILED)):
            for name in names:
                src = site / name
                if not src.exists():
                    print(f"  (site: {name} not installed here, left out)")
                    continue
                files = [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.is_file())
                for f in files:
                    rel = f.relative_to(site)
                    parts = rel.parts
                    if "__pycache__" in parts or f.suffix in (".pyc", ".pyi") or "tests" in parts:
                        continue
                    # Other models: their package and configuration only (the auto classes import those).
                    if (parts[:2] == ("transformers", "models") and len(parts) > 3 and parts[2] not in KEEP_MODELS
                            and not (parts[-1] == "__init__.py" or parts[-1].startswith("configuration_"))):
                        continue
                    z.write(f, f"{group}/{rel}")
        # the packages' metadata (transformers checks their versions)
        for d in site.glob("*.dist-info"):
            dist = d.name.split("-")[0].lower().replace("_", "-")
            if dist in DISTS:
                for f in d.iterdir():
                    if f.is_file():
                        z.write(f, f"pure/{d.name}/{f.name}")
    tmp.replace(SITE_ZIP)
    print(f"wrote {SITE_ZIP.relative_to(ROOT)} ({SITE_ZIP.stat().st_size / 2**20:.1f} MiB; compiled part for {tag})")


# --- shared -----------------------------------------------------------------------------------


def vlmhost_binary() -> Path:
    for b in (BIN, ROOT / "target/debug/vlmhost"):
        if b.is_file():
            return b
    sys.exit("no vlmhost binary: cargo build --release -p vlmhost -p vlmhost-plugin-qwen2-vl -p vlmhost-plugin-llava -p vlmhost-plugin-deepseek-ocr")


def plugin_env() -> dict:
    return dict(os.environ, VLMHOST_PLUGIN_PATH=str(vlmhost_binary().parent))


def use_site_zip(work: Path) -> str:
    """Put the carried packages on sys.path (pure ones first; compiled ones only for this Python)."""
    if not SITE_ZIP.is_file():
        return "no site zip"
    dest = work / "site"
    if not dest.is_dir():
        with zipfile.ZipFile(SITE_ZIP) as z:
            z.extractall(dest)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    added = []
    if (dest / "pure").is_dir():
        sys.path.insert(0, str(dest / "pure"))
        added.append("pure")
    if (dest / tag).is_dir():
        sys.path.append(str(dest / tag))  # after the device's own compiled packages
        added.append(tag)
    os.environ["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p.startswith(str(dest))] + [os.environ.get("PYTHONPATH", "")])
    return f"site zip: {', '.join(added) or 'nothing usable'}"


# --- run (the device) -------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def write_checkpoint(family: str, dst: Path, device: str, layers: int | None) -> dict:
    """Config, tokenizer, processor (assets) and random bf16 weights at the real config, drawn on `device`."""
    import torch

    src = ASSETS / family
    if not (src / "weights.json").is_file():
        sys.exit(f"{src} is missing: run `scripts/bench/gpu_train.py prepare` where the repository is built, and carry target/bench/gpu-assets")
    shapes = json.loads((src / "weights.json").read_text())
    cfg = json.loads((src / "config.json").read_text())
    if layers is not None:
        shapes, cfg = shrink(family, shapes, cfg, layers)
    done = dst / "model.safetensors.index.json"
    stamp = json.dumps({"layers": layers, "n": len(shapes)})
    if done.is_file() and (dst / "stamp").is_file() and (dst / "stamp").read_text() == stamp:
        return {"parameters": sum(math.prod(s) for s in shapes.values()), "reused": True}
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("weights.json", "config.json"):
            shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator(device=device).manual_seed(0)
    shard, shard_bytes, index, n_shard, total = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if shard:
            n_shard += 1
            name = f"model-{n_shard:05d}.safetensors"
            save_safetensors(dst / name, shard)
            for k in shard:
                index[k] = name
            shard, shard_bytes = {}, 0

    for name, shape in sorted(shapes.items()):
        if name.endswith("position_ids"):
            continue  # a buffer the plugins ignore
        if len(shape) == 1 and name.endswith(".weight"):
            t = torch.ones(shape, dtype=torch.bfloat16, device=device)  # norm scales
        elif len(shape) == 1 and name.endswith("bias"):
            t = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        shard[name] = t.cpu()
        shard_bytes += t.numel() * 2
        total += t.numel()
        if shard_bytes > 2 << 30:
            flush()
    flush()
    done.write_text(json.dumps({"metadata": {"total_size": total * 2}, "weight_map": index}))
    (dst / "stamp").write_text(stamp)
    return {"parameters": total, "reused": False}


def save_safetensors(path: Path, tensors: dict) -> None:
    """A safetensors file (bf16 tensors), written with torch and numpy only."""
    import torch

    header, offset = {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())


def shrink(family: str, shapes: dict, cfg: dict, layers: int) -> tuple[dict, dict]:
    """The same model with `layers` decoder layers and vision blocks (CPU smoke tests of the real-size path)."""
    pat = re.compile(r"\.(layers|blocks)\.(\d+)\.")
    keep = {k: v for k, v in shapes.items() if not (m := pat.search(k)) or int(m.group(2)) < layers}
    cfg = json.loads(json.dumps(cfg))
    for sub in (cfg.get("text_config"), cfg.get("vision_config"), cfg):
        if isinstance(sub, dict):
            for key in ("num_hidden_layers", "depth"):
                if key in sub:
                    sub[key] = layers
    if family == "llava":
        # LLaVA-1.5-7B's config leaves the depths to LlamaConfig's and CLIPVisionConfig's defaults.
        cfg.setdefault("text_config", {})["num_hidden_layers"] = layers
        cfg.setdefault("vision_config", {})["num_hidden_layers"] = layers
        cfg["vision_feature_layer"] = -1
    return keep, cfg


def make_data(family: str, model: Path, dst: Path, args: argparse.Namespace) -> dict:
    """`--samples` synthetic pages of `--image-size` px, answers of `--answer-tokens` tokens (this tokenizer)."""
    if (dst / "data.jsonl").is_file():
        return json.loads((dst / "stats.json").read_text())
    tmp = dst.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([str(vlmhost_binary()), "data", "synth-ocr", "--count", str(args.samples), "--width", str(args.image_size),
                    "--height", str(args.image_size), "--seed", "1", "--output", str(tmp)], check=True, capture_output=True)
    lo, hi = (int(x) for x in args.answer_tokens.split(","))
    count = token_counter(model)
    rng = random.Random(7)
    lines, lengths = [], []
    for line in (tmp / "data.jsonl").read_text().splitlines():
        rec = json.loads(line)
        want = rng.randint(lo, hi)
        words: list[str] = []
        while count(" ".join(words)) < want:
            words.extend(rng.choice(WORDS) for _ in range(max(1, (want - count(" ".join(words))) // 3)))
        text = " ".join(words)
        for m in rec["messages"]:
            if m["role"] == "assistant":
                m["content"] = text
        lengths.append(count(text))
        lines.append(json.dumps(rec))
    (tmp / "data.jsonl").write_text("\n".join(lines) + "\n")
    stats = {"samples": len(lines), "answer_tokens": lengths, "image_px": args.image_size}
    (tmp / "stats.json").write_text(json.dumps(stats))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return stats


def token_counter(model: Path):
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        return lambda s: len(tok.encode(s, add_special_tokens=False).ids)
    except Exception:  # noqa: BLE001 (no tokenizers package: about 1.3 tokens a word)
        return lambda s: math.ceil(1.3 * len(s.split()))


def vlmhost_config(path: Path, batch: int, args: argparse.Namespace) -> None:
    path.write_text(
        f"mode: llm\nprecision: {args.precision}\n"
        "lora:\n  r: 16\n  lora_alpha: 32\n  lora_dropout: 0.05\n"
        "optimizer:\n  lr: 1.0e-4\n"
        f"train:\n  batch_size: {batch}\n  schedule: constant\n  max_length: 8192\n  seed: 42\n  save_every: 0\n"
    )


def run_vlmhost(family: str, model: Path, data: Path, work: Path, name: str, batch: int, steps: int, args, budget: Budget,
                processor: list[str] = ()) -> dict:
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = work / f"{name}.yaml"
    vlmhost_config(cfg, batch, args)
    cmd = [str(vlmhost_binary()), "train", "--plugin", str(PLUGINS[family]) if PLUGINS[family].is_file() else family,
           "--model", str(model), "--dataset", str(data), "--config", str(cfg), "--output", str(out),
           "--max-steps", str(steps), "--device", args.device]
    for p in processor:
        cmd += ["--processor", p]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    res = run_logged(cmd, work / f"{name}.log", budget, plugin_env())
    if res["status"] != "ok":
        return res
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((out / "summary.json").read_text())
    timed = metrics[args.warmup:] or metrics[-1:]
    return {
        **res,
        "steps": len(metrics),
        "first_loss": metrics[0].get("loss"),
        "losses": [m.get("loss") for m in metrics],
        "tokens_per_second": statistics.median(m["tokens_per_second"] for m in timed),
        "step_seconds": statistics.median(m.get("step_seconds", 0.0) for m in timed),
        "tokens_per_step": statistics.median(m["tokens"] for m in timed),
        "peak_allocated_mib": max((m.get("cuda_peak_allocated_mib") or 0.0) for m in metrics) or None,
        "peak_reserved_mib": max((m.get("cuda_peak_reserved_mib") or 0.0) for m in metrics) or None,
        "peak_rss_mib": summary.get("peak_rss_mib"),
        "achieved_tflops": statistics.median(m["achieved_tflops"] for m in timed) if all("achieved_tflops" in m for m in timed) else None,
        "mfu": statistics.median(m["mfu"] for m in timed) if all("mfu" in m for m in timed) else None,
        "model_flops_per_step": statistics.median(m.get("model_flops", 0.0) for m in timed),
        "attention_kernels": summary.get("attention_kernels"),
    }


def run_logged(cmd: list[str], log: Path, budget: Budget, env: dict | None = None) -> dict:
    left = budget.left()
    if left < 20:
        return {"status": "skipped (time budget)"}
    start = time.monotonic()
    with open(log, "wb") as f:
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=left, cwd=ROOT)
            code = p.returncode
        except subprocess.TimeoutExpired:
            return {"status": "timed out (time budget)", "seconds": time.monotonic() - start, "log": str(log)}
    text = log.read_text(errors="replace")
    if code != 0:
        oom = "out of memory" in text.lower()
        return {"status": "out of memory" if oom else f"failed ({code})", "seconds": time.monotonic() - start,
                "log": str(log), "tail": text[-1500:]}
    return {"status": "ok", "seconds": time.monotonic() - start, "log": str(log)}


def run_reference_process(family: str, model: Path, data: Path, work: Path, name: str, batch: int, steps: int, args, budget) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "reference", "--family", family, "--model", str(model),
           "--data", str(data), "--batch-size", str(batch), "--steps", str(steps), "--warmup", str(args.warmup),
           "--device", args.device, "--json", str(out), "--work", str(work), "--precision", args.precision]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    res = run_logged(cmd, work / f"{name}.log", budget)
    if res["status"] == "ok":
        res.update(json.loads(out.read_text()))
    return res


def reference(args: argparse.Namespace) -> None:
    """transformers + PEFT, the same recipe: one process, results as JSON."""
    print(use_site_zip(Path(args.work)), file=sys.stderr)
    import torch
    from PIL import Image
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    spec = FAMILIES[args.family]
    processor = load_processor(args.family, Path(args.model))
    pad_id = processor.tokenizer.pad_token_id or 0
    data = Path(args.data)
    samples = []
    for line in data.read_text().splitlines():
        rec = json.loads(line)
        paths = [str(data.parent / p) for p in rec.get("images", [])]
        conv = []
        for m in rec["messages"]:
            parts = []
            if isinstance(m["content"], list):  # typed parts (synth-ocr writes these)
                for part in m["content"]:
                    if part["type"] == "image":
                        parts.append({"type": "image", "image": Image.open(data.parent / part["path"]).convert("RGB")})
                    else:
                        parts.append({"type": "text", "text": part["text"]})
            else:
                for i, piece in enumerate(m["content"].split("<image>")):
                    if i > 0:
                        parts.append({"type": "image", "image": Image.open(paths.pop(0)).convert("RGB")})
                        piece = piece[1:] if piece.startswith("\n") else piece
                    if piece:
                        parts.append({"type": "text", "text": piece})
            conv.append({"role": m["role"], "content": parts})
        enc = processor.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt",
                                            return_assistant_tokens_mask=True, add_generation_prompt=False)
        ids = enc["input_ids"][0].to(torch.int64)
        mask = torch.as_tensor(enc["assistant_masks"]).reshape(-1).bool()
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "assistant_masks")}
        samples.append({"input_ids": ids, "labels": torch.where(mask, ids, torch.full_like(ids, -100)), **extra})

    bf16 = args.precision == "bf16"
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                        attn_implementation="sdpa").to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=r"(.*\.)?language_model\.(model\.)?layers\.\d+\.(self_attn|mlp)\.(" + "|".join(LLM_TARGETS) + ")",
                      modules_to_save=[spec["projector"]])
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 masters, as vlmhost
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times, tokens = [], [], []
    for step in range(args.steps):
        idx = [(step * args.batch_size + i) % len(samples) for i in range(args.batch_size)]
        batch = collate([samples[i] for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        tokens.append(int(batch["attention_mask"].sum()))
        print(f"step {step + 1} loss {losses[-1]:.4f} {times[-1]:.3f} s", file=sys.stderr)
    timed = list(range(len(times)))[args.warmup:] or [len(times) - 1]
    result = {
        "steps": len(losses),
        "first_loss": losses[0],
        "losses": losses,
        "tokens_per_second": statistics.median(tokens[i] / times[i] for i in timed),
        "step_seconds": statistics.median(times[i] for i in timed),
        "tokens_per_step": statistics.median(tokens[i] for i in timed),
        "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "versions": {m.__name__: m.__version__ for m in (torch, __import__("transformers"), __import__("peft"))},
    }
    Path(args.json).write_text(json.dumps(result, indent=2))


def load_processor(family: str, model: Path):
    """transformers' processor; without torchvision (its default image processors need it), LLaVA's with
    the PIL image processor (Qwen2-VL's processor needs torchvision for its video processor regardless)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model)
    except ImportError:
        if family == "qwen2_vl":
            return qwen2_vl_processor_without_video(model)
        if family != "llava":
            raise
    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pc = json.loads((model / "processor_config.json").read_text())
    kw = {k: v for k, v in pc.items() if k in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token")}
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(**pc["image_processor"]), tokenizer=AutoTokenizer.from_pretrained(model),
                          chat_template=(model / "chat_template.jinja").read_text(), **kw)


def qwen2_vl_processor_without_video(model: Path):
    """Qwen2VLProcessor with the PIL image processor and no video processor (which needs torchvision)."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class ImagesOnly(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    return ImagesOnly(Qwen2VLImageProcessorPil.from_pretrained(model), AutoTokenizer.from_pretrained(model),
                      chat_template=(model / "chat_template.jinja").read_text())


def collate(samples: list[dict], pad_id: int) -> dict:
    import torch

    n = max(s["input_ids"].numel() for s in samples)
    out = {"input_ids": torch.full((len(samples), n), pad_id, dtype=torch.int64),
           "labels": torch.full((len(samples), n), -100, dtype=torch.int64),
           "attention_mask": torch.zeros((len(samples), n), dtype=torch.int64)}
    for i, s in enumerate(samples):
        k = s["input_ids"].numel()
        out["input_ids"][i, :k] = s["input_ids"]
        out["labels"][i, :k] = s["labels"]
        out["attention_mask"][i, :k] = 1
    for key in samples[0]:
        if key in out:
            continue
        per_token = all(s[key].dim() == 2 and s[key].shape[0] == 1 and s[key].shape[1] == s["input_ids"].numel() for s in samples)
        if per_token:  # [1, L] per sample (mm_token_type_ids): right-padded with 0
            out[key] = torch.zeros((len(samples), n), dtype=samples[0][key].dtype)
            for i, s in enumerate(samples):
                out[key][i, : s[key].shape[1]] = s[key][0]
        else:
            out[key] = torch.cat([s[key] for s in samples], 0)
    return out


def run(args: argparse.Namespace) -> None:
    budget = Budget(args.budget)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "target/bench/gpu")
    work = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    report = {"args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": [], "notes": []}
    try:
        import torch

        report["torch"] = torch.__version__
        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as e:  # noqa: BLE001
        report["notes"].append(f"torch: {e}")
    site = use_site_zip(work)
    probe = subprocess.run([sys.executable, "-c", "import transformers, peft, PIL; print(transformers.__version__, peft.__version__)"],
                           capture_output=True, text=True, env=dict(os.environ))
    have_reference = probe.returncode == 0 and not args.no_reference
    report["reference_stack"] = probe.stdout.strip() if probe.returncode == 0 else f"unavailable ({site}): {probe.stderr.strip()[-300:]}"
    print(f"reference stack: {report['reference_stack']}", flush=True)

    def save():
        (out / "gpu_train.json").write_text(json.dumps(report, indent=2))
        (out / "gpu_train.md").write_text(markdown(report))

    for family in families:
        spec = FAMILIES[family]
        if budget.left() < 60:
            report["notes"].append(f"{family}: skipped, time budget spent")
            continue
        t0 = time.monotonic()
        model = work / "models" / family
        made = write_checkpoint(family, model, args.device, args.layers)
        print(f"[{family}] checkpoint {made['parameters'] / 1e9:.2f}B params ({'reused' if made['reused'] else f'written in {time.monotonic() - t0:.0f} s'})", flush=True)
        stats = make_data(family, model, work / "data" / family, args)
        data = work / "data" / family / "data.jsonl"
        common = {"family": family, "model": spec["real"] + (f" (first {args.layers} layers)" if args.layers else ""),
                  "parameters": made["parameters"], "batch_size": args.batch_size, "answer_tokens": stats["answer_tokens"],
                  "image_px": stats["image_px"]}
        modes = DEEPSEEK_MODES.items() if family == "deepseek_ocr" else [(None, [])]
        for mode, proc in modes:
            label = family + (f"-{mode}" if mode else "")
            print(f"[{label}] vlmhost ...", flush=True)
            r = run_vlmhost(family, model, data, work, f"{label}-vlmhost", args.batch_size, args.steps, args, budget, proc)
            report["runs"].append({**common, "mode": mode, "side": "vlmhost", **r})
            print(f"[{label}] vlmhost: {r['status']} {fmt_run(r)}", flush=True)
            save()
        if spec["reference"] and have_reference:
            print(f"[{family}] transformers + PEFT ...", flush=True)
            r = run_reference_process(family, model, data, work, f"{family}-reference", args.batch_size, args.steps, args, budget)
            report["runs"].append({**common, "mode": None, "side": "transformers+peft", **r})
            print(f"[{family}] transformers + PEFT: {r['status']} {fmt_run(r)}", flush=True)
        elif spec["reference"]:
            report["notes"].append(f"{family}: no transformers + PEFT run ({report['reference_stack']})")
        if family == "deepseek_ocr" and args.max_batch:
            largest, b = None, 2
            while b <= args.max_batch and budget.left() > 90:
                r = run_vlmhost(family, model, data, work, f"deepseek_ocr-gundam-b{b}", b, 2, args, budget, DEEPSEEK_MODES["gundam"])
                print(f"[deepseek_ocr-gundam] batch {b}: {r['status']} {fmt_run(r)}", flush=True)
                report["runs"].append({**common, "mode": "gundam", "side": "vlmhost", "batch_size": b, "probe": True, **r})
                if r["status"] != "ok":
                    break
                largest, b = b, b * 2
            report["deepseek_gundam_largest_batch"] = largest if largest else (1 if any(
                x["status"] == "ok" and x.get("mode") == "gundam" for x in report["runs"]) else None)
        if not args.keep_models and not args.layers:
            shutil.rmtree(model, ignore_errors=True)  # disk: 7B in bf16 is 14 GB
        save()
    report["seconds"] = args.budget - budget.left()
    save()
    print(markdown(report))
    print(f"wrote {out / 'gpu_train.md'} and {out / 'gpu_train.json'}")


def fmt_run(r: dict) -> str:
    if r.get("status") != "ok":
        return (r.get("tail") or "")[-400:]
    mem = r.get("peak_allocated_mib")
    return (f"{r['tokens_per_second']:.0f} tok/s, step {r['step_seconds']:.2f} s, "
            f"peak {mem / 1024:.2f} GiB, " if mem else f"{r['tokens_per_second']:.0f} tok/s, step {r['step_seconds']:.2f} s, ") + \
        f"first loss {r['first_loss']:.4f}"


def markdown(report: dict) -> str:
    rows = ["| model | mode | side | batch | tokens/step | tokens/s | step (s) | peak allocated (GiB) | first loss | TFLOP/s | MFU | attention | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    num = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in report["runs"]:
        k = r.get("attention_kernels") or {}
        att = ", ".join(f"{n} {k[n]}" for n in ("flash", "efficient", "cudnn", "flash_cpu", "math", "other") if k.get(n)) or "–"
        mem = r.get("peak_allocated_mib")
        rows.append(f"| {r['model']} | {r.get('mode') or '–'} | {r['side']} | {r['batch_size']} | {num(r.get('tokens_per_step'), '.0f')} | "
                    f"{num(r.get('tokens_per_second'), '.0f')} | {num(r.get('step_seconds'), '.3f')} | {num(mem / 1024 if mem else None, '.2f')} | "
                    f"{num(r.get('first_loss'), '.4f')} | {num(r.get('achieved_tflops'), '.1f')} | "
                    f"{num(100 * r['mfu'] if r.get('mfu') is not None else None, '.1f')}{'%' if r.get('mfu') is not None else ''} | {att} | {r['status']} |")
    ratios = []
    by = {(r["family"], r["side"]): r for r in report["runs"] if r.get("status") == "ok" and not r.get("probe") and not r.get("mode")}
    for fam in FAMILIES:
        v, t = by.get((fam, "vlmhost")), by.get((fam, "transformers+peft"))
        if v and t:
            mem = (f", peak memory {v['peak_allocated_mib'] / t['peak_allocated_mib']:.2f}x"
                   if v.get("peak_allocated_mib") and t.get("peak_allocated_mib") else "")
            ratios.append(f"- {fam}: vlmhost / transformers+PEFT tokens/s {v['tokens_per_second'] / t['tokens_per_second']:.2f}x{mem}; "
                          f"first loss {v['first_loss']:.4f} vs {t['first_loss']:.4f}")
    a = report["args"]
    head = (f"GPU: {report.get('gpu')}; torch {report.get('torch')}; reference: {report.get('reference_stack')}\n\n"
            f"Steps {a['steps']} (medians over steps after the first {a['warmup']}); pages {a['image_size']} px; answers "
            f"{a['answer_tokens']} tokens; gradient checkpointing {'on' if a['gradient_checkpointing'] else 'off'}; {a['precision']} weights, "
            f"LoRA r=16 on the LLM's linear layers, projector fully trained.\n\n")
    if "deepseek_gundam_largest_batch" in report:
        ratios.append(f"- DeepSeek-OCR gundam: largest batch that trains: {report['deepseek_gundam_largest_batch']}")
    tail = "\n".join(ratios)
    notes = "\n".join(f"- note: {n}" for n in report["notes"])
    return head + "\n".join(rows) + "\n\n" + tail + ("\n" + notes if notes else "") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("prepare", help="(here) the assets the device needs; --site: the packages zip")
    p.add_argument("--site", action="store_true")
    for name in ("run", "reference"):
        r = sub.add_parser(name)
        r.add_argument("--device", default="cuda")
        r.add_argument("--steps", type=int, default=6)
        r.add_argument("--warmup", type=int, default=2)
        r.add_argument("--batch-size", type=int, default=1)
        r.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
        r.add_argument("--work", default=os.environ.get("VLMHOST_BENCH_WORK", "/tmp/vlmhost-bench"))
        r.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                       help="the recipe's precision (fp32 only for CPU smoke tests: bf16 Conv3d is very slow on CPUs without AVX512-BF16)")
    r = sub.choices["run"]
    r.add_argument("--families", default="qwen2_vl,deepseek_ocr,llava")
    r.add_argument("--samples", type=int, default=8)
    r.add_argument("--image-size", type=int, default=1024)
    r.add_argument("--answer-tokens", default="200,800", help="MIN,MAX")
    r.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers and vision blocks (smoke tests)")
    r.add_argument("--max-batch", type=int, default=8, help="DeepSeek-OCR gundam: try batches 2, 4, ... up to this (0: no search)")
    r.add_argument("--budget", type=float, default=450, help="seconds for the whole run")
    r.add_argument("--no-reference", action="store_true")
    r.add_argument("--keep-models", action="store_true")
    r.add_argument("--out", default=None)
    f = sub.choices["reference"]
    f.add_argument("--family", required=True)
    f.add_argument("--model", required=True)
    f.add_argument("--data", required=True)
    f.add_argument("--json", required=True)
    args = parser.parse_args(sys.argv[1:] if len(sys.argv) > 1 and sys.argv[1] in ("prepare", "run", "reference") else ["run", *sys.argv[1:]])
    {"prepare": prepare, "run": run, "reference": reference}[args.cmd](args)


if __name__ == "__main__":
    main()
