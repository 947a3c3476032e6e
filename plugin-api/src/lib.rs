//! # vlmhost-plugin-api: the ABI between the vlmhost host and its plugins
//!
//! A plugin is a `cdylib` that serves one or more model *families* (LLaVA,
//! Qwen2-VL, ...). The host loads it at run time with [`abi_stable`], which
//! checks, before any plugin code runs, that both sides agree on the layout
//! of every type that crosses the boundary and on this crate's version.
//!
//! ## What crosses the boundary
//! * [`PluginMod`], the root module: a prefix type, so fields appended in a
//!   later minor version are optional for older plugins.
//! * [`PluginManifest`] / [`FamilyInfo`]: who the plugin is, which families and
//!   Hugging Face `model_type` / `architectures` strings it serves, and what
//!   it was built against (this crate's version and the libtorch version).
//! * [`PluginError`]: an FFI-safe error enum. Every entry point returns
//!   `RResult<_, PluginError>`; a panic inside a plugin is caught at the
//!   boundary and becomes [`PluginError::Panicked`] (never an abort).
//! * [`TensorRef`] / [`OwnedTensor`]: opaque tensor handles; see
//!   [`tensor`] for the ownership rule.
//!
//! ## Versions
//! abi_stable refuses a plugin whose `vlmhost-plugin-api` version is not
//! semver-compatible with the host's (for 0.x, the minor number acts as the
//! major). abi_stable cannot see libtorch, so the manifest also carries
//! [`LIBTORCH_VERSION`]; the host refuses a plugin built against another
//! libtorch release (mixing two libtorch builds in one process crashes).
//!
//! ## Writing a plugin
//! ```text
//! use std::path::Path;
//! use vlmhost_plugin_api::{export_plugin, FamilyInfo, FamilyModel, ModelOptions, Plugin, PluginError};
//!
//! pub struct MyPlugin;
//! impl Plugin for MyPlugin {
//!     fn families() -> Vec<FamilyInfo> {
//!         vec![FamilyInfo::new("my_family", "My VLM: ViT + MLP + Llama")
//!             .model_types(["my_vlm"])
//!             .architectures(["MyVlmForConditionalGeneration"])]
//!     }
//!     fn open(family: &str, dir: &Path, options: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
//!         options.check_keys(&[])?;
//!         Ok(Box::new(MyModel::from_dir(dir)?))
//!     }
//! }
//! export_plugin!(MyPlugin);
//! ```
//! The families in `plugins/` implement `vlmhost_plugin_sdk::Family` instead,
//! which brings the plugin glue, and export `FamilyPlugin<TheirModel>`.
//! The crate needs `crate-type = ["cdylib", "rlib"]` and, in its `build.rs`,
//! `vlmhost_build::link_libtorch()` (so a stand-alone plugin links CUDA for real).

pub mod builder;
pub mod error;
pub mod host;
pub mod init;
pub mod limits;
pub mod manifest;
pub mod model;
pub mod ops;
pub mod options;
pub mod root;
pub mod sample;
pub mod sdk;
pub mod tensor;

pub use builder::{LinearId, ParamId, SpecBuilder, SpecPath};
pub use error::PluginError;
pub use host::Host;
pub use manifest::{FamilyInfo, PluginManifest};
pub use model::{ModelSpec, ParamKind, Role, Segment};
pub use options::ModelOptions;
pub use root::{PluginMod, PluginModRef};
pub use sdk::{BatchInputs, FamilyModel, Plugin, PreparedSample, LOGIT_ROWS};
pub use tensor::{OwnedTensor, TensorRef};

#[doc(hidden)]
pub use abi_stable;

/// This crate's version: the plugin ABI version.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The libtorch release this crate was compiled against (`2.11.0+cu130`, say).
pub const LIBTORCH_VERSION: &str = env!("VLMHOST_LIBTORCH_VERSION");

/// The tch release whose C wrapper both sides use.
pub const TCH_VERSION: &str = "0.24.0";

/// `major.minor.patch` of a libtorch version string, without the local part
/// (`2.11.0+cu130` -> `2.11.0`). Builds of one release for different CUDA
/// versions (or the CPU) share the C++ ABI the plugins use.
pub fn libtorch_release(version: &str) -> &str {
    version.split('+').next().unwrap_or(version).trim()
}

/// The part of [`API_VERSION`] that must match between host and plugin: the
/// major number, or for `0.x` versions the minor one (semver's rule, which
/// abi_stable also applies).
pub fn api_compat_key(version: &str) -> String {
    let mut parts = version.split('.');
    let major = parts.next().unwrap_or("");
    let minor = parts.next().unwrap_or("");
    if major == "0" {
        format!("0.{minor}")
    } else {
        major.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_strips_local_version() {
        assert_eq!(libtorch_release("2.11.0+cu130"), "2.11.0");
        assert_eq!(libtorch_release("2.11.0"), "2.11.0");
    }

    #[test]
    fn compat_key_follows_semver() {
        assert_eq!(api_compat_key("0.1.3"), "0.1");
        assert_eq!(api_compat_key("2.4.0"), "2");
        assert_ne!(api_compat_key("0.1.0"), api_compat_key("0.2.0"));
    }

    #[test]
    fn built_against_a_known_libtorch() {
        assert_ne!(LIBTORCH_VERSION, "unknown", "LIBTORCH was not readable at build time");
        assert_eq!(libtorch_release(LIBTORCH_VERSION), "2.11.0");
    }
}
