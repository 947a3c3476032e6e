//! Which conversations can train: every assistant answer needs text, and a
//! conversation needs an answer unless it is a prompt (it ends with the
//! user's turn). The labels themselves are the tokens of each answer and its
//! `</s>` ([`vlmhost_plugin_sdk::labels::span_labels`] over the template's
//! generation spans).

use vlmhost_plugin_api::sample::{Message, Speaker};
use vlmhost_plugin_sdk::labels::{check_answers_not_empty, is_prompt};
use vlmhost_plugin_sdk::ProcessorError;

/// Refuse conversations that cannot train anything, naming the message.
pub fn check(messages: &[Message]) -> Result<(), ProcessorError> {
    check_answers_not_empty(messages)?;
    let has_answer = messages.iter().any(|m| m.role == Speaker::Assistant);
    if !has_answer && !is_prompt(messages) {
        return Err(ProcessorError::NoAnswer);
    }
    Ok(())
}
