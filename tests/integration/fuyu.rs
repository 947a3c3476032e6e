//! Fuyu parity with transformers (and PEFT) on the tiny fixture made by
//! `scripts/fixtures/make_fuyu_fixture.py`, through the host exactly as
//! training does (plugin loaded from its library, weights, rules and linear
//! layers by the host); incremental decoding against the full forward; and the
//! encoder-free role semantics, through `HostModel` and the `vlmhost` binary.

use crate::common::*;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};
use vlmhost::config::{Mode, Strategy, TrainConfig};
use vlmhost::model::{causal_lm_loss, collate, BatchTensors, HostModel, OpenOptions, PreparedSample};
use vlmhost::plugin_api::Role;
use vlmhost::model::weights;

const NO_ENCODER: &str = "fuyu has no vision encoder; its image path is the projector, which trains in every mode";

fn fixture() -> PathBuf {
    let dir = workspace_root().join("target/fixtures/fuyu");
    assert!(dir.join("manifest.json").is_file(), "{} is missing: run scripts/fixtures.sh", dir.display());
    dir
}

fn plugin() -> String {
    member_plugin("vlmhost_plugin_fuyu").display().to_string()
}

fn open_options(mode: Mode, model: &str) -> OpenOptions {
    OpenOptions {
        plugin: plugin(),
        model_dir: fixture().join(model),
        mode,
        kind: Kind::Float,
        device: Device::Cpu,
        allow_missing: false,
        load_weights: true,
        processor: Default::default(),
    }
}

fn open(mode: Mode, cfg: &TrainConfig) -> HostModel {
    vlmhost::model::open(&open_options(mode, "model"), cfg).unwrap_or_else(|e| panic!("{e:#}"))
}





fn samples(m: &HostModel) -> Vec<PreparedSample> {
    prepare_file(m, &fixture().join("samples/data.jsonl"))
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    read_tensors(&fixture().join("reference").join(name))
}

#[test]
fn fuyu_inputs_match_transformers() {
    let m = open(Mode::Llm, &TrainConfig::default());
    let s = samples(&m);
    assert_eq!(s.len(), 7);
    for (i, p) in s.iter().enumerate() {
        let r = reference(&format!("sample_{i}.safetensors"));
        assert_eq!(p.input_ids, ids(&r["input_ids"]), "sample {i}: input ids");
        assert_eq!(p.labels, ids(&r["labels"]), "sample {i}: labels");
        let pv = &p.tensors.iter().find(|(n, _)| n == "pixel_values").unwrap().1;
        assert_eq!(pv.size(), r["pixel_values"].size(), "sample {i}: patches");
        assert!(pv.equal(&r["pixel_values"]), "sample {i}: patches differ by {}", max_abs_diff(pv, &r["pixel_values"]));
        let n_patches = pv.size()[0] as usize;
        let speaker = p.input_ids.iter().filter(|&&t| t == p.input_ids[0]).count();
        assert_eq!(speaker, n_patches, "sample {i}: one |SPEAKER| per patch");
        assert!(p.image_token_mask[..n_patches].iter().all(|&b| b), "sample {i}: image tokens are protected");
    }
}

#[test]
fn fuyu_logits_and_loss_match_transformers() {
    let m = open(Mode::Llm, &TrainConfig::default());
    let mut worst = (0f64, 0f64);
    for (i, p) in samples(&m).iter().enumerate() {
        let r = reference(&format!("sample_{i}.safetensors"));
        let batch = collate(&[p], 0, Device::Cpu).unwrap();
        let logits = tch::no_grad(|| m.forward(&batch, false)).unwrap();
        let d = assert_close(&format!("fuyu sample {i}: logits"), &logits, &r["logits"], RTOL_ACT, ATOL_FLOOR).max_abs;
        let (loss, _) = causal_lm_loss(&logits, &batch.labels).unwrap();
        let (ours, theirs) = (loss.double_value(&[]), r["loss"].double_value(&[0]));
        let rel = assert_close_f64(&format!("fuyu sample {i}: loss"), ours, theirs, RTOL_LOSS, 0.0);
        worst = (worst.0.max(d), worst.1.max(rel));
    }
    eprintln!("fuyu: logits max |diff| {:.2e}, loss max relative diff {:.2e}", worst.0, worst.1);
}

