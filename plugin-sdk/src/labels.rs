//! Labels from a rendered chat, as `apply_chat_template`'s assistant mask
//! makes them (`processing_utils._adjust_assistant_masks_indices`): the byte
//! spans of `{% generation %}` are carried through the expansion of image
//! placeholders, and a token is labelled when its character range overlaps one.
//! Also the conversation checks the chat-template families share.

use crate::{ProcessorError, IGNORE_INDEX};
use std::ops::Range;
use std::path::PathBuf;
use tch::Tensor;
use vlmhost_plugin_api::sample::{Message, Part, Speaker};
use vlmhost_plugin_api::PreparedSample;

/// A processed conversation's token ids and, position for position, its
/// labels: the id where the token trains, [`IGNORE_INDEX`] elsewhere (not
/// shifted, the Hugging Face convention). What every family's processor
/// output starts with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelledIds {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

impl LabelledIds {
    /// `input_ids` (the tokens of `text`, with character `offsets`) labelled
    /// where they overlap the byte `spans` ([`span_labels`]).
    pub fn from_spans(text: &str, spans: &[Range<usize>], input_ids: Vec<i64>, offsets: &[(usize, usize)]) -> LabelledIds {
        let labels = span_labels(text, spans, &input_ids, offsets);
        LabelledIds { input_ids, labels }
    }

    /// Appends `ids`, labelled (each as itself) or not.
    pub fn push(&mut self, ids: &[i64], labelled: bool) {
        self.input_ids.extend_from_slice(ids);
        self.labels.extend(ids.iter().map(|&id| if labelled { id } else { IGNORE_INDEX }));
    }

    /// True at each `token`.
    pub fn mask_of(&self, token: i64) -> Vec<bool> {
        self.input_ids.iter().map(|&t| t == token).collect()
    }

    /// The model's inputs: these ids and labels, the image-token mask and the image tensors.
    pub fn into_prepared(self, image_token_mask: Vec<bool>, tensors: Vec<(String, Tensor)>) -> PreparedSample {
        PreparedSample { input_ids: self.input_ids, labels: self.labels, image_token_mask, tensors }
    }
}

/// A conversation rendered by a chat template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    /// Byte ranges of `text` inside `{% generation %}`: each answer and its end token.
    pub generation_spans: Vec<Range<usize>>,
    /// Image paths in the order their placeholders appear in `text`.
    pub images: Vec<PathBuf>,
}

/// Replaces every `placeholder` in `text` by the matching entry of
/// `replacements` (in order) and maps `spans` (byte ranges) into the new text,
/// shifting each position by what the replacements ending at or before it added.
pub fn expand_placeholders(
    text: &str,
    placeholder: &str,
    replacements: &[String],
    spans: &[Range<usize>],
) -> (String, Vec<Range<usize>>) {
    let mut out = String::with_capacity(text.len() + replacements.iter().map(String::len).sum::<usize>());
    // (end of the placeholder in the old text, cumulative bytes gained up to it)
    let mut shifts: Vec<(usize, isize)> = Vec::new();
    let (mut gained, mut last) = (0isize, 0);
    for ((pos, _), rep) in text.match_indices(placeholder).zip(replacements) {
        out.push_str(&text[last..pos]);
        out.push_str(rep);
        last = pos + placeholder.len();
        gained += rep.len() as isize - placeholder.len() as isize;
        shifts.push((last, gained));
    }
    out.push_str(&text[last..]);
    let map = |p: usize| {
        let n = shifts.partition_point(|&(end, _)| end <= p);
        (p as isize + if n == 0 { 0 } else { shifts[n - 1].1 }) as usize
    };
    (out, spans.iter().map(|r| map(r.start)..map(r.end)).collect())
}

/// Labels of `ids` (tokens of `text`, with character `offsets`): the id where
/// the token overlaps one of the byte `spans`, [`IGNORE_INDEX`] elsewhere.
/// Zero-width tokens (added by a post-processor) never overlap.
pub fn span_labels(text: &str, spans: &[Range<usize>], ids: &[i64], offsets: &[(usize, usize)]) -> Vec<i64> {
    let char_index = |byte: usize| text[..byte].chars().count();
    let char_spans: Vec<(usize, usize)> = spans.iter().map(|r| (char_index(r.start), char_index(r.end))).collect();
    ids.iter()
        .zip(offsets)
        .map(|(&id, &(ts, te))| if char_spans.iter().any(|&(s, e)| ts < e && te > s) { id } else { IGNORE_INDEX })
        .collect()
}

/// Whether `messages` is a prompt to generate from: it ends with the user's turn.
pub fn is_prompt(messages: &[Message]) -> bool {
    messages.last().is_some_and(|m| m.role == Speaker::User)
}

/// The text parts of a message, in order.
pub fn texts(message: &Message) -> impl Iterator<Item = &str> {
    message.content.iter().filter_map(|p| match p {
        Part::Text { text } => Some(text.as_str()),
        Part::Image { .. } => None,
    })
}

/// The first assistant message with no text to train on, as an error.
pub fn check_answers_not_empty(messages: &[Message]) -> Result<(), ProcessorError> {
    for (index, m) in messages.iter().enumerate() {
        if m.role == Speaker::Assistant && texts(m).all(|t| t.trim().is_empty()) {
            return Err(ProcessorError::EmptyAnswer { index });
        }
    }
    Ok(())
}

/// Lower-case name of a speaker, as chat templates write it.
pub fn role_name(role: Speaker) -> &'static str {
    match role {
        Speaker::System => "system",
        Speaker::User => "user",
        Speaker::Assistant => "assistant",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_shifts_spans_past_placeholders() {
        let text = "a<image>b<image>c";
        let reps = vec!["XX".to_string(), "YYYY".to_string()];
        let (out, spans) = expand_placeholders(text, "<image>", &reps, &[8..9, 16..17]);
        assert_eq!(out, "aXXbYYYYc");
        assert_eq!(&out[spans[0].clone()], "b");
        assert_eq!(&out[spans[1].clone()], "c");
    }

    #[test]
    fn tokens_overlapping_a_span_are_labelled() {
        let labels = span_labels("ab\u{e9}cd", &[2..4], &[1, 2, 3, 4], &[(0, 0), (0, 2), (2, 3), (3, 5)]);
        assert_eq!(labels, [IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX]);
    }
}
