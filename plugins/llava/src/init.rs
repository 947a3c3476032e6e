//! New LLaVA-1.5-shaped checkpoints (`vlmhost init`): the real model's wiring
//! (CLIP ViT -> two-layer GELU MLP projector -> Llama with grouped-query
//! attention) at small sizes, with a byte-level tokenizer (every UTF-8 byte a
//! token, so any text is covered; `assets/make_tokenizer.py`) and the
//! llava-hf chat template.
//!
//! | preset | CLIP (width x layers, heads, MLP) | image, patch -> image tokens | Llama (hidden x layers, heads/kv, MLP) | parameters |
//! |---|---|---|---|---|
//! | `tiny` | 64 x 2, 4 heads, 256 | 64 px, 8 px -> 64 | 128 x 4, 4/2, 384 | 1,011,072 |
//! | `small` | 192 x 4, 6 heads, 768 | 128 px, 8 px -> 256 | 384 x 6, 6/2, 1024 | 11,776,512 |
//!
//! Both use the vocabulary of 320 (`<unk>` 0, `<s>` 1, `</s>` 2, byte b ->
//! b + 3, `<image>` 259, `<pad>` 260), untied embeddings and
//! `vision_feature_layer: -1` (a fresh model has no reason to leave its last
//! vision layer unused, as LLaVA-1.5's -2 does). Images are resized to the
//! square (`size: {height, width}`, no centre crop), so a whole 256x64 text
//! line stays in view, squeezed, instead of losing its ends to a crop.

use serde_json::{json, Value};
use std::path::Path;
use vlmhost_plugin_api::PluginError;
use vlmhost_plugin_sdk::files::TextSizes;
use vlmhost_plugin_sdk::init::{choose, config_json, joined, write_files, File};
use vlmhost_plugin_sdk::pixels::Pixels;

/// The byte-level tokenizer (see the module doc for its ids).
pub const BYTE_TOKENIZER: &str = include_str!("../assets/byte_tokenizer.json");
/// The llava-hf chat template, with `{% generation %}` around each answer and its `</s>`.
pub const CHAT_TEMPLATE: &str = include_str!("../assets/chat_template.jinja");

const VOCAB: i64 = 320;
const BOS: i64 = 1;
const EOS: i64 = 2;
pub(crate) const IMAGE: i64 = 259;
const PAD: i64 = 260;

#[derive(Clone)]
struct Preset {
    /// (width, layers, heads, MLP width)
    vision: (i64, i64, i64, i64),
    /// (image size, patch size)
    image: (i64, i64),
    /// The language model (vocabulary, hidden, MLP width, layers, heads) and its key/value heads.
    llm: TextSizes,
    kv_heads: i64,
}

const PRESETS: [(&str, Preset); 2] = [
    ("tiny", Preset { vision: (64, 2, 4, 256), image: (64, 8), llm: TextSizes::new(VOCAB, 128, 384, 4, 4), kv_heads: 2 }),
    ("small", Preset { vision: (192, 4, 6, 768), image: (128, 8), llm: TextSizes::new(VOCAB, 384, 1024, 6, 6), kv_heads: 2 }),
];

/// config.json of preset `p`.
fn config(name: &str, p: &Preset) -> Value {
    let (vw, vl, vh, vi) = p.vision;
    let (image, patch) = p.image;
    let text_config = json!({
        "model_type": "llama",
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.llm.head_dim(),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 4096,
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    });
    config_json::<crate::LlavaModel>(name, json!({
        "image_token_index": IMAGE,
        "image_seq_length": (image / patch) * (image / patch),
        "pad_token_id": PAD,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": false,
        "text_config": joined([p.llm.to_json(), text_config]),
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vw,
            "intermediate_size": vi,
            "num_hidden_layers": vl,
            "num_attention_heads": vh,
            "num_channels": 3,
            "image_size": image,
            "patch_size": patch,
            "projection_dim": vw,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    }))
}

/// processor_config.json: the CLIP image processor resizing to the square.
fn processor(image: i64, patch: i64) -> Value {
    json!({
        "processor_class": "LlavaProcessor",
        "image_token": "<image>",
        "patch_size": patch,
        "num_additional_image_tokens": 1,
        "vision_feature_select_strategy": "default",
        "image_processor": joined([
            json!({
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": true,
                "size": {"height": image, "width": image},
                "resample": 3,
                "do_center_crop": false,
                "crop_size": {"height": image, "width": image},
                "do_convert_rgb": true,
            }),
            Pixels::CLIP.to_json(),
        ]),
    })
}

/// Write config.json, the tokenizer files, processor_config.json,
/// chat_template.jinja and generation_config.json into `dir`.
pub fn init(preset_name: &str, dir: &Path) -> Result<(), PluginError> {
    let p = choose(preset_name, &PRESETS)?;
    let (image, patch) = p.image;
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "LlavaProcessor",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": 4096,
    });
    write_files(
        dir,
        &[
            File::Json("config.json", &config(preset_name, &p)),
            File::Text("tokenizer.json", BYTE_TOKENIZER),
            File::Json("tokenizer_config.json", &tokenizer_config),
            File::Json("processor_config.json", &processor(image, patch)),
            File::Text("chat_template.jinja", CHAT_TEMPLATE),
            File::Json("generation_config.json", &json!({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})),
        ],
    )?;
    // One image token per patch (the SDK checks that the plugin opens the folder).
    let processor = crate::processor::LlavaProcessor::from_dir(dir).map_err(|e| e.into_plugin("llava"))?;
    let n = processor.num_image_tokens(image as usize, image as usize) as i64;
    if n != (image / patch) * (image / patch) {
        return Err(PluginError::invalid("init", format!("preset {preset_name}: the processor gives {n} image tokens per image")));
    }
    Ok(())
}

