// Argument groups several commands share: where the model comes from and
// which rules apply (`ModelArgs`), and how a data set is read (`DataArgs`).

use crate::config::{BadSamplePolicy, Precision, TooLongPolicy, TrainConfig, DEFAULT_MAX_LENGTH};
use crate::model::{HostModel, OpenOptions};
use crate::train::dataset::DatasetOptions;
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// Where the model comes from and which rules apply.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Family name or plugin library path [default: the config file's `plugin`].
    #[arg(long, value_name = "NAME|PATH")]
    pub plugin: Option<String>,
    /// Hugging Face checkpoint folder [default: the config file's `model`].
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Training configuration [default: config/train_config.yaml if present].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// projector | llm | vision | both [default: $TRAINING_MODE, then the config file, then llm].
    #[arg(long)]
    pub mode: Option<String>,
    /// Initialise parameters the checkpoint lacks (a new head) instead of failing.
    #[arg(long)]
    pub allow_missing: bool,
    /// auto (the first GPU if CUDA is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weights and compute: bf16 (frozen weights in bf16, trainable tensors in
    /// fp32, bf16 autocast), fp32, or auto (bf16 on CUDA, fp32 on the CPU)
    /// [default: the config file's `precision`, then auto].
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// A processor option for the family's plugin, as KEY=VALUE (repeatable;
    /// overrides the config file's `processor:`), e.g. `--processor mode=tiny`.
    #[arg(long = "processor", value_name = "KEY=VALUE")]
    pub processor: Vec<String>,
    /// Render conversations with this chat template instead of the
    /// checkpoint's [default: the config file's `chat_template`]: a Jinja
    /// file, or a JSON file holding `chat_template`.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

impl ModelArgs {
    /// The configuration file and the open options, resolved with the
    /// precedence flags > environment > file > defaults.
    pub fn resolve(&self) -> Result<(TrainConfig, OpenOptions)> {
        let default_cfg = PathBuf::from("config/train_config.yaml");
        let mut cfg = match &self.config {
            Some(p) => TrainConfig::from_file(p)?,
            None if default_cfg.is_file() => TrainConfig::from_file(&default_cfg)?,
            None => TrainConfig::default(),
        };
        cfg.apply_image_limit();
        let env_mode = std::env::var("TRAINING_MODE").ok();
        let mode = cfg.resolve_mode(self.mode.as_deref(), env_mode.as_deref())?;
        let plugin = self.plugin.clone().or_else(|| cfg.plugin.clone()).ok_or_else(|| {
            anyhow!("no plugin: pass --plugin NAME (see `vlmhost plugins`) or set `plugin:` in the config file")
        })?;
        let model_dir = self.model.clone().or_else(|| cfg.model.clone()).ok_or_else(|| {
            anyhow!("no model: pass --model DIR (a Hugging Face checkpoint folder) or set `model:` in the config file")
        })?;
        let mut processor = cfg.processor.clone();
        for s in &self.processor {
            let (k, v) = parse_processor_option(s)?;
            processor.insert(k, v);
        }
        if let Some(file) = self.chat_template.clone().or_else(|| cfg.chat_template.clone()) {
            let file = chat_template_file(&file)?;
            set_chat_template(&mut processor, &file);
            cfg.chat_template = Some(file);
        }
        let device = parse_device(&self.device)?;
        // Resolved for this device, so the run's recorded config says what ran.
        let bf16 = self.precision.unwrap_or(cfg.precision).is_bf16(device.is_cuda());
        cfg.precision = if bf16 { Precision::Bf16 } else { Precision::Fp32 };
        let kind = if bf16 { tch::Kind::BFloat16 } else { tch::Kind::Float };
        let opts = OpenOptions {
            plugin,
            model_dir,
            mode,
            kind,
            device,
            allow_missing: self.allow_missing,
            load_weights: true,
            processor,
        };
        Ok((cfg, opts))
    }
}

/// A model with, optionally, an adapter on top.
#[derive(Debug, Clone, clap::Args)]
pub struct AdaptedModelArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A vlmhost checkpoint or a PEFT adapter folder.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

impl AdaptedModelArgs {
    /// Resolve the configuration and open the model with the adapter ([`super::open_model`]).
    pub fn open(&self) -> Result<HostModel> {
        let (cfg, opts) = self.model.resolve()?;
        super::open_model(&opts, &cfg, self.adapter.as_deref())
    }
}

/// How a data set is read.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Messages JSONL or LLaVA JSON/JSONL; image paths relative to its folder.
    #[arg(long, value_name = "FILE")]
    pub dataset: PathBuf,
    /// Maximum tokens per sample.
    #[arg(long, default_value_t = DEFAULT_MAX_LENGTH)]
    pub max_length: usize,
    /// Longer samples: truncate (never into image tokens) or skip.
    #[arg(long, value_enum, default_value_t)]
    pub too_long: TooLongPolicy,
    /// Bad samples: skip them (counted and listed) or fail.
    #[arg(long, value_enum, default_value_t)]
    pub on_bad_sample: BadSamplePolicy,
    /// A system prompt for samples without one.
    #[arg(long)]
    pub system_prompt: Option<String>,
}

