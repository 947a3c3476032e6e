//! Helpers for [`Plugin::init`](crate::Plugin::init): writing a new
//! checkpoint's files with errors that name them, and the one refusal of an
//! unknown preset.

use crate::PluginError;
use std::path::Path;

/// Write `text` to `path`; an error names the file.
pub fn write_text(path: &Path, text: &str) -> Result<(), PluginError> {
    std::fs::write(path, text)
        .map_err(|e| PluginError::Io { path: path.display().to_string().into(), message: e.to_string().into() })
}

/// Write `value` pretty-printed, with a final newline, as Hugging Face does.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), PluginError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| PluginError::invalid(path.display().to_string(), format!("cannot serialise: {e}")))?;
    write_text(path, &(text + "\n"))
}

/// The error for a preset a plugin does not have; `known` lists those it has.
pub fn unknown_preset(name: &str, known: &[&str]) -> PluginError {
    PluginError::invalid_with_hint("preset", format!("unknown preset {name:?}"), format!("use {}", known.join(" or ")))
}
