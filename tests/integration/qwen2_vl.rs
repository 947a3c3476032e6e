//! Qwen2-VL parity with transformers (and PEFT) on the tiny fixture made by
//! `scripts/fixtures/make_qwen2_vl_fixture.py`, through the host as training
//! runs it: the plugin library loaded by the host, weights loaded and rules
//! applied by the host, linear layers (and LoRA) run by the host.

use crate::common::*;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};
use vlmhost::config::{Mode, Strategy, TrainConfig};
use vlmhost::model::{causal_lm_loss, collate, BatchTensors, HostModel, OpenOptions, PreparedSample};
use vlmhost::plugin_api::Role;
use vlmhost::model::weights;

pub fn fixture() -> PathBuf {
    let dir = workspace_root().join("target/fixtures/qwen2_vl");
    assert!(dir.join("manifest.json").is_file(), "{} is missing: run scripts/fixtures.sh", dir.display());
    dir
}

fn plugin() -> String {
    member_plugin("vlmhost_plugin_qwen2_vl").display().to_string()
}

fn open_dir(model: &str, mode: Mode, cfg: &TrainConfig) -> HostModel {
    let opts = OpenOptions {
        plugin: plugin(),
        model_dir: fixture().join(model),
        mode,
        kind: Kind::Float,
        device: Device::Cpu,
        allow_missing: false,
        load_weights: true,
        processor: Default::default(),
    };
    vlmhost::model::open(&opts, cfg).unwrap_or_else(|e| panic!("{e:#}"))
}

fn open(mode: Mode, cfg: &TrainConfig) -> HostModel {
    open_dir("model", mode, cfg)
}



fn samples(m: &HostModel) -> Vec<PreparedSample> {
    prepare_file(m, &fixture().join("samples/data.jsonl"))
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    read_tensors(&fixture().join("reference").join(name))
}

fn tensor<'a>(p: &'a PreparedSample, name: &str) -> &'a Tensor {
    &p.tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
}



fn pad_id() -> i64 {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference/samples.json")).unwrap()).unwrap();
    meta["pad_token_id"].as_i64().unwrap()
}

/// Check one sample's logits (no autograd) and loss against the reference (bounds: common.rs);
/// returns the logits' max |diff| and the loss's relative difference.
fn check_sample(name: &str, m: &HostModel, p: &PreparedSample, logits_ref: &Tensor, loss_ref: f64) -> (f64, f64) {
    let batch = collate(&[p], pad_id(), Device::Cpu).unwrap();
    let logits = tch::no_grad(|| m.forward(&batch, false)).unwrap();
    let d = assert_close(&format!("qwen2_vl {name}: logits"), &logits, logits_ref, RTOL_ACT, ATOL_FLOOR).max_abs;
    let (loss, _) = causal_lm_loss(&logits, &batch.labels).unwrap();
    let rel = assert_close_f64(&format!("qwen2_vl {name}: loss"), loss.double_value(&[]), loss_ref, RTOL_LOSS, 0.0);
    (d, rel)
}

#[test]
fn qwen2_vl_inputs_match_transformers() {
    let m = open(Mode::Llm, &TrainConfig::default());
    for (i, p) in samples(&m).iter().enumerate() {
        let r = reference(&format!("sample_{i}.safetensors"));
        assert_eq!(p.input_ids, ids(&r["input_ids"]), "sample {i}: input ids");
        assert_eq!(p.labels, ids(&r["labels"]), "sample {i}: labels");
        assert_eq!(ids(tensor(p, "image_grid_thw")), ids(&r["image_grid_thw"]), "sample {i}: image_grid_thw");
        // Pixel values are the plugin's own float32 arithmetic (no libtorch, no summation): the
        // same on every CPU; the plugin's processor_parity test holds them bit-identical.
        let d = max_abs_diff(tensor(p, "pixel_values"), &r["pixel_values"]);
        assert!(d <= 1e-5, "sample {i}: pixel values differ by {d}");
        let image_tokens = p.image_token_mask.iter().filter(|&&b| b).count() as i64;
        assert_eq!(image_tokens, r["mm_token_type_ids"].sum(Kind::Int64).int64_value(&[]), "sample {i}: image token mask");
    }
}

