//! What a plugin says about itself before anything else is asked of it.

use abi_stable::std_types::{RString, RVec};
use abi_stable::StableAbi;

/// One model family a plugin serves.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct FamilyInfo {
    /// The name users pass to `--plugin` (`deepseek_ocr`, `llava`, ...):
    /// lower case, digits and `_`.
    pub name: RString,
    /// Hugging Face `config.json` `model_type` values this family reads.
    pub model_types: RVec<RString>,
    /// Hugging Face `architectures` class names this family reads.
    pub architectures: RVec<RString>,
    /// One line for `vlmhost plugins`.
    pub description: RString,
}

impl FamilyInfo {
    /// A family with a name and a one-line description.
    pub fn new(name: &str, description: &str) -> Self {
        FamilyInfo {
            name: name.into(),
            model_types: RVec::new(),
            architectures: RVec::new(),
            description: description.into(),
        }
    }

    /// The `model_type` strings served.
    pub fn model_types<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, types: I) -> Self {
        self.model_types = types.into_iter().map(|s| RString::from(s.as_ref())).collect();
        self
    }

    /// The `architectures` strings served.
    pub fn architectures<I: IntoIterator<Item = S>, S: AsRef<str>>(mut self, archs: I) -> Self {
        self.architectures = archs.into_iter().map(|s| RString::from(s.as_ref())).collect();
        self
    }

    /// Whether a family name is well formed (`[a-z][a-z0-9_]*`).
    pub fn is_valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        matches!(chars.next(), Some('a'..='z'))
            && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
    }
}

/// Everything the host needs to decide whether to use a plugin library.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PluginManifest {
    /// The plugin crate's name.
    pub plugin_name: RString,
    /// The plugin crate's version.
    pub plugin_version: RString,
    /// The `vlmhost-plugin-api` version the plugin was compiled against.
    pub api_version: RString,
    /// The libtorch version the plugin was compiled against.
    pub libtorch_version: RString,
    /// The tch version whose C wrapper the plugin carries.
    pub tch_version: RString,
    /// The families served; at least one.
    pub families: RVec<FamilyInfo>,
}
