//! The bad-input corpus (issue #15), kept as tests: what a careless or
//! hostile user tried, each with the clear error (or warning) it must get
//! instead of data loss, a crash, a ruined run or a silent success. Every
//! input is made here from the small fixtures, in a temporary folder (the
//! fixtures themselves are never an output).

use crate::common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The LLaVA fixture (`target/fixtures/llava`).
fn fixture() -> std::path::PathBuf {
    crate::families::family("llava").fixture()
}

/// Run `vlmhost ARGS` in `cwd` with `env`, where a crash is what is tested.
fn vlmhost_may_crash(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(vlmhost_bin());
    cmd.args(args).current_dir(cwd).env_remove("VLMHOST_PLUGIN_PATH").env_remove("TRAINING_MODE").env_remove("VLMHOST_FAULT");
    cmd.envs(env.iter().copied());
    cmd.output().expect("cannot run vlmhost").into()
}

/// A copy of the tiny LLaVA checkpoint and its PEFT adapter in `dir`.
fn llava_copy(dir: &Path) -> (PathBuf, PathBuf) {
    let (model, adapter) = (dir.join("model"), dir.join("run").join("adapter"));
    for (from, to) in [(fixture().join("model"), &model), (fixture().join("peft_adapter"), &adapter)] {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    (model, adapter)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The bytes of every file in `dir`, by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

fn failed(run: &Run, needles: &[&str]) {
    assert_eq!(run.code, 1, "{}", run.all());
    for n in needles {
        assert!(run.stderr.contains(n), "{n:?} not in\n{}", run.all());
    }
}

// 1. merge --force never destroys its inputs.

#[test]
fn merge_refuses_an_output_that_overlaps_the_model_or_the_adapter() {
    let dir = tempdir();
    let (model, adapter) = llava_copy(dir.path());
    let (before_model, before_adapter) = (snapshot(&model), snapshot(&adapter));
    let run_dir = adapter.parent().unwrap().to_path_buf();
    for (output, input) in [
        (model.clone(), &model),
        (dir.path().to_path_buf(), &model),
        (run_dir.clone(), &adapter),
        (adapter.clone(), &adapter),
        (model.join("merged"), &model),
    ] {
        let r = vlmhost_env(
            &["merge", "--plugin", "llava", "--model", &s(&model), "--adapter", &s(&adapter), "--output", &s(&output), "--force"],
            dir.path(),
            &[],
        );
        failed(&r, &[&format!("--output {} overlaps", output.display()), &s(input), "--force never replaces an input"]);
        assert_eq!(snapshot(&model), before_model, "--output {}: the model changed", output.display());
        assert_eq!(snapshot(&adapter), before_adapter, "--output {}: the adapter changed", output.display());
    }
    let file = dir.path().join("file.txt");
    fs::write(&file, "x").unwrap();
    let r = vlmhost_env(&["merge", "--plugin", "llava", "--model", &s(&model), "--adapter", &s(&adapter), "--output", &s(&file)], dir.path(), &[]);
    failed(&r, &["file.txt is a file; the output is a folder"]);
    // A correct merge still works, written whole.
    let out = dir.path().join("merged");
    let r = vlmhost_env(&["merge", "--plugin", "llava", "--model", &s(&model), "--adapter", &s(&adapter), "--output", &s(&out)], dir.path(), &[]);
    assert!(r.success(), "{}", r.all());
    assert!(out.join("model-00001-of-00001.safetensors").is_file() && !dir.path().join("merged.partial").exists());
}

// 2. Exact resume of a mixture-of-experts model.

/// The trainable tensors of a checkpoint or the adapter, by name.
fn tensors_of(path: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    read_tensors(path)
}

fn losses(run: &Path) -> Vec<(u64, Option<f64>)> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64())
        })
        .collect()
}

