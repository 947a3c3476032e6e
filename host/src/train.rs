//! `vlmhost train`: the training loop, checkpoints and exact resume, and the
//! evaluation `vlmhost eval` shares with it. Family-agnostic: everything here
//! goes through [`HostModel`].
//!
//! * Optimizer steps of `grad_accum` micro-batches; the loss of a step is the
//!   mean over all its supervised tokens (so accumulation equals one large batch).
//! * Warm-up then cosine / linear decay; global gradient clipping.
//! * Deterministic on CPU: libtorch's generator is re-seeded with
//!   `seed + step` before every step, and the data order of epoch `e` is a
//!   permutation drawn from `seed` and `e`; a checkpoint therefore needs only
//!   the step and the data position to resume exactly.
//! * Checkpoints (`checkpoints/step-NNNNNNNN/`: trainable tensors, optimizer
//!   moments, `state.json`) are written to a `.partial` folder, fsynced and
//!   renamed: a crash never leaves a half-written checkpoint behind.

use crate::config::{Schedule, TrainConfig};
use crate::dataset::{self, Dataset, DatasetOptions, Record};
use crate::generate::OcrMetrics;
use crate::model::{causal_lm_loss, collate, HostModel, PreparedSample};
use crate::weights;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Tensor;

/// The resumable state, saved as `state.json` in each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub format: u32,
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// Data position: epoch and index into that epoch's order.
    pub epoch: usize,
    pub position: usize,
    pub seed: u64,
    pub bad_steps_in_a_row: usize,
    pub best_val_loss: Option<f64>,
    pub evals_without_improvement: usize,
    pub family: String,
    pub mode: String,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: usize,
    pub loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub tokens: usize,
    pub supervised_tokens: usize,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Learning rate at optimizer step `step` (0-based) of `total`.
pub fn learning_rate(base: f64, schedule: Schedule, warmup: usize, step: usize, total: usize) -> f64 {
    if warmup > 0 && step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// The scored validation answers of a run's starting point (`train.eval_generate`).
pub const EVAL_BEFORE_FILE: &str = "eval-before.json";

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    Latest,
    Path(PathBuf),
}

/// What a run needs besides the model.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub dataset: PathBuf,
    pub output: PathBuf,
    pub resume: Option<Resume>,
    /// A checkpoint of an earlier stage whose tensors initialise this run.
    pub init_from: Option<PathBuf>,
    /// Show a progress bar (else plain log lines).
    pub progress_bar: bool,
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub stopped_early: bool,
    pub checkpoint: PathBuf,
    /// The checkpoint of an earlier stage this run started from (`--init-from`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Generated validation answers scored before the first step and after
    /// the last (`train.eval_generate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_before: Option<OcrMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_after: Option<OcrMetrics>,
    /// The process's peak resident memory (Linux `VmHWM`), model loading included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
}

/// This process's peak resident set size in MiB (Linux), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The data-set options of a run configuration.
pub fn dataset_options(cfg: &TrainConfig) -> DatasetOptions {
    let t = &cfg.train;
    DatasetOptions { max_length: t.max_length, too_long: t.too_long, on_bad_sample: t.on_bad_sample, system_prompt: t.system_prompt.clone() }
}

/// Prepare records with the plugin (truncated as checked) into samples.
fn prepare(model: &HostModel, records: &[&Record]) -> Result<Vec<PreparedSample>> {
    records
        .iter()
        .map(|r| {
            let json = serde_json::to_string(&r.sample)?;
            let mut p = model.prepare(&json).map_err(|e| anyhow::anyhow!("{}: {e}", r.origin))?;
            if let Some(n) = r.truncate_to {
                p.input_ids.truncate(n);
                p.labels.truncate(n);
                p.image_token_mask.truncate(n);
            }
            Ok(p)
        })
        .collect()
}

/// Sum of token losses and supervised tokens of one micro-batch.
fn batch_loss(model: &HostModel, samples: &[PreparedSample], training: bool) -> Result<(Tensor, i64, usize)> {
    let refs: Vec<&PreparedSample> = samples.iter().collect();
    let batch = collate(&refs, 0, model.device)?;
    // bf16 autocast on CUDA, fp32 on the CPU; the loss is computed in fp32.
    let logits = crate::autocast::bf16_on_cuda(model.device, || model.forward(&batch, training))?;
    let (mean, n) = causal_lm_loss(&logits, &batch.labels)?;
    let tokens = samples.iter().map(|s| s.input_ids.len()).sum();
    Ok((mean * (n as f64), n, tokens))
}

