//! The root module every plugin library exports.

use crate::model::ModelBox;
use crate::{PluginError, PluginManifest};
use abi_stable::library::RootModule;
use abi_stable::package_version_strings;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RResult, RStr};
use abi_stable::StableAbi;

/// The plugin's table of entry points.
///
/// A prefix type: fields after the `last_prefix_field` are optional, so new
/// entry points can be appended in a minor version and older plugins still
/// load (the host then sees `None` for what they lack). Every entry point is
/// `extern "C"`, returns `RResult<_, PluginError>`, and is wrapped by
/// [`export_plugin!`](crate::export_plugin) in a panic guard.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
pub struct PluginMod {
    /// Who the plugin is and which families it serves. Cheap and side-effect
    /// free: the host calls it for every library it discovers.
    pub manifest: extern "C" fn() -> RResult<PluginManifest, PluginError>,
    /// Open the checkpoint folder `model_dir` as family `family`: parse its
    /// `config.json`, tokenizer and processor files (not the weights).
    /// `options` is a JSON object of the user's processor options (see
    /// [`ModelOptions`](crate::ModelOptions)), `{}` or empty for none.
    #[sabi(last_prefix_field)]
    pub open_model: extern "C" fn(
        family: RStr<'_>,
        model_dir: RStr<'_>,
        options: RStr<'_>,
    ) -> RResult<ModelBox, PluginError>,
    /// Write the files of a new, randomly initialised checkpoint of `family`
    /// at size `preset` (`tiny`, `small`) into the folder `dir`: config.json,
    /// tokenizer and processor files (the host initialises and writes the
    /// weights from the spec). Optional: `None` for plugins built before it.
    pub init_model:
        extern "C" fn(family: RStr<'_>, preset: RStr<'_>, dir: RStr<'_>) -> RResult<(), PluginError>,
}

impl RootModule for PluginModRef {
    abi_stable::declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "vlmhost_plugin";
    const NAME: &'static str = "vlmhost plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
