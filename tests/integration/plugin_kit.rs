//! The plugin authors' kit (docs/plugin-guide.md): `templates/plugin-template`
//! builds on its own, outside this workspace, as a third party would build
//! it, and the unchanged `vlmhost` binary loads the result and runs every
//! command on it: plugins, init, inspect, train, generate. Its processor,
//! through the built library, renders chat templates as transformers does
//! (fixture `templates/plugin-template/fixtures/make_toy_vlm_template_fixture.py`).
//!
//! The copy's path dependencies point back into this workspace and it gets
//! the workspace's Cargo.lock (so it builds the same crate versions); its
//! build goes to `target/plugin-kit`, so runs after the first are incremental.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use vlmhost::config::{Mode, TrainConfig};
use vlmhost::model::{HostModel, OpenOptions};

/// Copy `from` into `to`, leaving out build output and the lock file.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "target" || name == "Cargo.lock" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// The template, copied to `dir` with its dependencies on the workspace made
/// absolute and the workspace's Cargo.lock beside it.
fn copy_template(dir: &Path) -> PathBuf {
    let root = workspace_root();
    let copy = dir.join("vlmhost-plugin-toy");
    copy_tree(&root.join("templates/plugin-template"), &copy);
    let manifest = copy.join("Cargo.toml");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    for krate in ["plugin-api", "chat-template", "imaging", "build-support"] {
        let relative = format!("path = \"../../{krate}\"");
        assert!(text.contains(&relative), "the template's Cargo.toml has no {relative}");
        text = text.replace(&relative, &format!("path = {:?}", root.join(krate).display().to_string()));
    }
    std::fs::write(&manifest, text).unwrap();
    std::fs::copy(root.join("Cargo.lock"), copy.join("Cargo.lock")).unwrap();
    copy
}

/// `cargo build` the copy (outside the workspace, from its own folder) into
/// `target/plugin-kit`; returns the plugin library.
fn build(copy: &Path) -> PathBuf {
    let root = workspace_root();
    let target = root.join("target/plugin-kit");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The workspace's .cargo/config.toml is not read from outside it: name
    // libtorch as a third party would.
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from).unwrap_or_else(|| root.join(".libtorch"));
    let started = std::time::Instant::now();
    let out = Command::new(cargo)
        .args(["build", "--manifest-path"])
        .arg(copy.join("Cargo.toml"))
        .current_dir(copy)
        .env("CARGO_TARGET_DIR", &target)
        .env("LIBTORCH", &libtorch)
        .output()
        .expect("cannot run cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "building the plugin template failed:\n{stderr}");
    assert!(!stderr.contains("`vlmhost-plugin-toy` (lib) generated"), "the plugin template builds with warnings:\n{stderr}");
    eprintln!("plugin kit: template built in {:.1} s", started.elapsed().as_secs_f64());
    let lib = target.join("debug/libvlmhost_plugin_toy.so");
    assert!(lib.is_file(), "{} was not built", lib.display());
    lib
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", run.all()))
}

