//! Reading a checkpoint's JSON files (`config.json`, `preprocessor_config.json`,
//! `tokenizer_config.json`, ...) into serde structs that mirror them.
//!
//! Hugging Face files write `null` for "not set" and sometimes `4.0` for an
//! integer; [`normalise`] turns the first into an absent key (so the struct's
//! default applies) and the second into an integer, before serde sees them.
//! Errors name the file and the key ([`from_value`]).

use crate::ProcessorError;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use std::path::Path;
use vlmhost_plugin_api::PluginError;

/// `value` with `null` entries of objects dropped and integral floats made
/// integers, at every depth.
pub fn normalise(value: &Value) -> Value {
    match value {
        Value::Object(m) => {
            Value::Object(m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), normalise(v))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        Value::Number(n) if n.is_f64() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => value.clone(),
        },
        other => other.clone(),
    }
}

/// `value` (an object, normalised; `null` is the empty object) as `T`, whose
/// fields all have defaults (`#[serde(default)]`). An error is `(key,
/// message)`: the first key whose value `T` refuses, with serde's words, or
/// `("", message)`.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, (String, String)> {
    let value = if value.is_null() { Value::Object(Map::new()) } else { normalise(value) };
    serde_json::from_value(value.clone()).map_err(|e| {
        let key = value.as_object().and_then(|m| {
            m.iter().find_map(|(k, v)| {
                let one = Value::Object(Map::from_iter([(k.clone(), v.clone())]));
                serde_json::from_value::<T>(one).err().map(|_| k.clone())
            })
        });
        (key.unwrap_or_default(), e.to_string())
    })
}

/// The sub-object `key` of `value` (`null` when absent or null, which
/// [`from_value`] reads as the empty object); an error when it is something else.
pub fn object<'a>(value: &'a Value, key: &str) -> Result<&'a Value, String> {
    static EMPTY: Value = Value::Null;
    match value.get(key) {
        None | Some(Value::Null) => Ok(&EMPTY),
        Some(v @ Value::Object(_)) => Ok(v),
        Some(other) => Err(format!("expected an object, got {other}")),
    }
}

/// The JSON in `path`; errors name the file.
pub fn read_value(path: &Path) -> Result<Value, ProcessorError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProcessorError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| ProcessorError::Json { path: path.to_path_buf(), message: e.to_string() })
}

/// The JSON in `path` as `T`; errors name the file (and the key).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ProcessorError> {
    let value = read_value(path)?;
    from_value(&value).map_err(|(key, reason)| ProcessorError::ImageConfigInvalid {
        path: path.to_path_buf(),
        reason: if key.is_empty() { reason } else { format!("`{key}`: {reason}") },
    })
}

/// [`read_json`] of `path` when the file exists, else `T::default()`.
pub fn read_json_or_default<T: DeserializeOwned + Default>(path: &Path) -> Result<T, ProcessorError> {
    if path.is_file() {
        read_json(path)
    } else {
        Ok(T::default())
    }
}

/// The text of a model folder's `config.json`; an error names the file.
pub fn read_config_text(dir: &Path) -> Result<String, PluginError> {
    let path = dir.join("config.json");
    std::fs::read_to_string(&path).map_err(|e| PluginError::Io {
        path: path.display().to_string().into(),
        message: format!("{e} (the model folder needs the checkpoint's config.json)").into(),
    })
}

/// The error for `config.json` key `key`.
pub fn config_error(key: &str, message: impl Into<String>) -> PluginError {
    PluginError::invalid(format!("config.json: {key}"), message)
}

/// `config.json`'s `text` parsed as JSON; an error says it is not.
pub fn parse_config(text: &str) -> Result<Value, PluginError> {
    serde_json::from_str(text).map_err(|e| config_error("", format!("not valid JSON: {e}")))
}

/// Sub-config `value` of `config.json` (under `prefix`, `"text_config."` say) as `T`;
/// an error names the key.
pub fn config_section<T: DeserializeOwned>(value: &Value, prefix: &str) -> Result<T, PluginError> {
    from_value(value).map_err(|(key, m)| config_error(&format!("{prefix}{key}").trim_end_matches('.').to_owned(), m))
}

/// Check sizes of `config.json` against the sanity limits, naming the key.
pub fn check_sizes(prefix: &str, sizes: &[(&str, i64)]) -> Result<(), PluginError> {
    vlmhost_plugin_api::limits::check_sizes(sizes).map_err(|(key, m)| config_error(&format!("{prefix}{key}"), m))
}

/// Refuse activation functions [`vlmhost_plugin_api::ops::activation`] does not know.
pub fn check_activations(acts: &[(&str, &str)]) -> Result<(), PluginError> {
    for &(key, act) in acts {
        if !vlmhost_plugin_api::ops::known_activation(act) {
            return Err(config_error(key, format!("activation {act:?} is not supported")));
        }
    }
    Ok(())
}

