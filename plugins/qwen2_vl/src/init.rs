//! New Qwen2-VL-shaped checkpoints (`vlmhost init`): the real model's wiring
//! (ViT with 2-D RoPE -> 2x2 patch merger -> Qwen2 with M-RoPE, grouped-query
//! attention and q/k/v biases, tied embeddings as in Qwen2-VL-2B) at small
//! sizes, with a byte-level tokenizer (every UTF-8 byte a token, so any text
//! is covered; `assets/make_tokenizer.py`) and the Qwen2-VL chat template.
//!
//! | preset | ViT (width x depth, heads) | patch, merge | pixels per image (min - max) -> image tokens | Qwen2 (hidden x layers, heads/kv, MLP, M-RoPE) | parameters |
//! |---|---|---|---|---|---|
//! | `tiny` | 64 x 2, 4 heads | 8, 2x2 | 1,024 - 16,384 -> 4 to 64 (256x64: 64) | 128 x 4, 4/2, 384, [4, 6, 6] | 1,052,928 |
//! | `small` | 192 x 4, 6 heads | 8, 2x2 | 1,024 - 65,536 -> 4 to 256 (256x64: 64) | 384 x 6, 6/2, 1024, [8, 12, 12] | 12,308,352 |
//!
//! The `qwen2_5_vl` family's presets (`init_qwen2_5_vl`) have the same sizes
//! with Qwen2.5-VL's vision tower: RMSNorm, a gated SiLU MLP of 192 (`tiny`) /
//! 512 (`small`), windows of 64 pixels (4 x 4 merged tokens), full attention in
//! every other block (`tiny` block 1, `small` blocks 1 and 3); 1,061,056 and
//! 12,307,648 parameters. transformers 5.23 loads both folders as
//! `Qwen2_5_VLForConditionalGeneration` with no missing or unexpected keys.
//!
//! Both use the vocabulary of 320 (byte b -> b, `<|endoftext|>` 256,
//! `<|im_start|>` 257, `<|im_end|>` 258, `<|vision_start|>` 259,
//! `<|vision_end|>` 260, `<|vision_pad|>` 261, `<|image_pad|>` 262,
//! `<|video_pad|>` 263) and patches of 8 pixels (Qwen2-VL's are 14), so a
//! 256x64 text line keeps its resolution at 64 image tokens. The pixel budget
//! is `min_pixels` / `max_pixels` in preprocessor_config.json (a smaller
//! image is enlarged, a larger one shrunk, to a multiple of 16 pixels per
//! side); `--processor max_pixels=N` overrides it.

use serde_json::{json, Value};
use std::path::Path;
use vlmhost_plugin_api::PluginError;
use vlmhost_plugin_sdk::files::TextSizes;
use vlmhost_plugin_sdk::init::{choose, config_json, joined, write_files, File};
use vlmhost_plugin_sdk::pixels::Pixels;

/// The byte-level tokenizer (see the module doc for its ids).
pub const BYTE_TOKENIZER: &str = include_str!("../assets/byte_tokenizer.json");
/// Qwen2-VL-2B-Instruct's chat template, with `{% generation %}` around each answer and its `<|im_end|>`.
pub const CHAT_TEMPLATE: &str = include_str!("../assets/chat_template.jinja");

const VOCAB: i64 = 320;
const ENDOFTEXT: i64 = 256;
const IM_END: i64 = 258;
const VISION_START: i64 = 259;
const VISION_END: i64 = 260;
pub(crate) const IMAGE_PAD: i64 = 262;
const VIDEO_PAD: i64 = 263;
const PATCH: i64 = 8;
const MERGE: i64 = 2;

#[derive(Clone)]
struct Preset {
    /// (width, depth, heads)
    vision: (i64, i64, i64),
    /// (min_pixels, max_pixels)
    pixels: (i64, i64),
    /// The language model (vocabulary, hidden, MLP width, layers, heads) and its key/value heads.
    llm: TextSizes,
    kv_heads: i64,
}

const PRESETS: [(&str, Preset); 2] = [
    ("tiny", Preset { vision: (64, 2, 4), pixels: (1024, 16384), llm: TextSizes::new(VOCAB, 128, 384, 4, 4), kv_heads: 2 }),
    ("small", Preset { vision: (192, 4, 6), pixels: (1024, 65536), llm: TextSizes::new(VOCAB, 384, 1024, 6, 6), kv_heads: 2 }),
];

