//! `config.json` of a Qwen2-VL checkpoint, in both forms: the hub's (flat text
//! settings at the top level, `rope_theta` + `rope_scaling: {"type": "mrope",
//! "mrope_section": ...}`, `in_chans`) and transformers 5's (nested
//! `text_config` / `vision_config`, `rope_parameters`). Defaults are those of
//! transformers 5.23 `models/qwen2_vl/configuration_qwen2_vl.py`
//! (`Qwen2VLConfig`, `Qwen2VLTextConfig`, `Qwen2VLVisionConfig`).

use serde_json::Value;
use std::path::Path;
use vlmhost_plugin_api::PluginError;
use vlmhost_plugin_sdk::config_struct;
use vlmhost_plugin_sdk::files::{
    check_activations, check_sizes, config_section, object, parse_config, read_config_text, rope_kind, TextDefaults, TextSizes,
};

config_struct! {
    /// The vision tower (`Qwen2VLVisionConfig`).
    #[derive(Debug, Clone, PartialEq)]
    pub struct VisionConfig {
        pub depth: i64 = 32,
        pub embed_dim: i64 = 1280,
        /// Output width of the merger: the language model's hidden size.
        pub hidden_size: i64 = 3584,
        pub hidden_act: String = "quick_gelu".into(),
        pub mlp_ratio: f64 = 4.0,
        pub num_heads: i64 = 16,
        /// `in_channels` (transformers 5) or `in_chans` (the hub's).
        #[serde(alias = "in_chans")]
        pub in_channels: i64 = 3,
        pub patch_size: i64 = 14,
        pub spatial_merge_size: i64 = 2,
        pub temporal_patch_size: i64 = 2,
        /// Base of the 2-D vision RoPE (`rope_parameters.rope_theta`, 10000).
        pub rope_theta: f64 = 10000.0,
        /// transformers 5's RoPE settings (`rope_type` axial, `rope_theta`); read into `rope_theta`.
        #[serde(skip_serializing)]
        pub rope_parameters: Option<Value> = None,
    }
}

impl VisionConfig {
    pub fn head_dim(&self) -> i64 {
        self.embed_dim / self.num_heads
    }
    /// `int(embed_dim * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> i64 {
        (self.embed_dim as f64 * self.mlp_ratio) as i64
    }
    /// Values per patch row of `pixel_values`: C * T * P * P (1176 for Qwen2-VL).
    pub fn patch_dim(&self) -> i64 {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    /// Width of the merger's input: `embed_dim * merge^2`.
    pub fn merged_dim(&self) -> i64 {
        self.embed_dim * self.spatial_merge_size * self.spatial_merge_size
    }

    /// `rope_parameters` (axial, transformers 5) over `rope_theta`.
    fn resolve_rope(&mut self) -> Result<(), PluginError> {
        if let Some(p) = self.rope_parameters.as_ref().filter(|p| p.is_object()) {
            let kind = p.get("rope_type").and_then(Value::as_str).unwrap_or("axial");
            if kind != "axial" && kind != "default" {
                return Err(invalid("vision_config.rope_parameters.rope_type", format!("{kind:?} is not supported (only \"axial\")")));
            }
            self.rope_theta = match p.get("rope_theta") {
                None => 10000.0,
                Some(t) => t.as_f64().ok_or_else(|| invalid("vision_config.rope_parameters.rope_theta", format!("expected a number, got {t}")))?,
            };
        }
        Ok(())
    }
}

config_struct! {
    /// The Qwen2.5-VL vision tower as `config.json` writes it (`Qwen2_5_VLVisionConfig`): its
    /// `hidden_size` is the blocks' width (Qwen2-VL's `embed_dim`), `out_hidden_size` the
    /// merger's output; read into [`VisionConfig`] and [`WindowConfig`].
    struct Vision25 {
        depth: i64 = 32,
        hidden_size: i64 = 3584,
        hidden_act: String = "silu".into(),
        intermediate_size: i64 = 3420,
        num_heads: i64 = 16,
        #[serde(alias = "in_chans")]
        in_channels: i64 = 3,
        patch_size: i64 = 14,
        spatial_merge_size: i64 = 2,
        temporal_patch_size: i64 = 2,
        tokens_per_second: f64 = 4.0,
        window_size: i64 = 112,
        out_hidden_size: i64 = 3584,
        fullatt_block_indexes: Vec<i64> = vec![7, 15, 23, 31],
        rope_theta: f64 = 10000.0,
        rope_parameters: Option<Value> = None,
    }
}

