//! One generic body per check: a family's file runs those that apply to it
//! with [`checks!`](super), each against the family's reference values
//! (computed by transformers, PEFT or the original code), within the bounds
//! of `common.rs`.

use super::prelude::*;

/// Run `vlmhost ARGS` in `cwd`; it must succeed.
fn run_ok(args: &[&str], cwd: &Path) -> Run {
    let run = vlmhost(args, cwd, None);
    assert!(run.success(), "vlmhost {}\n{}", args.join(" "), run.all());
    run
}

/// `init --preset tiny`, `inspect`, train 3 steps on synthetic OCR data with a finite loss,
/// generate 3 tokens: a checkpoint made from nothing works end to end.
pub fn init_tiny_trains_and_generates(f: &Family) {
    let family = f.name;
    let dir = tempdir();
    let cwd = dir.path();
    let plugin = f.plugin();
    // --family: a library may serve several families (the Qwen2-VL one serves qwen2_5_vl too).
    let run = run_ok(&["init", "--plugin", &plugin, "--family", family, "--preset", "tiny", "--output", "model"], cwd);
    eprintln!("{family}: {}", run.stdout.trim());
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(cwd.join("model").join(file).is_file(), "{family}: init wrote no {file}\n{}", run.all());
    }
    assert!(!cwd.join("model.partial").exists(), "{family}: the partial folder is left behind");

    let run = run_ok(&["inspect", "--plugin", &plugin, "--model", "model", "--json"], cwd);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["family"], family, "{v:#}");
    assert!(v["roles"]["llm"]["parameters"].as_i64().unwrap() > 0, "{v:#}");

    run_ok(&["data", "synth-ocr", "--count", "8", "--output", "data"], cwd);
    let run = run_ok(
        &["train", "--plugin", &plugin, "--model", "model", "--dataset", "data/data.jsonl", "--output", "run", "--max-steps", "3"],
        cwd,
    );
    let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{family}: {e}\n{}", run.all()));
    assert_eq!(summary["steps"], 3, "{summary:#}");
    let loss = summary["last_loss"].as_f64().unwrap_or(f64::NAN);
    assert!(loss.is_finite() && loss > 0.0, "{family}: last loss {loss}\n{summary:#}");
    eprintln!("{family}: 3 steps, loss {} -> {loss}", summary["first_loss"]);

    let image = cwd.join("data/images/00000.png");
    assert!(image.is_file(), "synth-ocr wrote no {}", image.display());
    let image = image.display().to_string();
    let run = run_ok(
        &["generate", "--plugin", &plugin, "--model", "model", "--image", &image, "--prompt", "Free OCR.", "--max-new-tokens", "3", "--json"],
        cwd,
    );
    let g: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{family}: {e}\n{}", run.all()));
    let tokens = g["tokens"].as_array().unwrap_or_else(|| panic!("{family}: no tokens: {g:#}"));
    match g["stopped"].as_str() {
        Some("max_new_tokens") => assert_eq!(tokens.len(), 3, "{family}: {g:#}"),
        Some("eos") => assert!(!tokens.is_empty() && tokens.len() <= 3, "{family}: {g:#}"),
        other => panic!("{family}: stopped {other:?}: {g:#}"),
    }
}

/// Logits against `r["logits"]` (bound RTOL_ACT; positions where `pad` is true left out: what a
/// model computes at padding is unspecified) and their loss over `labels` against `r["loss"]`
/// (RTOL_LOSS). Returns the logits' max |diff| and the loss's relative difference.
pub fn assert_logits_and_loss(what: &str, logits: &Tensor, labels: &Tensor, r: &Tensors, pad: Option<&Tensor>) -> (f64, f64) {
    let d = match pad {
        Some(pad) => {
            let (ours, theirs) = (logits.masked_fill(pad, 0.0), r["logits"].masked_fill(pad, 0.0));
            assert_close(&format!("{what}: logits"), &ours, &theirs, RTOL_ACT, ATOL_FLOOR).max_abs
        }
        None => assert_close(&format!("{what}: logits"), logits, &r["logits"], RTOL_ACT, ATOL_FLOOR).max_abs,
    };
    let (loss, n) = causal_lm_loss(logits, labels).unwrap();
    let rel = assert_close_f64(&format!("{what}: loss over {n} tokens"), loss.double_value(&[]), r["loss"].double_value(&[0]), RTOL_LOSS, 0.0);
    (d, rel)
}

