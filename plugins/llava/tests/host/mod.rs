//! LLaVA-1.5 through the host (compiled into the host's integration tests by
//! `tests/integration/families/mod.rs`): parity with transformers (and PEFT)
//! on the tiny fixture made by `scripts/fixtures/make_llava_fixture.py`, run
//! exactly as training does: plugin loaded from its library, weights loaded
//! by the host, rules applied by the host, linear layers (and LoRA) run by the
//! host. The fixture also serves the host's own tests (train, cli, generate).

use crate::families::prelude::*;

pub fn family() -> Family {
    // Batches padded as transformers pads them (the padded batch's ids equal its).
    Family {
        pad_id: |f| f.json("model/config.json")["pad_token_id"].as_i64().unwrap(),
        ..Family::new("llava", "vlmhost_plugin_llava")
    }
}

/// Every role trains, with LoRA, on all linears.
const PEFT: Peft = Peft {
    mode: Mode::Both,
    targets: &Role::ALL,
    projector_modules: &["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"],
    never: &[],
    samples: &[4],
    gradients: 44,
};

checks! { family();
    init_tiny_trains_and_generates,
    // Pixel values are the plugin's own float32 arithmetic per pixel (no libtorch, no summation):
    // the same on every CPU, and bit-identical to transformers' here (measured 0 under every
    // variant of issue #14); 1e-5 (~40 ulps at |x| <= 2.2) catches any wrong mean or std.
    inputs_match_transformers(Inputs { samples: 6, pixel_atol: 1e-5, extra: |_, _, _| {} }),
    logits_and_loss_match_transformers,
    padded_batch_matches_transformers(PaddedBatch { reference: "batch_0_1.safetensors", samples: &[0, 1] }),
    lora_targets_and_counts_equal_peft(&PEFT),
    lora_forward_and_gradients_match_peft(&PEFT),
    frozen_stays_bit_identical_and_trainable_moves_in_every_mode(Training {
        modes: &[Mode::Projector, Mode::Llm, Mode::Vision, Mode::Both],
        samples: &[0, 2],
        steps: 3,
        // Parameters whose output is never used get no gradient: CLIP's
        // last layer and post_layernorm under vision_feature_layer -2.
        may_stay: |name| name.contains("encoder.layers.1.") || name.contains("post_layernorm"),
    }),
    checkpoint_save_and_reload_keeps_bytes,
    gradient_checkpointing_keeps_gradients(Checkpointing { samples: &[0, 2], batch: None, bf16_rtol: RTOL_ACT }),
}
