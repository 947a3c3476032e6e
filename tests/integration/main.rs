//! Cross-crate tests: the `vlmhost` binary against real plugin libraries.
//!
//! They need the workspace's plugins built: `scripts/test.sh` builds them
//! (`cargo build --workspace --examples`) before `cargo test --workspace`.
//!
//! The families' tests live with their plugins (`plugins/<family>/tests/host/`)
//! and are registered in `families/mod.rs`, one line each.

mod cli;
mod common;
mod data_parallel;
mod demo;
mod families;
mod generate;
mod init;
mod loss;
mod plugin_kit;
mod plugins;
mod precision;
mod robustness;
mod throughput;
mod train;