/// DeepSeek-OCR's tiny preset (routed experts, two per token): 6 steps in
/// one go equal 3 steps, then a resume from the step-3 checkpoint, bit for
/// bit (losses, trainable tensors, the adapter). Before the fix, experts no
/// token reached in step 4 were skipped by AdamW after the resume but not in
/// the uninterrupted run.
#[test]
fn moe_resume_is_bit_exact() {
    let dir = tempdir();
    let cwd = dir.path();
    let plugin = s(&member_plugin("vlmhost_plugin_deepseek_ocr"));
    for args in [
        vec!["init", "--plugin", plugin.as_str(), "--preset", "tiny", "--output", "model"],
        vec!["data", "synth-ocr", "--count", "8", "--output", "data"],
    ] {
        let r = vlmhost(&args, cwd, None);
        assert!(r.success(), "{}", r.all());
    }
    fs::write(cwd.join("c.yaml"), "optimizer:\n  lr: 2.0e-2\ntrain:\n  batch_size: 2\n  save_every: 3\n  keep_last: 5\n").unwrap();
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec!["train", "--plugin", plugin.as_str(), "--model", "model", "--dataset", "data/data.jsonl"];
        args.extend(["--config", "c.yaml", "--max-steps", "6", "--output", out]);
        args.extend_from_slice(extra);
        let r = vlmhost(&args, cwd, None);
        assert!(r.success(), "{}", r.all());
    };
    train("whole", &[]);
    train("resumed", &["--resume", "whole/checkpoints/step-00000003"]);
    let (whole, resumed) = (cwd.join("whole"), cwd.join("resumed"));
    assert_eq!(losses(&resumed), losses(&whole)[3..], "the resumed losses differ");
    for file in ["checkpoints/step-00000006/trainable.safetensors", "checkpoints/step-00000006/optimizer.safetensors", "adapter/adapter_model.safetensors"] {
        let (a, b) = (tensors_of(&whole.join(file)), tensors_of(&resumed.join(file)));
        assert_eq!(a.len(), b.len(), "{file}");
        let experts = a.keys().filter(|k| k.contains(".experts.")).count();
        assert!(experts > 0, "{file}: no expert tensors: the test must cover routed experts");
        let mut differ: Vec<(f64, &String)> = a.iter().map(|(k, t)| (max_abs_diff(t, &b[k]), k)).filter(|(d, _)| *d != 0.0).collect();
        differ.sort_by(|x, y| y.0.total_cmp(&x.0));
        assert!(differ.is_empty(), "{file}: {} tensors differ, the largest: {:?}", differ.len(), &differ[..differ.len().min(3)]);
    }
}

// 3. A plugin library cut short is an error, never SIGBUS.

#[test]
fn a_truncated_plugin_library_is_an_error_and_a_warning_beside_others() {
    let dir = tempdir();
    let bytes = fs::read(member_plugin("vlmhost_test_minimal")).unwrap();
    let folder = dir.path().join("plugins-extra");
    fs::create_dir(&folder).unwrap();
    for n in [20_000, bytes.len() / 2] {
        let cut = folder.join("libcut.so");
        fs::write(&cut, &bytes[..n]).unwrap();
        let r = vlmhost(&["plugins", "--plugin", &s(&cut)], dir.path(), None);
        failed(&r, &["libcut.so: not a loadable shared library: the file is cut short"]);
        // In a plugin folder it is a warning for the commands that do not need it.
        let r = vlmhost(&["plugins"], dir.path(), Some(&s(&folder)));
        assert!(r.success() && r.stderr.contains("cut short"), "{}", r.all());
        let model = s(&fixture().join("model"));
        let r = vlmhost(&["inspect", "--plugin", "llava", "--model", &model], dir.path(), Some(&s(&folder)));
        assert!(r.success() && r.stderr.contains("libcut.so") && r.stderr.contains("cut short"), "{}", r.all());
        let r = vlmhost(&["doctor"], dir.path(), Some(&s(&folder)));
        assert_eq!(r.code, 1, "doctor calls it a problem\n{}", r.all());
        assert!(r.stdout.contains("cut short"), "{}", r.all());
    }
}

// 4. Config sizes: refused by key, quickly.

fn llava_with_config(dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let (model, _) = llava_copy(dir);
    let path = model.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    model
}

#[test]
fn absurd_or_negative_config_sizes_are_refused_by_key() {
    for (key, value, want) in [
        ("num_hidden_layers", 1_000_000, "text_config.num_hidden_layers: 1000000 is more than the sanity limit 4096 layers"),
        ("hidden_size", -64, "text_config.hidden_size: must be positive, got -64"),
    ] {
        let dir = tempdir();
        let model = llava_with_config(dir.path(), |c| c["text_config"][key] = value.into());
        let start = std::time::Instant::now();
        let r = vlmhost_env(&["inspect", "--plugin", "llava", "--model", &s(&model)], dir.path(), &[]);
        failed(&r, &[want]);
        assert!(!r.stderr.contains("shape mismatch"), "{}", r.all());
        assert!(start.elapsed().as_secs() < 30, "took {:?}", start.elapsed());
    }
}

// 5. Settings that ruin a run.

