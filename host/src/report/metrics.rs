//! A run folder's files and its metrics log.
//!
//! Training appends one [`StepMetrics`] line per optimizer step to
//! `metrics.jsonl` ([`MetricsLog`]); reports and plots read them back as
//! [`MetricsRecord`]s ([`read_metrics`]), leniently where a crashed run leaves
//! traces: missing, `null` or non-finite losses are skipped points, and a last
//! line cut off mid-write (no trailing newline) is dropped with a warning. Any
//! other line that is not a metrics record is an error naming the file and line.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The file a run writes one line per optimizer step to.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The resolved configuration a run trained with (also in every checkpoint).
pub const CONFIG_FILE: &str = "config.yaml";
/// How a run ended ([`crate::train::TrainSummary`]).
pub const SUMMARY_FILE: &str = "summary.json";
/// The evaluation of a run's result (`vlmhost eval --json`'s format).
pub const EVAL_FILE: &str = "eval.json";
/// The scored validation answers of a run's starting point (`train.eval_generate`).
pub const EVAL_BEFORE_FILE: &str = "eval-before.json";

/// One line of `metrics.jsonl`, as training writes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: usize,
    pub loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub tokens: usize,
    pub supervised_tokens: usize,
    /// `tokens` (the language model's input positions, text and image
    /// placeholders, padding excluded; all ranks) over the step's time.
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// The run's peak memory so far.
    #[serde(flatten)]
    pub memory: PeakMemory,
    /// The step's model FLOPs and their rate.
    #[serde(flatten)]
    pub throughput: Throughput,
}

/// Model FLOPs (`crate::model::flops`: the host's linear layers and the
/// attention calls, forward and backward, recomputation excluded) over time:
/// per step in `metrics.jsonl`, for the whole run in `summary.json`. Per
/// process: in a data-parallel run, rank 0's share on its own device.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Throughput {
    /// Model FLOPs of the step(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_flops: Option<f64>,
    /// Seconds of the step(s): forward, backward and optimizer, from the
    /// batch's preparation to the weights' update (validation and
    /// checkpoints excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_seconds: Option<f64>,
    /// `model_flops / step_seconds` in TFLOP/s: on CUDA, or on the CPU when
    /// a peak is given (`train.peak_tflops`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub achieved_tflops: Option<f64>,
    /// Model FLOPs utilisation: `achieved_tflops / peak`, a fraction of 1;
    /// only with a known peak (the GPU's, or `train.peak_tflops`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
}

impl Throughput {
    /// `flops` in `seconds` on a CUDA device or not, against `peak_tflops`.
    pub fn new(flops: f64, seconds: f64, cuda: bool, peak_tflops: Option<f64>) -> Throughput {
        let tflops = flops / seconds.max(1e-9) / 1e12;
        Throughput {
            model_flops: Some(flops),
            step_seconds: Some(seconds),
            achieved_tflops: (cuda || peak_tflops.is_some()).then_some(tflops),
            mfu: peak_tflops.filter(|p| *p > 0.0).map(|p| tflops / p),
        }
    }

    /// ` 312.4 TFLOP/s MFU 31.6%` for the progress line (empty without a rate).
    pub fn progress(&self) -> String {
        let mut s = self.achieved_tflops.map_or(String::new(), |t| format!(" {t:.1} TFLOP/s"));
        if let Some(m) = self.mfu {
            s += &format!(" MFU {:.1}%", 100.0 * m);
        }
        s
    }
}

/// The most memory a run has used so far, in MiB: in every line of
/// `metrics.jsonl` and in `summary.json`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct PeakMemory {
    /// CUDA: the most memory tensors held since the run started (the caching
    /// allocator's `max_memory_allocated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_peak_allocated_mib: Option<f64>,
    /// CUDA: the most the allocator reserved since the run started (`max_memory_reserved`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_peak_reserved_mib: Option<f64>,
    /// The process's peak resident memory (Linux `VmHWM`), model loading included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
}