/// Per-sample evaluation: mean loss over each sample's supervised tokens.
#[derive(Debug, Clone, Serialize)]
pub struct SampleLoss {
    pub index: usize,
    pub loss: f64,
    pub tokens: i64,
}

/// Evaluate `records` one sample at a time (no padding effects): the mean
/// loss over all supervised tokens, and each sample's own.
pub fn evaluate(model: &HostModel, records: &[Record]) -> Result<(f64, Vec<SampleLoss>)> {
    let _g = tch::no_grad_guard();
    let mut total = 0f64;
    let mut count = 0i64;
    let mut per = Vec::with_capacity(records.len());
    for r in records {
        let samples = prepare(model, &[r])?;
        let (sum, n, _) = batch_loss(model, &samples, false)?;
        let sum = sum.double_value(&[]);
        total += sum;
        count += n;
        per.push(SampleLoss { index: r.origin.index, loss: if n > 0 { sum / n as f64 } else { f64::NAN }, tokens: n });
    }
    Ok((if count > 0 { total / count as f64 } else { f64::NAN }, per))
}

/// An evaluation of a data set: the loss and, when asked for, each answer
/// generated greedily and scored against the sample's.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Mean loss over every supervised token.
    pub loss: f64,
    pub samples: Vec<SampleLoss>,
    pub generation: Option<(OcrMetrics, Vec<crate::generate::OcrScore>)>,
}

impl Evaluation {
    /// Evaluate `records`; with `max_new_tokens`, also generate and score.
    pub fn run(model: &HostModel, records: &[Record], max_new_tokens: Option<usize>) -> Result<Evaluation> {
        let (loss, samples) = evaluate(model, records)?;
        let generation = max_new_tokens.map(|n| crate::generate::evaluate_generation(model, records, n)).transpose()?;
        Ok(Evaluation { loss, samples, generation })
    }

    /// What `vlmhost eval --json` prints and a run's `eval.json` holds:
    /// `loss`, `samples` (per sample) and with generation `cer`, `wer`,
    /// `exact_match`, `generated`.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let mut out = serde_json::json!({"loss": self.loss, "samples": self.samples});
        if let Some((metrics, scores)) = &self.generation {
            out["cer"] = metrics.cer.into();
            out["wer"] = metrics.wer.into();
            out["exact_match"] = metrics.exact_match.into();
            out["generated"] = serde_json::to_value(scores)?;
        }
        Ok(out)
    }
}

/// The validation set's generated answers scored, written to `file` in the
/// run folder and summed up on the terminal as `when` ("before", "after").
fn generation_eval(model: &HostModel, val_set: &[Record], cfg: &TrainConfig, output: &Path, file: &str, when: &str) -> Result<OcrMetrics> {
    let eval = Evaluation::run(model, val_set, Some(cfg.train.eval_max_new_tokens))?;
    weights::write_atomic(&output.join(file), serde_json::to_string_pretty(&eval.to_json()?)?.as_bytes())?;
    let metrics = eval.generation.expect("asked for generation").0;
    eprintln!(
        "validation answers {when} training: CER {:.3}  WER {:.3}  exact match {:.3} ({} samples, {file})",
        metrics.cer, metrics.wer, metrics.exact_match, metrics.samples
    );
    Ok(metrics)
}

/// Train/validation split: a separate file, or `val_size` samples drawn with the seed.
fn split(model: &HostModel, cfg: &TrainConfig, data: Dataset) -> Result<(Vec<Record>, Vec<Record>)> {
    let t = &cfg.train;
    if let Some(val) = &t.val_dataset {
        let v = dataset::load(val, model, &dataset_options(cfg))?;
        return Ok((data.records, v.records));
    }
    let n = data.records.len();
    let k = if t.val_size <= 0.0 { 0 } else if t.val_size < 1.0 { ((n as f64) * t.val_size).round() as usize } else { t.val_size as usize };
    if k == 0 {
        return Ok((data.records, Vec::new()));
    }
    if k >= n {
        bail!("train.val_size {} leaves no training sample out of {n}", t.val_size);
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(t.seed ^ 0x5eed_0f5a));
    let val: std::collections::HashSet<usize> = idx[..k].iter().copied().collect();
    let (mut tr, mut va) = (Vec::new(), Vec::new());
    for (i, r) in data.records.into_iter().enumerate() {
        if val.contains(&i) { va.push(r) } else { tr.push(r) }
    }
    Ok((tr, va))
}

/// The order of epoch `epoch`: a permutation drawn from the seed.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch as u64 + 1))));
    idx
}

/// The checkpoint folder of `step`.
fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join("checkpoints").join(format!("step-{step:08}"))
}

