//! # vlmhost plugin: LLaVA-1.5
//!
//! CLIP ViT vision tower -> GELU MLP projector -> Llama, under the hub
//! checkpoint's parameter names (`llava-hf/llava-1.5-7b-hf`), accepting the
//! transformers >= 4.52 layout and transformers 5's `save_pretrained` layout
//! too. Preprocessing (CLIP image processor, the llava-hf chat template,
//! labels) is in [`processor`]; see this crate's README for the conventions.

pub mod config;
pub mod init;
pub mod model;
pub mod processor;

use config::LlavaConfig;
use model::Llava;
use processor::{LlavaProcessor, Message, Part, Role as Speaker};
use std::path::Path;
use tch::Tensor;
use vlmhost_plugin_api::sample::{self, Sample};
use vlmhost_plugin_api::{
    export_plugin, BatchInputs, FamilyInfo, FamilyModel, Host, ModelOptions, ModelSpec, Plugin, PluginError, PreparedSample,
};

pub struct LlavaPlugin;

impl Plugin for LlavaPlugin {
    fn families() -> Vec<FamilyInfo> {
        vec![FamilyInfo::new("llava", "LLaVA-1.5: CLIP ViT + GELU MLP projector + Llama")
            .model_types(["llava"])
            .architectures(["LlavaForConditionalGeneration"])]
    }

    fn open(_family: &str, dir: &Path, options: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
        // The CLIP processor's settings come from the checkpoint's files.
        options.check_keys(&[])?;
        Ok(Box::new(LlavaModel::open(dir)?))
    }

    fn init(_family: &str, preset: &str, dir: &Path) -> Result<(), PluginError> {
        init::init(preset, dir)
    }
}

export_plugin!(LlavaPlugin);

/// A LLaVA checkpoint folder, opened.
pub struct LlavaModel {
    pub model: Llava,
    pub processor: LlavaProcessor,
}

fn processor_err(e: processor::ProcessorError) -> PluginError {
    PluginError::invalid("llava processor", e.to_string())
}

impl LlavaModel {
    pub fn open(dir: &Path) -> Result<Self, PluginError> {
        let config = LlavaConfig::from_dir(dir)?;
        let processor = LlavaProcessor::from_dir(dir).map_err(processor_err)?;
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

/// The plugin-api sample as the processor's messages.
pub fn to_messages(sample: &Sample) -> Vec<Message> {
    sample
        .messages
        .iter()
        .map(|m| Message {
            role: match m.role {
                sample::Speaker::System => Speaker::System,
                sample::Speaker::User => Speaker::User,
                sample::Speaker::Assistant => Speaker::Assistant,
            },
            content: m
                .content
                .iter()
                .map(|p| match p {
                    sample::Part::Text { text } => Part::Text(text.clone()),
                    sample::Part::Image { path } => Part::Image(path.clone()),
                })
                .collect(),
        })
        .collect()
}

impl FamilyModel for LlavaModel {
    fn spec(&self) -> ModelSpec {
        self.model.spec.clone()
    }

    fn prepare(&self, sample: &Sample) -> Result<PreparedSample, PluginError> {
        let p = self.processor.process(&to_messages(sample)).map_err(processor_err)?;
        let (h, w) = if p.n_images > 0 { p.image_size } else { self.processor.image_config.crop_size };
        let pixel_values =
            Tensor::f_from_slice(&p.pixel_values)?.f_view([p.n_images as i64, 3, h as i64, w as i64])?;
        let image_id = self.model.config.image_token_index;
        let image_token_mask = p.input_ids.iter().map(|&t| t == image_id).collect();
        Ok(PreparedSample {
            input_ids: p.input_ids,
            labels: p.labels,
            image_token_mask,
            tensors: vec![("pixel_values".into(), pixel_values)],
        })
    }

    fn forward(&self, host: Host<'_, '_>, batch: &BatchInputs) -> Result<Tensor, PluginError> {
        self.model.forward(host, batch)
    }

    fn forward_cached(&self, host: Host<'_, '_>, batch: &BatchInputs, past: &[Tensor]) -> Result<(Tensor, Vec<Tensor>), PluginError> {
        self.model.forward_cached(host, batch, past)
    }
}