/// Qwen2.5-VL's vision tower at preset `p`'s width and depth: (MLP width, full-attention blocks).
/// Windows are 64 pixels (4 x 4 merged tokens of 16 pixels), so a 256x64 text line is 4 windows.
fn vision_25(p: &Preset) -> (i64, Vec<i64>) {
    let (vw, depth, _) = p.vision;
    // As Qwen2.5-VL (3420 for 1280): about 2.67 x the width, a multiple of 32; every other block
    // (the last included) attends over the whole image, as 7, 15, 23, 31 of 32 do at a coarser step.
    let mlp = (vw * 8 / 3 + 31) / 32 * 32;
    (mlp, (1..depth).step_by(2).collect())
}

/// Window side in pixels of the Qwen2.5-VL presets.
const WINDOW: i64 = 64;

/// config.json of preset `p`, Qwen2-VL's or (`v25`) Qwen2.5-VL's.
fn config_for(preset_name: &str, p: &Preset, v25: bool) -> Value {
    let (vw, depth, vheads) = p.vision;
    // M-RoPE splits head_dim / 2 frequencies over (t, h, w) as Qwen2-VL's 16/24/24 of 64.
    let half = p.llm.head_dim() / 2;
    let mrope = [half / 4, half * 3 / 8, half - half / 4 - half * 3 / 8];
    let text_config = json!({
        "model_type": if v25 { "qwen2_5_vl_text" } else { "qwen2_vl_text" },
        "num_key_value_heads": p.kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        "max_position_embeddings": 4096,
        "use_sliding_window": false,
        "sliding_window": null,
        "layer_types": vec!["full_attention"; p.llm.num_hidden_layers as usize],
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": IM_END,
        "pad_token_id": ENDOFTEXT,
    });
    let vision_config = if v25 {
        let (mlp, full) = vision_25(p);
        json!({
            "model_type": "qwen2_5_vl_vision",
            "depth": depth,
            "hidden_size": vw,
            "out_hidden_size": p.llm.hidden_size,
            "hidden_act": "silu",
            "intermediate_size": mlp,
            "num_heads": vheads,
            "in_channels": 3,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": WINDOW,
            "fullatt_block_indexes": full,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        })
    } else {
        json!({
            "model_type": "qwen2_vl_vision",
            "depth": depth,
            "embed_dim": vw,
            "hidden_size": p.llm.hidden_size,
            "hidden_act": "quick_gelu",
            "mlp_ratio": 4,
            "num_heads": vheads,
            "in_channels": 3,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        })
    };
    let keys = json!({
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "tie_word_embeddings": true,
        "text_config": joined([p.llm.to_json(), text_config]),
        "vision_config": vision_config,
    });
    if v25 {
        config_json::<crate::Qwen25VlModel>(preset_name, keys)
    } else {
        config_json::<crate::Qwen2VlModel>(preset_name, keys)
    }
}

/// Write config.json, the tokenizer files, preprocessor_config.json (the
/// pixel budget), processor_config.json, chat_template.jinja and
/// generation_config.json into `dir`.
pub fn init(preset_name: &str, dir: &Path) -> Result<(), PluginError> {
    write(preset_name, dir, false)
}

/// [`init`] for the `qwen2_5_vl` family: the same files, with Qwen2.5-VL's
/// vision tower (RMSNorm, gated SiLU MLP, 64-pixel windows, every other block
/// attending over the whole image) and processor class.
pub fn init_qwen2_5_vl(preset_name: &str, dir: &Path) -> Result<(), PluginError> {
    write(preset_name, dir, true)
}

fn write(preset_name: &str, dir: &Path, v25: bool) -> Result<(), PluginError> {
    let p = choose(preset_name, &PRESETS)?;
    let processor_class = if v25 { "Qwen2_5_VLProcessor" } else { "Qwen2VLProcessor" };
    let (min_pixels, max_pixels) = p.pixels;
    let preprocessor = joined([json!({
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": PATCH,
        "merge_size": MERGE,
        "temporal_patch_size": 2,
        "do_resize": true,
        "resample": 3,
        "do_convert_rgb": true,
    }), Pixels::CLIP.to_json()]);
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": processor_class,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 4096,
    });
    // Qwen2-VL-Instruct stops at <|im_end|> or <|endoftext|>.
    let generation = json!({"bos_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT], "pad_token_id": ENDOFTEXT});
    write_files(
        dir,
        &[
            File::Json("config.json", &config_for(preset_name, &p, v25)),
            File::Text("tokenizer.json", BYTE_TOKENIZER),
            File::Json("tokenizer_config.json", &tokenizer_config),
            File::Json("preprocessor_config.json", &preprocessor),
            File::Json("processor_config.json", &json!({"processor_class": processor_class})),
            File::Text("chat_template.jinja", CHAT_TEMPLATE),
            File::Json("generation_config.json", &generation),
        ],
    )?;
    Ok(())
}

