//! The user-facing commands on the LLaVA fixture: `inspect` (the rules, as a
//! user sees them) and `data check` (every kind of bad sample).

use crate::common::*;
use std::fs;
use std::path::Path;

/// The LLaVA fixture (`target/fixtures/llava`).
fn fixture() -> std::path::PathBuf {
    crate::families::family("llava").fixture()
}

fn model_dir() -> String {
    fixture().join("model").display().to_string()
}

fn inspect_json(extra: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let dir = tempdir();
    let model = model_dir();
    let mut args = vec!["inspect", "--plugin", "llava", "--model", model.as_str(), "--json"];
    args.extend_from_slice(extra);
    let run = vlmhost_env(&args, dir.path(), env);
    assert!(run.success(), "{}", run.all());
    serde_json::from_str(&run.stdout).unwrap()
}

#[test]
fn inspect_json_has_the_documented_shape() {
    let v = inspect_json(&[], &[]);
    assert_eq!(v["family"], "llava");
    assert_eq!(v["mode"], "llm");
    for role in ["vision", "projector", "llm"] {
        let r = &v["roles"][role];
        for key in ["parameters", "trainable", "strategy", "lora_modules"] {
            assert!(!r[key].is_null(), "roles.{role}.{key} missing: {v:#}");
        }
    }
    assert_eq!(v["roles"]["vision"]["strategy"], "frozen");
    assert_eq!(v["roles"]["vision"]["trainable"], 0);
    assert_eq!(v["roles"]["projector"]["strategy"], "full");
    assert_eq!(v["roles"]["projector"]["trainable"], v["roles"]["projector"]["parameters"]);
    assert_eq!(v["roles"]["llm"]["strategy"], "lora");
    let lora: Vec<&str> = v["roles"]["llm"]["lora_modules"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert_eq!(lora.len(), 14, "{lora:?}");
    assert!(lora.contains(&"language_model.model.layers.1.mlp.down_proj"));
    assert!(!lora.iter().any(|n| n.ends_with("lm_head")), "the head is not a default target");
    // LoRA A+B for every target: r * (in + out), r = 16 by default.
    let expected: i64 = 16 * (2 * (4 * (64 + 64) - 2 * 32 + 3 * (64 + 96)));
    assert_eq!(v["roles"]["llm"]["trainable"], expected);
    let sum: i64 = ["vision", "projector", "llm"].iter().map(|r| v["roles"][r]["parameters"].as_i64().unwrap()).sum();
    assert_eq!(v["total_parameters"], sum);
}

/// `inspect`'s memory estimate, from the parameter counts it reports: fp32
/// keeps everything in 4 bytes; bf16 halves the frozen weights only, the
/// trainable values (projector fully, LLM LoRA) keep 4 bytes of weight, 4 of
/// gradient and 8 of AdamW moments.
#[test]
fn inspect_estimates_memory_for_the_precision() {
    for (precision, frozen_bytes) in [("fp32", 4), ("bf16", 2)] {
        let v = inspect_json(&["--precision", precision], &[]);
        assert_eq!(v["precision"], precision);
        let mut total = 0;
        for role in ["vision", "projector", "llm"] {
            let r = &v["roles"][role];
            let (params, trainable) = (r["parameters"].as_i64().unwrap(), r["trainable"].as_i64().unwrap());
            // Fully trained roles count their weights once (trainable == parameters); LoRA adds A/B.
            let full = if r["strategy"] == "full" { params } else { 0 };
            let lora = trainable - full;
            let m = &r["memory"];
            assert_eq!(m["weights_bytes"], (params - full) * frozen_bytes + (full + lora) * 4, "{precision} {role}: {m}");
            assert_eq!(m["gradients_bytes"], trainable * 4, "{precision} {role}");
            assert_eq!(m["optimizer_bytes"], trainable * 8, "{precision} {role}");
            total += m["weights_bytes"].as_i64().unwrap() + m["gradients_bytes"].as_i64().unwrap() + m["optimizer_bytes"].as_i64().unwrap();
        }
        let t = &v["memory"];
        assert_eq!(t["weights_bytes"].as_i64().unwrap() + t["gradients_bytes"].as_i64().unwrap() + t["optimizer_bytes"].as_i64().unwrap(), total);
    }
}

#[test]
fn mode_flag_beats_environment_beats_file() {
    let dir = tempdir();
    let cfg = dir.path().join("c.yaml");
    fs::write(&cfg, "mode: vision\n").unwrap();
    let c = cfg.display().to_string();
    assert_eq!(inspect_json(&["--config", &c], &[])["mode"], "vision");
    assert_eq!(inspect_json(&["--config", &c], &[("TRAINING_MODE", "both")])["mode"], "both");
    assert_eq!(inspect_json(&["--config", &c, "--mode", "projector"], &[("TRAINING_MODE", "both")])["mode"], "projector");
    let v = inspect_json(&["--mode", "vision"], &[]);
    assert_eq!(v["roles"]["vision"]["strategy"], "lora");
    assert_eq!(v["roles"]["vision"]["lr_scale"], 0.1);
    assert_eq!(v["roles"]["llm"]["trainable"], 0);
}

#[test]
fn the_users_guide_config_works_on_llava() {
    let dir = tempdir();
    let cfg = dir.path().join("c.yaml");
    // One file for several families: projector names of two, vision names of another.
    fs::write(
        &cfg,
        "lora:\n  projector_target_modules: [\"multi_modal_projector\", \"vision_embed_tokens\"]\n  \
         vision_target_modules: [\"q_proj\", \"v_proj\"]\n  \
         llm_target_modules: [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n",
    )
    .unwrap();
    let v = inspect_json(&["--config", cfg.to_str().unwrap(), "--mode", "both"], &[]);
    let vision: Vec<&str> = v["roles"]["vision"]["lora_modules"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    // q_proj and v_proj of the vision tower only: LLM names never leak into it.
    assert_eq!(vision.len(), 4, "{vision:?}");
    assert!(vision.iter().all(|n| n.starts_with("vision_tower.") && (n.ends_with("q_proj") || n.ends_with("v_proj"))));
}

#[test]
fn a_target_list_matching_nothing_is_explained() {
    let dir = tempdir();
    let cfg = dir.path().join("c.yaml");
    fs::write(&cfg, "lora:\n  llm_target_modules: [\"qkv_proj\", \"dense\"]\n").unwrap();
    let model = model_dir();
    let run = vlmhost_env(&["inspect", "--plugin", "llava", "--model", &model, "--config", cfg.to_str().unwrap()], dir.path(), &[]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr.contains("its linear layers are named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
        "{}",
        run.all()
    );
}

#[test]
fn inspect_text_lists_roles_and_targets() {
    let dir = tempdir();
    let model = model_dir();
    let run = vlmhost_env(&["inspect", "--plugin", "llava", "--model", &model], dir.path(), &[]);
    assert!(run.success(), "{}", run.all());
    for needle in ["ROLE", "vision     frozen", "projector  full", "llm        lora", "language_model.model.layers.*.self_attn.q_proj  x2"] {
        assert!(run.stdout.contains(needle), "{needle:?} missing\n{}", run.all());
    }
}

#[test]
fn a_checkpoint_of_another_family_names_the_right_plugin() {
    let dir = tempdir();
    let copy = dir.path().join("model");
    fs::create_dir(&copy).unwrap();
    for entry in fs::read_dir(fixture().join("model")).unwrap() {
        let e = entry.unwrap();
        fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let cfg = copy.join("config.json");
    let text = fs::read_to_string(&cfg).unwrap().replace("\"model_type\": \"llava\"", "\"model_type\": \"test_minimal\"");
    fs::write(&cfg, text).unwrap();
    let run = vlmhost_env(&["inspect", "--plugin", "llava", "--model", copy.to_str().unwrap()], dir.path(), &[]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("model_type \"test_minimal\" is not served by the llava plugin"), "{}", run.all());
    assert!(run.stderr.contains("use --plugin test_minimal"), "{}", run.all());
}

/// A data set in a temporary folder, with the fixture's images copied in.
fn data_dir(lines: &[&str]) -> tempfile::TempDir {
    let dir = tempdir();
    for entry in fs::read_dir(fixture().join("samples")).unwrap() {
        let e = entry.unwrap();
        if e.path().extension().is_some_and(|x| x == "png") {
            fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    fs::write(dir.path().join("bad.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    fs::write(dir.path().join("data.jsonl"), lines.join("\n") + "\n").unwrap();
    dir
}

fn check(dir: &Path, extra: &[&str]) -> Run {
    let model = model_dir();
    let data = dir.join("data.jsonl").display().to_string();
    let mut args = vec!["data", "check", "--plugin", "llava", "--model", model.as_str(), "--dataset", data.as_str()];
    args.extend_from_slice(extra);
    vlmhost_env(&args, dir, &[])
}

#[test]
fn bad_samples_are_reported_with_file_line_and_index() {
    let good = r#"{"images": ["img0_rgb_40x30.png"], "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A square."}]}"#;
    let lines = [
        good,
        r#"{"images": ["missing.png"], "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A."}]}"#,
        r#"{"images": ["bad.png"], "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A."}]}"#,
        r#"{"images": ["img0_rgb_40x30.png"], "messages": [{"role": "user", "content": "<image><image>Two?"}, {"role": "assistant", "content": "A."}]}"#,
        r#"{"images": [], "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}"#,
        r#"{"messages": "#,
        good,
    ];
    let dir = data_dir(&lines);
    let run = check(dir.path(), &["--json"]);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["total"], 7);
    assert_eq!(v["usable"], 2);
    let problems = v["problems"].as_array().unwrap();
    let kinds: Vec<(&str, i64, i64)> = problems
        .iter()
        .map(|p| (p["kind"].as_str().unwrap(), p["origin"]["line"].as_i64().unwrap(), p["origin"]["index"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("missing_image", 2, 1), ("corrupt_image", 3, 2), ("image_count", 4, 3), ("empty_answer", 5, 4), ("invalid_line", 6, 5)]
    );
    assert!(problems[0]["message"].as_str().unwrap().contains("missing.png"));
    assert!(problems[1]["message"].as_str().unwrap().contains("bad.png"));

    let text = check(dir.path(), &[]);
    assert!(text.stdout.contains("7 sample(s), 2 usable, 5 skipped"), "{}", text.all());
    assert!(text.stdout.contains("data.jsonl:3 (sample 2): "), "{}", text.all());

    let fail = check(dir.path(), &["--on-bad-sample", "fail"]);
    assert_eq!(fail.code, 1, "{}", fail.all());
    assert!(fail.stderr.contains("Refusing to train on a data set with bad samples"), "{}", fail.all());
}

#[test]
fn data_check_shows_samples_as_the_model_sees_them() {
    let lines = [
        r#"{"images": ["img0_rgb_40x30.png"], "messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A square."}]}"#,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]}"#,
    ];
    let dir = data_dir(&lines);
    let run = check(dir.path(), &["--show", "2", "--json"]);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let shown = v["shown"].as_array().unwrap();
    assert_eq!(shown.len(), 2);
    // The views count what training counts.
    let sum = |key: &str| shown.iter().map(|s| s[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("tokens"), v["tokens"].as_u64().unwrap());
    assert_eq!(sum("labelled_tokens"), v["supervised_tokens"].as_u64().unwrap());
    let (first, second) = (&shown[0], &shown[1]);
    assert!(first["image_tokens"].as_u64().unwrap() > 0 && second["image_tokens"] == 0, "{first} {second}");
    // One collapsed run of image tokens; the answer (and only answers) between [[ and ]].
    let text = first["text"].as_str().unwrap();
    let n = first["image_tokens"].as_u64().unwrap();
    assert!(text.contains(&format!("<image ×{n}>")), "{text}");
    let labelled: Vec<&str> = text.split("[[").skip(1).map(|t| t.split("]]").next().unwrap()).collect();
    assert_eq!(labelled.len(), 1, "{text}");
    assert!(labelled[0].contains("A square."), "{text}");
    assert!(!labelled[0].contains("What?"), "{text}");
    assert!(second["text"].as_str().unwrap().contains("Yo."), "{second}");

    let plain = check(dir.path(), &["--show", "1"]);
    assert!(plain.success(), "{}", plain.all());
    assert!(plain.stdout.contains("data.jsonl:1 (sample 0): ") && plain.stdout.contains(&format!("<image ×{n}>")), "{}", plain.all());
    assert!(!plain.stdout.contains("(sample 1)"), "{}", plain.all());
}

#[test]
fn long_samples_are_truncated_outside_images_or_skipped() {
    let long_answer = "word ".repeat(40);
    let long = format!(
        r#"{{"images": ["img0_rgb_40x30.png"], "messages": [{{"role": "user", "content": "<image>What?"}}, {{"role": "assistant", "content": "{long_answer}"}}]}}"#
    );
    let short = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]}"#;
    let dir = data_dir(&[&long, short]);
    let json = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let r = check(dir.path(), &args);
        assert!(r.success(), "{}", r.all());
        serde_json::from_str(&r.stdout).unwrap()
    };
    let v = json(&["--max-length", "40"]);
    assert_eq!((v["usable"].as_i64(), v["truncated"].as_i64()), (Some(2), Some(1)));
    // 20 tokens would cut into the 25 image tokens: skipped, not mangled.
    let v = json(&["--max-length", "20"]);
    assert_eq!((v["usable"].as_i64(), v["truncated"].as_i64()), (Some(1), Some(0)));
    assert_eq!(v["problems"][0]["kind"], "too_long");
    assert!(v["problems"][0]["message"].as_str().unwrap().contains("would cut into image tokens"), "{v:#}");
    // Policy skip: dropped and counted even where truncating would be safe.
    let v = json(&["--max-length", "40", "--too-long", "skip"]);
    assert_eq!((v["usable"].as_i64(), v["truncated"].as_i64()), (Some(1), Some(0)));
    assert_eq!(v["problems"][0]["origin"]["index"], 0);
    // Nothing usable at all is an error, not an empty run.
    let lonely = data_dir(&[&long]);
    let r = check(lonely.path(), &["--max-length", "40", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["tokens"], 40, "truncated to exactly max_length");
    let r = check(lonely.path(), &["--max-length", "20"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("no usable sample"), "{}", r.all());
}
