//! The training loop. Family-agnostic: everything goes through [`HostModel`].
//!
//! * Optimizer steps of `grad_accum` micro-batches; the loss of a step is the
//!   mean over all its supervised tokens (so accumulation equals one large batch).
//! * Warm-up then cosine / linear decay; global gradient clipping.
//! * Deterministic on CPU: libtorch's generator is re-seeded with
//!   `seed + step` before every step, and the data order of epoch `e` is a
//!   permutation drawn from `seed` and `e` ([`super::schedule`]); a checkpoint
//!   therefore needs only the step and the data position to resume exactly.
//! * A non-finite loss skips its step; `train.max_bad_steps` in a row stop the run.
//! * What a run leaves: `config.yaml`, `metrics.jsonl`, checkpoints
//!   ([`super::checkpoint`]), the adapter in PEFT's format, `summary.json`,
//!   plots, and with `train.eval_generate` the scored answers before and after.
//! * Data parallel under `torchrun` or `srun` ([`super::data_parallel`]): each
//!   rank trains on its share of every micro-batch, gradients are summed
//!   over the ranks, and rank 0 alone writes the run folder.

use super::checkpoint::{self, Resume, TrainState, TRAINABLE_FILE};
use super::data_parallel::{fingerprint, World};
use super::dataset::{self, Dataset, DatasetOptions, Record};
use super::eval::{evaluate, Evaluation};
use super::micro_batch;
use super::optim::AdamW;
use super::schedule::{epoch_order, held_out, learning_rate, val_count};
use crate::config::TrainConfig;
use crate::dist::Group;
use crate::files::{self, fault};
use crate::model::weights::read_tensors;
use crate::model::flops::{self, StepFlops};
use crate::model::kernels::{AttentionKernels, Observer};
use crate::model::HostModel;
use crate::report::metrics::{MetricsLog, PeakMemory, StepMetrics, Throughput, CONFIG_FILE, EVAL_BEFORE_FILE, EVAL_FILE, SUMMARY_FILE};
use crate::report::ocr::OcrMetrics;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    /// The run's peak memory.
    #[serde(flatten)]
    pub memory: PeakMemory,
    /// The language model's input positions trained on (all ranks; padding excluded).
    pub tokens: usize,
    /// `tokens` over the steps' time (`step_seconds`).
    pub tokens_per_second: Option<f64>,
    /// The model FLOPs of all steps, their time, the achieved TFLOP/s and MFU.
    #[serde(flatten)]
    pub throughput: Throughput,
    /// The peak TFLOP/s the MFU is taken against (`train.peak_tflops`, or
    /// the known GPU's for the precision).
    pub peak_tflops: Option<f64>,
    /// Calls of scaled-dot-product attention by the kernel libtorch chose,
    /// over the steps' forward and backward passes (validation aside).
    pub attention_kernels: AttentionKernels,
}

/// Run training. The model's rules (mode, LoRA) are already applied. With
/// `group`, this process is one rank of a data-parallel run.
pub fn train(model: &HostModel, cfg: &TrainConfig, job: &TrainJob, group: Option<&Group>) -> Result<TrainSummary> {
    let mut run = Run::start(model, cfg, job, World::new(group))?;
    while run.state.step < run.state.total_steps {
        if run.step()? == Next::Stop {
            break;
        }
    }
    run.finish()
}

/// Whether the loop goes on after a step.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Continue,
    Stop,
}

/// A run in progress.
struct Run<'a> {
    model: &'a HostModel,
    cfg: &'a TrainConfig,
    job: &'a TrainJob,
    world: World<'a>,
    train_set: Vec<Record>,
    val_set: Vec<Record>,
    opt: AdamW,
    state: TrainState,
    /// The data order of the current epoch.
    order: Vec<usize>,
    /// Rank 0's (the only writer's) metrics log.
    metrics: Option<MetricsLog>,
    progress: Progress,
    start: Instant,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    final_val: Option<f64>,
    stopped_early: bool,
    last_checkpoint: PathBuf,
    /// Generated validation answers are scored (`train.eval_generate` with a validation set).
    generate_eval: bool,
    generation_before: Option<OcrMetrics>,
    /// Counts the attention kernels and FLOPs while a step's window is open.
    observer: Observer,
    /// The peak TFLOP/s for MFU, if known.
    peak_tflops: Option<f64>,
    /// Totals over the steps: LLM tokens, model FLOPs, seconds, kernels.
    tokens: usize,
    flops: f64,
    step_seconds: f64,
    kernels: AttentionKernels,
}

