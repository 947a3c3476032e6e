//! Adapters that PEFT saved (`adapter_config.json` + `adapter_model.safetensors`),
//! loaded into vlmhost for evaluation or to continue training.
//!
//! PEFT names tensors by the transformers model's in-memory names under
//! `base_model.model.`: `{module}.lora_A.weight` / `.lora_B.weight` for LoRA,
//! and the parameter names themselves for `modules_to_save`. The plugin's key
//! rules map those names onto its own. The modules that carry LoRA are read
//! from the file itself (PEFT's `target_modules` are suffixes that may have
//! matched anywhere), and become the run's per-role target lists.

use crate::config::{Mode, Strategy, TrainConfig};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::Tensor;
use vlmhost_plugin_api::model::{map_key, ModelSpec};
use vlmhost_plugin_api::Role;

/// A PEFT LoRA adapter folder, read.
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: Value,
    /// Tensors under the plugin's names: `{module}.lora_A.weight`,
    /// `{module}.lora_B.weight`, or a parameter name (modules_to_save).
    pub tensors: HashMap<String, Tensor>,
}

/// Whether `dir` holds a PEFT adapter.
pub fn is_peft_dir(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file()
}

impl PeftAdapter {
    /// Read `dir`, mapping names with the model's key rules.
    pub fn read(dir: &Path, spec: &ModelSpec) -> Result<PeftAdapter> {
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.is_file() {
            bail!("{}: no adapter_config.json; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors", dir.display());
        }
        let config: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)
            .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
        let get = |k: &str| config.get(k).cloned().unwrap_or(Value::Null);
        if get("peft_type").as_str() != Some("LORA") {
            bail!("{}: peft_type {} is not supported (LORA only)", cfg_path.display(), get("peft_type"));
        }
        for (key, ok) in [
            ("use_dora", !get("use_dora").as_bool().unwrap_or(false)),
            ("bias", matches!(get("bias").as_str(), None | Some("none"))),
            ("rank_pattern", get("rank_pattern").as_object().is_none_or(|m| m.is_empty())),
            ("alpha_pattern", get("alpha_pattern").as_object().is_none_or(|m| m.is_empty())),
        ] {
            if !ok {
                bail!("{}: {key} = {} is not supported by vlmhost", cfg_path.display(), get(key));
            }
        }
        let weights = dir.join("adapter_model.safetensors");
        let raw = Tensor::read_safetensors(&weights).with_context(|| format!("cannot read {}", weights.display()))?;
        let params: BTreeSet<&str> = spec.params.iter().map(|p| p.name.as_str()).collect();
        let modules: BTreeSet<&str> = spec.modules.iter().map(|m| m.name.as_str()).collect();
        let mut tensors = HashMap::new();
        for (key, t) in raw {
            let inner = key.strip_prefix("base_model.model.").unwrap_or(&key);
            let mapped = if let Some((module, which)) = inner
                .strip_suffix(".lora_A.weight")
                .map(|m| (m, "lora_A"))
                .or_else(|| inner.strip_suffix(".lora_B.weight").map(|m| (m, "lora_B")))
            {
                let module = map_key(&spec.key_rules, &format!("{module}.weight"));
                let module = module.strip_suffix(".weight").unwrap_or(&module).to_owned();
                if !modules.contains(module.as_str()) {
                    bail!("{}: {key} is LoRA on {module}, which this {} model does not have (an adapter for another base model?)", weights.display(), spec.family);
                }
                format!("{module}.{which}.weight")
            } else {
                let name = map_key(&spec.key_rules, inner);
                if !params.contains(name.as_str()) {
                    bail!("{}: {key} matches no parameter of this {} model (an adapter for another base model?)", weights.display(), spec.family);
                }
                name
            };
            tensors.insert(mapped, t);
        }
        Ok(PeftAdapter { dir: dir.to_path_buf(), config, tensors })
    }

    /// Modules carrying LoRA, by the plugin's names.
    pub fn lora_modules(&self) -> BTreeSet<String> {
        self.tensors.keys().filter_map(|k| k.strip_suffix(".lora_A.weight").map(str::to_owned)).collect()
    }

    /// The rules under which this adapter's tensors exist: every role with an
    /// adapter trains with LoRA on exactly the adapter's modules; parameters
    /// saved whole become `modules_to_save`. (The projector, which trains in
    /// every mode, starts from the base weights when the adapter has none.)
    pub fn train_config(&self, spec: &ModelSpec, roles: &[Role], base: &TrainConfig) -> Result<(TrainConfig, Mode)> {
        let mut cfg = base.clone();
        let c = &self.config;
        cfg.lora.r = c.get("r").and_then(Value::as_i64).context("adapter_config.json: no r")?;
        cfg.lora.lora_alpha = c.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        cfg.lora.lora_dropout = c.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
        cfg.lora.use_rslora = c.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        // The role of a module path: the role of its first parameter.
        let role_of = |m: &str| {
            let prefix = format!("{m}.");
            spec.params.iter().position(|p| p.name.starts_with(&prefix)).map(|i| roles[i])
        };
        let mut per_role: HashMap<Role, Vec<String>> = HashMap::new();
        for m in self.lora_modules() {
            let role = role_of(&m).context("unknown module")?;
            per_role.entry(role).or_default().push(m);
        }
        // Whole parameters: modules_to_save, by their module paths.
        let saved: BTreeSet<String> = self
            .tensors
            .keys()
            .filter(|k| !k.ends_with(".lora_A.weight") && !k.ends_with(".lora_B.weight"))
            .map(|k| k.rsplit_once('.').map_or(k.clone(), |(m, _)| m.to_owned()))
            .collect();
        let trains = |role: Role| per_role.contains_key(&role) || saved.iter().any(|m| role_of(m) == Some(role));
        let mode = match (trains(Role::Vision), trains(Role::Llm)) {
            (true, true) => Mode::Both,
            (true, false) => Mode::Vision,
            (false, true) => Mode::Llm,
            (false, false) => Mode::Projector,
        };
        for role in Role::ALL {
            let list = per_role.remove(&role);
            let strategy = if list.is_some() || role != Role::Projector { Strategy::Lora } else { Strategy::Full };
            match role {
                Role::Vision => cfg.lora.vision_target_modules = list,
                Role::Projector => cfg.lora.projector_target_modules = list,
                Role::Llm => cfg.lora.llm_target_modules = list,
            }
            let rc = match role {
                Role::Vision => &mut cfg.roles.vision,
                Role::Projector => &mut cfg.roles.projector,
                Role::Llm => &mut cfg.roles.llm,
            };
            rc.strategy = Some(strategy);
            rc.train_last_layers = None;
        }
        cfg.modules_to_save = saved.into_iter().collect();
        cfg.mode = Some(mode);
        Ok((cfg, mode))
    }

    /// Copy the adapter into `model` (opened with [`PeftAdapter::train_config`]).
    pub fn load_into(&self, model: &super::HostModel) -> Result<()> {
        let copied = model.load_tensors(&self.tensors, false)?;
        if copied != self.tensors.len() {
            bail!("{}: only {copied} of {} tensors found a place in the model", self.dir.display(), self.tensors.len());
        }
        Ok(())
    }
}