#[test]
fn qwen2_vl_logits_and_loss_match_transformers() {
    let m = open(Mode::Llm, &TrainConfig::default());
    let mut worst = (0f64, 0f64);
    for (i, p) in samples(&m).iter().enumerate() {
        let r = reference(&format!("sample_{i}.safetensors"));
        let (d, rel) = check_sample(&format!("sample {i}"), &m, p, &r["logits"], r["loss"].double_value(&[0]));
        worst = (worst.0.max(d), worst.1.max(rel));
    }
    eprintln!("qwen2_vl: 8 samples, logits max |diff| {:.2e}, loss max relative diff {:.2e}", worst.0, worst.1);
}

#[test]
fn qwen2_vl_untied_head_and_in_memory_layout() {
    // model_untied: its own lm_head.weight; model_inmemory: model.visual.* / model.language_model.* keys.
    let untied = open_dir("model_untied", Mode::Llm, &TrainConfig::default());
    let head = untied.spec().params.iter().find(|p| p.name == "lm_head.weight").unwrap();
    assert!(head.tied_to.is_empty());
    let inmem = open_dir("model_inmemory", Mode::Llm, &TrainConfig::default());
    let tied = open(Mode::Llm, &TrainConfig::default());
    assert_eq!(tied.spec().params.iter().find(|p| p.name == "lm_head.weight").unwrap().tied_to, "model.embed_tokens.weight");
    assert!(tied.load_report().missing.is_empty() && inmem.load_report().missing.is_empty());
    for i in [0, 4, 6] {
        let r = reference(&format!("sample_{i}.safetensors"));
        let p = &samples(&untied)[i];
        let batch = collate(&[p], pad_id(), Device::Cpu).unwrap();
        let untied_logits = tch::no_grad(|| untied.forward(&batch, false)).unwrap();
        assert_close(&format!("qwen2_vl untied head, sample {i}: logits"), &untied_logits, &r["untied_logits"], RTOL_ACT, ATOL_FLOOR);
        let (d, _) = check_sample(&format!("in-memory layout, sample {i}"), &inmem, p, &r["logits"], r["loss"].double_value(&[0]));
        eprintln!("qwen2_vl sample {i}: untied head and in-memory layout match (in-memory logits {d:.2e})");
    }
}

#[test]
fn qwen2_vl_padded_batch_matches_transformers() {
    let m = open(Mode::Llm, &TrainConfig::default());
    let s = samples(&m);
    let r = reference("batch.safetensors");
    // Samples 0 (image), 6 (text only), 1 (image), right-padded.
    let batch = collate(&[&s[0], &s[6], &s[1]], pad_id(), Device::Cpu).unwrap();
    assert_eq!(ids(&batch.input_ids), ids(&r["input_ids"]));
    assert_eq!(ids(&batch.attention_mask), ids(&r["attention_mask"]));
    assert_eq!(ids(&batch.labels), ids(&r["labels"]));
    let logits = tch::no_grad(|| m.forward(&batch, false)).unwrap();
    // Real tokens only: what a model computes at padding is unspecified.
    let pad = r["attention_mask"].to_kind(Kind::Bool).unsqueeze(-1).logical_not();
    let d = assert_close(
        "qwen2_vl padded batch: logits",
        &logits.masked_fill(&pad, 0.0),
        &r["logits"].masked_fill(&pad, 0.0),
        RTOL_ACT,
        ATOL_FLOOR,
    )
    .max_abs;
    let (loss, n) = causal_lm_loss(&logits, &batch.labels).unwrap();
    let (ours, theirs) = (loss.double_value(&[]), r["loss"].double_value(&[0]));
    assert_close_f64(&format!("qwen2_vl padded batch: loss over {n} tokens"), ours, theirs, RTOL_LOSS, 0.0);
    eprintln!("qwen2_vl padded batch: logits max |diff| {d:.2e}, loss {ours:.6} vs {theirs:.6}");
}