#[test]
fn fuyu_padded_batch_matches_transformers() {
    let m = open(Mode::Llm, &TrainConfig::default());
    let s = samples(&m);
    let r = reference("batch_0_1.safetensors");
    let batch = collate(&[&s[0], &s[1]], 0, Device::Cpu).unwrap();
    assert_eq!(ids(&batch.input_ids), ids(&r["input_ids"]));
    assert_eq!(ids(&batch.attention_mask), ids(&r["attention_mask"]));
    assert_eq!(ids(&batch.labels), ids(&r["labels"]));
    let logits = tch::no_grad(|| m.forward(&batch, false)).unwrap();
    let pad = r["attention_mask"].to_kind(Kind::Bool).unsqueeze(-1).logical_not();
    assert_close("fuyu padded batch: logits", &logits.masked_fill(&pad, 0.0), &r["logits"].masked_fill(&pad, 0.0), RTOL_ACT, ATOL_FLOOR);
    let (loss, _) = causal_lm_loss(&logits, &batch.labels).unwrap();
    let (ours, theirs) = (loss.double_value(&[]), r["loss"].double_value(&[0]));
    assert_close_f64("fuyu padded batch: loss", ours, theirs, RTOL_LOSS, 0.0);
}

#[test]
fn both_key_layouts_load_the_same_weights() {
    let hub = open(Mode::Llm, &TrainConfig::default());
    let memory = vlmhost::model::open(&open_options(Mode::Llm, "model_memory_layout"), &TrainConfig::default()).unwrap();
    assert_eq!(hub.load_report().loaded, hub.spec().params.len());
    assert_eq!(memory.load_report().loaded, hub.spec().params.len());
    for (i, p) in hub.spec().params.iter().enumerate() {
        assert!(hub.params()[i].equal(&memory.params()[i]), "{} differs between the layouts", p.name);
    }
    // Saved under transformers' names (what PEFT uses) and read back through the key rules.
    let named: Vec<(String, Tensor)> = hub
        .spec()
        .params
        .iter()
        .zip(hub.params())
        .map(|(p, t)| (weights::map_key(&hub.spec().transformers_names, &p.name), t.shallow_clone()))
        .collect();
    assert!(named.iter().any(|(n, _)| n == "model.vision_embed_tokens.weight"));
    assert!(named.iter().any(|(n, _)| n == "lm_head.weight"));
    let dir = tempdir();
    weights::save_safetensors(&dir.path().join("model.safetensors"), &named, None).unwrap();
    let opts = weights::LoadOptions { kind: Kind::Float, device: Device::Cpu, allow_missing: false };
    let (again, report) = weights::load(dir.path(), hub.spec(), opts).unwrap();
    assert_eq!(report.loaded, hub.params().len());
    assert!(again.iter().zip(hub.params()).all(|(a, b)| a.equal(b)));
}