#[test]
fn plugin_template_builds_outside_the_workspace_and_runs_in_vlmhost() {
    let tmp = tempdir();
    let copy = copy_template(tmp.path());
    assert!(!copy.starts_with(workspace_root()), "the copy must be outside the workspace");
    let lib = build(&copy);
    let so = lib.display().to_string();
    let cwd = tmp.path();
    let path = |name: &str| tmp.path().join(name).display().to_string();

    // The library loads: family, versions.
    let run = vlmhost(&["plugins", "--plugin", &so, "--json"], cwd, None);
    assert!(run.success(), "{}", run.all());
    let v = json(&run);
    let ours: Vec<&serde_json::Value> =
        v["plugins"].as_array().unwrap().iter().filter(|p| p["path"].as_str() == Some(so.as_str())).collect();
    assert_eq!(ours.len(), 1, "{}", run.all());
    assert_eq!(ours[0]["families"][0]["name"], "toy_vlm");
    assert_eq!(ours[0]["families"][0]["model_types"][0], "toy_vlm");

    // A new checkpoint from the plugin's preset.
    let (model, data, runs) = (path("model"), path("data"), path("run"));
    let run = vlmhost(&["init", "--plugin", &so, "--preset", "tiny", "--output", &model], cwd, None);
    assert!(run.success(), "{}", run.all());
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "model.safetensors"] {
        assert!(Path::new(&model).join(file).is_file(), "init wrote no {file}\n{}", run.all());
    }
    check_chat_templates(&so, Path::new(&model));

    // The three roles, and the rules applied to them.
    let run = vlmhost(&["inspect", "--plugin", &so, "--model", &model, "--mode", "both", "--json"], cwd, None);
    assert!(run.success(), "{}", run.all());
    let v = json(&run);
    assert_eq!(v["has_vision_encoder"], true);
    for role in ["vision", "projector", "llm"] {
        assert!(v["roles"][role]["parameters"].as_i64().unwrap() > 0, "role {role}\n{}", run.all());
    }
    let vision_lora: Vec<&str> =
        v["roles"]["vision"]["lora_modules"].as_array().unwrap().iter().filter_map(|m| m.as_str()).collect();
    assert!(vision_lora.contains(&"vision_model.encoder.layers.0.self_attn.q_proj"), "{vision_lora:?}");
    assert!(!vision_lora.iter().any(|m| m.contains("patch_embedding")), "LoRA on the patch embedding: {vision_lora:?}");
    let text = vlmhost(&["inspect", "--plugin", &so, "--model", &model], cwd, None);
    assert!(text.success(), "{}", text.all());
    for role in ["vision", "projector", "llm"] {
        assert!(text.stdout.lines().any(|l| l.starts_with(role)), "inspect shows no {role} row\n{}", text.all());
    }

    // Processor options: unknown keys are refused with the known ones.
    let run = vlmhost(&["inspect", "--plugin", &so, "--model", &model, "--processor", "size=64"], cwd, None);
    assert!(!run.success());
    assert!(run.stderr.contains("unknown option(s) size") && run.stderr.contains("resample"), "{}", run.all());

    // Training on synthetic OCR data.
    let run = vlmhost(&["data", "synth-ocr", "--count", "8", "--output", &data], cwd, None);
    assert!(run.success(), "{}", run.all());
    let dataset = Path::new(&data).join("data.jsonl").display().to_string();
    let run = vlmhost(
        &["train", "--plugin", &so, "--model", &model, "--dataset", &dataset, "--max-steps", "3", "--output", &runs],
        cwd,
        None,
    );
    assert!(run.success(), "{}", run.all());
    let summary = json(&run);
    assert_eq!(summary["steps"], 3, "{}", run.all());
    let loss = summary["last_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "last loss {loss}\n{}", run.all());
    for file in ["adapter_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"] {
        assert!(Path::new(&runs).join("adapter").join(file).is_file(), "the adapter folder has no {file}\n{}", run.all());
    }

    // Activation checkpointing: the template's layers and blocks are segments; the same run
    // recomputing them in backward (with LoRA dropout, so the masks must be replayed) has the
    // same losses.
    let checkpointed = path("run-checkpointed");
    let run = vlmhost(
        &["train", "--plugin", &so, "--model", &model, "--dataset", &dataset, "--max-steps", "3", "--gradient-checkpointing", "--output", &checkpointed],
        cwd,
        None,
    );
    assert!(run.success(), "{}", run.all());
    let step_losses = |dir: &str| -> Vec<f64> {
        std::fs::read_to_string(Path::new(dir).join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
    };
    let (plain, recomputed) = (step_losses(&runs), step_losses(&checkpointed));
    assert_eq!(plain.len(), 3);
    for (p, c) in plain.iter().zip(&recomputed) {
        // The same computation to the bit (docs/plugin-guide.md, "Segments and activation checkpointing").
        assert!((p - c).abs() <= 1e-6 * p.abs(), "losses without checkpointing {plain:?}, with {recomputed:?}");
    }

    // Mixed precision: bf16 base weights, fp32 trainables, bf16 autocast.
    let bf16_run = path("run-bf16");
    let run = vlmhost(
        &["train", "--plugin", &so, "--model", &model, "--dataset", &dataset, "--max-steps", "2", "--precision", "bf16", "--output", &bf16_run],
        cwd,
        None,
    );
    assert!(run.success(), "{}", run.all());
    let bf16_loss = json(&run)["last_loss"].as_f64().unwrap();
    assert!(bf16_loss.is_finite() && bf16_loss > 0.0, "bf16: last loss {bf16_loss}\n{}", run.all());

    // Greedy decoding with the plugin's cache.
    let image = Path::new(&data).join("images/00000.png").display().to_string();
    let run = vlmhost(
        &[
            "generate", "--plugin", &so, "--model", &model, "--image", &image, "--prompt", "Free OCR.",
            "--max-new-tokens", "3", "--json",
        ],
        cwd,
        None,
    );
    assert!(run.success(), "{}", run.all());
    let v = json(&run);
    let tokens = v["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 3, "{}", run.all());
    // bos + 16 image tokens + "Free OCR." + "\n"
    assert_eq!(v["prompt_tokens"], 1 + 16 + 9 + 1, "{}", run.all());
    eprintln!("plugin kit: toy_vlm trained 3 steps (last loss {loss:.4}), generated {}", v["tokens"]);
}

/// The template's processor, through the built library, against transformers
/// (`target/fixtures/toy_vlm_template`): the ids and labels of every sample
/// under the family's own template (the one `init` wrote into `model`), a
/// custom one with generation blocks and its own system prompt, and one
/// without generation blocks (prefix rule), both given as the user's
/// `chat_template`; a raising template fails with its message and file.
fn check_chat_templates(so: &str, model: &Path) {
    let fixture = workspace_root().join("target/fixtures/toy_vlm_template");
    let read = |path: PathBuf| std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/fixtures.sh)", path.display()));
    let reference: serde_json::Value = serde_json::from_str(&read(fixture.join("reference.json"))).unwrap();
    let samples_dir = fixture.join("samples");
    let samples: Vec<String> = read(samples_dir.join("data.jsonl"))
        .lines()
        .map(|l| serde_json::to_string(&vlmhost::plugin_api::sample::parse_line(l, &samples_dir).unwrap()).unwrap())
        .collect();
    let open = |template: Option<PathBuf>| -> HostModel {
        let mut processor = serde_json::Map::new();
        if let Some(file) = template {
            processor.insert("chat_template".into(), file.display().to_string().into());
        }
        let opts = OpenOptions {
            plugin: so.to_string(),
            model_dir: model.to_path_buf(),
            mode: Mode::Llm,
            kind: tch::Kind::Float,
            device: tch::Device::Cpu,
            allow_missing: false,
            load_weights: false,
            processor,
        };
        vlmhost::model::open(&opts, &TrainConfig::default()).unwrap_or_else(|e| panic!("{e:#}"))
    };
    let i64s = |v: &serde_json::Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    let templates = reference["templates"].as_object().unwrap();
    assert_eq!(templates.len(), 3, "real, custom, prefix");
    for (name, t) in templates {
        let file = fixture.join(t["file"].as_str().unwrap());
        // The family's own template is what `init` wrote: the checkpoint's, no override.
        let m = if name == "real" {
            assert_eq!(read(model.join("chat_template.jinja")), read(file), "init wrote another template");
            open(None)
        } else {
            open(Some(file))
        };
        for s in t["samples"].as_array().unwrap() {
            let index = s["index"].as_u64().unwrap() as usize;
            let p = m.prepare(&samples[index]).unwrap_or_else(|e| panic!("{name} sample {index}: {e}"));
            assert_eq!(p.input_ids, i64s(&s["input_ids"]), "{name} ({}) sample {index}: ids", t["rule"]);
            assert_eq!(p.labels, i64s(&s["labels"]), "{name} ({}) sample {index}: labels", t["rule"]);
        }
    }
    let raises = &reference["raises"];
    let m = open(Some(fixture.join(raises["file"].as_str().unwrap())));
    let Err(err) = m.prepare(&samples[raises["sample"].as_u64().unwrap() as usize]) else {
        panic!("the raising template rendered");
    };
    let err = err.to_string();
    let said = raises["message"].as_str().unwrap();
    assert!(err.contains(said) && err.contains("raises.jinja"), "{err}\n(transformers: {said})");
}
