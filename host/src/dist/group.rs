//! The process group: the safe face of `csrc/dist.cpp`. Joining it is the
//! rendezvous (rank 0 hosts a TCPStore at `MASTER_ADDR:MASTER_PORT`, or
//! torchrun's agent does); then a c10d backend, Gloo for CPU tensors and
//! NCCL for CUDA ones. Every wait gives up after the launch's timeout, and a
//! peer that dies breaks the connections at once, so a lost rank becomes an
//! error on the others, never a hang.

use super::launch::Launch;
use anyhow::{anyhow, bail, Result};
use std::ffi::{c_char, c_void, CString};
use std::time::Duration;
use tch::Tensor;

extern "C" {
    fn vlmhost_dist_has_nccl() -> i32;
    fn vlmhost_dist_init(
        backend: *const c_char,
        master_addr: *const c_char,
        port: i32,
        agent_store: i32,
        prefix: *const c_char,
        rank: i32,
        world: i32,
        cuda_device: i32,
        timeout_ms: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn vlmhost_dist_allreduce_sum(g: *mut c_void, tensors: *mut *mut c_void, n: usize, err: *mut c_char, err_len: usize) -> i32;
    fn vlmhost_dist_barrier(g: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
    fn vlmhost_dist_store_set(g: *mut c_void, key: *const c_char, data: *const u8, len: usize, err: *mut c_char, err_len: usize) -> i32;
    fn vlmhost_dist_store_get(g: *mut c_void, key: *const c_char, out: *mut *mut u8, len: *mut usize, err: *mut c_char, err_len: usize) -> i32;
    fn vlmhost_dist_free(p: *mut u8);
    fn vlmhost_dist_destroy(g: *mut c_void);
}

/// Whether this build can create the NCCL backend (it needs the CUDA and NCCL
/// headers at build time; `host/build.rs`).
pub fn has_nccl() -> bool {
    // SAFETY: a constant.
    unsafe { vlmhost_dist_has_nccl() == 1 }
}

/// The c10d backend a group runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    /// NCCL for a CUDA device, Gloo for the CPU.
    pub fn for_device(device: tch::Device) -> Backend {
        if device.is_cuda() { Backend::Nccl } else { Backend::Gloo }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// A joined process group.
pub struct Group {
    ptr: *mut c_void,
    pub rank: usize,
    pub world: usize,
    pub backend: Backend,
    timeout: Duration,
}

const ERR_LEN: usize = 4096;

/// Run a shim call with an error buffer; its message on failure.
fn call(f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), String> {
    let mut buf = vec![0u8; ERR_LEN];
    if f(buf.as_mut_ptr().cast(), ERR_LEN) == 0 {
        return Ok(());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Err(String::from_utf8_lossy(&buf[..end]).trim().to_owned())
}

impl Group {
    /// Join the group `launch` describes, on `backend` (NCCL binds
    /// `cuda:LOCAL_RANK`). Waits for every rank up to the launch's timeout.
    pub fn join(launch: &Launch, backend: Backend) -> Result<Group> {
        if backend == Backend::Nccl && !has_nccl() {
            bail!("CUDA data-parallel training needs NCCL, and this vlmhost was built without it (no nccl.h and CUDA headers beside torch at build time: install torch's nvidia-* wheels and rebuild, or train on the CPU with --device cpu)");
        }
        let name = CString::new(backend.name())?;
        let addr = CString::new(launch.master_addr.clone()).map_err(|_| anyhow!("MASTER_ADDR holds a NUL byte"))?;
        let prefix = CString::new(format!("vlmhost/{}/", launch.restart))?;
        let mut ptr = std::ptr::null_mut();
        call(|err, len| {
            // SAFETY: the strings outlive the call; the error buffer is `len` bytes.
            ptr = unsafe {
                vlmhost_dist_init(
                    name.as_ptr(),
                    addr.as_ptr(),
                    i32::from(launch.master_port),
                    i32::from(launch.agent_store),
                    prefix.as_ptr(),
                    launch.rank as i32,
                    launch.world as i32,
                    launch.local_rank as i32,
                    launch.timeout.as_millis() as i64,
                    err,
                    len,
                )
            };
            if ptr.is_null() { -1 } else { 0 }
        })
        .map_err(|e| {
            anyhow!(
                "rank {} of {}: joining the {} process group at {}:{} failed: {e} (are all {} ranks started, with the same MASTER_ADDR and MASTER_PORT? the wait is bounded by VLMHOST_DIST_TIMEOUT, {:.0} s)",
                launch.rank,
                launch.world,
                backend.name(),
                launch.master_addr,
                launch.master_port,
                launch.world,
                launch.timeout.as_secs_f64()
            )
        })?;
        Ok(Group { ptr, rank: launch.rank, world: launch.world, backend, timeout: launch.timeout })
    }

    /// Whether this rank writes the run's files (rank 0).
    pub fn is_writer(&self) -> bool {
        self.rank == 0
    }

    fn lost(&self, what: &str, e: String) -> anyhow::Error {
        anyhow!(
            "rank {} of {}: {what} failed: {e}. Another rank stopped or is stuck (its log says why; waits give up after {:.0} s, VLMHOST_DIST_TIMEOUT). Restart all ranks with --resume to continue from the last checkpoint.",
            self.rank,
            self.world,
            self.timeout.as_secs_f64()
        )
    }

    /// Sum each tensor over the ranks, in place (all are launched, then awaited).
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        let mut ptrs: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        // SAFETY: the pointers are live `at::Tensor`s (tch's C_tensor) for the call.
        call(|err, len| unsafe { vlmhost_dist_allreduce_sum(self.ptr, ptrs.as_mut_ptr(), ptrs.len(), err, len) }).map_err(|e| self.lost("all-reduce", e))
    }

    /// Wait until every rank is here.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        call(|err, len| unsafe { vlmhost_dist_barrier(self.ptr, err, len) }).map_err(|e| self.lost("barrier", e))
    }

    /// Publish `value` under `key` in the group's store.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = CString::new(key)?;
        // SAFETY: `k` and `value` outlive the call.
        call(|err, len| unsafe { vlmhost_dist_store_set(self.ptr, k.as_ptr(), value.as_ptr(), value.len(), err, len) }).map_err(|e| self.lost("the store's set", e))
    }

    /// The value under `key`, waiting for a rank to publish it.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let k = CString::new(key)?;
        let (mut out, mut n) = (std::ptr::null_mut(), 0usize);
        // SAFETY: out-pointers to locals; the shim mallocs `out`, freed below.
        call(|err, len| unsafe { vlmhost_dist_store_get(self.ptr, k.as_ptr(), &mut out, &mut n, err, len) }).map_err(|e| self.lost(&format!("waiting for {key:?} in the store"), e))?;
        // SAFETY: `out` holds `n` bytes from the shim.
        let v = unsafe { std::slice::from_raw_parts(out, n) }.to_vec();
        // SAFETY: allocated by the shim's malloc.
        unsafe { vlmhost_dist_free(out) };
        Ok(v)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: created by vlmhost_dist_init, destroyed once.
        unsafe { vlmhost_dist_destroy(self.ptr) };
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {}, {})", self.rank, self.world, self.backend.name())
    }
}
