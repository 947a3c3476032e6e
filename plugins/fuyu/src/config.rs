//! `config.json` of a Fuyu checkpoint, in both forms transformers reads
//! (transformers 5.23 `models/fuyu/configuration_fuyu.py` and
//! `models/persimmon/configuration_persimmon.py`):
//!
//! * **flat** (the hub's `adept/fuyu-8b`, written by transformers 4.x): the
//!   Persimmon keys at top level, with `FuyuConfig`'s defaults for the ones
//!   missing (the fuyu-8b values) and `rope_theta` defaulting to 10000.
//!   transformers takes `partial_rotary_factor` as 0.5 whatever the flat key says
//!   (`text_config.setdefault("partial_rotary_factor", 0.5)` on a dict that never
//!   holds it); a flat value other than 0.5 is refused rather than ignored.
//! * **nested** (transformers 5's `save_pretrained`): `text_config` with
//!   `PersimmonConfig`'s defaults and a `rope_parameters` dict.

use serde_json::Value;
use std::path::Path;
use vlmhost_plugin_api::PluginError;
use vlmhost_plugin_sdk::config_struct;
use vlmhost_plugin_sdk::files::{
    check_activations, check_sizes, config_error as invalid, config_section, object, parse_config, read_config_text, rope_kind,
    TextDefaults, TextSizes,
};

config_struct! {
    /// The Persimmon language model (`PersimmonConfig`, whose defaults are the fuyu-8b values).
    #[derive(Debug, Clone, PartialEq)]
    pub struct TextConfig {
        #[serde(flatten, deserialize_with = "TextSizes::deserialize_for::<TextConfig, _>")]
        pub sizes: TextSizes = Self::SIZES,
        pub hidden_act: String = "relu2".into(),
        pub layer_norm_eps: f64 = 1e-5,
        pub qk_layernorm: bool = true,
        pub hidden_dropout: f64 = 0.0,
        pub attention_dropout: f64 = 0.0,
        pub rope_theta: f64 = 10000.0,
        pub partial_rotary_factor: f64 = 0.5,
        /// transformers 5's RoPE settings (`rope_theta`, `partial_rotary_factor`); read into the fields above.
        #[serde(skip_serializing)]
        pub rope_parameters: Option<Value> = None,
        /// Refused unless the default RoPE.
        #[serde(skip_serializing)]
        pub rope_scaling: Option<Value> = None,
    }
}

impl TextDefaults for TextConfig {
    /// `PersimmonConfig`'s vocabulary, widths, depth and heads (fuyu-8b's).
    const SIZES: TextSizes = TextSizes::new(262144, 4096, 16384, 36, 64);
}

impl TextConfig {
    /// Rotary dimensions per head: `int(head_dim * partial_rotary_factor)`.
    pub fn rotary_dim(&self) -> i64 {
        (self.sizes.head_dim() as f64 * self.partial_rotary_factor) as i64
    }
}

config_struct! {
    /// The top-level keys of `config.json` besides the language model's.
    struct Top {
        patch_size: i64 = 30,
        num_channels: i64 = 3,
        image_token_id: i64 = 71011,
        tie_word_embeddings: Option<bool> = None,
    }
}

/// The whole `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct FuyuConfig {
    pub text: TextConfig,
    pub patch_size: i64,
    pub num_channels: i64,
    /// `|SPEAKER|`, the token each image patch replaces.
    pub image_token_id: i64,
    pub tie_word_embeddings: bool,
    /// Which form the file had (`flat` or `nested`), for messages.
    pub form: &'static str,
}

impl FuyuConfig {
    /// Input features of `vision_embed_tokens`: one flattened patch.
    pub fn patch_features(&self) -> i64 {
        self.patch_size * self.patch_size * self.num_channels
    }
}

/// Only the default (unscaled) RoPE exists in Persimmon checkpoints; refuse the rest.
fn check_rope_type(params: &Option<Value>, key: &str) -> Result<(), PluginError> {
    match params {
        Some(p) if rope_kind(p) != "default" => Err(invalid(
            key,
            format!("RoPE type {:?} is not supported by the fuyu plugin (only \"default\")", rope_kind(p)),
        )),
        _ => Ok(()),
    }
}

