//! The sample format the host hands to [`Model::prepare`](crate::model::Model::prepare)
//! (as JSON): a conversation whose messages are typed parts, exactly as
//! transformers' `apply_chat_template` takes them. Image paths are absolute
//! (resolved against the data file's folder).
//!
//! Data lines become samples here ([`parse_line`]), in the two formats users have:
//!
//! * messages JSONL: `{"messages": [{"role": "user", "content": "<image>..."}, ...], "images": [...]}`
//! * LLaVA JSON/JSONL: `{"image": "a.png" | [...], "conversations": [{"from": "human"|"gpt", "value": "<image>\n..."}]}`
//!
//! `<image>` placeholders become image parts in order (the one newline after
//! a placeholder is dropped, see [`split_placeholders`]); image paths are relative to the
//! data file's folder unless absolute. Content already given as typed parts
//! (`[{"type": "text", ...}, {"type": "image", ...}]`) is taken as it is.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    System,
    User,
    Assistant,
}

/// One piece of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part {
    Text { text: String },
    Image { path: PathBuf },
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Speaker,
    pub content: Vec<Part>,
}

/// One training sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub messages: Vec<Message>,
}

/// The placeholder for an image in plain-text data.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// Split plain text with `<image>` placeholders into parts, taking image
/// paths from `images` in order. Text between placeholders is kept verbatim
/// (empty pieces dropped), except that one newline right after a placeholder
/// is dropped: LLaVA-format data writes `<image>\n`, and every family's
/// template adds its own separator.
///
/// Returns `None` when there are more placeholders than images left.
pub fn split_placeholders(
    text: &str,
    images: &mut impl Iterator<Item = PathBuf>,
) -> Option<Vec<Part>> {
    let mut parts = Vec::new();
    let mut pieces = text.split(IMAGE_PLACEHOLDER);
    if let Some(first) = pieces.next() {
        if !first.is_empty() {
            parts.push(Part::Text { text: first.to_owned() });
        }
    }
    for piece in pieces {
        parts.push(Part::Image { path: images.next()? });
        let piece = piece.strip_prefix('\n').unwrap_or(piece);
        if !piece.is_empty() {
            parts.push(Part::Text { text: piece.to_owned() });
        }
    }
    Some(parts)
}


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
    #[error(
        "{unused} of the {listed} image(s) in \"images\" are used by no <image> placeholder or image part \
         (image parts with a path do not take from the list): remove them from \"images\", or leave the paths out of the image parts"
    )]
    UnusedImages { unused: usize, listed: usize },
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
    let listed = images.len();
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
                    Some("text") => match p.get("text").and_then(Value::as_str) {
                        Some(text) => Ok(Part::Text { text: text.to_owned() }),
                        None => Err(LineError::Content { index, message: format!("a text part without a \"text\" string: {p}") }),
                    },
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
    let unused = next_image.count();
    if unused > 0 {
        return Err(LineError::UnusedImages { unused, listed });
    }
    Ok(Sample { messages })
}

#[cfg(test)]
mod line_tests {
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

    #[test]
    fn typed_parts_are_checked() {
        let e = parse_line(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "txt": "hi"}]}, {"role": "assistant", "content": "B"}]}"#,
            Path::new("/"),
        )
        .unwrap_err();
        assert!(matches!(&e, LineError::Content { index: 0, message } if message.contains("without a \"text\" string")), "{e}");
        let e = parse_line(
            r#"{"images": ["b.png"], "messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "A"}]}, {"role": "assistant", "content": "B"}]}"#,
            Path::new("/"),
        )
        .unwrap_err();
        assert_eq!(e, LineError::UnusedImages { unused: 1, listed: 1 });
        let s = parse_line(
            r#"{"images": ["b.png"], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A"}]}, {"role": "assistant", "content": "B"}]}"#,
            Path::new("/d"),
        )
        .unwrap();
        assert_eq!(s.messages[0].content[0], Part::Image { path: "/d/b.png".into() });
    }

    #[test]
    fn roles_and_absolute_paths() {
        let e = parse_line(r#"{"messages": [{"role": "bot", "content": "x"}]}"#, Path::new("/")).unwrap_err();
        assert_eq!(e, LineError::Role { index: 0, role: "bot".into() });
        let s = parse_line(
            r#"{"images": ["/abs/b.png"], "messages": [{"role": "user", "content": "<image>A"}, {"role": "assistant", "content": "B"}]}"#,
            Path::new("/data/set"),
        )
        .unwrap();
        assert_eq!(s.messages[0].content[0], Part::Image { path: "/abs/b.png".into() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Part {
        Part::Text { text: s.into() }
    }
    fn image(s: &str) -> Part {
        Part::Image { path: s.into() }
    }

    #[test]
    fn placeholders_become_parts_in_order() {
        let mut imgs = vec![PathBuf::from("a.png"), PathBuf::from("b.png")].into_iter();
        let parts = split_placeholders("<image>\nCompare <image> and this.", &mut imgs).unwrap();
        assert_eq!(parts, vec![image("a.png"), text("Compare "), image("b.png"), text(" and this.")]);
    }

    #[test]
    fn only_one_newline_is_dropped_and_text_is_verbatim() {
        let split = |t: &str, n: usize| {
            let mut imgs = (0..n).map(|i| PathBuf::from(format!("{i}.png")));
            split_placeholders(t, &mut imgs).unwrap()
        };
        assert_eq!(split("<image>\nDescribe.", 1), vec![image("0.png"), text("Describe.")]);
        assert_eq!(split("\n<image>\n\nA <b>", 1), vec![text("\n"), image("0.png"), text("\nA <b>")]);
        assert_eq!(split("Which?<image>", 1), vec![text("Which?"), image("0.png")]);
        assert_eq!(split("<image><image>", 2), vec![image("0.png"), image("1.png")]);
        assert_eq!(split("", 0), vec![]);
    }

    #[test]
    fn too_few_images() {
        let mut imgs = std::iter::empty();
        assert!(split_placeholders("<image>hi", &mut imgs).is_none());
    }

    #[test]
    fn sample_json_shape() {
        let s = Sample {
            messages: vec![Message { role: Speaker::User, content: vec![image("/x.png"), text("hi")] }],
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(
            j,
            r#"{"messages":[{"role":"user","content":[{"type":"image","path":"/x.png"},{"type":"text","text":"hi"}]}]}"#
        );
    }
}
