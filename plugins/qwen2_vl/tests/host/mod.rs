//! Qwen2-VL through the host (compiled into the host's integration tests by
//! `tests/integration/families/mod.rs`): parity with transformers (and PEFT)
//! on the tiny fixture made by `scripts/fixtures/make_qwen2_vl_fixture.py`,
//! run as training runs it: the plugin library loaded by the host, weights
//! loaded and rules applied by the host, linear layers (and LoRA) run by the
//! host.

use crate::families::prelude::*;

pub fn family() -> Family {
    Family {
        pad_id: |f| f.json("reference/samples.json")["pad_token_id"].as_i64().unwrap(),
        ..Family::new("qwen2_vl", "vlmhost_plugin_qwen2_vl")
    }
}

/// Every role trains, with LoRA, on all linears.
pub const PEFT: Peft = Peft {
    mode: Mode::Both,
    targets: &Role::ALL,
    projector_modules: &["visual.merger.mlp.0", "visual.merger.mlp.2"],
    never: &[("patch_embed", "the Conv3d patch embedding takes no adapter")],
    samples: &[0, 4],
    // 2 vision blocks x 4 + merger 2 + 2 layers x 7 = 24 modules, A and B each.
    gradients: 48,
};

checks! { family();
    init_tiny_trains_and_generates,
    // Pixel values are the plugin's own float32 arithmetic (no libtorch, no summation): the
    // same on every CPU; the plugin's processor_parity test holds them bit-identical.
    inputs_match_transformers(Inputs { samples: 8, pixel_atol: 1e-5, extra: grid_and_image_tokens }),
    logits_and_loss_match_transformers,
    // Samples 0 (image), 6 (text only), 1 (image), right-padded.
    padded_batch_matches_transformers(PaddedBatch { reference: "batch.safetensors", samples: &[0, 6, 1] }),
    // Two images: the prompt's positions advance 5 less than its tokens.
    cached_decoding_equals_the_full_forward(CachedDecoding {
        sample: 7,
        prompt_len: |_, r| r["prompt_len"].int64_value(&[0]),
        // Keys and values of 2 layers, and the next M-RoPE position.
        cache_tensors: 5,
        short_cache: (3, &["the cache holds 3 tensors", "pass back what the previous call returned"]),
        extra: cached_decoding_equals_transformers,
    }),
    lora_targets_and_counts_equal_peft(&PEFT),
    lora_forward_and_gradients_match_peft(&PEFT),
    frozen_stays_bit_identical_and_trainable_moves_in_every_mode(Training {
        modes: &[Mode::Projector, Mode::Llm, Mode::Both],
        samples: &[2, 6],
        steps: 1,
        may_stay: |_| false,
    }),
    checkpoint_save_and_reload_keeps_bytes,
    // model_untied: its own lm_head.weight; model_inmemory: model.visual.* / model.language_model.* keys.
    untied_head_and_in_memory_layout(&[0, 4, 6], "model.embed_tokens.weight"),
    peft_adapter_loads_and_saves_under_peft_names(4),
    gradient_checkpointing_keeps_gradients(Checkpointing { samples: &[2, 6], batch: None, bf16_rtol: RTOL_ACT }),
}

/// image_grid_thw as transformers', and as many image tokens as its mm_token_type_ids.
fn grid_and_image_tokens(i: usize, p: &PreparedSample, r: &Tensors) {
    assert_eq!(ids(tensor(p, "image_grid_thw")), ids(&r["image_grid_thw"]), "sample {i}: image_grid_thw");
    let image_tokens = p.image_token_mask.iter().filter(|&&b| b).count() as i64;
    assert_eq!(image_tokens, r["mm_token_type_ids"].sum(Kind::Int64).int64_value(&[]), "sample {i}: image token mask");
}

/// The decoding equals transformers' own cached decoding; the cache ends with the next M-RoPE
/// position; a later step with an image token is refused.
fn cached_decoding_equals_transformers(d: &Decoded) {
    let (r, p) = (d.reference, d.sample);
    let p_len = p.input_ids.len() as i64;
    assert_eq!(ids(&r["rope_deltas"]), [-5]);
    let what = "qwen2_vl cached decoding vs transformers' cached decoding: logits";
    assert_close(what, d.logits, &r["cached_logits"], RTOL_ACT, ATOL_FLOOR);
    // The last cache entry is the next M-RoPE position: largest position + 1.
    assert_eq!(ids(d.cache.last().unwrap()), [p_len - 5]);
    let step = |token: i64| BatchTensors {
        input_ids: Tensor::from_slice(&[token]).view([1, 1]),
        attention_mask: Tensor::ones([1, p_len + 1], (Kind::Int64, Device::Cpu)),
        labels: Tensor::from_slice(&[-100i64]).view([1, 1]),
        tensors: Vec::new(),
    };
    let image = p.input_ids[p.image_token_mask.iter().position(|&b| b).unwrap()];
    let e = d.m.forward_cached(&step(image), d.cache).unwrap_err().to_string();
    assert!(e.contains("images belong to the prompt"), "{e}");
}

#[test]
fn mode_vision_trains_the_vision_blocks_and_merger_not_the_llm() {
    let f = family();
    let m = f.open(Mode::Vision, &TrainConfig::default());
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
    // Two steps: the LLM stays bit-identical; the merger and the vision adapters move.
    let s = f.samples(&m);
    train_and_check_frozen(&m, &f.collate(&s, &[0, 4]), 2, |_| false);
}

#[test]
fn processor_options_reach_the_plugin() {
    let f = family();
    let mut opts = OpenOptions { load_weights: false, ..f.options(Mode::Llm) };
    opts.processor.insert("max_pixels".into(), 3136.into());
    let m = vlmhost::model::open(&opts, &TrainConfig::default()).unwrap();
    let s = f.samples(&m);
    assert_eq!(ids(tensor(&s[2], "image_grid_thw")), [1, 2, 4]);
    opts.processor.insert("resolution".into(), "high".into());
    let e = format!("{:#}", vlmhost::model::open(&opts, &TrainConfig::default()).err().unwrap());
    assert!(e.contains("unknown option(s) resolution") && e.contains("this family accepts: min_pixels, max_pixels"), "{e}");
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("c.yaml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn inspect_shows_all_linear_lora_leaves_the_patch_embedding_out() {
    let dir = tempdir();
    let f = family();
    let model = f.fixture().join("model").display().to_string();
    let plugin = f.plugin();
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
