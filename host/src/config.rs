//! The training configuration file (`config/train_config.yaml`, documented
//! in `config/README.md`): the mode, LoRA settings and per-role target lists
//! (`lora.*_target_modules`), per-role strategies, learning-rate scales and
//! last-k-layers, `modules_to_save`, regex overrides, the optimizer, the
//! training loop and the processor options. Every key has a default, so an
//! empty file is valid. Unknown keys are refused (a typo must not silently do
//! nothing).
//!
//! This module is a leaf: the schema and its checks, nothing that runs.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use vlmhost_plugin_api::Role;

/// What trains: the projector always; the LLM in `llm` and `both`; the vision
/// encoder in `vision` and `both`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Stage 1: the projector only.
    Projector,
    /// Stage 2: projector + LLM.
    Llm,
    /// Projector + vision encoder.
    Vision,
    /// Stage 3: everything.
    Both,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "projector" => Some(Mode::Projector),
            "llm" => Some(Mode::Llm),
            "vision" => Some(Mode::Vision),
            "both" => Some(Mode::Both),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Projector => "projector",
            Mode::Llm => "llm",
            Mode::Vision => "vision",
            Mode::Both => "both",
        }
    }

    /// Whether this mode trains `role`.
    pub fn trains(self, role: Role) -> bool {
        match role {
            Role::Projector => true,
            Role::Llm => matches!(self, Mode::Llm | Mode::Both),
            Role::Vision => matches!(self, Mode::Vision | Mode::Both),
        }
    }
}

/// The precision of the model's weights and its compute (`precision:`,
/// `--precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// `bf16` on CUDA, `fp32` on the CPU.
    #[default]
    Auto,
    /// Mixed precision: the frozen base weights stored in bf16; the trainable
    /// tensors (LoRA A/B, fully trained roles, `modules_to_save`) keep fp32
    /// master weights and fp32 AdamW state; the forward pass runs under bf16
    /// autocast (matrix products in bf16), the loss in fp32.
    Bf16,
    /// Everything in fp32, no autocast.
    Fp32,
}

impl Precision {
    /// Whether the base weights are stored in bf16 (and compute runs under
    /// bf16 autocast) on a CUDA device (`cuda`) or the CPU.
    pub fn is_bf16(self, cuda: bool) -> bool {
        match self {
            Precision::Auto => cuda,
            Precision::Bf16 => true,
            Precision::Fp32 => false,
        }
    }
}

/// How a role the mode trains is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Frozen,
    Full,
    Lora,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Frozen => "frozen",
            Strategy::Full => "full",
            Strategy::Lora => "lora",
        }
    }
}

/// LoRA hyper-parameters and per-role targets (the user's guide's keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    /// Module names (matched segment-wise at the end of module paths, or
    /// naming a module that contains linears) or `["all-linear"]`; absent:
    /// every linear layer of the role but the output head (as `all-linear`).
    pub projector_target_modules: Option<Vec<String>>,
    pub vision_target_modules: Option<Vec<String>>,
    pub llm_target_modules: Option<Vec<String>>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            use_rslora: false,
            projector_target_modules: None,
            vision_target_modules: None,
            llm_target_modules: None,
        }
    }
}

impl LoraConfig {
    /// The scale applied to `B A x`: alpha / r, or alpha / sqrt(r) (rsLoRA).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn targets(&self, role: Role) -> Option<&[String]> {
        match role {
            Role::Vision => self.vision_target_modules.as_deref(),
            Role::Projector => self.projector_target_modules.as_deref(),
            Role::Llm => self.llm_target_modules.as_deref(),
        }
    }
}

/// Settings of one role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoleConfig {
    /// How the role trains when the mode trains it (`full` or `lora`).
    pub strategy: Option<Strategy>,
    /// Learning-rate multiplier for the role's parameters.
    pub lr_scale: f64,
    /// Train only the last k of the role's layers (everything else in the
    /// role stays frozen).
    pub train_last_layers: Option<usize>,
}

impl Default for RoleConfig {
    fn default() -> Self {
        RoleConfig { strategy: None, lr_scale: 1.0, train_last_layers: None }
    }
}

/// Per-role settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolesConfig {
    pub vision: RoleConfig,
    pub projector: RoleConfig,
    pub llm: RoleConfig,
}

impl Default for RolesConfig {
    fn default() -> Self {
        RolesConfig {
            // The usual advice: the vision encoder at a tenth of the LLM's rate.
            vision: RoleConfig { lr_scale: 0.1, ..Default::default() },
            projector: RoleConfig::default(),
            llm: RoleConfig::default(),
        }
    }
}

impl RolesConfig {
    pub fn get(&self, role: Role) -> &RoleConfig {
        match role {
            Role::Vision => &self.vision,
            Role::Projector => &self.projector,
            Role::Llm => &self.llm,
        }
    }

