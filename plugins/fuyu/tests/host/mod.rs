//! Fuyu through the host (compiled into the host's integration tests by
//! `tests/integration/families/mod.rs`): parity with transformers (and PEFT)
//! on the tiny fixture made by `scripts/fixtures/make_fuyu_fixture.py`,
//! incremental decoding against the full forward, and the encoder-free role
//! semantics, through `HostModel` and the `vlmhost` binary.

use crate::families::prelude::*;

pub fn family() -> Family {
    Family::new("fuyu", "vlmhost_plugin_fuyu")
}

/// The projector (vision_embed_tokens) and the LLM's linears, lm_head left out.
const PEFT: Peft = Peft {
    mode: Mode::Llm,
    targets: &[Role::Projector, Role::Llm],
    projector_modules: &["vision_embed_tokens"],
    never: &[],
    samples: &[2],
    // 9 LoRA modules, A and B.
    gradients: 18,
};

checks! { family();
    init_tiny_trains_and_generates,
    inputs_match_transformers(Inputs { samples: 7, pixel_atol: 0.0, extra: one_speaker_token_per_patch }),
    logits_and_loss_match_transformers,
    padded_batch_matches_transformers(PaddedBatch { reference: "batch_0_1.safetensors", samples: &[0, 1] }),
    cached_decoding_equals_the_full_forward(CachedDecoding {
        sample: 2,
        prompt_len: |len, _| len - 6,
        // Keys and values of 2 layers.
        cache_tensors: 4,
        short_cache: (1, &["1 tensors, expected 4"]),
        extra: last_token_equals_transformers,
    }),
    lora_targets_and_counts_equal_peft(&PEFT),
    lora_forward_and_gradients_match_peft(&PEFT),
    checkpoint_save_and_reload_keeps_bytes,
    gradient_checkpointing_keeps_gradients(Checkpointing { samples: &[0, 1], batch: None, bf16_rtol: RTOL_ACT }),
}

/// Patches bit for bit; one |SPEAKER| token per patch, each protected as an image token.
fn one_speaker_token_per_patch(i: usize, p: &PreparedSample, _: &Tensors) {
    let n_patches = tensor(p, "pixel_values").size()[0] as usize;
    let speaker = p.input_ids.iter().filter(|&&t| t == p.input_ids[0]).count();
    assert_eq!(speaker, n_patches, "sample {i}: one |SPEAKER| per patch");
    assert!(p.image_token_mask[..n_patches].iter().all(|&b| b), "sample {i}: image tokens are protected");
}

/// The cache spans the whole sample; the last token's logits, decoded with the cache, equal transformers'.
fn last_token_equals_transformers(d: &Decoded) {
    let len = d.batch.input_ids.size()[1];
    assert_eq!(d.cache[0].size()[2], len);
    let (last, _) = tch::no_grad(|| {
        let (_, c) = d.m.forward_cached(&window(d.batch, 0, len - 1, true), &[]).unwrap();
        d.m.forward_cached(&window(d.batch, len - 1, 1, false), &c)
    })
    .unwrap();
    let want = d.reference["logits"].narrow(1, len - 1, 1);
    assert_close("fuyu cached decoding, last token vs transformers: logits", &last, &want, RTOL_ACT, ATOL_FLOOR);
}

const NO_ENCODER: &str = "fuyu has no vision encoder; its image path is the projector, which trains in every mode";

#[test]
fn both_key_layouts_load_the_same_weights() {
    let f = family();
    let hub = f.open(Mode::Llm, &TrainConfig::default());
    let memory = f.open_with(&f.options_for("model_memory_layout", Mode::Llm), &TrainConfig::default());
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

#[test]
fn greedy_generation_equals_transformers_generate() {
    let f = family();
    let m = f.open(Mode::Llm, &TrainConfig::default());
    let data = f.fixture().join("samples");
    let stop = vlmhost::model::generate::stop_tokens(m.model_dir());
    for (i, image, prompt) in [(0, "img0_rgb_90x60.png", "What is in this picture?"), (4, "img4_rgba_70x50.png", "What does the sign say?")] {
        let r = f.reference(&format!("generate_{i}.safetensors"));
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
    let (plugin, model) = (f.plugin(), f.fixture().join("model").display().to_string());
    let image = data.join("img0_rgb_90x60.png").display().to_string();
    let args = ["generate", "--plugin", &plugin, "--model", &model, "--image", &image, "--prompt", "What is in this picture?", "--max-new-tokens", "8", "--json"];
    let run = vlmhost(&args, dir.path(), None);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let tokens: Vec<i64> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    assert_eq!(tokens, ids(&f.reference("generate_0.safetensors")["generated"]));
}

#[test]
fn encoder_free_modes_through_the_host() {
    let f = family();
    for mode in [Mode::Vision, Mode::Both] {
        let err = vlmhost::model::open(&f.options(mode), &TrainConfig::default()).err().unwrap();
        assert!(format!("{err:#}").contains(NO_ENCODER), "{err:#}");
    }
    // llm: projector (full) + LLM (LoRA); projector: the projector alone. Nothing is vision.
    for (mode, llm_trains) in [(Mode::Llm, true), (Mode::Projector, false)] {
        let m = f.open(mode, &TrainConfig::default());
        assert!(!m.spec().has_vision_encoder);
        assert!(!m.plan().roles.contains(&Role::Vision));
        assert_eq!(m.counts(Role::Vision), (0, 0));
        let trains = |r: Role| m.plan().role_trains(r, m.spec());
        assert_eq!((trains(Role::Vision), trains(Role::Projector), trains(Role::Llm)), (false, true, llm_trains));
        let proj: Vec<&str> = m.spec().params.iter().zip(&m.plan().roles).filter(|(_, r)| **r == Role::Projector).map(|(p, _)| p.name.as_str()).collect();
        assert_eq!(proj, ["vision_embed_tokens.weight", "vision_embed_tokens.bias"]);
        // A few steps: trainable moves, frozen stays bit-identical.
        let s = f.samples(&m);
        train_and_check_frozen(&m, &f.collate(&s, &[0, 3]), 2, |_| false);
        assert_eq!(m.adapters().next().is_some(), llm_trains);
    }
}

fn inspect(extra: &[&str]) -> Run {
    let f = family();
    let dir = tempdir();
    let (plugin, model) = (f.plugin(), f.fixture().join("model").display().to_string());
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
