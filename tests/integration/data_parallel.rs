//! Data-parallel `vlmhost train` on the CPU (Gloo over 127.0.0.1) with the
//! tiny LLaVA fixture: 2 ranks x batch 1 train as 1 process x batch 2, a
//! world of 1 through torchrun as a plain run, a killed rank stops the other
//! with a clear error and `--resume` continues exactly, and ranks with
//! different configurations are refused, naming the key.
//!
//! Ranks are started by `.venv/bin/torchrun --no-python` (as users do) or,
//! where a test must kill one rank and watch the other, directly with the
//! variables torchrun sets (torchrun itself would stop the survivor).
//!
//! Tolerance of the 2 x 1 vs 1 x 2 comparison, all fp32: 1e-6 relative on
//! the losses, 1e-6 absolute on the trainable tensors. The two runs compute
//! the same sums in another order (one padded batch of 2, one matmul over
//! both samples, against two batches of 1 whose gradients Gloo adds), so
//! each fp32 result is off by a few ulps: a loss near 6.7 has an ulp of
//! 4.8e-7, hence a relative bound (measured: 6.5e-7 absolute, 1e-7 relative).
//! The tensors (values below 0.5) differ by rounding times the learning rate;
//! measured 6e-8. AdamW's `eps` is 1e-3 here: with the default 1e-8 Adam
//! divides a gradient by its own magnitude, so an element whose gradient is at
//! rounding level (LoRA's A while B is still near zero) moves by a full step
//! in one run and not in the other (measured 1.1e-5 on 3 elements of 32
//! tensors). The comparison is of the summed gradients, not of that noise.

use crate::common::*;
use crate::train::{config, losses, run, train_cmd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Per-rank batch 1 (a plain run of batch 2 is the reference), no random layers.
const DP: &str = "lora:\n  lora_dropout: 0.0\noptimizer:\n  lr: 5.0e-3\n  eps: 1.0e-3\ntrain:\n  batch_size: BATCH\n  grad_accum: 1\n  warmup_steps: 1\n  save_every: 2\n  keep_last: 2\n";

fn dp_config(dir: &Path, name: &str, batch: usize, extra: &str) -> String {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    config(&sub, &format!("{}{extra}", DP.replace("BATCH", &batch.to_string())))
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn torchrun() -> PathBuf {
    let t = workspace_root().join(".venv/bin/torchrun");
    assert!(t.is_file(), "{} is missing: scripts/setup.sh installs torch (with torchrun) in .venv", t.display());
    t
}

/// `vlmhost train ...` under `torchrun --no-python` with `n` ranks on this machine.
fn torchrun_cmd(dir: &Path, n: usize, cfg: &str, out: &Path, extra: &[&str]) -> Command {
    let train = train_cmd(dir, cfg, out, extra);
    let mut cmd = Command::new(torchrun());
    cmd.args(["--no-python", "--nnodes", "1", "--nproc-per-node", &n.to_string(), "--master-addr", "127.0.0.1", "--master-port", &free_port().to_string()])
        .arg(train.get_program())
        .args(train.get_args())
        .args(["--device", "cpu"])
        .current_dir(dir)
        .env_remove("TRAINING_MODE")
        .env_remove("VLMHOST_FAULT")
        .env("VLMHOST_DIST_TIMEOUT", "60")
        .env("OMP_NUM_THREADS", "1");
    cmd
}

/// Rank `rank` of `world`, started as torchrun would start it.
fn rank_cmd(dir: &Path, cfg: &str, out: &Path, rank: usize, world: usize, port: u16, extra: &[&str]) -> Command {
    let mut cmd = train_cmd(dir, cfg, out, extra);
    cmd.args(["--device", "cpu"])
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("VLMHOST_DIST_TIMEOUT", "60")
        .env("OMP_NUM_THREADS", "1");
    cmd
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Wait for `child` at most `limit`, killing it past that.
fn finish(mut child: Child, limit: Duration) -> Run {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let r: Run = child.wait_with_output().unwrap().into();
            panic!("a rank still ran after {limit:?} (a hang)\n{}", r.all());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let r: Run = child.wait_with_output().unwrap().into();
    assert!(!r.stderr.contains("panicked at"), "{}", r.all());
    r
}

/// Both ranks of a manual launch to their end.
fn run_ranks(dir: &Path, cfgs: [&str; 2], out: &Path, extra: &[&str]) -> [Run; 2] {
    let port = free_port();
    let children = [0, 1].map(|r| spawn(rank_cmd(dir, cfgs[r], out, r, 2, port, extra)));
    children.map(|c| finish(c, Duration::from_secs(300)))
}

/// The trainable tensors of a run's last checkpoint.
fn final_tensors(out: &Path, step: usize) -> std::collections::HashMap<String, tch::Tensor> {
    read_tensors(&out.join(format!("checkpoints/step-{step:08}/trainable.safetensors")))
}

/// The largest difference of two runs' losses (relative) and final tensors (absolute).
fn max_difference(a: &Path, b: &Path, steps: usize) -> (f64, f64) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), steps, "{la:?}");
    assert_eq!(la.iter().map(|l| l.0).collect::<Vec<_>>(), lb.iter().map(|l| l.0).collect::<Vec<_>>());
    let dl = la.iter().zip(&lb).map(|(x, y)| (x.1.unwrap() - y.1.unwrap()).abs() / x.1.unwrap().abs()).fold(0.0, f64::max);
    let (ta, tb) = (final_tensors(a, steps), final_tensors(b, steps));
    assert_eq!(ta.len(), tb.len());
    assert!(!ta.is_empty());
    let dt = ta.iter().map(|(k, t)| max_abs_diff(t, &tb[k])).fold(0.0, f64::max);
    (dl, dt)
}

