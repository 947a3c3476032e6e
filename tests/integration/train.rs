//! `vlmhost train` and `vlmhost eval` on the tiny LLaVA fixture: loss parity
//! of eval with transformers, loss falling, exact resume after SIGKILL (also
//! in the middle of a checkpoint write), stage chaining.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

/// The LLaVA fixture (`target/fixtures/llava`).
pub(crate) fn fixture() -> std::path::PathBuf {
    crate::families::family("llava").fixture()
}

pub(crate) fn model() -> String {
    fixture().join("model").display().to_string()
}

pub(crate) fn data() -> String {
    fixture().join("samples/data.jsonl").display().to_string()
}

pub(crate) fn config(dir: &Path, yaml: &str) -> String {
    let p = dir.join("config.yaml");
    std::fs::write(&p, yaml).unwrap();
    p.display().to_string()
}

pub(crate) fn train_cmd(dir: &Path, cfg: &str, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(vlmhost_bin());
    let (m, d) = (model(), data());
    cmd.args(["train", "--plugin", "llava", "--model", &m, "--dataset", &d, "--config", cfg, "--output"])
        .arg(out)
        .args(extra)
        .current_dir(dir)
        .env_remove("TRAINING_MODE")
        .env_remove("VLMHOST_FAULT");
    cmd
}

pub(crate) fn run(mut cmd: Command) -> Run {
    let r: Run = cmd.output().unwrap().into();
    assert!(!r.stderr.contains("panicked at"), "{}", r.all());
    r
}

pub(crate) fn losses(out: &Path) -> Vec<(usize, Option<f64>)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap() as usize, v["loss"].as_f64())
        })
        .collect()
}

#[test]
fn eval_loss_equals_transformers() {
    let dir = tempdir();
    let (m, d) = (model(), data());
    let r = vlmhost_env(&["eval", "--plugin", "llava", "--model", &m, "--dataset", &d, "--json"], dir.path(), &[]);
    assert!(r.success(), "{}", r.all());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let (mut sum, mut count) = (0f64, 0f64);
    for s in v["samples"].as_array().unwrap() {
        let i = s["index"].as_u64().unwrap();
        let reference: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(fixture().join(format!("reference/sample_{i}.safetensors"))).unwrap().into_iter().collect();
        let theirs = reference["loss"].double_value(&[0]);
        let ours = s["loss"].as_f64().unwrap();
        assert_close_f64(&format!("llava eval sample {i}: loss"), ours, theirs, RTOL_LOSS, 0.0);
        let n = s["tokens"].as_f64().unwrap();
        sum += theirs * n;
        count += n;
    }
    let mean = v["loss"].as_f64().unwrap();
    assert_close_f64("llava eval: mean loss", mean, sum / count, RTOL_LOSS, 0.0);
}

const FAST: &str = "optimizer:\n  lr: 1.0e-2\ntrain:\n  schedule: constant\n  batch_size: 2\n";

#[test]
fn training_loss_falls() {
    let dir = tempdir();
    let cfg = config(dir.path(), FAST);
    let out = dir.path().join("run");
    let r = run(train_cmd(dir.path(), &cfg, &out, &["--max-steps", "60"]));
    assert!(r.success(), "{}", r.all());
    let l: Vec<f64> = losses(&out).into_iter().filter_map(|(_, l)| l).collect();
    let first = l[..3].iter().sum::<f64>() / 3.0;
    let last = l[l.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(last < 0.5 * first, "loss did not fall enough: {first:.3} -> {last:.3}");
    // The same recipe in transformers + PEFT (scripts/fixtures/make_llava_train_fixture.py)
    // falls about as much. Data order and LoRA draws differ, so compare the fall, not steps.
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("target/fixtures/llava_train/train_reference.json")).unwrap(),
    )
    .unwrap();
    let (rf, rl) = (reference["first3_mean"].as_f64().unwrap(), reference["last10_mean"].as_f64().unwrap());
    assert!((first - rf).abs() / rf < 0.05, "start differs: {first:.3} vs transformers {rf:.3}");
    assert!(last < 2.0 * rl && rl < 2.0 * last, "vlmhost fell to {last:.3}, transformers + PEFT to {rl:.3}");
    eprintln!("loss {first:.3} -> {last:.3}; transformers + PEFT {rf:.3} -> {rl:.3}");
    // The resolved config is saved, and so is the final checkpoint.
    assert!(out.join("config.yaml").is_file());
    assert!(out.join("checkpoints/step-00000060/trainable.safetensors").is_file());
}

