//! Qwen2.5-VL (the `qwen2_5_vl` family of the Qwen2-VL plugin library)
//! through the host (compiled into the host's integration tests by
//! `tests/integration/families/mod.rs`): parity with transformers (and PEFT)
//! on the tiny fixture made by `scripts/fixtures/make_qwen2_5_vl_fixture.py`
//! (window attention: 56-pixel windows of 2 x 2 merged tokens, edge windows
//! smaller, the middle of three vision blocks attending over whole images),
//! run as training runs it.

use crate::families::prelude::*;
use vlmhost::model::generate::{greedy, stop_tokens, StopReason};
use vlmhost::plugin_api::sample::parse_line;

/// Qwen2-VL's fixture layout, served by the same library.
pub fn family() -> Family {
    Family { name: "qwen2_5_vl", ..super::qwen2_vl::family() }
}

/// Every role trains, with LoRA, on all linears (as for Qwen2-VL): 3 vision blocks x 5 (qkv,
/// proj, gate/up/down) + merger 2 + 2 layers x 7 = 31 modules, A and B each.
const PEFT: Peft = Peft { gradients: 62, ..super::qwen2_vl::PEFT };

checks! { family();
    init_tiny_trains_and_generates,
    // The processor is Qwen2-VL's (its processor_parity test holds pixel values bit-identical).
    inputs_match_transformers(Inputs { samples: 8, pixel_atol: 1e-5, extra: grid_and_image_tokens }),
    logits_and_loss_match_transformers,
    // Samples 0 (image), 6 (text only), 1 (image), right-padded.
    padded_batch_matches_transformers(PaddedBatch { reference: "batch.safetensors", samples: &[0, 6, 1] }),
    // Two images (grids 2x22 and 10x4: 6 and 3 windows, none dividing evenly).
    cached_decoding_equals_the_full_forward(CachedDecoding {
        sample: 7,
        prompt_len: |_, r| r["prompt_len"].int64_value(&[0]),
        // Keys and values of 2 layers, and the next M-RoPE position.
        cache_tensors: 5,
        short_cache: (3, &["the cache holds 3 tensors", "a qwen2_5_vl cache holds 5", "pass back what the previous call returned"]),
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
    untied_head_and_in_memory_layout(&[0, 4, 6, 7], "model.embed_tokens.weight"),
    peft_adapter_loads_and_saves_under_peft_names(4),
    // Sample 7's image spans windows of two sizes; the middle block attends over whole frames.
    gradient_checkpointing_keeps_gradients(Checkpointing { samples: &[6, 7], batch: None, bf16_rtol: RTOL_ACT }),
}

/// image_grid_thw as transformers', and as many image tokens as its mm_token_type_ids.
fn grid_and_image_tokens(i: usize, p: &PreparedSample, r: &Tensors) {
    assert_eq!(ids(tensor(p, "image_grid_thw")), ids(&r["image_grid_thw"]), "sample {i}: image_grid_thw");
    let image_tokens = p.image_token_mask.iter().filter(|&&b| b).count() as i64;
    assert_eq!(image_tokens, r["mm_token_type_ids"].sum(Kind::Int64).int64_value(&[]), "sample {i}: image token mask");
}

/// The decoding equals transformers' own cached decoding; the cache ends with the next M-RoPE
/// position (the prompt's largest + 1, transformers' rope delta after it).
fn cached_decoding_equals_transformers(d: &Decoded) {
    let (r, p) = (d.reference, d.sample);
    let what = "qwen2_5_vl cached decoding vs transformers' cached decoding: logits";
    let diff = assert_close(what, d.logits, &r["cached_logits"], RTOL_ACT, ATOL_FLOOR).max_abs;
    eprintln!("qwen2_5_vl: cached decoding within {diff:.2e} of transformers' cached decoding");
    let delta = ids(&r["rope_deltas"])[0];
    assert!(delta < 0, "two images: positions advance slower than tokens ({delta})");
    assert_eq!(ids(d.cache.last().unwrap()), [p.input_ids.len() as i64 + delta]);
}

#[test]
fn mode_vision_trains_the_blocks_and_merger_not_the_patch_embedding_nor_the_llm() {
    let f = family();
    let m = f.open(Mode::Vision, &TrainConfig::default());
    let trains = |r: Role| m.plan().role_trains(r, m.spec());
    assert_eq!((trains(Role::Vision), trains(Role::Projector), trains(Role::Llm)), (true, true, false));
    for (i, p) in m.spec().params.iter().enumerate() {
        let role = m.plan().roles[i];
        let expected = if p.name.starts_with("visual.merger.") { Role::Projector } else if p.name.starts_with("visual.") { Role::Vision } else { Role::Llm };
        assert_eq!(role, expected, "{}", p.name);
        if role == Role::Llm || p.name.starts_with("visual.patch_embed.") {
            assert!(!m.plan().trainable[i], "{} trains in mode vision", p.name);
        }
    }
    // LoRA on every linear of the 3 blocks (qkv, proj, gate_proj, up_proj, down_proj); none on the Conv3d.
    let vision_lora = m.lora_module_names(Role::Vision);
    assert_eq!(vision_lora.len(), 3 * 5, "{vision_lora:?}");
    assert!(vision_lora.iter().all(|n| n.starts_with("visual.blocks.")), "{vision_lora:?}");
    assert!(vision_lora.iter().any(|n| n.ends_with(".mlp.gate_proj")), "{vision_lora:?}");
    let pe = m.spec().modules.iter().find(|x| x.name == "visual.patch_embed.proj").unwrap();
    assert!(!pe.lora && pe.description == "Conv3d run as Linear");
    assert!(m.lora_module_names(Role::Llm).is_empty());
    // Two steps: the LLM and the patch embedding stay bit-identical; the merger and the vision adapters move.
    let s = f.samples(&m);
    train_and_check_frozen(&m, &f.collate(&s, &[0, 7]), 2, |_| false);
}

#[derive(serde::Deserialize)]
struct GenerateCase {
    index: usize,
    prompt_ids: Vec<i64>,
    generated_ids: Vec<i64>,
}

#[derive(serde::Deserialize)]
struct GenerateReference {
    max_new_tokens: usize,
    cases: Vec<GenerateCase>,
}

#[test]
fn greedy_generation_matches_transformers() {
    // transformers' generate(do_sample=False) on model_untied (the fixture says why), its prompt
    // every message before the last answer with the generation prompt.
    let f = family();
    let reference: GenerateReference = serde_json::from_value(f.json("reference/generate.json")).unwrap();
    let m = f.open_with(&f.options_for("model_untied", Mode::Llm), &TrainConfig::default());
    let stop = stop_tokens(m.model_dir());
    assert!(!stop.is_empty(), "eos from generation_config.json");
    let samples_dir = f.fixture().join("samples");
    let lines: Vec<String> = std::fs::read_to_string(samples_dir.join("data.jsonl")).unwrap().lines().map(str::to_owned).collect();
    for case in &reference.cases {
        let mut sample = parse_line(&lines[case.index], &samples_dir).unwrap();
        let last = sample.messages.iter().rposition(|m| m.role == vlmhost::plugin_api::sample::Speaker::Assistant).unwrap();
        sample.messages.truncate(last);
        let prompt = m.prepare(&serde_json::to_string(&sample).unwrap()).unwrap();
        assert_eq!(prompt.input_ids, case.prompt_ids, "case {}: prompt ids (generation prompt)", case.index);
        let (tokens, stopped) = greedy(&m, &prompt, reference.max_new_tokens, &stop, |_| Ok(())).unwrap();
        assert_eq!(tokens, case.generated_ids, "case {}: generated tokens", case.index);
        let expected = if tokens.last().is_some_and(|t| stop.contains(t)) { StopReason::Eos } else { StopReason::MaxNewTokens };
        assert_eq!(stopped, expected);
        eprintln!("qwen2_5_vl generate sample {}: {} tokens equal to transformers ({stopped:?})", case.index, tokens.len());
    }
}
