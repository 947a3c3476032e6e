//! # vlmhost plugin: Qwen2-VL and Qwen2.5-VL
//!
//! ViT with 2-D RoPE ([`vision`]) -> 2x2 patch merger (the projector, inside
//! `visual.*`) -> Qwen2 with M-RoPE ([`text`], [`rope`]), under the hub
//! checkpoint's names (`Qwen/Qwen2-VL-2B-Instruct`), accepting transformers 5's
//! in-memory layout too ([`model`]). Preprocessing (smart resize, patches,
//! the ChatML template, labels) is in [`processor`]; see this crate's README.
//!
//! The library serves two families: `qwen2_vl` ([`Qwen2VlModel`]) and
//! `qwen2_5_vl` ([`Qwen25VlModel`], `Qwen/Qwen2.5-VL-*`, olmOCR-2), whose
//! only difference is the vision tower ([`vision25`]: RMSNorm, gated MLP,
//! windowed attention); the processor, positions and language model are shared.
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
pub mod vision25;

use config::{Qwen2VlConfig, Variant};
use model::Qwen2Vl;
use processor::{PixelOptions, Qwen2VlProcessor};
use std::path::Path;
use vlmhost_plugin_api::sample::Sample;
use vlmhost_plugin_api::{FamilyInfo, FamilyModel, ModelOptions, Plugin, PluginError, PreparedSample};
use vlmhost_plugin_sdk::family::{tensor_f32, tensor_i64};
use vlmhost_plugin_sdk::{About, Architecture, CommonOptions, Family, FamilyPlugin, Init, ProcessorError};

vlmhost_plugin_api::export_plugin!(Qwen2VlPlugin);

/// The library's plugin: the families `qwen2_vl` and `qwen2_5_vl`, each
/// served as [`FamilyPlugin`] serves one.
pub struct Qwen2VlPlugin;

impl Plugin for Qwen2VlPlugin {
    fn families() -> Vec<FamilyInfo> {
        vec![Qwen2VlModel::ABOUT.info(), Qwen25VlModel::ABOUT.info()]
    }

    fn open(family: &str, dir: &Path, options: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
        if family == Qwen25VlModel::ABOUT.name {
            FamilyPlugin::<Qwen25VlModel>::open(family, dir, options)
        } else {
            FamilyPlugin::<Qwen2VlModel>::open(family, dir, options)
        }
    }

    fn init(family: &str, preset: &str, dir: &Path) -> Result<(), PluginError> {
        if family == Qwen25VlModel::ABOUT.name {
            FamilyPlugin::<Qwen25VlModel>::init(family, preset, dir)
        } else {
            FamilyPlugin::<Qwen2VlModel>::init(family, preset, dir)
        }
    }
}

/// The processor options this family accepts.
pub fn pixel_options(options: &ModelOptions) -> Result<PixelOptions, PluginError> {
    options.check_keys(&["min_pixels", "max_pixels"])?;
    Ok(PixelOptions { min_pixels: options.usize("min_pixels")?, max_pixels: options.usize("max_pixels")? })
}

/// A processor error, filed under the family (`qwen2_vl processor`, `qwen2_5_vl processor`).
fn processor_err(variant: Variant) -> impl Fn(ProcessorError) -> PluginError {
    move |e| e.into_plugin(variant.family())
}

/// A Qwen2-VL (or, inside [`Qwen25VlModel`], Qwen2.5-VL) checkpoint folder, opened.
pub struct Qwen2VlModel {
    pub model: Qwen2Vl,
    pub processor: Qwen2VlProcessor,
}

impl Qwen2VlModel {
    /// Opens the checkpoint in `dir`, with the user's chat template file instead of the checkpoint's when given.
    pub fn open_with_template(dir: &Path, options: PixelOptions, chat_template: Option<&Path>) -> Result<Self, PluginError> {
        Self::open_variant(dir, options, chat_template, Variant::Qwen2Vl)
    }