#[test]
fn settings_that_ruin_a_run_are_refused_before_it_starts() {
    let dir = tempdir();
    let (model, data) = (s(&fixture().join("model")), s(&fixture().join("samples/data.jsonl")));
    for (yaml, want) in [
        ("optimizer:\n  lr: .nan\n", "optimizer.lr is NaN"),
        ("optimizer:\n  betas: [2.0, 3.0]\n", "optimizer.betas[0] is 2.0"),
        ("train:\n  val_size: 1.5\n", "train.val_size is 1.5"),
        ("train:\n  epochs: 0\n", "train.epochs is 0.0"),
    ] {
        let cfg = dir.path().join("c.yaml");
        fs::write(&cfg, yaml).unwrap();
        let out = dir.path().join("run");
        let r = vlmhost_env(&["train", "--plugin", "llava", "--model", &model, "--dataset", &data, "--config", &s(&cfg), "--output", &s(&out)], dir.path(), &[]);
        failed(&r, &["c.yaml", want, "must be"]);
        assert!(!out.exists(), "a refused run left {}", out.display());
    }
    let out = dir.path().join("run");
    let r = vlmhost_env(&["train", "--plugin", "llava", "--model", &model, "--dataset", &data, "--max-steps", "0", "--output", &s(&out)], dir.path(), &[]);
    failed(&r, &["--max-steps: train.max_steps is 0"]);
}

// 6. A kill while the final adapter is written leaves no half adapter.

#[test]
fn a_crash_while_writing_the_adapter_leaves_none_and_resume_completes_it() {
    let dir = tempdir();
    let (model, data) = (s(&fixture().join("model")), s(&fixture().join("samples/data.jsonl")));
    let out = dir.path().join("run");
    let args = ["train", "--plugin", "llava", "--model", &model, "--dataset", &data, "--max-steps", "2", "--output", &s(&out)];
    let crashed = vlmhost_may_crash(&args, dir.path(), &[("VLMHOST_FAULT", "abort-in-adapter:0")]);
    assert_ne!(crashed.code, 0, "{}", crashed.all());
    assert!(out.join("adapter.partial/adapter_model.safetensors").is_file(), "the crash happened mid-write\n{}", crashed.all());
    assert!(!out.join("adapter").exists(), "a half-written adapter was left");
    assert!(!out.join("summary.json").exists());
    let resumed = vlmhost_env(&[&args[..], &["--resume"]].concat(), dir.path(), &[]);
    assert!(resumed.success(), "{}", resumed.all());
    for f in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "summary.json"] {
        assert!(out.join(f).is_file(), "{f} missing after the resume");
    }
    assert!(!out.join("adapter.partial").exists());
}

// 7 and 8. Data: decompression bombs, bytes that are not UTF-8, typed parts,
// and a file with no usable sample.

/// A PNG whose header declares `width` x `height` (and no pixel data).
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let body = [kind, data].concat();
        [&(data.len() as u32).to_be_bytes()[..], &body, &crc32fast::hash(&body).to_be_bytes()].concat()
    };
    let ihdr = [&width.to_be_bytes()[..], &height.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
    [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &ihdr), &chunk(b"IDAT", &[]), &chunk(b"IEND", &[])].concat()
}

fn data_check(dir: &Path, lines: &[&[u8]], extra: &[&str]) -> Run {
    fs::copy(fixture().join("samples/img0_rgb_40x30.png"), dir.join("img.png")).unwrap();
    fs::write(dir.join("bomb.png"), png_header(14_000, 14_000)).unwrap();
    let mut data = Vec::new();
    for l in lines {
        data.extend_from_slice(l);
        data.push(b'\n');
    }
    fs::write(dir.join("data.jsonl"), data).unwrap();
    let model = s(&fixture().join("model"));
    let file = s(&dir.join("data.jsonl"));
    let mut args = vec!["data", "check", "--plugin", "llava", "--model", model.as_str(), "--dataset", file.as_str()];
    args.extend_from_slice(extra);
    vlmhost_env(&args, dir, &[])
}

const GOOD: &[u8] = br#"{"images": ["img.png"], "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A square."}]}"#;

