//! Throughput accounting (issue #18): which attention kernel libtorch runs
//! for each family's forward and backward passes (the RecordFunction
//! observer, `vlmhost::model::kernels`), and the model FLOPs of a training
//! step (`vlmhost::model::flops`) against a count made here from the
//! checkpoint's config.json alone; the fields in metrics.jsonl and summary.json.

use crate::common::*;
use crate::families::{self, prelude::*};
use std::process::Command;
use vlmhost::model::kernels::{AttentionKernels, Observer};

/// Forward and backward of `batch` (training, LoRA on the LLM) with the observer's window open.
fn kernels_of(m: &HostModel, batch: &BatchTensors, obs: &Observer) -> AttentionKernels {
    let _ = AttentionKernels::read(true);
    {
        // This thread's calls only: the tests in other threads run attention too.
        let _w = obs.window_on_this_thread();
        let (loss, _) = causal_lm_loss(&m.forward(batch, true).unwrap(), &batch.labels).unwrap();
        loss.backward();
    }
    AttentionKernels::read(true)
}

/// The text model's `num_hidden_layers` in a config.json (`text_config` or the top level).
fn llm_layers(config: &serde_json::Value) -> i64 {
    let t = config.get("text_config").or_else(|| config.get("language_config")).unwrap_or(config);
    t["num_hidden_layers"].as_i64().or_else(|| config["num_hidden_layers"].as_i64()).expect("num_hidden_layers")
}

/// On the CPU, torch 2.11 runs every 4-D SDPA call, with or without a mask,
/// fp32 or bf16, on `_scaled_dot_product_flash_attention_for_cpu` (checked
/// with torch.profiler); only 3-D inputs, dropout with grad or a value head
/// size unlike the query's take the math path. So for every family, a
/// right-padded training batch (causal, no mask) must show flash-for-CPU
/// calls only, at least one per LLM layer; and a left-padded batch (which
/// keeps the explicit mask) of LLaVA the same kernel, once per layer too.
#[test]
fn every_familys_attention_runs_on_the_cpu_flash_kernel() {
    // The observer is process-global: one test owns it (no other test opens a window).
    let obs = Observer::start().unwrap();
    let dir = tempdir();
    let data = synth_ocr(dir.path(), 2);
    for f in families::all() {
        let m = f.open(Mode::Llm, &TrainConfig::default());
        let samples = prepare_file(&m, &data);
        let batch = f.collate(&samples, &[0, 1]);
        let k = kernels_of(&m, &batch, &obs);
        let layers = llm_layers(&f.json("model/config.json"));
        eprintln!("{}: {k:?} ({layers} LLM layers)", f.name);
        assert!(k.calls >= layers, "{}: {} attention calls for {layers} LLM layers: {k:?}", f.name, k.calls);
        assert_eq!(k, AttentionKernels { calls: k.calls, flash_cpu: k.calls, ..Default::default() }, "{}", f.name);
    }

    // Left padding keeps the mask (SDK decoder::attention_mask): still the CPU flash kernel.
    let f = families::family("llava");
    let m = f.open(Mode::Llm, &TrainConfig::default());
    let samples = f.samples(&m);
    let right = f.collate(&samples, &[0, 1]);
    let mask = Vec::<i64>::try_from(right.attention_mask.sum_dim_intlist(1, false, Kind::Int64)).unwrap();
    let len = right.input_ids.size()[1];
    let roll = |t: &Tensor| Tensor::stack(&(0..2).map(|i| t.get(i).roll([len - mask[i as usize]], [0])).collect::<Vec<_>>(), 0);
    assert!(mask[0] != mask[1], "the two samples should differ in length");
    let left = BatchTensors {
        input_ids: roll(&right.input_ids),
        attention_mask: roll(&right.attention_mask),
        labels: roll(&right.labels),
        tensors: right.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
    };
    let (k_right, k_left) = (kernels_of(&m, &right, &obs), kernels_of(&m, &left, &obs));
    assert_eq!(k_left.calls, k_right.calls, "llava: as many attention calls left-padded as right-padded");
    assert_eq!(k_left, AttentionKernels { calls: k_left.calls, flash_cpu: k_left.calls, ..Default::default() });
}

