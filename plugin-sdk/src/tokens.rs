//! The tokenizer of a model folder, loaded as transformers loads a fast
//! tokenizer (`tokenizer.json`, with the truncation and padding stored in it
//! turned off), its special tokens, and encoding to `i64` ids.

use crate::files::read_value;
use crate::ProcessorError;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A loaded `tokenizer.json` and where it came from (for error messages).
pub struct Tokens {
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
}

impl Tokens {
    /// `dir/tokenizer.json`; errors name the file.
    pub fn from_dir(dir: &Path) -> Result<Self, ProcessorError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ProcessorError::TokenizerMissing { path });
        }
        let load = |e: &dyn std::fmt::Display| ProcessorError::TokenizerLoad { path: path.clone(), message: e.to_string() };
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| load(&e))?;
        // transformers turns off the truncation/padding stored in tokenizer.json unless asked.
        tokenizer.with_truncation(None).map_err(|e| load(&e))?;
        tokenizer.with_padding(None);
        Ok(Tokens { tokenizer, path })
    }

    /// The id of `token`, or an error saying `needed_by` needs it.
    pub fn id(&self, token: &str, needed_by: &'static str) -> Result<i64, ProcessorError> {
        self.tokenizer.token_to_id(token).map(i64::from).ok_or_else(|| ProcessorError::TokenUnknown {
            path: self.path.clone(),
            token: token.to_owned(),
            needed_by,
        })
    }

    /// Token ids of `text`, with or without the post-processor's special tokens.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>, ProcessorError> {
        let enc = self.tokenizer.encode(text, add_special).map_err(tokenize_error)?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Token ids of `text` with the character range each came from
    /// (`offset_mapping`; tokens added by the post-processor have an empty range).
    pub fn encode_with_offsets(&self, text: &str, add_special: bool) -> Result<(Vec<i64>, Vec<(usize, usize)>), ProcessorError> {
        let enc = self.tokenizer.encode_char_offsets(text, add_special).map_err(tokenize_error)?;
        Ok((enc.get_ids().iter().map(|&i| i64::from(i)).collect(), enc.get_offsets().to_vec()))
    }
}

fn tokenize_error(e: impl std::fmt::Display) -> ProcessorError {
    ProcessorError::Tokenize { message: e.to_string() }
}

/// `tokenizer_config.json` of `dir` (`Null` when the folder has none).
pub fn tokenizer_config(dir: &Path) -> Result<Value, ProcessorError> {
    let path = dir.join("tokenizer_config.json");
    if path.is_file() {
        read_value(&path)
    } else {
        Ok(Value::Null)
    }
}

/// A special token of `tokenizer_config.json`: a string or an AddedToken dict.
pub fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}