    /// The strategy for a role the mode trains: the configured one, else LoRA
    /// for the vision encoder and the LLM and full training for the projector.
    pub fn strategy(&self, role: Role) -> Strategy {
        self.get(role).strategy.unwrap_or(match role {
            Role::Projector => Strategy::Full,
            Role::Vision | Role::Llm => Strategy::Lora,
        })
    }
}

/// A regex override: parameters whose full name matches (anchored) train or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub pattern: String,
    pub train: bool,
}

/// AdamW settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig { lr: 2e-4, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1e-8 }
    }
}

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// What to do with a bad sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BadSamplePolicy {
    /// Drop it (counted and listed).
    #[default]
    Skip,
    /// Stop at the data summary.
    Fail,
}

/// What to do with a sample longer than the maximum length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TooLongPolicy {
    /// Cut the end off, unless that would cut into image tokens (then skip).
    #[default]
    Truncate,
    /// Drop the sample (counted).
    Skip,
}

/// Longest sample, in tokens, unless `train.max_length` says otherwise.
pub const DEFAULT_MAX_LENGTH: usize = 2048;

/// The training loop's settings (`train:` in the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    /// Passes over the training set (ignored when `max_steps` is set).
    pub epochs: f64,
    /// Optimizer steps; overrides `epochs`.
    pub max_steps: Option<usize>,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Gradient clipping (global L2 norm); 0 turns it off.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// The device's peak TFLOP/s for MFU (`--peak-tflops`); absent: the
    /// known peak of the CUDA GPU for the precision (none on the CPU).
    pub peak_tflops: Option<f64>,
    /// Validation samples held out of the training file: a fraction (< 1) or a count.
    pub val_size: f64,
    /// A separate validation file (instead of `val_size`).
    pub val_dataset: Option<PathBuf>,
    /// Validation loss every N steps (0: only at the end).
    pub eval_every: usize,
    /// Also generate every validation sample's answer (greedy) before the
    /// first step and after the last, and score it against the sample's
    /// answer (CER, WER, exact match): `eval-before.json` and `eval.json`.
    pub eval_generate: bool,
    /// Longest generated answer of `eval_generate`, in tokens.
    pub eval_max_new_tokens: usize,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: usize,
    /// Checkpoints kept (the oldest are removed).
    pub keep_last: usize,
    /// Stop after this many validations without improvement.
    pub early_stopping_patience: Option<usize>,
    /// Stop after this many non-finite losses in a row (each such step is skipped).
    pub max_bad_steps: usize,
    pub max_length: usize,
    pub too_long: TooLongPolicy,
    pub on_bad_sample: BadSamplePolicy,
    pub system_prompt: Option<String>,
    /// Images with more pixels are refused from their header, before they
    /// are decoded (a guard against decompression bombs); absent: Pillow's
    /// limit, [`vlmhost_imaging::DEFAULT_MAX_IMAGE_PIXELS`].
    pub max_image_pixels: Option<u64>,
    /// Activation checkpointing: keep only the inputs of each decoder layer
    /// and vision block (the segments the plugin marks) and recompute the
    /// layer in the backward pass (less memory, about a third more compute).
    pub gradient_checkpointing: bool,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            epochs: 1.0,
            max_steps: None,
            batch_size: 1,
            grad_accum: 1,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            seed: 42,
            peak_tflops: None,
            val_size: 0.0,
            val_dataset: None,
            eval_every: 0,
            eval_generate: false,
            eval_max_new_tokens: 64,
            save_every: 0,
            keep_last: 3,
            early_stopping_patience: None,
            max_bad_steps: 5,
            max_length: DEFAULT_MAX_LENGTH,
            too_long: TooLongPolicy::default(),
            on_bad_sample: BadSamplePolicy::default(),
            system_prompt: None,
            max_image_pixels: None,
            gradient_checkpointing: false,
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Family name or plugin library path (`--plugin` overrides).
    pub plugin: Option<String>,
    /// Checkpoint folder (`--model` overrides).
    pub model: Option<PathBuf>,
    /// `--mode` > `TRAINING_MODE` > this > `llm`.
    pub mode: Option<Mode>,
    /// The weights' and the compute's precision (`--precision` overrides):
    /// `auto` (bf16 on CUDA, fp32 on the CPU), `bf16` or `fp32`.
    pub precision: Precision,
    pub lora: LoraConfig,
    pub roles: RolesConfig,
    /// Modules trained fully and saved whole, whatever the mode (PEFT's
    /// `modules_to_save`).
    pub modules_to_save: Vec<String>,
    pub overrides: Vec<Override>,
    pub optimizer: OptimizerConfig,
    pub train: TrainSettings,
    /// Options for the family's processor (`--processor KEY=VALUE` adds and
    /// overrides): DeepSeek-OCR's `mode`, say. The plugin refuses keys it
    /// does not know.
    pub processor: serde_json::Map<String, serde_json::Value>,
    /// A chat template to render conversations with instead of the
    /// checkpoint's (`--chat-template` overrides): a Jinja file, or a JSON
    /// file holding `chat_template`. It is written into the run's adapter and
    /// merged checkpoints as `chat_template.jinja`, so inference renders the same.
    pub chat_template: Option<PathBuf>,
}


