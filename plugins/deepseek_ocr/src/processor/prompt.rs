//! DeepSeek-OCR's "plain" prompt format (`conversation.py`, `SeparatorStyle.PLAIN`,
//! empty separators; `text_encode`): what a message becomes before
//! tokenisation. A user message is rendered (image part -> `<image>\n`, text
//! as is), stripped as Python strips, and split at its images; an answer is
//! its text, stripped. System messages and images in answers have no place in it.

use std::path::PathBuf;
use vlmhost_plugin_api::sample::{Message, Part};
use vlmhost_plugin_sdk::labels::texts;
use vlmhost_plugin_sdk::ProcessorError;

use vlmhost_plugin_sdk::error::Result;

/// The image placeholder of the prompt and the token that stands for image features.
pub const IMAGE_TOKEN: &str = "<image>";

/// Python's `str.strip()` whitespace (`str.isspace`): Unicode White_Space plus the ASCII
/// separators U+001C..U+001F, which Python counts and Rust's `char::is_whitespace` does not.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

pub fn python_strip(s: &str) -> &str {
    s.trim_matches(is_python_space)
}

/// The text of answer `index`, stripped; an error for an image in it or no text.
pub fn answer_text(index: usize, m: &Message) -> Result<String> {
    if let Some(part) = m.content.iter().position(|p| matches!(p, Part::Image { .. })) {
        return Err(ProcessorError::sample(format!(
            "message {index} (assistant), part {part} is an image: answers must be text only; \
             move the image into the user message before it"
        )));
    }
    let text = python_strip(&texts(m).collect::<String>()).to_owned();
    if text.is_empty() {
        return Err(ProcessorError::sample(format!(
            "message {index} (assistant) has an empty answer: nothing to train on; leave the message out or give it text"
        )));
    }
    Ok(text)
}

/// User message `index` rendered and stripped, split at its images: the text
/// pieces (one more than the images) and the images with the part each came from.
pub fn user_pieces(index: usize, m: &Message) -> Result<(Vec<String>, Vec<(usize, PathBuf)>)> {
    let mut text = String::new();
    let mut images = Vec::new();
    for (part, p) in m.content.iter().enumerate() {
        match p {
            Part::Text { text: t } if t.contains(IMAGE_TOKEN) => {
                return Err(ProcessorError::sample(format!(
                    "message {index}, part {part}: the text contains the literal image placeholder {IMAGE_TOKEN:?}, \
                     which would take an image that is not there; give images as image parts (or remove the \
                     placeholder from the text)"
                )))
            }
            Part::Text { text: t } => text.push_str(t),
            Part::Image { path } => {
                text.push_str(IMAGE_TOKEN);
                text.push('\n');
                images.push((part, path.clone()));
            }
        }
    }
    // `split` yields one more piece than there are placeholders.
    let pieces = python_strip(&text).split(IMAGE_TOKEN).map(str::to_owned).collect();
    Ok((pieces, images))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_is_pythons() {
        assert_eq!(python_strip("\u{1f} a b\n\u{3000}"), "a b");
        assert_eq!(python_strip("<image>\nFree OCR. "), "<image>\nFree OCR.");
    }
}
