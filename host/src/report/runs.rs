//! `vlmhost report RUN_DIR...`: runs side by side. For each run folder, from
//! its `metrics.jsonl` (required), `config.yaml` (the resolved configuration
//! training saves; optional), `eval.json` (optional; numbers under `loss`,
//! `cer`, `wer`, `exact_match`) and `eval-before.json` (the same, measured on
//! the run's starting point: `train.eval_generate`): a row of a Markdown table ([`Report::markdown`])
//! or of JSON (`Report` is `Serialize`), and one PNG overlaying the runs'
//! training-loss curves.

use super::metrics::{self, MetricsRecord, CONFIG_FILE, EVAL_BEFORE_FILE, EVAL_FILE};
use super::plot::{self, Chart, Mark, Series, PALETTE};
use anyhow::{bail, Context};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Evaluation metrics of a run (`eval.json`); each key is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EvalMetrics {
    pub loss: Option<f64>,
    pub cer: Option<f64>,
    pub wer: Option<f64>,
    pub exact_match: Option<f64>,
}

/// One run's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// The run folder's name (its path as given where two runs share a name).
    pub run: String,
    pub path: PathBuf,
    /// `plugin`, `model` and `mode` of `config.yaml`, when it has them.
    pub plugin: Option<String>,
    pub model: Option<String>,
    pub mode: Option<String>,
    /// The last step recorded.
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub best_loss: Option<f64>,
    pub best_loss_step: Option<usize>,
    pub final_val_loss: Option<f64>,
    /// Steps skipped for a non-finite loss.
    pub skipped_steps: usize,
    pub median_tokens_per_second: Option<f64>,
    /// The median step's achieved TFLOP/s and MFU (model FLOPs; `metrics.jsonl`).
    pub median_tflops: Option<f64>,
    pub median_mfu: Option<f64>,
    /// Attention calls by kernel (`summary.json`'s `attention_kernels`), as
    /// `flash 96, math 0`; absent for runs that did not finish.
    pub attention_kernels: Option<String>,
    /// The most memory the run used, in MiB: the CUDA allocator's peak of
    /// memory held by tensors, else (CPU runs) the process's peak RSS.
    pub peak_memory_mib: Option<f64>,
    /// Training time, summed over resumed segments.
    pub wall_seconds: Option<f64>,
    pub eval: Option<EvalMetrics>,
    /// The evaluation of the run's starting point (`eval-before.json`).
    pub eval_before: Option<EvalMetrics>,
}

/// Runs side by side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub runs: Vec<RunSummary>,
    /// The loss overlay, when any run has a finite training loss.
    pub plot: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Wall time from `elapsed_seconds`, which restarts from zero when a run is
/// resumed: the sum of each segment's last value.
fn wall_seconds(records: &[MetricsRecord]) -> Option<f64> {
    let mut total = 0.0;
    let mut segment: Option<f64> = None;
    for e in records.iter().filter_map(|r| r.elapsed_seconds.filter(|e| e.is_finite())) {
        match segment {
            Some(prev) if e < prev => {
                total += prev;
                segment = Some(e);
            }
            _ => segment = Some(e),
        }
    }
    segment.map(|s| total + s)
}

fn yaml_string(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Null => None,
        other => serde_yaml::to_string(other).ok().map(|s| s.trim().to_owned()),
    }
}

/// `plugin`, `model`, `mode` of `run_dir/config.yaml` (all `None` without one).
fn read_config(run_dir: &Path) -> anyhow::Result<(Option<String>, Option<String>, Option<String>)> {
    let path = run_dir.join(CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, None, None)),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let v: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{}: not valid YAML (fix it, or move it away to report without it)", path.display()))?;
    let get = |k: &str| v.get(k).and_then(yaml_string);
    Ok((get("plugin"), get("model"), get("mode")))
}

/// `run_dir/FILE` (`eval.json`, `eval-before.json`), when there is one.
fn read_eval(run_dir: &Path, file: &str) -> anyhow::Result<Option<EvalMetrics>> {
    let path = run_dir.join(file);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    if !v.is_object() {
        bail!("{}: expected a JSON object with \"loss\", \"cer\", \"wer\" or \"exact_match\"", path.display());
    }
    let get = |k: &str| -> anyhow::Result<Option<f64>> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(x) => x.as_f64().map(Some).with_context(|| format!("{}: \"{k}\" is {x}, not a number", path.display())),
        }
    };
    Ok(Some(EvalMetrics { loss: get("loss")?, cer: get("cer")?, wer: get("wer")?, exact_match: get("exact_match")? }))
}

