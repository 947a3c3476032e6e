//! Data sets: every sample of a file checked before training starts, with a
//! summary, so a bad line is found in seconds, not at step 40 000.
//!
//! A file is JSONL (one sample per line; `.jsonl`) or a JSON array (LLaVA's
//! `.json`). Each sample is parsed ([`parse_line`]) and prepared by the
//! family's plugin; problems (missing or corrupt image, placeholder/image
//! count mismatch, empty answer, too long) are reported with file, line and
//! sample index. Policy `skip` drops bad samples (counting them and listing
//! the first offenders); `fail` stops at the summary.

use crate::model::HostModel;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use vlmhost_plugin_api::sample::{parse_line, LineError, Part, Sample, Speaker};

/// What to do with a bad sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadSamplePolicy {
    Skip,
    Fail,
}

/// What to do with a sample longer than the maximum length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLongPolicy {
    /// Cut the end off, unless that would cut into image tokens (then skip).
    Truncate,
    /// Drop the sample (counted).
    Skip,
}

/// How to read a data set.
#[derive(Debug, Clone)]
pub struct DatasetOptions {
    pub max_length: usize,
    pub too_long: TooLongPolicy,
    pub on_bad_sample: BadSamplePolicy,
    /// Prepended as a system message to samples that have none.
    pub system_prompt: Option<String>,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions { max_length: 2048, too_long: TooLongPolicy::Truncate, on_bad_sample: BadSamplePolicy::Skip, system_prompt: None }
    }
}

/// Where a sample comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based line of the sample (JSONL) or of the start of the array element.
    pub line: usize,
    /// 0-based index of the sample in the file.
    pub index: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} (sample {})", self.file.display(), self.line, self.index)
    }
}

/// Kinds of problems, for the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    InvalidLine,
    ImageCount,
    MissingImage,
    CorruptImage,
    EmptyAnswer,
    TooLong,
    Other,
}

impl ProblemKind {
    fn describe(self) -> &'static str {
        match self {
            ProblemKind::InvalidLine => "unreadable line",
            ProblemKind::ImageCount => "<image> placeholders and images differ in number",
            ProblemKind::MissingImage => "missing image",
            ProblemKind::CorruptImage => "image that cannot be decoded",
            ProblemKind::EmptyAnswer => "empty answer",
            ProblemKind::TooLong => "too long",
            ProblemKind::Other => "other problem",
        }
    }
}

/// One bad sample.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub origin: Origin,
    pub kind: ProblemKind,
    pub message: String,
}

/// A sample that passed every check.
#[derive(Debug, Clone)]
pub struct Record {
    pub origin: Origin,
    pub sample: Sample,
    /// Tokens after truncation.
    pub length: usize,
    /// Supervised tokens after truncation.
    pub supervised: usize,
    /// Keep only the first `truncate_to` tokens (None: all).
    pub truncate_to: Option<usize>,
}

/// A checked data set.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub records: Vec<Record>,
    pub problems: Vec<Problem>,
    /// Samples read (good and bad).
    pub total: usize,
    pub truncated: usize,
}

impl Dataset {
    /// The summary printed before training: counts per kind and the first offenders.
    pub fn summary(&self, file: &Path) -> String {
        let mut s = format!(
            "{}: {} sample(s), {} usable, {} skipped, {} truncated",
            file.display(),
            self.total,
            self.records.len(),
            self.problems.len(),
            self.truncated
        );
        let mut kinds: Vec<ProblemKind> = self.problems.iter().map(|p| p.kind).collect();
        kinds.sort();
        kinds.dedup();
        for k in kinds {
            let of: Vec<&Problem> = self.problems.iter().filter(|p| p.kind == k).collect();
            s.push_str(&format!("\n  {} x {}", of.len(), k.describe()));
            for p in of.iter().take(5) {
                s.push_str(&format!("\n    {}: {}", p.origin, p.message));
            }
            if of.len() > 5 {
                s.push_str(&format!("\n    ... and {} more", of.len() - 5));
            }
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a JSON array of samples: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{summary}\nRefusing to train on a data set with bad samples (policy fail); fix them, or use policy skip")]
    Bad { summary: String },
    #[error("{path}: no usable sample")]
    Empty { path: PathBuf },
}

/// The raw samples of a file with their origins.
fn read_lines(path: &Path) -> Result<Vec<(Origin, String)>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
    let origin = |line, index| Origin { file: path.to_path_buf(), line, index };
    if text.trim_start().starts_with('[') {
        let arr: Vec<Box<serde_json::value::RawValue>> =
            serde_json::from_str(&text).map_err(|e| DatasetError::Json { path: path.to_path_buf(), message: e.to_string() })?;
        // Line of each element: count newlines up to its text's offset.
        let mut out = Vec::with_capacity(arr.len());
        let mut from = 0;
        for (i, raw) in arr.iter().enumerate() {
            let needle = raw.get();
            let at = text[from..].find(needle).map_or(from, |o| from + o);
            let line = text[..at].matches('\n').count() + 1;
            from = at + needle.len();
            out.push((origin(line, i), needle.to_owned()));
        }
        return Ok(out);
    }
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .enumerate()
        .map(|(index, (line, l))| (origin(line + 1, index), l.to_owned()))
        .collect())
}

