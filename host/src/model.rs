//! A model the host holds: the plugin's architecture, the host's parameters,
//! the plan of what trains, and the LoRA adapters; plus the host side of a
//! forward pass (parameters and linear layers on request) and the loss.

use crate::config::{Mode, TrainConfig};
use crate::loader::{self, Discovery, LoadedPlugin};
use crate::lora::LoraAdapter;
use crate::optim::{AdamW, Group};
use crate::rules::{self, Plan};
use crate::weights::{self, LoadOptions, LoadReport};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RVec};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vlmhost_plugin_api::model::{
    Batch, HostOps, HostOpsRef, ModelBox, ModelSpec, ModuleKind, NamedTensorRef,
};
pub use vlmhost_plugin_api::PreparedSample;
use vlmhost_plugin_api::{OwnedTensor, PluginError, Role, TensorRef};

/// What `config.json` says about the checkpoint's family.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    pub model_type: String,
    pub architectures: Vec<String>,
}

/// Read `model_type` and `architectures` from `dir/config.json`.
pub fn checkpoint_info(dir: &Path) -> Result<CheckpointInfo> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("{}: cannot read it; --model must be a Hugging Face checkpoint folder", path.display())
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("{}: no \"model_type\" key", path.display()))?
        .to_owned();
    let architectures = json
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    Ok(CheckpointInfo { model_type, architectures })
}

/// Pick the family of `plugin` that serves the checkpoint; if none does, say
/// which discovered plugin would.
pub fn choose_family(plugin: &LoadedPlugin, info: &CheckpointInfo, model_dir: &Path) -> Result<String> {
    // `model_type` decides (transformers' AutoConfig does the same); the
    // architectures list is informative only.
    let serves = |f: &vlmhost_plugin_api::FamilyInfo| f.model_types.iter().any(|t| *t == info.model_type);
    if let Some(f) = plugin.manifest.families.iter().find(|f| serves(f)) {
        return Ok(f.name.to_string());
    }
    let ours: Vec<&str> = plugin.family_names().collect();
    let mut msg = format!(
        "{}: model_type {:?} is not served by the {} plugin ({})",
        model_dir.join("config.json").display(),
        info.model_type,
        ours.join(", "),
        plugin.path.display()
    );
    let others: Vec<String> = Discovery::default_path()
        .plugins
        .iter()
        .flat_map(|p| p.manifest.families.iter().filter(|f| serves(f)).map(|f| f.name.to_string()).collect::<Vec<_>>())
        .collect();
    if others.is_empty() {
        msg.push_str("; no plugin found serves it");
    } else {
        msg.push_str(&format!("; use --plugin {}", others.join(" or --plugin ")));
    }
    bail!(msg)
}

/// How to open a model.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub plugin: String,
    pub model_dir: PathBuf,
    pub mode: Mode,
    pub kind: Kind,
    pub device: Device,
    pub allow_missing: bool,
    /// Load the weights (false: check the checkpoint's keys and shapes only).
    pub load_weights: bool,
    /// The processor options passed to the plugin.
    pub processor: serde_json::Map<String, serde_json::Value>,
}

/// A model held by the host.
pub struct HostModel {
    pub plugin: Arc<LoadedPlugin>,
    pub family: String,
    pub model_dir: PathBuf,
    model: ModelBox,
    pub spec: ModelSpec,
    pub plan: Plan,
    /// Parameters in spec order (empty when opened without weights).
    pub params: Vec<Tensor>,
    /// Per module: its adapter, if LoRA targets it.
    pub adapters: Vec<Option<LoraAdapter>>,
    pub config: TrainConfig,
    pub load_report: LoadReport,
    pub kind: Kind,
    pub device: Device,
}

