use std::path::PathBuf;

/// Everything that can go wrong loading or rendering a chat template.
///
/// The messages name the template (its file, or `<inline>`) and, where the template engine
/// knows it, the line. The caller adds the sample with [`ChatTemplateError::in_sample`].
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A config file holds a `chat_template` this crate cannot use (wrong type, a list without `default`).
    #[error("{}: {what}", path.display())]
    BadConfig { path: PathBuf, what: String },
    /// The template does not parse (Jinja syntax), or its `{% generation %}` tags do not pair.
    #[error("chat template {name}{}: syntax error: {detail}", at_line(*line))]
    Syntax { name: String, line: Option<usize>, detail: String },
    /// The template called `raise_exception(message)`.
    #[error("chat template {name}{} raised an exception: {message}", at_line(*line))]
    Raised { name: String, line: Option<usize>, message: String },
    /// Any other failure while rendering (an undefined value used wrongly, a type error, ...).
    #[error("chat template {name}{}: render error: {detail}", at_line(*line))]
    Render { name: String, line: Option<usize>, detail: String },
    /// The messages are not what a chat template takes (not a list of objects, ...).
    #[error("chat template {name}: bad messages: {detail}")]
    Messages { name: String, detail: String },
    /// The prefix rule (templates without `{% generation %}`) does not apply: rendering the
    /// conversation up to an assistant turn is not a prefix of rendering it with that turn.
    #[error("chat template {name}: the answer of message {message} cannot be found by the prefix rule: {detail}")]
    NotAPrefix { name: String, message: usize, detail: String },
    /// The same error, in one sample of a data set.
    #[error("sample {sample}: {source}")]
    InSample {
        sample: usize,
        #[source]
        source: Box<ChatTemplateError>,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(", line {l}")).unwrap_or_default()
}

impl ChatTemplateError {
    /// The same error, naming the sample (its index in the data set) it happened in.
    pub fn in_sample(self, sample: usize) -> ChatTemplateError {
        ChatTemplateError::InSample { sample, source: Box::new(self) }
    }

    /// For `Raised`: what the template said (also inside `InSample`).
    pub fn raised_message(&self) -> Option<&str> {
        match self {
            ChatTemplateError::Raised { message, .. } => Some(message),
            ChatTemplateError::InSample { source, .. } => source.raised_message(),
            _ => None,
        }
    }
}
