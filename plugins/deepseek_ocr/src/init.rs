//! New DeepSeek-OCR-shaped checkpoints (`vlmhost init`): the real model's
//! wiring (SAM -> CLIP on SAM's features -> linear projector -> DeepSeek-V2
//! MoE with a dense first layer and shared experts) at small sizes, with a
//! byte-level tokenizer (every UTF-8 byte a token, so any text is covered).
//!
//! | preset | SAM (width/depth/heads/window) | CLIP | LLM (hidden/layers/experts top-k) | view |
//! |---|---|---|---|---|
//! | `tiny` | 32/2/2/8 | 48 x 2 | 128/4, 8 experts top-2 + 1 shared | 512 px (64 image tokens), no tiles |
//! | `small` | 64/4/4/8 | 128 x 4 | 256/6, 16 experts top-4 + 2 shared | 512 px (64 image tokens), no tiles |

use serde_json::{json, Value};
use std::path::Path;
use vlmhost_plugin_api::PluginError;
use vlmhost_plugin_sdk::init::{choose, write_files, File};

/// The byte-level tokenizer: `<｜begin▁of▁sentence｜>` 0,
/// `<｜end▁of▁sentence｜>` 1, byte b -> b + 2, `<image>` 300.
pub const BYTE_TOKENIZER: &str = include_str!("../assets/byte_tokenizer.json");

#[derive(Clone)]
struct Preset {
    sam: (i64, i64, i64, i64, Vec<i64>),
    image_size: i64,
    clip: (i64, i64, i64),
    llm: (i64, i64, i64, i64, i64, i64, i64),
}

fn presets() -> [(&'static str, Preset); 2] {
    // (width, depth, heads, window, global blocks), (width, layers, heads),
    // (hidden, layers, heads, experts, top-k, shared, moe intermediate)
    [
        ("tiny", Preset { sam: (32, 2, 2, 8, vec![1]), image_size: 512, clip: (48, 2, 4), llm: (128, 4, 4, 8, 2, 1, 64) }),
        ("small", Preset { sam: (64, 4, 4, 8, vec![1, 3]), image_size: 512, clip: (128, 4, 4), llm: (256, 6, 8, 16, 4, 2, 128) }),
    ]
}

/// Write config.json, tokenizer.json and vlmhost.json (the processor
/// settings that fit the encoder's size) into `dir`.
pub fn init(preset_name: &str, dir: &Path) -> Result<(), PluginError> {
    let p = choose(preset_name, &presets())?;
    let config = config(preset_name, &p);
    // The config must describe a model this plugin opens.
    crate::config::DeepseekOcrConfig::from_value(&config).map_err(|m| PluginError::invalid("init", format!("preset {preset_name}: {m}")))?;
    let processor = json!({"processor": {"base_size": p.image_size, "image_size": p.image_size, "crop_mode": false}});
    write_files(
        dir,
        &[
            File::Json("config.json", &config),
            File::Text("tokenizer.json", BYTE_TOKENIZER),
            File::Json("generation_config.json", &json!({"bos_token_id": 0, "eos_token_id": 1})),
            File::Json("vlmhost.json", &processor),
        ],
    )
}

/// config.json of preset `p`.
fn config(preset_name: &str, p: &Preset) -> Value {
    let (sw, sd, sh, window, global) = p.sam.clone();
    let (cw, cl, ch) = p.clip;
    let (hidden, layers, heads, experts, topk, shared, moe_inter) = p.llm;
    // SAM's output grid (image / 64) is CLIP's position grid (x 14 pixels).
    let clip_image = p.image_size / 64 * 14;
    // net_2 doubles the neck's channels, net_3 reaches CLIP's width.
    let down = [sw, cw];
    let neck = down[0] / 2;
    let llm = json!({
        "vocab_size": 304,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "moe_intermediate_size": moe_inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "n_routed_experts": experts,
        "n_shared_experts": shared,
        "num_experts_per_tok": topk,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": false,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "attention_bias": false,
        "use_mla": false,
        "kv_lora_rank": null,
        "q_lora_rank": null,
        "qk_nope_head_dim": 0,
        "qk_rope_head_dim": 0,
        "v_head_dim": 0,
        "tie_word_embeddings": false,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "max_position_embeddings": 8192,
    });
    let mut config = llm.clone();
    let extra = json!({
        "_name_or_path": format!("vlmhost-init-deepseek_ocr-{preset_name}"),
        "architectures": ["DeepseekOCRForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "torch_dtype": "float32",
        "language_config": llm,
        "projector_config": {"projector_type": "linear", "input_dim": cw + down[1], "n_embed": hidden, "model_type": "mlp_projector"},
        "vision_config": {
            "image_size": p.image_size,
            "model_name": "deeplip_b_l",
            "model_type": "vision",
            "width": {
                "sam_vit_b": {
                    "width": sw, "layers": sd, "heads": sh, "global_attn_indexes": global,
                    "downsample_channels": down, "window_size": window, "neck_channels": neck
                },
                "clip-l-14-224": {"width": cw, "layers": cl, "heads": ch, "image_size": clip_image, "patch_size": 14}
            }
        },
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    config
}

