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

/// The Persimmon language model.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub qk_layernorm: bool,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
}

impl TextConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
    /// Rotary dimensions per head: `int(head_dim * partial_rotary_factor)`.
    pub fn rotary_dim(&self) -> i64 {
        (self.head_dim() as f64 * self.partial_rotary_factor) as i64
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

fn invalid(key: &str, message: impl Into<String>) -> PluginError {
    PluginError::invalid(format!("config.json: {key}"), message)
}

/// Typed reads from one JSON object, naming `prefix.key` in errors.
struct Obj<'a> {
    v: &'a Value,
    prefix: &'static str,
}

impl Obj<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }
    fn get(&self, k: &str) -> Option<&Value> {
        self.v.get(k).filter(|x| !x.is_null())
    }
    fn i64(&self, k: &str, default: i64) -> Result<i64, PluginError> {
        match self.get(k) {
            None => Ok(default),
            Some(x) => x.as_i64().ok_or_else(|| invalid(&self.key(k), format!("expected an integer, got {x}"))),
        }
    }
    fn f64(&self, k: &str, default: f64) -> Result<f64, PluginError> {
        match self.get(k) {
            None => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| invalid(&self.key(k), format!("expected a number, got {x}"))),
        }
    }
    fn bool(&self, k: &str, default: bool) -> Result<bool, PluginError> {
        match self.get(k) {
            None => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| invalid(&self.key(k), format!("expected true or false, got {x}"))),
        }
    }
    fn string(&self, k: &str, default: &str) -> Result<String, PluginError> {
        match self.get(k) {
            None => Ok(default.to_owned()),
            Some(x) => x.as_str().map(str::to_owned).ok_or_else(|| invalid(&self.key(k), format!("expected a string, got {x}"))),
        }
    }
}

/// Only the default (unscaled) RoPE exists in Persimmon checkpoints; refuse the rest.
fn check_rope_type(o: &Obj<'_>, key: &str) -> Result<(), PluginError> {
    let Some(p) = o.get(key) else { return Ok(()) };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    if kind != "default" {
        return Err(invalid(&o.key(key), format!("RoPE type {kind:?} is not supported by the fuyu plugin (only \"default\")")));
    }
    Ok(())
}

