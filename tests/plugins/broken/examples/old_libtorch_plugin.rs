//! A plugin that reports another libtorch release than the host's. (Building
//! one for real needs a second libtorch; the report is what the host checks.)

use vlmhost_plugin_api::{export_plugin, FamilyInfo, FamilyModel, ModelOptions, Plugin, PluginError};

pub struct OldTorch;

impl Plugin for OldTorch {
    fn families() -> Vec<FamilyInfo> {
        vec![FamilyInfo::new("test_old_libtorch", "Test plugin reporting libtorch 1.13.1")]
    }

    fn open(family: &str, _dir: &std::path::Path, _options: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
        Err(PluginError::unsupported(format!("{family} is a loader-test family without a model")))
    }
}

export_plugin!(OldTorch, __report_libtorch_version = "1.13.1+cpu");