/// Open the checkpoint folder `dir` as `family` through `plugin`, with the
/// folder's own processor settings (`vlmhost.json`) under the user's `processor`.
pub fn open_family_model(
    plugin: &LoadedPlugin,
    family: &str,
    dir: &Path,
    processor: &serde_json::Map<String, serde_json::Value>,
) -> Result<ModelBox> {
    let mut options = crate::init::processor_defaults(dir)?;
    options.extend(processor.clone());
    let options = serde_json::Value::Object(options).to_string();
    let path = dir.to_string_lossy();
    (plugin.module.open_model())(RStr::from(family), RStr::from(path.as_ref()), RStr::from(options.as_str()))
        .into_result()
        .map_err(|e| plugin_err(family, &format!("opening {}", dir.display()), e))
}

/// Turn a plugin error into an error with context.
pub fn plugin_err(family: &str, what: &str, e: PluginError) -> anyhow::Error {
    anyhow!("{family} plugin, {what}: {e}")
}

impl HostModel {
    /// Resolve the plugin, open the checkpoint, apply the rules, load the weights.
    pub fn open(opts: &OpenOptions, config: &TrainConfig) -> Result<HostModel> {
        Self::open_with(opts, |_, _| Ok((config.clone(), opts.mode)))
    }

    /// As [`HostModel::open`], with the rules chosen from the model's spec and
    /// roles (an adapter decides them, say).
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
        let (params, load_report) = if opts.load_weights {
            weights::load(&opts.model_dir, &spec, load)?
        } else {
            (Vec::new(), weights::check(&opts.model_dir, &spec, opts.allow_missing)?)
        };
        let mut m = HostModel {
            plugin,
            family,
            model_dir: opts.model_dir.clone(),
            model,
            spec,
            plan,
            params,
            adapters: Vec::new(),
            config,
            load_report,
            kind: opts.kind,
            device: opts.device,
        };
        // Adapters are initialised from libtorch's generator: seed it, so a
        // run (and its resume) starts from the same adapters.
        tch::manual_seed(m.config.train.seed as i64);
        m.apply_plan();
        Ok(m)
    }

    /// Set `requires_grad` from the plan and create the LoRA adapters.
    fn apply_plan(&mut self) {
        let lora = &self.config.lora;
        self.adapters = (0..self.spec.modules.len()).map(|_| None).collect();
        for &m in &self.plan.lora_modules {
            let spec = &self.spec.modules[m];
            self.adapters[m] = Some(LoraAdapter::new(
                spec.in_features,
                spec.out_features,
                lora.r,
                lora.scaling(),
                lora.lora_dropout,
                self.kind,
                self.device,
            ));
        }
        for (i, p) in self.params.iter_mut().enumerate() {
            let _ = p.set_requires_grad(self.plan.trainable[i]);
        }
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

    /// Everything that trains, by name: fully trained parameters under their
    /// checkpoint names, adapters as `{module}.lora_A.weight` / `.lora_B.weight`.
    pub fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            if self.plan.trainable[i] && self.spec.params[i].tied_to.is_empty() {
                out.push((self.spec.params[i].name.to_string(), p.shallow_clone()));
            }
        }
        for (m, a) in self.adapters.iter().enumerate() {
            if let Some(a) = a {
                let name = &self.spec.modules[m].name;
                out.push((format!("{name}.lora_A.weight"), a.a.shallow_clone()));
                out.push((format!("{name}.lora_B.weight"), a.b.shallow_clone()));
            }
        }
        out
    }

    /// Copy saved tensors (from [`HostModel::trainable_tensors`]) into the
    /// model. With `strict`, every trainable tensor must be there and every
    /// saved one must fit. Returns how many were copied.
    pub fn load_tensors(&self, saved: &std::collections::HashMap<String, Tensor>, strict: bool) -> Result<usize> {
        let _g = tch::no_grad_guard();
        let mut targets: std::collections::HashMap<String, Tensor> = self.trainable_tensors().into_iter().collect();
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


    /// An optimizer over everything that trains: one group per role and
    /// decay class, with the role's learning-rate scale.
    pub fn optimizer(&self) -> AdamW {
        let o = &self.config.optimizer;
        let mut opt = AdamW::new((o.betas[0], o.betas[1]), o.eps);
        let mut groups = std::collections::HashMap::new();
        let mut group = |opt: &mut AdamW, role: Role, decay: bool| -> usize {
            *groups.entry((role, decay)).or_insert_with(|| {
                opt.add_group(Group {
                    name: format!("{role}{}", if decay { "" } else { "/no_decay" }),
                    lr_scale: self.plan.role_plans[&role].lr_scale,
                    weight_decay: if decay { o.weight_decay } else { 0.0 },
                })
            })
        };
        for (i, p) in self.params.iter().enumerate() {
            if self.plan.trainable[i] && self.spec.params[i].tied_to.is_empty() {
                let g = group(&mut opt, self.plan.roles[i], rules::decays(self.spec.params[i].kind));
                opt.add(&self.spec.params[i].name, p, g);
            }
        }
        for (m, a) in self.adapters.iter().enumerate() {
            if let Some(a) = a {
                let g = group(&mut opt, self.plan.roles[self.spec.modules[m].weight as usize], true);
                let name = &self.spec.modules[m].name;
                opt.add(&format!("{name}.lora_A.weight"), &a.a, g);
                opt.add(&format!("{name}.lora_B.weight"), &a.b, g);
            }
        }
        opt
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
        if self.params.is_empty() {
            bail!("the model was opened without weights");
        }
        let ops = Ops { model: self, training: false };
        let ops_ref: HostOpsRef<'_> = HostOps_TO_from(&ops);
        let tensors: RVec<NamedTensorRef<'_>> = batch
            .tensors
            .iter()
            .map(|(n, t)| NamedTensorRef { name: RStr::from(n.as_str()), tensor: TensorRef::new(t) })
            .collect();
        let b = Batch {
            input_ids: TensorRef::new(&batch.input_ids),
            attention_mask: TensorRef::new(&batch.attention_mask),
            tensors,
        };
        let past: RVec<TensorRef<'_>> = past.iter().map(TensorRef::new).collect();
        let out = self
            .model
            .forward_cached(&ops_ref, &b, past)
            .into_result()
            .map_err(|e| plugin_err(&self.family, "incremental decoding", e))?;
        Ok((out.logits.into_tensor(), out.cache.into_iter().map(|t| t.into_tensor()).collect()))
    }

    /// Run `f` with this model's host operations (its parameters, and its
    /// linear layers with their adapters), for code that calls a family
    /// crate's functions directly: tests of a plugin's parts, tools.
    pub fn with_ops<T>(&self, training: bool, f: impl FnOnce(&HostOpsRef<'_>) -> T) -> T {
        let ops = Ops { model: self, training };
        let ops_ref: HostOpsRef<'_> = HostOps_TO_from(&ops);
        f(&ops_ref)
    }

    /// Logits `[batch, seq, vocab]` for a collated batch.
    pub fn forward(&self, batch: &BatchTensors, training: bool) -> Result<Tensor> {
        if self.params.is_empty() {
            bail!("the model was opened without weights");
        }
        let ops = Ops { model: self, training };
        let ops_ref: HostOpsRef<'_> = HostOps_TO_from(&ops);
        let tensors: RVec<NamedTensorRef<'_>> = batch
            .tensors
            .iter()
            .map(|(n, t)| NamedTensorRef { name: RStr::from(n.as_str()), tensor: TensorRef::new(t) })
            .collect();
        let b = Batch {
            input_ids: TensorRef::new(&batch.input_ids),
            attention_mask: TensorRef::new(&batch.attention_mask),
            tensors,
        };
        let logits = self
            .model
            .forward(&ops_ref, &b)
            .into_result()
            .map_err(|e| plugin_err(&self.family, "forward", e))?;
        Ok(logits.into_tensor())
    }
}

#[allow(non_snake_case)]
fn HostOps_TO_from<'a>(ops: &'a Ops<'a>) -> HostOpsRef<'a> {
    vlmhost_plugin_api::model::HostOps_TO::from_ptr(abi_stable::sabi_types::RRef::new(ops), TD_Opaque)
}

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


/// A padded batch.
pub struct BatchTensors {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
    pub tensors: Vec<(String, Tensor)>,
}

/// Right-pad samples into a batch (`pad_id` where the mask is 0, labels -100)
/// and concatenate their other tensors along dimension 0.
pub fn collate(samples: &[&PreparedSample], pad_id: i64, device: Device) -> Result<BatchTensors> {
    let len = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let b = samples.len();
    let mut ids = vec![pad_id; b * len];
    let mut mask = vec![0i64; b * len];
    let mut labels = vec![-100i64; b * len];
    for (i, s) in samples.iter().enumerate() {
        let n = s.input_ids.len();
        ids[i * len..i * len + n].copy_from_slice(&s.input_ids);
        labels[i * len..i * len + n].copy_from_slice(&s.labels);
        mask[i * len..i * len + n].fill(1);
    }
    let shape = [b as i64, len as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    if let Some(first) = samples.first() {
        for (name, _) in &first.tensors {
            let parts: Vec<&Tensor> = samples
                .iter()
                .map(|s| s.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t))
                .collect::<Option<_>>()
                .ok_or_else(|| anyhow!("samples of one batch differ in their tensors ({name} missing)"))?;
            tensors.push((name.clone(), Tensor::f_cat(&parts, 0)?.f_to_device(device)?));
        }
    }
    Ok(BatchTensors { input_ids: t(&ids), attention_mask: t(&mask), labels: t(&labels), tensors })
}

/// Causal-LM loss as transformers computes it: logits at position t predict
/// the label at t+1; mean over positions whose shifted label is not -100.
/// Returns (loss, number of supervised tokens).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, i64)> {
    let v = logits.size()[2];
    let l = logits.size()[1];
    let shift_logits = logits.f_narrow(1, 0, l - 1)?.f_reshape([-1, v])?.f_to_kind(Kind::Float)?;
    let shift_labels = labels.f_narrow(1, 1, l - 1)?.f_reshape([-1])?;
    let n = shift_labels.f_ne(-100)?.f_sum(Kind::Int64)?.int64_value(&[]);
    let loss = shift_logits.f_cross_entropy_loss::<Tensor>(&shift_labels, None, tch::Reduction::Mean, -100, 0.0)?;
    Ok((loss, n))
}

