//! The Qwen2-VL-2B-Instruct chat template (ChatML, the default system prompt
//! when the conversation has none, images as
//! `<|vision_start|><|image_pad|><|vision_end|>` where they occur in a
//! message), rendered natively, with its special tokens.

use vlmhost_plugin_api::sample::{Message, Part, Speaker};
use vlmhost_plugin_sdk::labels::{role_name, RenderedChat};

/// Qwen's ChatML / vision tokens.
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const VISION_START: &str = "<|vision_start|>";
pub const VISION_END: &str = "<|vision_end|>";
pub const IMAGE_PAD: &str = "<|image_pad|>";
/// The system prompt the Qwen2-VL template adds when a conversation has none.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// Texts a message may not contain: they would shift images against their tokens.
pub const RESERVED: [&str; 4] = [IMAGE_PAD, VISION_START, VISION_END, "<|video_pad|>"];

/// Renders a conversation as Qwen2-VL-2B-Instruct's chat template does:
///
/// ```text
/// if the first message is not a system message:
///     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
/// for each message:
///     "<|im_start|>{role}\n"
///     each part in order: text verbatim, image "<|vision_start|><|image_pad|><|vision_end|>"
///     "<|im_end|>\n"     (assistant: the content and <|im_end|> are the generation span)
/// add_generation_prompt: "<|im_start|>assistant\n"
/// ```
pub fn render_chat(messages: &[Message], add_generation_prompt: bool) -> RenderedChat {
    let mut text = String::new();
    let mut spans = Vec::new();
    let mut images = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if i == 0 && m.role != Speaker::System {
            text.push_str(&format!("{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n"));
        }
        text.push_str(IM_START);
        text.push_str(role_name(m.role));
        text.push('\n');
        let start = text.len();
        for part in &m.content {
            match part {
                Part::Text { text: t } => text.push_str(t),
                Part::Image { path } => {
                    text.push_str(VISION_START);
                    text.push_str(IMAGE_PAD);
                    text.push_str(VISION_END);
                    images.push(path.clone());
                }
            }
        }
        text.push_str(IM_END);
        if m.role == Speaker::Assistant {
            spans.push(start..text.len());
        }
        text.push('\n');
    }
    if add_generation_prompt {
        text.push_str(IM_START);
        text.push_str("assistant\n");
    }
    RenderedChat { text, generation_spans: spans, images }
}


#[cfg(test)]
mod tests {
    use super::*;

    fn user(parts: Vec<Part>) -> Message {
        Message { role: Speaker::User, content: parts }
    }
    fn text(t: &str) -> Part {
        Part::Text { text: t.into() }
    }

    #[test]
    fn template_adds_the_default_system_prompt_and_spans_answers() {
        let msgs = vec![
            user(vec![Part::Image { path: "a.png".into() }, text("Hi?")]),
            Message { role: Speaker::Assistant, content: vec![text("Yes.")] },
        ];
        let r = render_chat(&msgs, false);
        assert_eq!(
            r.text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
        );
        assert_eq!(&r.text[r.generation_spans[0].clone()], "Yes.<|im_end|>");
        let sys = vec![Message { role: Speaker::System, content: vec![text("Be brief.")] }, user(vec![text("Q")])];
        assert_eq!(render_chat(&sys, true).text, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n");
    }
}
