//! `vlmhost compare`: the same data and rules over several families, one
//! after another. Each family runs as its own `vlmhost` processes (inspect,
//! train, eval), so its peak memory is its own; a family without a model
//! folder gets a new one from `vlmhost init` (the `tiny` preset by default).
//! The result is a report in Markdown, JSON and one loss-curve PNG:
//! parameters and trainable parameters per role, final training and
//! validation loss, held-out CER, tokens/s, TFLOP/s and MFU, the attention
//! kernels that ran, and peak memory.

use crate::report::metrics::EVAL_FILE;
use crate::report::runs::{self as report, RunSummary};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Families (or plugin library paths), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    plugins: Vec<String>,
    /// A model folder for a family, FAMILY=DIR (repeatable); the others
    /// get a new `--preset` checkpoint from `vlmhost init`.
    #[arg(long = "model", value_name = "FAMILY=DIR")]
    models: Vec<String>,
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Messages JSONL or LLaVA JSON/JSONL; image paths relative to its folder.
    #[arg(long, value_name = "FILE")]
    dataset: PathBuf,
    /// Held-out data: final loss and CER of generated answers.
    #[arg(long, value_name = "FILE")]
    val_dataset: Option<PathBuf>,
    /// One training configuration for every family.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// A processor option for every family, KEY=VALUE (repeatable).
    #[arg(long = "processor", value_name = "KEY=VALUE")]
    processor: Vec<String>,
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let Args { plugins, models, preset, dataset, val_dataset, config, max_steps, max_new_tokens, processor, output } = args;
    let models = models
        .iter()
        .map(|m| {
            m.split_once('=')
                .map(|(f, d)| (f.to_owned(), PathBuf::from(d)))
                .ok_or_else(|| anyhow::anyhow!("--model {m:?}: write FAMILY=DIR"))
        })
        .collect::<Result<_>>()?;
    let job = CompareJob { plugins, models, preset, dataset, val_dataset, config, max_steps, max_new_tokens, processor, output };
    let r = compare(&job)?;
    print!("{}", r.markdown());
    eprintln!("report written to {}", job.output.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareJob {
    /// Family names (or plugin library paths).
    pub plugins: Vec<String>,
    /// Model folders by family; the others are created with `init`.
    pub models: BTreeMap<String, PathBuf>,
    pub preset: String,
    pub dataset: PathBuf,
    /// Held-out data for the final loss and CER (generated answers).
    pub val_dataset: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub max_steps: Option<usize>,
    pub max_new_tokens: usize,
    /// Processor options passed to every family (`KEY=VALUE`).
    pub processor: Vec<String>,
    pub output: PathBuf,
}

/// Parameters of one role.
#[derive(Debug, Clone, Serialize)]
pub struct RoleCount {
    pub parameters: i64,
    pub trainable: i64,
    pub strategy: String,
}

/// One family's results.
#[derive(Debug, Clone, Serialize)]
pub struct FamilyResult {
    pub family: String,
    pub model: PathBuf,
    pub roles: BTreeMap<String, RoleCount>,
    pub run: RunSummary,
    pub peak_rss_mib: Option<f64>,
    /// CUDA runs: the caching allocator's peak of memory held by tensors.
    pub cuda_peak_allocated_mib: Option<f64>,
}

/// The comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub families: Vec<FamilyResult>,
    pub plot: Option<PathBuf>,
}

