//! Data lines to samples, in the two formats users have:
//!
//! * messages JSONL: `{"messages": [{"role": "user", "content": "<image>..."}, ...], "images": [...]}`
//! * LLaVA JSON/JSONL: `{"image": "a.png" | [...], "conversations": [{"from": "human"|"gpt", "value": "<image>\n..."}]}`
//!
//! `<image>` placeholders become image parts in order (REFERENCE.md: the one
//! newline after a placeholder is dropped); image paths are relative to the
//! data file's folder unless absolute. Content already given as typed parts
//! (`[{"type": "text", ...}, {"type": "image", ...}]`) is taken as it is.

use serde_json::Value;
use std::path::{Path, PathBuf};
use vlmhost_plugin_api::sample::{split_placeholders, Message, Part, Sample, Speaker, IMAGE_PLACEHOLDER};

/// Why a data line cannot become a sample (the caller adds file and line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("neither \"messages\" nor \"conversations\" is a list")]
    NoConversation,
    #[error("message {index}: unknown role {role:?} (use system, user or assistant; human or gpt)")]
    Role { index: usize, role: String },
    #[error("message {index}: {message}")]
    Content { index: usize, message: String },
    #[error("{placeholders} <image> placeholder(s) but {images} image(s)")]
    ImageCount { placeholders: usize, images: usize },
}

fn speaker(role: &str) -> Option<Speaker> {
    match role {
        "system" => Some(Speaker::System),
        "user" | "human" => Some(Speaker::User),
        "assistant" | "gpt" => Some(Speaker::Assistant),
        _ => None,
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Parse one data line; `base` is the data file's folder.
pub fn parse_line(line: &str, base: &Path) -> Result<Sample, LineError> {
    let v: Value = serde_json::from_str(line).map_err(|e| LineError::Json(e.to_string()))?;
    let (turns, role_key, text_key) = if let Some(m) = v.get("messages").and_then(Value::as_array) {
        (m, "role", "content")
    } else if let Some(c) = v.get("conversations").and_then(Value::as_array) {
        (c, "from", "value")
    } else {
        return Err(LineError::NoConversation);
    };
    let images: Vec<PathBuf> = match v.get("images").or_else(|| v.get("image")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![resolve(base, s)],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(|s| resolve(base, s)).collect(),
        Some(_) => return Err(LineError::Content { index: 0, message: "\"images\" must be a string or a list".into() }),
    };
    let placeholders: usize = turns
        .iter()
        .filter_map(|t| t.get(text_key).and_then(Value::as_str))
        .map(|s| s.matches(IMAGE_PLACEHOLDER).count())
        .sum();
    let typed_images: usize = turns
        .iter()
        .filter_map(|t| t.get(text_key).and_then(Value::as_array))
        .flatten()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("image"))
        .count();
    if typed_images == 0 && placeholders != images.len() {
        return Err(LineError::ImageCount { placeholders, images: images.len() });
    }
    let mut next_image = images.into_iter();
    let mut messages = Vec::with_capacity(turns.len());
    for (index, t) in turns.iter().enumerate() {
        let role_s = t.get(role_key).and_then(Value::as_str).unwrap_or("");
        let role = speaker(role_s).ok_or_else(|| LineError::Role { index, role: role_s.to_owned() })?;
        let content = match t.get(text_key) {
            Some(Value::String(s)) => split_placeholders(s, &mut next_image)
                .ok_or(LineError::ImageCount { placeholders, images: 0 })?,
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| match p.get("type").and_then(Value::as_str) {
                    Some("text") => Ok(Part::Text { text: p.get("text").and_then(Value::as_str).unwrap_or("").to_owned() }),
                    Some("image") => {
                        let path = p.get("path").or_else(|| p.get("image")).or_else(|| p.get("url")).and_then(Value::as_str);
                        match path {
                            Some(s) => Ok(Part::Image { path: resolve(base, s) }),
                            None => next_image.next().map(|path| Part::Image { path }).ok_or(LineError::Content {
                                index,
                                message: "an image part without a path and no image left in \"images\"".into(),
                            }),
                        }
                    }
                    other => Err(LineError::Content { index, message: format!("unknown content part type {other:?}") }),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(LineError::Content { index, message: format!("no \"{text_key}\" text") }),
        };
        messages.push(Message { role, content });
    }
    Ok(Sample { messages })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_give_the_same_sample() {
        let base = Path::new("/data");
        let a = parse_line(
            r#"{"messages": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}], "images": ["x.png"]}"#,
            base,
        )
        .unwrap();
        let b = parse_line(
            r#"{"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}"#,
            base,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.messages[0].content[0], Part::Image { path: "/data/x.png".into() });
        assert_eq!(a.messages[0].content[1], Part::Text { text: "What?".into() });
    }

    #[test]
    fn placeholder_count_mismatch() {
        let e = parse_line(r#"{"messages": [{"role": "user", "content": "<image><image>hi"}], "images": ["a.png"]}"#, Path::new("/"))
            .unwrap_err();
        assert_eq!(e, LineError::ImageCount { placeholders: 2, images: 1 });
    }
}