    /// Opens the checkpoint in `dir`, whose `model_type` must be `variant`'s.
    pub fn open_variant(dir: &Path, options: PixelOptions, chat_template: Option<&Path>, variant: Variant) -> Result<Self, PluginError> {
        let config = Qwen2VlConfig::from_dir(dir)?;
        if config.variant != variant {
            return Err(PluginError::invalid_with_hint(
                format!("{}: model_type", dir.join("config.json").display()),
                format!("{:?}, but this is the {} family", config.variant.family(), variant.family()),
                format!("open it as the {} family (--plugin {})", config.variant.family(), config.variant.family()),
            ));
        }
        let processor = Qwen2VlProcessor::from_dir_with(dir, options, chat_template).map_err(processor_err(variant))?;
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
        let p = self.processor.process(&sample.messages).map_err(processor_err(self.model.config.variant))?;
        let dim = self.processor.image_config.patch_dim() as i64;
        let pixel_values = tensor_f32(&p.pixel_values, &[p.pixel_values.len() as i64 / dim, dim])?;
        let flat: Vec<i64> = p.grids.iter().flatten().copied().collect();
        let grids = tensor_i64(&flat, &[p.grids.len() as i64, 3])?;
        let image_token_mask = p.ids.mask_of(self.processor.image_token_id);
        Ok(p.ids.into_prepared(image_token_mask, vec![("pixel_values".into(), pixel_values), ("image_grid_thw".into(), grids)]))
    }
}

/// A Qwen2.5-VL checkpoint folder, opened (`model_type: qwen2_5_vl`): the
/// same model as [`Qwen2VlModel`] but for the vision tower ([`vision25`]).
pub struct Qwen25VlModel(pub Qwen2VlModel);

impl Family for Qwen25VlModel {
    const ABOUT: About = About::new(
        "qwen2_5_vl",
        "Qwen2.5-VL: windowed ViT (RMSNorm, gated SiLU MLP, 2-D RoPE) + 2x2 patch merger + Qwen2 with M-RoPE",
        &["Qwen2_5_VLForConditionalGeneration"],
    );
    const INIT: Init = init::init_qwen2_5_vl;

    fn open(dir: &Path, options: &ModelOptions) -> Result<Self, PluginError> {
        Qwen2VlModel::open_variant(dir, pixel_options(options)?, None, Variant::Qwen25Vl).map(Qwen25VlModel)
    }

    fn open_with(dir: &Path, options: &ModelOptions, common: &CommonOptions) -> Result<Self, PluginError> {
        Qwen2VlModel::open_variant(dir, pixel_options(options)?, common.chat_template.as_deref(), Variant::Qwen25Vl).map(Qwen25VlModel)
    }

    fn arch(&self) -> &dyn Architecture {
        self.0.arch()
    }

    fn prepare(&self, sample: &Sample) -> Result<PreparedSample, PluginError> {
        self.0.prepare(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_qwen2_5_vl_preset_writes_a_folder_the_plugin_opens() {
        vlmhost_plugin_sdk::init::check_presets::<Qwen25VlModel>("qwen2_5_vl", &["tiny", "small"], |name, m| {
            assert_eq!(m.0.processor.image_token_id, init::IMAGE_PAD, "{name}");
            assert_eq!(m.0.model.config.variant, Variant::Qwen25Vl, "{name}");
        });
    }

    #[test]
    fn each_family_refuses_the_other_model_type() {
        let dir = std::env::temp_dir().join(format!("vlmhost-qwen-variant-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        init::init("tiny", &dir).unwrap();
        let e = Qwen25VlModel::open(&dir, &Default::default()).err().unwrap().to_string();
        assert!(e.contains("model_type") && e.contains("--plugin qwen2_vl"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_preset_writes_a_folder_the_plugin_opens() {
        vlmhost_plugin_sdk::init::check_presets::<Qwen2VlModel>("qwen2_vl", &["tiny", "small"], |name, m| {
            assert_eq!(m.processor.image_token_id, init::IMAGE_PAD, "{name}");
        });
    }
}