/// Complete checkpoints of a run, oldest first.
pub fn list_checkpoints(output: &Path) -> Vec<(usize, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(output.join("checkpoints")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
                if e.path().join("state.json").is_file() {
                    out.push((step, e.path()));
                }
            }
        }
    }
    out.sort();
    out
}

/// Write a checkpoint atomically and keep only the last `keep` ones.
fn save_checkpoint(model: &HostModel, opt: &crate::optim::AdamW, state: &TrainState, cfg: &TrainConfig, output: &Path) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output, state.step);
    let partial = crate::paths::fresh_partial(&final_dir)?;
    weights::save_safetensors(&partial.join("trainable.safetensors"), &model.trainable_tensors(), None)?;
    fault_point("checkpoint", state.step);
    weights::save_safetensors(&partial.join("optimizer.safetensors"), &opt.state_tensors(), None)?;
    weights::write_atomic(&partial.join("config.yaml"), serde_yaml::to_string(cfg)?.as_bytes())?;
    weights::write_atomic(&partial.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    crate::paths::publish_dir(&partial, &final_dir)?;
    let all = list_checkpoints(output);
    if all.len() > cfg.train.keep_last.max(1) {
        for (_, old) in &all[..all.len() - cfg.train.keep_last.max(1)] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(final_dir)
}

/// Whether fault `name:step` is injected (`VLMHOST_FAULT`, comma-separated;
/// for the crash and NaN tests only).
fn fault(name: &str, step: usize) -> bool {
    std::env::var("VLMHOST_FAULT").is_ok_and(|spec| spec.split(',').any(|f| f.trim() == format!("{name}:{step}")))
}

/// `VLMHOST_FAULT=abort-in-checkpoint:STEP` aborts the process half-way
/// through writing checkpoint STEP (`abort-in-adapter:0`: the final adapter).
pub(crate) fn fault_point(site: &str, step: usize) {
    if fault(&format!("abort-in-{site}"), step) {
        eprintln!("VLMHOST_FAULT: aborting in {site} {step}");
        std::process::abort();
    }
}

/// A safetensors file as a name -> tensor map.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path).with_context(|| format!("cannot read {}", path.display()))?.into_iter().collect())
}

/// The checkpoint to resume from, checked before anything is written: a
/// complete checkpoint folder (with `state.json`), never a `.partial` one.
fn resume_dir(job: &TrainJob) -> Result<Option<PathBuf>> {
    let existing = list_checkpoints(&job.output);
    let complete = || match existing.as_slice() {
        [] => format!("{} has no complete checkpoint", job.output.display()),
        all => format!("complete checkpoints of {}: {}", job.output.display(), all.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>().join(", ")),
    };
    match &job.resume {
        None if !existing.is_empty() => bail!(
            "{} already holds checkpoints (latest {}); pass --resume to continue it, or choose another --output",
            job.output.display(),
            existing.last().map(|(_, p)| p.display().to_string()).unwrap_or_default()
        ),
        None => Ok(None),
        Some(Resume::Latest) => match existing.last() {
            Some((_, p)) => Ok(Some(p.clone())),
            None => bail!("--resume: {}; start without --resume, or name a checkpoint folder", complete()),
        },
        Some(Resume::Path(p)) if p.extension().is_some_and(|e| e == "partial") => bail!(
            "--resume {}: a checkpoint a crash left half-written, which cannot be resumed; {}",
            p.display(),
            complete()
        ),
        Some(Resume::Path(p)) if !p.join("state.json").is_file() => bail!(
            "--resume {}: not a checkpoint folder (no {}); {}",
            p.display(),
            if p.is_dir() { "state.json in it" } else { "such folder" },
            complete()
        ),
        Some(Resume::Path(p)) => Ok(Some(p.clone())),
    }
}