#[test]
fn two_ranks_of_batch_one_train_as_one_process_of_batch_two_and_a_world_of_one_as_a_plain_run() {
    let dir = tempdir();
    let d = dir.path();
    let steps = 5; // 6 samples, global batch 2: past an epoch's end
    let plain = d.join("plain");
    let r = run(train_cmd(d, &dp_config(d, "b2", 2, ""), &plain, &["--max-steps", "5", "--device", "cpu"]));
    assert!(r.success(), "{}", r.all());

    let two = d.join("two-ranks");
    let r = run(torchrun_cmd(d, 2, &dp_config(d, "b1", 1, ""), &two, &["--max-steps", "5"]));
    assert!(r.success(), "{}", r.all());
    assert!(r.stderr.contains("data parallel: 2 ranks x batch 1 = global batch 2"), "{}", r.all());
    let (dl, dt) = max_difference(&plain, &two, steps);
    eprintln!("2 ranks x batch 1 vs 1 x batch 2: max relative loss difference {dl:.3e}, max |tensor difference| {dt:.3e}");
    assert!(dl <= 1e-6 && dt <= 1e-6, "losses differ by {dl:e} (relative), tensors by {dt:e}");
    // Rank 0 alone wrote the run folder: one metrics line a step, one summary on stdout.
    assert_eq!(r.stdout.matches("\"steps\"").count(), 1, "{}", r.stdout);
    assert!(two.join("summary.json").is_file() && two.join("config.yaml").is_file());

    let one = d.join("world-of-one");
    let r = run(torchrun_cmd(d, 1, &dp_config(d, "b2", 2, ""), &one, &["--max-steps", "5"]));
    assert!(r.success(), "{}", r.all());
    let (dl, dt) = max_difference(&plain, &one, steps);
    assert_eq!((dl, dt), (0.0, 0.0), "a world of 1 differs from a plain run");
}

#[test]
fn a_killed_rank_stops_the_other_with_a_clear_error_and_resume_continues_exactly() {
    let dir = tempdir();
    let d = dir.path();
    let cfg = dp_config(d, "b1", 1, "");
    let reference = d.join("reference");
    let [r0, r1] = run_ranks(d, [&cfg, &cfg], &reference, &["--max-steps", "8"]);
    assert!(r0.success() && r1.success(), "{}\n{}", r0.all(), r1.all());
    let expected = losses(&reference);

    let out = d.join("killed");
    let port = free_port();
    let rank0 = spawn(rank_cmd(d, &cfg, &out, 0, 2, port, &["--max-steps", "8"]));
    let mut rank1 = spawn(rank_cmd(d, &cfg, &out, 1, 2, port, &["--max-steps", "8"]));
    // Kill rank 1 once past the second checkpoint (step 4).
    let deadline = Instant::now() + Duration::from_secs(180);
    while !out.join("metrics.jsonl").is_file() || losses(&out).len() < 5 {
        assert!(Instant::now() < deadline, "the run made no progress");
        assert!(rank1.try_wait().unwrap().is_none(), "rank 1 ended before it was killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    rank1.kill().unwrap(); // SIGKILL
    rank1.wait().unwrap();
    let killed_at = Instant::now();
    let survivor = finish(rank0, Duration::from_secs(90));
    eprintln!("rank 0 stopped {:.1} s after rank 1 was killed", killed_at.elapsed().as_secs_f64());
    assert_eq!(survivor.code, 1, "{}", survivor.all());
    assert!(survivor.stderr.contains("rank 0 of 2") && survivor.stderr.contains("Another rank stopped"), "{}", survivor.all());
    assert!(survivor.stderr.contains("--resume"), "{}", survivor.all());

    let [r0, r1] = run_ranks(d, [&cfg, &cfg], &out, &["--max-steps", "8", "--resume"]);
    assert!(r0.success() && r1.success(), "{}\n{}", r0.all(), r1.all());
    assert!(r0.stderr.contains("resumed from"), "{}", r0.all());
    assert_eq!(losses(&out), expected, "the resumed loss curve differs");
    let (want, got) = (final_tensors(&reference, 8), final_tensors(&out, 8));
    for (k, t) in &want {
        assert!(t.equal(&got[k]), "{k} differs after the resume");
    }
}

#[test]
fn ranks_with_different_configurations_are_refused_naming_the_key() {
    let dir = tempdir();
    let d = dir.path();
    let a = dp_config(d, "a", 1, "");
    std::fs::create_dir_all(d.join("b")).unwrap();
    let b = config(&d.join("b"), &DP.replace("BATCH", "1").replace("lr: 5.0e-3", "lr: 1.0e-3"));
    let out = d.join("run");
    let [r0, r1] = run_ranks(d, [&a, &b], &out, &["--max-steps", "2"]);
    for (r, rank) in [(&r0, 0), (&r1, 1)] {
        assert_eq!(r.code, 1, "rank {rank}\n{}", r.all());
        assert!(r.stderr.contains("config.optimizer.lr is 0.005 on rank 0 but 0.001 on rank 1"), "rank {rank}\n{}", r.all());
    }
    assert!(!out.join("metrics.jsonl").exists(), "a refused run trained");
}
