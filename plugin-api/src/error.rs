//! The FFI-safe error every plugin entry point returns.

use abi_stable::std_types::RString;
use abi_stable::StableAbi;
use std::fmt;

/// An error raised inside a plugin, carried across the ABI.
///
/// Each variant says *what* went wrong; `location` fields say *where* (a file,
/// a `config.json` key, a sample index) and `hint` fields what to do about it.
/// Adding a variant changes the layout: that is a plugin-api version bump.
#[repr(C, u8)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub enum PluginError {
    /// Plugin code panicked; the panic was caught at the ABI boundary.
    Panicked {
        /// The panic payload, when it was a string.
        message: RString,
    },
    /// An input the plugin was given is not acceptable (a `config.json` key,
    /// a sample, an argument).
    InvalidInput {
        /// Where: a file, a key, a sample index.
        location: RString,
        /// What is wrong.
        message: RString,
        /// What to do about it (may be empty).
        hint: RString,
    },
    /// The request is valid but this plugin does not support it.
    Unsupported {
        /// What is unsupported, and why.
        message: RString,
    },
    /// Reading or writing a file failed.
    Io {
        /// The file.
        path: RString,
        /// The operating system's message.
        message: RString,
    },
    /// A libtorch operation failed (shape mismatch, out of memory, ...).
    Torch {
        /// libtorch's message.
        message: RString,
    },
}

impl PluginError {
    /// An [`PluginError::InvalidInput`] without a hint.
    pub fn invalid(location: impl Into<String>, message: impl Into<String>) -> Self {
        PluginError::InvalidInput {
            location: location.into().into(),
            message: message.into().into(),
            hint: RString::new(),
        }
    }

    /// An [`PluginError::InvalidInput`] with a hint on what to do.
    pub fn invalid_with_hint(
        location: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        PluginError::InvalidInput {
            location: location.into().into(),
            message: message.into().into(),
            hint: hint.into().into(),
        }
    }

    /// An [`PluginError::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        PluginError::Unsupported { message: message.into().into() }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginError::Panicked { message } => write!(f, "the plugin panicked: {message}"),
            PluginError::InvalidInput { location, message, hint } => {
                write!(f, "{location}: {message}")?;
                if !hint.is_empty() {
                    write!(f, " ({hint})")?;
                }
                Ok(())
            }
            PluginError::Unsupported { message } => write!(f, "unsupported: {message}"),
            PluginError::Io { path, message } => write!(f, "{path}: {message}"),
            PluginError::Torch { message } => write!(f, "libtorch: {message}"),
        }
    }
}

impl std::error::Error for PluginError {}

impl From<tch::TchError> for PluginError {
    fn from(e: tch::TchError) -> Self {
        PluginError::Torch { message: e.to_string().into() }
    }
}
