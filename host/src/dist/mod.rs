//! Data-parallel plumbing over PyTorch's c10d (`csrc/dist.cpp`): where this
//! process stands in a launch ([`launch`]: the variables `torchrun` and
//! Slurm's `srun` set), the process group ([`group`]: a TCPStore rendezvous,
//! then Gloo on the CPU or NCCL on CUDA, every wait bounded by a timeout),
//! gradients summed over the ranks in buckets ([`buckets`]) and values every
//! rank must agree on ([`agree`]).
//!
//! A leaf of the host: it knows tensors and the environment, nothing of
//! models or training. Without the launch variables nothing here runs.

pub mod agree;
pub mod buckets;
pub mod group;
pub mod launch;

pub use group::{Backend, Group};
pub use launch::Launch;
