//! Mixed precision (`precision: bf16`, `--precision bf16`; issue #18), on the
//! CPU: the frozen base weights stored in bf16, the trainable tensors (LoRA
//! A/B, fully trained roles) kept in fp32 with fp32 gradients and optimizer
//! state, the forward pass under bf16 autocast; every registered family, and
//! a training run through the CLI.

use crate::common::*;
use crate::families::{self, prelude::*};
use std::process::Command;

/// Relative bound on |loss(bf16) - loss(fp32)| / loss(fp32). bf16 keeps 8
/// significant bits (unit roundoff 2^-9 ~ 2e-3 per rounding); the weights
/// are rounded once and every matrix product's inputs and outputs once more,
/// through at most 4 layers of the tiny fixtures, and cross-entropy averages
/// over the labelled tokens. Measured on this machine: 3e-5 (LLaVA) to 1.4e-3
/// (Qwen2-VL) relative; 3% leaves room for other BLAS paths without hiding a wrong
/// computation (a weight in the wrong dtype or layout moves the loss by far
/// more: these random-weight models' losses sit near ln(vocab) with a spread
/// of tens of percent between inputs).
const BF16_LOSS_RTOL: f64 = 0.03;

#[test]
fn bf16_weights_train_with_fp32_masters_in_every_family() {
    let dir = tempdir();
    let data = synth_ocr(dir.path(), 2);
    for f in families::all() {
        let cfg = TrainConfig::default();
        let fp32 = f.open(Mode::Llm, &cfg);
        let bf16 = f.open_with(&OpenOptions { kind: Kind::BFloat16, ..f.options(Mode::Llm) }, &cfg);

        // Storage: frozen weights in bf16, trained ones (the projector, fully) and the LoRA adapters in fp32.
        let mut frozen = 0;
        for (i, p) in bf16.params().iter().enumerate() {
            let trained = bf16.plan().trainable[i];
            let want = if trained { Kind::Float } else { Kind::BFloat16 };
            assert_eq!(p.kind(), want, "{}: {} (trainable {trained})", f.name, bf16.spec().params[i].name);
            frozen += usize::from(!trained);
        }
        assert!(frozen > 0, "{}: nothing frozen in mode llm", f.name);
        let adapters: Vec<_> = bf16.adapters().collect();
        assert!(!adapters.is_empty(), "{}: no LoRA adapter in mode llm", f.name);
        for (_, a) in adapters {
            assert_eq!((a.a.kind(), a.b.kind()), (Kind::Float, Kind::Float), "{}: LoRA adapter dtype", f.name);
        }

        // The loss equals the fp32 model's within bf16's precision.
        let samples = prepare_file(&fp32, &data);
        let batch = f.collate(&samples, &[0, 1]);
        let (want, _) = causal_lm_loss(&fp32.forward(&batch, false).unwrap(), &batch.labels).unwrap();
        let logits = bf16.autocast(|| bf16.forward(&batch, false)).unwrap();
        let (got, n) = causal_lm_loss(&logits, &batch.labels).unwrap();
        assert!(n > 0, "{}: no labelled token", f.name);
        let (got_v, want_v) = (got.double_value(&[]), want.double_value(&[]));
        let rel = (got_v - want_v).abs() / want_v.abs();
        assert!(rel < BF16_LOSS_RTOL, "{}: bf16 loss {got_v} vs fp32 {want_v} (relative {rel:.2e})", f.name);
        eprintln!("{}: loss bf16 {got_v:.6} fp32 {want_v:.6} (relative {rel:.2e})", f.name);

        // Gradients reach every fp32 master tensor, in fp32; the frozen bf16 weights get none.
        got.backward();
        let mut moved = 0;
        for t in bf16.trainables() {
            let g = t.tensor.grad();
            assert!(g.defined(), "{}: {} has no gradient", f.name, t.name);
            assert_eq!(g.kind(), Kind::Float, "{}: {} gradient dtype", f.name, t.name);
            assert!(g.isfinite().all().int64_value(&[]) == 1, "{}: {} gradient not finite", f.name, t.name);
            moved += usize::from(g.abs().sum(Kind::Double).double_value(&[]) > 0.0);
        }
        assert!(moved > 0, "{}: every gradient is zero", f.name);
        for (i, p) in bf16.params().iter().enumerate() {
            if !bf16.plan().trainable[i] {
                assert!(!p.grad().defined(), "{}: frozen {} got a gradient", f.name, bf16.spec().params[i].name);
            }
        }
    }
}

/// `vlmhost train --precision bf16` on the LLaVA fixture: it trains (finite
/// losses), records `precision: bf16` in the run's config, and saves the
/// LoRA adapter in fp32.
#[test]
fn train_with_bf16_precision_saves_fp32_trainables() {
    let fixture = families::family("llava").fixture();
    let dir = tempdir();
    let out = dir.path().join("run");
    let model = fixture.join("model");
    let data = fixture.join("samples/data.jsonl");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "train:\n  batch_size: 2\n").unwrap();
    let run: Run = Command::new(vlmhost_bin())
        .args(["train", "--plugin", "llava", "--precision", "bf16", "--max-steps", "4", "--config"])
        .arg(&config)
        .arg("--model")
        .arg(&model)
        .arg("--dataset")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .current_dir(dir.path())
        .env_remove("TRAINING_MODE")
        .output()
        .unwrap()
        .into();
    assert!(run.success(), "{}", run.all());
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 4, "{}", run.all());
    // Memory accounting on the CPU: the peak RSS in every line and the summary, no CUDA counters.
    for line in std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["peak_rss_mib"].as_f64().is_some_and(|m| m > 1.0), "{line}");
        assert!(v.get("cuda_peak_allocated_mib").is_none(), "{line}");
    }
    let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(summary["peak_rss_mib"].as_f64().is_some_and(|m| m > 1.0) && summary.get("cuda_peak_allocated_mib").is_none(), "{summary}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let recorded = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(recorded.lines().any(|l| l.trim() == "precision: bf16"), "the run's config records no precision:\n{recorded}");
    let adapter = read_tensors(&out.join("adapter/adapter_model.safetensors"));
    assert!(!adapter.is_empty());
    for (name, t) in &adapter {
        assert_eq!(t.kind(), Kind::Float, "adapter tensor {name}");
    }
}
