//! `vlmhost generate` and `eval --generate`: greedy decoding with the
//! plugins' key/value caches, token for token against transformers'
//! `generate` (LLaVA fixture, `scripts/fixtures/make_llava_generate_fixture.py`),
//! and against decoding without a cache (DeepSeek-OCR, whose reference code
//! needs a transformers too old for this environment).

use crate::common::*;
use crate::families::{self, deepseek_ocr};
use tch::{Kind, Tensor};
use vlmhost::config::{Mode, TrainConfig};
use vlmhost::model::generate::{greedy, prompt_sample, stop_tokens, StopReason};
use vlmhost::model::{collate, HostModel, PreparedSample};
use vlmhost::plugin_api::sample::Sample;

#[derive(serde::Deserialize)]
struct Case {
    index: usize,
    messages: serde_json::Value,
    prompt_ids: Vec<i64>,
    generated_ids: Vec<i64>,
}

#[derive(serde::Deserialize)]
struct Reference {
    max_new_tokens: usize,
    cases: Vec<Case>,
}

#[test]
fn llava_greedy_generation_matches_transformers() {
    let path = workspace_root().join("target/fixtures/llava_generate/generate.json");
    assert!(path.is_file(), "{} is missing: run scripts/fixtures.sh", path.display());
    let reference: Reference = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let llava = families::family("llava");
    let m = llava.open(Mode::Llm, &TrainConfig::default());
    let samples_dir = llava.fixture().join("samples");
    let stop = stop_tokens(m.model_dir());
    assert_eq!(stop, vec![2], "eos from generation_config.json");
    for case in &reference.cases {
        // Image paths in the reference are relative to the samples folder.
        let mut messages = case.messages.clone();
        for msg in messages.as_array_mut().unwrap() {
            for part in msg["content"].as_array_mut().unwrap() {
                if part["type"] == "image" {
                    part["path"] = samples_dir.join(part["path"].as_str().unwrap()).display().to_string().into();
                }
            }
        }
        let sample: Sample = serde_json::from_value(serde_json::json!({"messages": messages})).unwrap();
        let prompt = m.prepare(&serde_json::to_string(&sample).unwrap()).unwrap();
        assert_eq!(prompt.input_ids, case.prompt_ids, "case {}: prompt ids (generation prompt)", case.index);
        let (tokens, stopped) = greedy(&m, &prompt, reference.max_new_tokens, &stop, |_| Ok(())).unwrap();
        assert_eq!(tokens, case.generated_ids, "case {}: generated tokens", case.index);
        let expected = if tokens.last().is_some_and(|t| stop.contains(t)) { StopReason::Eos } else { StopReason::MaxNewTokens };
        assert_eq!(stopped, expected);
        eprintln!("llava generate case {}: {} tokens equal to transformers ({stopped:?})", case.index, tokens.len());
    }
}

/// The prompt followed by `tokens`.
fn extended(p: &PreparedSample, tokens: &[i64]) -> PreparedSample {
    let mut input_ids = p.input_ids.clone();
    input_ids.extend_from_slice(tokens);
    let n = input_ids.len();
    let mut image_token_mask = p.image_token_mask.clone();
    image_token_mask.resize(n, false);
    PreparedSample {
        input_ids,
        labels: vec![-100; n],
        image_token_mask,
        tensors: p.tensors.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect(),
    }
}

/// Greedy decoding without a cache: the full forward over the growing sequence.
fn greedy_uncached(m: &HostModel, prompt: &PreparedSample, n: usize) -> Vec<i64> {
    let _g = tch::no_grad_guard();
    let mut out = Vec::new();
    for _ in 0..n {
        let batch = collate(&[&extended(prompt, &out)], 0, m.device()).unwrap();
        let logits = m.forward(&batch, false).unwrap();
        out.push(logits.get(0).get(-1).argmax(0, false).int64_value(&[]));
    }
    out
}

