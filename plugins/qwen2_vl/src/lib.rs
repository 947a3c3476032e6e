//! # vlmhost plugin: Qwen2-VL
//!
//! ViT with 2-D RoPE ([`vision`]) -> 2x2 patch merger (the projector, inside
//! `visual.*`) -> Qwen2 with M-RoPE ([`text`], [`rope`]), under the hub
//! checkpoint's names (`Qwen/Qwen2-VL-2B-Instruct`), accepting transformers 5's
//! in-memory layout too ([`model`]). Preprocessing (smart resize, patches,
//! the ChatML template, labels) is in [`processor`]; see this crate's README.
//!
//! Processor options (`--processor KEY=VALUE`): `min_pixels`, `max_pixels`
//! (pixels per image after resizing; the default `max_pixels` is capped at
//! [`processor::DEFAULT_MAX_PIXELS`]).

pub mod config;
pub mod init;
pub mod model;
pub mod processor;
pub mod rope;
pub mod text;
pub mod vision;

use config::Qwen2VlConfig;
use model::Qwen2Vl;
use processor::{PixelOptions, Qwen2VlProcessor};
use std::path::Path;
use vlmhost_plugin_api::sample::Sample;
use vlmhost_plugin_api::{ModelOptions, PluginError, PreparedSample};
use vlmhost_plugin_sdk::family::{tensor_f32, tensor_i64};
use vlmhost_plugin_sdk::{About, Architecture, CommonOptions, Family, FamilyPlugin, Init, ProcessorError};

vlmhost_plugin_api::export_plugin!(FamilyPlugin<Qwen2VlModel>);

/// The processor options this family accepts.
pub fn pixel_options(options: &ModelOptions) -> Result<PixelOptions, PluginError> {
    options.check_keys(&["min_pixels", "max_pixels"])?;
    Ok(PixelOptions { min_pixels: options.usize("min_pixels")?, max_pixels: options.usize("max_pixels")? })
}

fn processor_err(e: ProcessorError) -> PluginError {
    e.into_plugin("qwen2_vl")
}

/// A Qwen2-VL checkpoint folder, opened.
pub struct Qwen2VlModel {
    pub model: Qwen2Vl,
    pub processor: Qwen2VlProcessor,
}

impl Qwen2VlModel {
    /// Opens the checkpoint in `dir`, with the user's chat template file instead of the checkpoint's when given.
    pub fn open_with_template(dir: &Path, options: PixelOptions, chat_template: Option<&Path>) -> Result<Self, PluginError> {
        let config = Qwen2VlConfig::from_dir(dir)?;
        let processor = Qwen2VlProcessor::from_dir_with(dir, options, chat_template).map_err(processor_err)?;
        let config_path = dir.join("config.json").display().to_string();
        for (key, in_config, in_tokenizer) in [
            ("image_token_id", config.image_token_id, processor.image_token_id),
            ("vision_start_token_id", config.vision_start_token_id, processor.vision_start_id),
            ("vision_end_token_id", config.vision_end_token_id, processor.vision_end_id),
        ] {
            if in_config != in_tokenizer {
                return Err(PluginError::invalid_with_hint(
                    format!("{config_path}: {key}"),
                    format!("{in_config}, but the tokenizer's token is {in_tokenizer}"),
                    "the model folder's config.json and tokenizer.json come from different checkpoints",
                ));
            }
        }
        let ic = &processor.image_config;
        let v = &config.vision;
        if (ic.patch_size, ic.temporal_patch_size, ic.merge_size)
            != (v.patch_size as usize, v.temporal_patch_size as usize, v.spatial_merge_size as usize)
            || v.in_channels != 3
        {
            return Err(PluginError::invalid(
                dir.join("preprocessor_config.json").display().to_string(),
                format!(
                    "patch_size {}, temporal_patch_size {}, merge_size {} differ from config.json's vision_config \
                     ({}, {}, {}, {} channels)",
                    ic.patch_size, ic.temporal_patch_size, ic.merge_size, v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.in_channels
                ),
            ));
        }
        Ok(Qwen2VlModel { model: Qwen2Vl::new(config), processor })
    }
}

impl Family for Qwen2VlModel {
    const ABOUT: About = About::new("qwen2_vl", "Qwen2-VL: ViT with 2-D RoPE + 2x2 patch merger + Qwen2 with M-RoPE", &["Qwen2VLForConditionalGeneration"]);
    const INIT: Init = init::init;

    fn open(dir: &Path, options: &ModelOptions) -> Result<Self, PluginError> {
        Qwen2VlModel::open_with_template(dir, pixel_options(options)?, None)
    }

    fn open_with(dir: &Path, options: &ModelOptions, common: &CommonOptions) -> Result<Self, PluginError> {
        // The chat template (common option `chat_template`) is rendered by the SDK.
        Qwen2VlModel::open_with_template(dir, pixel_options(options)?, common.chat_template.as_deref())
    }

    fn arch(&self) -> &dyn Architecture {
        &self.model
    }

    fn prepare(&self, sample: &Sample) -> Result<PreparedSample, PluginError> {
        let p = self.processor.process(&sample.messages).map_err(processor_err)?;
        let dim = self.processor.image_config.patch_dim() as i64;
        let pixel_values = tensor_f32(&p.pixel_values, &[p.pixel_values.len() as i64 / dim, dim])?;
        let flat: Vec<i64> = p.grids.iter().flatten().copied().collect();
        let grids = tensor_i64(&flat, &[p.grids.len() as i64, 3])?;
        let image_token_mask = p.ids.mask_of(self.processor.image_token_id);
        Ok(p.ids.into_prepared(image_token_mask, vec![("pixel_values".into(), pixel_values), ("image_grid_thw".into(), grids)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_writes_a_folder_the_plugin_opens() {
        vlmhost_plugin_sdk::init::check_presets::<Qwen2VlModel>("qwen2_vl", &["tiny", "small"], |name, m| {
            assert_eq!(m.processor.image_token_id, init::IMAGE_PAD, "{name}");
        });
    }
}
