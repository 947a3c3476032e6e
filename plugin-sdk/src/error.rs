//! [`ProcessorError`]: everything that can go wrong between a model folder or
//! a conversation and the model inputs, for every family's processor. What is
//! specific to one family (a template rule, a resolution mode) is a
//! [`ProcessorError::Sample`] or [`ProcessorError::Option`] in its own words.

use std::path::PathBuf;
use vlmhost_imaging::ImageError;
use vlmhost_plugin_api::PluginError;

/// A processor's error.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("no image processor config in {dir}: expected {expected}")]
    ImageConfigMissing { dir: PathBuf, expected: &'static str },
    /// A value of a processor config file the family cannot use.
    #[error("{path}: {reason}")]
    ImageConfigInvalid { path: PathBuf, reason: String },
    /// A user's processor option (`--processor KEY=VALUE`).
    #[error("processor option {key}: {reason}")]
    Option { key: String, reason: String },
    #[error(
        "tokenizer file missing: {path} (the model folder needs the checkpoint's tokenizer.json, \
         as save_pretrained of its fast tokenizer writes it)"
    )]
    TokenizerMissing { path: PathBuf },
    #[error("cannot load tokenizer {path}: {message}")]
    TokenizerLoad { path: PathBuf, message: String },
    #[error("the tokenizer {path} has no token {token:?}, which {needed_by} needs")]
    TokenUnknown { path: PathBuf, token: String, needed_by: &'static str },
    #[error("tokenizing failed: {message}")]
    Tokenize { message: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The chat template cannot be loaded or rendered (names its file and line).
    #[error(transparent)]
    ChatTemplate(#[from] vlmhost_chat_template::ChatTemplateError),
    #[error("message {index} (assistant) has an empty answer: nothing to train on")]
    EmptyAnswer { index: usize },
    #[error("the conversation has no assistant message: no token would be labelled")]
    NoAnswer,
    /// A conversation (or one of its images) the family's template cannot take, in its words.
    #[error("{0}")]
    Sample(String),
}

impl ProcessorError {
    /// This error as the ABI's error, located at `"{family} processor"`.
    pub fn into_plugin(self, family: &str) -> PluginError {
        PluginError::invalid(format!("{family} processor"), self.to_string())
    }

    /// A [`ProcessorError::Sample`].
    pub fn sample(message: impl Into<String>) -> Self {
        ProcessorError::Sample(message.into())
    }
}

/// A processor's result.
pub type Result<T, E = ProcessorError> = std::result::Result<T, E>;
