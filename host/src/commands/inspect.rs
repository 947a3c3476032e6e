//! `vlmhost inspect`: the dry run a user reads before spending GPU hours.
//! It opens the model through its plugin, checks the checkpoint's keys and
//! shapes (without loading tensor data), applies the rules, and reports per
//! role what trains and how.
//!
//! Every role is reported, also for an encoder-free family (Fuyu): its vision
//! role is shown empty, as `none (encoder-free)` in the table and with
//! `"note": "none (encoder-free)"` (0 parameters, frozen) in the JSON.
//!
//! With each role, the memory its tensors take in training at the chosen
//! precision ([`MemoryEstimate`]): weights (frozen ones in the base dtype,
//! trainable ones and LoRA in fp32 under bf16), gradients and AdamW's two
//! moments of the trainable values. Activations are not included: they
//! depend on the batch, the sequence lengths and gradient checkpointing.

use crate::config::Strategy;
use crate::model::weights::master_kind;
use crate::model::HostModel;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use vlmhost_plugin_api::Role;
use super::args::ModelArgs;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (cfg, mut opts) = args.model.resolve()?;
    opts.load_weights = false;
    let m = crate::model::open(&opts, &cfg)?;
    let report = InspectReport::new(&m);
    if args.json {
        super::print_json(&report)?;
    } else {
        print!("{}", report.render());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
pub struct RoleReport {
    /// Base parameters of the role (tied copies counted once).
    pub parameters: i64,
    /// What the optimizer updates: fully trained parameters plus LoRA A and B.
    pub trainable: i64,
    pub strategy: Strategy,
    pub lr_scale: f64,
    /// Full names of the modules that get a LoRA adapter.
    pub lora_modules: Vec<String>,
    /// Set when the role does not exist in this family (`none (encoder-free)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// What its tensors take in training.
    pub memory: MemoryEstimate,
}

/// Bytes of a role's tensors in training (activations aside).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Base weights (frozen: the base dtype; trained fully: the master dtype) and LoRA A/B (master dtype).
    pub weights_bytes: i64,
    /// One gradient per trainable value, in the master dtype.
    pub gradients_bytes: i64,
    /// AdamW's first and second moments per trainable value, in the master dtype.
    pub optimizer_bytes: i64,
}

impl MemoryEstimate {
    /// The estimate for `role` of `m`, from its spec and plan (no weights needed).
    pub fn of(m: &HostModel, role: Role) -> MemoryEstimate {
        let (base, master) = (m.kind().elt_size_in_bytes() as i64, master_kind(m.kind()).elt_size_in_bytes() as i64);
        let (spec, plan) = (m.spec(), m.plan());
        let mut e = MemoryEstimate::default();
        let mut trainable = 0;
        for (i, p) in spec.params.iter().enumerate() {
            if plan.roles[i] != role || !p.tied_to.is_empty() {
                continue;
            }
            let n: i64 = p.shape.iter().product();
            if plan.trainable[i] {
                e.weights_bytes += n * master;
                trainable += n;
            } else {
                e.weights_bytes += n * base;
            }
        }
        for &i in &plan.lora_modules {
            let module = &spec.modules[i];
            if plan.roles[module.weight as usize] == role {
                let n = m.config().lora.r * (module.in_features + module.out_features);
                e.weights_bytes += n * master;
                trainable += n;
            }
        }
        e.gradients_bytes = trainable * master;
        e.optimizer_bytes = 2 * trainable * master;
        e
    }

    /// The sum of every part.
    pub fn total_bytes(&self) -> i64 {
        self.weights_bytes + self.gradients_bytes + self.optimizer_bytes
    }

    fn add(self, other: MemoryEstimate) -> MemoryEstimate {
        MemoryEstimate {
            weights_bytes: self.weights_bytes + other.weights_bytes,
            gradients_bytes: self.gradients_bytes + other.gradients_bytes,
            optimizer_bytes: self.optimizer_bytes + other.optimizer_bytes,
        }
    }
}

/// How an encoder-free family's vision role is shown.
pub const NO_VISION_ENCODER: &str = "none (encoder-free)";

#[derive(Debug, Serialize)]
pub struct LoraReport {
    pub r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    pub scaling: f64,
}

#[derive(Debug, Serialize)]
pub struct CheckpointReport {
    pub files: Vec<PathBuf>,
    pub tensors_matched: usize,
    pub ignored_keys: Vec<String>,
    pub missing_allowed: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub family: String,
    pub plugin: PathBuf,
    pub model: PathBuf,
    pub mode: String,
    pub has_vision_encoder: bool,
    pub roles: BTreeMap<String, RoleReport>,
    pub total_parameters: i64,
    pub trainable_parameters: i64,
    /// `bf16` (frozen weights in bf16, trainable tensors in fp32) or `fp32`.
    pub precision: String,
    /// Every role's [`MemoryEstimate`], summed.
    pub memory: MemoryEstimate,
    pub lora: LoraReport,
    pub checkpoint: CheckpointReport,
    pub warnings: Vec<String>,
}

