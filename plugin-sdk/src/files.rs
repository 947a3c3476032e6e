//! Reading a checkpoint's JSON files (`config.json`, `preprocessor_config.json`,
//! `tokenizer_config.json`, ...) into serde structs that mirror them.
//!
//! Hugging Face files write `null` for "not set" and sometimes `4.0` for an
//! integer; [`normalise`] turns the first into an absent key (so the struct's
//! default applies) and the second into an integer, before serde sees them.
//! Errors name the file and the key ([`from_value`]).

use crate::ProcessorError;
use serde::de::DeserializeOwned;
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
}
