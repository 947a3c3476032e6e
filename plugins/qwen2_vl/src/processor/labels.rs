//! Which conversations Qwen2-VL can take and train on: no text that stands
//! for image content, no image in an answer, and (when training) an answer
//! with text. The labels are each answer and its `<|im_end|>`
//! ([`vlmhost_plugin_sdk::labels::span_labels`] over the template's spans).

use super::prompt::RESERVED;
use vlmhost_plugin_api::sample::{Message, Part, Speaker};
use vlmhost_plugin_sdk::labels::{check_answers_not_empty, role_name};
use vlmhost_plugin_sdk::ProcessorError;

/// Checks a conversation: no reserved image tokens in text, no image in an answer.
pub fn check(messages: &[Message], training: bool) -> Result<(), ProcessorError> {
    for (index, m) in messages.iter().enumerate() {
        for part in &m.content {
            match part {
                Part::Text { text } => {
                    if let Some(token) = RESERVED.iter().find(|t| text.contains(*t)) {
                        return Err(ProcessorError::sample(format!(
                            "message {index} ({}) contains {token:?}, which stands for image content: \
                             write images as image parts or `<image>` placeholders",
                            role_name(m.role)
                        )));
                    }
                }
                Part::Image { .. } if m.role == Speaker::Assistant => {
                    return Err(ProcessorError::sample(format!(
                        "message {index} (assistant) contains an image: images belong to system or user messages"
                    )))
                }
                Part::Image { .. } => {}
            }
        }
    }
    if training {
        check_answers_not_empty(messages)?;
        if !messages.iter().any(|m| m.role == Speaker::Assistant) {
            return Err(ProcessorError::NoAnswer);
        }
    }
    Ok(())
}
