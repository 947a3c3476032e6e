//! The model layer: a Hugging Face checkpoint opened through its family's
//! plugin, with the generic rules applied and the LoRA adapters in place.
//!
//! * [`checkpoint`] reads what a checkpoint folder says about itself and
//!   opens the plugin's model on it; [`open`] turns that into a
//!   [`HostModel`]: rules ([`rules`], [`patterns`]), weights ([`weights`]),
//!   adapters ([`lora`]).
//! * [`HostModel`] runs: it prepares samples and computes logits, with the
//!   host's side of each forward pass (`ops`) behind the ABI.
//! * [`batch`] pads samples into a batch and computes the causal-LM loss;
//!   [`generate`] decodes greedily with the plugin's key/value cache;
//!   [`autocast`] runs a closure in bf16 autocast (models with bf16 weights);
//!   [`memory`] reads the CUDA allocator's counters and the peak RSS;
//!   [`kernels`] counts which attention kernel libtorch runs, and [`flops`]
//!   the model FLOPs of a step (the formula, the pause for recomputation).
//! * [`peft`] reads and writes adapters in PEFT's format.
//! * `segments`: the plugin's segments (decoder layers, vision blocks), run
//!   plainly or with activation checkpointing ([`HostModel::backward`]).
//!
//! This layer may use [`crate::config`], [`crate::plugin`] and
//! [`crate::files`]; it knows nothing of training runs, reports or commands.

pub mod autocast;
pub mod memory;
pub mod batch;
pub mod checkpoint;
pub mod flops;
pub mod kernels;
pub mod generate;
mod host_model;
pub mod lora;
pub mod open;
mod ops;
mod segments;
pub mod patterns;
pub mod peft;
pub mod rules;
pub mod weights;

pub use batch::{causal_lm_loss, causal_lm_loss_sum, collate, labelled_rows, loss_sum_at_rows, BatchTensors};
pub use host_model::HostModel;
pub use open::{open, open_with, OpenOptions};
pub use vlmhost_plugin_api::PreparedSample;
