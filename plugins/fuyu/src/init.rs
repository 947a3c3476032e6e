//! New Fuyu-shaped checkpoints (`vlmhost init`): the real model's wiring (no
//! vision encoder: each image patch goes through one linear layer,
//! `vision_embed_tokens`, into a Persimmon decoder with squared-ReLU MLPs,
//! q/k layer norms and rotary embeddings on half of each head) at small sizes,
//! with a tokenizer built like fuyu-8b's (Unigram, byte fallback, so any text
//! is covered; `assets/make_tokenizer.py`).
//!
//! | preset | patch | target size (H x W) -> image tokens | Persimmon (hidden x layers, heads, MLP) | parameters |
//! |---|---|---|---|---|
//! | `tiny` | 16 px | 64 x 256 -> at most 4 x 16 patches + 4 `\|NEWLINE\|` (256x64: all of them) | 128 x 4, 4, 512 | 990,592 |
//! | `small` | 16 px | 128 x 512 -> at most 8 x 32 patches + 8 `\|NEWLINE\|` (256x64: 64 + 4) | 384 x 6, 6, 1536 | 11,239,296 |
//!
//! Both use the vocabulary of 384 (`<unk>` 0, `<s>` 1, `</s>` 2,
//! `|ENDOFTEXT|` 3, `|SPEAKER|` 4, `|NEWLINE|` 5, `<0xNN>` 6 + NN so the
//! beginning-of-answer `<0x04>` is 10, `▁` 262, `!`..`~` 263..356) and patches
//! of 16 pixels (fuyu-8b's are 30). Images larger than the target size are
//! shrunk to fit it (aspect kept); smaller ones keep their size, padded to
//! whole patches. The target size is `size` in processor_config.json;
//! `--processor target_height=H --processor target_width=W` overrides it.

use serde_json::json;
use std::path::Path;
use vlmhost_plugin_api::PluginError;
use vlmhost_plugin_sdk::files::TextSizes;
use vlmhost_plugin_sdk::init::{choose, config_json, joined, write_files, File};

/// The tokenizer (see the module doc for its ids).
pub const TOKENIZER: &str = include_str!("../assets/tokenizer.json");

const VOCAB: i64 = 384;
const BOS: i64 = 1;
const END: i64 = 3;
pub(crate) const SPEAKER: i64 = 4;
const PATCH: i64 = 16;

#[derive(Clone)]
struct Preset {
    /// (height, width) images are shrunk to fit
    target: (i64, i64),
    /// The language model (vocabulary, hidden, MLP width, layers, heads).
    llm: TextSizes,
}

const PRESETS: [(&str, Preset); 2] = [
    ("tiny", Preset { target: (64, 256), llm: TextSizes::new(VOCAB, 128, 512, 4, 4) }),
    ("small", Preset { target: (128, 512), llm: TextSizes::new(VOCAB, 384, 1536, 6, 6) }),
];

/// Write config.json, the tokenizer files, processor_config.json (the target
/// size) and generation_config.json into `dir`.
pub fn init(preset_name: &str, dir: &Path) -> Result<(), PluginError> {
    let p = choose(preset_name, &PRESETS)?;
    let (height, width) = p.target;
    let text_config = json!({
        "model_type": "persimmon",
        "hidden_act": "relu2",
        "layer_norm_eps": 1e-5,
        "qk_layernorm": true,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
        "max_position_embeddings": 4096,
        "tie_word_embeddings": false,
        "bos_token_id": BOS,
        "eos_token_id": END,
        "pad_token_id": null,
    });
    let config = config_json::<crate::FuyuModel>(preset_name, json!({
        "image_token_id": SPEAKER,
        "patch_size": PATCH,
        "num_channels": 3,
        "image_size": height.max(width),
        "tie_word_embeddings": false,
        "text_config": joined([p.llm.to_json(), text_config]),
    }));
    let processor = json!({
        "processor_class": "FuyuProcessor",
        "image_processor": {
            "image_processor_type": "FuyuImageProcessor",
            "do_resize": true,
            "size": {"height": height, "width": width},
            "resample": 2,
            "do_pad": true,
            "padding_mode": "constant",
            "padding_value": 1.0,
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": 0.5,
            "image_std": 0.5,
            "patch_size": {"height": PATCH, "width": PATCH},
        },
    });
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "FuyuProcessor",
        "eos_token": "|ENDOFTEXT|",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": 4096,
    });
    let generation = json!({"bos_token_id": BOS, "eos_token_id": END});
    write_files(
        dir,
        &[
            File::Json("config.json", &config),
            File::Text("tokenizer.json", TOKENIZER),
            File::Json("tokenizer_config.json", &tokenizer_config),
            File::Json("processor_config.json", &processor),
            File::Json("generation_config.json", &generation),
        ],
    )?;
    Ok(())
}