/// One optimizer step of `vlmhost train` on the LLaVA fixture with a
/// text-only sample (batch 1, no padding, no image: the LLM alone runs),
/// mode llm: LoRA r=16 on q/k/v/o/gate/up/down of every layer. Its
/// `model_flops` in metrics.jsonl must equal the formula of
/// `vlmhost::model::flops` worked out here from config.json's sizes and the
/// token counts the step reports, exactly (integers). Also: the throughput
/// fields in metrics.jsonl and summary.json, no MFU on the CPU without a
/// peak, and MFU with `--peak-tflops`.
#[test]
fn a_training_steps_model_flops_equal_the_count_from_the_config() {
    let fixture = families::family("llava").fixture();
    let dir = tempdir();
    let data = dir.path().join("data.jsonl");
    let line = serde_json::json!({"images": [], "messages": [
        {"role": "user", "content": "Read the page and write what it says, word for word, please."},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog 42 times."}]});
    std::fs::write(&data, format!("{line}\n")).unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "mode: llm\nlora:\n  r: 16\n  lora_dropout: 0.0\ntrain:\n  batch_size: 1\n").unwrap();
    let train = |out: &str, extra: &[&str]| -> (Run, std::path::PathBuf) {
        let out = dir.path().join(out);
        let run: Run = Command::new(vlmhost_bin())
            .args(["train", "--plugin", "llava", "--max-steps", "1", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(fixture.join("model"))
            .arg("--dataset")
            .arg(&data)
            .arg("--output")
            .arg(&out)
            .args(extra)
            .current_dir(dir.path())
            .env_remove("TRAINING_MODE")
            .output()
            .unwrap()
            .into();
        assert!(run.success(), "{}", run.all());
        (run, out)
    };
    let (run, out) = train("run", &[]);
    let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let tokens = line["tokens"].as_i64().unwrap(); // no padding: every row of every linear layer
    let labelled = line["supervised_tokens"].as_i64().unwrap(); // the LM head's rows

    let c = &serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(fixture.join("model/config.json")).unwrap()).unwrap()["text_config"];
    let g = |k: &str| c[k].as_i64().unwrap();
    let (h, i, layers, heads, kv, vocab) = (g("hidden_size"), g("intermediate_size"), g("num_hidden_layers"), g("num_attention_heads"), g("num_key_value_heads"), g("vocab_size"));
    let d = c["head_dim"].as_i64().unwrap_or(h / heads);
    let r = 16;
    // A linear layer in -> out on n rows with LoRA r: forward 2n(in*out + in*r + r*out); backward:
    // the input's gradient (base and A) when the input needs one, B's input and weight gradients and A's weight gradient always.
    let lora_linear = |n: i64, a: i64, b: i64, x_grad: bool| {
        let fwd = 2 * n * (a * b + a * r + r * b);
        let bwd = if x_grad { 2 * n * (a * b + a * r) } else { 0 } + 2 * n * a * r + 2 * (2 * n * r * b);
        fwd + bwd
    };
    let t = tokens;
    let mut want = 0i64;
    for layer in 0..layers {
        // The first layer's q/k/v read the embeddings through a frozen norm: no input gradient.
        let x_grad = layer > 0;
        want += lora_linear(t, h, heads * d, x_grad) + 2 * lora_linear(t, h, kv * d, x_grad);
        want += lora_linear(t, heads * d, h, true);
        want += 2 * lora_linear(t, h, i, true) + lora_linear(t, i, h, true);
        // Causal attention: 2 * heads * t * t * 2d / 2 forward, twice that backward.
        let att = 2 * heads * t * t * 2 * d / 2;
        want += att + 2 * att;
    }
    // The frozen LM head on the labelled rows: forward and the input's gradient.
    want += 2 * (2 * labelled * h * vocab);
    let got = line["model_flops"].as_f64().unwrap();
    assert_eq!(got, want as f64, "model FLOPs of the step ({tokens} tokens, {labelled} labelled): {line}");

    // The throughput fields: step time, tokens/s; on the CPU no TFLOP/s or MFU without a peak.
    assert!(line["step_seconds"].as_f64().is_some_and(|s| s > 0.0), "{line}");
    assert!(line["tokens_per_second"].as_f64().is_some_and(|s| s > 0.0), "{line}");
    assert!(line.get("mfu").is_none() && line.get("achieved_tflops").is_none(), "{line}");
    let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(summary["model_flops"].as_f64(), Some(want as f64), "{summary}");
    assert_eq!(summary["tokens"].as_i64(), Some(tokens), "{summary}");
    assert!(summary["tokens_per_second"].as_f64().is_some_and(|s| s > 0.0), "{summary}");
    let k = &summary["attention_kernels"];
    assert_eq!((k["calls"].as_i64(), k["flash_cpu"].as_i64(), k["math"].as_i64()), (Some(layers), Some(layers), Some(0)), "{summary}");
    assert!(run.stderr.contains("attention kernels: flash_cpu"), "{}", run.all());

    // With a peak: achieved TFLOP/s and MFU = achieved / peak, in metrics, summary and report.
    let (run, out) = train("peak", &["--peak-tflops", "0.5"]);
    let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let achieved = line["model_flops"].as_f64().unwrap() / line["step_seconds"].as_f64().unwrap() / 1e12;
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    assert!(rel(line["achieved_tflops"].as_f64().unwrap(), achieved) < 1e-9, "{line}");
    assert!(rel(line["mfu"].as_f64().unwrap(), achieved / 0.5) < 1e-9, "{line}");
    let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(summary["peak_tflops"].as_f64(), Some(0.5), "{summary}");
    assert!(summary["mfu"].as_f64().is_some_and(|m| m > 0.0), "{summary}");
    let report = vlmhost(&["report", out.to_str().unwrap(), "--output", dir.path().join("report.png").to_str().unwrap()], dir.path(), None);
    assert!(report.success(), "{}", report.all());
    assert!(report.stdout.contains("| MFU |") && report.stdout.contains(&format!("flash_cpu {layers}")), "{}", report.all());

    // A peak that is not a positive number is refused, naming the option.
    let bad = vlmhost(&["train", "--plugin", "llava", "--model", fixture.join("model").to_str().unwrap(), "--dataset", data.to_str().unwrap(), "--peak-tflops", "0"], dir.path(), None);
    assert!(!bad.success() && bad.stderr.contains("peak_tflops"), "{}", bad.all());
}
