//! Records the libtorch version this crate (and so every plugin) is built against.
//!
//! torch-sys reads the same `LIBTORCH` folder; the version comes from the torch
//! wheel's `version.py` or a libtorch archive's `build-version` file.

use std::path::Path;

fn main() {
    // Run paths and the real CUDA link for this crate's own test binaries.
    vlmhost_build::link_libtorch();
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let version = std::env::var("LIBTORCH")
        .ok()
        .and_then(|dir| read_version(Path::new(&dir)))
        .unwrap_or_else(|| {
            println!(
                "cargo:warning=cannot read the libtorch version under $LIBTORCH; \
                 plugins built now will report \"unknown\" and the host will refuse them"
            );
            "unknown".to_owned()
        });
    println!("cargo:rustc-env=VLMHOST_LIBTORCH_VERSION={version}");
}

fn read_version(dir: &Path) -> Option<String> {
    let version_py = dir.join("version.py");
    println!("cargo:rerun-if-changed={}", version_py.display());
    if let Ok(text) = std::fs::read_to_string(&version_py) {
        // `__version__ = '2.11.0+cu130'`
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("__version__") {
                let value = rest.trim().trim_start_matches('=').trim();
                let value = value.trim_matches(|c| c == '\'' || c == '"');
                if !value.is_empty() {
                    return Some(value.to_owned());
                }
            }
        }
    }
    let build_version = dir.join("build-version");
    println!("cargo:rerun-if-changed={}", build_version.display());
    std::fs::read_to_string(build_version).ok().map(|s| s.trim().to_owned())
}