/// What Qwen2.5-VL's vision tower has beyond Qwen2-VL's: a gated MLP of width
/// `intermediate_size` and windowed attention (`Qwen2_5_VLVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowConfig {
    /// Width of the blocks' gated MLP (gate_proj / up_proj).
    pub intermediate_size: i64,
    /// Window side in pixels (112: 4 x 4 merged tokens of 28 pixels).
    pub window_size: i64,
    /// Blocks that attend over the whole image (frame); the others within windows.
    /// Indexes outside `0..depth` select nothing, as in transformers.
    pub fullatt_block_indexes: Vec<i64>,
    /// Temporal scaling of video positions; unused (videos are refused).
    pub tokens_per_second: f64,
}

impl WindowConfig {
    /// Window side in merged tokens: `window_size / merge / patch` (transformers' `vit_merger_window_size`).
    pub fn merged_window(&self, v: &VisionConfig) -> i64 {
        self.window_size / v.spatial_merge_size / v.patch_size
    }
}

/// Which model a config describes (`model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `qwen2_vl`: LayerNorm, a fc1/fc2 MLP and whole-image attention in the vision blocks.
    Qwen2Vl,
    /// `qwen2_5_vl`: RMSNorm, a gated SiLU MLP and windowed attention ([`WindowConfig`]).
    Qwen25Vl,
}

impl Variant {
    /// The family (and `model_type`) name.
    pub fn family(self) -> &'static str {
        match self {
            Variant::Qwen2Vl => "qwen2_vl",
            Variant::Qwen25Vl => "qwen2_5_vl",
        }
    }
}

config_struct! {
    /// The Qwen2 language model (`Qwen2VLTextConfig`).
    #[derive(Debug, Clone, PartialEq)]
    pub struct TextConfig {
        #[serde(flatten, deserialize_with = "TextSizes::deserialize_for::<TextConfig, _>")]
        pub sizes: TextSizes = Self::SIZES,
        pub num_key_value_heads: i64 = 8,
        pub hidden_act: String = "silu".into(),
        pub rms_norm_eps: f64 = 1e-5,
        /// Resolved from `rope_theta` and `rope_parameters` / `rope_scaling` ([`text_rope`]).
        #[serde(skip)]
        pub rope_theta: f64 = 1_000_000.0,
        /// How the rotary frequencies (head_dim / 2) split over the t, h, w axes.
        #[serde(skip)]
        pub mrope_section: Vec<i64> = vec![16, 24, 24],
        #[serde(skip_serializing)]
        pub use_sliding_window: bool = false,
    }
}

impl TextDefaults for TextConfig {
    /// `Qwen2VLTextConfig`'s vocabulary, widths, depth and heads.
    const SIZES: TextSizes = TextSizes::new(152064, 8192, 29568, 80, 64);
}

config_struct! {
    /// The top-level keys of `config.json`.
    struct Top {
        image_token_id: i64 = 151655,
        video_token_id: i64 = 151656,
        vision_start_token_id: i64 = 151652,
        vision_end_token_id: i64 = 151653,
        tie_word_embeddings: bool = false,
    }
}

/// The whole `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    pub variant: Variant,
    /// The vision tower (for Qwen2.5-VL: `hidden_size` read as `embed_dim`, `out_hidden_size` as `hidden_size`).
    pub vision: VisionConfig,
    /// Qwen2.5-VL's window attention and gated MLP; `None` for Qwen2-VL.
    pub window: Option<WindowConfig>,
    pub text: TextConfig,
    pub image_token_id: i64,
    pub video_token_id: i64,
    pub vision_start_token_id: i64,
    pub vision_end_token_id: i64,
    pub tie_word_embeddings: bool,
}

fn invalid(key: &str, message: impl Into<String>) -> PluginError {
    PluginError::invalid_with_hint(
        format!("config.json: {key}"),
        message,
        "fix the checkpoint's config.json (the keys are documented in transformers' configuration_qwen2_vl.py and configuration_qwen2_5_vl.py)",
    )
}