#[test]
fn deepseek_ocr_cached_decoding_equals_full_forward() {
    let m = deepseek_ocr::family().open(Mode::Llm, &TrainConfig::default());
    let sample = prompt_sample(Some(&deepseek_ocr::reference_dir().join("image.png")), "Free OCR.");
    let prompt = m.prepare(&serde_json::to_string(&sample).unwrap()).unwrap();
    // Logits of every step agree, not just the argmax.
    let (logits, cache) = m.forward_cached(&collate(&[&prompt], 0, m.device()).unwrap(), &[]).unwrap();
    let full = m.forward(&collate(&[&prompt], 0, m.device()).unwrap(), false).unwrap();
    // The cached and the full forward run other attention/GEMM shapes: rounding only (common.rs).
    assert_close("deepseek_ocr cached decoding, first step vs the full forward: logits", &logits, &full, RTOL_ACT, ATOL_FLOOR);
    assert_eq!(cache.len(), 2 * 3, "keys and values of 3 layers");
    let (tokens, _) = greedy(&m, &prompt, 8, &[], |_| Ok(())).unwrap();
    assert_eq!(tokens, greedy_uncached(&m, &prompt, 8), "cached vs full-forward greedy tokens");
    // The last step's logits, cached against full.
    let longer = extended(&prompt, &tokens[..7]);
    let full = m.forward(&collate(&[&longer], 0, m.device()).unwrap(), false).unwrap().get(0).get(-1);
    let mut past = Vec::new();
    let mut batch = collate(&[&prompt], 0, m.device()).unwrap();
    let mut last = Tensor::zeros([1], (Kind::Float, m.device()));
    let mut total = prompt.input_ids.len() as i64;
    for step in 0..8 {
        let (logits, next) = m.forward_cached(&batch, &past).unwrap();
        past = next;
        last = logits.get(0).get(-1);
        if step == 7 {
            break;
        }
        total += 1;
        batch.input_ids = Tensor::from_slice(&[tokens[step]]).view([1, 1]);
        batch.attention_mask = Tensor::ones([1, total], (Kind::Int64, m.device()));
        batch.labels = Tensor::from_slice(&[-100i64]).view([1, 1]);
        batch.tensors.clear();
    }
    let d = assert_close("deepseek_ocr cached decoding, step 8 vs the full forward: logits", &last, &full, RTOL_ACT, ATOL_FLOOR).max_abs;
    eprintln!("deepseek_ocr cached decoding: 8 greedy tokens equal; step-8 logits max |diff| {d:.2e}");
}

#[test]
fn generate_cli_streams_and_refuses_a_missing_image() {
    let fixture = families::family("llava").fixture();
    let image = fixture.join("samples/img0_rgb_40x30.png");
    let cwd = workspace_root();
    let run = vlmhost(&[
        "generate", "--plugin", &member_plugin("vlmhost_plugin_llava").display().to_string(),
        "--model", &fixture.join("model").display().to_string(),
        "--image", &image.display().to_string(),
        "--prompt", "What is in this picture?", "--max-new-tokens", "5", "--json",
    ], &cwd, None);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5, "{}", run.all());
    // DeepSeek-OCR reads images: a prompt without one is refused, clearly.
    let ds = deepseek_ocr::family().fixture().join("model");
    let run = vlmhost(&[
        "generate", "--plugin", &member_plugin("vlmhost_plugin_deepseek_ocr").display().to_string(),
        "--model", &ds.display().to_string(), "--processor", "base_size=256", "--processor", "image_size=128",
        "--prompt", "Free OCR.",
    ], &cwd, None);
    assert!(!run.success());
    assert!(run.stderr.contains("DeepSeek-OCR reads an image, and this prompt has none"), "{}", run.all());
    assert!(run.stderr.contains("--image FILE"), "{}", run.all());
}