/// One batch's logits (no autograd) and loss against the reference `r`.
pub fn forward_matches(what: &str, m: &HostModel, batch: &BatchTensors, r: &Tensors) -> (f64, f64) {
    let logits = tch::no_grad(|| m.forward(batch, false)).unwrap();
    assert_logits_and_loss(what, &logits, &batch.labels, r, None)
}

/// The processor's ids, labels and pixel values equal transformers' for every sample.
pub fn inputs_match_transformers(f: &Family, want: Inputs) {
    let m = f.open(Mode::Llm, &TrainConfig::default());
    let s = f.samples(&m);
    assert_eq!(s.len(), want.samples, "{}: samples", f.name);
    for (i, p) in s.iter().enumerate() {
        let r = f.reference(&format!("sample_{i}.safetensors"));
        assert_eq!(p.input_ids, ids(&r["input_ids"]), "sample {i}: input ids");
        assert_eq!(p.labels, ids(&r["labels"]), "sample {i}: labels");
        let d = max_abs_diff(tensor(p, "pixel_values"), &r["pixel_values"]);
        assert!(d <= want.pixel_atol, "sample {i}: pixel values differ by {d}");
        (want.extra)(i, p, &r);
        let labelled = p.labels.iter().filter(|&&l| l != -100).count();
        eprintln!("{} sample {i}: {} tokens, {labelled} labelled, pixel max |diff| {d:.2e}", f.name, p.input_ids.len());
    }
}

/// Every sample's logits and loss equal transformers' (bounds: common.rs).
pub fn logits_and_loss_match_transformers(f: &Family) {
    let m = f.open(Mode::Llm, &TrainConfig::default());
    let s = f.samples(&m);
    let mut worst = (0f64, 0f64);
    for i in 0..s.len() {
        let r = f.reference(&format!("sample_{i}.safetensors"));
        let (d, rel) = forward_matches(&format!("{} sample {i}", f.name), &m, &f.collate(&s, &[i]), &r);
        worst = (worst.0.max(d), worst.1.max(rel));
    }
    eprintln!("{}: {} samples, logits max |diff| {:.2e}, loss max relative diff {:.2e}", f.name, s.len(), worst.0, worst.1);
}

/// A right-padded batch: ids, mask and labels equal transformers', and so do the logits at real
/// tokens and the loss.
pub fn padded_batch_matches_transformers(f: &Family, want: PaddedBatch) {
    let m = f.open(Mode::Llm, &TrainConfig::default());
    let s = f.samples(&m);
    let r = f.reference(want.reference);
    let batch = f.collate(&s, want.samples);
    assert_eq!(ids(&batch.input_ids), ids(&r["input_ids"]), "input ids");
    assert_eq!(ids(&batch.attention_mask), ids(&r["attention_mask"]), "attention mask");
    assert_eq!(ids(&batch.labels), ids(&r["labels"]), "labels");
    let logits = tch::no_grad(|| m.forward(&batch, false)).unwrap();
    let pad = r["attention_mask"].to_kind(Kind::Bool).unsqueeze(-1).logical_not();
    let (d, rel) = assert_logits_and_loss(&format!("{} padded batch", f.name), &logits, &batch.labels, &r, Some(&pad));
    eprintln!("{} padded batch {:?}: logits max |diff| {d:.2e}, loss relative diff {rel:.2e}", f.name, want.samples);
}

