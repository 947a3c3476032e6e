//! Training: the data set checked before the first step ([`dataset`]), the
//! optimizer ([`optim`]), the learning-rate schedule and data order
//! ([`schedule`]), micro-batches and their loss ([`micro_batch`]), the loop
//! ([`trainer`]), checkpoints and resume ([`checkpoint`]), data parallelism
//! over [`crate::dist`] ([`data_parallel`]), and the evaluation `vlmhost
//! eval` shares with a run's validation ([`eval`]).
//!
//! This layer drives a [`crate::model::HostModel`] and writes a run folder
//! through [`crate::report`]; it knows nothing of the command line.

pub mod checkpoint;
pub mod data_parallel;
pub mod dataset;
pub mod eval;
pub mod micro_batch;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use checkpoint::{list_checkpoints, Resume};
pub use eval::Evaluation;
pub use trainer::{train, TrainJob, TrainSummary};
