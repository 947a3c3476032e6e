//! The sample format the host hands to [`Model::prepare`](crate::model::Model::prepare)
//! (as JSON): a conversation whose messages are typed parts, exactly as
//! transformers' `apply_chat_template` takes them. Image paths are absolute
//! (the host resolves them against the data file's folder).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