/// The slice `[start, start + len)` of a collated batch's tokens, with the
/// attention mask covering everything up to its end (as generation passes it).
pub fn window(batch: &BatchTensors, start: i64, len: i64, with_images: bool) -> BatchTensors {
    BatchTensors {
        input_ids: batch.input_ids.narrow(1, start, len),
        attention_mask: batch.attention_mask.narrow(1, 0, start + len),
        labels: batch.labels.narrow(1, start, len),
        tensors: if with_images { batch.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect() } else { vec![] },
    }
}

/// The prompt in one call (images included), then the rest token by token with the cache: the
/// logits equal the full forward's; a cache of the wrong length is refused, not misused.
pub fn cached_decoding_equals_the_full_forward(f: &Family, want: CachedDecoding) {
    let m = f.open(Mode::Llm, &TrainConfig::default());
    let s = f.samples(&m);
    let r = f.reference(&format!("sample_{}.safetensors", want.sample));
    let batch = f.collate(&s, &[want.sample]);
    let len = batch.input_ids.size()[1];
    let _g = tch::no_grad_guard();
    let full = m.forward(&batch, false).unwrap();
    let prompt = (want.prompt_len)(len, &r);
    let (first, mut cache) = m.forward_cached(&window(&batch, 0, prompt, true), &[]).unwrap();
    assert_eq!(cache.len(), want.cache_tensors, "the prompt's cache");
    let mut pieces = vec![first];
    for t in prompt..len {
        let (step, next) = m.forward_cached(&window(&batch, t, 1, false), &cache).unwrap();
        pieces.push(step);
        cache = next;
    }
    assert_eq!(cache.len(), want.cache_tensors, "the last step's cache");
    let logits = Tensor::cat(&pieces, 1);
    // One token at a time runs other GEMM shapes than the full forward: rounding only.
    let what = format!("{} cached decoding vs the full forward: logits", f.name);
    let d = assert_close(&what, &logits, &full, RTOL_ACT, ATOL_FLOOR).max_abs;
    eprintln!("{}: cached decoding, prompt {prompt} tokens + {} steps, max |diff| {d:.2e} to the full forward", f.name, len - prompt);
    let sample = &s[want.sample];
    (want.extra)(&Decoded { m: &m, sample, batch: &batch, reference: &r, logits: &logits, cache: &cache });
    let (n, says) = want.short_cache;
    let err = format!("{:#}", m.forward_cached(&window(&batch, len - 1, 1, false), &cache[..n]).unwrap_err());
    assert!(says.iter().all(|s| err.contains(s)), "{err}");
}

/// PEFT's `LoraConfig(r=4, lora_alpha=8, lora_dropout=0, target_modules="all-linear")` on the
/// roles `targets`, as vlmhost rules (the projector trains with LoRA).
pub fn peft_all_linear(targets: &[Role]) -> TrainConfig {
    let mut cfg = TrainConfig::default();
    cfg.lora.r = 4;
    cfg.lora.lora_alpha = 8.0;
    cfg.lora.lora_dropout = 0.0;
    for role in targets {
        let t = match role {
            Role::Vision => &mut cfg.lora.vision_target_modules,
            Role::Projector => &mut cfg.lora.projector_target_modules,
            Role::Llm => &mut cfg.lora.llm_target_modules,
        };
        *t = Some(vec!["all-linear".into()]);
    }
    cfg.roles.projector.strategy = Some(Strategy::Lora);
    cfg
}

/// A PEFT module name (`base_model.model.model.language_model.layers.0.mlp.up_proj`)
/// as the plugin names it, through the plugin's own key rules.
fn peft_to_module(m: &HostModel, peft: &str) -> String {
    let inner = peft.strip_prefix("base_model.model.").unwrap();
    let name = weights::map_key(&m.spec().key_rules, &format!("{inner}.weight"));
    name.strip_suffix(".weight").unwrap().to_owned()
}

