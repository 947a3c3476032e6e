//! `config.json` of a LLaVA checkpoint, in both forms: the hub's (llava-hf,
//! transformers 4.x: `rope_theta`, partial sub-configs relying on defaults) and
//! transformers 5's (`rope_parameters`, complete sub-configs). Defaults are those
//! of transformers' `LlavaConfig`, `CLIPVisionConfig` and `LlamaConfig`
//! (transformers 5.23, `models/llava/configuration_llava.py`,
//! `models/clip/configuration_clip.py`, `models/llama/configuration_llama.py`).

use serde_json::Value;
use std::path::Path;
use vlmhost_plugin_api::PluginError;
use vlmhost_plugin_sdk::config_struct;
use vlmhost_plugin_sdk::files::{
    check_activations, check_sizes, config_error as invalid, config_section, object, parse_config, read_config_text, rope_kind,
    TextDefaults, TextSizes,
};

config_struct! {
    /// The CLIP vision tower.
    #[derive(Debug, Clone)]
    pub struct VisionConfig {
        pub hidden_size: i64 = 768,
        pub intermediate_size: i64 = 3072,
        pub num_hidden_layers: i64 = 12,
        pub num_attention_heads: i64 = 12,
        pub num_channels: i64 = 3,
        pub image_size: i64 = 224,
        pub patch_size: i64 = 32,
        pub hidden_act: String = "quick_gelu".into(),
        pub layer_norm_eps: f64 = 1e-5,
    }
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
    /// Positions: patches plus the class token.
    pub fn num_positions(&self) -> i64 {
        self.grid() * self.grid() + 1
    }
}

config_struct! {
    /// The Llama language model.
    #[derive(Debug, Clone)]
    pub struct TextConfig {
        #[serde(flatten, deserialize_with = "TextSizes::deserialize_for::<TextConfig, _>")]
        pub sizes: TextSizes = Self::SIZES,
        pub num_key_value_heads: Option<i64> = None,
        pub head_dim: Option<i64> = None,
        pub hidden_act: String = "silu".into(),
        pub rms_norm_eps: f64 = 1e-6,
        pub rope_theta: Option<f64> = None,
        pub rope_parameters: Option<Value> = None,
        pub rope_scaling: Option<Value> = None,
        pub attention_bias: bool = false,
        pub mlp_bias: bool = false,
        pub tie_word_embeddings: Option<bool> = None,
        pub pad_token_id: Option<i64> = None,
    }
}

impl TextDefaults for TextConfig {
    /// `LlamaConfig`'s vocabulary, widths, depth and heads.
    const SIZES: TextSizes = TextSizes::new(32000, 4096, 11008, 32, 32);
}

impl TextConfig {
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.sizes.num_attention_heads)
    }
    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.sizes.head_dim())
    }
}

/// The whole `config.json`.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub image_token_index: i64,
    pub projector_hidden_act: String,
    /// Indices into the vision tower's hidden states (negative from the end).
    pub vision_feature_layers: Vec<i64>,
    /// `default` (drop the class token) or `full`.
    pub vision_feature_select_strategy: String,
    pub multimodal_projector_bias: bool,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
}