impl FuyuConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, PluginError> {
        Self::from_json(&read_config_text(dir)?)
    }

    pub fn from_json(text: &str) -> Result<Self, PluginError> {
        let v = parse_config(text)?;
        let nested = object(&v, "text_config").map_err(|m| invalid("text_config", m))?.is_object();
        let text = if nested { Self::nested_text(&v["text_config"])? } else { Self::flat_text(&v)? };
        let top: Top = config_section(&v, "")?;
        let text_tie = v.get("text_config").and_then(|t| t.get("tie_word_embeddings")).and_then(Value::as_bool);
        let cfg = FuyuConfig {
            text,
            patch_size: top.patch_size,
            num_channels: top.num_channels,
            image_token_id: top.image_token_id,
            tie_word_embeddings: top.tie_word_embeddings.or(text_tie).unwrap_or(false),
            form: if nested { "nested" } else { "flat" },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// transformers 5: `text_config` with `PersimmonConfig`'s defaults and a `rope_parameters` dict.
    fn nested_text(v: &Value) -> Result<TextConfig, PluginError> {
        let mut t: TextConfig = config_section(v, "text_config.")?;
        check_rope_type(&t.rope_parameters, "text_config.rope_parameters")?;
        check_rope_type(&t.rope_scaling, "text_config.rope_scaling")?;
        if let Some(p) = &t.rope_parameters {
            let number = |key: &str, default: f64| match p.get(key).filter(|x| !x.is_null()) {
                None => Ok(default),
                Some(x) => x.as_f64().ok_or_else(|| invalid(&format!("text_config.rope_parameters.{key}"), format!("expected a number, got {x}"))),
            };
            t.rope_theta = number("rope_theta", t.rope_theta)?;
            t.partial_rotary_factor = number("partial_rotary_factor", t.partial_rotary_factor)?;
        }
        Ok(t)
    }

    /// The hub form: Persimmon keys at top level, `FuyuConfig`'s sub-config defaults.
    fn flat_text(v: &Value) -> Result<TextConfig, PluginError> {
        let mut t: TextConfig = config_section(v, "")?;
        check_rope_type(&t.rope_scaling, "rope_scaling")?;
        if t.partial_rotary_factor != 0.5 {
            return Err(PluginError::invalid_with_hint(
                "config.json: partial_rotary_factor",
                format!("{} in a flat (hub-form) config, which transformers ignores (it always uses 0.5 there)", t.partial_rotary_factor),
                "put the value in text_config.rope_parameters.partial_rotary_factor (transformers 5's form), or remove it",
            ));
        }
        t.rope_parameters = None;
        Ok(t)
    }

    fn validate(&self) -> Result<(), PluginError> {
        let t = &self.text;
        let p = if self.form == "nested" { "text_config." } else { "" };
        check_activations(&[(&format!("{p}hidden_act"), &t.hidden_act)])?;
        check_sizes(p, &t.sizes.named())?;
        check_sizes("", &[("patch_size", self.patch_size), ("num_channels", self.num_channels)])?;
        let TextSizes { hidden_size, num_attention_heads, vocab_size, .. } = t.sizes;
        if hidden_size % num_attention_heads != 0 {
            return Err(invalid(&format!("{p}hidden_size"), format!("{hidden_size} is not divisible by num_attention_heads {num_attention_heads}")));
        }
        let rd = t.rotary_dim();
        if !(0.0..=1.0).contains(&t.partial_rotary_factor) || rd % 2 != 0 {
            return Err(invalid(
                &format!("{p}partial_rotary_factor"),
                format!("{} gives {rd} rotary dimensions of {}; need an even number within the head", t.partial_rotary_factor, t.sizes.head_dim()),
            ));
        }
        if self.image_token_id < 0 || self.image_token_id >= vocab_size {
            return Err(invalid("image_token_id", format!("{} is outside the vocabulary ({vocab_size})", self.image_token_id)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FUYU_8B: &str = include_str!("../tests/fuyu-8b.config.json");

    #[test]
    fn the_hub_config_is_flat() {
        let c = FuyuConfig::from_json(FUYU_8B).unwrap();
        assert_eq!(c.form, "flat");
        let t = &c.text;
        assert_eq!(t.sizes, TextSizes::new(262144, 4096, 16384, 36, 64));
        assert_eq!((t.sizes.head_dim(), t.rotary_dim()), (64, 32));
        assert_eq!(t.rope_theta, 25000.0);
        assert!(t.qk_layernorm);
        assert_eq!(c.patch_features(), 2700);
        assert_eq!(c.image_token_id, 71011);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn nested_config_reads_rope_parameters() {
        let c = FuyuConfig::from_json(
            r#"{"image_token_id": 4, "text_config": {"vocab_size": 10, "hidden_size": 64, "num_attention_heads": 4,
                "rope_parameters": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.25}}}"#,
        )
        .unwrap();
        assert_eq!((c.form, c.text.rope_theta, c.text.rotary_dim()), ("nested", 25000.0, 4));
        assert_eq!(c.text.sizes.num_hidden_layers, 36);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = FuyuConfig::from_json(r#"{"text_config": {"rope_parameters": {"rope_type": "yarn"}}}"#).unwrap_err();
        assert!(e.to_string().contains("config.json: text_config.rope_parameters: RoPE type \"yarn\""), "{e}");
        let e = FuyuConfig::from_json(r#"{"partial_rotary_factor": 0.25}"#).unwrap_err();
        assert!(e.to_string().contains("transformers ignores"), "{e}");
        let e = FuyuConfig::from_json(r#"{"hidden_size": "big"}"#).unwrap_err();
        assert!(e.to_string().contains("config.json: hidden_size: invalid type: string \"big\", expected i64"), "{e}");
        let e = FuyuConfig::from_json(r#"{"image_token_id": 300000}"#).unwrap_err();
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    }
}
