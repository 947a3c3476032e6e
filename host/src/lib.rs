//! # vlmhost: a trainer for vision-language models whose families are plugins
//!
//! The host knows no model. Plugins (`cdylib`s speaking
//! [`vlmhost_plugin_api`]) serve model families; the host owns everything
//! that is the same for every family. Its layers, each using only those
//! above it in this list (`docs/ARCHITECTURE.md` draws the picture):
//!
//! * [`config`], [`files`], [`font`]: leaves (the configuration file's schema;
//!   writing files atomically; the embedded font).
//! * [`dist`]: a leaf too: the data-parallel launch, process group and
//!   collectives over PyTorch's c10d (`csrc/dist.cpp`).
//! * [`plugin`]: finding and loading plugin libraries, the libtorch underneath.
//! * [`model`]: a checkpoint opened through its plugin, rules and LoRA
//!   applied; forward passes, the loss, greedy decoding, PEFT adapters.
//! * [`report`]: a run folder's files, metrics, OCR scores, plots, reports.
//! * [`train`]: data, optimizer, schedule, the loop, checkpoints, evaluation.
//! * [`commands`]: one module per CLI command; [`cli`] parses and dispatches.

pub mod cli;
pub mod commands;
pub mod config;
pub mod dist;
pub mod files;
pub mod font;
pub mod model;
pub mod plugin;
pub mod report;
pub mod train;

pub use vlmhost_plugin_api as plugin_api;
