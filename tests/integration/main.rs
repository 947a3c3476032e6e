//! Cross-crate tests: the `vlmhost` binary against real plugin libraries.
//!
//! They need the workspace's plugins built: `scripts/test.sh` builds them
//! (`cargo build --workspace --examples`) before `cargo test --workspace`.

mod cli;
mod common;
mod demo;
mod deepseek_ocr;
mod fuyu;
mod generate;
mod init;
mod llava;
mod plugin_kit;
mod plugins;
mod robustness;
mod qwen2_vl;
mod train;
