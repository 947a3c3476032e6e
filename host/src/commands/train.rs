//! `vlmhost train`: resolve the configuration, open the model (from an
//! earlier stage's PEFT adapter when `--init-from` names one), and run the
//! trainer ([`crate::train`]), as one rank of a data-parallel run when
//! `torchrun` or `srun` launched it ([`crate::dist`]).

use super::args::ModelArgs;
use super::print_json;
use crate::dist;
use crate::model::peft;
use crate::train::{self, Resume, TrainJob};
use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Messages JSONL or LLaVA JSON/JSONL; image paths relative to its folder.
    #[arg(long, value_name = "FILE")]
    dataset: PathBuf,
    /// Run folder [default: runs/FAMILY-MODE].
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Continue a run: its latest checkpoint, or the checkpoint folder given.
    #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "latest")]
    resume: Option<String>,
    /// Start from an earlier stage's checkpoint (stage 2 from stage 1's
    /// projector), or from an adapter PEFT saved (continue training it).
    #[arg(long, value_name = "CHECKPOINT")]
    init_from: Option<PathBuf>,
    /// Optimizer steps (overrides train.max_steps and train.epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Held-out data for validation (overrides train.val_dataset and train.val_size).
    #[arg(long, value_name = "FILE")]
    val_dataset: Option<PathBuf>,
    /// Activation checkpointing: recompute each decoder layer and vision
    /// block in the backward pass instead of keeping its activations (sets
    /// train.gradient_checkpointing).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// The device's peak TFLOP/s for MFU (overrides train.peak_tflops and
    /// the table of known GPUs).
    #[arg(long, value_name = "TFLOPS")]
    peak_tflops: Option<f64>,
}

pub fn run(mut args: Args) -> Result<ExitCode> {
    // Launched by torchrun or srun: join the other ranks first (on
    // cuda:LOCAL_RANK with NCCL, or the CPU with Gloo).
    let launch = dist::Launch::from_env()?;
    if let Some(l) = &launch {
        let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 };
        args.model.device = l.device_arg(&args.model.device, gpus);
    }
    let (mut cfg, opts) = args.model.resolve()?;
    let group = match &launch {
        Some(l) => {
            let g = dist::Group::join(l, dist::Backend::for_device(opts.device))?;
            tracing::info!("joined the {} process group: {l}", g.backend.name());
            Some(g)
        }
        None => None,
    };
    if args.max_steps.is_some() {
        cfg.train.max_steps = args.max_steps;
        cfg.validate().map_err(|e| anyhow!("--max-steps: {e}"))?;
    }
    if args.peak_tflops.is_some() {
        cfg.train.peak_tflops = args.peak_tflops;
        cfg.validate().map_err(|e| anyhow!("--peak-tflops: {e}"))?;
    }
    if args.val_dataset.is_some() {
        cfg.train.val_dataset = args.val_dataset;
    }
    if args.gradient_checkpointing {
        cfg.train.gradient_checkpointing = true;
    }
    cfg.plugin = Some(opts.plugin.clone());
    cfg.model = Some(opts.model_dir.clone());
    cfg.mode = Some(opts.mode);
    // Continuing from an adapter PEFT saved: its modules decide the LoRA rules.
    let (m, init_from) = match args.init_from {
        Some(dir) if peft::is_peft_dir(&dir) => {
            let m = super::open_model(&opts, &cfg, Some(&dir))?;
            eprintln!("initialised from the PEFT adapter {}", dir.display());
            (m, None)
        }
        init_from => (crate::model::open(&opts, &cfg)?, init_from),
    };
    let cfg = m.config().clone();
    for w in &m.plan().warnings {
        eprintln!("warning: {w}");
    }
    let output = args.output.unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", m.family(), m.plan().mode.name())));
    let job = TrainJob {
        dataset: args.dataset,
        output,
        resume: args.resume.map(|r| if r == "latest" { Resume::Latest } else { Resume::Path(r.into()) }),
        init_from,
        progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let summary = train::train(&m, &cfg, &job, group.as_ref())?;
    if group.as_ref().is_none_or(|g| g.is_writer()) {
        print_json(&summary)?;
    }
    Ok(ExitCode::SUCCESS)
}
