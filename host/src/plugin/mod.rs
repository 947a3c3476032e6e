//! The plugin side of the host: finding, checking and loading plugin
//! libraries ([`loader`], with [`elf`] checking a file before it is mapped),
//! and the libtorch the process runs on ([`torch_env`]: the CUDA backend
//! really loaded, the GPUs the driver reports).
//!
//! This layer knows no model and no run; it may use nothing of the host but
//! itself.

pub mod elf;
pub mod loader;
pub mod torch_env;
