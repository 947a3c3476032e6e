//! # vlmhost plugin: Fuyu (encoder-free)
//!
//! `adept/fuyu-8b` and checkpoints like it: image patches go through one linear
//! layer, `vision_embed_tokens` (the projector role: there is no vision
//! encoder), straight into a Persimmon decoder ([`model`]). Preprocessing as
//! transformers' `FuyuProcessor` plus answer labels ([`processor`]); see this
//! crate's README for the conventions.
//!
//! Processor options (`--processor KEY=VALUE`): `target_height` and
//! `target_width`, the size images are downscaled to fit and padded to
//! (default: the checkpoint's, 1080x1920 for fuyu-8b; multiples of the patch size).

pub mod config;
pub mod init;
pub mod model;
pub mod processor;

use config::FuyuConfig;
use model::Fuyu;
use processor::{FuyuProcessor, FuyuSample};
use std::path::Path;
use vlmhost_plugin_api::sample::Sample;
use vlmhost_plugin_api::{ModelOptions, PluginError, PreparedSample};
use vlmhost_plugin_sdk::family::tensor_f32;
use vlmhost_plugin_sdk::{About, Architecture, Family, FamilyPlugin, Init, ProcessorError};

vlmhost_plugin_api::export_plugin!(FamilyPlugin<FuyuModel>);

/// The target size from the processor options, if given (both or neither).
pub fn target_size(options: &ModelOptions) -> Result<Option<(usize, usize)>, PluginError> {
    options.check_keys(&["target_height", "target_width"])?;
    match (options.usize("target_height")?, options.usize("target_width")?) {
        (None, None) => Ok(None),
        (Some(h), Some(w)) => Ok(Some((h, w))),
        _ => Err(PluginError::invalid_with_hint(
            "processor options",
            "target_height and target_width go together",
            "give both, e.g. --processor target_height=540 --processor target_width=960",
        )),
    }
}

fn processor_err(e: ProcessorError) -> PluginError {
    e.into_plugin("fuyu")
}

/// A Fuyu checkpoint folder, opened.
pub struct FuyuModel {
    pub model: Fuyu,
    pub processor: FuyuProcessor,
}

impl Family for FuyuModel {
    const ABOUT: About = About::new("fuyu", "Fuyu: encoder-free, linear patch projector + Persimmon decoder", &["FuyuForCausalLM"]);
    const INIT: Init = init::init;

    fn open(dir: &Path, options: &ModelOptions) -> Result<Self, PluginError> {
        let size = target_size(options)?;
        let config = FuyuConfig::from_dir(dir)?;
        let processor = FuyuProcessor::from_dir(dir, size).map_err(processor_err)?;
        let config_path = dir.join("config.json").display().to_string();
        if processor.image_token_id != config.image_token_id {
            return Err(PluginError::invalid(
                config_path,
                format!("image_token_id is {} but the tokenizer's |SPEAKER| is {}", config.image_token_id, processor.image_token_id),
            ));
        }
        let (ph, pw) = processor.image_config.patch;
        if (ph as i64, pw as i64) != (config.patch_size, config.patch_size) {
            return Err(PluginError::invalid(
                config_path,
                format!("patch_size is {} but the image processor's patch_size is {ph}x{pw}", config.patch_size),
            ));
        }
        if config.num_channels != 3 {
            return Err(PluginError::invalid(config_path, format!("num_channels is {}; images are RGB (3)", config.num_channels)));
        }
        Ok(FuyuModel { model: Fuyu::new(config), processor })
    }

    fn arch(&self) -> &dyn Architecture {
        &self.model
    }

    fn prepare(&self, sample: &Sample) -> Result<PreparedSample, PluginError> {
        let s = FuyuSample::from_messages(&sample.messages).map_err(processor_err)?;
        let p = self.processor.process(&s).map_err(processor_err)?;
        let n = (p.image.rows * p.image.cols) as i64;
        let pixel_values = tensor_f32(&p.image.patches, &[n, self.model.config.patch_features()])?;
        Ok(p.ids.into_prepared(p.image_token_mask, vec![("pixel_values".into(), pixel_values)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_writes_a_folder_the_plugin_opens() {
        vlmhost_plugin_sdk::init::check_presets::<FuyuModel>("fuyu", &["tiny", "small"], |name, m| {
            assert_eq!(m.processor.image_token_id, init::SPEAKER, "{name}");
        });
    }
}