/// The host's adapter tensor a PEFT tensor name (`...q_proj.lora_A.default.weight`) is, and
/// the module's name.
fn peft_adapter(m: &HostModel, name: &str) -> (String, char, Tensor) {
    let (module, which) = match name.strip_suffix(".lora_A.default.weight") {
        Some(p) => (p, 'A'),
        None => (name.strip_suffix(".lora_B.default.weight").unwrap_or_else(|| panic!("{name}: not a LoRA tensor")), 'B'),
    };
    let module = peft_to_module(m, module);
    let idx = m.spec().modules.iter().position(|s| s.name == module.as_str()).unwrap_or_else(|| panic!("no module {module}"));
    let a = m.adapter(idx).unwrap_or_else(|| panic!("no adapter on {module}"));
    let t = if which == 'A' { a.a.shallow_clone() } else { a.b.shallow_clone() };
    (module, which, t)
}

/// The modules that take an adapter and the trainable parameter count equal PEFT's.
pub fn lora_targets_and_counts_equal_peft(f: &Family, peft: &Peft) {
    let m = f.open(peft.mode, &peft_all_linear(peft.targets));
    let manifest = f.json("peft_manifest.json");
    let mut theirs: Vec<String> =
        manifest["lora_modules"].as_array().unwrap().iter().map(|n| peft_to_module(&m, n.as_str().unwrap())).collect();
    theirs.sort();
    let mut ours: Vec<String> = Role::ALL.iter().flat_map(|r| m.lora_module_names(*r)).collect();
    ours.sort();
    assert_eq!(ours, theirs);
    assert_eq!(m.lora_module_names(Role::Projector), peft.projector_modules);
    for (part, why) in peft.never {
        assert!(!ours.iter().any(|n| n.contains(part)), "{why}");
    }
    let trainable: i64 = Role::ALL.iter().map(|r| m.counts(*r).1).sum();
    assert_eq!(trainable, manifest["trainable_parameter_count"].as_i64().unwrap());
}

/// With PEFT's adapter weights, the logits and loss equal PEFT's, and so does every LoRA gradient.
pub fn lora_forward_and_gradients_match_peft(f: &Family, peft: &Peft) {
    let m = f.open(peft.mode, &peft_all_linear(peft.targets));
    {
        let _g = tch::no_grad_guard();
        for (name, t) in &f.reference("lora_weights.safetensors") {
            peft_adapter(&m, name).2.copy_(t);
        }
    }
    let s = f.samples(&m);
    for &i in peft.samples {
        let r = f.reference(&format!("lora_sample_{i}.safetensors"));
        let (d, rel) = forward_matches(&format!("{} LoRA sample {i}", f.name), &m, &f.collate(&s, &[i]), &r);
        eprintln!("{} LoRA sample {i}: logits max |diff| {d:.2e}, loss relative diff {rel:.2e}", f.name);
    }
    // The last sample again, with autograd, then backward.
    let i = *peft.samples.last().unwrap();
    let r = f.reference(&format!("lora_sample_{i}.safetensors"));
    let batch = f.collate(&s, &[i]);
    let logits = m.forward(&batch, true).unwrap();
    assert_logits_and_loss(&format!("{} LoRA sample {i}, training", f.name), &logits, &batch.labels, &r, None);
    causal_lm_loss(&logits, &batch.labels).unwrap().0.backward();
    let (mut checked, mut worst) = (0, 0f64);
    for (name, g) in &f.reference("lora_grads.safetensors") {
        if name == "__loss__" {
            continue;
        }
        let (module, which, t) = peft_adapter(&m, name);
        let ours = t.grad();
        assert!(ours.defined(), "{module} lora_{which}: no gradient");
        let what = format!("{} LoRA gradient {module} lora_{which}", f.name);
        worst = worst.max(assert_close(&what, &ours, g, RTOL_GRAD, ATOL_FLOOR).rel);
        checked += 1;
    }
    assert_eq!(checked, peft.gradients, "LoRA gradients compared");
    eprintln!("{} LoRA: {checked} gradients equal PEFT's, worst relative diff {worst:.2e}", f.name);
}