/// Write the trainable state of `model` as a PEFT adapter in `dir`:
/// `adapter_config.json` and `adapter_model.safetensors`, with PEFT's names
/// (transformers' in-memory names under `base_model.model.`), LoRA as
/// `lora_A`/`lora_B`, and fully trained modules as `modules_to_save`. The
/// folder is written as `<dir>.partial` and renamed into place: a crash
/// leaves the previous adapter or none, never part of one.
pub fn save(model: &super::HostModel, dir: &Path) -> Result<()> {
    let spec = model.spec();
    if spec.transformers_names.is_empty() {
        bail!("the {} plugin does not declare transformers' names: cannot write a PEFT adapter", model.family());
    }
    let hf = |name: &str| map_key(&spec.transformers_names, name);
    let partial = crate::files::fresh_partial(dir)?;
    let mut tensors = Vec::new();
    let mut targets = BTreeSet::new();
    for (m, a) in model.adapters() {
        let module = hf(&spec.modules[m].name);
        tensors.push((format!("base_model.model.{module}.lora_A.weight"), a.a.shallow_clone()));
        tensors.push((format!("base_model.model.{module}.lora_B.weight"), a.b.shallow_clone()));
        targets.insert(module);
    }
    let mut to_save = BTreeSet::new();
    for (i, p) in model.params().iter().enumerate() {
        if model.plan().trainable[i] && spec.params[i].tied_to.is_empty() {
            let name = hf(&spec.params[i].name);
            to_save.insert(name.rsplit_once('.').map_or(name.clone(), |(m, _)| m.to_owned()));
            tensors.push((format!("base_model.model.{name}"), p.shallow_clone()));
        }
    }
    let l = &model.config().lora;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.model_dir().display().to_string(),
        "r": l.r,
        "lora_alpha": l.lora_alpha,
        "lora_dropout": l.lora_dropout,
        "use_rslora": l.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "target_modules": targets.into_iter().collect::<Vec<_>>(),
        "modules_to_save": if to_save.is_empty() { Value::Null } else { Value::from(to_save.into_iter().collect::<Vec<_>>()) },
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    super::weights::save_safetensors(&partial.join("adapter_model.safetensors"), &tensors, Some(HashMap::from([("format".to_owned(), "pt".to_owned())])))?;
    crate::files::fault_point("adapter", 0);
    // The tokenizer, processor and chat template, so that the folder alone
    // prepares inputs (`AutoProcessor.from_pretrained(adapter)`).
    for file in super::checkpoint::processing_files(model.model_dir())? {
        let name = file.file_name().expect("a listed file has a name");
        std::fs::copy(&file, partial.join(name)).with_context(|| format!("cannot copy {}", file.display()))?;
    }
    if let Some(template) = &model.config().chat_template {
        super::checkpoint::write_chat_template(&partial, template)?;
    }
    crate::files::write_atomic(&partial.join("adapter_config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    crate::files::publish_dir(&partial, dir)
}