impl PeakMemory {
    /// The peaks for a model on `device`, read now.
    pub fn read(device: tch::Device) -> PeakMemory {
        use crate::model::memory::{cuda_memory, mib, peak_rss};
        let cuda = cuda_memory(device);
        PeakMemory {
            cuda_peak_allocated_mib: cuda.map(|m| mib(m.peak_allocated)),
            cuda_peak_reserved_mib: cuda.map(|m| mib(m.peak_reserved)),
            peak_rss_mib: peak_rss().map(mib),
        }
    }

    /// The memory a user watches: the CUDA peak allocated, else the peak RSS.
    pub fn watched_mib(&self) -> Option<f64> {
        self.cuda_peak_allocated_mib.or(self.peak_rss_mib)
    }
}

/// A run's `metrics.jsonl`, open for appending.
pub struct MetricsLog {
    file: File,
}

impl MetricsLog {
    /// A new log in `run_dir`; with `resumed_at`, the log of a resumed run,
    /// keeping the lines of steps up to that one (the run rewrites the rest).
    pub fn open(run_dir: &Path, resumed_at: Option<usize>) -> Result<MetricsLog> {
        let path = run_dir.join(METRICS_FILE);
        match resumed_at {
            None => {
                let _ = std::fs::remove_file(&path);
            }
            Some(step) => truncate(&path, step)?,
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(MetricsLog { file })
    }

    /// Append one step's line, flushed.
    pub fn append(&mut self, record: &StepMetrics) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(record)?)?;
        self.file.flush()?;
        Ok(())
    }
}

/// Keep the metrics of steps up to `step`.
fn truncate(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<StepMetrics>(l).map(|m| m.step <= step).unwrap_or(false))
        .collect();
    crate::files::write_atomic(path, (kept.join("\n") + if kept.is_empty() { "" } else { "\n" }).as_bytes())?;
    Ok(())
}

/// One line of `metrics.jsonl` (the fields of [`StepMetrics`], every
/// one but `step` optional so that older or hand-written files still read).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MetricsRecord {
    pub step: usize,
    #[serde(default)]
    pub epoch: usize,
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub grad_norm: Option<f64>,
    #[serde(default)]
    pub tokens: usize,
    #[serde(default)]
    pub supervised_tokens: usize,
    #[serde(default)]
    pub tokens_per_second: Option<f64>,
    #[serde(default)]
    pub elapsed_seconds: Option<f64>,
    #[serde(default)]
    pub val_loss: Option<f64>,
    #[serde(default)]
    pub skipped: Option<String>,
    #[serde(flatten)]
    pub memory: PeakMemory,
    #[serde(flatten)]
    pub throughput: Throughput,
}

/// Why `metrics.jsonl` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    // `error`, not `source`: the message says it, so error chains do not repeat it.
    #[error("{path}: cannot read: {error} (is this a run folder? training writes {METRICS_FILE} there)", path = .path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}: not a metrics record: {message} (fix or delete the line)", path = .path.display())]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{path}: no metrics records (the run has not finished a step yet)", path = .path.display())]
    Empty { path: PathBuf },
}

/// Read `path` (a `metrics.jsonl`): records sorted by step (stable, so a
/// resumed run's re-written steps keep file order).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>, MetricsError> {
    let text = std::fs::read_to_string(path).map_err(|error| MetricsError::Io { path: path.to_owned(), error })?;
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<MetricsRecord>(line) {
            Ok(r) => records.push(r),
            Err(e) if i + 1 == lines.len() && !text.ends_with('\n') => {
                tracing::warn!("{}:{}: dropping a cut-off last line ({e})", path.display(), i + 1);
            }
            Err(e) => return Err(MetricsError::Line { path: path.to_owned(), line: i + 1, message: e.to_string() }),
        }
    }
    if records.is_empty() {
        return Err(MetricsError::Empty { path: path.to_owned() });
    }
    records.sort_by_key(|r| r.step);
    Ok(records)
}

/// `(step, value)` for every record whose `field` is finite.
pub fn finite_points(records: &[MetricsRecord], field: impl Fn(&MetricsRecord) -> Option<f64>) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| field(r).filter(|v| v.is_finite()).map(|v| (r.step as f64, v)))
        .collect()
}