#[test]
fn bad_data_is_named_by_line_with_its_reason() {
    let dir = tempdir();
    let lines: [&[u8]; 6] = [
        GOOD,
        br#"{"images": ["bomb.png"], "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A."}]}"#,
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}, {\"role\": \"assistant\", \"content\": \"A.\"}]}",
        br#"{"messages": [{"role": "user", "content": [{"type": "text", "txt": "What?"}]}, {"role": "assistant", "content": "A."}]}"#,
        br#"{"images": ["img.png"], "messages": [{"role": "user", "content": [{"type": "image", "path": "img.png"}, {"type": "text", "text": "What?"}]}, {"role": "assistant", "content": "A."}]}"#,
        GOOD,
    ];
    let r = data_check(dir.path(), &lines, &["--json"]);
    assert!(r.success(), "{}", r.all());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let problems: Vec<(String, i64, String)> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["kind"].as_str().unwrap().to_owned(), p["origin"]["line"].as_i64().unwrap(), p["message"].as_str().unwrap().to_owned()))
        .collect();
    let kinds: Vec<(&str, i64)> = problems.iter().map(|(k, l, _)| (k.as_str(), *l)).collect();
    assert_eq!(kinds, [("image_too_large", 2), ("invalid_line", 3), ("invalid_line", 4), ("image_count", 5)], "{problems:#?}");
    assert!(problems[0].2.contains("14000 x 14000 = 196000000 pixels, more than the limit of 178956970"), "{}", problems[0].2);
    assert!(problems[1].2.contains("not UTF-8: byte 47 of the line"), "{}", problems[1].2);
    assert!(problems[2].2.contains("a text part without a \"text\" string"), "{}", problems[2].2);
    assert!(problems[3].2.contains("1 of the 1 image(s) in \"images\" are used by no <image> placeholder"), "{}", problems[3].2);
    // The limit is a setting.
    let cfg = dir.path().join("c.yaml");
    fs::write(&cfg, "train:\n  max_image_pixels: 1000\n").unwrap();
    let r = data_check(dir.path(), &[GOOD], &["--config", &s(&cfg)]);
    failed(&r, &["img.png is 40 x 30 = 1200 pixels, more than the limit of 1000", "no usable sample: fix the problems above"]);
}

#[test]
fn a_file_with_no_usable_sample_says_why() {
    let dir = tempdir();
    let bomb: &[u8] = br#"{"images": ["bomb.png"], "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A."}]}"#;
    let r = data_check(dir.path(), &[bomb, b"{not json"], &[]);
    failed(&r, &["data.jsonl:1 (sample 0): ", "bomb.png is 14000 x 14000", "data.jsonl:2 (sample 1): not valid JSON", "no usable sample"]);
}

// 8. Resume, inspect and OS errors: say what, where and what to do.

#[test]
fn resuming_from_a_missing_or_partial_checkpoint_names_it_and_writes_nothing() {
    let dir = tempdir();
    let (model, data) = (s(&fixture().join("model")), s(&fixture().join("samples/data.jsonl")));
    let out = dir.path().join("run");
    let partial = out.join("checkpoints/step-00000004.partial");
    fs::create_dir_all(&partial).unwrap();
    for (resume, want) in [
        (dir.path().join("nothing"), "not a checkpoint folder (no such folder)"),
        (partial.clone(), "a checkpoint a crash left half-written"),
    ] {
        let r = vlmhost_env(&["train", "--plugin", "llava", "--model", &model, "--dataset", &data, "--output", &s(&out), "--resume", &s(&resume)], dir.path(), &[]);
        failed(&r, &[&format!("--resume {}", resume.display()), want, "has no complete checkpoint"]);
        assert!(!out.join("config.yaml").exists(), "a refused resume wrote config.yaml");
    }
}

#[test]
fn inspect_checks_the_bytes_and_dtypes_of_the_weights() {
    let dir = tempdir();
    let (model, _) = llava_copy(dir.path());
    let weights = model.join("model.safetensors");
    let whole = fs::read(&weights).unwrap();
    fs::write(&weights, &whole[..whole.len() / 2]).unwrap();
    let r = vlmhost_env(&["inspect", "--plugin", "llava", "--model", &s(&model)], dir.path(), &[]);
    failed(&r, &["model.safetensors: not a valid safetensors file", "the file is cut short"]);
    let mut tensors = read_tensors(&fixture().join("model/model.safetensors"));
    let key = "multi_modal_projector.linear_1.weight";
    let int = tensors[key].to_kind(tch::Kind::Int);
    tensors.insert(key.to_owned(), int);
    let named: Vec<(String, tch::Tensor)> = tensors.into_iter().collect();
    tch::Tensor::write_safetensors(&named, &weights).unwrap();
    let r = vlmhost_env(&["inspect", "--plugin", "llava", "--model", &s(&model)], dir.path(), &[]);
    failed(&r, &[&format!("tensor {key} has dtype \"I32\", which cannot be a parameter")]);
}

#[test]
fn an_os_error_is_said_once() {
    let dir = tempdir();
    let model = s(&fixture().join("model"));
    let r = vlmhost_env(&["inspect", "--plugin", "llava", "--model", &model, "--config", "missing.yaml"], dir.path(), &[]);
    failed(&r, &["missing.yaml: No such file or directory"]);
    assert_eq!(r.stderr.matches("No such file or directory").count(), 1, "{}", r.all());
}