impl Qwen2VlConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, PluginError> {
        Self::from_json(&read_config_text(dir)?).map_err(|e| match e {
            PluginError::InvalidInput { location, message, hint } => PluginError::InvalidInput {
                location: format!("{}/{location}", dir.display()).into(),
                message,
                hint,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, PluginError> {
        let v = parse_config(text)?;
        if !v.is_object() {
            return Err(invalid("", "expected a JSON object"));
        }
        let section = |key: &str| object(&v, key).map_err(|m| invalid(key, m));
        // Hub configs keep the text settings at the top level; transformers 5 nests them.
        let nested = section("text_config")?.is_object();
        let (text_v, prefix) = if nested { (&v["text_config"], "text_config.") } else { (&v, "") };
        let mut text: TextConfig = config_section(text_v, prefix)?;
        if text_v.get("num_key_value_heads").is_some_and(Value::is_null) {
            text.num_key_value_heads = text.sizes.num_attention_heads;
        }
        (text.rope_theta, text.mrope_section) = text_rope(text_v, prefix, &v)?;
        if text.use_sliding_window {
            return Err(invalid(
                &format!("{prefix}use_sliding_window"),
                "sliding-window attention is not supported (transformers applies it only with flash-attention)",
            ));
        }
        let variant = match v.get("model_type").and_then(Value::as_str) {
            Some("qwen2_5_vl") => Variant::Qwen25Vl,
            _ => Variant::Qwen2Vl,
        };
        let (mut vision, window) = match variant {
            Variant::Qwen2Vl => (config_section::<VisionConfig>(section("vision_config")?, "vision_config.")?, None),
            Variant::Qwen25Vl => {
                let w: Vision25 = config_section(section("vision_config")?, "vision_config.")?;
                let vision = VisionConfig {
                    depth: w.depth,
                    embed_dim: w.hidden_size,
                    hidden_size: w.out_hidden_size,
                    hidden_act: w.hidden_act,
                    // Unused: the gated MLP's width is WindowConfig::intermediate_size.
                    mlp_ratio: 0.0,
                    num_heads: w.num_heads,
                    in_channels: w.in_channels,
                    patch_size: w.patch_size,
                    spatial_merge_size: w.spatial_merge_size,
                    temporal_patch_size: w.temporal_patch_size,
                    rope_theta: w.rope_theta,
                    rope_parameters: w.rope_parameters,
                };
                let window = WindowConfig {
                    intermediate_size: w.intermediate_size,
                    window_size: w.window_size,
                    fullatt_block_indexes: w.fullatt_block_indexes,
                    tokens_per_second: w.tokens_per_second,
                };
                (vision, Some(window))
            }
        };
        vision.resolve_rope()?;
        let top: Top = config_section(&v, "")?;
        // transformers 5 reads tie_word_embeddings at the top level; pre-v5 saves put it in text_config.
        let text_tie = nested && text_v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
        let cfg = Qwen2VlConfig {
            variant,
            vision,
            window,
            text,
            image_token_id: top.image_token_id,
            video_token_id: top.video_token_id,
            vision_start_token_id: top.vision_start_token_id,
            vision_end_token_id: top.vision_end_token_id,
            tie_word_embeddings: top.tie_word_embeddings || text_tie,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), PluginError> {
        let (v, t) = (&self.vision, &self.text);
        check_activations(&[("vision_config.hidden_act", &v.hidden_act), ("text_config.hidden_act", &t.hidden_act)])?;
        // Qwen2.5-VL names the blocks' width hidden_size and the merger's output out_hidden_size.
        let (width_key, out_key) =
            if self.window.is_some() { ("vision_config.hidden_size", "vision_config.out_hidden_size") } else { ("vision_config.embed_dim", "vision_config.hidden_size") };
        let positive = [
            ("vision_config.depth", v.depth),
            (width_key, v.embed_dim),
            ("vision_config.num_heads", v.num_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.spatial_merge_size", v.spatial_merge_size),
            ("vision_config.temporal_patch_size", v.temporal_patch_size),
            ("vision_config.in_channels", v.in_channels),
            (out_key, v.hidden_size),
        ];
        check_sizes("", &positive)?;
        if let Some(w) = &self.window {
            check_sizes("vision_config.", &[("intermediate_size", w.intermediate_size), ("window_size", w.window_size)])?;
            if w.merged_window(v) < 1 {
                return Err(invalid(
                    "vision_config.window_size",
                    format!(
                        "{} pixels is less than one merged token ({} x {} pixels): windows would be empty",
                        w.window_size,
                        v.patch_size * v.spatial_merge_size,
                        v.patch_size * v.spatial_merge_size
                    ),
                ));
            }
        }
        check_sizes("text_config.", &t.sizes.named())?;
        check_sizes("text_config.", &[("num_key_value_heads", t.num_key_value_heads)])?;
        if v.embed_dim % v.num_heads != 0 || v.head_dim() % 4 != 0 {
            return Err(invalid(
                width_key,
                format!("{} / num_heads {} must be a multiple of 4 (2-D rotary embedding)", v.embed_dim, v.num_heads),
            ));
        }
        if v.hidden_size != t.sizes.hidden_size {
            return Err(invalid(
                out_key,
                format!("the merger's output ({}) must equal the LLM's hidden_size ({})", v.hidden_size, t.sizes.hidden_size),
            ));
        }
        if t.sizes.hidden_size % t.sizes.num_attention_heads != 0 || t.sizes.head_dim() % 2 != 0 {
            return Err(invalid("text_config.hidden_size", "must be an even multiple of num_attention_heads"));
        }
        if t.sizes.num_attention_heads % t.num_key_value_heads != 0 {
            return Err(invalid("text_config.num_key_value_heads", "must divide num_attention_heads"));
        }
        let sum: i64 = t.mrope_section.iter().sum();
        if t.mrope_section.len() != 3 || t.mrope_section.iter().any(|&s| s < 0) || sum != t.sizes.head_dim() / 2 {
            return Err(invalid(
                "text_config.rope_scaling.mrope_section",
                format!(
                    "{:?} must be three non-negative sizes summing to head_dim / 2 = {}",
                    t.mrope_section,
                    t.sizes.head_dim() / 2
                ),
            ));
        }
        for (key, id) in [
            ("image_token_id", self.image_token_id),
            ("vision_start_token_id", self.vision_start_token_id),
            ("vision_end_token_id", self.vision_end_token_id),
        ] {
            if id < 0 || id >= t.sizes.vocab_size {
                return Err(invalid(key, format!("{id} is outside the vocabulary ({} tokens)", t.sizes.vocab_size)));
            }
        }
        Ok(())
    }
}

/// The text RoPE: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (hub),
/// in `text_config` (`text` under `prefix`) or at the top level (`root`). Only the default
/// (M-RoPE) kind is supported.
fn text_rope(text: &Value, prefix: &str, root: &Value) -> Result<(f64, Vec<i64>), PluginError> {
    let number = |v: &Value, key: &str| v.get(key).filter(|x| !x.is_null()).map(|x| x.as_f64().ok_or_else(|| invalid(key, format!("expected a number, got {x}")))).transpose();
    let mut theta = match number(text, "rope_theta")? {
        Some(t) => t,
        None => number(root, "rope_theta")?.unwrap_or(1_000_000.0),
    };
    let mut section = vec![16, 24, 24];
    for (obj, at) in [(root, ""), (text, prefix)] {
        for key in ["rope_scaling", "rope_parameters"] {
            let Some(p) = obj.get(key).filter(|p| !p.is_null()) else { continue };
            let full = format!("{at}{key}");
            let p = p.as_object().ok_or_else(|| invalid(&full, "expected an object"))?;
            let kind = rope_kind(&Value::Object(p.clone())).to_owned();
            if kind != "default" && kind != "mrope" {
                return Err(invalid(&full, format!("RoPE type {kind:?} is not supported by the qwen2_vl plugin (only M-RoPE)")));
            }
            if let Some(th) = p.get("rope_theta") {
                theta = th.as_f64().ok_or_else(|| invalid(&format!("{full}.rope_theta"), "expected a number"))?;
            }
            if let Some(s) = p.get("mrope_section") {
                section = s
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| invalid(&format!("{full}.mrope_section"), format!("expected a list of integers, got {s}")))?;
            }
        }
    }
    Ok((theta, section))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public Qwen/Qwen2-VL-2B config.json (hub form; same architecture as -Instruct).
    pub const QWEN2_VL_2B: &str = include_str!("../tests/qwen2-vl-2b.config.json");

    #[test]
    fn hub_config() {
        let c = Qwen2VlConfig::from_json(QWEN2_VL_2B).unwrap();
        assert_eq!(c.vision.depth, 32);
        assert_eq!(c.vision.embed_dim, 1280);
        assert_eq!(c.vision.hidden_size, 1536);
        assert_eq!(c.vision.mlp_hidden(), 5120);
        assert_eq!(c.vision.patch_dim(), 1176);
        assert_eq!(c.vision.head_dim(), 80);
        assert_eq!(c.vision.rope_theta, 10000.0);
        assert_eq!(c.text.sizes.hidden_size, 1536);
        assert_eq!(c.text.sizes.num_hidden_layers, 28);
        assert_eq!(c.text.num_key_value_heads, 2);
        assert_eq!(c.text.sizes.head_dim(), 128);
        assert_eq!(c.text.rms_norm_eps, 1e-6);
        assert_eq!(c.text.rope_theta, 1_000_000.0);
        assert_eq!(c.text.mrope_section, [16, 24, 24]);
        assert_eq!(c.text.sizes.vocab_size, 151936);
        assert!(c.tie_word_embeddings);
        assert_eq!((c.image_token_id, c.vision_start_token_id, c.vision_end_token_id), (151655, 151652, 151653));
    }

    #[test]
    fn transformers_5_nested_form() {
        let c = Qwen2VlConfig::from_json(
            r#"{"model_type": "qwen2_vl", "image_token_id": 7, "vision_start_token_id": 5, "vision_end_token_id": 6,
                "tie_word_embeddings": false,
                "text_config": {"vocab_size": 10, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
                "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2,
                  "in_channels": 3, "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}}"#,
        )
        .unwrap();
        assert_eq!(c.text.mrope_section, [2, 3, 3]);
        assert_eq!(c.text.rope_theta, 10000.0);
        assert_eq!(c.vision.mlp_hidden(), 64);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn bad_values_name_the_key() {
        let bad = QWEN2_VL_2B.replace("\"mrope_section\": [\n      16,", "\"mrope_section\": [\n      15,");
        let e = Qwen2VlConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("mrope_section") && e.contains("head_dim / 2 = 64"), "{e}");
        let bad = QWEN2_VL_2B.replace("\"type\": \"mrope\"", "\"type\": \"yarn\"");
        let e = Qwen2VlConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("config.json: rope_scaling") && e.contains("\"yarn\" is not supported"), "{e}");
        let bad = QWEN2_VL_2B.replace("\"use_sliding_window\": false", "\"use_sliding_window\": true");
        assert!(Qwen2VlConfig::from_json(&bad).unwrap_err().to_string().contains("use_sliding_window"));
        let e = Qwen2VlConfig::from_json("[1]").unwrap_err().to_string();
        assert!(e.contains("expected a JSON object"), "{e}");
    }

    #[test]
    fn qwen2_5_vl_hub_config() {
        let c = Qwen2VlConfig::from_json(include_str!("../tests/qwen2.5-vl-7b.config.json")).unwrap();
        assert_eq!(c.variant, Variant::Qwen25Vl);
        let (v, w) = (&c.vision, c.window.as_ref().unwrap());
        assert_eq!((v.depth, v.embed_dim, v.hidden_size, v.num_heads, v.head_dim()), (32, 1280, 3584, 16, 80));
        assert_eq!((v.hidden_act.as_str(), v.patch_dim(), v.rope_theta), ("silu", 1176, 10000.0));
        assert_eq!((w.intermediate_size, w.window_size, w.merged_window(v)), (3420, 112, 4));
        assert_eq!(w.fullatt_block_indexes, [7, 15, 23, 31]);
        assert_eq!((c.text.sizes.hidden_size, c.text.sizes.num_hidden_layers, c.text.num_key_value_heads), (3584, 28, 4));
        assert_eq!((c.text.rope_theta, c.text.mrope_section.as_slice()), (1_000_000.0, &[16, 24, 24][..]));
        assert!(!c.tie_word_embeddings);
        let c = Qwen2VlConfig::from_json(include_str!("../tests/qwen2.5-vl-3b.config.json")).unwrap();
        assert_eq!((c.vision.hidden_size, c.text.sizes.num_hidden_layers, c.tie_word_embeddings), (2048, 36, true));
        // Qwen2-VL's config stays Qwen2-VL's.
        assert_eq!(Qwen2VlConfig::from_json(QWEN2_VL_2B).unwrap().variant, Variant::Qwen2Vl);
    }

    #[test]
    fn qwen2_5_vl_bad_values_name_their_key() {
        let text = include_str!("../tests/qwen2.5-vl-7b.config.json");
        let e = Qwen2VlConfig::from_json(&text.replace("\"window_size\": 112", "\"window_size\": 14")).unwrap_err().to_string();
        assert!(e.contains("vision_config.window_size") && e.contains("less than one merged token"), "{e}");
        let e = Qwen2VlConfig::from_json(&text.replace("\"out_hidden_size\": 3584", "\"out_hidden_size\": 2048")).unwrap_err().to_string();
        assert!(e.contains("vision_config.out_hidden_size") && e.contains("must equal the LLM's hidden_size"), "{e}");
    }
}