/// The slice `[start, start + len)` of a collated batch's tokens, with the
/// attention mask covering everything up to its end (as generation passes it).
fn window(batch: &BatchTensors, start: i64, len: i64, with_images: bool) -> BatchTensors {
    BatchTensors {
        input_ids: batch.input_ids.narrow(1, start, len),
        attention_mask: batch.attention_mask.narrow(1, 0, start + len),
        labels: batch.labels.narrow(1, start, len),
        tensors: if with_images { batch.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect() } else { vec![] },
    }
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    let m = open(Mode::Llm, &TrainConfig::default());
    let s = samples(&m);
    let batch = collate(&[&s[2]], 0, Device::Cpu).unwrap();
    let len = batch.input_ids.size()[1];
    let full = tch::no_grad(|| m.forward(&batch, false)).unwrap();
    // The prompt in one call (images included), then the answer token by token.
    let prompt = len - 6;
    let (logits, mut cache) = tch::no_grad(|| m.forward_cached(&window(&batch, 0, prompt, true), &[])).unwrap();
    assert_eq!(cache.len(), 4, "keys and values of 2 layers");
    // One token at a time runs other GEMM shapes than the full forward: rounding only.
    let mut pieces = vec![logits];
    for t in prompt..len {
        let (step, next) = tch::no_grad(|| m.forward_cached(&window(&batch, t, 1, false), &cache)).unwrap();
        pieces.push(step);
        cache = next;
    }
    assert_eq!(cache[0].size()[2], len);
    let worst = assert_close("fuyu cached decoding vs the full forward: logits", &Tensor::cat(&pieces, 1), &full, RTOL_ACT, ATOL_FLOOR).max_abs;
    // Reference logits at the last position, too.
    let r = reference("sample_2.safetensors");
    let (last, _) = tch::no_grad(|| {
        let (_, c) = m.forward_cached(&window(&batch, 0, len - 1, true), &[]).unwrap();
        m.forward_cached(&window(&batch, len - 1, 1, false), &c)
    })
    .unwrap();
    let d = assert_close(
        "fuyu cached decoding, last token vs transformers: logits",
        &last,
        &r["logits"].narrow(1, len - 1, 1),
        RTOL_ACT,
        ATOL_FLOOR,
    )
    .max_abs;
    eprintln!("fuyu cached decoding: max |diff| to the full forward {worst:.2e}, to transformers {d:.2e}");
    // A cache of the wrong length is refused, not misused.
    let err = m.forward_cached(&window(&batch, len - 1, 1, false), &cache[..1]).unwrap_err();
    assert!(format!("{err:#}").contains("1 tensors, expected 4"), "{err:#}");
}

#[test]
fn greedy_generation_equals_transformers_generate() {
    let m = open(Mode::Llm, &TrainConfig::default());
    let data = fixture().join("samples");
    let stop = vlmhost::model::generate::stop_tokens(m.model_dir());
    for (i, image, prompt) in [(0, "img0_rgb_90x60.png", "What is in this picture?"), (4, "img4_rgba_70x50.png", "What does the sign say?")] {
        let r = reference(&format!("generate_{i}.safetensors"));
        // A user message alone: exactly FuyuProcessor's output, nothing labelled.
        let sample = vlmhost::model::generate::prompt_sample(Some(&data.join(image)), prompt);
        let p = m.prepare(&serde_json::to_string(&sample).unwrap()).unwrap();
        assert_eq!(p.input_ids, ids(&r["input_ids"]), "generate {i}: prompt ids");
        assert!(p.labels.iter().all(|&l| l == -100));
        let (tokens, _) = vlmhost::model::generate::greedy(&m, &p, 8, &stop, |_| Ok(())).unwrap();
        assert_eq!(tokens, ids(&r["generated"]), "generate {i}: tokens");
    }
    // The same through the binary.
    let dir = tempdir();
    let (plugin, model) = (plugin(), fixture().join("model").display().to_string());
    let image = data.join("img0_rgb_90x60.png").display().to_string();
    let args = ["generate", "--plugin", &plugin, "--model", &model, "--image", &image, "--prompt", "What is in this picture?", "--max-new-tokens", "8", "--json"];
    let run = vlmhost(&args, dir.path(), None);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let tokens: Vec<i64> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    assert_eq!(tokens, ids(&reference("generate_0.safetensors")["generated"]));
}

/// PEFT's `LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")` as vlmhost rules:
/// the projector (vision_embed_tokens) and the LLM's linears, lm_head left out.
fn peft_all_linear() -> TrainConfig {
    let mut cfg = TrainConfig::default();
    cfg.lora.r = 4;
    cfg.lora.lora_alpha = 8.0;
    cfg.lora.lora_dropout = 0.0;
    cfg.lora.projector_target_modules = Some(vec!["all-linear".into()]);
    cfg.lora.llm_target_modules = Some(vec!["all-linear".into()]);
    cfg.roles.projector.strategy = Some(Strategy::Lora);
    cfg
}