impl<'a> Run<'a> {
    /// Check the output and the resume point, read and split the data, build
    /// the optimizer, load `--init-from` or the checkpoint resumed, score the
    /// starting point's answers, open the metrics log. Data parallel: check
    /// that the ranks agree, and start every rank from rank 0's tensors.
    fn start(model: &'a HostModel, cfg: &'a TrainConfig, job: &'a TrainJob, world: World<'a>) -> Result<Run<'a>> {
        let t = &cfg.train;
        let writer = world.is_writer();
        let resume_dir = checkpoint::resume_dir(&job.output, job.resume.as_ref())?;

        let data = dataset::load(&job.dataset, model, &DatasetOptions::from(t))?;
        let summary = data.summary(&job.dataset);
        tracing::info!("{summary}");
        if writer {
            eprintln!("{summary}");
        }
        let (train_set, val_set) = split(model, cfg, data)?;
        // Every rank takes batch_size samples of each global micro-batch.
        let global_batch = t.batch_size * world.size();
        let total_steps = match t.max_steps {
            Some(s) => s,
            None => ((train_set.len() as f64 * t.epochs) / (global_batch * t.grad_accum) as f64).ceil().max(1.0) as usize,
        };

        let mut opt = AdamW::for_model(model, &cfg.optimizer);
        let mut state = TrainState::new(model, total_steps, t.seed);
        if let Some(dir) = &job.init_from {
            let n = model.load_tensors(&read_tensors(&dir.join(TRAINABLE_FILE))?, false)?;
            eprintln!("initialised {n} tensor(s) from {}", dir.display());
        }
        if let Some(dir) = &resume_dir {
            state = checkpoint::load(dir, model, &mut opt, &state)?;
            if writer {
                eprintln!("resumed from {} at step {}", dir.display(), state.step);
            }
        }
        world.agree(&fingerprint(cfg, model, &train_set, &val_set, &state, resume_dir.as_deref())?)?;
        world.take_rank0_tensors(model)?;
        if world.size() > 1 && writer {
            eprintln!("data parallel: {} ranks x batch {} = global batch {global_batch}", world.size(), t.batch_size);
        }
        if writer {
            std::fs::create_dir_all(&job.output).with_context(|| format!("cannot create {}", job.output.display()))?;
            // The resolved configuration, before step 1.
            files::write_atomic(&job.output.join(CONFIG_FILE), serde_yaml::to_string(cfg)?.as_bytes())?;
        }

        let generate_eval = writer && t.eval_generate && !val_set.is_empty();
        if writer && t.eval_generate && val_set.is_empty() {
            eprintln!("warning: train.eval_generate is set but there is no validation set (set train.val_size or train.val_dataset)");
        }
        let generation_before = if generate_eval && (resume_dir.is_none() || !job.output.join(EVAL_BEFORE_FILE).is_file()) {
            Some(generation_eval(model, &val_set, cfg, &job.output, EVAL_BEFORE_FILE, "before")?)
        } else {
            None
        };

