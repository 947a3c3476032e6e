//! Links libtorch for real (see vlmhost-build) and compiles the small C++
//! shims against the same libtorch: bf16 autocast (`csrc/autocast.cpp`),
//! activation checkpointing (`csrc/checkpoint.cpp`), the CUDA allocator's
//! memory counters (`csrc/memory.cpp`), the observer of attention kernels
//! and their FLOPs (`csrc/ops_observer.cpp`), and the c10d
//! collectives of data-parallel training (`csrc/dist.cpp`: Gloo always; NCCL
//! when libtorch_cuda and the CUDA and NCCL headers of the `nvidia-*` wheels
//! are there, which `doctor` reports).

use std::path::{Path, PathBuf};

fn main() {
    vlmhost_build::link_libtorch();
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    println!("cargo:rerun-if-changed=csrc/memory.cpp");
    println!("cargo:rerun-if-changed=csrc/checkpoint.cpp");
    println!("cargo:rerun-if-changed=csrc/ops_observer.cpp");
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-changed=csrc/dist_nccl.cpp");
    println!("cargo:rerun-if-changed=csrc/third_party");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VLMHOST_NO_NCCL");
    let libtorch = PathBuf::from(std::env::var("LIBTORCH").expect("LIBTORCH is set by .cargo/config.toml; run scripts/setup.sh"));
    let include = libtorch.join("include");
    let shim = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
            .warnings(false);
        b
    };
    shim().file("csrc/autocast.cpp").file("csrc/memory.cpp").file("csrc/checkpoint.cpp").file("csrc/ops_observer.cpp").compile("vlmhost_shims");

    let mut dist = shim();
    dist.file("csrc/dist.cpp").include("csrc/third_party/gloo").define("USE_C10D_GLOO", None);
    match nccl_includes(&libtorch) {
        Some(dirs) => {
            dist.define("VLMHOST_NCCL", None);
            let mut nccl = shim();
            nccl.file("csrc/dist_nccl.cpp").define("USE_C10D_NCCL", None).include("csrc/third_party/cccl").flag_if_supported("-Wno-interference-size");
            for d in dirs {
                nccl.include(d);
            }
            nccl.compile("vlmhost_dist_nccl");
        }
        None => println!("cargo:warning=building without NCCL (no libtorch_cuda.so, or no nccl.h / CUDA headers next to torch): CUDA data-parallel training will be refused"),
    }
    dist.compile("vlmhost_dist");
}

/// The include folders `ProcessGroupNCCL.hpp` needs (NCCL's, the CUDA
/// runtime's, and `crt/host_config.h` from triton's copy of the CUDA
/// headers), all from the wheels installed beside torch (`nv/target` is in
/// `csrc/third_party/cccl`); `None` when any is missing or `VLMHOST_NO_NCCL`
/// is set. The NCCL headers must be those of the wheel torch pins: the layout
/// of `ProcessGroupNCCL` follows NCCL's version macros.
fn nccl_includes(libtorch: &Path) -> Option<Vec<PathBuf>> {
    if std::env::var_os("VLMHOST_NO_NCCL").is_some() || !libtorch.join("lib/libtorch_cuda.so").exists() {
        return None;
    }
    let site = libtorch.canonicalize().ok()?.parent()?.to_path_buf();
    let nvidia = site.join("nvidia");
    let nccl = nvidia.join("nccl/include");
    let cuda = std::fs::read_dir(&nvidia).ok()?.flatten().map(|e| e.path().join("include")).find(|p| p.join("cuda_runtime_api.h").is_file())?;
    let triton = site.join("triton/backends/nvidia/include");
    let wanted = [nccl.join("nccl.h"), cuda.join("cuda_runtime_api.h"), triton.join("crt/host_config.h")];
    if wanted.iter().all(|f| f.is_file()) {
        // triton's folder last: its CUDA headers are another version's.
        Some(vec![nccl, cuda, triton])
    } else {
        None
    }
}
