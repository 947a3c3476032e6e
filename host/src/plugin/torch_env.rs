//! The libtorch this process runs on: where it was loaded from, whether its
//! CUDA backend is really there, and which GPUs the driver reports.
//!
//! The CUDA backend of libtorch lives in `libtorch_cuda.so` and registers
//! itself when that library is loaded. Linkers drop it under `--as-needed`
//! because no symbol of it is referenced; `vlmhost-build` links it with
//! `--no-as-needed`, and [`ensure_cuda_backend`] loads it at start-up if it is
//! still missing (for instance in a binary built by other means), so that a
//! GPU machine never silently trains on the CPU.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How `libtorch_cuda` came to be in the process (or why it is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CudaBackend {
    /// Linked into the binary (`DT_NEEDED`), loaded with it.
    Linked,
    /// Not linked, found next to libtorch and loaded at start-up.
    LoadedAtStartup,
    /// This libtorch build has no CUDA backend (a CPU-only build).
    NotInThisBuild,
    /// The library is there but could not be loaded (see the log).
    FailedToLoad,
}

static CUDA_BACKEND: OnceLock<CudaBackend> = OnceLock::new();

/// Make sure `libtorch_cuda` is loaded if this libtorch has one. Idempotent;
/// call it before the first tensor operation.
pub fn ensure_cuda_backend() -> CudaBackend {
    *CUDA_BACKEND.get_or_init(|| {
        if loaded_library("libtorch_cuda.so").is_some() {
            return CudaBackend::Linked;
        }
        let Some(dir) = libtorch_lib_dir() else {
            return CudaBackend::NotInThisBuild;
        };
        let cuda = dir.join("libtorch_cuda.so");
        if !cuda.exists() {
            return CudaBackend::NotInThisBuild;
        }
        match load_global(&cuda) {
            Ok(()) => CudaBackend::LoadedAtStartup,
            Err(e) => {
                tracing::warn!("cannot load {}: {e}; CUDA will be unavailable", cuda.display());
                CudaBackend::FailedToLoad
            }
        }
    })
}

#[cfg(unix)]
fn load_global(path: &Path) -> Result<(), libloading::Error> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading libtorch's own CUDA backend, which only registers hooks.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL)? };
    std::mem::forget(lib); // never unloaded
    Ok(())
}

#[cfg(not(unix))]
fn load_global(path: &Path) -> Result<(), libloading::Error> {
    // SAFETY: as above.
    let lib = unsafe { libloading::Library::new(path)? };
    std::mem::forget(lib);
    Ok(())
}

/// The full path of a loaded shared library whose file name starts with
/// `name` (Linux: from `/proc/self/maps`).
pub fn loaded_library(name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(Path::new)
        .find(|p| p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with(name)))
        .map(Path::to_path_buf)
}

/// The folder of the libtorch this process loaded.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    loaded_library("libtorch_cpu.so").and_then(|p| p.parent().map(Path::to_path_buf))
}

/// One GPU as the NVIDIA driver reports it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub total_memory_bytes: u64,
    pub free_memory_bytes: u64,
}

/// The GPUs the NVIDIA driver (NVML) reports, in its order; empty when there
/// is no driver. `Err` only when a driver is there but NVML failed.
pub fn nvidia_gpus() -> Result<Vec<GpuInfo>, String> {
    nvml::gpus()
}

mod nvml {
    use super::GpuInfo;
    use libloading::{Library, Symbol};
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

    #[repr(C)]
    #[derive(Default)]
    struct Memory {
        total: u64,
        free: u64,
        used: u64,
    }

    type Init = unsafe extern "C" fn() -> c_int;
    type Count = unsafe extern "C" fn(*mut c_uint) -> c_int;
    type Handle = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
    type Name = unsafe extern "C" fn(*mut c_void, *mut c_char, c_uint) -> c_int;
    type MemInfo = unsafe extern "C" fn(*mut c_void, *mut Memory) -> c_int;

    pub fn gpus() -> Result<Vec<GpuInfo>, String> {
        // SAFETY: the driver's management library; the signatures are NVML's
        // documented C API, stable since NVML 5.
        unsafe {
            let Ok(lib) = Library::new("libnvidia-ml.so.1") else {
                return Ok(Vec::new()); // no NVIDIA driver on this machine
            };
            let sym = |name: &[u8]| -> Result<*const (), String> {
                lib.get::<*const ()>(name)
                    .map(|s: Symbol<*const ()>| *s)
                    .map_err(|e| format!("NVML: {e}"))
            };
            let init: Init = std::mem::transmute(sym(b"nvmlInit_v2\0")?);
            let count: Count = std::mem::transmute(sym(b"nvmlDeviceGetCount_v2\0")?);
            let handle: Handle = std::mem::transmute(sym(b"nvmlDeviceGetHandleByIndex_v2\0")?);
            let name: Name = std::mem::transmute(sym(b"nvmlDeviceGetName\0")?);
            let mem: MemInfo = std::mem::transmute(sym(b"nvmlDeviceGetMemoryInfo\0")?);
            let rc = init();
            if rc != 0 {
                return Err(format!("NVML: nvmlInit failed with code {rc}"));
            }
            let mut n: c_uint = 0;
            if count(&mut n) != 0 {
                return Err("NVML: cannot count devices".into());
            }
            let mut out = Vec::new();
            for i in 0..n {
                let mut h: *mut c_void = std::ptr::null_mut();
                if handle(i, &mut h) != 0 {
                    return Err(format!("NVML: cannot open device {i}"));
                }
                let mut buf = [0 as c_char; 256];
                let device_name = if name(h, buf.as_mut_ptr(), buf.len() as c_uint) == 0 {
                    CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
                } else {
                    "unknown".to_owned()
                };
                let mut m = Memory::default();
                let _ = mem(h, &mut m);
                out.push(GpuInfo {
                    index: i,
                    name: device_name,
                    total_memory_bytes: m.total,
                    free_memory_bytes: m.free,
                });
            }
            std::mem::forget(lib);
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_loaded_libtorch() {
        // Touch libtorch so it is certainly mapped.
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let dir = libtorch_lib_dir().expect("libtorch_cpu.so is mapped");
        assert!(dir.join("libtorch_cpu.so").exists());
    }

    #[test]
    fn cuda_backend_is_linked_when_the_build_has_one() {
        let backend = ensure_cuda_backend();
        let dir = libtorch_lib_dir().unwrap();
        if dir.join("libtorch_cuda.so").exists() {
            // vlmhost-build links it with --no-as-needed: no start-up load needed.
            assert_eq!(backend, CudaBackend::Linked);
        } else {
            assert_eq!(backend, CudaBackend::NotInThisBuild);
        }
    }
}