fn classify(message: &str) -> ProblemKind {
    let m = message.to_ascii_lowercase();
    if m.contains("placeholder") || m.contains("<image>") && m.contains("image") && m.contains("number") {
        ProblemKind::ImageCount
    } else if m.contains("not found") || m.contains("no such file") {
        ProblemKind::MissingImage
    } else if m.contains("decode") || m.contains("image") && (m.contains("corrupt") || m.contains("format")) {
        ProblemKind::CorruptImage
    } else if m.contains("empty answer") || m.contains("empty assistant") {
        ProblemKind::EmptyAnswer
    } else {
        ProblemKind::Other
    }
}

/// Check the host-side rules a sample must meet before the plugin sees it.
fn check_sample(sample: &Sample) -> Result<(), (ProblemKind, String)> {
    if !sample.messages.iter().any(|m| m.role == Speaker::Assistant) {
        return Err((ProblemKind::EmptyAnswer, "no assistant turn: nothing to learn".into()));
    }
    for (i, m) in sample.messages.iter().enumerate() {
        if m.role == Speaker::Assistant {
            let text: String = m.content.iter().filter_map(|p| if let Part::Text { text } = p { Some(text.as_str()) } else { None }).collect();
            if text.trim().is_empty() {
                return Err((ProblemKind::EmptyAnswer, format!("message {i}: empty answer")));
            }
        }
        for p in &m.content {
            if let Part::Image { path } = p {
                if !path.is_file() {
                    return Err((ProblemKind::MissingImage, format!("message {i}: image {} not found", path.display())));
                }
            }
        }
    }
    Ok(())
}

/// Read and check every sample of `path` with `model`'s plugin.
pub fn load(path: &Path, model: &HostModel, opts: &DatasetOptions) -> Result<Dataset, DatasetError> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let lines = read_lines(path)?;
    let mut ds = Dataset { records: Vec::new(), problems: Vec::new(), total: lines.len(), truncated: 0 };
    for (origin, line) in lines {
        let problem = |kind, message: String| Problem { origin: origin.clone(), kind, message };
        let mut sample = match parse_line(&line, &base) {
            Ok(s) => s,
            Err(e) => {
                let kind = if matches!(e, LineError::ImageCount { .. }) { ProblemKind::ImageCount } else { ProblemKind::InvalidLine };
                ds.problems.push(problem(kind, e.to_string()));
                continue;
            }
        };
        if let Some(system) = &opts.system_prompt {
            if !sample.messages.iter().any(|m| m.role == Speaker::System) {
                sample.messages.insert(
                    0,
                    vlmhost_plugin_api::sample::Message { role: Speaker::System, content: vec![Part::Text { text: system.clone() }] },
                );
            }
        }
        if let Err((kind, message)) = check_sample(&sample) {
            ds.problems.push(problem(kind, message));
            continue;
        }
        let json = serde_json::to_string(&sample).expect("samples serialise");
        let prepared = match model.prepare(&json) {
            Ok(p) => p,
            Err(e) => {
                let message = e.to_string();
                ds.problems.push(problem(classify(&message), message));
                continue;
            }
        };
        let n = prepared.input_ids.len();
        let mut truncate_to = None;
        if n > opts.max_length {
            let last_image = prepared.image_token_mask.iter().rposition(|&b| b);
            let cut_into_images = last_image.is_some_and(|i| i >= opts.max_length);
            let supervised_left = prepared.labels[..opts.max_length].iter().skip(1).filter(|&&l| l != -100).count();
            let reason = if opts.too_long == TooLongPolicy::Skip {
                Some(format!("{n} tokens, more than max_length {}", opts.max_length))
            } else if cut_into_images {
                Some(format!("{n} tokens, and truncating to {} would cut into image tokens", opts.max_length))
            } else if supervised_left == 0 {
                Some(format!("{n} tokens, and truncating to {} would leave no answer token", opts.max_length))
            } else {
                None
            };
            if let Some(message) = reason {
                ds.problems.push(problem(ProblemKind::TooLong, message));
                continue;
            }
            truncate_to = Some(opts.max_length);
            ds.truncated += 1;
        }
        let length = truncate_to.unwrap_or(n);
        let supervised = prepared.labels[..length].iter().skip(1).filter(|&&l| l != -100).count();
        ds.records.push(Record { origin, sample, length, supervised, truncate_to });
    }
    if opts.on_bad_sample == BadSamplePolicy::Fail && !ds.problems.is_empty() {
        return Err(DatasetError::Bad { summary: ds.summary(path) });
    }
    if ds.records.is_empty() {
        return Err(DatasetError::Empty { path: path.to_path_buf() });
    }
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_arrays_report_element_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.json");
        std::fs::write(&p, "[\n  {\"a\": 1},\n  {\"a\": 2}\n]\n").unwrap();
        let lines = read_lines(&p).unwrap();
        assert_eq!(lines.iter().map(|(o, _)| (o.line, o.index)).collect::<Vec<_>>(), vec![(2, 0), (3, 1)]);
        let q = dir.path().join("d.jsonl");
        std::fs::write(&q, "{\"a\": 1}\n\n{\"a\": 2}\n").unwrap();
        let lines = read_lines(&q).unwrap();
        assert_eq!(lines.iter().map(|(o, _)| (o.line, o.index)).collect::<Vec<_>>(), vec![(1, 0), (3, 1)]);
    }
}
