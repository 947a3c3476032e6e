//! Data parallelism in the loop ([`World`]): N ranks with `train.batch_size`
//! b each train as one process with batch N*b.
//!
//! * Data: every rank holds the whole (checked) data set and draws the same
//!   per-epoch order; a step's global micro-batches of N*b samples are taken
//!   as one process would, and rank r keeps the r-th b of each ([`World::shard`]).
//!   The step's global count of labelled tokens is therefore known on every
//!   rank without communication, and each rank divides its summed token
//!   losses by it before `backward`.
//! * Gradients are then summed over the ranks ([`crate::dist::buckets`]), so
//!   they are the gradient of the global mean loss; clipping and AdamW see
//!   the same numbers on every rank and the parameters stay equal.
//! * The loss, the token count and whether any rank met a non-finite loss
//!   are summed too ([`World::sum_step`]): a step is skipped everywhere or nowhere.
//! * Before step 1 the ranks check they agree on the configuration, the data,
//!   the trainable tensors and the resume point ([`fingerprint`]), and take
//!   rank 0's trainable tensors (LoRA's random start included).
//! * Rank 0 alone writes the run folder ([`World::is_writer`]).

use super::checkpoint::TrainState;
use super::dataset::Record;
use crate::config::TrainConfig;
use crate::dist::{agree, buckets, Group};
use crate::model::HostModel;
use anyhow::Result;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// This process's ranks: alone, or one of a process group.
#[derive(Clone, Copy)]
pub struct World<'a> {
    group: Option<&'a Group>,
}

impl<'a> World<'a> {
    pub fn new(group: Option<&'a Group>) -> World<'a> {
        World { group }
    }

    pub fn rank(&self) -> usize {
        self.group.map_or(0, |g| g.rank)
    }

    pub fn size(&self) -> usize {
        self.group.map_or(1, |g| g.world)
    }

    /// Whether this rank writes the run's files, logs steps and prints the summary.
    pub fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's part of a global micro-batch of `size() * b` samples.
    pub fn shard(&self, global: &[usize]) -> Vec<usize> {
        let b = global.len() / self.size();
        global[self.rank() * b..(self.rank() + 1) * b].to_vec()
    }

    /// Check with the other ranks that `fingerprint` is the same everywhere.
    pub fn agree(&self, fingerprint: &BTreeMap<String, String>) -> Result<()> {
        match self.group {
            Some(g) => agree::check_equal(g, "configuration, data and model", fingerprint),
            None => Ok(()),
        }
    }

    /// Every rank starts from rank 0's trainable tensors (summing rank 0's
    /// values with zeros elsewhere is exact).
    pub fn take_rank0_tensors(&self, model: &HostModel) -> Result<()> {
        let Some(g) = self.group else { return Ok(()) };
        let _guard = tch::no_grad_guard();
        let tensors: Vec<Tensor> = model.trainables().iter().map(|t| t.tensor.detach()).collect();
        if g.rank != 0 {
            for t in &tensors {
                let _ = t.shallow_clone().zero_();
            }
        }
        buckets::all_reduce_sum(g, &tensors, buckets::BUCKET_BYTES)
    }

    /// A step's summed loss (`None`: non-finite on this rank) and tokens,
    /// summed over the ranks; `None` if any rank met a non-finite loss.
    pub fn sum_step(&self, loss_sum: Option<f64>, tokens: usize, device: Device) -> Result<(Option<f64>, usize)> {
        let Some(g) = self.group else { return Ok((loss_sum, tokens)) };
        let v = Tensor::from_slice(&[loss_sum.unwrap_or(0.0), tokens as f64, f64::from(u8::from(loss_sum.is_none()))]).to_device(device);
        g.all_reduce_sum(std::slice::from_ref(&v))?;
        let v: Vec<f64> = Vec::try_from(v.to_device(Device::Cpu))?;
        Ok(((v[2] == 0.0).then_some(v[0]), v[1].round() as usize))
    }

    /// Sum the trainable tensors' gradients over the ranks (an undefined
    /// gradient, a part no sample of this rank reached, counts as zero).
    pub fn sum_gradients(&self, model: &HostModel) -> Result<()> {
        let Some(g) = self.group else { return Ok(()) };
        let params: Vec<Tensor> = model.trainables().iter().map(|t| t.tensor.shallow_clone()).collect();
        let missing: Vec<&Tensor> = params.iter().filter(|p| !p.grad().defined()).collect();
        if !missing.is_empty() {
            // Accumulating zeros defines them: tch cannot set a gradient directly.
            let zero = missing.iter().map(|p| p.sum(Kind::Float) * 0.0).reduce(|a, b| a + b).expect("not empty");
            zero.backward();
        }
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
        buckets::all_reduce_sum(g, &grads, buckets::BUCKET_BYTES)
    }
}

/// What the ranks must agree on: the resolved configuration (flattened to
/// `config.<key>`), the training and validation data (sample count and a
/// hash of the samples as checked), the trainable tensors' names and shapes,
/// and where the run starts.
pub fn fingerprint(cfg: &TrainConfig, model: &HostModel, train: &[Record], val: &[Record], state: &TrainState, resumed_from: Option<&Path>) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    agree::flatten("config", &serde_json::to_value(cfg)?, &mut m);
    m.insert("data.train".into(), data_hash(train)?);
    m.insert("data.validation".into(), data_hash(val)?);
    let mut h = std::hash::DefaultHasher::new();
    for t in model.trainables() {
        (t.name.as_str(), t.tensor.size(), format!("{:?}", t.tensor.kind())).hash(&mut h);
    }
    m.insert("model.family".into(), model.family().to_owned());
    m.insert("model.trainable_tensors".into(), format!("{} tensors, hash {:016x}", model.trainables().len(), h.finish()));
    m.insert("run.total_steps".into(), state.total_steps.to_string());
    m.insert("run.start".into(), match resumed_from {
        Some(dir) => format!("step {} from {}", state.step, dir.file_name().map_or(dir.display().to_string(), |n| n.to_string_lossy().into_owned())),
        None => "step 0".into(),
    });
    Ok(m)
}

/// The samples as checked (content, cut, counts), hashed: not their paths.
fn data_hash(records: &[Record]) -> Result<String> {
    let mut h = std::hash::DefaultHasher::new();
    for r in records {
        (serde_json::to_string(&r.sample)?, r.length, r.supervised, r.truncate_to).hash(&mut h);
    }
    Ok(format!("{} samples, hash {:016x}", records.len(), h.finish()))
}