        let metrics = if writer { Some(MetricsLog::open(&job.output, resume_dir.as_ref().map(|_| state.step))?) } else { None };
        // The run's CUDA peaks count from here: the weights, adapters and optimizer state in place.
        crate::model::memory::reset_cuda_peak(model.device());
        let progress = Progress::new(job.progress_bar && writer, writer, &state);
        let observer = Observer::start()?;
        let peak_tflops = flops::peak_tflops(model.device(), cfg.precision.is_bf16(model.device().is_cuda()), t.peak_tflops);
        if writer && model.device().is_cuda() && peak_tflops.is_none() {
            eprintln!("note: no known peak TFLOP/s for this GPU: no MFU (give --peak-tflops or train.peak_tflops)");
        }
        Ok(Run {
            model,
            cfg,
            job,
            world,
            order: epoch_order(train_set.len(), t.seed, state.epoch),
            train_set,
            val_set,
            opt,
            state,
            metrics,
            progress,
            start: Instant::now(),
            first_loss: None,
            last_loss: None,
            final_val: None,
            stopped_early: false,
            last_checkpoint: resume_dir.unwrap_or_default(),
            generate_eval,
            generation_before,
            observer,
            peak_tflops,
            tokens: 0,
            flops: 0.0,
            step_seconds: 0.0,
            kernels: AttentionKernels::default(),
        })
    }

    /// The records of the next optimizer step (indices into the training
    /// set): `grad_accum` global micro-batches of `batch_size` times the
    /// ranks, in the epoch's order (a new epoch draws a new order).
    fn next_micro_batches(&mut self) -> Vec<Vec<usize>> {
        let t = &self.cfg.train;
        let global_batch = t.batch_size * self.world.size();
        let mut micro = Vec::with_capacity(t.grad_accum);
        for _ in 0..t.grad_accum {
            let mut b = Vec::with_capacity(global_batch);
            for _ in 0..global_batch {
                if self.state.position >= self.order.len() {
                    self.state.epoch += 1;
                    self.state.position = 0;
                    self.order = epoch_order(self.train_set.len(), t.seed, self.state.epoch);
                }
                b.push(self.order[self.state.position]);
                self.state.position += 1;
            }
            micro.push(b);
        }
        micro
    }

    /// Forward and backward over the step's micro-batches, each micro-batch's
    /// loss summed and divided by the step's supervised tokens (of all
    /// ranks): (the summed loss, or `None` at the first non-finite one; the
    /// tokens seen).
    fn forward_backward(&self, micro: &[Vec<usize>], supervised: usize) -> Result<(Option<f64>, usize)> {
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        for b in micro {
            let records: Vec<&Record> = b.iter().map(|&i| &self.train_set[i]).collect();
            let samples = micro_batch::prepare(self.model, &records)?;
            let l = micro_batch::loss(self.model, &samples, true)?;
            tokens += l.tokens;
            let mut v = l.sum.double_value(&[]);
            if fault("nan-loss", self.state.step + 1) {
                v = f64::NAN; // `VLMHOST_FAULT=nan-loss:STEP`: the NaN guard's test
            }
            if !v.is_finite() {
                return Ok((None, tokens));
            }
            loss_sum += v;
            self.model.backward(&(l.sum / supervised.max(1) as f64))?;
        }
        Ok((Some(loss_sum), tokens))
    }

    /// One optimizer step, its validation, metrics line and checkpoint.
    fn step(&mut self) -> Result<Next> {
        let cfg = self.cfg;
        let t = &cfg.train;
        tch::manual_seed((t.seed as i64).wrapping_add(self.state.step as i64));
        let step_start = Instant::now();
        let global = self.next_micro_batches();
        let supervised: usize = global.iter().flatten().map(|&i| self.train_set[i].supervised).sum();
        let micro: Vec<Vec<usize>> = global.iter().map(|b| self.world.shard(b)).collect();
        let lr = learning_rate(cfg.optimizer.lr, t.schedule, t.warmup_steps, self.state.step, self.state.total_steps);
        self.opt.zero_grad();
        let _ = (StepFlops::take(), AttentionKernels::read(true));
        let (loss_sum, tokens) = {
            // Model FLOPs and attention kernels of this step's forward and backward passes.
            let _window = self.observer.window();
            self.forward_backward(&micro, supervised)?
        };
        let step_flops = StepFlops::take().total() as f64;
        self.kernels = self.kernels.add(&AttentionKernels::read(true));
        let (loss_sum, tokens) = self.world.sum_step(loss_sum, tokens, self.model.device())?;
        let mut record = StepMetrics {
            step: self.state.step + 1,
            epoch: self.state.epoch,
            loss: None,
            lr,
            grad_norm: None,
            tokens,
            supervised_tokens: supervised,
            tokens_per_second: 0.0,
            elapsed_seconds: 0.0,
            val_loss: None,
            skipped: None,
            memory: PeakMemory::read(self.model.device()),
            throughput: Throughput::default(),
        };
        match loss_sum {
            Some(sum) => {
                self.state.bad_steps_in_a_row = 0;
                self.world.sum_gradients(self.model)?;
                let norm = self.opt.clip_grad_norm(t.max_grad_norm)?;
                self.opt.step(lr)?;
                let loss = sum / supervised.max(1) as f64;
                record.loss = Some(loss);
                record.grad_norm = Some(norm);
                self.first_loss.get_or_insert(loss);
                self.last_loss = Some(loss);
            }
            None => {
                self.opt.zero_grad();
                self.state.bad_steps_in_a_row += 1;
                let msg = format!("non-finite loss at step {}: step skipped ({} in a row)", self.state.step + 1, self.state.bad_steps_in_a_row);
                tracing::warn!("{msg}");
                if self.world.is_writer() {
                    eprintln!("warning: {msg}");
                }
                record.skipped = Some(msg);
                if self.state.bad_steps_in_a_row >= t.max_bad_steps {
                    bail!("{} non-finite losses in a row: stopping (lower the learning rate, check the data)", self.state.bad_steps_in_a_row);
                }
            }
        }
        // The step's time: from its batches' preparation to the update (validation and checkpoints aside).
        let seconds = step_start.elapsed().as_secs_f64();
        record.tokens_per_second = tokens as f64 / seconds.max(1e-9);
        record.throughput = Throughput::new(step_flops, seconds, self.model.device().is_cuda(), self.peak_tflops);
        self.tokens += tokens;
        self.flops += step_flops;
        self.step_seconds += seconds;
        self.state.step += 1;
        record.val_loss = self.validate()?;
        record.elapsed_seconds = self.start.elapsed().as_secs_f64();
        if let Some(m) = &mut self.metrics {
            m.append(&record)?;
        }
        self.progress.show(&record, &self.state);
        let early = t.early_stopping_patience.is_some_and(|p| self.state.evals_without_improvement >= p);
        let step = self.state.step;
        let due = (t.save_every > 0 && step.is_multiple_of(t.save_every)) || step == self.state.total_steps || early;
        if due && self.world.is_writer() {
            self.last_checkpoint = checkpoint::save(self.model, &self.opt, &self.state, self.cfg, &self.job.output)?;
        }
        if early {
            tracing::info!("early stopping at step {step}");
            eprintln!("early stopping: no validation improvement in {} evaluations", self.state.evals_without_improvement);
            self.stopped_early = true;
            return Ok(Next::Stop);
        }
        Ok(Next::Continue)
    }

    /// The validation loss, when it is due (every `eval_every` steps and at
    /// the last), tracked for early stopping.
    fn validate(&mut self) -> Result<Option<f64>> {
        let t = &self.cfg.train;
        let step = self.state.step;
        let due = (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || step == self.state.total_steps;
        if self.val_set.is_empty() || !due {
            return Ok(None);
        }
        let (v, _) = evaluate(self.model, &self.val_set)?;
        self.final_val = Some(v);
        if self.state.best_val_loss.is_none_or(|b| v < b) {
            self.state.best_val_loss = Some(v);
            self.state.evals_without_improvement = 0;
        } else {
            self.state.evals_without_improvement += 1;
        }
        Ok(Some(v))
    }

    /// The adapter in PEFT's format, the final answers scored, the summary
    /// and the plots.
    fn finish(self) -> Result<TrainSummary> {
        self.progress.finish();
        if self.world.is_writer() {
            eprintln!("attention kernels: {}", self.kernels.line());
            if let Some(w) = self.model.device().is_cuda().then(|| self.kernels.cuda_warning()).flatten() {
                tracing::warn!("{w}");
                eprintln!("warning: {w}");
            }
        }
        let job = self.job;
        let output = &job.output;
        if !self.world.is_writer() {
            // Rank 0 writes the adapter, the summary and the plots.
            return Ok(self.summary(None));
        }
        let adapter = output.join("adapter");
        match crate::model::peft::save(self.model, &adapter) {
            Ok(()) => eprintln!("PEFT adapter written to {}", adapter.display()),
            Err(e) => eprintln!("warning: no PEFT adapter written: {e:#}"),
        }
        let generation_after = if self.generate_eval {
            Some(generation_eval(self.model, &self.val_set, self.cfg, output, EVAL_FILE, "after")?)
        } else {
            None
        };
        let summary = self.summary(generation_after);
        files::write_atomic(&output.join(SUMMARY_FILE), serde_json::to_string_pretty(&summary)?.as_bytes())?;
        match crate::report::plot::write_run_plots(output) {
            Ok(files) => {
                let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                eprintln!("plots written: {}", names.join(", "));
            }
            Err(e) => eprintln!("warning: no plots written: {e:#}"),
        }
        Ok(summary)
    }

    fn summary(self, generation_after: Option<OcrMetrics>) -> TrainSummary {
        TrainSummary {
            steps: self.state.step,
            first_loss: self.first_loss,
            last_loss: self.last_loss,
            final_val_loss: self.final_val,
            stopped_early: self.stopped_early,
            checkpoint: self.last_checkpoint,
            init_from: self.job.init_from.clone(),
            generation_before: self.generation_before,
            generation_after,
            memory: PeakMemory::read(self.model.device()),
            tokens: self.tokens,
            tokens_per_second: (self.step_seconds > 0.0).then(|| self.tokens as f64 / self.step_seconds),
            throughput: if self.state.step > 0 && self.step_seconds > 0.0 {
                Throughput::new(self.flops, self.step_seconds, self.model.device().is_cuda(), self.peak_tflops)
            } else {
                Throughput::default()
            },
            peak_tflops: self.peak_tflops,
            attention_kernels: self.kernels,
        }
    }
}