/// Run training. The model's rules (mode, LoRA) are already applied.
pub fn train(model: &HostModel, cfg: &TrainConfig, job: &TrainJob) -> Result<TrainSummary> {
    let t = &cfg.train;
    let resume_dir = resume_dir(job)?;
    std::fs::create_dir_all(&job.output).with_context(|| format!("cannot create {}", job.output.display()))?;

    // The resolved configuration, before step 1.
    weights::write_atomic(&job.output.join("config.yaml"), serde_yaml::to_string(cfg)?.as_bytes())?;

    let data = dataset::load(&job.dataset, model, &dataset_options(cfg))?;
    let summary = data.summary(&job.dataset);
    tracing::info!("{summary}");
    eprintln!("{summary}");
    let (train_set, val_set) = split(model, cfg, data)?;
    let per_step = t.batch_size * t.grad_accum;
    let total_steps = match t.max_steps {
        Some(s) => s,
        None => ((train_set.len() as f64 * t.epochs) / per_step as f64).ceil().max(1.0) as usize,
    };

    let mut opt = model.optimizer();
    let mut state = TrainState {
        format: 1,
        step: 0,
        total_steps,
        epoch: 0,
        position: 0,
        seed: t.seed,
        bad_steps_in_a_row: 0,
        best_val_loss: None,
        evals_without_improvement: 0,
        family: model.family.clone(),
        mode: model.plan.mode.name().to_owned(),
    };
    if let Some(dir) = &job.init_from {
        let saved = read_tensors(&dir.join("trainable.safetensors"))?;
        let n = model.load_tensors(&saved, false)?;
        eprintln!("initialised {n} tensor(s) from {}", dir.display());
    }
    if let Some(dir) = &resume_dir {
        let saved: TrainState = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)
            .with_context(|| format!("{}: unreadable state.json", dir.display()))?;
        if saved.family != state.family || saved.mode != state.mode {
            bail!("{}: saved by a {} run in mode {}, this is {} in mode {}", dir.display(), saved.family, saved.mode, state.family, state.mode);
        }
        model.load_tensors(&read_tensors(&dir.join("trainable.safetensors"))?, true)?;
        opt.load_state(&read_tensors(&dir.join("optimizer.safetensors"))?, saved.step as i64)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        state = TrainState { total_steps, ..saved };
        eprintln!("resumed from {} at step {}", dir.display(), state.step);
    }

    let generate_eval = t.eval_generate && !val_set.is_empty();
    if t.eval_generate && val_set.is_empty() {
        eprintln!("warning: train.eval_generate is set but there is no validation set (set train.val_size or train.val_dataset)");
    }
    let generation_before = if generate_eval && (resume_dir.is_none() || !job.output.join(EVAL_BEFORE_FILE).is_file()) {
        Some(generation_eval(model, &val_set, cfg, &job.output, EVAL_BEFORE_FILE, "before")?)
    } else {
        None
    };

    let metrics_path = job.output.join("metrics.jsonl");
    if resume_dir.is_none() {
        let _ = std::fs::remove_file(&metrics_path);
    } else {
        truncate_metrics(&metrics_path, state.step)?;
    }
    let mut metrics = std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?;
    let bar = if job.progress_bar {
        let b = indicatif::ProgressBar::new(total_steps as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(state.step as u64);
        Some(b)
    } else {
        None
    };

    let start = Instant::now();
    let mut first_loss = None;
    let mut last_loss = None;
    let mut final_val = None;
    let mut stopped_early = false;
    let mut last_checkpoint = resume_dir.clone().unwrap_or_default();
    let mut order = epoch_order(train_set.len(), t.seed, state.epoch);
    while state.step < total_steps {
        tch::manual_seed((t.seed as i64).wrapping_add(state.step as i64));
        let step_start = Instant::now();
        // The micro-batches of this step.
        let mut micro: Vec<Vec<&Record>> = Vec::with_capacity(t.grad_accum);
        for _ in 0..t.grad_accum {
            let mut b = Vec::with_capacity(t.batch_size);
            for _ in 0..t.batch_size {
                if state.position >= order.len() {
                    state.epoch += 1;
                    state.position = 0;
                    order = epoch_order(train_set.len(), t.seed, state.epoch);
                }
                b.push(&train_set[order[state.position]]);
                state.position += 1;
            }
            micro.push(b);
        }
        let supervised: usize = micro.iter().flatten().map(|r| r.supervised).sum();
        let lr = learning_rate(cfg.optimizer.lr, t.schedule, t.warmup_steps, state.step, total_steps);
        opt.zero_grad();
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        let mut finite = true;
        for b in &micro {
            let samples = prepare(model, b)?;
            let (sum, _, n_tokens) = batch_loss(model, &samples, true)?;
            tokens += n_tokens;
            let mut v = sum.double_value(&[]);
            if fault("nan-loss", state.step + 1) {
                v = f64::NAN; // `VLMHOST_FAULT=nan-loss:STEP`: the NaN guard's test
            }
            if !v.is_finite() {
                finite = false;
                break;
            }
            loss_sum += v;
            (sum / supervised.max(1) as f64).backward();
        }
        let mut record = StepMetrics {
            step: state.step + 1,
            epoch: state.epoch,
            loss: None,
            lr,
            grad_norm: None,
            tokens,
            supervised_tokens: supervised,
            tokens_per_second: tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9),
            elapsed_seconds: 0.0,
            val_loss: None,
            skipped: None,
        };
        if !finite {
            opt.zero_grad();
            state.bad_steps_in_a_row += 1;
            let msg = format!("non-finite loss at step {}: step skipped ({} in a row)", state.step + 1, state.bad_steps_in_a_row);
            tracing::warn!("{msg}");
            eprintln!("warning: {msg}");
            record.skipped = Some(msg);
            if state.bad_steps_in_a_row >= t.max_bad_steps {
                bail!("{} non-finite losses in a row: stopping (lower the learning rate, check the data)", state.bad_steps_in_a_row);
            }
        } else {
            state.bad_steps_in_a_row = 0;
            let norm = opt.clip_grad_norm(t.max_grad_norm)?;
            opt.step(lr)?;
            let loss = loss_sum / supervised.max(1) as f64;
            record.loss = Some(loss);
            record.grad_norm = Some(norm);
            first_loss.get_or_insert(loss);
            last_loss = Some(loss);
        }
        state.step += 1;
        let eval_now = !val_set.is_empty() && ((t.eval_every > 0 && state.step.is_multiple_of(t.eval_every)) || state.step == total_steps);
        if eval_now {
            let (v, _) = evaluate(model, &val_set)?;
            record.val_loss = Some(v);
            final_val = Some(v);
            if state.best_val_loss.is_none_or(|b| v < b) {
                state.best_val_loss = Some(v);
                state.evals_without_improvement = 0;
            } else {
                state.evals_without_improvement += 1;
            }
        }
        record.elapsed_seconds = start.elapsed().as_secs_f64();
        writeln!(metrics, "{}", serde_json::to_string(&record)?)?;
        metrics.flush()?;
        let line = format!(
            "step {}/{} loss {} lr {:.3e} {:.0} tok/s{}",
            state.step,
            total_steps,
            record.loss.map_or("skipped".to_owned(), |l| format!("{l:.4}")),
            lr,
            record.tokens_per_second,
            record.val_loss.map_or(String::new(), |v| format!(" val {v:.4}"))
        );
        match &bar {
            Some(b) => {
                b.set_message(line);
                b.set_position(state.step as u64);
            }
            None => eprintln!("{line}"),
        }
        let early = t.early_stopping_patience.is_some_and(|p| state.evals_without_improvement >= p);
        if (t.save_every > 0 && state.step.is_multiple_of(t.save_every)) || state.step == total_steps || early {
            last_checkpoint = save_checkpoint(model, &opt, &state, cfg, &job.output)?;
        }
        if early {
            eprintln!("early stopping: no validation improvement in {} evaluations", state.evals_without_improvement);
            stopped_early = true;
            break;
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    // What others load: the adapter in PEFT's format.
    let adapter = job.output.join("adapter");
    match crate::peft::save(model, &adapter) {
        Ok(()) => eprintln!("PEFT adapter written to {}", adapter.display()),
        Err(e) => eprintln!("warning: no PEFT adapter written: {e:#}"),
    }
    let generation_after = if generate_eval {
        Some(generation_eval(model, &val_set, cfg, &job.output, crate::report::EVAL_FILE, "after")?)
    } else {
        None
    };
    let summary = TrainSummary {
        steps: state.step,
        first_loss,
        last_loss,
        final_val_loss: final_val,
        stopped_early,
        checkpoint: last_checkpoint,
        init_from: job.init_from.clone(),
        generation_before,
        generation_after,
        peak_rss_mib: peak_rss_mib(),
    };
    weights::write_atomic(&job.output.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    match crate::plot::write_run_plots(&job.output) {
        Ok(files) => {
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            eprintln!("plots written: {}", names.join(", "));
        }
        Err(e) => eprintln!("warning: no plots written: {e:#}"),
    }
    Ok(summary)
}

/// Keep the metrics of steps up to `step` (a resumed run rewrites the rest).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<StepMetrics>(l).map(|m| m.step <= step).unwrap_or(false))
        .collect();
    weights::write_atomic(path, (kept.join("\n") + if kept.is_empty() { "" } else { "\n" }).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(learning_rate(1.0, Schedule::Cosine, 2, 0, 10), 0.5);
        assert_eq!(learning_rate(1.0, Schedule::Cosine, 2, 1, 10), 1.0);
        assert_eq!(learning_rate(1.0, Schedule::Cosine, 2, 2, 10), 1.0);
        assert!((learning_rate(1.0, Schedule::Cosine, 2, 6, 10) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, Schedule::Linear, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(1.0, Schedule::Constant, 0, 9, 10), 1.0);
    }

    #[test]
    fn epoch_orders_are_permutations_and_seeded() {
        let a = epoch_order(10, 1, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(10, 1, 0));
        assert_ne!(a, epoch_order(10, 1, 1));
    }
}
