//! Loading Hugging Face checkpoints into the host's parameters.
//!
//! Reads `model.safetensors` or a sharded `model.safetensors.index.json`, one
//! shard at a time over a memory map, one tensor at a time: each tensor is
//! copied out of the map, converted to the chosen dtype and moved to the
//! device, so peak memory stays near the model's size. Keys in any layout the
//! plugin declares ([`KeyRule`]s) are mapped onto the plugin's names. The load
//! report lists missing, unexpected and shape-mismatched keys; any of them is
//! an error, except missing keys when the user allows them (a new head), which
//! are then initialised as PyTorch would.

use super::patterns::Pattern;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use vlmhost_plugin_api::model::{ModelSpec, ParamKind};

/// How to load.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub kind: Kind,
    pub device: Device,
    /// Initialise parameters the checkpoint lacks instead of failing.
    pub allow_missing: bool,
}

/// A key whose shape differs from the model's.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeMismatch {
    pub key: String,
    pub param: String,
    pub expected: Vec<i64>,
    pub found: Vec<i64>,
    pub file: PathBuf,
}

/// What a load did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    pub files: Vec<PathBuf>,
    pub loaded: usize,
    /// Parameters not in the checkpoint (initialised when allowed).
    pub missing: Vec<String>,
    /// Checkpoint keys that map to no parameter.
    pub unexpected: Vec<String>,
    pub mismatched: Vec<ShapeMismatch>,
    /// Keys skipped on purpose (buffers the plugin declares ignorable, tied copies).
    pub ignored: Vec<String>,
}

impl LoadReport {
    fn is_clean(&self, allow_missing: bool) -> bool {
        (allow_missing || self.missing.is_empty())
            && self.unexpected.is_empty()
            && self.mismatched.is_empty()
    }

    fn describe(&self, allow_missing: bool) -> String {
        let mut s = String::new();
        let list = |s: &mut String, title: &str, items: &[String]| {
            if items.is_empty() {
                return;
            }
            s.push_str(&format!("\n  {} {title}:", items.len()));
            for k in items.iter().take(20) {
                s.push_str(&format!("\n    {k}"));
            }
            if items.len() > 20 {
                s.push_str(&format!("\n    ... and {} more", items.len() - 20));
            }
        };
        if !allow_missing {
            list(&mut s, "parameters missing from the checkpoint", &self.missing);
        }
        list(&mut s, "checkpoint keys that match no parameter", &self.unexpected);
        if !self.mismatched.is_empty() {
            s.push_str(&format!("\n  {} shape mismatches:", self.mismatched.len()));
            for m in &self.mismatched {
                s.push_str(&format!(
                    "\n    {} ({}): the model expects {:?}, the checkpoint has {:?}",
                    m.key,
                    m.file.display(),
                    m.expected,
                    m.found
                ));
            }
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(
        "{dir}: no model.safetensors or model.safetensors.index.json; \
         point --model at a Hugging Face checkpoint folder"
    )]
    NoCheckpoint { dir: PathBuf },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{path}: tensor {key} has dtype {dtype:?}, which cannot be a parameter")]
    Dtype { path: PathBuf, key: String, dtype: String },
    #[error(
        "the checkpoint does not fit the model:{details}\n\
         (a parameter the checkpoint lacks, such as a new head, can be allowed with --allow-missing)"
    )]
    Mismatch { details: String, report: Box<LoadReport> },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The safetensors files of a checkpoint folder, in order.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(WeightsError::NoCheckpoint { dir: dir.to_path_buf() });
    }
    let text = std::fs::read_to_string(&index)
        .map_err(|error| WeightsError::Io { path: index.clone(), error })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| WeightsError::Index { path: index.clone(), message: format!("invalid JSON: {e}") })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| WeightsError::Index {
        path: index.clone(),
        message: "no \"weight_map\" object".into(),
    })?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    files.sort();
    files.dedup();
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    for f in &files {
        if !f.is_file() {
            return Err(WeightsError::Index {
                path: index.clone(),
                message: format!("shard {} is listed but missing", f.display()),
            });
        }
    }
    Ok(files)
}

pub use vlmhost_plugin_api::model::map_key;

/// The torch dtype of a safetensors dtype (floating point, and int64 for buffers).
pub(crate) fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        _ => return None,
    })
}

/// Routes checkpoint keys to parameters and keeps the load report: the one
/// place that decides what a key is, for loading and for checking alike.
struct KeyRouter<'a> {
    spec: &'a ModelSpec,
    index: HashMap<&'a str, usize>,
    ignored: Vec<Pattern>,
    seen: Vec<bool>,
    report: LoadReport,
}

