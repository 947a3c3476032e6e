//! Checkpoints of a run (`checkpoints/step-NNNNNNNN/`: the trainable tensors,
//! the optimizer's moments, the configuration and [`TrainState`]), written to
//! a `.partial` folder, fsynced and renamed, so a crash never leaves a
//! half-written checkpoint behind; and the checks before a run resumes one.

use super::optim::AdamW;
use crate::config::TrainConfig;
use crate::files::{self, fault_point};
use crate::model::weights::{read_tensors, save_safetensors};
use crate::model::HostModel;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The trainable tensors of a checkpoint (also what `--init-from` reads).
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

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

impl TrainState {
    /// The state before the first step of a run of `model`.
    pub fn new(model: &HostModel, total_steps: usize, seed: u64) -> TrainState {
        TrainState {
            format: 1,
            step: 0,
            total_steps,
            epoch: 0,
            position: 0,
            seed,
            bad_steps_in_a_row: 0,
            best_val_loss: None,
            evals_without_improvement: 0,
            family: model.family().to_owned(),
            mode: model.plan().mode.name().to_owned(),
        }
    }
}

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    Latest,
    Path(PathBuf),
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
                if e.path().join(STATE_FILE).is_file() {
                    out.push((step, e.path()));
                }
            }
        }
    }
    out.sort();
    out
}

/// Write a checkpoint atomically and keep only the last `train.keep_last` ones.
pub fn save(model: &HostModel, opt: &AdamW, state: &TrainState, cfg: &TrainConfig, output: &Path) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output, state.step);
    let partial = files::fresh_partial(&final_dir)?;
    save_safetensors(&partial.join(TRAINABLE_FILE), &model.trainable_tensors(), None)?;
    fault_point("checkpoint", state.step);
    save_safetensors(&partial.join(OPTIMIZER_FILE), &opt.state_tensors(), None)?;
    files::write_atomic(&partial.join("config.yaml"), serde_yaml::to_string(cfg)?.as_bytes())?;
    files::write_atomic(&partial.join(STATE_FILE), serde_json::to_string_pretty(state)?.as_bytes())?;
    files::publish_dir(&partial, &final_dir)?;
    let all = list_checkpoints(output);
    let keep = cfg.train.keep_last.max(1);
    if all.len() > keep {
        for (_, old) in &all[..all.len() - keep] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(final_dir)
}

/// The checkpoint to resume from, checked before anything is written: a
/// complete checkpoint folder (with `state.json`), never a `.partial` one.
pub fn resume_dir(output: &Path, resume: Option<&Resume>) -> Result<Option<PathBuf>> {
    let existing = list_checkpoints(output);
    let complete = || match existing.as_slice() {
        [] => format!("{} has no complete checkpoint", output.display()),
        all => format!("complete checkpoints of {}: {}", output.display(), all.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>().join(", ")),
    };
    match resume {
        None if !existing.is_empty() => bail!(
            "{} already holds checkpoints (latest {}); pass --resume to continue it, or choose another --output",
            output.display(),
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
        Some(Resume::Path(p)) if !p.join(STATE_FILE).is_file() => bail!(
            "--resume {}: not a checkpoint folder (no {}); {}",
            p.display(),
            if p.is_dir() { "state.json in it" } else { "such folder" },
            complete()
        ),
        Some(Resume::Path(p)) => Ok(Some(p.clone())),
    }
}

/// Load checkpoint `dir` into the model and the optimizer; returns its state,
/// refused when it was saved by another family or mode.
pub fn load(dir: &Path, model: &HostModel, opt: &mut AdamW, fresh: &TrainState) -> Result<TrainState> {
    let saved: TrainState = serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE))?)
        .with_context(|| format!("{}: unreadable state.json", dir.display()))?;
    if saved.family != fresh.family || saved.mode != fresh.mode {
        bail!("{}: saved by a {} run in mode {}, this is {} in mode {}", dir.display(), saved.family, saved.mode, fresh.family, fresh.mode);
    }
    model.load_tensors(&read_tensors(&dir.join(TRAINABLE_FILE))?, true)?;
    opt.load_state(&read_tensors(&dir.join(OPTIMIZER_FILE))?, saved.step as i64)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    Ok(TrainState { total_steps: fresh.total_steps, ..saved })
}
