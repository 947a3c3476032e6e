//! A plugin whose code panics: the panic must reach the host as an error, not
//! abort the process.

use vlmhost_plugin_api::{export_plugin, FamilyInfo, FamilyModel, ModelOptions, Plugin, PluginError};

pub struct Panicking;

impl Plugin for Panicking {
    fn families() -> Vec<FamilyInfo> {
        let families: Vec<FamilyInfo> = Vec::new();
        // An index out of bounds, as a real bug would be.
        vec![families[3].clone()]
    }

    fn open(family: &str, _dir: &std::path::Path, _options: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
        Err(PluginError::unsupported(format!("{family} is a loader-test family without a model")))
    }
}

export_plugin!(Panicking);