/// `summary.json`'s `attention_kernels` as one line, when the run wrote one.
fn read_kernels(run_dir: &Path) -> anyhow::Result<Option<String>> {
    let path = run_dir.join(metrics::SUMMARY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    Ok(v.get("attention_kernels")
        .and_then(|k| serde_json::from_value::<crate::model::kernels::AttentionKernels>(k.clone()).ok())
        .map(|k| k.line()))
}

/// Summarise one run folder (its records are returned for the plot).
pub fn summarise(run_dir: &Path) -> anyhow::Result<(RunSummary, Vec<MetricsRecord>)> {
    if !run_dir.is_dir() {
        bail!("{}: not a folder (give run folders, the --output of training)", run_dir.display());
    }
    let records = metrics::read_metrics(&run_dir.join(metrics::METRICS_FILE))?;
    let (plugin, model, mode) = read_config(run_dir)?;
    let eval = read_eval(run_dir, EVAL_FILE)?;
    let eval_before = read_eval(run_dir, EVAL_BEFORE_FILE)?;
    let losses = metrics::finite_points(&records, |r| r.loss);
    let best = losses.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1));
    let summary = RunSummary {
        run: plot::run_name(run_dir),
        path: run_dir.to_owned(),
        plugin,
        model,
        mode,
        steps: records.last().map_or(0, |r| r.step),
        first_loss: losses.first().map(|p| p.1),
        last_loss: losses.last().map(|p| p.1),
        best_loss: best.map(|p| p.1),
        best_loss_step: best.map(|p| p.0 as usize),
        final_val_loss: metrics::finite_points(&records, |r| r.val_loss).last().map(|p| p.1),
        skipped_steps: records.iter().filter(|r| r.skipped.is_some()).count(),
        median_tokens_per_second: median(
            records.iter().filter(|r| r.skipped.is_none()).filter_map(|r| r.tokens_per_second.filter(|t| t.is_finite() && *t > 0.0)).collect(),
        ),
        median_tflops: median(records.iter().filter(|r| r.skipped.is_none()).filter_map(|r| r.throughput.achieved_tflops.filter(|t| t.is_finite())).collect()),
        median_mfu: median(records.iter().filter(|r| r.skipped.is_none()).filter_map(|r| r.throughput.mfu.filter(|t| t.is_finite())).collect()),
        attention_kernels: read_kernels(run_dir)?,
        peak_memory_mib: records
            .iter()
            .filter_map(|r| r.memory.watched_mib())
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v)))),
        wall_seconds: wall_seconds(&records),
        eval,
        eval_before,
    };
    Ok((summary, records))
}

/// Summarise `run_dirs` and write the training-loss overlay to `out_png`
/// (atomically). Every run folder is read before anything is written; the
/// first broken one is the error, naming the folder and file.
pub fn report(run_dirs: &[PathBuf], out_png: &Path) -> anyhow::Result<Report> {
    if run_dirs.is_empty() {
        bail!("no run folders given: name one or more training output folders");
    }
    let mut runs = Vec::with_capacity(run_dirs.len());
    let mut curves = Vec::with_capacity(run_dirs.len());
    for dir in run_dirs {
        let (summary, records) = summarise(dir).with_context(|| format!("run {}", dir.display()))?;
        curves.push(metrics::finite_points(&records, |r| r.loss));
        runs.push(summary);
    }
    // Runs that share a folder name are told apart by their path as given.
    let shared: Vec<bool> = runs.iter().map(|r| runs.iter().filter(|o| o.run == r.run).count() > 1).collect();
    for (r, shared) in runs.iter_mut().zip(shared) {
        if shared {
            r.run = r.path.display().to_string();
        }
    }
    let plot = if curves.iter().all(Vec::is_empty) {
        tracing::warn!("no run has a finite training loss: no {}", out_png.display());
        None
    } else {
        let series: Vec<Series> = runs
            .iter()
            .zip(curves)
            .enumerate()
            .map(|(i, (r, points))| Series { label: r.run.clone(), color: PALETTE[i % PALETTE.len()], mark: Mark::Line, points })
            .collect();
        let title = match runs.as_slice() {
            [one] => format!("training loss: {}", one.run),
            _ => "training loss".to_owned(),
        };
        let chart = Chart { title: &title, x_label: "step", y_label: "training loss", y_scientific: false };
        plot::write_png(out_png, &chart, &series, (plot::PLOT_WIDTH, plot::PLOT_HEIGHT))?;
        Some(out_png.to_owned())
    };
    Ok(Report { runs, plot })
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{x:.decimals$}"))
}

fn text(v: &Option<String>) -> String {
    v.as_deref().map_or_else(|| "–".to_owned(), cell)
}

/// A Markdown table cell: `|` escaped, newlines flattened.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// `1h 02m 03s`, `2m 03s`, `3.4s`.
pub fn duration(seconds: f64) -> String {
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds.round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else {
        format!("{m}m {s:02}s")
    }
}

