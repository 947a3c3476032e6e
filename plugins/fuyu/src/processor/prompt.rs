//! What a Fuyu sample is: one user message with one image and a prompt, and
//! optionally one answer ([`FuyuSample`]); `FuyuProcessor` has no chat
//! template. The special tokens of its layout (`prepare_inputs_layout`,
//! `replace_image_token` in `models/fuyu/processing_fuyu.py`) are here too.

use std::path::PathBuf;
use vlmhost_plugin_api::sample::{Message, Part, Speaker};
use vlmhost_plugin_sdk::labels::texts;
use vlmhost_plugin_sdk::ProcessorError;

use vlmhost_plugin_sdk::error::Result;

/// The image patch token.
pub const IMAGE_TOKEN: &str = "|SPEAKER|";
/// Ends each row of patches.
pub const NEWLINE_TOKEN: &str = "|NEWLINE|";
/// Follows the image tokens (`replace_image_token` appends it).
pub const BOS_TOKEN: &str = "<s>";
/// Beginning of answer, appended to the prompt.
pub const BOA_TOKEN: &str = "<0x04>";
/// Ends the answer.
pub const END_TOKEN: &str = "|ENDOFTEXT|";

/// What a sample says: one image, the prompt and the answer (none: a prompt
/// to generate from, exactly what `FuyuProcessor` gives, nothing labelled).
#[derive(Clone, Debug, PartialEq)]
pub struct FuyuSample {
    pub image: PathBuf,
    pub prompt: String,
    pub answer: Option<String>,
}

impl FuyuSample {
    /// One user message with exactly one image and optional text, then one
    /// assistant answer: what `FuyuProcessor(images=image, text=prompt)` takes
    /// (it has no chat template, one image per sample). The user's text parts
    /// are joined verbatim; the image always comes first, as Fuyu places it.
    /// A user message alone is a prompt to generate from.
    pub fn from_messages(messages: &[Message]) -> Result<Self> {
        let bad = |m: String| ProcessorError::sample(format!("sample: {m}"));
        let (user, assistant) = match messages {
            [user] => (user, None),
            [user, assistant] => (user, Some(assistant)),
            _ => {
                return Err(bad(format!(
                    "{} message(s); fuyu takes one user message (one image and a prompt) and one assistant answer \
                     (FuyuProcessor has no chat template: no system message, no further turns)",
                    messages.len()
                )))
            }
        };
        if user.role != Speaker::User || assistant.is_some_and(|a| a.role != Speaker::Assistant) {
            let roles: Vec<Speaker> = messages.iter().map(|m| m.role).collect();
            return Err(bad(format!("roles are {roles:?}; fuyu takes a user message then an assistant answer")));
        }
        let images: Vec<&PathBuf> = user.content.iter().filter_map(|p| if let Part::Image { path } = p { Some(path) } else { None }).collect();
        let [image] = images.as_slice() else {
            return Err(bad(format!(
                "the user message has {} image(s); fuyu takes exactly one image per sample",
                images.len()
            )));
        };
        let prompt: String = texts(user).collect();
        for token in [IMAGE_TOKEN, NEWLINE_TOKEN] {
            if prompt.contains(token) {
                return Err(bad(format!("the prompt contains {token:?}, which stands for image patches; remove it")));
            }
        }
        let answer = match assistant {
            None => None,
            Some(a) => {
                if a.content.iter().any(|p| matches!(p, Part::Image { .. })) {
                    return Err(bad("the assistant message contains an image; answers are text".into()));
                }
                let answer: String = texts(a).collect();
                if answer.trim().is_empty() {
                    return Err(bad("the assistant answer is empty: nothing to train on".into()));
                }
                Some(answer)
            }
        };
        Ok(FuyuSample { image: (*image).clone(), prompt, answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmhost_plugin_api::sample::{Message, Part, Speaker};

    fn msg(role: Speaker, content: Vec<Part>) -> Message {
        Message { role, content }
    }

    #[test]
    fn samples_are_one_image_a_prompt_and_an_answer() {
        let img = || Part::Image { path: "a.png".into() };
        let text = |t: &str| Part::Text { text: t.into() };
        let s = FuyuSample::from_messages(&[
            msg(Speaker::User, vec![text("What is "), img(), text("this?")]),
            msg(Speaker::Assistant, vec![text("A cat.")]),
        ])
        .unwrap();
        assert_eq!((s.prompt.as_str(), s.answer.as_deref()), ("What is this?", Some("A cat.")));
        let s = FuyuSample::from_messages(&[msg(Speaker::User, vec![img(), text("Caption:")])]).unwrap();
        assert_eq!(s.answer, None);
        let e = FuyuSample::from_messages(&[msg(Speaker::User, vec![text("hi")]), msg(Speaker::Assistant, vec![text("A")])]).unwrap_err();
        assert!(e.to_string().contains("exactly one image"), "{e}");
        let e = FuyuSample::from_messages(&[msg(Speaker::Assistant, vec![text("A")])]).unwrap_err();
        assert!(e.to_string().contains("roles are [Assistant]"), "{e}");
        let three = [msg(Speaker::System, vec![text("x")]), msg(Speaker::User, vec![img()]), msg(Speaker::Assistant, vec![text("A")])];
        let e = FuyuSample::from_messages(&three).unwrap_err();
        assert!(e.to_string().contains("3 message(s)"), "{e}");
        let e = FuyuSample::from_messages(&[msg(Speaker::User, vec![img(), text("|NEWLINE|")]), msg(Speaker::Assistant, vec![text("A")])]).unwrap_err();
        assert!(e.to_string().contains("\"|NEWLINE|\""), "{e}");
        let e = FuyuSample::from_messages(&[msg(Speaker::User, vec![img()]), msg(Speaker::Assistant, vec![text("  ")])]).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }
}
