//! Helpers: run the binary, find the plugin libraries the workspace built.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `vlmhost` binary under test.
pub fn vlmhost_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vlmhost"))
}

/// `target/<profile>`: where the binary and the workspace's plugins are.
pub fn profile_dir() -> PathBuf {
    vlmhost_bin().parent().unwrap().to_path_buf()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn must_exist(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: build the workspace's plugins first \
         (scripts/test.sh does: cargo build --workspace --examples)",
        path.display()
    );
    path
}

/// A plugin library built as a workspace member (`libNAME.so` next to the binary).
pub fn member_plugin(lib_name: &str) -> PathBuf {
    must_exist(profile_dir().join(format!("lib{lib_name}.so")))
}

/// A deliberately broken plugin built as an example of `vlmhost-test-broken`.
pub fn broken_plugin(example: &str) -> PathBuf {
    must_exist(profile_dir().join("examples").join(format!("lib{example}.so")))
}

/// The outcome of one `vlmhost` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn success(&self) -> bool {
        self.code == 0
    }
    /// stdout and stderr, for assertions and failure messages.
    pub fn all(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Run `vlmhost ARGS` in `cwd` with `$VLMHOST_PLUGIN_PATH` set to `plugin_path`
/// (or unset).
pub fn vlmhost(args: &[&str], cwd: &Path, plugin_path: Option<&str>) -> Run {
    let mut cmd = Command::new(vlmhost_bin());
    cmd.args(args).current_dir(cwd).env_remove("VLMHOST_PLUGIN_PATH").env_remove("TRAINING_MODE");
    if let Some(p) = plugin_path {
        cmd.env("VLMHOST_PLUGIN_PATH", p);
    }
    let run: Run = cmd.output().expect("cannot run vlmhost").into();
    // Whatever the outcome, a crash is never acceptable.
    assert!(run.code >= 0, "vlmhost was killed by a signal\n{}", run.all());
    assert!(!run.stderr.contains("panicked at"), "vlmhost panicked\n{}", run.all());
    run
}

/// Run `vlmhost ARGS` in `cwd` with extra environment variables.
pub fn vlmhost_env(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(vlmhost_bin());
    cmd.args(args).current_dir(cwd).env_remove("VLMHOST_PLUGIN_PATH").env_remove("TRAINING_MODE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let run: Run = cmd.output().expect("cannot run vlmhost").into();
    assert!(run.code >= 0, "vlmhost was killed by a signal\n{}", run.all());
    assert!(!run.stderr.contains("panicked at"), "vlmhost panicked\n{}", run.all());
    run
}

/// A fresh temporary folder.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("cannot create a temporary folder")
}

/// Every sample of the data file `data` (messages or LLaVA JSONL), prepared by `m`.
pub fn prepare_file(m: &vlmhost::model::HostModel, data: &Path) -> Vec<vlmhost::model::PreparedSample> {
    std::fs::read_to_string(data)
        .unwrap_or_else(|e| panic!("{}: {e}", data.display()))
        .lines()
        .map(|line| {
            let sample = vlmhost::plugin_api::sample::parse_line(line, data.parent().unwrap()).unwrap();
            m.prepare(&serde_json::to_string(&sample).unwrap()).unwrap()
        })
        .collect()
}

/// The tensors of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// The largest absolute difference of two tensors of the same shape (0 for empty ones).
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    if a.numel() == 0 {
        return 0.0;
    }
    let d = a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double);
    d.abs().max().double_value(&[])
}

/// An integer tensor's values, flattened.
pub fn ids(t: &tch::Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.reshape([-1])).unwrap()
}