impl DataArgs {
    pub fn options(&self) -> DatasetOptions {
        DatasetOptions {
            max_length: self.max_length,
            too_long: self.too_long,
            on_bad_sample: self.on_bad_sample,
            system_prompt: self.system_prompt.clone(),
        }
    }
}

/// The processor option that carries a chat template override to the plugin:
/// the template file's absolute path.
pub const CHAT_TEMPLATE_OPTION: &str = "chat_template";

/// Pass the chat template `file` to the plugin ([`CHAT_TEMPLATE_OPTION`]).
pub fn set_chat_template(processor: &mut serde_json::Map<String, serde_json::Value>, file: &Path) {
    processor.insert(CHAT_TEMPLATE_OPTION.to_owned(), file.display().to_string().into());
}

/// A chat template override, checked (it must exist and compile) and made absolute.
fn chat_template_file(file: &Path) -> Result<PathBuf> {
    if !file.is_file() {
        bail!("--chat-template {}: no such file", file.display());
    }
    vlmhost_chat_template::ChatTemplate::from_file(file).map_err(|e| anyhow!("--chat-template {}: {e}", file.display()))?;
    Ok(std::path::absolute(file)?)
}

/// Parse `--processor KEY=VALUE`: the value as JSON when it parses (numbers,
/// booleans), else as a string.
pub fn parse_processor_option(s: &str) -> Result<(String, serde_json::Value)> {
    let (key, value) = s
        .split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .ok_or_else(|| anyhow!("--processor {s:?}: write KEY=VALUE, e.g. --processor mode=tiny"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok((key.trim().to_owned(), value))
}

/// Parse `--device`.
pub fn parse_device(s: &str) -> Result<tch::Device> {
    let device = match s {
        "auto" => tch::Device::cuda_if_available(),
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => bail!("--device {other:?}: use auto, cpu, cuda or cuda:N"),
        },
    };
    if let tch::Device::Cuda(n) = device {
        let count = tch::Cuda::device_count();
        if !tch::Cuda::is_available() || n as i64 >= count {
            bail!("--device {s}: CUDA has {count} usable device(s) here; `vlmhost doctor` says why");
        }
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(chat_template: Option<PathBuf>) -> ModelArgs {
        ModelArgs {
            plugin: Some("llava".into()),
            model: Some("/models/llava".into()),
            config: None,
            mode: None,
            allow_missing: false,
            device: "cpu".into(),
            precision: None,
            processor: vec!["size=4".into()],
            chat_template,
        }
    }

    #[test]
    fn precision_resolves_for_the_device_and_is_recorded() {
        // The default, auto, is fp32 on the CPU; --precision bf16 stores the base weights in bf16.
        let (cfg, opts) = args(None).resolve().unwrap();
        assert_eq!((cfg.precision, opts.kind), (Precision::Fp32, tch::Kind::Float));
        let (cfg, opts) = ModelArgs { precision: Some(Precision::Bf16), ..args(None) }.resolve().unwrap();
        assert_eq!((cfg.precision, opts.kind), (Precision::Bf16, tch::Kind::BFloat16));
        assert!(Precision::Auto.is_bf16(true) && !Precision::Auto.is_bf16(false));
    }

    #[test]
    fn a_chat_template_override_reaches_the_plugin_as_an_absolute_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mine.jinja");
        std::fs::write(&file, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}").unwrap();
        let (cfg, opts) = args(Some(file.clone())).resolve().unwrap();
        assert_eq!(opts.processor[CHAT_TEMPLATE_OPTION], serde_json::json!(std::path::absolute(&file).unwrap().display().to_string()));
        assert_eq!(opts.processor["size"], serde_json::json!(4));
        assert_eq!(cfg.chat_template.as_deref(), Some(std::path::absolute(&file).unwrap().as_path()));
        let (cfg, opts) = args(None).resolve().unwrap();
        assert!(!opts.processor.contains_key(CHAT_TEMPLATE_OPTION) && cfg.chat_template.is_none());
    }

    #[test]
    fn a_broken_or_missing_chat_template_is_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broken.jinja");
        std::fs::write(&file, "line one\n{% for m in messages %}{{ m }").unwrap();
        let e = args(Some(file.clone())).resolve().unwrap_err().to_string();
        assert!(e.starts_with(&format!("--chat-template {}: ", file.display())) && e.contains("line 2"), "{e}");
        let e = args(Some(dir.path().join("nope.jinja"))).resolve().unwrap_err().to_string();
        assert!(e.contains("nope.jinja: no such file"), "{e}");
    }
}
