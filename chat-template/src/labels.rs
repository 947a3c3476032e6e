//! Which parts of a rendered conversation are answers (the labels), by the two rules.

use std::ops::Range;

use minijinja::value::Value;

use crate::error::ChatTemplateError;
use crate::template::{ChatTemplate, RenderOptions, Rendered};

/// How the answer spans of a template are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelRule {
    /// The output of each `{% generation %}` block (transformers' `return_assistant_tokens_mask`).
    Generation,
    /// For templates without generation blocks: what rendering the conversation up to each
    /// assistant message adds over rendering it before that message with the generation prompt.
    Prefix,
}

impl ChatTemplate {
    /// The rule [`answer_spans`](Self::answer_spans) uses: `Generation` when the template has
    /// `{% generation %}` blocks, else `Prefix`.
    pub fn label_rule(&self) -> LabelRule {
        if self.has_generation_blocks() {
            LabelRule::Generation
        } else {
            LabelRule::Prefix
        }
    }

    /// Renders `messages` with the answer spans found by [`label_rule`](Self::label_rule).
    pub fn answer_spans(&self, messages: &[Value], options: &RenderOptions) -> Result<Rendered, ChatTemplateError> {
        match self.label_rule() {
            LabelRule::Generation => self.render(messages, options),
            LabelRule::Prefix => self.prefix_answer_spans(messages, options),
        }
    }

    /// The prefix rule: for each message whose `role` is `assistant` (index `i`), renders
    /// `messages[..i]` with `add_generation_prompt=true` (the prompt) and `messages[..=i]` with
    /// `false`; the answer is what the second adds to the first, without its trailing whitespace
    /// (the separator between turns, e.g. the `\n` after `<|im_end|>`). The prompt must be a
    /// prefix of the longer rendering, and that rendering, up to the answer's end, a prefix of
    /// the whole conversation's; otherwise the rule does not apply and this is an error naming
    /// the message. Returns the whole conversation rendered with `options`, with those spans.
    pub fn prefix_answer_spans(&self, messages: &[Value], options: &RenderOptions) -> Result<Rendered, ChatTemplateError> {
        let messages = self.prepare_messages(messages)?;
        let whole = self.render_prepared(&messages, options)?;
        let with_prompt = RenderOptions { add_generation_prompt: true, ..options.clone() };
        let without_prompt = RenderOptions { add_generation_prompt: false, ..options.clone() };
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            let role = message.get_attr("role").ok();
            if role.as_ref().and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let prompt = self.render_prepared(&messages[..i], &with_prompt)?.text;
            let full = self.render_prepared(&messages[..=i], &without_prompt)?.text;
            let not_a_prefix = |detail: String| ChatTemplateError::NotAPrefix { name: self.name().to_string(), message: i, detail };
            if !full.starts_with(&prompt) {
                return Err(not_a_prefix(format!(
                    "the conversation before it, rendered with the generation prompt, is not a prefix of the conversation up to it \
                     (they differ from byte {}: {:?} vs {:?})",
                    common_prefix(&prompt, &full),
                    excerpt(&prompt, common_prefix(&prompt, &full)),
                    excerpt(&full, common_prefix(&prompt, &full)),
                )));
            }
            let end = prompt.len() + full[prompt.len()..].trim_end().len();
            if whole.text.get(..end) != Some(&full[..end]) {
                return Err(not_a_prefix(format!(
                    "the template renders it differently when later messages follow (from byte {}: {:?} vs {:?})",
                    common_prefix(&whole.text, &full),
                    excerpt(&whole.text, common_prefix(&whole.text, &full)),
                    excerpt(&full, common_prefix(&whole.text, &full)),
                )));
            }
            spans.push(prompt.len()..end);
        }
        Ok(Rendered { text: whole.text, spans })
    }
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or(a.len().min(b.len()))
}

fn excerpt(s: &str, from: usize) -> String {
    s[from..].chars().take(40).collect()
}

/// The per-token answer mask (1 = answer, learnt) from spans and the tokens' offsets, in the
/// same units (bytes with `Tokenizer::encode`, characters with `encode_char_offsets` and
/// [`Rendered::char_spans`]), exactly as transformers' `apply_chat_template(...,
/// return_assistant_tokens_mask=True)` computes `assistant_masks`: for each span, the token
/// holding its first character through the token holding its last are marked; a span whose
/// first character is in no token (cut off) ends the marking; when its last character is in no
/// token (or in token 0) the marking runs to the last token. Tokens with empty offsets (added
/// special tokens) hold no character.
pub fn token_mask(spans: &[Range<usize>], offsets: &[(usize, usize)]) -> Vec<u8> {
    let char_to_token = |pos: usize| offsets.iter().position(|&(s, e)| pos >= s && pos < e);
    let mut mask = vec![0u8; offsets.len()];
    for span in spans {
        let Some(start) = char_to_token(span.start) else {
            break;
        };
        let end = span.end.checked_sub(1).and_then(char_to_token);
        let stop = match end {
            Some(e) if e != 0 => e + 1,
            _ => offsets.len(),
        };
        for m in mask.iter_mut().take(stop).skip(start) {
            *m = 1;
        }
    }
    mask
}
