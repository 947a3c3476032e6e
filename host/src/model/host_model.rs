//! A model the host holds, opened ([`super::open`]) and ready to run: the
//! plugin's architecture, the host's parameters, the plan of what trains and
//! the LoRA adapters. It prepares samples, runs forward passes (full and
//! incremental) with the host's operations, and reads and writes what trains.

use super::lora::LoraAdapter;
use super::ops::{abi_batch, Ops};
use super::rules::Plan;
use super::batch::BatchTensors;
use super::checkpoint::plugin_err;
use super::weights::LoadReport;
use crate::config::TrainConfig;
use crate::plugin::loader::LoadedPlugin;
use abi_stable::std_types::{RStr, RVec};
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vlmhost_plugin_api::model::{HostOpsRef, ModelBox, ModelSpec};
use vlmhost_plugin_api::{PluginError, PreparedSample, Role, TensorRef};

/// A tensor that trains.
pub struct Trainable {
    /// Its name in checkpoints and optimizer states.
    pub name: String,
    pub tensor: Tensor,
    pub role: Role,
    /// Whether weight decay applies (not to biases and norms).
    pub decays: bool,
}

/// A model held by the host.
pub struct HostModel {
    pub(super) plugin: Arc<LoadedPlugin>,
    pub(super) family: String,
    pub(super) model_dir: std::path::PathBuf,
    pub(super) model: ModelBox,
    pub(super) spec: ModelSpec,
    pub(super) plan: Plan,
    /// Parameters in spec order (empty when opened without weights).
    pub(super) params: Vec<Tensor>,
    /// Per module: its adapter, if LoRA targets it.
    pub(super) adapters: Vec<Option<LoraAdapter>>,
    /// The configuration whose rules were applied (for an adapter: the rules it implies).
    pub(super) config: TrainConfig,
    pub(super) load_report: LoadReport,
    pub(super) kind: Kind,
    pub(super) device: Device,
    /// This model's id for the backward pass's recomputations ([`super::segments`]).
    pub(super) id: u64,
    /// Whether training forward passes checkpoint the plugin's segments.
    pub(super) gradient_checkpointing: bool,
    /// Segments recomputed in backward passes so far, per role (in [`Role::ALL`] order).
    pub(super) recomputed: [std::sync::atomic::AtomicU64; 3],
}

impl HostModel {
    /// The plugin library serving the model.
    pub fn plugin(&self) -> &LoadedPlugin {
        &self.plugin
    }

    /// The family name (`llava`, `qwen2_vl`, ...).
    pub fn family(&self) -> &str {
        &self.family
    }

    /// The checkpoint folder.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// What the plugin reports: parameters, modules, role and key rules.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// What trains and how.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Parameters in spec order (empty when opened without weights).
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The LoRA adapter of module `index`, if it has one.
    pub fn adapter(&self, index: usize) -> Option<&LoraAdapter> {
        self.adapters.get(index).and_then(Option::as_ref)
    }

    /// The LoRA adapters, each with the index of its module.
    pub fn adapters(&self) -> impl Iterator<Item = (usize, &LoraAdapter)> {
        self.adapters.iter().enumerate().filter_map(|(m, a)| a.as_ref().map(|a| (m, a)))
    }

    /// The configuration whose rules were applied.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// What loading the checkpoint found (missing, unexpected, mismatched keys).
    pub fn load_report(&self) -> &LoadReport {
        &self.load_report
    }

    /// The base weights' dtype (trainable tensors: [`super::weights::master_kind`] of it).
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Run `f` (a forward pass) in the model's compute precision: bf16
    /// autocast when its base weights are bf16 ([`super::autocast::for_weights`]).
    pub fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        super::autocast::for_weights(self.kind, self.device, f)
    }

    pub fn device(&self) -> Device {
        self.device
    }