#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{source_name}: {value:?} is not a mode; use projector, llm, vision or both")]
    Mode { source_name: String, value: String },
}

impl TrainConfig {
    /// Read a YAML file; errors name the file, line and key.
    pub fn from_file(path: &Path) -> Result<TrainConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Io { path: path.to_path_buf(), error })?;
        Self::from_yaml(&text).map_err(|message| ConfigError::Parse { path: path.to_path_buf(), message })
    }

    pub fn from_yaml(text: &str) -> Result<TrainConfig, String> {
        if text.trim().is_empty() {
            return Ok(TrainConfig::default());
        }
        let cfg: TrainConfig = serde_yaml::from_str(text).map_err(|e| match e.location() {
            Some(l) => format!("line {}, column {}: {e}", l.line(), l.column()),
            None => e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Refuse settings that would ruin a run (a NaN or negative learning
    /// rate, betas outside [0, 1), zero steps, ...), naming the key and its
    /// valid range. Called on every file read and again after flags override it.
    pub fn validate(&self) -> Result<(), String> {
        let (o, t, l) = (&self.optimizer, &self.train, &self.lora);
        let bad = |key: &str, value: &dyn fmt::Debug, want: &str| Err(format!("{key} is {value:?}; it must be {want}"));
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !non_negative(o.lr) {
            return bad("optimizer.lr", &o.lr, "zero or a positive number such as 2.0e-4");
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(non_negative(*b) && *b < 1.0) {
                return bad(&format!("optimizer.betas[{i}]"), b, "in [0, 1), such as [0.9, 0.999]");
            }
        }
        if !positive(o.eps) {
            return bad("optimizer.eps", &o.eps, "a small positive number such as 1.0e-8");
        }
        if !non_negative(o.weight_decay) {
            return bad("optimizer.weight_decay", &o.weight_decay, "zero or positive");
        }
        for (role, r) in [("vision", &self.roles.vision), ("projector", &self.roles.projector), ("llm", &self.roles.llm)] {
            if !non_negative(r.lr_scale) {
                return bad(&format!("roles.{role}.lr_scale"), &r.lr_scale, "zero or positive");
            }
        }
        if l.r <= 0 {
            return bad("lora.r", &l.r, "positive");
        }
        if !l.lora_alpha.is_finite() {
            return bad("lora.lora_alpha", &l.lora_alpha, "a finite number");
        }
        if !(0.0..1.0).contains(&l.lora_dropout) {
            return bad("lora.lora_dropout", &l.lora_dropout, "in [0, 1)");
        }
        if t.max_steps == Some(0) {
            return bad("train.max_steps", &0, "at least 1 (leave it out to train train.epochs passes)");
        }
        if !positive(t.epochs) {
            return bad("train.epochs", &t.epochs, "a positive number of passes over the data, such as 1 or 0.5");
        }
        if t.batch_size == 0 || t.grad_accum == 0 {
            return Err("train.batch_size and train.grad_accum must be at least 1".into());
        }
        if !(non_negative(t.val_size) && (t.val_size < 1.0 || t.val_size.fract() == 0.0)) {
            return bad("train.val_size", &t.val_size, "a fraction in [0, 1) or a whole number of samples");
        }
        if !non_negative(t.max_grad_norm) {
            return bad("train.max_grad_norm", &t.max_grad_norm, "zero (no clipping) or positive");
        }
        if let Some(p) = t.peak_tflops.filter(|p| !positive(*p)) {
            return bad("train.peak_tflops", &p, "a positive number of TFLOP/s, such as 989 (H100 SXM, bf16)");
        }
        if t.max_length == 0 {
            return bad("train.max_length", &0, "at least 1 token");
        }
        if t.max_image_pixels == Some(0) {
            return bad("train.max_image_pixels", &0, "a positive number of pixels");
        }
        if t.eval_generate && t.eval_max_new_tokens == 0 {
            return bad("train.eval_max_new_tokens", &0, "at least 1 token when train.eval_generate is on");
        }
        Ok(())
    }

    /// Make `train.max_image_pixels` the limit of every plugin's image
    /// decoder in this process (and the processes it starts).
    pub fn apply_image_limit(&self) {
        if let Some(n) = self.train.max_image_pixels {
            std::env::set_var(vlmhost_imaging::MAX_IMAGE_PIXELS_VAR, n.to_string());
        }
    }

    /// The mode: `--mode` > `TRAINING_MODE` > the file > `llm`.
    pub fn resolve_mode(&self, flag: Option<&str>, env: Option<&str>) -> Result<Mode, ConfigError> {
        if let Some(f) = flag {
            return Mode::parse(f).ok_or_else(|| ConfigError::Mode { source_name: "--mode".into(), value: f.into() });
        }
        if let Some(e) = env.filter(|e| !e.trim().is_empty()) {
            return Mode::parse(e)
                .ok_or_else(|| ConfigError::Mode { source_name: "TRAINING_MODE".into(), value: e.into() });
        }
        Ok(self.mode.unwrap_or(Mode::Llm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_guide_config_parses() {
        let cfg = TrainConfig::from_yaml(
            r#"
lora:
  # projector: included automatically in every mode
  projector_target_modules: ["multi_modal_projector", "vision_embed_tokens"]
  vision_target_modules: ["qkv_proj", "out_proj", "fc1", "fc2"]
  llm_target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"#,
        )
        .unwrap();
        assert_eq!(cfg.lora.llm_target_modules.as_ref().unwrap().len(), 7);
        assert_eq!(cfg.lora.r, 16);
    }

    #[test]
    fn the_shipped_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/train_config.yaml");
        TrainConfig::from_file(&path).unwrap();
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                TrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 5, "{n} example configs in {}", dir.display());
    }

    #[test]
    fn mode_precedence() {
        let cfg = TrainConfig { mode: Some(Mode::Vision), ..Default::default() };
        assert_eq!(cfg.resolve_mode(Some("both"), Some("llm")).unwrap(), Mode::Both);
        assert_eq!(cfg.resolve_mode(None, Some("llm")).unwrap(), Mode::Llm);
        assert_eq!(cfg.resolve_mode(None, None).unwrap(), Mode::Vision);
        assert_eq!(TrainConfig::default().resolve_mode(None, Some("")).unwrap(), Mode::Llm);
        let err = cfg.resolve_mode(None, Some("stage2")).unwrap_err().to_string();
        assert!(err.contains("TRAINING_MODE: \"stage2\" is not a mode"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_with_a_line() {
        let err = TrainConfig::from_yaml("lora:\n  r: 8\n  alpha: 16\n").unwrap_err();
        assert!(err.contains("line 3") && err.contains("unknown field `alpha`"), "{err}");
    }

    #[test]
    fn settings_that_ruin_a_run_are_refused_by_key() {
        for (yaml, key) in [
            ("optimizer:\n  lr: .nan\n", "optimizer.lr is NaN"),
            ("optimizer:\n  lr: -1.0e-3\n", "optimizer.lr is -0.001"),
            ("optimizer:\n  lr: .inf\n", "optimizer.lr is inf"),
            ("optimizer:\n  betas: [2.0, 3.0]\n", "optimizer.betas[0] is 2.0"),
            ("optimizer:\n  betas: [0.9, 1.0]\n", "optimizer.betas[1] is 1.0"),
            ("optimizer:\n  eps: 0\n", "optimizer.eps is 0.0"),
            ("optimizer:\n  weight_decay: .inf\n", "optimizer.weight_decay is inf"),
            ("roles:\n  llm:\n    lr_scale: -1\n", "roles.llm.lr_scale is -1.0"),
            ("train:\n  max_steps: 0\n", "train.max_steps is 0"),
            ("train:\n  epochs: 0\n", "train.epochs is 0.0"),
            ("train:\n  val_size: 1.5\n", "train.val_size is 1.5"),
            ("train:\n  val_size: -0.1\n", "train.val_size is -0.1"),
            ("train:\n  max_grad_norm: .nan\n", "train.max_grad_norm is NaN"),
            ("train:\n  max_length: 0\n", "train.max_length is 0"),
            ("train:\n  eval_generate: true\n  eval_max_new_tokens: 0\n", "train.eval_max_new_tokens is 0"),
        ] {
            let err = TrainConfig::from_yaml(yaml).unwrap_err();
            assert!(err.starts_with(key) && err.contains("must be"), "{yaml:?}: {err}");
        }
        for fine in ["train:\n  val_size: 0.1\n", "train:\n  val_size: 3\n", "train:\n  epochs: 0.5\n", "optimizer:\n  betas: [0.0, 0.5]\n"] {
            TrainConfig::from_yaml(fine).unwrap_or_else(|e| panic!("{fine:?}: {e}"));
        }
    }

    #[test]
    fn rslora_scaling() {
        let mut l = LoraConfig { r: 16, lora_alpha: 32.0, ..Default::default() };
        assert_eq!(l.scaling(), 2.0);
        l.use_rslora = true;
        assert_eq!(l.scaling(), 8.0);
    }
}