/// Train/validation split: a separate file, or `val_size` samples drawn with the seed.
fn split(model: &HostModel, cfg: &TrainConfig, data: Dataset) -> Result<(Vec<Record>, Vec<Record>)> {
    let t = &cfg.train;
    if let Some(val) = &t.val_dataset {
        let v = dataset::load(val, model, &DatasetOptions::from(t))?;
        return Ok((data.records, v.records));
    }
    let n = data.records.len();
    let k = val_count(n, t.val_size);
    if k == 0 {
        return Ok((data.records, Vec::new()));
    }
    if k >= n {
        bail!("train.val_size {} leaves no training sample out of {n}", t.val_size);
    }
    let val = held_out(n, k, t.seed);
    let (mut tr, mut va) = (Vec::new(), Vec::new());
    for (i, r) in data.records.into_iter().enumerate() {
        if val.contains(&i) { va.push(r) } else { tr.push(r) }
    }
    Ok((tr, va))
}

/// The validation set's generated answers scored, written to `file` in the
/// run folder and summed up on the terminal as `when` ("before", "after").
fn generation_eval(model: &HostModel, val_set: &[Record], cfg: &TrainConfig, output: &Path, file: &str, when: &str) -> Result<OcrMetrics> {
    let eval = Evaluation::run(model, val_set, Some(cfg.train.eval_max_new_tokens))?;
    files::write_atomic(&output.join(file), serde_json::to_string_pretty(&eval.to_json()?)?.as_bytes())?;
    let metrics = eval.generation.expect("asked for generation").0;
    eprintln!(
        "validation answers {when} training: CER {:.3}  WER {:.3}  exact match {:.3} ({} samples, {file})",
        metrics.cer, metrics.wer, metrics.exact_match, metrics.samples
    );
    Ok(metrics)
}

/// Progress on the terminal: a bar when stderr is a terminal, else a line a step.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// Lines on the terminal (rank 0 only; other ranks log at debug level).
    lines: bool,
}

impl Progress {
    fn new(bar: bool, lines: bool, state: &TrainState) -> Progress {
        let bar = bar.then(|| {
            let b = indicatif::ProgressBar::new(state.total_steps as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_position(state.step as u64);
            b
        });
        Progress { bar, lines }
    }

    fn show(&self, record: &StepMetrics, state: &TrainState) {
        let line = format!(
            "step {}/{} loss {} lr {:.3e} {:.0} tok/s{}{}{}",
            state.step,
            state.total_steps,
            record.loss.map_or("skipped".to_owned(), |l| format!("{l:.4}")),
            record.lr,
            record.tokens_per_second,
            record.throughput.progress(),
            record.memory.watched_mib().map_or(String::new(), |m| format!(" mem {:.2} GiB", m / 1024.0)),
            record.val_loss.map_or(String::new(), |v| format!(" val {v:.4}"))
        );
        match &self.bar {
            Some(b) => {
                b.set_message(line);
                b.set_position(state.step as u64);
            }
            None if self.lines => eprintln!("{line}"),
            None => tracing::debug!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