#[test]
fn qwen2_vl_cached_decoding_equals_the_full_forward_and_transformers() {
    let m = open(Mode::Llm, &TrainConfig::default());
    let s = samples(&m);
    let p = &s[7]; // two images (the prompt's positions advance 5 less than its tokens)
    let r = reference("sample_7.safetensors");
    assert_eq!(ids(&r["rope_deltas"]), [-5]);
    let prompt_len = r["prompt_len"].int64_value(&[0]) as usize;
    let full = tch::no_grad(|| m.forward(&collate(&[p], pad_id(), Device::Cpu).unwrap(), false)).unwrap();
    let _g = tch::no_grad_guard();
    let prompt = PreparedSample {
        input_ids: p.input_ids[..prompt_len].to_vec(),
        labels: vec![-100; prompt_len],
        image_token_mask: p.image_token_mask[..prompt_len].to_vec(),
        tensors: p.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
    };
    let (first, mut cache) = m.forward_cached(&collate(&[&prompt], pad_id(), Device::Cpu).unwrap(), &[]).unwrap();
    let mut pieces = vec![first];
    for t in prompt_len..p.input_ids.len() {
        let batch = BatchTensors {
            input_ids: Tensor::from_slice(&[p.input_ids[t]]).view([1, 1]),
            attention_mask: Tensor::ones([1, t as i64 + 1], (Kind::Int64, Device::Cpu)),
            labels: Tensor::from_slice(&[-100i64]).view([1, 1]),
            tensors: Vec::new(),
        };
        let (logits, next) = m.forward_cached(&batch, &cache).unwrap();
        cache = next;
        pieces.push(logits);
    }
    let cached = Tensor::cat(&pieces, 1);
    // One token at a time runs other GEMM shapes than the full forward: rounding, as against transformers.
    let d_full = assert_close("qwen2_vl cached decoding vs the full forward: logits", &cached, &full, RTOL_ACT, ATOL_FLOOR).max_abs;
    let d_ref =
        assert_close("qwen2_vl cached decoding vs transformers' cached decoding: logits", &cached, &r["cached_logits"], RTOL_ACT, ATOL_FLOOR)
            .max_abs;
    // The last cache entry is the next M-RoPE position: largest position + 1.
    assert_eq!(ids(cache.last().unwrap()), [p.input_ids.len() as i64 - 5]);
    eprintln!(
        "qwen2_vl cached decoding: prompt {prompt_len} tokens + {} steps, max |diff| {d_full:.2e} vs full forward, {d_ref:.2e} vs transformers",
        p.input_ids.len() - prompt_len
    );
    // A later step with an image token, or a cache other than the one returned, is refused.
    let step = |token: i64| BatchTensors {
        input_ids: Tensor::from_slice(&[token]).view([1, 1]),
        attention_mask: Tensor::ones([1, p.input_ids.len() as i64 + 1], (Kind::Int64, Device::Cpu)),
        labels: Tensor::from_slice(&[-100i64]).view([1, 1]),
        tensors: Vec::new(),
    };
    let image = p.input_ids[p.image_token_mask.iter().position(|&b| b).unwrap()];
    let e = m.forward_cached(&step(image), &cache).unwrap_err().to_string();
    assert!(e.contains("images belong to the prompt"), "{e}");
    let e = m.forward_cached(&step(p.input_ids[0]), &cache[..3]).unwrap_err().to_string();
    assert!(e.contains("the cache holds 3 tensors") && e.contains("pass back what the previous call returned"), "{e}");
}

/// PEFT's `LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")` as vlmhost rules.
fn peft_all_linear() -> TrainConfig {
    let mut cfg = TrainConfig::default();
    cfg.lora.r = 4;
    cfg.lora.lora_alpha = 8.0;
    cfg.lora.lora_dropout = 0.0;
    for t in [&mut cfg.lora.vision_target_modules, &mut cfg.lora.projector_target_modules, &mut cfg.lora.llm_target_modules] {
        *t = Some(vec!["all-linear".into()]);
    }
    cfg.roles.projector.strategy = Some(Strategy::Lora);
    cfg
}

/// A PEFT module name (`base_model.model.model.language_model.layers.0.mlp.up_proj`) as the plugin names it.
fn peft_to_module(m: &HostModel, peft: &str) -> String {
    let inner = peft.strip_prefix("base_model.model.").unwrap();
    let name = weights::map_key(&m.spec().key_rules, &format!("{inner}.weight"));
    name.strip_suffix(".weight").unwrap().to_owned()
}