/// The host side of a forward pass.
struct Ops<'a> {
    model: &'a HostModel,
    training: bool,
}

fn torch_err(e: tch::TchError) -> PluginError {
    PluginError::Torch { message: e.to_string().into() }
}

impl HostOps for Ops<'_> {
    fn param(&self, index: u32) -> RResult<OwnedTensor, PluginError> {
        match self.model.params.get(index as usize) {
            Some(t) => RResult::ROk(OwnedTensor::new(t.shallow_clone())),
            None => RResult::RErr(PluginError::invalid("param", format!("no parameter {index}"))),
        }
    }

    fn linear(&self, index: u32, x: TensorRef<'_>) -> RResult<OwnedTensor, PluginError> {
        let run = || -> std::result::Result<Tensor, PluginError> {
            let m = self
                .model
                .spec
                .modules
                .get(index as usize)
                .filter(|m| m.kind == ModuleKind::Linear)
                .ok_or_else(|| PluginError::invalid("linear", format!("no linear module {index}")))?;
            let x = x.to_tensor();
            let w = &self.model.params[m.weight as usize];
            let b = (m.bias != u32::MAX).then(|| &self.model.params[m.bias as usize]);
            let mut y = x.f_linear(w, b).map_err(torch_err)?;
            if let Some(a) = &self.model.adapters[index as usize] {
                y = y.f_add(&a.delta(&x, self.training).map_err(torch_err)?).map_err(torch_err)?;
            }
            Ok(y)
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(y)) => RResult::ROk(OwnedTensor::new(y)),
            Ok(Err(e)) => RResult::RErr(e),
            Err(_) => RResult::RErr(PluginError::Torch { message: "host linear panicked".into() }),
        }
    }

    fn training(&self) -> bool {
        self.training
    }

    fn role_trains(&self, role: Role) -> bool {
        self.model.plan.role_trains(role, &self.model.spec)
    }
}
