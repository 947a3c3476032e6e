//! Writing files so that nothing is lost: output folders never overlap an
//! input and are published whole, files are replaced atomically, and the
//! crash tests can abort a write half-way ([`fault_point`]).
//!
//! This module is a leaf: it knows no model, plugin or run.
//!
//! A command that writes a folder (`merge`, `init`, the adapter a run leaves)
//! writes it as `<output>.partial` and renames it into place when complete
//! ([`publish_dir`]), so a crash leaves the old folder or none, never half of
//! one. Before anything is written, [`check_output`] refuses an output that is
//! a file, or that is, contains or lies inside one of the command's inputs:
//! `--force` replaces an output, it never deletes what is being read.

use anyhow::{bail, Context, Result};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// `path` made absolute with symbolic links resolved, also when it (or its
/// tail) does not exist yet: the longest existing prefix is canonicalised.
pub fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut tail = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            return tail.iter().rev().fold(c, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_owned());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// Whether one of the two paths is, or lies inside, the other.
pub fn overlap(a: &Path, b: &Path) -> bool {
    let (a, b) = (resolved(a), resolved(b));
    a.starts_with(&b) || b.starts_with(&a)
}

/// Refuse an output folder (`--output`) that is a file, that overlaps an
/// input (`(flag, path)` pairs, both named in the error), or that holds files
/// when `force` is not given.
pub fn check_output(output: &Path, inputs: &[(&str, &Path)], force: bool) -> Result<()> {
    if output.exists() && !output.is_dir() {
        bail!("--output {} is a file; the output is a folder: choose a folder path", output.display());
    }
    for (flag, input) in inputs {
        if overlap(output, input) {
            bail!(
                "--output {} overlaps {flag} {}: writing one would destroy the other; choose an --output outside {} \
                 (--force never replaces an input)",
                output.display(),
                input.display(),
                input.display()
            );
        }
    }
    let non_empty = output.is_dir() && std::fs::read_dir(output).map(|mut d| d.next().is_some()).unwrap_or(true);
    if non_empty && !force {
        bail!("{} exists and is not empty; choose another --output or pass --force to replace it", output.display());
    }
    Ok(())
}

/// `<path><suffix>` beside `path` (`model` -> `model.partial`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or(path.as_os_str()).to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// The folder a complete `output` is written in first: `<output>.partial`.
pub fn partial_dir(output: &Path) -> PathBuf {
    sibling(output, ".partial")
}

/// A fresh, empty `<output>.partial` (one a crash left is removed).
pub fn fresh_partial(output: &Path) -> Result<PathBuf> {
    let partial = partial_dir(output);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    Ok(partial)
}

/// Move the complete folder `partial` to `output`, replacing an old one:
/// the old folder is first renamed aside, so at every moment `output` is
/// either the old folder, absent, or the new one.
pub fn publish_dir(partial: &Path, output: &Path) -> Result<()> {
    fsync(partial);
    let old = sibling(output, ".old");
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    if output.exists() {
        std::fs::rename(output, &old).with_context(|| format!("cannot move {} aside", output.display()))?;
    }
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::rename(partial, output).with_context(|| format!("cannot move {} to {}", partial.display(), output.display()))?;
    fsync(output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")));
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

/// Flush a folder's entries to disk (best effort: not every file system can).
pub fn fsync(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Write `data` to `path` atomically (temporary file, fsync, rename, fsync the
/// folder). The file gets ordinary permissions (0666 less the umask, as
/// `File::create` gives), not the temporary file's private 0600.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = temp_file_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    fsync(dir);
    Ok(())
}

#[cfg(unix)]
fn temp_file_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(0o666)).tempfile_in(dir)
}

#[cfg(not(unix))]
fn temp_file_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::NamedTempFile::new_in(dir)
}

/// Whether fault `name:step` is injected (`VLMHOST_FAULT`, comma-separated;
/// for the crash and NaN tests only).
pub fn fault(name: &str, step: usize) -> bool {
    std::env::var("VLMHOST_FAULT").is_ok_and(|spec| spec.split(',').any(|f| f.trim() == format!("{name}:{step}")))
}

/// `VLMHOST_FAULT=abort-in-checkpoint:STEP` aborts the process half-way
/// through writing checkpoint STEP (`abort-in-adapter:0`: the final adapter).
pub fn fault_point(site: &str, step: usize) {
    if fault(&format!("abort-in-{site}"), step) {
        eprintln!("VLMHOST_FAULT: aborting in {site} {step}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_containment_either_way_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        assert!(overlap(&model, &model));
        assert!(overlap(dir.path(), &model), "a parent folder of an input");
        assert!(overlap(&model.join("merged"), &model), "a folder inside an input, not created yet");
        assert!(overlap(&model.join("a/../."), &model));
        assert!(!overlap(&dir.path().join("model2"), &model), "a common prefix is not containment");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        assert!(overlap(&link, &model));
    }

    #[test]
    fn outputs_are_checked_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let err = check_output(dir.path(), &[("--model", &model)], true).unwrap_err().to_string();
        assert!(err.contains(&format!("overlaps --model {}", model.display())), "{err}");
        let err = check_output(&model.join("config.json"), &[], true).unwrap_err().to_string();
        assert!(err.contains("is a file"), "{err}");
        let err = check_output(&model, &[], false).unwrap_err().to_string();
        assert!(err.contains("pass --force"), "{err}");
        check_output(&dir.path().join("out"), &[("--model", &model)], false).unwrap();
    }

    #[test]
    fn publishing_replaces_the_old_folder_whole() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("old"), "1").unwrap();
        let partial = fresh_partial(&out).unwrap();
        assert_eq!(partial, dir.path().join("adapter.partial"));
        std::fs::write(partial.join("new"), "2").unwrap();
        publish_dir(&partial, &out).unwrap();
        assert!(out.join("new").is_file() && !out.join("old").exists());
        assert!(!partial.exists() && !dir.path().join("adapter.old").exists());
    }

    #[cfg(unix)]
    #[test]
    fn atomic_files_get_ordinary_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"{}").unwrap();
        let created = dir.path().join("b.json");
        std::fs::File::create(&created).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // Whatever the umask, the same as a file `File::create` makes (0644 under the usual 022).
        assert_eq!(mode(&path), mode(&created));
    }
}
