//! `vlmhost init` for every family: a tiny checkpoint that `inspect` reads,
//! that trains a few steps on synthetic OCR data with a finite loss, and that
//! `generate` decodes from; and the refusals (a non-empty folder without
//! `--force`, an unknown preset).

use crate::common::*;
use std::path::Path;

/// Every family whose plugin implements `init`, by plugin library.
const FAMILIES: [(&str, &str); 4] = [
    ("deepseek_ocr", "vlmhost_plugin_deepseek_ocr"),
    ("llava", "vlmhost_plugin_llava"),
    ("qwen2_vl", "vlmhost_plugin_qwen2_vl"),
    ("fuyu", "vlmhost_plugin_fuyu"),
];

fn plugin(family: &str) -> String {
    let lib = FAMILIES.iter().find(|(f, _)| *f == family).unwrap().1;
    member_plugin(lib).display().to_string()
}

fn run_ok(args: &[&str], cwd: &Path) -> Run {
    let run = vlmhost(args, cwd, None);
    assert!(run.success(), "vlmhost {}\n{}", args.join(" "), run.all());
    run
}

/// init --preset tiny, inspect, train 3 steps on synthetic OCR data, generate 3 tokens.
fn tiny_checkpoint_trains_and_generates(family: &str) {
    let dir = tempdir();
    let cwd = dir.path();
    let plugin = plugin(family);
    let run = run_ok(&["init", "--plugin", &plugin, "--preset", "tiny", "--output", "model"], cwd);
    eprintln!("{family}: {}", run.stdout.trim());
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(cwd.join("model").join(file).is_file(), "{family}: init wrote no {file}\n{}", run.all());
    }
    assert!(!cwd.join("model.partial").exists(), "{family}: the partial folder is left behind");

    let run = run_ok(&["inspect", "--plugin", &plugin, "--model", "model", "--json"], cwd);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["family"], family, "{v:#}");
    assert!(v["roles"]["llm"]["parameters"].as_i64().unwrap() > 0, "{v:#}");

    run_ok(&["data", "synth-ocr", "--count", "8", "--output", "data"], cwd);
    let run = run_ok(
        &["train", "--plugin", &plugin, "--model", "model", "--dataset", "data/data.jsonl", "--output", "run", "--max-steps", "3"],
        cwd,
    );
    let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{family}: {e}\n{}", run.all()));
    assert_eq!(summary["steps"], 3, "{summary:#}");
    let loss = summary["last_loss"].as_f64().unwrap_or(f64::NAN);
    assert!(loss.is_finite() && loss > 0.0, "{family}: last loss {loss}\n{summary:#}");
    eprintln!("{family}: 3 steps, loss {} -> {loss}", summary["first_loss"]);

    let image = cwd.join("data/images/00000.png");
    assert!(image.is_file(), "synth-ocr wrote no {}", image.display());
    let image = image.display().to_string();
    let run = run_ok(
        &["generate", "--plugin", &plugin, "--model", "model", "--image", &image, "--prompt", "Free OCR.", "--max-new-tokens", "3", "--json"],
        cwd,
    );
    let g: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{family}: {e}\n{}", run.all()));
    let tokens = g["tokens"].as_array().unwrap_or_else(|| panic!("{family}: no tokens: {g:#}"));
    match g["stopped"].as_str() {
        Some("max_new_tokens") => assert_eq!(tokens.len(), 3, "{family}: {g:#}"),
        Some("eos") => assert!(!tokens.is_empty() && tokens.len() <= 3, "{family}: {g:#}"),
        other => panic!("{family}: stopped {other:?}: {g:#}"),
    }
}

#[test]
fn init_tiny_deepseek_ocr_trains_and_generates() {
    tiny_checkpoint_trains_and_generates("deepseek_ocr");
}

#[test]
fn init_tiny_llava_trains_and_generates() {
    tiny_checkpoint_trains_and_generates("llava");
}

#[test]
fn init_tiny_qwen2_vl_trains_and_generates() {
    tiny_checkpoint_trains_and_generates("qwen2_vl");
}

#[test]
fn init_tiny_fuyu_trains_and_generates() {
    tiny_checkpoint_trains_and_generates("fuyu");
}

#[test]
fn init_refuses_a_non_empty_folder_and_an_unknown_preset() {
    let dir = tempdir();
    let cwd = dir.path();
    std::fs::create_dir(cwd.join("taken")).unwrap();
    std::fs::write(cwd.join("taken/notes.txt"), "keep me").unwrap();
    for (family, _) in FAMILIES {
        let plugin = plugin(family);
        let run = vlmhost(&["init", "--plugin", &plugin, "--preset", "tiny", "--output", "taken"], cwd, None);
        assert!(!run.success(), "{family}: init into a non-empty folder succeeded\n{}", run.all());
        assert!(run.stderr.contains("--force"), "{family}: the refusal does not name --force\n{}", run.all());
        assert_eq!(std::fs::read_to_string(cwd.join("taken/notes.txt")).unwrap(), "keep me", "{family}");

        let run = vlmhost(&["init", "--plugin", &plugin, "--preset", "huge", "--output", "new"], cwd, None);
        assert!(!run.success(), "{family}: preset huge was accepted\n{}", run.all());
        for word in ["huge", "tiny", "small"] {
            assert!(run.stderr.contains(word), "{family}: the refusal does not name {word:?}\n{}", run.all());
        }
        assert!(!cwd.join("new").exists(), "{family}: a failed init left {}", cwd.join("new").display());
    }
}
