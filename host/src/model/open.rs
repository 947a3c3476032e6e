//! Opening a model: resolve the plugin, probe the checkpoint, choose the
//! family, open the plugin's model, check its spec, apply the rules (roles,
//! mode, strategies, LoRA targets), load the weights and create the adapters.
//! The result is a [`HostModel`], which runs.

use super::checkpoint::{checkpoint_info, choose_family, open_family_model};
use super::lora::LoraAdapter;
use super::rules;
use super::weights::{self, LoadOptions};
use super::HostModel;
use crate::config::{Mode, TrainConfig};
use crate::plugin::loader;
use anyhow::{bail, Result};
use std::path::PathBuf;
use tch::{Device, Kind};
use vlmhost_plugin_api::model::{ModelSpec, ModuleKind};
use vlmhost_plugin_api::Role;

/// How to open a model.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub plugin: String,
    pub model_dir: PathBuf,
    pub mode: Mode,
    /// The dtype the base weights are stored in. Under a 16-bit kind (bf16:
    /// `precision: bf16`) the trainable tensors keep fp32 master weights
    /// ([`weights::master_kind`]) and the model runs under bf16 autocast.
    pub kind: Kind,
    pub device: Device,
    pub allow_missing: bool,
    /// Load the weights (false: check the checkpoint's keys and shapes only).
    pub load_weights: bool,
    /// The processor options passed to the plugin.
    pub processor: serde_json::Map<String, serde_json::Value>,
}

/// Resolve the plugin, open the checkpoint, apply the rules of `config` in
/// `opts.mode`, load the weights.
pub fn open(opts: &OpenOptions, config: &TrainConfig) -> Result<HostModel> {
    open_with(opts, |_, _| Ok((config.clone(), opts.mode)))
}

/// As [`open`], with the rules chosen from the model's spec and roles (an
/// adapter decides them, say).
pub fn open_with(
    opts: &OpenOptions,
    choose: impl FnOnce(&ModelSpec, &[Role]) -> Result<(TrainConfig, Mode)>,
) -> Result<HostModel> {
    let plugin = loader::resolve(&opts.plugin)?;
    let info = checkpoint_info(&opts.model_dir)?;
    let family = choose_family(&plugin, &info, &opts.model_dir)?;
    let model = open_family_model(&plugin, &family, &opts.model_dir, &opts.processor)?;
    let spec = model.spec();
    validate_spec(&spec, &family)?;
    let roles = rules::assign_roles(&spec)?;
    let (config, mode) = choose(&spec, &roles)?;
    let plan = rules::plan(&spec, &config, mode)?;
    let load = LoadOptions { kind: opts.kind, device: opts.device, allow_missing: opts.allow_missing };
    let (mut params, load_report) = if opts.load_weights {
        weights::load_with_masters(&opts.model_dir, &spec, load, &plan.trainable)?
    } else {
        (Vec::new(), weights::check(&opts.model_dir, &spec, opts.allow_missing)?)
    };
    for (i, p) in params.iter_mut().enumerate() {
        let _ = p.set_requires_grad(plan.trainable[i]);
    }
    // Adapters are initialised from libtorch's generator: seed it, so a run
    // (and its resume) starts from the same adapters.
    tch::manual_seed(config.train.seed as i64);
    let lora = &config.lora;
    let mut adapters: Vec<Option<LoraAdapter>> = (0..spec.modules.len()).map(|_| None).collect();
    for &m in &plan.lora_modules {
        let s = &spec.modules[m];
        // Trainable: fp32 master weights under 16-bit base weights.
        let kind = weights::master_kind(opts.kind);
        adapters[m] = Some(LoraAdapter::new(s.in_features, s.out_features, lora.r, lora.scaling(), lora.lora_dropout, kind, opts.device));
    }
    Ok(HostModel {
        plugin,
        family,
        model_dir: opts.model_dir.clone(),
        model,
        spec,
        plan,
        params,
        adapters,
        load_report,
        kind: opts.kind,
        device: opts.device,
        id: super::segments::next_model_id(),
        gradient_checkpointing: config.train.gradient_checkpointing,
        recomputed: Default::default(),
        config,
    })
}

/// Refuse a spec whose indices or shapes contradict themselves.
fn validate_spec(spec: &ModelSpec, family: &str) -> Result<()> {
    if spec.params.is_empty() {
        bail!("the {family} plugin reported no parameters ({})", spec.family);
    }
    let n = spec.params.len() as u32;
    for m in spec.modules.iter() {
        if m.weight >= n || (m.bias != u32::MAX && m.bias >= n) {
            bail!("the {family} plugin reported module {} with a parameter index out of range", m.name);
        }
        if m.kind == ModuleKind::Linear {
            let w = &spec.params[m.weight as usize];
            if w.shape.as_slice() != [m.out_features, m.in_features] {
                bail!("the {family} plugin reported linear {} as {}x{} but its weight as {:?}", m.name, m.out_features, m.in_features, w.shape);
            }
        }
    }
    Ok(())
}
