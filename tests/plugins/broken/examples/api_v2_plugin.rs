//! A plugin built against vlmhost-plugin-api 2.0.0: the host must refuse it
//! with a message naming both versions, not crash on a layout it cannot know.

use plugin_api_v2::{export_plugin, FamilyInfo, FamilyModel, ModelOptions, Plugin, PluginError};

pub struct FromTheFuture;

impl Plugin for FromTheFuture {
    fn families() -> Vec<FamilyInfo> {
        vec![FamilyInfo::new("test_api_v2", "Test plugin built against plugin-api 2.0.0")]
    }

    fn open(family: &str, _dir: &std::path::Path, _options: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
        Err(PluginError::unsupported(format!("{family} is a loader-test family without a model")))
    }
}

export_plugin!(FromTheFuture);
