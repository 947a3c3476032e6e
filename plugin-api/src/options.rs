//! Options a user passes to a plugin when opening a model (`--processor
//! KEY=VALUE`, or `processor:` in the training config): resolution modes,
//! pixel budgets and the like. They cross the ABI as one JSON object.

use crate::PluginError;
use serde_json::{Map, Value};

/// The options, as a JSON object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOptions(pub Map<String, Value>);

impl ModelOptions {
    /// Parse the JSON text the host sends (empty text: no options).
    pub fn from_json(text: &str) -> Result<Self, PluginError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(ModelOptions(map)),
            Ok(other) => Err(PluginError::invalid("processor options", format!("expected a JSON object, got {other}"))),
            Err(e) => Err(PluginError::invalid("processor options", format!("not JSON: {e}"))),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Refuse keys outside `known`, naming them and the accepted ones.
    pub fn check_keys(&self, known: &[&str]) -> Result<(), PluginError> {
        let unknown: Vec<&str> = self.0.keys().map(String::as_str).filter(|k| !known.contains(k)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(PluginError::invalid_with_hint(
            "processor options",
            format!("unknown option(s) {}", unknown.join(", ")),
            format!("this family accepts: {}", known.join(", ")),
        ))
    }

    /// A string option (numbers and booleans are accepted as their text).
    pub fn string(&self, key: &str) -> Option<String> {
        self.0.get(key).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    /// A non-negative integer option; an error names the key.
    pub fn usize(&self, key: &str) -> Result<Option<usize>, PluginError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .map(|n| Some(n as usize))
                .ok_or_else(|| PluginError::invalid(format!("processor option {key}"), format!("expected a whole number, got {v}"))),
        }
    }

    /// A boolean option; an error names the key.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, PluginError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" || s == "false" => Ok(Some(s == "true")),
            Some(v) => Err(PluginError::invalid(format!("processor option {key}"), format!("expected true or false, got {v}"))),
        }
    }

    /// The options as JSON text (what the host sends).
    pub fn to_json(&self) -> String {
        Value::Object(self.0.clone()).to_string()
    }
}
