//! `vlmhost compare`: the same data and rules over several families, one
//! after another. Each family runs as its own `vlmhost` processes (inspect,
//! train, eval), so its peak memory is its own; a family without a model
//! folder gets a new one from `vlmhost init` (the `tiny` preset by default).
//! The result is a report in Markdown, JSON and one loss-curve PNG:
//! parameters and trainable parameters per role, final training and
//! validation loss, held-out CER, tokens/s and peak memory.

use crate::report::{self, RunSummary};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    let s = |p: &Path| p.display().to_string();
    let mut families = Vec::new();
    let mut run_dirs = Vec::new();
    for plugin in &job.plugins {
        let name = name_of(plugin);
        let model = match job.models.get(&name).or_else(|| job.models.get(plugin)) {
            Some(dir) => dir.clone(),
            None => {
                let dir = job.output.join("models").join(&name);
                vlmhost(
                    &["init", "--plugin", plugin, "--preset", &job.preset, "--output", &s(&dir), "--force"].map(String::from),
                    &format!("{name}: init"),
                )?;
                dir
            }
        };
        let mut common = vec!["--plugin".to_owned(), plugin.clone(), "--model".to_owned(), s(&model)];
        if let Some(c) = &job.config {
            common.extend(["--config".to_owned(), s(c)]);
        }
        for p in &job.processor {
            common.extend(["--processor".to_owned(), p.clone()]);
        }
        let inspect: serde_json::Value = serde_json::from_str(&vlmhost(
            &[vec!["inspect".to_owned(), "--json".to_owned()], common.clone()].concat(),
            &format!("{name}: inspect"),
        )?)
        .with_context(|| format!("{name}: inspect --json printed something else than JSON"))?;
        let mut roles = BTreeMap::new();
        if let Some(r) = inspect["roles"].as_object() {
            for (role, v) in r {
                roles.insert(
                    role.clone(),
                    RoleCount {
                        parameters: v["parameters"].as_i64().unwrap_or(0),
                        trainable: v["trainable"].as_i64().unwrap_or(0),
                        strategy: v["strategy"].as_str().unwrap_or("").to_owned(),
                    },
                );
            }
        }
        let run = job.output.join("runs").join(&name);
        if run.exists() {
            std::fs::remove_dir_all(&run).with_context(|| format!("replacing {}", run.display()))?;
        }
        let mut train = [vec!["train".to_owned()], common.clone()].concat();
        train.extend(["--dataset".to_owned(), s(&job.dataset), "--output".to_owned(), s(&run)]);
        if let Some(n) = job.max_steps {
            train.extend(["--max-steps".to_owned(), n.to_string()]);
        }
        let summary: serde_json::Value = serde_json::from_str(&vlmhost(&train, &format!("{name}: train"))?)
            .with_context(|| format!("{name}: train printed a summary that is not JSON"))?;
        if let Some(val) = &job.val_dataset {
            let checkpoint = summary["checkpoint"]
                .as_str()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| anyhow::anyhow!("{name}: train reported no checkpoint to evaluate"))?
                .to_owned();
            let mut eval = [vec!["eval".to_owned()], common.clone()].concat();
            eval.extend([
                "--adapter".to_owned(),
                checkpoint,
                "--dataset".to_owned(),
                s(val),
                "--generate".to_owned(),
                "--max-new-tokens".to_owned(),
                job.max_new_tokens.to_string(),
                "--json".to_owned(),
            ]);
            let out = vlmhost(&eval, &format!("{name}: eval"))?;
            crate::weights::write_atomic(&run.join("eval.json"), out.as_bytes())?;
        }
        families.push((name, model, roles, summary["peak_rss_mib"].as_f64()));
        run_dirs.push(run);
    }
    let rep = report::report(&run_dirs, &job.output.join("loss.png"))?;
    let families: Vec<FamilyResult> = families
        .into_iter()
        .zip(rep.runs)
        .map(|((family, model, roles, peak_rss_mib), run)| FamilyResult { family, model, roles, run, peak_rss_mib })
        .collect();
    let report = CompareReport { families, plot: rep.plot };
    crate::weights::write_atomic(&job.output.join("report.md"), report.markdown().as_bytes())?;
    crate::weights::write_atomic(&job.output.join("report.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(report)
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
        out.push_str("\n## Training\n\n| family | steps | first loss | last loss | final val loss | CER | WER | tokens/s | peak memory (MiB) |\n|---|---|---|---|---|---|---|---|---|\n");
        for f in &self.families {
            let r = &f.run;
            let eval = r.eval.as_ref();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                f.family,
                r.steps,
                num(r.first_loss, 4),
                num(r.last_loss, 4),
                num(r.final_val_loss.or_else(|| eval.and_then(|e| e.loss)), 4),
                num(eval.and_then(|e| e.cer), 4),
                num(eval.and_then(|e| e.wer), 4),
                num(r.median_tokens_per_second, 0),
                num(f.peak_rss_mib, 0),
            ));
        }
        if let Some(p) = &self.plot {
            out.push_str(&format!("\nLoss curves: `{}`\n", p.display()));
        }
        out
    }
}