impl LlavaConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, PluginError> {
        Self::from_json(&read_config_text(dir)?)
    }

    pub fn from_json(text: &str) -> Result<Self, PluginError> {
        let v = parse_config(text)?;
        let section = |key: &str| object(&v, key).map_err(|m| invalid(key, m));
        let vision: VisionConfig = config_section(section("vision_config")?, "vision_config.")?;
        let text_cfg: TextConfig = config_section(section("text_config")?, "text_config.")?;
        let get_i = |k: &str| v.get(k).and_then(Value::as_i64);
        let get_s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let image_token_index = get_i("image_token_index").or_else(|| get_i("image_token_id")).unwrap_or(32000);
        let vision_feature_layers = match v.get("vision_feature_layer") {
            None => vec![-2],
            Some(Value::Number(n)) => vec![n.as_i64().ok_or_else(|| invalid("vision_feature_layer", "not an integer"))?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_i64().ok_or_else(|| invalid("vision_feature_layer", "not a list of integers")))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(invalid("vision_feature_layer", format!("unexpected value {other}"))),
        };
        let strategy = get_s("vision_feature_select_strategy").unwrap_or_else(|| "default".into());
        if strategy != "default" && strategy != "full" {
            return Err(invalid("vision_feature_select_strategy", format!("{strategy:?} is neither \"default\" nor \"full\"")));
        }
        let rope_theta = rope_theta(&text_cfg)?;
        let tie = v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .or(text_cfg.tie_word_embeddings)
            .unwrap_or(false);
        let cfg = LlavaConfig {
            projector_hidden_act: get_s("projector_hidden_act").unwrap_or_else(|| "gelu".into()),
            multimodal_projector_bias: v.get("multimodal_projector_bias").and_then(Value::as_bool).unwrap_or(true),
            vision,
            text: text_cfg,
            image_token_index,
            vision_feature_layers,
            vision_feature_select_strategy: strategy,
            tie_word_embeddings: tie,
            rope_theta,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), PluginError> {
        check_activations(&[
            ("vision_config.hidden_act", &self.vision.hidden_act),
            ("text_config.hidden_act", &self.text.hidden_act),
            ("projector_hidden_act", &self.projector_hidden_act),
        ])?;
        let (v, t) = (&self.vision, &self.text);
        check_sizes("", &[
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_channels", v.num_channels),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
        ])?;
        check_sizes("text_config.", &t.sizes.named())?;
        check_sizes("text_config.", &[("num_key_value_heads", t.kv_heads())])?;
        let n = self.vision.num_hidden_layers;
        for &l in &self.vision_feature_layers {
            if l < -(n + 1) || l > n {
                return Err(invalid("vision_feature_layer", format!("{l} is out of range for {n} vision layers")));
            }
        }
        if self.vision.hidden_size % self.vision.num_attention_heads != 0 {
            return Err(invalid("vision_config.hidden_size", "not divisible by num_attention_heads"));
        }
        if t.sizes.num_attention_heads % t.kv_heads() != 0 {
            return Err(invalid("text_config.num_key_value_heads", "must divide num_attention_heads"));
        }
        if self.image_token_index < 0 || self.image_token_index >= t.sizes.vocab_size {
            return Err(invalid("image_token_index", format!("{} is outside the vocabulary ({})", self.image_token_index, t.sizes.vocab_size)));
        }
        Ok(())
    }

    /// Index (into hidden states 0..=n) of a feature layer.
    pub fn hidden_state_index(&self, layer: i64) -> usize {
        let n = self.vision.num_hidden_layers + 1;
        (if layer < 0 { n + layer } else { layer }) as usize
    }
}

/// The RoPE base, from `rope_parameters` (transformers 5) or `rope_theta`;
/// only the default (unscaled) RoPE is supported.
fn rope_theta(t: &TextConfig) -> Result<f64, PluginError> {
    let mut theta = t.rope_theta.unwrap_or(10000.0);
    for (key, params) in [("rope_parameters", &t.rope_parameters), ("rope_scaling", &t.rope_scaling)] {
        let Some(p) = params.as_ref().filter(|p| !p.is_null()) else { continue };
        let kind = rope_kind(p);
        if kind != "default" {
            return Err(invalid(
                &format!("text_config.{key}"),
                format!("RoPE type {kind:?} is not supported by the llava plugin (only \"default\")"),
            ));
        }
        if let Some(th) = p.get("rope_theta").and_then(Value::as_f64) {
            theta = th;
        }
    }
    Ok(theta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public llava-hf/llava-1.5-7b-hf config.json (hub form).
    pub const LLAVA_15_7B: &str = include_str!("../tests/llava-1.5-7b-hf.config.json");

    #[test]
    fn hub_config_uses_defaults() {
        let c = LlavaConfig::from_json(LLAVA_15_7B).unwrap();
        assert_eq!(c.vision.hidden_size, 1024);
        assert_eq!(c.vision.grid(), 24);
        assert_eq!(c.vision.hidden_act, "quick_gelu");
        assert_eq!(c.text.sizes.hidden_size, 4096);
        assert_eq!(c.text.sizes.vocab_size, 32064);
        assert_eq!(c.text.kv_heads(), 32);
        assert_eq!(c.image_token_index, 32000);
        assert_eq!(c.vision_feature_layers, [-2]);
        assert_eq!(c.hidden_state_index(-2), 23);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = LlavaConfig::from_json(r#"{"vision_feature_select_strategy": "cls"}"#).unwrap_err();
        assert!(e.to_string().contains("config.json: vision_feature_select_strategy"), "{e}");
        let e = LlavaConfig::from_json(r#"{"text_config": {"rope_parameters": {"rope_type": "yarn"}}}"#).unwrap_err();
        assert!(e.to_string().contains("\"yarn\" is not supported"), "{e}");
    }
}
