//! # vlmhost-plugin-sdk: what the family plugins share above the ABI
//!
//! `vlmhost-plugin-api` is the stable, versioned ABI (and the thin plugin
//! trait over it); this crate is plain Rust that plugins link statically and
//! may change freely. A family crate is its config, its architecture, its
//! processor and one [`Family`] implementation; everything they have in
//! common lives here:
//!
//! * [`family`]: the glue: [`Family`] turns into the ABI's `Plugin` and
//!   `FamilyModel` through [`FamilyPlugin`] (one `export_plugin!` line).
//! * [`files`]: reading a checkpoint's JSON files into serde structs that
//!   mirror them, with errors that name the file and key.
//! * [`error`]: [`ProcessorError`], what every processor returns.
//! * [`tokens`]: loading `tokenizer.json` as transformers does, special tokens.
//! * [`pixels`]: rescale / normalise settings shared by the image processors.
//! * [`chat`]: the chat template (the checkpoint's or the user's, issue #17) rendered with
//!   `vlmhost-chat-template`, answers closed by the end-of-turn token, and the common
//!   processor option `chat_template`.
//! * [`labels`]: chat spans, placeholder expansion and span labelling.
//! * [`init`]: writing a new checkpoint's files, and the tests every preset passes.
//! * [`keys`]: the checkpoint key layouts a family reads and transformers 5's
//!   in-memory names, stated once.
//! * [`decoder`]: the Llama-style decoder blocks (GQA attention with the KV
//!   cache and rotary embeddings, SwiGLU MLP) and the forward-pass plumbing
//!   (masks, positions, image-feature merging) the families share.

pub mod chat;
pub mod decoder;
pub mod error;
pub mod family;
pub mod files;
pub mod init;
pub mod keys;
pub mod labels;
pub mod pixels;
pub mod tokens;

pub use error::ProcessorError;
pub use chat::CommonOptions;
pub use family::{About, Architecture, Family, FamilyPlugin, Init};

/// Label value of positions that do not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The folder of a test fixture: `$var` when set, else `default` (relative
/// to the workspace root); panics, naming both and `hint`, unless it holds
/// `marker`.
pub fn fixture_dir(var: &str, default: &str, marker: &str, hint: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os(var).map(std::path::PathBuf::from).unwrap_or_else(|| root.join(default));
    assert!(dir.join(marker).is_file(), "fixture not found at {} (set {var}, or {hint})", dir.display());
    dir
}