impl<'a> KeyRouter<'a> {
    fn new(spec: &'a ModelSpec, files: &[PathBuf]) -> Self {
        KeyRouter {
            spec,
            index: spec.params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect(),
            ignored: spec.ignored_keys.iter().filter_map(|p| Pattern::new(p).ok()).collect(),
            seen: vec![false; spec.params.len()],
            report: LoadReport { files: files.to_vec(), ..Default::default() },
        }
    }

    /// The parameter `key` (of `shape`, in `file`) loads into, or `None` after
    /// recording it as ignored, unexpected or shape-mismatched.
    fn route(&mut self, file: &Path, key: &str, shape: &[i64]) -> Option<usize> {
        let name = map_key(&self.spec.key_rules, key);
        let Some(&i) = self.index.get(name.as_str()) else {
            if self.ignored.iter().any(|p| p.matches(&name)) {
                self.report.ignored.push(key.to_owned());
            } else {
                self.report.unexpected.push(key.to_owned());
            }
            return None;
        };
        let p = &self.spec.params[i];
        if !p.tied_to.is_empty() {
            self.report.ignored.push(key.to_owned());
            return None;
        }
        if shape != p.shape.as_slice() {
            self.report.mismatched.push(ShapeMismatch {
                key: key.to_owned(),
                param: name,
                expected: p.shape.to_vec(),
                found: shape.to_vec(),
                file: file.to_path_buf(),
            });
            return None;
        }
        self.seen[i] = true;
        self.report.loaded += 1;
        Some(i)
    }

    /// The report, with the parameters no key reached listed as missing; an
    /// error unless clean (missing keys are fine when allowed).
    fn finish(mut self, allow_missing: bool) -> Result<LoadReport, WeightsError> {
        for (i, p) in self.spec.params.iter().enumerate() {
            let mismatched = self.report.mismatched.iter().any(|m| m.param == p.name.as_str());
            if !self.seen[i] && p.tied_to.is_empty() && !mismatched {
                self.report.missing.push(p.name.to_string());
            }
        }
        if !self.report.is_clean(allow_missing) {
            return Err(WeightsError::Mismatch {
                details: self.report.describe(allow_missing),
                report: Box::new(self.report),
            });
        }
        Ok(self.report)
    }
}

/// Load the checkpoint in `dir` into tensors ordered as `spec.params`.
/// Tied parameters share storage with their target.
pub fn load(dir: &Path, spec: &ModelSpec, opts: LoadOptions) -> Result<(Vec<Tensor>, LoadReport), WeightsError> {
    load_with_masters(dir, spec, opts, &[])
}

/// The dtype trainable tensors keep when the model's weights are stored in
/// `kind`: fp32 master weights under a 16-bit `kind`, else `kind` itself.
pub fn master_kind(kind: Kind) -> Kind {
    match kind {
        Kind::BFloat16 | Kind::Half => Kind::Float,
        other => other,
    }
}

