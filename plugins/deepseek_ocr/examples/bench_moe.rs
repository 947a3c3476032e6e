//! Benchmark: DeepSeek-OCR's MoE layer as the plugin routes it (tokens sorted
//! by expert, one gather, each expert run once on its tokens, one
//! `index_add`) against a naive loop that runs every chosen expert for every
//! token, side by side in one process on the same weights and input.
//!
//! The layer has the real checkpoint's sizes (hidden 1280, 64 routed experts
//! of intermediate 896, top-6, 2 shared experts); the model around it is a
//! two-layer DeepSeek-OCR-shaped checkpoint with random weights, written to a
//! temporary folder and opened through the plugin library like any other.
//!
//!     cargo run --release -p vlmhost-plugin-deepseek-ocr --example bench_moe -- [--tokens 512] [--runs 3] [--device cpu|cuda]
//!
//! Prints the median time of each and the ratio, and checks both give the
//! same output.

use std::time::Instant;
use tch::{Device, Kind, Tensor};
use vlmhost::config::{Mode, TrainConfig};
use vlmhost::model::OpenOptions;
use vlmhost::plugin_api::{Host, ModelOptions};
use vlmhost_plugin_deepseek_ocr::model::{DeepseekOcr, Moe};
use vlmhost_plugin_deepseek_ocr::DeepseekOcrModel;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_owned())
}

/// The naive MoE: for every token, each of its k experts on that one row.
fn naive(model: &DeepseekOcr, host: Host<'_, '_>, moe: &Moe, x: &Tensor) -> Tensor {
    let d = x.size()[2];
    let flat = x.reshape([-1, d]);
    let (idx, weights) = model.route(host, moe, &flat).unwrap();
    let idx = Vec::<i64>::try_from(idx.reshape([-1])).unwrap();
    let k = weights.size()[1];
    let mut rows = Vec::new();
    for t in 0..flat.size()[0] {
        let row = flat.narrow(0, t, 1);
        let mut acc = Tensor::zeros([1, d], (Kind::Float, x.device()));
        for j in 0..k {
            let e = &moe.experts[idx[(t * k + j) as usize] as usize];
            let h = host.linear(e.gate, &row).unwrap().silu() * host.linear(e.up, &row).unwrap();
            let y = host.linear(e.down, &h).unwrap();
            acc += y.to_kind(Kind::Float) * weights.get(t).get(j);
        }
        rows.push(acc);
    }
    let routed = Tensor::cat(&rows, 0).to_kind(x.kind()).view(x.size().as_slice());
    let shared = moe.shared.as_ref().unwrap();
    let h = host.linear(shared.gate, x).unwrap().silu() * host.linear(shared.up, x).unwrap();
    routed + host.linear(shared.down, &h).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let tokens: i64 = arg("--tokens", "512").parse()?;
    let runs: usize = arg("--runs", "3").parse()?;
    let device = vlmhost::cli::parse_device(&arg("--device", "cpu"))?;
    let dir = tempfile::tempdir()?;
    // A DeepSeek-OCR-shaped checkpoint: tiny vision, two LLM layers, layer 1
    // the real MoE.
    vlmhost_plugin_deepseek_ocr::init::init("tiny", dir.path()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    for (k, v) in [
        ("hidden_size", 1280),
        ("intermediate_size", 6848),
        ("moe_intermediate_size", 896),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 10),
        ("num_key_value_heads", 10),
        ("n_routed_experts", 64),
        ("num_experts_per_tok", 6),
        ("n_shared_experts", 2),
    ] {
        config[k] = v.into();
        config["language_config"][k] = v.into();
    }
    config["projector_config"]["n_embed"] = 1280.into();
    std::fs::write(&path, serde_json::to_string(&config)?)?;
    let opts = image_defaults(dir.path())?;
    let family = DeepseekOcrModel::open(dir.path(), &opts).map_err(|e| anyhow::anyhow!("{e}"))?;
    tch::manual_seed(0);
    let weights: Vec<(String, Tensor)> = family
        .model
        .spec
        .params
        .iter()
        .map(|p| (p.name.to_string(), Tensor::randn(p.shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02))
        .collect();
    vlmhost::model::weights::save_safetensors(&dir.path().join("model.safetensors"), &weights, None)?;
    drop(weights);

    let plugin = std::env::current_exe()?.parent().unwrap().parent().unwrap().join("libvlmhost_plugin_deepseek_ocr.so");
    let open = OpenOptions {
        plugin: plugin.display().to_string(),
        model_dir: dir.path().to_path_buf(),
        mode: Mode::Llm,
        kind: Kind::Float,
        device,
        allow_missing: false,
        load_weights: true,
        processor: Default::default(),
    };
    let mut cfg = TrainConfig::default();
    cfg.roles.llm.strategy = Some(vlmhost::config::Strategy::Full);
    let m = vlmhost::model::open(&open, &cfg)?;
    let moe = family.model.moe_of_layer(1).expect("layer 1 is an MoE layer");
    let x = Tensor::randn([1, tokens, 1280], (Kind::Float, device));
    let _g = tch::no_grad_guard();
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let (mut grouped_t, mut naive_t) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (Tensor::zeros([1], (Kind::Float, device)), Tensor::zeros([1], (Kind::Float, device)));
    m.with_ops(false, |ops| {
        let host = Host::new(ops);
        for run in 0..=runs {
            sync();
            let t0 = Instant::now();
            a = family.model.moe(host, moe, &x).unwrap();
            sync();
            let t1 = Instant::now();
            b = naive(&family.model, host, moe, &x);
            sync();
            let t2 = Instant::now();
            if run > 0 {
                // run 0 warms up
                grouped_t.push((t1 - t0).as_secs_f64());
                naive_t.push((t2 - t1).as_secs_f64());
            }
        }
    });
    let diff = (&a - &b).abs().max().double_value(&[]);
    let (g, n) = (median(grouped_t), median(naive_t));
    println!("MoE layer, {tokens} tokens, 64 experts top-6 (+2 shared), hidden 1280, on {device:?}, {} threads", tch::get_num_threads());
    println!("  grouped (vlmhost): {:.4} s", g);
    println!("  naive per-token loop: {:.4} s", n);
    println!("  ratio grouped/naive: {:.3} ({:.1}x faster); outputs agree to {diff:.2e}", g / n, n / g);
    anyhow::ensure!(diff < 1e-4, "the two MoE paths disagree by {diff}");
    Ok(())
}

fn image_defaults(dir: &std::path::Path) -> anyhow::Result<vlmhost_plugin_deepseek_ocr::processor::ImageOptions> {
    let options = ModelOptions(vlmhost::model::checkpoint::processor_defaults(dir)?);
    vlmhost_plugin_deepseek_ocr::image_options(&options).map_err(|e| anyhow::anyhow!("{e}"))
}