impl FuyuConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, PluginError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| PluginError::Io { path: path.display().to_string().into(), message: e.to_string().into() })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, PluginError> {
        let v: Value = serde_json::from_str(text).map_err(|e| invalid("", format!("not valid JSON: {e}")))?;
        let top = Obj { v: &v, prefix: "" };
        let text = match top.get("text_config") {
            Some(tc) => Self::nested_text(&Obj { v: tc, prefix: "text_config." })?,
            None => Self::flat_text(&top)?,
        };
        let form = if top.get("text_config").is_some() { "nested" } else { "flat" };
        let tie = match top.get("tie_word_embeddings") {
            Some(_) => top.bool("tie_word_embeddings", false)?,
            None => match v.get("text_config") {
                Some(tc) => Obj { v: tc, prefix: "text_config." }.bool("tie_word_embeddings", false)?,
                None => false,
            },
        };
        let cfg = FuyuConfig {
            text,
            patch_size: top.i64("patch_size", 30)?,
            num_channels: top.i64("num_channels", 3)?,
            image_token_id: top.i64("image_token_id", 71011)?,
            tie_word_embeddings: tie,
            form,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// transformers 5: `text_config` with `PersimmonConfig`'s defaults.
    fn nested_text(o: &Obj<'_>) -> Result<TextConfig, PluginError> {
        check_rope_type(o, "rope_parameters")?;
        check_rope_type(o, "rope_scaling")?;
        let rope = o.get("rope_parameters").cloned().unwrap_or(Value::Null);
        let rope = Obj { v: &rope, prefix: "text_config.rope_parameters." };
        Ok(TextConfig {
            vocab_size: o.i64("vocab_size", 262144)?,
            hidden_size: o.i64("hidden_size", 4096)?,
            intermediate_size: o.i64("intermediate_size", 16384)?,
            num_hidden_layers: o.i64("num_hidden_layers", 36)?,
            num_attention_heads: o.i64("num_attention_heads", 64)?,
            hidden_act: o.string("hidden_act", "relu2")?,
            layer_norm_eps: o.f64("layer_norm_eps", 1e-5)?,
            qk_layernorm: o.bool("qk_layernorm", true)?,
            hidden_dropout: o.f64("hidden_dropout", 0.0)?,
            attention_dropout: o.f64("attention_dropout", 0.0)?,
            rope_theta: rope.f64("rope_theta", o.f64("rope_theta", 10000.0)?)?,
            partial_rotary_factor: rope.f64("partial_rotary_factor", o.f64("partial_rotary_factor", 0.5)?)?,
        })
    }

    /// The hub form: Persimmon keys at top level, `FuyuConfig`'s sub-config defaults.
    fn flat_text(o: &Obj<'_>) -> Result<TextConfig, PluginError> {
        check_rope_type(o, "rope_scaling")?;
        let prf = o.f64("partial_rotary_factor", 0.5)?;
        if prf != 0.5 {
            return Err(PluginError::invalid_with_hint(
                "config.json: partial_rotary_factor",
                format!("{prf} in a flat (hub-form) config, which transformers ignores (it always uses 0.5 there)"),
                "put the value in text_config.rope_parameters.partial_rotary_factor (transformers 5's form), or remove it",
            ));
        }
        Ok(TextConfig {
            vocab_size: o.i64("vocab_size", 262144)?,
            hidden_size: o.i64("hidden_size", 4096)?,
            intermediate_size: o.i64("intermediate_size", 16384)?,
            num_hidden_layers: o.i64("num_hidden_layers", 36)?,
            num_attention_heads: o.i64("num_attention_heads", 64)?,
            hidden_act: o.string("hidden_act", "relu2")?,
            layer_norm_eps: o.f64("layer_norm_eps", 1e-5)?,
            qk_layernorm: o.bool("qk_layernorm", true)?,
            hidden_dropout: o.f64("hidden_dropout", 0.0)?,
            attention_dropout: o.f64("attention_dropout", 0.0)?,
            rope_theta: o.f64("rope_theta", 10000.0)?,
            partial_rotary_factor: 0.5,
        })
    }

    fn validate(&self) -> Result<(), PluginError> {
        let t = &self.text;
        let p = if self.form == "nested" { "text_config." } else { "" };
        if !vlmhost_plugin_api::ops::known_activation(&t.hidden_act) {
            return Err(invalid(&format!("{p}hidden_act"), format!("activation {:?} is not supported", t.hidden_act)));
        }
        vlmhost_plugin_api::limits::check_sizes(&[
            ("vocab_size", t.vocab_size),
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
        ])
        .map_err(|(k, m)| invalid(&format!("{p}{k}"), m))?;
        vlmhost_plugin_api::limits::check_sizes(&[("patch_size", self.patch_size), ("num_channels", self.num_channels)])
            .map_err(|(k, m)| invalid(k, m))?;
        if t.hidden_size % t.num_attention_heads != 0 {
            return Err(invalid(&format!("{p}hidden_size"), format!("{} is not divisible by num_attention_heads {}", t.hidden_size, t.num_attention_heads)));
        }
        let rd = t.rotary_dim();
        if !(0.0..=1.0).contains(&t.partial_rotary_factor) || rd % 2 != 0 {
            return Err(invalid(
                &format!("{p}partial_rotary_factor"),
                format!("{} gives {rd} rotary dimensions of {}; need an even number within the head", t.partial_rotary_factor, t.head_dim()),
            ));
        }
        if self.image_token_id < 0 || self.image_token_id >= t.vocab_size {
            return Err(invalid("image_token_id", format!("{} is outside the vocabulary ({})", self.image_token_id, t.vocab_size)));
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
        assert_eq!((t.vocab_size, t.hidden_size, t.intermediate_size), (262144, 4096, 16384));
        assert_eq!((t.num_hidden_layers, t.num_attention_heads, t.head_dim(), t.rotary_dim()), (36, 64, 64, 32));
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
        assert_eq!(c.text.num_hidden_layers, 36);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = FuyuConfig::from_json(r#"{"text_config": {"rope_parameters": {"rope_type": "yarn"}}}"#).unwrap_err();
        assert!(e.to_string().contains("config.json: text_config.rope_parameters: RoPE type \"yarn\""), "{e}");
        let e = FuyuConfig::from_json(r#"{"partial_rotary_factor": 0.25}"#).unwrap_err();
        assert!(e.to_string().contains("transformers ignores"), "{e}");
        let e = FuyuConfig::from_json(r#"{"hidden_size": "big"}"#).unwrap_err();
        assert!(e.to_string().contains("config.json: hidden_size: expected an integer"), "{e}");
        let e = FuyuConfig::from_json(r#"{"image_token_id": 300000}"#).unwrap_err();
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    }
}
