//! The smallest valid plugin: one family, nothing else. The host's tests load it,
//! copy it to make duplicates, and list it.

use vlmhost_plugin_api::{export_plugin, FamilyInfo, FamilyModel, ModelOptions, Plugin, PluginError};

pub struct Minimal;

impl Plugin for Minimal {
    fn families() -> Vec<FamilyInfo> {
        vec![FamilyInfo::new("test_minimal", "Test plugin: serves one family and nothing else")
            .model_types(["test_minimal"])
            .architectures(["TestMinimalForConditionalGeneration"])]
    }

    fn open(family: &str, _dir: &std::path::Path, _options: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
        Err(PluginError::unsupported(format!("{family} is a loader-test family without a model")))
    }
}

export_plugin!(Minimal);
