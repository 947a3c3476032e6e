//! `vlmhost doctor`: is this machine ready to train? Loads every plugin it can
//! find and reports every failure at once, with the libtorch and CUDA facts a
//! bug report needs, and the data-parallel launch it sees.

use crate::plugin::loader::{Discovery, SearchDir};
use crate::plugin::torch_env::{self, CudaBackend, GpuInfo};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let report = DoctorReport::collect();
    if args.json {
        super::print_json(&report)?;
    } else {
        print!("{}", report.render());
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[derive(Debug, Serialize)]
pub struct LibtorchReport {
    /// The version vlmhost was built against.
    pub version: String,
    /// The folder the running libtorch was loaded from.
    pub lib_dir: Option<PathBuf>,
    /// libtorch's intra-op thread count.
    pub threads: i32,
}

#[derive(Debug, Serialize)]
pub struct CudaReport {
    /// Whether tch can use CUDA in this process.
    pub available: bool,
    pub backend: CudaBackend,
    pub device_count: i64,
    pub cudnn: bool,
    /// GPUs as the NVIDIA driver reports them.
    pub gpus: Vec<GpuInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_error: Option<String>,
}

/// The data-parallel launch this process's environment describes.
#[derive(Debug, Serialize)]
pub struct DistReport {
    /// `None`: a plain run (no torchrun or srun variables).
    pub launch: Option<crate::dist::Launch>,
    /// The backend `train` would use: nccl on CUDA, gloo on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<&'static str>,
    /// Whether this build can create the NCCL backend.
    pub nccl_built: bool,
    /// Variables that are set but wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DistReport {
    fn collect(cuda: bool) -> DistReport {
        let (launch, error) = match crate::dist::Launch::from_env() {
            Ok(l) => (l, None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        let backend = launch.as_ref().map(|_| if cuda { "nccl" } else { "gloo" });
        DistReport { launch, backend, nccl_built: crate::dist::group::has_nccl(), error }
    }
}

#[derive(Debug, Serialize)]
pub struct PluginEntry {
    pub path: PathBuf,
    pub plugin: String,
    pub plugin_version: String,
    pub api_version: String,
    pub libtorch_version: String,
    pub families: Vec<FamilyEntry>,
}

#[derive(Debug, Serialize)]
pub struct FamilyEntry {
    pub name: String,
    pub model_types: Vec<String>,
    pub architectures: Vec<String>,
    pub description: String,
}

#[derive(Debug, Serialize)]
pub struct ProblemEntry {
    pub path: PathBuf,
    pub error: String,
}

/// What `vlmhost plugins` shows.
#[derive(Debug, Serialize)]
pub struct PluginsReport {
    pub plugins: Vec<PluginEntry>,
    pub problems: Vec<ProblemEntry>,
    /// Families served by more than one library: family -> libraries.
    pub duplicates: std::collections::BTreeMap<String, Vec<PathBuf>>,
    pub searched: Vec<SearchDir>,
}

impl PluginsReport {
    pub fn from_discovery(d: &Discovery) -> Self {
        PluginsReport {
            plugins: d
                .plugins
                .iter()
                .map(|p| {
                    let m = &p.manifest;
                    PluginEntry {
                        path: p.path.clone(),
                        plugin: m.plugin_name.to_string(),
                        plugin_version: m.plugin_version.to_string(),
                        api_version: m.api_version.to_string(),
                        libtorch_version: m.libtorch_version.to_string(),
                        families: m
                            .families
                            .iter()
                            .map(|f| FamilyEntry {
                                name: f.name.to_string(),
                                model_types: f.model_types.iter().map(|s| s.to_string()).collect(),
                                architectures: f
                                    .architectures
                                    .iter()
                                    .map(|s| s.to_string())
                                    .collect(),
                                description: f.description.to_string(),
                            })
                            .collect(),
                    }
                })
                .collect(),
            problems: d
                .problems
                .iter()
                .map(|e| ProblemEntry { path: e.path().to_path_buf(), error: e.to_string() })
                .collect(),
            duplicates: d.duplicates(),
            searched: d.searched.clone(),
        }
    }

    /// The plugins table: one row per family.
    pub fn table(&self) -> String {
        let header = ["FAMILY", "LIBRARY", "PLUGIN-API", "LIBTORCH", "HF MODEL TYPES"];
        let mut rows: Vec<[String; 5]> = Vec::new();
        for p in &self.plugins {
            for f in &p.families {
                rows.push([
                    f.name.clone(),
                    p.path.display().to_string(),
                    p.api_version.clone(),
                    p.libtorch_version.clone(),
                    f.model_types.join(", "),
                ]);
            }
        }
        rows.sort();
        let mut widths = header.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: Vec<&str>| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(c);
                } else {
                    let _ = write!(l, "{c:<w$}  ");
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(header.to_vec());
        for r in &rows {
            line(r.iter().map(String::as_str).collect());
        }
        out
    }
}

/// Everything `vlmhost doctor` checks.
#[derive(Debug, Serialize)]
pub struct DoctorReport {
    pub vlmhost_version: String,
    pub plugin_api_version: String,
    pub libtorch: LibtorchReport,
    pub cuda: CudaReport,
    /// The data-parallel launch seen (torchrun, srun).
    pub dist: DistReport,
    #[serde(flatten)]
    pub plugins: PluginsReport,
    /// Everything found broken; empty means healthy.
    pub issues: Vec<String>,
    pub ok: bool,
}

impl DoctorReport {
    pub fn collect() -> DoctorReport {
        let backend = torch_env::ensure_cuda_backend();
        let libtorch = LibtorchReport {
            version: vlmhost_plugin_api::LIBTORCH_VERSION.to_owned(),
            lib_dir: torch_env::libtorch_lib_dir(),
            threads: tch::get_num_threads(),
        };
        let (gpus, driver_error) = match torch_env::nvidia_gpus() {
            Ok(g) => (g, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let cuda = CudaReport {
            available: tch::Cuda::is_available(),
            backend,
            device_count: tch::Cuda::device_count(),
            cudnn: tch::Cuda::cudnn_is_available(),
            gpus,
            driver_error,
        };
        let dist = DistReport::collect(cuda.available);
        let discovery = Discovery::default_path();
        let plugins = PluginsReport::from_discovery(&discovery);

        let mut issues = Vec::new();
        for p in &plugins.problems {
            issues.push(p.error.clone());
        }
        for (family, libs) in &plugins.duplicates {
            let libs: Vec<String> = libs.iter().map(|p| p.display().to_string()).collect();
            issues.push(format!(
                "family {family:?} is served by several libraries: {}; remove all but one",
                libs.join(", ")
            ));
        }
        if plugins.plugins.is_empty() {
            issues.push(
                "no plugin found: build them (cargo build --release --workspace) or add their \
                 folder to $VLMHOST_PLUGIN_PATH"
                    .to_owned(),
            );
        }
        if backend == CudaBackend::FailedToLoad {
            issues.push("libtorch_cuda is present but failed to load (see the log above)".into());
        }
        if !cuda.gpus.is_empty() && !cuda.available {
            issues.push(format!(
                "the driver reports {} GPU(s) but libtorch cannot use CUDA (backend: {:?}); \
                 check that this libtorch build has CUDA and that the driver supports it",
                cuda.gpus.len(),
                backend
            ));
        }
        if let Some(e) = &dist.error {
            issues.push(format!("data-parallel launch: {e}"));
        }
        if dist.backend == Some("nccl") && !dist.nccl_built {
            issues.push("launched data parallel on CUDA, but this vlmhost was built without NCCL (rebuild with torch's nvidia-* wheels installed, or pass --device cpu to train on Gloo)".into());
        }
        if let Some(e) = &cuda.driver_error {
            issues.push(format!("the NVIDIA driver library is present but failed: {e}"));
        }
        DoctorReport {
            vlmhost_version: env!("CARGO_PKG_VERSION").to_owned(),
            plugin_api_version: vlmhost_plugin_api::API_VERSION.to_owned(),
            libtorch,
            cuda,
            dist,
            ok: issues.is_empty(),
            issues,
            plugins,
        }
    }

    pub fn render(&self) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "vlmhost {} (plugin-api {})",
            self.vlmhost_version, self.plugin_api_version
        );
        let dir = self
            .libtorch
            .lib_dir
            .as_ref()
            .map_or("an unknown folder".to_owned(), |d| d.display().to_string());
        let _ = writeln!(s, "libtorch   {} loaded from {dir}", self.libtorch.version);
        let _ = writeln!(s, "threads    {}", self.libtorch.threads);
        let backend = match self.cuda.backend {
            CudaBackend::Linked => "libtorch_cuda linked",
            CudaBackend::LoadedAtStartup => "libtorch_cuda loaded at start-up",
            CudaBackend::NotInThisBuild => "this libtorch has no CUDA backend",
            CudaBackend::FailedToLoad => "libtorch_cuda failed to load",
        };
        if self.cuda.available {
            let _ = writeln!(
                s,
                "CUDA       available: {} device(s), cuDNN {} ({backend})",
                self.cuda.device_count,
                if self.cuda.cudnn { "yes" } else { "no" }
            );
        } else {
            let why = if self.cuda.gpus.is_empty() { "no NVIDIA GPU or driver; " } else { "" };
            let _ = writeln!(s, "CUDA       not available ({why}{backend}); training runs on the CPU");
        }
        for g in &self.cuda.gpus {
            let _ = writeln!(
                s,
                "  GPU {}    {}, {:.1} GiB total, {:.1} GiB free",
                g.index,
                g.name,
                gib(g.total_memory_bytes),
                gib(g.free_memory_bytes)
            );
        }
        let nccl = if self.dist.nccl_built { "NCCL and Gloo built in" } else { "Gloo built in, no NCCL" };
        match (&self.dist.launch, &self.dist.error) {
            (Some(l), _) => {
                let _ = writeln!(s, "distributed {l}; backend {} ({nccl})", self.dist.backend.unwrap_or("?"));
            }
            (None, Some(e)) => {
                let _ = writeln!(s, "distributed launch variables are wrong: {e}");
            }
            (None, None) => {
                let _ = writeln!(s, "distributed not launched (no torchrun or srun variables): a plain run ({nccl})");
            }
        }
        let _ = writeln!(s, "plugins    {} loaded", self.plugins.plugins.len());
        for p in &self.plugins.plugins {
            let fams: Vec<&str> = p.families.iter().map(|f| f.name.as_str()).collect();
            let _ = writeln!(s, "  ok       {} ({})", p.path.display(), fams.join(", "));
        }
        for p in &self.plugins.problems {
            let _ = writeln!(s, "  FAILED   {}", p.error);
        }
        let _ = writeln!(s, "searched");
        for d in &self.plugins.searched {
            let note = if d.path.is_dir() { "" } else { ", does not exist" };
            let _ = writeln!(s, "  {} [{}{note}]", d.path.display(), d.origin);
        }
        if self.ok {
            let _ = writeln!(s, "doctor: everything looks fine");
        } else {
            let _ = writeln!(s, "doctor: {} problem(s):", self.issues.len());
            for i in &self.issues {
                let _ = writeln!(s, "  - {i}");
            }
        }
        s
    }
}