/// A PEFT module name (`base_model.model.model.language_model.layers.0.mlp.dense_h_to_4h`)
/// as the plugin names it, through the plugin's key rules.
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
fn fuyu_lora_forward_and_gradients_match_peft() {
    let m = open(Mode::Llm, &peft_all_linear());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("peft_manifest.json")).unwrap()).unwrap();
    let mut theirs: Vec<String> =
        manifest["lora_modules"].as_array().unwrap().iter().map(|n| peft_to_module(&m, n.as_str().unwrap())).collect();
    theirs.sort();
    let mut ours: Vec<String> = Role::ALL.iter().flat_map(|r| m.lora_module_names(*r)).collect();
    ours.sort();
    assert_eq!(ours, theirs);
    assert_eq!(m.lora_module_names(Role::Projector), ["vision_embed_tokens"]);
    let trainable: i64 = Role::ALL.iter().map(|r| m.counts(*r).1).sum();
    assert_eq!(trainable, manifest["trainable_parameter_count"].as_i64().unwrap());

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
    let r = reference("lora_sample_2.safetensors");
    let batch = collate(&[&s[2]], 0, Device::Cpu).unwrap();
    let logits = m.forward(&batch, true).unwrap();
    let d = assert_close("fuyu LoRA sample 2: logits", &logits, &r["logits"], RTOL_ACT, ATOL_FLOOR).max_abs;
    let (loss, _) = causal_lm_loss(&logits, &batch.labels).unwrap();
    let (ours, theirs) = (loss.double_value(&[]), r["loss"].double_value(&[0]));
    assert_close_f64("fuyu LoRA sample 2: loss", ours, theirs, RTOL_LOSS, 0.0);
    loss.backward();
    let mut worst = 0f64;
    let grads = reference("lora_grads.safetensors");
    for (name, g) in &grads {
        let (module, which) = split_lora(name);
        let module = peft_to_module(&m, module);
        let idx = m.spec().modules.iter().position(|s| s.name == module.as_str()).unwrap();
        let a = m.adapter(idx).unwrap();
        let ours = if which == 'A' { a.a.grad() } else { a.b.grad() };
        assert!(ours.defined(), "{module} {which}: no gradient");
        let rel = assert_close(&format!("fuyu LoRA gradient {module} lora_{which}"), &ours, g, RTOL_GRAD, ATOL_FLOOR).rel;
        worst = worst.max(rel);
    }
    assert_eq!(grads.len(), 18, "9 LoRA modules, A and B");
    eprintln!("fuyu LoRA: logits max |diff| {d:.2e}, loss {ours:.6} vs {theirs:.6}, {} gradients, worst relative diff {worst:.2e}", grads.len());
}

#[test]
fn encoder_free_modes_through_the_host() {
    for mode in [Mode::Vision, Mode::Both] {
        let err = vlmhost::model::open(&open_options(mode, "model"), &TrainConfig::default()).err().unwrap();
        assert!(format!("{err:#}").contains(NO_ENCODER), "{err:#}");
    }
    // llm: projector (full) + LLM (LoRA); projector: the projector alone. Nothing is vision.
    for (mode, llm_trains) in [(Mode::Llm, true), (Mode::Projector, false)] {
        let m = open(mode, &TrainConfig::default());
        assert!(!m.spec().has_vision_encoder);
        assert!(!m.plan().roles.contains(&Role::Vision));
        assert_eq!(m.counts(Role::Vision), (0, 0));
        let trains = |r: Role| m.plan().role_trains(r, m.spec());
        assert_eq!((trains(Role::Vision), trains(Role::Projector), trains(Role::Llm)), (false, true, llm_trains));
        let proj: Vec<&str> = m.spec().params.iter().zip(&m.plan().roles).filter(|(_, r)| **r == Role::Projector).map(|(p, _)| p.name.as_str()).collect();
        assert_eq!(proj, ["vision_embed_tokens.weight", "vision_embed_tokens.bias"]);

        // A few steps: trainable moves, frozen stays bit-identical.
        let before: Vec<Tensor> = m.params().iter().map(|p| p.detach().copy()).collect();
        let mut opt = vlmhost::train::optim::AdamW::for_model(&m, &m.config().optimizer);
        let s = samples(&m);
        let batch = collate(&[&s[0], &s[3]], 0, Device::Cpu).unwrap();
        for _ in 0..2 {
            opt.zero_grad();
            let (loss, _) = causal_lm_loss(&m.forward(&batch, true).unwrap(), &batch.labels).unwrap();
            loss.backward();
            opt.step(1e-3).unwrap();
        }
        for (i, p) in m.spec().params.iter().enumerate() {
            assert_eq!(!m.params()[i].equal(&before[i]), m.plan().trainable[i], "mode {mode:?}: {}", p.name);
        }
        for (idx, a) in m.adapters() {
            assert!(a.b.abs().sum(Kind::Float).double_value(&[]) > 0.0, "LoRA B of {} did not move", m.spec().modules[idx].name);
        }
        assert_eq!(m.adapters().next().is_some(), llm_trains);
    }
}

