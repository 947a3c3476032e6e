//! Data sets: every sample of a file checked before training starts, with a
//! summary, so a bad line is found in seconds, not at step 40 000.
//!
//! A file is JSONL (one sample per line; `.jsonl`) or a JSON array (LLaVA's
//! `.json`). Each sample is parsed ([`parse_line`]) and prepared by the
//! family's plugin; problems (missing or corrupt image, placeholder/image
//! count mismatch, empty answer, too long) are reported with file, line and
//! sample index. Policy `skip` drops bad samples (counting them and listing
//! the first offenders); `fail` stops at the summary.

use crate::config::{BadSamplePolicy, TooLongPolicy, TrainSettings};
use crate::model::batch::IGNORE_INDEX;
use crate::model::HostModel;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use vlmhost_plugin_api::sample::{parse_line, LineError, Part, Sample, Speaker};

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
        DatasetOptions::from(&TrainSettings::default())
    }
}

impl From<&TrainSettings> for DatasetOptions {
    /// The data-set options of a run's `train:` settings.
    fn from(t: &TrainSettings) -> Self {
        DatasetOptions {
            max_length: t.max_length,
            too_long: t.too_long,
            on_bad_sample: t.on_bad_sample,
            system_prompt: t.system_prompt.clone(),
        }
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
    ImageTooLarge,
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
            ProblemKind::ImageTooLarge => "image with more pixels than train.max_image_pixels",
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
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a JSON array of samples: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{summary}\nRefusing to train on a data set with bad samples (policy fail); fix them, or use policy skip")]
    Bad { summary: String },
    #[error("{summary}\nno usable sample: fix the problems above (`vlmhost data check` lists them all)")]
    Empty { summary: String },
}

/// One raw sample, or why its line cannot be read as text.
type RawLine = Result<String, String>;

/// Why a line is not UTF-8, with the position of the first bad byte.
fn not_utf8(e: std::str::Utf8Error) -> String {
    format!("not UTF-8: byte {} of the line is not valid UTF-8 text; save the file as UTF-8", e.valid_up_to() + 1)
}

/// The raw samples of a file with their origins. A JSONL line that is not
/// UTF-8 is a bad sample of its own; a JSON array must be UTF-8 as a whole.
fn read_lines(path: &Path) -> Result<Vec<(Origin, RawLine)>, DatasetError> {
    let bytes = std::fs::read(path).map_err(|error| DatasetError::Io { path: path.to_path_buf(), error })?;
    let origin = |line, index| Origin { file: path.to_path_buf(), line, index };
    let is_array = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if !is_array {
        return Ok(bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .filter(|(_, l)| !l.trim_ascii().is_empty())
            .enumerate()
            .map(|(index, (line, l))| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                (origin(line + 1, index), std::str::from_utf8(l).map(str::to_owned).map_err(not_utf8))
            })
            .collect());
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        DatasetError::Json { path: path.to_path_buf(), message: format!("line {line}: {}", not_utf8(e.utf8_error())) }
    })?;
    let arr: Vec<Box<serde_json::value::RawValue>> =
        serde_json::from_str(&text).map_err(|e| DatasetError::Json { path: path.to_path_buf(), message: e.to_string() })?;
    // Line of each element: count newlines up to its text's offset.
    let mut out = Vec::with_capacity(arr.len());
    let (mut from, mut line) = (0, 1);
    for (i, raw) in arr.iter().enumerate() {
        let needle = raw.get();
        let at = text[from..].find(needle).map_or(from, |o| from + o);
        line += text[from..at].matches('\n').count();
        out.push((origin(line, i), Ok(needle.to_owned())));
        line += needle.matches('\n').count();
        from = at + needle.len();
    }
    Ok(out)
}

fn classify(message: &str) -> ProblemKind {
    let m = message.to_ascii_lowercase();
    if m.contains("placeholder") || m.contains("<image>") && m.contains("image") && m.contains("number") {
        ProblemKind::ImageCount
    } else if m.contains("pixels, more than the limit") {
        ProblemKind::ImageTooLarge
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
        let line = match line {
            Ok(l) => l,
            Err(message) => {
                ds.problems.push(problem(ProblemKind::InvalidLine, message));
                continue;
            }
        };
        let mut sample = match parse_line(&line, &base) {
            Ok(s) => s,
            Err(e) => {
                let image_count = matches!(e, LineError::ImageCount { .. } | LineError::UnusedImages { .. });
                let kind = if image_count { ProblemKind::ImageCount } else { ProblemKind::InvalidLine };
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
            let supervised_left = prepared.labels[..opts.max_length].iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count();
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
        let supervised = prepared.labels[..length].iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count();
        ds.records.push(Record { origin, sample, length, supervised, truncate_to });
    }
    if opts.on_bad_sample == BadSamplePolicy::Fail && !ds.problems.is_empty() {
        return Err(DatasetError::Bad { summary: ds.summary(path) });
    }
    if ds.records.is_empty() {
        return Err(DatasetError::Empty { summary: ds.summary(path) });
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

    #[test]
    fn a_line_that_is_not_utf8_is_a_bad_sample_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("d.jsonl");
        std::fs::write(&q, b"{\"a\": 1}\r\n{\"a\": \"\xff\"}\n{\"a\": 2}\n").unwrap();
        let lines = read_lines(&q).unwrap();
        assert_eq!(lines[0].1.as_deref(), Ok("{\"a\": 1}"));
        assert_eq!((lines[1].0.line, lines[1].0.index), (2, 1));
        let err = lines[1].1.as_ref().unwrap_err();
        assert!(err.contains("byte 8 of the line is not valid UTF-8"), "{err}");
        assert_eq!(lines[2].1.as_deref(), Ok("{\"a\": 2}"));
        let p = dir.path().join("d.json");
        std::fs::write(&p, b"[\n  {\"a\": 1},\n  {\"a\": \"\xff\"}\n]\n").unwrap();
        let err = read_lines(&p).unwrap_err().to_string();
        assert!(err.contains("line 3: not UTF-8"), "{err}");
    }
}