/// Run the `vlmhost` binary; stdout on success, an error with its stderr otherwise.
fn vlmhost(args: &[String], what: &str) -> Result<String> {
    let exe = std::env::current_exe().context("finding the vlmhost binary")?;
    eprintln!("compare: vlmhost {}", args.join(" "));
    let out = Command::new(&exe).args(args).output().with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!("{what} failed:\n{}", String::from_utf8_lossy(&out.stderr).trim_end());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn name_of(plugin: &str) -> String {
    Path::new(plugin)
        .file_stem()
        .map(|s| s.to_string_lossy().trim_start_matches("libvlmhost_plugin_").to_owned())
        .unwrap_or_else(|| plugin.to_owned())
}

/// Run the comparison.
pub fn compare(job: &CompareJob) -> Result<CompareReport> {
    if job.plugins.is_empty() {
        bail!("--plugins names no family");
    }
    std::fs::create_dir_all(&job.output).with_context(|| format!("creating {}", job.output.display()))?;
    let mut families = Vec::new();
    let mut run_dirs = Vec::new();
    for plugin in &job.plugins {
        let (family, run) = run_family(job, plugin)?;
        families.push(family);
        run_dirs.push(run);
    }
    let rep = report::report(&run_dirs, &job.output.join("loss.png"))?;
    let families: Vec<FamilyResult> = families
        .into_iter()
        .zip(rep.runs)
        .map(|(f, run)| FamilyResult {
            family: f.name,
            model: f.model,
            roles: f.roles,
            run,
            peak_rss_mib: f.peak_rss_mib,
            cuda_peak_allocated_mib: f.cuda_peak_allocated_mib,
        })
        .collect();
    let report = CompareReport { families, plot: rep.plot };
    crate::files::write_atomic(&job.output.join("report.md"), report.markdown().as_bytes())?;
    crate::files::write_atomic(&job.output.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(report)
}

/// What one family's processes reported, before the run's report is read.
struct FamilyRun {
    name: String,
    model: PathBuf,
    roles: BTreeMap<String, RoleCount>,
    peak_rss_mib: Option<f64>,
    cuda_peak_allocated_mib: Option<f64>,
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// One family: its model (made by `init` if none was given), `inspect`,
/// `train`, and with a validation set `eval --generate`; returns its run folder.
fn run_family(job: &CompareJob, plugin: &str) -> Result<(FamilyRun, PathBuf)> {
    let name = name_of(plugin);
    let model = match job.models.get(&name).or_else(|| job.models.get(plugin)) {
        Some(dir) => dir.clone(),
        None => {
            let dir = job.output.join("models").join(&name);
            let init = ["init", "--plugin", plugin, "--preset", &job.preset, "--output", &display(&dir), "--force"];
            vlmhost(&init.map(String::from), &format!("{name}: init"))?;
            dir
        }
    };
    let mut common = vec!["--plugin".to_owned(), plugin.to_owned(), "--model".to_owned(), display(&model)];
    if let Some(c) = &job.config {
        common.extend(["--config".to_owned(), display(c)]);
    }
    for p in &job.processor {
        common.extend(["--processor".to_owned(), p.clone()]);
    }
    let inspect: serde_json::Value = serde_json::from_str(&vlmhost(
        &[vec!["inspect".to_owned(), "--json".to_owned()], common.clone()].concat(),
        &format!("{name}: inspect"),
    )?)
    .with_context(|| format!("{name}: inspect --json printed something else than JSON"))?;
    let run = job.output.join("runs").join(&name);
    if run.exists() {
        std::fs::remove_dir_all(&run).with_context(|| format!("replacing {}", run.display()))?;
    }
    let mut train = [vec!["train".to_owned()], common.clone()].concat();
    train.extend(["--dataset".to_owned(), display(&job.dataset), "--output".to_owned(), display(&run)]);
    if let Some(n) = job.max_steps {
        train.extend(["--max-steps".to_owned(), n.to_string()]);
    }
    let summary: serde_json::Value = serde_json::from_str(&vlmhost(&train, &format!("{name}: train"))?)
        .with_context(|| format!("{name}: train printed a summary that is not JSON"))?;
    if let Some(val) = &job.val_dataset {
        let checkpoint = summary["checkpoint"]
            .as_str()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| anyhow::anyhow!("{name}: train reported no checkpoint to evaluate"))?;
        let mut eval = [vec!["eval".to_owned()], common].concat();
        eval.extend(["--adapter", checkpoint, "--dataset", &display(val), "--generate", "--max-new-tokens"].map(String::from));
        eval.extend([job.max_new_tokens.to_string(), "--json".to_owned()]);
        let out = vlmhost(&eval, &format!("{name}: eval"))?;
        crate::files::write_atomic(&run.join(EVAL_FILE), out.as_bytes())?;
    }
    let roles = role_counts(&inspect);
    let (peak_rss_mib, cuda_peak_allocated_mib) = (summary["peak_rss_mib"].as_f64(), summary["cuda_peak_allocated_mib"].as_f64());
    Ok((FamilyRun { name, model, roles, peak_rss_mib, cuda_peak_allocated_mib }, run))
}

/// Parameters per role, from `inspect --json`.
fn role_counts(inspect: &serde_json::Value) -> BTreeMap<String, RoleCount> {
    let Some(roles) = inspect["roles"].as_object() else { return BTreeMap::new() };
    roles
        .iter()
        .map(|(role, v)| {
            let count = RoleCount {
                parameters: v["parameters"].as_i64().unwrap_or(0),
                trainable: v["trainable"].as_i64().unwrap_or(0),
                strategy: v["strategy"].as_str().unwrap_or("").to_owned(),
            };
            (role.clone(), count)
        })
        .collect()
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".to_owned(), |x| format!("{x:.digits$}"))
}

fn millions(n: i64) -> String {
    format!("{:.2}M", n as f64 / 1e6)
}

impl CompareReport {
    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut out = String::from("# vlmhost compare\n\n## Parameters (trainable / total, per role)\n\n");
        out.push_str("| family | vision | projector | llm | total trainable |\n|---|---|---|---|---|\n");
        for f in &self.families {
            let role = |r: &str| match f.roles.get(r) {
                Some(c) if c.parameters > 0 => format!("{} / {} ({})", millions(c.trainable), millions(c.parameters), c.strategy),
                _ => "none".to_owned(),
            };
            let trainable: i64 = f.roles.values().map(|c| c.trainable).sum();
            let total: i64 = f.roles.values().map(|c| c.parameters).sum();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} of {} |\n",
                f.family,
                role("vision"),
                role("projector"),
                role("llm"),
                millions(trainable),
                millions(total)
            ));
        }
        out.push_str("\n## Training\n\n| family | steps | first loss | last loss | final val loss | CER | WER | tokens/s | TFLOP/s | MFU | attention kernels | peak RSS (MiB) | peak CUDA allocated (MiB) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for f in &self.families {
            let r = &f.run;
            let eval = r.eval.as_ref();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                f.family,
                r.steps,
                num(r.first_loss, 4),
                num(r.last_loss, 4),
                num(r.final_val_loss.or_else(|| eval.and_then(|e| e.loss)), 4),
                num(eval.and_then(|e| e.cer), 4),
                num(eval.and_then(|e| e.wer), 4),
                num(r.median_tokens_per_second, 0),
                num(r.median_tflops, 2),
                r.median_mfu.map_or_else(|| "–".to_owned(), |m| format!("{:.1}%", 100.0 * m)),
                r.attention_kernels.as_deref().unwrap_or("–"),
                num(f.peak_rss_mib, 0),
                num(f.cuda_peak_allocated_mib, 0),
            ));
        }
        if let Some(p) = &self.plot {
            out.push_str(&format!("\nLoss curves: `{}`\n", p.display()));
        }
        out
    }
}
