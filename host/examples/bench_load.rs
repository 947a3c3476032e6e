//! Load a checkpoint through a plugin and the host's weight loader, and report
//! the time it took; used by `scripts/bench/load_weights.py`, which measures
//! it against the `safetensors` Python package loading into torch.
//!
//! `bench_load PLUGIN MODEL_DIR DTYPE` (DTYPE: bf16, f16 or f32)

use std::time::Instant;
use vlmhost::config::{Mode, TrainConfig};
use vlmhost::model::OpenOptions;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: bench_load PLUGIN MODEL_DIR bf16|f16|f32");
    let kind = match args[3].as_str() {
        "bf16" => tch::Kind::BFloat16,
        "f16" => tch::Kind::Half,
        "f32" => tch::Kind::Float,
        other => anyhow::bail!("unknown dtype {other}"),
    };
    let opts = OpenOptions {
        plugin: args[1].clone(),
        model_dir: args[2].clone().into(),
        mode: Mode::Projector,
        kind,
        device: tch::Device::Cpu,
        allow_missing: false,
        load_weights: true,
        processor: Default::default(),
    };
    let start = Instant::now();
    let model = vlmhost::model::open(&opts, &TrainConfig::default())?;
    let seconds = start.elapsed().as_secs_f64();
    let bytes: usize = model.params().iter().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum();
    println!("{{\"seconds\": {seconds}, \"tensors\": {}, \"bytes\": {bytes}}}", model.params().len());
    Ok(())
}
