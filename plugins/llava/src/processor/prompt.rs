//! The llava-1.5-hf chat template, rendered natively, and the tokenisation of
//! the rendered text (`processing_utils.ProcessorMixin.apply_chat_template`:
//! the whole text in one call, `<s>` from the post-processor unless the text
//! starts with it).

use vlmhost_plugin_api::sample::{Message, Part, Speaker};
use vlmhost_plugin_sdk::labels::{texts, RenderedChat};
use vlmhost_plugin_sdk::tokens::Tokens;
use vlmhost_plugin_sdk::ProcessorError;

/// The placeholder that marks an image in plain-text data and in the rendered prompt.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// Renders a conversation exactly as the llava-1.5-hf `chat_template.jinja` does:
///
/// ```text
/// for each message:
///     "USER: " / "ASSISTANT: " (no prefix for system)
///     "<image>\n" for each image part, ALL images of the message first, whatever their position
///     user/system: each text part + " "
///     assistant:   {% generation %} text parts joined by " " + eos {% endgeneration %}
/// add_generation_prompt: "ASSISTANT:"
/// ```
pub fn render_chat(messages: &[Message], eos_token: &str, add_generation_prompt: bool) -> RenderedChat {
    let mut text = String::new();
    let mut generation_spans = Vec::new();
    let mut images = Vec::new();
    for m in messages {
        match m.role {
            Speaker::System => {}
            Speaker::User => text.push_str("USER: "),
            Speaker::Assistant => text.push_str("ASSISTANT: "),
        }
        for part in &m.content {
            if let Part::Image { path } = part {
                text.push_str(IMAGE_PLACEHOLDER);
                text.push('\n');
                images.push(path.clone());
            }
        }
        if m.role == Speaker::Assistant {
            let start = text.len();
            text.push_str(&texts(m).collect::<Vec<_>>().join(" "));
            text.push_str(eos_token);
            generation_spans.push(start..text.len());
        } else {
            for t in texts(m) {
                text.push_str(t);
                text.push(' ');
            }
        }
    }
    if add_generation_prompt {
        text.push_str("ASSISTANT:");
    }
    RenderedChat { text, generation_spans, images }
}

/// Token ids with the character range of the text each token came from (`offset_mapping`;
/// tokens added by the post-processor have an empty range).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<i64>,
    pub char_offsets: Vec<(usize, usize)>,
}

/// Tokenises the whole text in one call (Metaspace `prepend_scheme="first"` makes piecewise
/// tokenisation differ). `apply_chat_template` lets the post-processor add `<s>` unless the
/// text already starts with it.
pub fn tokenize(tokens: &Tokens, bos_token: Option<&str>, text: &str) -> Result<Tokenized, ProcessorError> {
    let add_special = !bos_token.is_some_and(|bos| !bos.is_empty() && text.starts_with(bos));
    let (ids, char_offsets) = tokens.encode_with_offsets(text, add_special)?;
    Ok(Tokenized { ids, char_offsets })
}