fn inspect(extra: &[&str]) -> Run {
    let dir = tempdir();
    let (plugin, model) = (plugin(), fixture().join("model").display().to_string());
    let mut args = vec!["inspect", "--plugin", plugin.as_str(), "--model", model.as_str()];
    args.extend_from_slice(extra);
    vlmhost(&args, dir.path(), None)
}

#[test]
fn inspect_shows_an_empty_vision_role_and_refuses_vision_modes() {
    let run = inspect(&["--json"]);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["family"], "fuyu");
    assert_eq!(v["mode"], "llm");
    assert_eq!(v["has_vision_encoder"], false);
    let vision = &v["roles"]["vision"];
    assert_eq!(vision["note"], "none (encoder-free)");
    assert_eq!((vision["parameters"].as_i64(), vision["trainable"].as_i64()), (Some(0), Some(0)));
    assert_eq!(vision["lora_modules"].as_array().unwrap().len(), 0);
    // The projector is vision_embed_tokens (Linear 2700 -> 64), fully trained.
    assert_eq!(v["roles"]["projector"]["strategy"], "full");
    assert_eq!(v["roles"]["projector"]["parameters"], 2700 * 64 + 64);
    assert_eq!(v["roles"]["projector"]["trainable"], v["roles"]["projector"]["parameters"]);
    assert!(v["roles"]["projector"].get("note").is_none());
    let lora: Vec<&str> = v["roles"]["llm"]["lora_modules"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert_eq!(lora.len(), 8, "{lora:?}");
    assert!(lora.contains(&"language_model.model.layers.1.self_attn.query_key_value"));
    assert!(!lora.iter().any(|n| n.ends_with("lm_head")));
    assert_eq!(v["checkpoint"]["tensors_matched"], 2 + 2 * 16 + 4);

    let text = inspect(&[]);
    assert!(text.success(), "{}", text.all());
    for needle in ["vision     none (encoder-free)", "projector  full", "llm        lora", "language_model.model.layers.*.mlp.dense_h_to_4h  x2"] {
        assert!(text.stdout.contains(needle), "{needle:?} missing\n{}", text.all());
    }

    for mode in ["vision", "both"] {
        let run = inspect(&["--mode", mode]);
        assert_eq!(run.code, 1, "{}", run.all());
        assert!(run.stderr.contains(NO_ENCODER), "{}", run.all());
    }
    let run = inspect(&["--mode", "projector", "--json"]);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["roles"]["llm"]["trainable"], 0);
    assert_eq!(v["roles"]["projector"]["trainable"], 2700 * 64 + 64);
}

#[test]
fn processor_options_reach_the_plugin_from_the_cli() {
    let run = inspect(&["--processor", "target_height=120", "--processor", "target_width=120"]);
    assert!(run.success(), "{}", run.all());
    let run = inspect(&["--processor", "target_height=100", "--processor", "target_width=120"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("not a positive multiple of the 30x30 patch"), "{}", run.all());
    let run = inspect(&["--processor", "size=120"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("unknown option(s) size") && run.stderr.contains("target_height, target_width"), "{}", run.all());
}