fn split_lora(name: &str) -> (&str, char) {
    match name.strip_suffix(".lora_A.default.weight") {
        Some(p) => (p, 'A'),
        None => (name.strip_suffix(".lora_B.default.weight").unwrap(), 'B'),
    }
}

#[test]
fn qwen2_vl_lora_targets_and_counts_equal_peft() {
    let m = open(Mode::Both, &peft_all_linear());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("peft_manifest.json")).unwrap()).unwrap();
    let mut theirs: Vec<String> =
        manifest["lora_modules"].as_array().unwrap().iter().map(|n| peft_to_module(&m, n.as_str().unwrap())).collect();
    theirs.sort();
    let mut ours: Vec<String> = Role::ALL.iter().flat_map(|r| m.lora_module_names(*r)).collect();
    ours.sort();
    assert_eq!(ours, theirs);
    assert!(!ours.iter().any(|n| n.contains("patch_embed")), "the Conv3d patch embedding takes no adapter");
    let trainable: i64 = Role::ALL.iter().map(|r| m.counts(*r).1).sum();
    assert_eq!(trainable, manifest["trainable_parameter_count"].as_i64().unwrap());
    assert_eq!(m.lora_module_names(Role::Projector), ["visual.merger.mlp.0", "visual.merger.mlp.2"]);
}

#[test]
fn qwen2_vl_lora_forward_and_gradients_match_peft() {
    let m = open(Mode::Both, &peft_all_linear());
    {
        let _g = tch::no_grad_guard();
        for (name, t) in &reference("lora_weights.safetensors") {
            let (module, which) = split_lora(name);
            let module = peft_to_module(&m, module);
            let idx = m.spec().modules.iter().position(|s| s.name == module.as_str()).unwrap();
            let a = m.adapter(idx).unwrap_or_else(|| panic!("no adapter on {module}"));
            let mut dst = if which == 'A' { a.a.shallow_clone() } else { a.b.shallow_clone() };
            dst.copy_(t);
        }
    }
    let s = samples(&m);
    for i in [0usize, 4] {
        let r = reference(&format!("lora_sample_{i}.safetensors"));
        let (d, rel) = check_sample(&format!("LoRA sample {i}"), &m, &s[i], &r["logits"], r["loss"].double_value(&[0]));
        eprintln!("qwen2_vl LoRA sample {i}: logits max |diff| {d:.2e}, loss relative diff {rel:.2e}");
    }
    let batch = collate(&[&s[4]], pad_id(), Device::Cpu).unwrap();
    let logits = m.forward(&batch, true).unwrap();
    let (loss, _) = causal_lm_loss(&logits, &batch.labels).unwrap();
    loss.backward();
    let grads = reference("lora_grads.safetensors");
    let (mut checked, mut worst) = (0, 0f64);
    for (name, g) in &grads {
        if name == "__loss__" {
            continue;
        }
        let (module, which) = split_lora(name);
        let module = peft_to_module(&m, module);
        let idx = m.spec().modules.iter().position(|s| s.name == module.as_str()).unwrap();
        let a = m.adapter(idx).unwrap();
        let ours = if which == 'A' { a.a.grad() } else { a.b.grad() };
        assert!(ours.defined(), "{module} lora_{which}: no gradient");
        let rel = assert_close(&format!("qwen2_vl LoRA gradient {module} lora_{which}"), &ours, g, RTOL_GRAD, ATOL_FLOOR).rel;
        worst = worst.max(rel);
        checked += 1;
    }
    // 2 vision blocks x 4 + merger 2 + 2 layers x 7 = 24 modules, A and B each.
    assert_eq!(checked, 48);
    eprintln!("qwen2_vl LoRA: {checked} gradients equal PEFT's, worst relative diff {worst:.2e}");
}