const RESUMABLE: &str = "optimizer:\n  lr: 5.0e-3\ntrain:\n  batch_size: 2\n  grad_accum: 2\n  warmup_steps: 2\n  save_every: 4\n  keep_last: 2\n";

fn reference_run(dir: &Path) -> Vec<(usize, Option<f64>)> {
    let cfg = config(dir, RESUMABLE);
    let out = dir.join("reference");
    let r = run(train_cmd(dir, &cfg, &out, &["--max-steps", "12"]));
    assert!(r.success(), "{}", r.all());
    losses(&out)
}

#[test]
fn resume_after_sigkill_continues_exactly() {
    let dir = tempdir();
    let expected = reference_run(dir.path());
    let cfg = config(dir.path(), RESUMABLE);
    let out = dir.path().join("killed");
    let mut child = train_cmd(dir.path(), &cfg, &out, &["--max-steps", "12"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Kill it once it is past its second checkpoint.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("metrics.jsonl").is_file() || losses(&out).len() < 9 {
        assert!(Instant::now() < deadline, "the run made no progress");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it was killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let again = run(train_cmd(dir.path(), &cfg, &out, &["--max-steps", "12"]));
    assert_eq!(again.code, 1, "an output folder with checkpoints needs --resume\n{}", again.all());
    assert!(again.stderr.contains("pass --resume"), "{}", again.all());
    let resumed = run(train_cmd(dir.path(), &cfg, &out, &["--max-steps", "12", "--resume"]));
    assert!(resumed.success(), "{}", resumed.all());
    assert!(resumed.stderr.contains("resumed from"), "{}", resumed.all());
    assert_eq!(losses(&out), expected, "the resumed loss curve differs");
    // keep_last: 2
    let kept: Vec<String> = std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
}

#[test]
fn a_crash_while_writing_a_checkpoint_leaves_no_half_checkpoint() {
    let dir = tempdir();
    let expected = reference_run(dir.path());
    let cfg = config(dir.path(), RESUMABLE);
    let out = dir.path().join("crashed");
    let mut cmd = train_cmd(dir.path(), &cfg, &out, &["--max-steps", "12"]);
    cmd.env("VLMHOST_FAULT", "abort-in-checkpoint:8");
    let crashed: Run = cmd.output().unwrap().into();
    assert_ne!(crashed.code, 0, "{}", crashed.all());
    let complete = vlmhost::train::list_checkpoints(&out);
    assert_eq!(complete.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [4], "only step 4 is complete");
    assert!(out.join("checkpoints/step-00000008.partial").is_dir(), "the crash happened mid-write");
    let resumed = run(train_cmd(dir.path(), &cfg, &out, &["--max-steps", "12", "--resume"]));
    assert!(resumed.success(), "{}", resumed.all());
    assert!(resumed.stderr.contains("step-00000004 at step 4"), "{}", resumed.all());
    assert_eq!(losses(&out), expected);
    assert!(!out.join("checkpoints/step-00000008.partial").exists());
}

fn eval_loss(dir: &Path, adapter: &Path) -> f64 {
    let (m, d) = (model(), data());
    let a = adapter.display().to_string();
    let r = vlmhost_env(&["eval", "--plugin", "llava", "--model", &m, "--adapter", &a, "--dataset", &d, "--json"], dir, &[]);
    assert!(r.success(), "{}", r.all());
    serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()["loss"].as_f64().unwrap()
}

#[test]
fn stage_two_starts_from_stage_one() {
    let dir = tempdir();
    let stage1 = dir.path().join("stage1");
    let cfg1 = config(dir.path(), FAST);
    let r = run(train_cmd(dir.path(), &cfg1, &stage1, &["--mode", "projector", "--max-steps", "5"]));
    assert!(r.success(), "{}", r.all());
    let ckpt1: PathBuf = stage1.join("checkpoints/step-00000005");
    let loss1 = eval_loss(dir.path(), &ckpt1);

    // Stage 2 with a zero learning rate: the model it starts from is stage 1's.
    let still = dir.path().join("still");
    std::fs::create_dir(&still).unwrap();
    let cfg0 = config(&still, "optimizer:\n  lr: 0.0\n");
    let stage2_frozen = dir.path().join("stage2-lr0");
    let init = ckpt1.display().to_string();
    let r = run(train_cmd(dir.path(), &cfg0, &stage2_frozen, &["--mode", "llm", "--max-steps", "1", "--init-from", &init]));
    assert!(r.success(), "{}", r.all());
    assert!(r.stderr.contains("initialised 4 tensor(s) from"), "{}", r.all());
    let loss2 = eval_loss(dir.path(), &stage2_frozen.join("checkpoints/step-00000001"));
    // The same weights through the same code: equal but for GEMM kernels that depend on a buffer's
    // alignment (a few ulps, ~1e-7 of the loss); a start from other weights is off by far more.
    assert_close_f64("stage 2 starts from stage 1: eval loss", loss2, loss1, 1e-6, 0.0);

    // And stage 2 trains LLM LoRA on top.
    let stage2 = dir.path().join("stage2");
    let r = run(train_cmd(dir.path(), &cfg1, &stage2, &["--mode", "llm", "--max-steps", "5", "--init-from", &init]));
    assert!(r.success(), "{}", r.all());
    let saved: Vec<String> = Tensor::read_safetensors(stage2.join("checkpoints/step-00000005/trainable.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(saved.iter().any(|n| n.starts_with("multi_modal_projector.")), "{saved:?}");
    assert!(saved.iter().any(|n| n.ends_with("self_attn.q_proj.lora_B.weight")), "{saved:?}");
    assert!(eval_loss(dir.path(), &stage2.join("checkpoints/step-00000005")) < loss1);
}

#[test]
fn non_finite_losses_are_skipped_then_stop_the_run() {
    let dir = tempdir();
    let cfg = config(dir.path(), "optimizer:\n  lr: 1.0e-2\ntrain:\n  max_bad_steps: 3\n");
    let out = dir.path().join("one");
    let mut cmd = train_cmd(dir.path(), &cfg, &out, &["--max-steps", "6"]);
    cmd.env("VLMHOST_FAULT", "nan-loss:3");
    let r = run(cmd);
    assert!(r.success(), "{}", r.all());
    assert!(r.stderr.contains("non-finite loss at step 3: step skipped (1 in a row)"), "{}", r.all());
    let l = losses(&out);
    assert_eq!(l.len(), 6);
    assert!(l[2].1.is_none() && l[1].1.is_some() && l[3].1.is_some(), "{l:?}");

    let out = dir.path().join("three");
    let mut cmd = train_cmd(dir.path(), &cfg, &out, &["--max-steps", "6"]);
    cmd.env("VLMHOST_FAULT", "nan-loss:2,nan-loss:3,nan-loss:4");
    let r = run(cmd);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("3 non-finite losses in a row: stopping"), "{}", r.all());
}

#[test]
fn an_adapter_peft_saved_evaluates_as_in_peft() {
    let dir = tempdir();
    let (m, d) = (model(), data());
    let adapter = fixture().join("peft_adapter").display().to_string();
    let r = vlmhost_env(&["eval", "--plugin", "llava", "--model", &m, "--adapter", &adapter, "--dataset", &d, "--json"], dir.path(), &[]);
    assert!(r.success(), "{}", r.all());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    for i in [0u64, 4] {
        let reference: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(fixture().join(format!("reference/lora_sample_{i}.safetensors"))).unwrap().into_iter().collect();
        let theirs = reference["loss"].double_value(&[0]);
        let ours = v["samples"].as_array().unwrap().iter().find(|s| s["index"] == i).unwrap()["loss"].as_f64().unwrap();
        assert_close_f64(&format!("llava PEFT adapter, eval sample {i}: loss"), ours, theirs, RTOL_LOSS, 0.0);
    }

    // Bad adapters: a folder without adapter_config.json, and one made for another model.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = empty.display().to_string();
    let r = vlmhost_env(&["eval", "--plugin", "llava", "--model", &m, "--adapter", &e, "--dataset", &d], dir.path(), &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("neither a vlmhost checkpoint (config.yaml) nor a PEFT adapter (adapter_config.json)"), "{}", r.all());
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(fixture().join("peft_adapter/adapter_config.json"), other.join("adapter_config.json")).unwrap();
    let renamed: Vec<(String, Tensor)> = Tensor::read_safetensors(fixture().join("peft_adapter/adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k.replace("layers.1.", "layers.7."), t))
        .collect();
    vlmhost::model::weights::save_safetensors(&other.join("adapter_model.safetensors"), &renamed, None).unwrap();
    let o = other.display().to_string();
    let r = vlmhost_env(&["eval", "--plugin", "llava", "--model", &m, "--adapter", &o, "--dataset", &d], dir.path(), &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("layers.7.") && r.stderr.contains("another base model"), "{}", r.all());
}

#[test]
fn the_adapter_a_run_leaves_loads_in_peft_with_equal_logits() {
    let dir = tempdir();
    let cfg = config(dir.path(), "optimizer:\n  lr: 1.0e-2\nlora:\n  r: 4\n  lora_alpha: 8\n");
    let out = dir.path().join("run");
    let r = run(train_cmd(dir.path(), &cfg, &out, &["--mode", "llm", "--max-steps", "5"]));
    assert!(r.success(), "{}", r.all());
    let adapter = out.join("adapter");
    assert!(adapter.join("adapter_config.json").is_file() && adapter.join("adapter_model.safetensors").is_file(), "{}", r.all());
    // The tokenizer, processor and chat template travel with it (the script loads them with AutoProcessor).
    for f in ["tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"] {
        assert!(adapter.join(f).is_file(), "the adapter lacks {f}");
    }
    assert!(!adapter.join("config.json").exists() && !adapter.join("model.safetensors").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Ordinary permissions, as `File::create` gives under this umask (not a temporary file's 0600).
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let probe = dir.path().join("probe");
        std::fs::File::create(&probe).unwrap();
        assert_eq!(mode(&adapter.join("adapter_model.safetensors")), mode(&probe));
    }

    // PEFT's side: transformers + PeftModel.from_pretrained on the same inputs.
    let inputs = fixture().join("reference/sample_0.safetensors");
    let theirs = dir.path().join("peft.safetensors");
    let py = workspace_root().join(".venv/bin/python");
    let status = Command::new(&py)
        .arg(workspace_root().join("scripts/check_peft_adapter.py"))
        .args(["--model", &model(), "--adapter"])
        .arg(&adapter)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--output")
        .arg(&theirs)
        .status()
        .expect("run .venv/bin/python (scripts/setup.sh makes it)");
    assert!(status.success());
    let theirs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&theirs).unwrap().into_iter().collect();

    // vlmhost's side: the same adapter, loaded the way `eval --adapter` does.
    let logits = vlmhost_logits(&adapter);
    assert_close("trained adapter, vlmhost vs PEFT: logits", &logits, &theirs["logits"], RTOL_ACT, ATOL_FLOOR);
    // The adapter really moved the model: not the base logits (a lower bound, far above rounding).
    let base: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&inputs).unwrap().into_iter().collect();
    assert!((&theirs["logits"] - &base["logits"]).abs().max().double_value(&[]) > 1e-3);
}

#[test]
fn training_continues_from_an_adapter_peft_saved() {
    let dir = tempdir();
    let peft = fixture().join("peft_adapter");
    let p = peft.display().to_string();
    let (m, d) = (model(), data());
    let with_peft: serde_json::Value = serde_json::from_str(
        &vlmhost_env(&["eval", "--plugin", "llava", "--model", &m, "--adapter", &p, "--dataset", &d, "--json"], dir.path(), &[]).stdout,
    )
    .unwrap();
    // One step at learning rate 0: the run starts from exactly PEFT's adapter.
    let cfg = config(dir.path(), "optimizer:\n  lr: 0.0\n");
    let out = dir.path().join("run");
    let r = run(train_cmd(dir.path(), &cfg, &out, &["--max-steps", "1", "--init-from", &p]));
    assert!(r.success(), "{}", r.all());
    assert!(r.stderr.contains("initialised from the PEFT adapter"), "{}", r.all());
    let after = eval_loss(dir.path(), &out.join("checkpoints/step-00000001"));
    let before = with_peft["loss"].as_f64().unwrap();
    // The same weights through the same code (lr 0): equal but for alignment-dependent GEMM kernels.
    assert_close_f64("training from a PEFT adapter at lr 0: eval loss", after, before, 1e-6, 0.0);
}

/// Logits of fixture sample 0 computed by transformers from `model_dir`
/// (with PEFT when `adapter` is given).
fn transformers_logits(dir: &Path, model_dir: &Path, adapter: Option<&Path>) -> Tensor {
    let out = dir.join(format!("logits-{}.safetensors", std::process::id()));
    let mut cmd = Command::new(workspace_root().join(".venv/bin/python"));
    cmd.arg(workspace_root().join("scripts/check_peft_adapter.py")).arg("--model").arg(model_dir);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    cmd.arg("--inputs").arg(fixture().join("reference/sample_0.safetensors")).arg("--output").arg(&out);
    assert!(cmd.status().unwrap().success());
    let t: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out).unwrap().into_iter().collect();
    t["logits"].shallow_clone()
}

/// vlmhost's logits of fixture sample 0 with a checkpoint of a run loaded.
fn vlmhost_logits(checkpoint: &Path) -> Tensor {
    let llava = crate::families::family("llava");
    let opts = llava.options(vlmhost::config::Mode::Llm);
    let m = vlmhost::commands::open_model(&opts, &vlmhost::config::TrainConfig::default(), Some(checkpoint)).unwrap();
    let s = llava.samples(&m);
    let batch = vlmhost::model::collate(&[&s[0]], 0, tch::Device::Cpu).unwrap();
    tch::no_grad(|| m.forward(&batch, false)).unwrap()
}

#[test]
fn merged_checkpoints_load_in_transformers_with_equal_logits_even_with_a_trained_vision_tower() {
    let dir = tempdir();
    // Stage 3 with the vision tower trained fully: the case other tools got wrong.
    let cfg = config(dir.path(), "optimizer:\n  lr: 1.0e-2\nroles:\n  vision:\n    strategy: full\n    lr_scale: 1.0\n");
    let out = dir.path().join("run");
    let r = run(train_cmd(dir.path(), &cfg, &out, &["--mode", "both", "--max-steps", "4"]));
    assert!(r.success(), "{}", r.all());
    let ckpt = out.join("checkpoints/step-00000004");
    let merged = dir.path().join("merged");
    let (m, c, o) = (model(), ckpt.display().to_string(), merged.display().to_string());
    let r = vlmhost_env(&["merge", "--plugin", "llava", "--model", &m, "--adapter", &c, "--output", &o], dir.path(), &[]);
    assert!(r.success(), "{}", r.all());
    for f in ["config.json", "tokenizer.json", "processor_config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors"] {
        assert!(merged.join(f).is_file(), "{f} missing from the merged checkpoint");
    }
    #[cfg(unix)]
    {
        // The weights get ordinary permissions, as `File::create` gives under this umask (they were 0600).
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let probe = dir.path().join("probe");
        std::fs::File::create(&probe).unwrap();
        for f in ["model-00001-of-00001.safetensors", "model.safetensors.index.json"] {
            assert_eq!(mode(&merged.join(f)), mode(&probe), "{f}");
        }
    }
    let ours = vlmhost_logits(&ckpt);
    let theirs = transformers_logits(dir.path(), &merged, None);
    let d = assert_close("merged checkpoint, vlmhost vs transformers: logits", &ours, &theirs, RTOL_ACT, ATOL_FLOOR).max_abs;
    // The merge kept the training: not the base logits (a lower bound, far above rounding).
    let base: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture().join("reference/sample_0.safetensors")).unwrap().into_iter().collect();
    assert!((&theirs - &base["logits"]).abs().max().double_value(&[]) > 1e-3, "the merge lost the training");
    // The vision tower itself survived: its weights differ from the base's.
    let merged_w: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(merged.join("model-00001-of-00001.safetensors")).unwrap().into_iter().collect();
    let base_w: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture().join("model/model.safetensors")).unwrap().into_iter().collect();
    let k = "vision_tower.encoder.layers.0.mlp.fc1.weight";
    assert!(!merged_w[k].equal(&base_w[k]), "the trained vision tower was dropped by the merge");
    eprintln!("merged checkpoint in transformers: logits max |diff| {d:.2e}");

    // A merge into a folder that is not empty is refused without --force.
    let r = vlmhost_env(&["merge", "--plugin", "llava", "--model", &m, "--adapter", &c, "--output", &o], dir.path(), &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("exists and is not empty") && r.stderr.contains("--force"), "{}", r.all());
    let r = vlmhost_env(&["merge", "--plugin", "llava", "--model", &m, "--adapter", &c, "--output", &o, "--force"], dir.path(), &[]);
    assert!(r.success(), "{}", r.all());
}

/// A template of the test's own: a system line, LLaVA's turns, the answers in generation blocks.
const OWN_TEMPLATE: &str = "SYSTEM: Be brief.\n\
{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n\
{% else %}{{ p['text'] }}{% endif %}{% endfor %}\n\
{% elif m['role'] == 'assistant' %}ASSISTANT: {% generation %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endgeneration %}\n\
{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}";

#[test]
fn a_chat_template_override_is_what_trains_and_travels_with_the_adapter() {
    let dir = tempdir();
    let template = dir.path().join("own.jinja");
    std::fs::write(&template, OWN_TEMPLATE).unwrap();
    let t = template.display().to_string();
    let (m, d) = (model(), data());

    // The samples as the model sees them: the template's system line, unlabelled; the answers labelled.
    let r = vlmhost_env(&["data", "check", "--plugin", "llava", "--model", &m, "--dataset", &d, "--chat-template", &t, "--show", "1", "--json"], dir.path(), &[]);
    assert!(r.success(), "{}", r.all());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let text = v["shown"][0]["text"].as_str().unwrap();
    assert!(text.contains("SYSTEM: Be brief.\nUSER: <image ×"), "{text}");
    let labelled: Vec<&str> = text.split("[[").skip(1).map(|t| t.split("]]").next().unwrap()).collect();
    assert!(!labelled.is_empty() && labelled.iter().all(|l| !l.contains("SYSTEM") && !l.contains("USER")), "{text}");
    let default = vlmhost_env(&["data", "check", "--plugin", "llava", "--model", &m, "--dataset", &d, "--show", "1", "--json"], dir.path(), &[]);
    let v: serde_json::Value = serde_json::from_str(&default.stdout).unwrap();
    assert!(!v["shown"][0]["text"].as_str().unwrap().contains("SYSTEM: Be brief."), "{}", default.all());

    // Training renders it; the run records it; the adapter and a merge carry it.
    let cfg = config(dir.path(), "lora:\n  r: 4\n");
    let out = dir.path().join("run");
    let r = run(train_cmd(dir.path(), &cfg, &out, &["--mode", "llm", "--max-steps", "2", "--chat-template", &t]));
    assert!(r.success(), "{}", r.all());
    assert!(std::fs::read_to_string(out.join("config.yaml")).unwrap().contains("own.jinja"));
    assert_eq!(std::fs::read_to_string(out.join("adapter/chat_template.jinja")).unwrap(), OWN_TEMPLATE);
    let merged = dir.path().join("merged");
    let (c, o) = (out.join("checkpoints/step-00000002").display().to_string(), merged.display().to_string());
    let r = vlmhost_env(&["merge", "--plugin", "llava", "--model", &m, "--adapter", &c, "--output", &o], dir.path(), &[]);
    assert!(r.success(), "{}", r.all());
    assert_eq!(std::fs::read_to_string(merged.join("chat_template.jinja")).unwrap(), OWN_TEMPLATE);

    // A template that raises names the template, the line and the sample.
    let raising = dir.path().join("raises.jinja");
    std::fs::write(&raising, "{{ raise_exception('no system turns here') }}").unwrap();
    let r = vlmhost_env(&["data", "check", "--plugin", "llava", "--model", &m, "--dataset", &d, "--chat-template", &raising.display().to_string()], dir.path(), &[]);
    assert_eq!(r.code, 1, "no sample is usable: {}", r.all());
    let want = format!("data.jsonl:1 (sample 0): llava processor: chat template {}, line 1 raised an exception: no system turns here", raising.display());
    assert!(r.stderr.contains(&want), "{}", r.all());
}

#[test]
fn gradient_checkpointing_keeps_the_losses() {
    // LoRA with dropout on every role: the recomputation in the backward pass must draw the
    // same dropout masks as the forward (the saved RNG state), or the gradients, and so every
    // later loss, would differ. Each run is its own process: libtorch's generator is per process.
    let dir = tempdir();
    let cfg = config(
        dir.path(),
        "mode: both\noptimizer:\n  lr: 5.0e-3\nlora:\n  lora_dropout: 0.1\n  vision_target_modules: [all-linear]\ntrain:\n  batch_size: 2\n",
    );
    let runs: Vec<Vec<(usize, Option<f64>)>> = [&[][..], &["--gradient-checkpointing"][..]]
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let out = dir.path().join(format!("run{i}"));
            let args: Vec<&str> = ["--max-steps", "4"].iter().chain(extra.iter()).copied().collect();
            let r = run(train_cmd(dir.path(), &cfg, &out, &args));
            assert!(r.success(), "{}", r.all());
            let recorded = std::fs::read_to_string(out.join("config.yaml")).unwrap();
            assert!(recorded.contains(&format!("gradient_checkpointing: {}", i == 1)), "{recorded}");
            losses(&out)
        })
        .collect();
    assert_eq!(runs[0].len(), 4);
    for ((step, plain), (_, checkpointed)) in runs[0].iter().zip(&runs[1]) {
        let (p, c) = (plain.unwrap(), checkpointed.unwrap());
        // The same computation to the bit (families::*::gradient_checkpointing_keeps_gradients).
        assert!((p - c).abs() <= 1e-6 * p.abs(), "step {step}: loss {p} without checkpointing, {c} with");
    }
    eprintln!("losses with and without activation checkpointing: {:?}", runs[1]);
}
