//! Finding a checkpoint's chat template and the special tokens templates use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::error::ChatTemplateError;
use crate::template::ChatTemplate;

/// The special tokens transformers passes to templates (`special_tokens_map`, v5: the named ones only).
pub const SPECIAL_TOKEN_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// The files a checkpoint's template is looked for in, in order.
pub const TEMPLATE_FILES: [&str; 3] = ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"];

fn read(path: &Path) -> Result<String, ChatTemplateError> {
    std::fs::read_to_string(path).map_err(|source| ChatTemplateError::Io { path: path.to_path_buf(), source })
}

fn read_json(path: &Path) -> Result<Json, ChatTemplateError> {
    serde_json::from_str(&read(path)?).map_err(|source| ChatTemplateError::Json { path: path.to_path_buf(), source })
}

fn bad(path: &Path, what: impl Into<String>) -> ChatTemplateError {
    ChatTemplateError::BadConfig { path: path.to_path_buf(), what: what.into() }
}

/// The `chat_template` value of a JSON config: a string, or a list of `{name, template}`
/// (the one named `default`). `None` when the key is absent or null.
fn template_in_json(json: &Json, path: &Path) -> Result<Option<String>, ChatTemplateError> {
    match json.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(Json::as_str);
                let template = entry.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => return Err(bad(path, "`chat_template` list entries must be {\"name\": ..., \"template\": ...}")),
                }
            }
            Err(bad(
                path,
                format!("`chat_template` holds several templates ({}) and none is named `default`", names.join(", ")),
            ))
        }
        Some(other) => Err(bad(path, format!("`chat_template` must be a string or a list, got {other}"))),
    }
}

/// Where a checkpoint folder keeps its template: the file and the source, or `None`.
/// Looks in `chat_template.jinja`, then `chat_template.json` (`{"chat_template": ...}`), then
/// `tokenizer_config.json`'s `chat_template`.
pub fn find_template_source(model_dir: &Path) -> Result<Option<(PathBuf, String)>, ChatTemplateError> {
    let jinja = model_dir.join(TEMPLATE_FILES[0]);
    if jinja.is_file() {
        return Ok(Some((jinja.clone(), read(&jinja)?)));
    }
    for file in &TEMPLATE_FILES[1..] {
        let path = model_dir.join(file);
        if path.is_file() {
            if let Some(t) = template_in_json(&read_json(&path)?, &path)? {
                return Ok(Some((path, t)));
            }
        }
    }
    Ok(None)
}

/// A token in a tokenizer config: a string, or an added-token object `{"content": ...}`.
fn token_text(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// The special tokens of a checkpoint folder (`bos_token`, `eos_token`, ...): from
/// `tokenizer_config.json`, those it lacks from `special_tokens_map.json`; null ones are left out.
pub fn load_special_tokens(model_dir: &Path) -> Result<BTreeMap<String, String>, ChatTemplateError> {
    let mut tokens = BTreeMap::new();
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = model_dir.join(file);
        if !path.is_file() {
            continue;
        }
        let json = read_json(&path)?;
        for name in SPECIAL_TOKEN_NAMES {
            if tokens.contains_key(name) {
                continue;
            }
            if let Some(text) = json.get(name).and_then(token_text) {
                tokens.insert(name.to_string(), text);
            }
        }
    }
    Ok(tokens)
}

impl ChatTemplate {
    /// The chat template of a checkpoint folder (see [`find_template_source`]) with its special
    /// tokens (see [`load_special_tokens`]); `None` when the folder has no template.
    pub fn load(model_dir: &Path) -> Result<Option<ChatTemplate>, ChatTemplateError> {
        let Some((path, source)) = find_template_source(model_dir)? else {
            return Ok(None);
        };
        let template = ChatTemplate::from_source(&source, &path.display().to_string())?;
        Ok(Some(template.with_special_tokens(load_special_tokens(model_dir)?)))
    }

    /// A template file given by the user (`chat_template:` in the training config,
    /// `--chat-template FILE`): a `.json` file is read as a config with a `chat_template` key
    /// (`chat_template.json`, `tokenizer_config.json`), anything else as the template text.
    /// Special tokens are not set: take them from the checkpoint with
    /// [`with_special_tokens`](ChatTemplate::with_special_tokens)`(load_special_tokens(dir)?)`.
    pub fn from_file(path: &Path) -> Result<ChatTemplate, ChatTemplateError> {
        let source = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
            template_in_json(&read_json(path)?, path)?.ok_or_else(|| bad(path, "no `chat_template` in this file"))?
        } else {
            read(path)?
        };
        ChatTemplate::from_source(&source, &path.display().to_string())
    }

    /// The template for a checkpoint: `override_file` if given (the training config's
    /// `chat_template:` or `--chat-template FILE`), else the checkpoint's own; the special
    /// tokens always from the checkpoint. `None` when neither exists (the plugin's default
    /// template applies then).
    pub fn resolve(model_dir: &Path, override_file: Option<&Path>) -> Result<Option<ChatTemplate>, ChatTemplateError> {
        match override_file {
            Some(file) => Ok(Some(ChatTemplate::from_file(file)?.with_special_tokens(load_special_tokens(model_dir)?))),
            None => ChatTemplate::load(model_dir),
        }
    }
}
