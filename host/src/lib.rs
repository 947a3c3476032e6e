//! # vlmhost: a trainer for vision-language models whose families are plugins
//!
//! The host knows no model. Plugins (`cdylib`s speaking
//! [`vlmhost_plugin_api`]) serve model families; the host finds and loads
//! them ([`loader`]), checks the machine ([`doctor`], [`torch_env`]), and owns
//! everything that is the same for every family.

pub mod autocast;
pub mod cli;
pub mod compare;
pub mod doctor;
pub mod elf;
pub mod loader;
pub mod lora;
pub mod merge;
pub mod model;
pub mod optim;
pub mod config;
pub mod dataset;
pub mod generate;
pub mod init;
pub mod inspect;
pub mod paths;
pub mod patterns;
pub mod peft;
pub mod rules;
pub mod weights;
pub mod torch_env;
pub mod train;
pub mod font;
pub mod plot;
pub mod report;
pub mod synth;

pub use vlmhost_plugin_api as plugin_api;