/// `steps` optimiser steps on `batch`: every trainable parameter moves (but those `may_stay`
/// names: they get no gradient), every frozen one stays bit-identical, every LoRA B moves.
pub fn train_and_check_frozen(m: &HostModel, batch: &BatchTensors, steps: usize, may_stay: fn(&str) -> bool) {
    let mode = m.plan().mode;
    let before: Vec<Tensor> = m.params().iter().map(|p| p.detach().copy()).collect();
    let mut opt = vlmhost::train::optim::AdamW::for_model(&m, &m.config().optimizer);
    for _ in 0..steps {
        opt.zero_grad();
        let (loss, _) = causal_lm_loss(&m.forward(batch, true).unwrap(), &batch.labels).unwrap();
        loss.backward();
        opt.step(1e-3).unwrap();
    }
    for (i, p) in m.spec().params.iter().enumerate() {
        let same = m.params()[i].equal(&before[i]);
        if m.plan().trainable[i] {
            assert!(!same || may_stay(&p.name), "mode {mode:?}: trainable {} did not change", p.name);
        } else {
            assert!(same, "mode {mode:?}: frozen {} changed", p.name);
        }
    }
    for (idx, a) in m.adapters() {
        let name = &m.spec().modules[idx].name;
        let moved = a.b.abs().sum(Kind::Float).double_value(&[]) > 0.0;
        assert!(moved || may_stay(name), "mode {mode:?}: LoRA B of {name} did not move");
    }
}

/// In every mode, the roles the mode names train, and a few steps move every trainable
/// parameter and leave every frozen one bit-identical.
pub fn frozen_stays_bit_identical_and_trainable_moves_in_every_mode(f: &Family, t: Training) {
    for &mode in t.modes {
        let m = f.open(mode, &TrainConfig::default());
        let trains = |r: Role| m.plan().role_trains(r, m.spec());
        assert_eq!((trains(Role::Vision), trains(Role::Projector), trains(Role::Llm)), roles_trained(mode), "mode {mode:?}");
        let s = f.samples(&m);
        train_and_check_frozen(&m, &f.collate(&s, t.samples), t.steps, t.may_stay);
    }
}

/// The parameters saved to safetensors (tied ones once) and loaded back are bit-identical.
pub fn checkpoint_save_and_reload_keeps_bytes(f: &Family) {
    let m = f.open(Mode::Llm, &TrainConfig::default());
    let dir = tempdir();
    let named: Vec<(String, Tensor)> = m
        .spec()
        .params
        .iter()
        .zip(m.params())
        .filter(|(p, _)| p.tied_to.is_empty())
        .map(|(p, t)| (p.name.to_string(), t.shallow_clone()))
        .collect();
    weights::save_safetensors(&dir.path().join("model.safetensors"), &named, None).unwrap();
    let opts = weights::LoadOptions { kind: Kind::Float, device: Device::Cpu, allow_missing: false };
    let (again, report) = weights::load(dir.path(), m.spec(), opts).unwrap();
    assert_eq!(report.loaded, named.len());
    for (i, t) in again.iter().enumerate() {
        assert!(t.equal(&m.params()[i]), "{} changed", m.spec().params[i].name);
    }
}

