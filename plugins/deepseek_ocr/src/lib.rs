//! # vlmhost plugin: DeepSeek-OCR
//!
//! `deepseek-ai/DeepSeek-OCR`, loaded natively from its checkpoint (no remote
//! code, no pinned transformers): SAM ViT-B and CLIP-L encoders, the linear
//! projector with `image_newline` / `view_seperator`, and the DeepSeek-V2 MoE
//! language model ([`model`]); the resolution modes, tiling, the image-token
//! layout and the "plain" prompt format ([`processor`]). See this crate's
//! README for the conventions.
//!
//! Processor options (`--processor KEY=VALUE`): `mode` (tiny, small, base,
//! large, gundam; default gundam), or explicit `base_size`, `image_size`,
//! `crop_mode` (each overrides the mode's value).

pub mod clip;
pub mod config;
pub mod init;
pub mod model;
pub mod processor;
pub mod sam;
pub mod text;

use config::DeepseekOcrConfig;
use model::DeepseekOcr;
use processor::{DeepseekOcrProcessor, ImageOptions};
use std::path::Path;
use vlmhost_plugin_api::sample::{Sample, Speaker};
use vlmhost_plugin_api::{ModelOptions, PluginError, PreparedSample};
use vlmhost_plugin_sdk::family::{tensor_f32, tensor_i64};
use vlmhost_plugin_sdk::{About, Architecture, Family, FamilyPlugin, Init, ProcessorError};

vlmhost_plugin_api::export_plugin!(FamilyPlugin<DeepseekOcrModel>);

/// The processor options: a mode, then explicit sizes over it.
pub fn image_options(options: &ModelOptions) -> Result<ImageOptions, PluginError> {
    options.check_keys(&["mode", "base_size", "image_size", "crop_mode"])?;
    let mut o = match options.string("mode") {
        Some(mode) => ImageOptions::mode(&mode).map_err(processor_err)?,
        None => ImageOptions::GUNDAM,
    };
    if let Some(v) = options.usize("base_size")? {
        o.base_size = v;
    }
    if let Some(v) = options.usize("image_size")? {
        o.image_size = v;
    }
    if let Some(v) = options.bool("crop_mode")? {
        o.crop_mode = v;
    }
    Ok(o)
}

fn processor_err(e: ProcessorError) -> PluginError {
    e.into_plugin("deepseek_ocr")
}

/// A DeepSeek-OCR checkpoint folder, opened.
pub struct DeepseekOcrModel {
    pub model: DeepseekOcr,
    pub processor: DeepseekOcrProcessor,
}

impl DeepseekOcrModel {
    pub fn open(dir: &Path, options: &ImageOptions) -> Result<Self, PluginError> {
        let config_path = dir.join("config.json");
        let raw: serde_json::Value = std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        // deepseek_vl_v2 is also DeepSeek-VL2's model_type: tell them apart.
        let archs: Vec<&str> = raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        if !archs.is_empty() && !archs.contains(&"DeepseekOCRForCausalLM") {
            return Err(PluginError::invalid_with_hint(
                config_path.display().to_string(),
                format!("architectures is {archs:?}, not DeepseekOCRForCausalLM: this is not a DeepSeek-OCR checkpoint"),
                "DeepSeek-VL2 shares model_type deepseek_vl_v2 but is a different model, which this plugin does not serve",
            ));
        }
        let config = DeepseekOcrConfig::from_dir(dir)?;
        let processor = DeepseekOcrProcessor::from_dir(dir, *options).map_err(processor_err)?;
        let image_token_id = processor.image_token_id();
        if image_token_id >= config.text.sizes.vocab_size {
            return Err(PluginError::invalid(
                config_path.display().to_string(),
                format!(
                    "the tokenizer's <image> is id {image_token_id}, outside the vocabulary of {} tokens",
                    config.text.sizes.vocab_size
                ),
            ));
        }
        Ok(DeepseekOcrModel { model: DeepseekOcr::new(config, image_token_id), processor })
    }
}

impl Family for DeepseekOcrModel {
    const ABOUT: About =
        About::new("deepseek_ocr", "DeepSeek-OCR: SAM ViT-B + CLIP-L encoder, linear projector, DeepSeek-V2 MoE LLM", &["DeepseekOCRForCausalLM"])
            .model_types(&["deepseek_vl_v2", "DeepseekOCR"]);
    const INIT: Init = init::init;

    fn open(dir: &Path, options: &ModelOptions) -> Result<Self, PluginError> {
        DeepseekOcrModel::open(dir, &image_options(options)?)
    }

    fn arch(&self) -> &dyn Architecture {
        &self.model
    }

    fn prepare(&self, sample: &Sample) -> Result<PreparedSample, PluginError> {
        let p = self.processor.process(&sample.messages).map_err(processor_err)?;
        // A prompt to answer (it ends with the user's turn) is an OCR request:
        // without an image there is nothing to read.
        let is_prompt = sample.messages.last().is_some_and(|m| m.role == Speaker::User);
        if is_prompt && p.images.is_empty() {
            return Err(PluginError::invalid_with_hint(
                "prompt",
                "DeepSeek-OCR reads an image, and this prompt has none",
                "give the image to read (vlmhost generate --image FILE)",
            ));
        }
        let o = self.processor.options();
        let g = (if o.crop_mode { o.base_size } else { o.image_size }) as i64;
        let t = o.image_size as i64;
        let mut globals = Vec::new();
        let mut tiles = Vec::new();
        let mut grids = Vec::new();
        for img in &p.images {
            globals.extend_from_slice(&img.global);
            tiles.extend_from_slice(&img.tiles);
            grids.extend_from_slice(&[img.grid.0 as i64, img.grid.1 as i64]);
        }
        let n = p.images.len() as i64;
        let n_tiles: i64 = p.images.iter().map(|i| i.n_tiles as i64).sum();
        Ok(p.ids.into_prepared(
            p.images_seq_mask,
            vec![
                ("images_ori".into(), tensor_f32(&globals, &[n, 3, g, g])?),
                ("images_crop".into(), tensor_f32(&tiles, &[n_tiles, 3, t, t])?),
                ("images_spatial_crop".into(), tensor_i64(&grids, &[n, 2])?),
            ],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_writes_a_folder_the_plugin_opens() {
        vlmhost_plugin_sdk::init::check_presets::<DeepseekOcrModel>("deepseek_ocr", &["tiny", "small"], |name, m| {
            assert_eq!(m.model.image_token_id, 300, "{name}");
        });
    }
}
