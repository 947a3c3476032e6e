//! New toy_vlm checkpoints (`vlmhost init --plugin toy_vlm --preset tiny`).
//!
//! The plugin writes the files that describe the model (config.json, the
//! tokenizer with its tokenizer_config.json, the chat template,
//! generation_config.json, and vlmhost.json with processor defaults); the host then opens the folder through this plugin and draws
//! the weights from the spec (normal(0, 0.02) for weights and embeddings,
//! ones for norm scales, zeros for biases) into model.safetensors.
//!
//! | preset | vision (width, MLP, heads) | LLM (hidden x layers, heads/kv, MLP) |
//! |---|---|---|
//! | `tiny` | 32, 64, 2 | 64 x 2, 4/2, 128 |
//! | `small` | 64, 128, 4 | 128 x 2, 4/2, 256 |
//!
//! Both: 32x32 images in 8x8 patches (16 image tokens), the byte tokenizer
//! (vocabulary 512), one vision block, untied head.

use serde_json::{json, Value};
use std::path::Path;
use vlmhost_plugin_api::PluginError;

/// The byte-level tokenizer (`<bos>` 0, `<eos>` 1, byte b -> b + 2, `<image>`
/// 300), written as the checkpoint's tokenizer.json; the host decodes
/// generated tokens with it.
pub const BYTE_TOKENIZER: &str = include_str!("../assets/byte_tokenizer.json");

/// The presets `vlmhost init --preset` accepts.
pub const PRESETS: &[&str] = &["tiny", "small"];

fn write(path: &Path, v: &Value) -> Result<(), PluginError> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    write_text(path, &text)
}

fn write_text(path: &Path, text: &str) -> Result<(), PluginError> {
    std::fs::write(path, text)
        .map_err(|e| PluginError::Io { path: path.display().to_string().into(), message: e.to_string().into() })
}

/// The `config.json` of `preset`.
pub fn config(preset: &str) -> Result<Value, PluginError> {
    // (vision width, vision MLP, vision heads, LLM hidden, LLM MLP)
    let (vw, vi, vh, d, di) = match preset {
        "tiny" => (32, 64, 2, 64, 128),
        "small" => (64, 128, 4, 128, 256),
        other => {
            return Err(PluginError::invalid_with_hint(
                "preset",
                format!("unknown preset {other:?}"),
                format!("use one of: {}", PRESETS.join(", ")),
            ))
        }
    };
    Ok(json!({
        "_name_or_path": format!("vlmhost-init-toy_vlm-{preset}"),
        "architectures": ["ToyVlmForConditionalGeneration"],
        "model_type": "toy_vlm",
        "torch_dtype": "float32",
        "image_token_id": crate::processor::IMAGE_TOKEN,
        "bos_token_id": crate::processor::BOS,
        "eos_token_id": crate::processor::EOS,
        "vision_config": {
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
            "hidden_size": vw,
            "intermediate_size": vi,
            "num_hidden_layers": 1,
            "num_attention_heads": vh,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5
        },
        "text_config": {
            "vocab_size": 512,
            "hidden_size": d,
            "intermediate_size": di,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0
        }
    }))
}

/// Write the checkpoint's files for `preset` into the empty folder `dir`.
pub fn init(preset: &str, dir: &Path) -> Result<(), PluginError> {
    let config = config(preset)?;
    // Never write a config this plugin would refuse to open.
    let parsed: crate::config::ToyConfig = serde_json::from_value(config.clone())
        .map_err(|e| PluginError::invalid("init", format!("preset {preset}: {e}")))?;
    parsed.check().map_err(|(key, m)| PluginError::invalid("init", format!("preset {preset}: {key}: {m}")))?;
    write(&dir.join("config.json"), &config)?;
    write_text(&dir.join("tokenizer.json"), BYTE_TOKENIZER)?;
    // What transformers' AutoTokenizer reads besides tokenizer.json; the chat template names these tokens.
    write(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": crate::processor::tokens::BOS_TEXT,
            "eos_token": crate::processor::tokens::EOS_TEXT,
        }),
    )?;
    // The conversation layout training renders (and inference must render the same way).
    write_text(&dir.join("chat_template.jinja"), crate::processor::DEFAULT_CHAT_TEMPLATE)?;
    // `vlmhost generate` stops at generation_config.json's eos_token_id.
    write(&dir.join("generation_config.json"), &json!({"bos_token_id": 0, "eos_token_id": 1}))?;
    // Processor defaults the host passes to `open` (the user's options win).
    write(&dir.join("vlmhost.json"), &json!({"processor": {"resample": "bilinear"}}))?;
    Ok(())
}