/// As [`load`], with the parameters flagged in `masters` (the trainable
/// ones) in [`master_kind`]`(opts.kind)`: mixed precision keeps the frozen
/// weights in bf16 and the trained ones in fp32, each converted once from
/// the checkpoint's own dtype.
pub fn load_with_masters(
    dir: &Path,
    spec: &ModelSpec,
    opts: LoadOptions,
    masters: &[bool],
) -> Result<(Vec<Tensor>, LoadReport), WeightsError> {
    let opts_of = |i: usize| match masters.get(i) {
        Some(true) => LoadOptions { kind: master_kind(opts.kind), ..opts },
        _ => opts,
    };
    let files = checkpoint_files(dir)?;
    let mut router = KeyRouter::new(spec, &files);
    let mut slots: Vec<Option<Tensor>> = (0..spec.params.len()).map(|_| None).collect();
    for file in &files {
        let handle = File::open(file).map_err(|error| WeightsError::Io { path: file.clone(), error })?;
        // SAFETY: the file is only read; a concurrent writer would be a user error
        // that safetensors' header checks catch in most cases.
        let mmap = unsafe { Mmap::map(&handle) }
            .map_err(|error| WeightsError::Io { path: file.clone(), error })?;
        #[cfg(unix)]
        let _ = mmap.advise(memmap2::Advice::Sequential);
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| WeightsError::Format { path: file.clone(), message: e.to_string() })?;
        let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        for key in names {
            let view = st
                .tensor(&key)
                .map_err(|e| WeightsError::Format { path: file.clone(), message: e.to_string() })?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let Some(i) = router.route(file, &key, &shape) else { continue };
            let kind = kind_of(view.dtype()).filter(|k| *k != Kind::Int64).ok_or_else(|| WeightsError::Dtype {
                path: file.clone(),
                key: key.clone(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            let cpu = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            let t = cpu.f_to_dtype(opts_of(i).kind, false, false)?.f_to_device(opts.device)?;
            drop(cpu);
            release_pages(&mmap, view.data());
            if slots[i].replace(t).is_some() {
                return Err(WeightsError::Index {
                    path: file.clone(),
                    message: format!("{} appears twice in the checkpoint", spec.params[i].name),
                });
            }
        }
    }
    let report = router.finish(opts.allow_missing)?;
    for (i, p) in spec.params.iter().enumerate() {
        if slots[i].is_none() && p.tied_to.is_empty() {
            slots[i] = Some(init_param(&p.name, &p.shape, p.kind, opts_of(i))?);
        }
    }
    let index: HashMap<&str, usize> = spec.params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
    // Tied parameters share the target's tensor.
    for (i, p) in spec.params.iter().enumerate() {
        if !p.tied_to.is_empty() {
            let target = index.get(p.tied_to.as_str()).copied().ok_or_else(|| WeightsError::Index {
                path: dir.to_path_buf(),
                message: format!("{} is tied to {}, which the model does not declare", p.name, p.tied_to),
            })?;
            let shared = slots[target].as_ref().map(Tensor::shallow_clone);
            slots[i] = shared;
        }
    }
    Ok((slots.into_iter().map(|t| t.expect("every slot filled")).collect(), report))
}

/// Drop the pages of `data` (a slice of `map`) from this process once copied:
/// the mapping is read-only and file-backed, so they are re-read if touched
/// again. Without it, a shard's pages would stay resident beside the copies
/// and peak memory would approach twice the model's size.
fn release_pages(map: &Mmap, data: &[u8]) {
    #[cfg(unix)]
    {
        let offset = data.as_ptr() as usize - map.as_ptr() as usize;
        // SAFETY: MADV_DONTNEED on a private read-only file mapping only drops
        // clean pages; later reads fault them back in from the file.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len()) };
    }
    #[cfg(not(unix))]
    let _ = (map, data);
}

/// Check a checkpoint's keys, shapes and dtypes against `spec`, and that the
/// file holds every tensor's bytes, without reading any tensor data (the dry
/// run of `vlmhost inspect`).
pub fn check(dir: &Path, spec: &ModelSpec, allow_missing: bool) -> Result<LoadReport, WeightsError> {
    let files = checkpoint_files(dir)?;
    let mut router = KeyRouter::new(spec, &files);
    for file in &files {
        let mut handle = File::open(file).map_err(|error| WeightsError::Io { path: file.clone(), error })?;
        let file_len = handle.metadata().map_err(|error| WeightsError::Io { path: file.clone(), error })?.len();
        let (header_len, meta) = read_header(&mut handle)
            .map_err(|message| WeightsError::Format { path: file.clone(), message })?;
        let mut keys: Vec<(String, &safetensors::tensor::TensorInfo)> = meta.tensors().into_iter().collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        let data_start = 8 + header_len as u64;
        for (key, info) in keys {
            check_extent(&key, info, data_start, file_len).map_err(|message| WeightsError::Format { path: file.clone(), message })?;
            let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
            if router.route(file, &key, &shape).is_some() && kind_of(info.dtype).is_none_or(|k| k == Kind::Int64) {
                return Err(WeightsError::Dtype { path: file.clone(), key, dtype: format!("{:?}", info.dtype) });
            }
        }
    }
    router.finish(allow_missing)
}

/// Whether a tensor's bytes are as many as its dtype and shape need, and
/// within the file (of `file_len` bytes, its data starting at `data_start`).
fn check_extent(key: &str, info: &safetensors::tensor::TensorInfo, data_start: u64, file_len: u64) -> Result<(), String> {
    let (start, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
    let needed = info.shape.iter().try_fold(info.dtype.bitsize() as u64, |n, &d| n.checked_mul(d as u64)).map(|bits| bits.div_ceil(8));
    if end < start || needed != Some(end - start) {
        return Err(format!(
            "{key}: holds {} bytes, but {:?} of shape {:?} needs {}",
            end.saturating_sub(start),
            info.dtype,
            info.shape,
            needed.map_or("more than 2^64".to_owned(), |n| n.to_string())
        ));
    }
    if data_start + end > file_len {
        return Err(format!(
            "{key}: its data ends at byte {}, but the file has {file_len} bytes: the file is cut short (an interrupted copy or download?)",
            data_start + end
        ));
    }
    Ok(())
}

/// Read a safetensors header (8-byte length, JSON) without mapping the data.
fn read_header(file: &mut File) -> Result<(usize, safetensors::tensor::Metadata), String> {
    use std::io::Read;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| format!("cannot read the header length: {e}"))?;
    let n = u64::from_le_bytes(len) as usize;
    if n > 100 << 20 {
        return Err(format!("header of {n} bytes is not plausible"));
    }
    let mut buf = vec![0u8; n];
    file.read_exact(&mut buf).map_err(|e| format!("cannot read the header: {e}"))?;
    let meta: safetensors::tensor::Metadata =
        serde_json::from_slice(&buf).map_err(|e| format!("invalid header: {e}"))?;
    Ok((n, meta))
}

/// PyTorch's default initialisation for a parameter a checkpoint lacks.
fn init_param(name: &str, shape: &[i64], kind: ParamKind, opts: LoadOptions) -> Result<Tensor, WeightsError> {
    let o = (opts.kind, opts.device);
    let t = match kind {
        ParamKind::Norm if name.ends_with(".bias") => Tensor::f_zeros(shape, o)?,
        ParamKind::Norm => Tensor::f_ones(shape, o)?,
        ParamKind::Bias => Tensor::f_zeros(shape, o)?,
        ParamKind::Embedding => Tensor::f_randn(shape, o)? * 0.02,
        ParamKind::Weight => {
            // nn.Linear / nn.Conv: kaiming_uniform(a = sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            let fan_in: i64 = shape[1..].iter().product::<i64>().max(1);
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::f_empty(shape, o)?.f_uniform_(-bound, bound)?
        }
    };
    Ok(t)
}

/// Write `tensors` to `path` as safetensors, atomically: a temporary file in
/// the same folder, fsync, rename. A crash leaves the old file or the new one,
/// never half of one.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), WeightsError> {
    let io = |error| WeightsError::Io { path: path.to_path_buf(), error };
    let mut owned: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, t) in tensors {
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let (dtype, size) = match t.kind() {
            Kind::Float => (Dtype::F32, 4),
            Kind::Half => (Dtype::F16, 2),
            Kind::BFloat16 => (Dtype::BF16, 2),
            Kind::Double => (Dtype::F64, 8),
            Kind::Int64 => (Dtype::I64, 8),
            other => {
                return Err(WeightsError::Dtype {
                    path: path.to_path_buf(),
                    key: name.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * size];
        t.f_copy_data_u8(&mut bytes, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.insert(name.clone(), (dtype, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, (d, s, b))| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| WeightsError::Format { path: path.to_path_buf(), message: e.to_string() })?;
    let data = safetensors::serialize(views, metadata)
        .map_err(|e| WeightsError::Format { path: path.to_path_buf(), message: e.to_string() })?;
    crate::files::write_atomic(path, &data).map_err(io)
}

/// A safetensors file as a name -> tensor map.
pub fn read_tensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    use anyhow::Context as _;
    Ok(Tensor::read_safetensors(path).with_context(|| format!("cannot read {}", path.display()))?.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmhost_plugin_api::builder::{key_rule, SpecBuilder};

    fn spec() -> ModelSpec {
        let b = SpecBuilder::new();
        let r = b.root();
        (&r / "language_model" / "model" / "layers" / 0 / "q_proj").linear(3, 2, true);
        (&r / "language_model" / "model" / "norm").rms_norm(3, 1e-6);
        (&r / "language_model" / "lm_head").linear(3, 5, false);
        b.build(
            "t",
            vec![],
            vec![
                key_rule("model.language_model.", "language_model.model."),
                key_rule("lm_head.", "language_model.lm_head."),
            ],
            vec!["**.position_ids".into()],
            false,
        )
    }

    fn opts() -> LoadOptions {
        LoadOptions { kind: Kind::Float, device: Device::Cpu, allow_missing: false }
    }

    fn write(dir: &Path, file: &str, tensors: &[(&str, Tensor)]) {
        let t: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
        save_safetensors(&dir.join(file), &t, None).unwrap();
    }

    fn full_model(dir: &Path, layout_new: bool, kind: Kind) {
        let (lm, head) = if layout_new { ("model.language_model.", "lm_head.") } else { ("language_model.model.", "language_model.lm_head.") };
        let o = (kind, Device::Cpu);
        write(
            dir,
            "model.safetensors",
            &[
                (&format!("{lm}layers.0.q_proj.weight"), Tensor::ones([2, 3], o)),
                (&format!("{lm}layers.0.q_proj.bias"), Tensor::zeros([2], o)),
                (&format!("{lm}norm.weight"), Tensor::full([3], 0.5, o)),
                (&format!("{head}weight"), Tensor::ones([5, 3], o)),
                ("vision.embeddings.position_ids", Tensor::arange(4, (Kind::Int64, Device::Cpu))),
            ],
        );
    }

    #[test]
    fn both_layouts_and_dtypes_load() {
        for (layout_new, kind) in [(false, Kind::Float), (true, Kind::BFloat16), (true, Kind::Half)] {
            let dir = tempfile::tempdir().unwrap();
            full_model(dir.path(), layout_new, kind);
            let (params, report) = load(dir.path(), &spec(), opts()).unwrap();
            assert_eq!(report.loaded, 4);
            assert_eq!(report.ignored, ["vision.embeddings.position_ids"]);
            assert_eq!(params[0].kind(), Kind::Float);
            assert_eq!(params[0].size(), [2, 3]);
            assert_eq!(params[2].double_value(&[1]), 0.5);
        }
    }

    #[test]
    fn sharded_checkpoints_load() {
        let dir = tempfile::tempdir().unwrap();
        let o = (Kind::Float, Device::Cpu);
        write(dir.path(), "model-00001-of-00002.safetensors", &[
            ("language_model.model.layers.0.q_proj.weight", Tensor::ones([2, 3], o)),
            ("language_model.model.layers.0.q_proj.bias", Tensor::zeros([2], o)),
        ]);
        write(dir.path(), "model-00002-of-00002.safetensors", &[
            ("language_model.model.norm.weight", Tensor::ones([3], o)),
            ("language_model.lm_head.weight", Tensor::ones([5, 3], o)),
        ]);
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {
                "language_model.model.layers.0.q_proj.weight": "model-00001-of-00002.safetensors",
                "language_model.model.layers.0.q_proj.bias": "model-00001-of-00002.safetensors",
                "language_model.model.norm.weight": "model-00002-of-00002.safetensors",
                "language_model.lm_head.weight": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let (_, report) = load(dir.path(), &spec(), opts()).unwrap();
        assert_eq!(report.loaded, 4);
        assert_eq!(report.files.len(), 2);
    }

    #[test]
    fn problems_are_reported_with_names_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let o = (Kind::Float, Device::Cpu);
        write(dir.path(), "model.safetensors", &[
            ("language_model.model.layers.0.q_proj.weight", Tensor::ones([2, 4], o)),
            ("language_model.model.norm.weight", Tensor::ones([3], o)),
            ("language_model.model.extra.weight", Tensor::ones([3], o)),
            ("language_model.lm_head.weight", Tensor::ones([5, 3], o)),
        ]);
        let err = load(dir.path(), &spec(), opts()).unwrap_err().to_string();
        assert!(err.contains("language_model.model.layers.0.q_proj.bias"), "{err}");
        assert!(err.contains("language_model.model.extra.weight"), "{err}");
        assert!(err.contains("the model expects [2, 3], the checkpoint has [2, 4]"), "{err}");
        assert!(err.contains("--allow-missing"), "{err}");
    }

    #[test]
    fn missing_keys_can_be_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let o = (Kind::Float, Device::Cpu);
        write(dir.path(), "model.safetensors", &[
            ("language_model.model.layers.0.q_proj.weight", Tensor::ones([2, 3], o)),
            ("language_model.model.layers.0.q_proj.bias", Tensor::zeros([2], o)),
            ("language_model.model.norm.weight", Tensor::ones([3], o)),
        ]);
        let (params, report) =
            load(dir.path(), &spec(), LoadOptions { allow_missing: true, ..opts() }).unwrap();
        assert_eq!(report.missing, ["language_model.lm_head.weight"]);
        let bound = 1.0 / 3f64.sqrt();
        assert!(params[3].abs().max().double_value(&[]) <= bound);
    }

    #[test]
    fn save_then_load_keeps_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::randn([4, 5], (Kind::BFloat16, Device::Cpu));
        save_safetensors(&dir.path().join("x.safetensors"), &[("a".into(), t.shallow_clone())], None).unwrap();
        let back = Tensor::read_safetensors(dir.path().join("x.safetensors")).unwrap();
        assert_eq!(back[0].0, "a");
        assert!(back[0].1.equal(&t));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn no_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path(), &spec(), opts()).unwrap_err().to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
    }
}