/// The trainable tensors' gradients after one forward and backward of `batch` (the loss as
/// training computes it), seeded so dropout draws the same masks each time.
fn gradients(m: &HostModel, batch: &BatchTensors) -> Vec<(String, Option<Tensor>)> {
    for t in m.trainables() {
        let mut g = t.tensor.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    tch::manual_seed(7);
    let logits = m.autocast(|| m.forward(batch, true)).unwrap();
    m.backward(&causal_lm_loss(&logits, &batch.labels).unwrap().0).unwrap();
    m.trainables().into_iter().map(|t| (t.name, Some(t.tensor.grad()).filter(Tensor::defined).map(|g| g.copy()))).collect()
}

/// With `train.gradient_checkpointing` (every decoder layer and vision block a segment the host
/// recomputes in backward) the gradients equal those without, for LoRA on every role, for fully
/// trained roles and for the vision mode (a frozen LLM the gradient flows through), in fp32 and in
/// bf16; and the segments of every role the gradient reaches were recomputed. Without dropout:
/// libtorch's generator is one per process and the tests run in parallel threads, so dropout
/// masks are not reproducible here (the recomputation's replay of them is checked by
/// `train::gradient_checkpointing_keeps_the_losses`, a run in its own process).
pub fn gradient_checkpointing_keeps_gradients(f: &Family, c: Checkpointing) {
    let no_dropout = |mut cfg: TrainConfig| {
        cfg.lora.lora_dropout = 0.0;
        cfg
    };
    let lora = no_dropout(peft_all_linear(&Role::ALL));
    let mut full = no_dropout(TrainConfig::default());
    full.roles.vision.strategy = Some(Strategy::Full);
    full.roles.llm.strategy = Some(Strategy::Full);
    let default = no_dropout(TrainConfig::default());
    let cases = [("LoRA everywhere", Mode::Both, &lora, Kind::Float), ("full vision and LLM", Mode::Both, &full, Kind::Float),
                 ("vision mode", Mode::Vision, &default, Kind::Float), ("LoRA everywhere, bf16", Mode::Both, &lora, Kind::BFloat16)];
    let has_vision = f.open(Mode::Llm, &TrainConfig::default()).spec().has_vision_encoder;
    for (what, mode, cfg, kind) in cases {
        // An encoder-free family has no vision role: its largest mode is llm.
        let mode = match mode {
            Mode::Vision if !has_vision => continue,
            Mode::Both if !has_vision => Mode::Llm,
            mode => mode,
        };
        let opts = OpenOptions { kind, ..f.options(mode) };
        let mut m = f.open_with(&opts, cfg);
        {
            // LoRA B starts at zero, which would leave every A without gradient: make it random.
            let _g = tch::no_grad_guard();
            for (_, a) in m.adapters() {
                a.b.shallow_clone().copy_(&(Tensor::randn_like(&a.b) * 0.1));
            }
        }
        let batch = match c.batch {
            Some(batch) => batch(),
            None => f.collate(&f.samples(&m), c.samples),
        };
        let plain = gradients(&m, &batch);
        m.set_gradient_checkpointing(true);
        let checkpointed = gradients(&m, &batch);
        let name = format!("{} {what}", f.name);
        let trains = |r: Role| m.plan().role_trains(r, m.spec());
        for role in [Role::Vision, Role::Llm] {
            let n = m.segments_recomputed(role);
            // The LLM's layers always run with autograd (the gradient reaches the image features
            // through them when the LLM is frozen); the vision tower's when it trains.
            let expected = role == Role::Llm || (trains(Role::Vision) && has_vision);
            assert_eq!(n > 0, expected, "{name}: {n} {role} segments recomputed");
        }
        let mut worst = 0f64;
        for ((n, want), (_, got)) in plain.iter().zip(&checkpointed) {
            assert_eq!(want.is_some(), got.is_some(), "{name}: {n}: a gradient with one and not the other");
            if let (Some(want), Some(got)) = (want, got) {
                // The same kernels on the same inputs, the forward run as its recomputation
                // (csrc/checkpoint.cpp): equal to the bit, but for where a family sums gradient
                // contributions differently (deepseek_ocr in bf16, see its bound).
                let rtol = if kind == Kind::BFloat16 { c.bf16_rtol } else { RTOL_ACT };
                worst = worst.max(assert_close(&format!("{name} checkpointed gradient {n}"), got, want, rtol, ATOL_FLOOR).rel);
            }
        }
        if kind == Kind::Float && mode != Mode::Vision {
            // A checkpointed graph's backward outside HostModel::backward cannot reach the
            // model to recompute: an error naming the segment, not a crash.
            let logits = m.forward(&batch, true).unwrap();
            let err = causal_lm_loss(&logits, &batch.labels).unwrap().0.f_backward().unwrap_err().to_string();
            assert!(err.contains("outside HostModel::backward") && err.contains("segment"), "{name}: {err}");
        }
        eprintln!("{name}: {} gradients with activation checkpointing equal those without (worst relative diff {worst:.1e}), \
                   {} LLM and {} vision segments recomputed", plain.len(), m.segments_recomputed(Role::Llm), m.segments_recomputed(Role::Vision));
    }
}

/// `model_untied` (its own `lm_head.weight`) and `model_inmemory` (transformers 5's in-memory key
/// layout) open, and on samples `samples` their logits equal transformers' (`untied_logits` and the
/// sample's logits); the fixture's `model` ties the head to `tied_to`.
pub fn untied_head_and_in_memory_layout(f: &Family, samples: &[usize], tied_to: &str) {
    let cfg = TrainConfig::default();
    let untied = f.open_with(&f.options_for("model_untied", Mode::Llm), &cfg);
    let head = untied.spec().params.iter().find(|p| p.name == "lm_head.weight").unwrap();
    assert!(head.tied_to.is_empty());
    let inmem = f.open_with(&f.options_for("model_inmemory", Mode::Llm), &cfg);
    let tied = f.open(Mode::Llm, &cfg);
    assert_eq!(tied.spec().params.iter().find(|p| p.name == "lm_head.weight").unwrap().tied_to, tied_to);
    assert!(tied.load_report().missing.is_empty() && inmem.load_report().missing.is_empty());
    let s = f.samples(&untied);
    for &i in samples {
        let r = f.reference(&format!("sample_{i}.safetensors"));
        let batch = f.collate(&s, &[i]);
        let untied_logits = tch::no_grad(|| untied.forward(&batch, false)).unwrap();
        assert_close(&format!("{} untied head, sample {i}: logits", f.name), &untied_logits, &r["untied_logits"], RTOL_ACT, ATOL_FLOOR);
        let (d, _) = forward_matches(&format!("{} in-memory layout, sample {i}", f.name), &inmem, &batch, &r);
        eprintln!("{} sample {i}: untied head and in-memory layout match (in-memory logits {d:.2e})", f.name);
    }
}

/// The adapter PEFT saved (`peft_adapter`) loads through the plugin's key rules with PEFT's
/// logits on `sample` (`lora_sample_N`), and is written back under exactly PEFT's names.
pub fn peft_adapter_loads_and_saves_under_peft_names(f: &Family, sample: usize) {
    let adapter = f.fixture().join("peft_adapter");
    let m = vlmhost::commands::open_model(&f.options(Mode::Llm), &TrainConfig::default(), Some(&adapter))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let r = f.reference(&format!("lora_sample_{sample}.safetensors"));
    forward_matches(&format!("{} adapter from PEFT, sample {sample}", f.name), &m, &f.collate(&f.samples(&m), &[sample]), &r);
    let dir = tempdir();
    vlmhost::model::peft::save(&m, dir.path()).unwrap();
    let keys = |path: PathBuf| -> Vec<String> {
        let mut k: Vec<String> = Tensor::read_safetensors(path).unwrap().into_iter().map(|(n, _)| n).collect();
        k.sort();
        k
    };
    assert_eq!(keys(dir.path().join("adapter_model.safetensors")), keys(adapter.join("adapter_model.safetensors")));
}