/// Parameter counts of `role`: (base parameters, trainable values).
    pub fn counts(&self, role: Role) -> (i64, i64) {
        let mut base = 0;
        let mut trainable = 0;
        for (i, p) in self.spec.params.iter().enumerate() {
            if self.plan.roles[i] != role || !p.tied_to.is_empty() {
                continue;
            }
            let n: i64 = p.shape.iter().product();
            base += n;
            if self.plan.trainable[i] {
                trainable += n;
            }
        }
        for &m in &self.plan.lora_modules {
            let spec = &self.spec.modules[m];
            if self.plan.roles[spec.weight as usize] == role {
                trainable += self.config.lora.r * (spec.in_features + spec.out_features);
            }
        }
        (base, trainable)
    }

    /// Names of the modules with a LoRA adapter in `role`.
    pub fn lora_module_names(&self, role: Role) -> Vec<String> {
        self.plan
            .lora_modules
            .iter()
            .filter(|&&m| self.plan.roles[self.spec.modules[m].weight as usize] == role)
            .map(|&m| self.spec.modules[m].name.to_string())
            .collect()
    }

    /// Everything that trains: fully trained parameters under their
    /// checkpoint names, adapters as `{module}.lora_A.weight` / `.lora_B.weight`.
    pub fn trainables(&self) -> Vec<Trainable> {
        let mut out = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            if self.plan.trainable[i] && self.spec.params[i].tied_to.is_empty() {
                let decays = super::rules::decays(self.spec.params[i].kind);
                out.push(Trainable { name: self.spec.params[i].name.to_string(), tensor: p.shallow_clone(), role: self.plan.roles[i], decays });
            }
        }
        for (m, a) in self.adapters() {
            let module = &self.spec.modules[m];
            let role = self.plan.roles[module.weight as usize];
            for (matrix, t) in [("lora_A", &a.a), ("lora_B", &a.b)] {
                out.push(Trainable { name: format!("{}.{matrix}.weight", module.name), tensor: t.shallow_clone(), role, decays: true });
            }
        }
        out
    }

    /// [`HostModel::trainables`] by name.
    pub fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.trainables().into_iter().map(|t| (t.name, t.tensor)).collect()
    }

    /// Copy saved tensors (from [`HostModel::trainable_tensors`]) into the
    /// model. With `strict`, every trainable tensor must be there and every
    /// saved one must fit. Returns how many were copied.
    pub fn load_tensors(&self, saved: &HashMap<String, Tensor>, strict: bool) -> Result<usize> {
        let _g = tch::no_grad_guard();
        let mut targets: HashMap<String, Tensor> = self.trainable_tensors().into_iter().collect();
        if !strict {
            // Any parameter may be initialised from a previous stage.
            for (i, p) in self.params.iter().enumerate() {
                targets.entry(self.spec.params[i].name.to_string()).or_insert_with(|| p.shallow_clone());
            }
        }
        let mut copied = 0;
        for (name, src) in saved {
            match targets.get(name) {
                Some(dst) => {
                    if dst.size() != src.size() {
                        bail!("{name}: saved with shape {:?}, the model has {:?}", src.size(), dst.size());
                    }
                    let mut dst = dst.shallow_clone();
                    dst.f_copy_(&src.f_to_kind(dst.kind())?)?;
                    copied += 1;
                }
                None if strict => bail!("{name} is in the checkpoint but does not train in this run (different mode or rules?)"),
                None => {}
            }
        }
        if strict {
            if let Some(missing) = targets.keys().find(|k| !saved.contains_key(*k)) {
                bail!("the checkpoint lacks {missing}, which trains in this run (different mode or rules?)");
            }
        }
        Ok(copied)
    }



    /// Prepare one sample (JSON of a [`vlmhost_plugin_api::sample::Sample`]).
    pub fn prepare(&self, sample_json: &str) -> std::result::Result<PreparedSample, PluginError> {
        let p = self.model.prepare(RStr::from(sample_json)).into_result()?;
        Ok(PreparedSample {
            input_ids: p.input_ids.into_vec(),
            labels: p.labels.into_vec(),
            image_token_mask: p.image_token_mask.into_vec(),
            tensors: p.tensors.into_iter().map(|t| (t.name.into_string(), t.tensor.into_tensor())).collect(),
        })
    }

    /// Incremental decoding (see `Model::forward_cached`): logits of the new
    /// tokens of `batch` (its `attention_mask` covering the cached ones too)
    /// and the cache for the next call.
    pub fn forward_cached(&self, batch: &BatchTensors, past: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        self.check_weights()?;
        let ops = Ops { model: self, training: false, recompute: false };
        let past: RVec<TensorRef<'_>> = past.iter().map(TensorRef::new).collect();
        let out = self
            .model
            .forward_cached(&ops.abi(), &abi_batch(batch), past)
            .into_result()
            .map_err(|e| plugin_err(&self.family, "incremental decoding", e))?;
        Ok((out.logits.into_tensor(), out.cache.into_iter().map(|t| t.into_tensor()).collect()))
    }

    /// Run `f` with this model's host operations (its parameters, and its
    /// linear layers with their adapters), for code that calls a family
    /// crate's functions directly: tests of a plugin's parts, tools.
    pub fn with_ops<T>(&self, training: bool, f: impl FnOnce(&HostOpsRef<'_>) -> T) -> T {
        let ops = Ops { model: self, training, recompute: false };
        let abi = ops.abi();
        f(&abi)
    }

    /// Logits `[batch, seq, vocab]` for a collated batch.
    pub fn forward(&self, batch: &BatchTensors, training: bool) -> Result<Tensor> {
        self.check_weights()?;
        let ops = Ops { model: self, training, recompute: false };
        let logits = self
            .model
            .forward(&ops.abi(), &abi_batch(batch))
            .into_result()
            .map_err(|e| plugin_err(&self.family, "forward", e))?;
        Ok(logits.into_tensor())
    }

    /// Back-propagate from `loss` (a scalar): what training calls instead of
    /// `loss.backward()`, so that segments checkpointed in the forward pass
    /// can be recomputed with this model ([`super::segments`]).
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        let _lent = super::segments::Lent::new(self);
        loss.f_backward().map_err(|e| anyhow::anyhow!("backward pass: {e}"))
    }

    /// Whether training forward passes run the plugin's segments (decoder
    /// layers, vision blocks) with activation checkpointing.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// How many segments of `role` backward passes have recomputed so far
    /// (activation checkpointing at work).
    pub fn segments_recomputed(&self, role: Role) -> u64 {
        self.recomputed[role as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turn activation checkpointing on or off (from `train.gradient_checkpointing` at opening).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Refuse to run a model opened without weights (`inspect`'s dry run).
    fn check_weights(&self) -> Result<()> {
        if self.params.is_empty() {
            bail!("the model was opened without weights");
        }
        Ok(())
    }
}
