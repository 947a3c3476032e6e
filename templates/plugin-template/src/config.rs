//! `config.json` of a toy_vlm checkpoint. The structs mirror the JSON, with
//! serde defaults for every key, as transformers' config classes do: a real
//! family's config.rs names the transformers file (and version) it follows.
//!
//! ```json
//! {
//!   "model_type": "toy_vlm",
//!   "architectures": ["ToyVlmForConditionalGeneration"],
//!   "image_token_id": 300,
//!   "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, ...},
//!   "text_config": {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, ...}
//! }
//! ```

use serde::Deserialize;
use std::path::Path;
use vlmhost_plugin_api::PluginError;

/// The vision encoder: a Linear patch embedding and pre-norm ViT blocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            image_size: 32,
            patch_size: 8,
            num_channels: 3,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
    /// Patches (and so image tokens) per image.
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }
    /// Values in one flattened patch (`channels * patch * patch`).
    pub fn patch_dim(&self) -> i64 {
        self.num_channels * self.patch_size * self.patch_size
    }
}

/// The language model: Llama-style (RMSNorm, RoPE, SwiGLU, grouped-query attention).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub hidden_act: String,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            hidden_act: "silu".into(),
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
        }
    }
}

impl TextConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// The whole `config.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ToyConfig {
    pub model_type: String,
    pub image_token_id: i64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
    pub vision_config: VisionConfig,
    pub text_config: TextConfig,
}

impl Default for ToyConfig {
    fn default() -> Self {
        ToyConfig {
            model_type: "toy_vlm".into(),
            image_token_id: 300,
            bos_token_id: 0,
            eos_token_id: 1,
            vision_config: VisionConfig::default(),
            text_config: TextConfig::default(),
        }
    }
}

impl ToyConfig {
    /// Read and check `dir/config.json`. Every error names the file and the
    /// key, and says what to do: the host shows it as it is.
    pub fn from_dir(dir: &Path) -> Result<Self, PluginError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| PluginError::Io { path: path.display().to_string().into(), message: e.to_string().into() })?;
        let config: ToyConfig = serde_json::from_str(&text)
            .map_err(|e| PluginError::invalid(path.display().to_string(), format!("not a toy_vlm config: {e}")))?;
        config.check().map_err(|(key, message)| {
            PluginError::invalid_with_hint(
                format!("{} ({key})", path.display()),
                message,
                "fix config.json, or make a new checkpoint with `vlmhost init --plugin toy_vlm`",
            )
        })?;
        Ok(config)
    }

    /// The constraints the model code relies on: (key, what is wrong).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let (v, t) = (&self.vision_config, &self.text_config);
        // Positive, and within the sanity limits (a million layers is a typo, not a model).
        vlmhost_plugin_api::limits::check_sizes(&[
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.num_channels", v.num_channels),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
        ])?;
        if v.image_size % v.patch_size != 0 {
            return Err(("vision_config.patch_size", format!("{} does not divide image_size {}", v.patch_size, v.image_size)));
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return Err(("vision_config.num_attention_heads", format!("{} does not divide hidden_size {}", v.num_attention_heads, v.hidden_size)));
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return Err(("text_config.num_attention_heads", format!("{} does not divide hidden_size {}", t.num_attention_heads, t.hidden_size)));
        }
        if t.num_attention_heads % t.num_key_value_heads != 0 {
            return Err((
                "text_config.num_key_value_heads",
                format!("{} does not divide num_attention_heads {}", t.num_key_value_heads, t.num_attention_heads),
            ));
        }
        if t.head_dim() % 2 != 0 {
            return Err(("text_config.hidden_size", format!("head size {} is odd; RoPE needs an even one", t.head_dim())));
        }
        for (key, id) in [("image_token_id", self.image_token_id), ("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if id < 0 || id >= t.vocab_size {
                return Err((key, format!("{id} is outside the vocabulary of {} tokens", t.vocab_size)));
            }
        }
        // The byte tokenizer's ids (see processor/tokens.rs) must fit too.
        if t.vocab_size < crate::processor::MIN_VOCAB {
            return Err(("text_config.vocab_size", format!("{} is below the byte tokenizer's {}", t.vocab_size, crate::processor::MIN_VOCAB)));
        }
        for act in [&v.hidden_act, &t.hidden_act] {
            if !vlmhost_plugin_api::ops::known_activation(act) {
                return Err(("hidden_act", format!("unknown activation {act:?}")));
            }
        }
        Ok(())
    }
}
