//! # vlmhost plugin: LLaVA-1.5
//!
//! CLIP ViT vision tower -> GELU MLP projector -> Llama, under the hub
//! checkpoint's parameter names (`llava-hf/llava-1.5-7b-hf`), accepting the
//! transformers >= 4.52 layout and transformers 5's `save_pretrained` layout
//! too. [`config`] reads `config.json`, [`model`] is the architecture,
//! [`processor`] the preprocessing (CLIP image processor, the llava-hf chat
//! template, labels), [`init`] writes new checkpoints; see this crate's
//! README for the conventions.

pub mod config;
pub mod init;
pub mod model;
pub mod processor;

use config::LlavaConfig;
use model::Llava;
use processor::LlavaProcessor;
use std::path::Path;
use vlmhost_plugin_api::sample::Sample;
use vlmhost_plugin_api::{ModelOptions, PluginError, PreparedSample};
use vlmhost_plugin_sdk::family::tensor_f32;
use vlmhost_plugin_sdk::{About, Architecture, CommonOptions, Family, FamilyPlugin, Init, ProcessorError};

vlmhost_plugin_api::export_plugin!(FamilyPlugin<LlavaModel>);

/// A LLaVA checkpoint folder, opened.
pub struct LlavaModel {
    pub model: Llava,
    pub processor: LlavaProcessor,
}

fn processor_err(e: ProcessorError) -> PluginError {
    e.into_plugin("llava")
}

impl LlavaModel {
    /// Opens the checkpoint in `dir`, with the user's chat template file instead of the checkpoint's when given.
    pub fn open_with_template(dir: &Path, chat_template: Option<&Path>) -> Result<Self, PluginError> {
        let config = LlavaConfig::from_dir(dir)?;
        let processor = LlavaProcessor::from_dir_with(dir, chat_template).map_err(processor_err)?;
        if processor.image_token_id as i64 != config.image_token_index {
            return Err(PluginError::invalid(
                dir.join("config.json").display().to_string(),
                format!(
                    "image_token_index is {} but the tokenizer's {:?} is {}",
                    config.image_token_index, processor.image_token, processor.image_token_id
                ),
            ));
        }
        Ok(LlavaModel { model: Llava::new(config), processor })
    }
}

impl Family for LlavaModel {
    const ABOUT: About = About::new("llava", "LLaVA-1.5: CLIP ViT + GELU MLP projector + Llama", &["LlavaForConditionalGeneration"]);
    const INIT: Init = init::init;

    fn open(dir: &Path, options: &ModelOptions) -> Result<Self, PluginError> {
        // The CLIP processor's settings come from the checkpoint's files.
        options.check_keys(&[])?;
        LlavaModel::open_with_template(dir, None)
    }

    fn open_with(dir: &Path, options: &ModelOptions, common: &CommonOptions) -> Result<Self, PluginError> {
        // The chat template (common option `chat_template`) is rendered by the SDK.
        options.check_keys(&[])?;
        LlavaModel::open_with_template(dir, common.chat_template.as_deref())
    }

    fn arch(&self) -> &dyn Architecture {
        &self.model
    }

    fn prepare(&self, sample: &Sample) -> Result<PreparedSample, PluginError> {
        let p = self.processor.process(&sample.messages).map_err(processor_err)?;
        let (h, w) = if p.n_images > 0 { p.image_size } else { self.processor.image_config.crop_size };
        let pixel_values = tensor_f32(&p.pixel_values, &[p.n_images as i64, 3, h as i64, w as i64])?;
        let image_token_mask = p.ids.mask_of(self.model.config.image_token_index);
        Ok(p.ids.into_prepared(image_token_mask, vec![("pixel_values".into(), pixel_values)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_writes_a_folder_the_plugin_opens() {
        vlmhost_plugin_sdk::init::check_presets::<LlavaModel>("llava", &["tiny", "small"], |name, m| {
            assert_eq!(m.processor.image_token_id as i64, init::IMAGE, "{name}");
        });
    }
}
