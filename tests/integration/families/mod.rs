//! The families, one table-driven harness: each family's plugin and fixture
//! described once ([`Family`]), one generic body per parity check
//! ([`checks`]), and one `#[test]` per (family, check) stamped out by
//! [`checks!`] in the family's own file.
//!
//! A family lives in `plugins/<family>/tests/host/mod.rs` (a subfolder, so
//! cargo does not take it for the plugin crate's own integration test): its
//! descriptor (`pub fn family() -> Family`), the checks it runs with their
//! data, and the tests only it has. It is compiled into this one binary
//! (libtorch linked once) by its line in [`registry!`] below, the only line
//! of the tests a new family adds; `init.rs` and `plugins.rs` read the
//! families from [`all`].
//!
//! Host calls go through the harness: [`prelude`] names the host's types in
//! one place.

pub mod checks;
mod family;

pub use family::*;

/// What a family's file (and a check) needs: the host's types, the harness,
/// the tolerance helpers.
pub mod prelude {
    pub use super::checks::{forward_matches, train_and_check_frozen, window};
    pub use super::family::*;
    pub use crate::common::*;
    pub use std::collections::HashMap;
    pub use std::path::{Path, PathBuf};
    pub use tch::{Device, Kind, Tensor};
    pub use vlmhost::config::{Mode, Strategy, TrainConfig};
    pub use vlmhost::model::{causal_lm_loss, BatchTensors, HostModel, OpenOptions, PreparedSample};
    pub use vlmhost::plugin_api::Role;
    pub use vlmhost::model::weights;
}

/// One `#[test]` per check a family runs, named after the check, whose body
/// is the generic one in [`checks`] with the family's data:
///
/// ```ignore
/// checks! { family();
///     logits_and_loss_match_transformers,
///     padded_batch_matches_transformers(PaddedBatch { reference: "batch_0_1.safetensors", samples: &[0, 1] }),
/// }
/// ```
///
/// makes `fn logits_and_loss_match_transformers() { checks::logits_and_loss_match_transformers(&family()) }`
/// and `fn padded_batch_matches_transformers() { checks::padded_batch_matches_transformers(&family(), PaddedBatch { .. }) }`.
macro_rules! checks {
    ($family:expr; $($check:ident $(($($data:expr),* $(,)?))?),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                $crate::families::checks::$check(&$family $($(, $data)*)?);
            }
        )*
    };
}

/// The registered families: `name => "its file"`, one line each.
macro_rules! registry {
    ($($name:ident => $file:literal,)*) => {
        $(#[path = $file] pub mod $name;)*

        /// Every registered family, in registration order.
        pub fn all() -> Vec<Family> {
            vec![$($name::family()),*]
        }
    };
}

registry! {
    deepseek_ocr => "../../../plugins/deepseek_ocr/tests/host/mod.rs",
    fuyu => "../../../plugins/fuyu/tests/host/mod.rs",
    llava => "../../../plugins/llava/tests/host/mod.rs",
    qwen2_vl => "../../../plugins/qwen2_vl/tests/host/mod.rs",
    qwen2_5_vl => "../../../plugins/qwen2_vl/tests/host_qwen2_5_vl/mod.rs",
}

/// The registered family named `name`.
pub fn family(name: &str) -> Family {
    all().into_iter().find(|f| f.name == name).unwrap_or_else(|| panic!("no family {name:?} is registered"))
}