#[test]
fn eval_generate_reports_ocr_metrics() {
    let fixture = families::family("llava").fixture();
    let run = vlmhost(&[
        "eval", "--plugin", &member_plugin("vlmhost_plugin_llava").display().to_string(),
        "--model", &fixture.join("model").display().to_string(),
        "--dataset", &fixture.join("samples/data.jsonl").display().to_string(),
        "--generate", "--max-new-tokens", "4", "--json",
    ], &workspace_root(), None);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let generated = v["generated"].as_array().unwrap();
    assert_eq!(generated.len(), v["samples"].as_array().unwrap().len());
    // A random model reads nothing right: every answer differs, and the
    // corpus CER is the summed edit distances over the summed lengths.
    let (errors, chars): (u64, u64) = generated.iter().fold((0, 0), |(e, c), s| {
        (e + s["char_errors"].as_u64().unwrap(), c + s["chars"].as_u64().unwrap())
    });
    // Integer counts divided once in f64 on both sides: equal but for the last bit.
    assert!((v["cer"].as_f64().unwrap() - errors as f64 / chars as f64).abs() < 1e-12);
    assert_eq!(v["exact_match"].as_f64().unwrap(), 0.0);
    assert!(generated.iter().all(|s| s["new_tokens"].as_u64().unwrap() <= 4));
}

/// Every run leaves loss and learning-rate plots; `vlmhost report` puts runs
/// side by side (Markdown and one PNG); `vlmhost compare` runs a recipe over
/// families and reports parameters per role, losses, CER and peak memory.
#[test]
fn runs_leave_plots_and_reports_compare_them() {
    let dir = tempdir();
    let fixture = families::family("llava").fixture();
    let plugin = member_plugin("vlmhost_plugin_llava").display().to_string();
    let data = fixture.join("samples/data.jsonl").display().to_string();
    let cwd = workspace_root();
    let mut runs = Vec::new();
    for (name, steps) in [("a", "3"), ("b", "5")] {
        let out = dir.path().join(name);
        let run = vlmhost(&[
            "train", "--config", "config/examples/demo.yaml", "--plugin", &plugin, "--dataset", &data,
            "--max-steps", steps, "--output", &out.display().to_string(),
        ], &cwd, None);
        assert!(run.success(), "{}", run.all());
        for png in ["loss.png", "lr.png"] {
            let img = image::open(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
            assert!(img.width() > 100 && img.height() > 100);
        }
        let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert!(summary["peak_rss_mib"].as_f64().unwrap() > 10.0, "{}", run.stdout);
        runs.push(out.display().to_string());
    }
    let png = dir.path().join("report.png");
    let run = vlmhost(&["report", &runs[0], &runs[1], "--output", &png.display().to_string()], &cwd, None);
    assert!(run.success(), "{}", run.all());
    let lines: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("| a ") || l.starts_with("| b ")).collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert!(lines[0].contains("| 3 |") && lines[1].contains("| 5 |"), "{}", run.stdout);
    assert!(png.is_file());

    let out = dir.path().join("compare");
    let run = vlmhost(&[
        "compare", "--plugins", "deepseek_ocr,llava", "--dataset", &data, "--val-dataset", &data,
        "--config", "config/examples/compare.yaml", "--max-steps", "2", "--max-new-tokens", "2",
        "--output", &out.display().to_string(),
    ], &cwd, None);
    assert!(run.success(), "{}", run.all());
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let families = report["families"].as_array().unwrap();
    assert_eq!(families.len(), 2);
    for f in families {
        assert!(f["roles"]["llm"]["trainable"].as_i64().unwrap() > 0, "{f}");
        assert!(f["run"]["eval"]["cer"].as_f64().is_some(), "{f}");
        assert!(f["peak_rss_mib"].as_f64().unwrap() > 10.0, "{f}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| deepseek_ocr |") && md.contains("| llava |"), "{md}");
    assert!(out.join("loss.png").is_file());
}
