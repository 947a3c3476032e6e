//! Links libtorch for real (see vlmhost-build) and compiles the small C++
//! shims against the same libtorch: bf16 autocast (`csrc/autocast.cpp`) and
//! the CUDA allocator's memory counters (`csrc/memory.cpp`).

use std::path::PathBuf;

fn main() {
    vlmhost_build::link_libtorch();
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    println!("cargo:rerun-if-changed=csrc/memory.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = PathBuf::from(std::env::var("LIBTORCH").expect("LIBTORCH is set by .cargo/config.toml; run scripts/setup.sh"));
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/autocast.cpp")
        .file("csrc/memory.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("vlmhost_shims");
}