#[test]
fn mode_vision_trains_the_vision_blocks_and_merger_not_the_llm() {
    let m = open(Mode::Vision, &TrainConfig::default());
    let trains = |r: Role| m.plan().role_trains(r, m.spec());
    assert_eq!((trains(Role::Vision), trains(Role::Projector), trains(Role::Llm)), (true, true, false));
    for (i, p) in m.spec().params.iter().enumerate() {
        let role = m.plan().roles[i];
        let expected = if p.name.starts_with("visual.merger.") { Role::Projector } else if p.name.starts_with("visual.") { Role::Vision } else { Role::Llm };
        assert_eq!(role, expected, "{}", p.name);
        if role == Role::Llm {
            assert!(!m.plan().trainable[i], "{} trains in mode vision", p.name);
        }
    }
    let vision_lora = m.lora_module_names(Role::Vision);
    assert_eq!(vision_lora.len(), 2 * 4, "{vision_lora:?}");
    assert!(vision_lora.iter().all(|n| n.starts_with("visual.blocks.")));
    assert!(m.lora_module_names(Role::Llm).is_empty());
    // One step: the LLM stays bit-identical; the merger and the vision adapters move.
    let before: Vec<Tensor> = m.params().iter().map(|p| p.detach().copy()).collect();
    let mut opt = vlmhost::train::optim::AdamW::for_model(&m, &m.config().optimizer);
    let s = samples(&m);
    let batch = collate(&[&s[0], &s[4]], pad_id(), Device::Cpu).unwrap();
    for _ in 0..2 {
        opt.zero_grad();
        let (loss, _) = causal_lm_loss(&m.forward(&batch, true).unwrap(), &batch.labels).unwrap();
        loss.backward();
        opt.step(1e-3).unwrap();
    }
    for (i, p) in m.spec().params.iter().enumerate() {
        let same = m.params()[i].equal(&before[i]);
        assert_eq!(same, !m.plan().trainable[i], "{} (trainable {})", p.name, m.plan().trainable[i]);
    }
    for (idx, a) in m.adapters() {
        assert!(a.b.abs().sum(Kind::Float).double_value(&[]) > 0.0, "LoRA B of {} did not move", m.spec().modules[idx].name);
    }
}