impl InspectReport {
    pub fn new(m: &HostModel) -> InspectReport {
        let mut roles = BTreeMap::new();
        let (mut total, mut trainable) = (0, 0);
        let mut memory = MemoryEstimate::default();
        for role in Role::ALL {
            // Shown, empty, when the family has no vision encoder.
            let note = (role == Role::Vision && !m.spec().has_vision_encoder).then(|| NO_VISION_ENCODER.to_owned());
            let (p, t) = m.counts(role);
            total += p;
            trainable += t;
            let plan = &m.plan().role_plans[&role];
            let role_memory = MemoryEstimate::of(m, role);
            memory = memory.add(role_memory);
            roles.insert(
                role.name().to_owned(),
                RoleReport {
                    parameters: p,
                    trainable: t,
                    strategy: plan.strategy,
                    lr_scale: plan.lr_scale,
                    lora_modules: m.lora_module_names(role),
                    note,
                    memory: role_memory,
                },
            );
        }
        let l = &m.config().lora;
        InspectReport {
            family: m.family().to_owned(),
            plugin: m.plugin().path.clone(),
            model: m.model_dir().to_path_buf(),
            mode: m.plan().mode.name().to_owned(),
            has_vision_encoder: m.spec().has_vision_encoder,
            roles,
            total_parameters: total,
            trainable_parameters: trainable,
            precision: if m.kind() == tch::Kind::BFloat16 { "bf16" } else { "fp32" }.to_owned(),
            memory,
            lora: LoraReport {
                r: l.r,
                lora_alpha: l.lora_alpha,
                lora_dropout: l.lora_dropout,
                use_rslora: l.use_rslora,
                scaling: l.scaling(),
            },
            checkpoint: CheckpointReport {
                files: m.load_report().files.clone(),
                tensors_matched: m.load_report().loaded,
                ignored_keys: m.load_report().ignored.clone(),
                missing_allowed: m.load_report().missing.clone(),
            },
            warnings: m.plan().warnings.clone(),
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "family     {} ({})", self.family, self.plugin.display());
        let _ = writeln!(
            s,
            "checkpoint {} ({} file(s), {} tensors match)",
            self.model.display(),
            self.checkpoint.files.len(),
            self.checkpoint.tensors_matched
        );
        let _ = writeln!(s, "mode       {}", self.mode);
        let _ = writeln!(s);
        let _ = writeln!(s, "{:<10} {:<8} {:>14} {:>14} {:>8} {:>6}", "ROLE", "STRATEGY", "PARAMETERS", "TRAINABLE", "LR SCALE", "LORA");
        for role in Role::ALL {
            let r = &self.roles[role.name()];
            if let Some(note) = &r.note {
                let _ = writeln!(s, "{:<10} {note}", role.name());
                continue;
            }
            let _ = writeln!(
                s,
                "{:<10} {:<8} {:>14} {:>14} {:>8} {:>6}",
                role.name(),
                r.strategy.name(),
                group_digits(r.parameters),
                group_digits(r.trainable),
                r.lr_scale,
                r.lora_modules.len()
            );
        }
        let pct = if self.total_parameters > 0 {
            100.0 * self.trainable_parameters as f64 / self.total_parameters as f64
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "{:<10} {:<8} {:>14} {:>14}   ({pct:.3}% trainable)",
            "total",
            "",
            group_digits(self.total_parameters),
            group_digits(self.trainable_parameters)
        );
        let _ = writeln!(s, "\nmemory in training, {} ({}), activations not included:", self.precision, precision_note(&self.precision));
        let _ = writeln!(s, "{:<10} {:>12} {:>12} {:>12} {:>12}", "ROLE", "WEIGHTS", "GRADIENTS", "OPTIMIZER", "TOTAL");
        let rows = Role::ALL.iter().filter(|r| self.roles[r.name()].note.is_none()).map(|r| (r.name(), &self.roles[r.name()].memory));
        for (name, e) in rows.chain([("total", &self.memory)]) {
            let _ = writeln!(
                s,
                "{name:<10} {:>12} {:>12} {:>12} {:>12}",
                human_bytes(e.weights_bytes),
                human_bytes(e.gradients_bytes),
                human_bytes(e.optimizer_bytes),
                human_bytes(e.total_bytes())
            );
        }
        let any_lora = self.roles.values().any(|r| !r.lora_modules.is_empty());
        if any_lora {
            let l = &self.lora;
            let _ = writeln!(
                s,
                "\nLoRA r={} alpha={} (scale {}{}), dropout {}",
                l.r,
                l.lora_alpha,
                l.scaling,
                if l.use_rslora { ", rsLoRA" } else { "" },
                l.lora_dropout
            );
            for role in Role::ALL {
                for (pattern, n) in compress(&self.roles[role.name()].lora_modules) {
                    let _ = writeln!(s, "  {:<10} {pattern}{}", role.name(), if n > 1 { format!("  x{n}") } else { String::new() });
                }
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

/// Group module names that differ only in layer numbers:
/// `a.layers.*.q_proj` with a count, in first-seen order.
fn compress(names: &[String]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for n in names {
        let key: Vec<&str> = n.split('.').map(|seg| if seg.chars().all(|c| c.is_ascii_digit()) { "*" } else { seg }).collect();
        let key = key.join(".");
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, c)) => *c += 1,
            None => out.push((key, 1)),
        }
    }
    out
}

fn precision_note(precision: &str) -> &'static str {
    if precision == "bf16" {
        "frozen weights in bf16; trainable tensors, gradients and AdamW state in fp32"
    } else {
        "everything in fp32"
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `3.25 GiB`.
fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

fn group_digits(n: i64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_layer_numbers() {
        let names: Vec<String> = ["m.layers.0.q", "m.layers.1.q", "m.layers.0.k", "head"].iter().map(|s| s.to_string()).collect();
        assert_eq!(compress(&names), vec![("m.layers.*.q".into(), 2), ("m.layers.*.k".into(), 1), ("head".into(), 1)]);
        assert_eq!(group_digits(1234567), "1,234,567");
        assert_eq!(group_digits(12), "12");
        assert_eq!((human_bytes(512), human_bytes(1536), human_bytes(3 << 30)), ("512 B".into(), "1.50 KiB".into(), "3.00 GiB".into()));
    }
}