/// A struct mirroring a config section, each field written with its default
/// (`field: Type = default`): the struct as written (attributes and docs kept),
/// deserialized with serde's `default` so that the keys a file leaves out take
/// the config class's defaults, and its `Default`:
///
/// ```ignore
/// config_struct! {
///     /// The vision tower.
///     #[derive(Debug, Clone)]
///     pub struct VisionConfig {
///         pub hidden_size: i64 = 768,
///         pub hidden_act: String = "quick_gelu".into(),
///     }
/// }
/// ```
#[macro_export]
macro_rules! config_struct {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$field_attr:meta])* $field_vis:vis $field:ident : $ty:ty = $default:expr ),* $(,)?
        }
    ) => {
        $(#[$attr])*
        #[derive(::serde::Deserialize)]
        #[serde(default)]
        $vis struct $name {
            $( $(#[$field_attr])* $field_vis $field: $ty, )*
        }

        impl ::std::default::Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }
    };
}

/// The sizes every decoder-only language model's config gives under the same
/// keys (transformers' `LlamaConfig`, `Qwen2Config`, `PersimmonConfig`,
/// `DeepseekV2Config`): vocabulary, width, MLP width, depth and heads. A
/// family's text config flattens them in, with its config class's defaults
/// ([`TextDefaults`]) for the keys a file leaves out:
///
/// ```ignore
/// #[derive(Deserialize)]
/// #[serde(default)]
/// pub struct TextConfig {
///     #[serde(flatten, deserialize_with = "TextSizes::deserialize_for::<TextConfig, _>")]
///     pub sizes: TextSizes,
///     // the family's own keys
/// }
///
/// impl TextDefaults for TextConfig {
///     const SIZES: TextSizes = TextSizes::new(32000, 4096, 11008, 32, 32);
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextSizes {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
}

impl TextSizes {
    /// The sizes, in the order of their fields.
    pub const fn new(vocab_size: i64, hidden_size: i64, intermediate_size: i64, num_hidden_layers: i64, num_attention_heads: i64) -> Self {
        TextSizes { vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads }
    }

    /// The sizes among the keys `deserializer` gives, `C::SIZES` for those
    /// absent (the `deserialize_with` of a flattened `sizes`); a present key
    /// must be an integer (serde's error otherwise).
    pub fn deserialize_for<'de, C: TextDefaults, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let defaults = C::SIZES;
        let keys = Map::<String, Value>::deserialize(deserializer)?;
        let size = |key: &str, default: i64| keys.get(key).map_or(Ok(default), |v| i64::deserialize(v).map_err(D::Error::custom));
        Ok(TextSizes {
            vocab_size: size("vocab_size", defaults.vocab_size)?,
            hidden_size: size("hidden_size", defaults.hidden_size)?,
            intermediate_size: size("intermediate_size", defaults.intermediate_size)?,
            num_hidden_layers: size("num_hidden_layers", defaults.num_hidden_layers)?,
            num_attention_heads: size("num_attention_heads", defaults.num_attention_heads)?,
        })
    }

    /// The sizes under their keys, for [`check_sizes`] and the limits.
    pub fn named(&self) -> [(&'static str, i64); 5] {
        [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ]
    }

    /// The sizes as a config writes them (a new checkpoint's `text_config`).
    pub fn to_json(&self) -> Value {
        Value::Object(self.named().into_iter().map(|(key, size)| (key.to_owned(), size.into())).collect())
    }

    /// `hidden_size / num_attention_heads`, the head width when the config does not give one.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// A text config with [`TextSizes`]: its config class's defaults for them.
pub trait TextDefaults {
    const SIZES: TextSizes;
}

/// The RoPE kind of a `rope_parameters` / `rope_scaling` object (`rope_type` or `type`).
pub fn rope_kind(params: &Value) -> &str {
    params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Sizes {
        hidden_size: i64,
        ratio: f64,
        act: String,
    }

    #[test]
    fn nulls_take_the_default_and_errors_name_the_key() {
        let v = serde_json::json!({"hidden_size": 64.0, "ratio": 4, "act": null});
        assert_eq!(from_value::<Sizes>(&v), Ok(Sizes { hidden_size: 64, ratio: 4.0, act: String::new() }));
        let v = serde_json::json!({"ratio": 2.5, "hidden_size": "big"});
        let (key, message) = from_value::<Sizes>(&v).unwrap_err();
        assert_eq!(key, "hidden_size");
        assert!(message.contains("expected i64"), "{message}");
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default)]
    struct Text {
        #[serde(flatten, deserialize_with = "TextSizes::deserialize_for::<Text, _>")]
        sizes: TextSizes,
        hidden_act: String,
    }

    impl TextDefaults for Text {
        const SIZES: TextSizes = TextSizes::new(10, 8, 16, 2, 2);
    }

    impl Default for Text {
        fn default() -> Self {
            Text { sizes: Self::SIZES, hidden_act: String::new() }
        }
    }

    #[test]
    fn text_sizes_take_the_family_defaults_and_errors_name_the_key() {
        let v = serde_json::json!({"hidden_size": 64.0, "num_hidden_layers": null, "hidden_act": "silu"});
        let t = from_value::<Text>(&v).unwrap();
        assert_eq!(t.sizes, TextSizes { hidden_size: 64, ..Text::SIZES });
        assert_eq!(t.hidden_act, "silu");
        let v = serde_json::json!({"hidden_act": "silu", "vocab_size": "big"});
        let (key, message) = from_value::<Text>(&v).unwrap_err();
        assert_eq!(key, "vocab_size");
        assert_eq!(message, "invalid type: string \"big\", expected i64");
    }
}