impl Report {
    /// The runs as a Markdown table (eval columns only when a run has `eval.json`).
    pub fn markdown(&self) -> String {
        let with_eval = self.runs.iter().any(|r| r.eval.is_some());
        let mut head = vec![
            "run", "plugin", "model", "mode", "steps", "first loss", "last loss", "best loss (step)", "final val loss", "tokens/s (median)", "TFLOP/s", "MFU", "attention kernels", "peak memory (MiB)", "wall time",
        ];
        let with_before = self.runs.iter().any(|r| r.eval_before.is_some());
        if with_before {
            head.extend(["CER before", "exact match before"]);
        }
        if with_eval {
            head.extend(["eval loss", "CER", "WER", "exact match"]);
        }
        let mut out = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
        for r in &self.runs {
            let steps = if r.skipped_steps > 0 { format!("{} ({} skipped)", r.steps, r.skipped_steps) } else { r.steps.to_string() };
            let best = match (r.best_loss, r.best_loss_step) {
                (Some(b), Some(s)) => format!("{b:.4} ({s})"),
                _ => "–".to_owned(),
            };
            let mut row = vec![
                cell(&r.run),
                text(&r.plugin),
                text(&r.model),
                text(&r.mode),
                steps,
                num(r.first_loss, 4),
                num(r.last_loss, 4),
                best,
                num(r.final_val_loss, 4),
                num(r.median_tokens_per_second, 0),
                num(r.median_tflops, 2),
                r.median_mfu.map_or_else(|| "–".to_owned(), |m| format!("{:.1}%", 100.0 * m)),
                text(&r.attention_kernels),
                num(r.peak_memory_mib, 0),
                r.wall_seconds.map_or_else(|| "–".to_owned(), duration),
            ];
            if with_before {
                let e = r.eval_before.clone().unwrap_or_default();
                row.extend([num(e.cer, 4), num(e.exact_match, 4)]);
            }
            if with_eval {
                let e = r.eval.clone().unwrap_or_default();
                row.extend([num(e.loss, 4), num(e.cer, 4), num(e.wer, 4), num(e.exact_match, 4)]);
            }
            out += &format!("| {} |\n", row.join(" | "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_run(dir: &Path, losses: &[Option<f64>], elapsed: &[f64], val: Option<f64>, cuda: bool) {
        std::fs::create_dir_all(dir).unwrap();
        let mut text = String::new();
        for (i, (loss, e)) in losses.iter().zip(elapsed).enumerate() {
            let mut v = serde_json::json!({
                "step": i + 1, "epoch": 0, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens": 100,
                "supervised_tokens": 40, "tokens_per_second": 100.0 * (i + 1) as f64, "elapsed_seconds": e,
            });
            if loss.is_none() {
                v["skipped"] = "non-finite loss".into();
            }
            // Memory: the peak RSS grows; a run on CUDA also has the allocator's peak, which wins.
            v["peak_rss_mib"] = (500.0 + 10.0 * i as f64).into();
            if cuda {
                v["cuda_peak_allocated_mib"] = (2000.0 + i as f64).into();
            }
            if i + 1 == losses.len() {
                if let Some(val) = val {
                    v["val_loss"] = val.into();
                }
            }
            text += &format!("{v}\n");
        }
        std::fs::write(dir.join(metrics::METRICS_FILE), text).unwrap();
    }

    #[test]
    fn two_runs_side_by_side() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("run-a");
        let b = tmp.path().join("run-b");
        write_run(&a, &[Some(2.0), Some(1.5), Some(1.25), Some(1.3)], &[1.0, 2.0, 3.0, 4.0], Some(1.4), false);
        std::fs::write(a.join(CONFIG_FILE), "plugin: qwen2_vl\nmodel: /models/qwen2-vl-2b\nmode: llm\ntrain:\n  lr: 0.0001\n").unwrap();
        std::fs::write(a.join(EVAL_FILE), r#"{"loss": 1.41, "cer": 0.125, "wer": 0.25, "exact_match": 0.5, "samples": 10}"#).unwrap();
        // Run b was resumed after step 2 (elapsed restarts) and skipped a step.
        write_run(&b, &[Some(3.0), None, Some(2.5)], &[10.0, 20.0, 5.0], None, true);

        let out = tmp.path().join("report.png");
        // A finished run's summary names the attention kernels that ran.
        std::fs::write(
            a.join(metrics::SUMMARY_FILE),
            r#"{"attention_kernels": {"calls": 96, "flash": 90, "flash_cpu": 0, "efficient": 0, "cudnn": 0, "math": 6, "other": 0}}"#,
        )
        .unwrap();
        let rep = report(&[a.clone(), b.clone()], &out).unwrap();
        assert_eq!(rep.plot.as_deref(), Some(out.as_path()));
        let img = image::open(&out).unwrap();
        assert_eq!((img.width(), img.height()), (plot::PLOT_WIDTH, plot::PLOT_HEIGHT));

        let (ra, rb) = (&rep.runs[0], &rep.runs[1]);
        assert_eq!((ra.steps, ra.first_loss, ra.last_loss, ra.best_loss, ra.best_loss_step), (4, Some(2.0), Some(1.3), Some(1.25), Some(3)));
        assert_eq!(ra.final_val_loss, Some(1.4));
        assert_eq!(ra.median_tokens_per_second, Some(250.0));
        assert_eq!(ra.wall_seconds, Some(4.0));
        assert_eq!(ra.plugin.as_deref(), Some("qwen2_vl"));
        assert_eq!(ra.eval.as_ref().unwrap().cer, Some(0.125));
        assert_eq!((rb.steps, rb.skipped_steps, rb.wall_seconds, rb.final_val_loss), (3, 1, Some(25.0), None));
        assert_eq!(rb.median_tokens_per_second, Some(200.0));
        assert_eq!((ra.peak_memory_mib, rb.peak_memory_mib), (Some(530.0), Some(2002.0)));

        let md = rep.markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 4, "{md}");
        assert!(lines[0].contains("| CER |"), "{md}");
        assert_eq!(
            lines[2],
            "| run-a | qwen2_vl | /models/qwen2-vl-2b | llm | 4 | 2.0000 | 1.3000 | 1.2500 (3) | 1.4000 | 250 | – | – | flash 90, math 6 | 530 | 4.0s | 1.4100 | 0.1250 | 0.2500 | 0.5000 |"
        );
        assert_eq!(lines[3], "| run-b | – | – | – | 3 (1 skipped) | 3.0000 | 2.5000 | 2.5000 (3) | – | 200 | – | – | – | 2002 | 25.0s | – | – | – | – |");

        // The starting point's scores (eval-before.json) get their own columns.
        std::fs::write(b.join(EVAL_BEFORE_FILE), r#"{"loss": 4.0, "cer": 0.875, "exact_match": 0.0}"#).unwrap();
        let md = report(&[a.clone(), b.clone()], &out).unwrap().markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert!(lines[0].contains("| CER before | exact match before | eval loss | CER |"), "{md}");
        assert!(lines[2].ends_with("| 4.0s | – | – | 1.4100 | 0.1250 | 0.2500 | 0.5000 |"), "{md}");
        assert!(lines[3].ends_with("| 25.0s | 0.8750 | 0.0000 | – | – | – | – |"), "{md}");

        let json = serde_json::to_value(&rep).unwrap();
        assert_eq!(json["runs"][1]["run"], "run-b");
        assert_eq!(json["runs"][0]["eval"]["wer"], 0.25);
    }

    #[test]
    fn errors_name_the_run_and_file() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("r.png");
        let good = tmp.path().join("good");
        write_run(&good, &[Some(1.0)], &[1.0], None, false);

        let missing = tmp.path().join("nothing-here");
        std::fs::create_dir(&missing).unwrap();
        let e = format!("{:#}", report(&[good.clone(), missing.clone()], &out).unwrap_err());
        assert!(e.contains("nothing-here") && e.contains("metrics.jsonl"), "{e}");
        assert!(!out.exists(), "nothing written when a run is broken");

        let bad_eval = tmp.path().join("bad-eval");
        write_run(&bad_eval, &[Some(1.0)], &[1.0], None, false);
        std::fs::write(bad_eval.join(EVAL_FILE), r#"{"cer": "low"}"#).unwrap();
        let e = format!("{:#}", report(&[bad_eval.clone()], &out).unwrap_err());
        assert!(e.contains("bad-eval") && e.contains("eval.json") && e.contains("\"cer\""), "{e}");

        let bad_cfg = tmp.path().join("bad-cfg");
        write_run(&bad_cfg, &[Some(1.0)], &[1.0], None, false);
        std::fs::write(bad_cfg.join(CONFIG_FILE), "plugin: [unclosed\n").unwrap();
        let e = format!("{:#}", report(&[bad_cfg], &out).unwrap_err());
        assert!(e.contains("bad-cfg") && e.contains("config.yaml"), "{e}");

        let e = format!("{:#}", report(&[], &out).unwrap_err());
        assert!(e.contains("no run folders"), "{e}");
    }

    #[test]
    fn same_names_are_told_apart_and_durations_read() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("x").join("run");
        let b = tmp.path().join("y").join("run");
        write_run(&a, &[Some(1.0)], &[1.0], None, false);
        write_run(&b, &[Some(2.0)], &[1.0], None, false);
        let rep = report(&[a.clone(), b.clone()], &tmp.path().join("r.png")).unwrap();
        assert_eq!(rep.runs[0].run, a.display().to_string());
        assert_eq!(rep.runs[1].run, b.display().to_string());
        assert_eq!(duration(3725.0), "1h 02m 05s");
        assert_eq!(duration(125.0), "2m 05s");
    }
}
