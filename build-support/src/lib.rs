//! Build-script helper shared by the `vlmhost` binary and every plugin.
//!
//! Call [`link_libtorch`] from the `build.rs` of any crate that produces a final
//! artifact (a binary, a test, a `cdylib` plugin):
//!
//! ```no_run
//! fn main() {
//!     vlmhost_build::link_libtorch();
//! }
//! ```
//!
//! It fixes two problems that `torch-sys` leaves to the final artifact:
//!
//! * **CUDA silently missing.** `torch-sys` asks for `-ltorch_cuda`, but rustc links
//!   with `--as-needed` and nothing in our code references a `libtorch_cuda`
//!   symbol, so the linker drops it. The CUDA backend then never registers and
//!   `tch::Cuda::is_available()` is false on a GPU machine. We link it again
//!   inside `--push-state --no-as-needed ... --pop-state`, which keeps the
//!   `DT_NEEDED` entry whatever the link order.
//! * **`LD_LIBRARY_PATH`.** We add run paths so that artifacts run without it:
//!   the absolute libtorch folder seen at build time, and `$ORIGIN`-relative
//!   paths to `<workspace>/.libtorch/lib` for binaries in `target/<profile>/`
//!   and tests in `target/<profile>/deps/` (so a tree copied to another machine
//!   works once `.libtorch` there points at that machine's torch).
//!
//! The libtorch folder comes from `LIBTORCH`, which the workspace's
//! `.cargo/config.toml` points at `.libtorch` (created by `scripts/setup.sh`).

use std::path::PathBuf;

/// The folder holding `libtorch_cpu.so` and friends, if `LIBTORCH` is set.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("LIBTORCH_LIB") {
        return Some(PathBuf::from(lib).join("lib"));
    }
    std::env::var("LIBTORCH").ok().map(|p| PathBuf::from(p).join("lib"))
}

/// Emit the link arguments described in the crate documentation.
pub fn link_libtorch() {
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.contains("linux") {
        // The as-needed pitfall and ELF run paths are Linux matters.
        return;
    }
    let Some(lib) = libtorch_lib_dir() else {
        println!(
            "cargo:warning=LIBTORCH is not set: run scripts/setup.sh (it writes .libtorch); \
             CUDA linking and run paths are left to the defaults"
        );
        return;
    };
    println!("cargo:rerun-if-changed={}", lib.join("libtorch_cuda.so").display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../../.libtorch/lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../../../.libtorch/lib");
}
