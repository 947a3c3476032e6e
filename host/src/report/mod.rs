//! What a run leaves behind and how it is read back: the run folder's files
//! and metrics log ([`metrics`]), OCR scores of generated answers ([`ocr`]),
//! loss and learning-rate plots ([`plot`]) and reports of runs side by side
//! ([`runs`]).
//!
//! This layer reads and writes files; it may use [`crate::files`],
//! [`crate::font`] and the model layer's types, never the trainer or the
//! commands.

pub mod metrics;
pub mod ocr;
pub mod plot;
pub mod runs;