#[test]
fn frozen_stays_bit_identical_and_trainable_moves_in_every_mode() {
    for mode in [Mode::Projector, Mode::Llm, Mode::Both] {
        let m = open(mode, &TrainConfig::default());
        let before: Vec<Tensor> = m.params().iter().map(|p| p.detach().copy()).collect();
        let mut opt = vlmhost::train::optim::AdamW::for_model(&m, &m.config().optimizer);
        let s = samples(&m);
        let batch = collate(&[&s[2], &s[6]], pad_id(), Device::Cpu).unwrap();
        opt.zero_grad();
        let (loss, _) = causal_lm_loss(&m.forward(&batch, true).unwrap(), &batch.labels).unwrap();
        loss.backward();
        opt.step(1e-3).unwrap();
        for (i, p) in m.spec().params.iter().enumerate() {
            let same = m.params()[i].equal(&before[i]);
            assert_eq!(same, !m.plan().trainable[i], "mode {mode:?}: {}", p.name);
        }
    }
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("c.yaml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn inspect_shows_all_linear_lora_leaves_the_patch_embedding_out() {
    let dir = tempdir();
    let model = fixture().join("model").display().to_string();
    let plugin = plugin();
    let cfg = write_config(
        dir.path(),
        "lora:\n  vision_target_modules: [\"all-linear\"]\n  projector_target_modules: [\"all-linear\"]\n  \
         llm_target_modules: [\"all-linear\"]\nroles:\n  projector:\n    strategy: lora\n",
    );
    let base = ["inspect", "--plugin", plugin.as_str(), "--model", model.as_str(), "--mode", "both", "--config", cfg.as_str()];
    let run = vlmhost_env(&[&base[..], &["--json"]].concat(), dir.path(), &[]);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["family"], "qwen2_vl");
    let lora = |role: &str| -> Vec<String> {
        v["roles"][role]["lora_modules"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect()
    };
    let vision = lora("vision");
    assert_eq!(vision.len(), 8, "{vision:?}");
    assert!(vision.iter().all(|n| n.starts_with("visual.blocks.")), "{vision:?}");
    assert_eq!(lora("projector"), ["visual.merger.mlp.0", "visual.merger.mlp.2"]);
    assert_eq!(lora("llm").len(), 14);
    // Only adapters train in the vision role (r = 16): the patch embedding's 32 * 1176 weights stay frozen.
    let vis = &v["roles"]["vision"];
    assert_eq!(vis["trainable"].as_i64().unwrap(), 16 * 2 * ((32 + 96) + (32 + 32) + (32 + 64) + (64 + 32)));
    assert!(vis["parameters"].as_i64().unwrap() > 32 * 1176);
    // Text form: the adapters per role; no patch embedding anywhere.
    let run = vlmhost_env(&base, dir.path(), &[]);
    assert!(run.success(), "{}", run.all());
    for needle in ["vision     lora", "projector  lora", "vision     visual.blocks.*.attn.qkv  x2", "projector  visual.merger.mlp.*  x2", "model.layers.*.self_attn.q_proj  x2"] {
        assert!(run.stdout.contains(needle), "{needle:?} missing\n{}", run.all());
    }
    assert!(!run.stdout.contains("patch_embed"), "{}", run.all());
    // Naming the patch embedding explicitly: inspect refuses, saying why and what to do.
    let cfg = write_config(dir.path(), "lora:\n  vision_target_modules: [\"patch_embed\", \"qkv\"]\n");
    let run = vlmhost_env(&["inspect", "--plugin", &plugin, "--model", &model, "--mode", "vision", "--config", &cfg], dir.path(), &[]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr.contains(
            "\"patch_embed\" selects only visual.patch_embed.proj (Conv3d run as Linear), which cannot take LoRA; target linear layers instead"
        ),
        "{}",
        run.all()
    );
}

#[test]
fn qwen2_vl_checkpoint_save_and_reload_keeps_bytes() {
    let m = open(Mode::Llm, &TrainConfig::default());
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

#[test]
fn processor_options_reach_the_plugin() {
    let mut opts = OpenOptions {
        plugin: plugin(),
        model_dir: fixture().join("model"),
        mode: Mode::Llm,
        kind: Kind::Float,
        device: Device::Cpu,
        allow_missing: false,
        load_weights: false,
        processor: Default::default(),
    };
    opts.processor.insert("max_pixels".into(), 3136.into());
    let m = vlmhost::model::open(&opts, &TrainConfig::default()).unwrap();
    let s = samples(&m);
    assert_eq!(ids(tensor(&s[2], "image_grid_thw")), [1, 2, 4]);
    opts.processor.insert("resolution".into(), "high".into());
    let e = format!("{:#}", vlmhost::model::open(&opts, &TrainConfig::default()).err().unwrap());
    assert!(e.contains("unknown option(s) resolution") && e.contains("this family accepts: min_pixels, max_pixels"), "{e}");
}

#[test]
fn qwen2_vl_peft_adapter_loads_and_saves_under_peft_names() {
    // The adapter PEFT saved loads through the plugin's key rules with PEFT's logits ...
    let opts = OpenOptions {
        plugin: plugin(),
        model_dir: fixture().join("model"),
        mode: Mode::Llm,
        kind: Kind::Float,
        device: Device::Cpu,
        allow_missing: false,
        load_weights: true,
        processor: Default::default(),
    };
    let adapter = fixture().join("peft_adapter");
    let m = vlmhost::commands::open_model(&opts, &TrainConfig::default(), Some(&adapter)).unwrap_or_else(|e| panic!("{e:#}"));
    let r = reference("lora_sample_4.safetensors");
    check_sample("adapter from PEFT, sample 4", &m, &samples(&m)[4], &r["logits"], r["loss"].double_value(&[0]));
    // ... and is written back under exactly PEFT's names (transformers' in-memory names).
    let dir = tempdir();
    vlmhost::model::peft::save(&m, dir.path()).unwrap();
    let keys = |path: PathBuf| -> Vec<String> {
        let mut k: Vec<String> = Tensor::read_safetensors(path).unwrap().into_iter().map(|(n, _)| n).collect();
        k.sort();
        k
    };
    assert_eq!(keys(dir.path().join("adapter_model.safetensors")), keys(adapter.join("adapter_model.safetensors")));
}
