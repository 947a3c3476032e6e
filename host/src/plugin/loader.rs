//! Finding and loading plugin libraries.
//!
//! `--plugin NAME` looks for the library serving family `NAME` in, in order:
//! every folder of `$VLMHOST_PLUGIN_PATH` (colon-separated), the folder of the
//! `vlmhost` binary, and `./plugins`. `--plugin path/to/libX.so` loads that
//! file. Every shared library (`.so`, `.dylib`, `.dll`) directly inside a
//! searched folder is a candidate; one that does not export a vlmhost root
//! module is skipped, one that does but cannot be used (or a damaged file) is
//! a problem that `vlmhost doctor` reports and the other commands show as a
//! warning when they find their family elsewhere. A library's ELF headers are
//! checked before it is mapped ([`super::elf`]), so a file cut short is an
//! error, not a crash. Two libraries serving the same family are refused,
//! whichever folders they are in: pick one by path or remove the other.
//!
//! Libraries are loaded once per process (keyed by canonical path) and never
//! unloaded: unloading libraries that hold thread-locals crashes.

use abi_stable::library::{lib_header_from_path, LibraryError};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use vlmhost_plugin_api::{
    api_compat_key, libtorch_release, FamilyInfo, PluginError, PluginManifest, PluginModRef,
    API_VERSION, LIBTORCH_VERSION,
};

/// The environment variable listing extra plugin folders.
pub const PLUGIN_PATH_VAR: &str = "VLMHOST_PLUGIN_PATH";

/// Why a folder is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchOrigin {
    /// Named in `$VLMHOST_PLUGIN_PATH`.
    PluginPathVar,
    /// The folder holding the `vlmhost` binary.
    BinaryFolder,
    /// `./plugins`, relative to the working directory.
    WorkingDirPlugins,
}

impl fmt::Display for SearchOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SearchOrigin::PluginPathVar => "$VLMHOST_PLUGIN_PATH",
            SearchOrigin::BinaryFolder => "vlmhost's folder",
            SearchOrigin::WorkingDirPlugins => "./plugins",
        })
    }
}

/// One folder to search.
#[derive(Debug, Clone, Serialize)]
pub struct SearchDir {
    pub path: PathBuf,
    pub origin: SearchOrigin,
}

/// The folders searched for plugins, in order.
pub fn search_path() -> Vec<SearchDir> {
    let var = std::env::var_os(PLUGIN_PATH_VAR);
    let exe = std::env::current_exe().ok();
    search_path_from(var.as_deref(), exe.as_deref())
}

fn search_path_from(var: Option<&std::ffi::OsStr>, exe: Option<&Path>) -> Vec<SearchDir> {
    let mut dirs = Vec::new();
    if let Some(var) = var {
        for p in std::env::split_paths(var).filter(|p| !p.as_os_str().is_empty()) {
            dirs.push(SearchDir { path: p, origin: SearchOrigin::PluginPathVar });
        }
    }
    if let Some(folder) = exe.and_then(Path::parent) {
        dirs.push(SearchDir { path: folder.to_path_buf(), origin: SearchOrigin::BinaryFolder });
    }
    dirs.push(SearchDir { path: PathBuf::from("plugins"), origin: SearchOrigin::WorkingDirPlugins });
    dirs
}

/// Why a library could not be used as a plugin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: no such file")]
    NotFound { path: PathBuf },
    #[error("{path}: not a loadable shared library: {reason}")]
    NotALibrary { path: PathBuf, reason: String },
    #[error(
        "{path}: not a vlmhost plugin (it exports no vlmhost root module; \
         a plugin crate ends with `vlmhost_plugin_api::export_plugin!(...)`)"
    )]
    NotAPlugin { path: PathBuf },
    #[error(
        "{path}: built against vlmhost-plugin-api {plugin}, but this vlmhost speaks {host}; \
         rebuild the plugin against vlmhost-plugin-api {host_compat}.x"
    )]
    ApiVersion { path: PathBuf, plugin: String, host: String, host_compat: String },
    #[error("{path}: its plugin ABI layout differs from this vlmhost's: {details}")]
    AbiLayout { path: PathBuf, details: String },
    #[error(
        "{path}: built against libtorch {plugin}, but this vlmhost runs libtorch {host}; \
         mixing libtorch releases in one process crashes: rebuild the plugin against libtorch {host_release} \
         (scripts/setup.sh installs it)"
    )]
    Libtorch { path: PathBuf, plugin: String, host: String, host_release: String },
    #[error("{path}: the plugin's manifest failed: {error}")]
    Manifest { path: PathBuf, error: PluginError },
    #[error("{path}: invalid manifest: {message}")]
    BadManifest { path: PathBuf, message: String },
}

impl LoadError {
    /// The library the error is about.
    pub fn path(&self) -> &Path {
        match self {
            LoadError::NotFound { path }
            | LoadError::NotALibrary { path, .. }
            | LoadError::NotAPlugin { path }
            | LoadError::ApiVersion { path, .. }
            | LoadError::AbiLayout { path, .. }
            | LoadError::Libtorch { path, .. }
            | LoadError::Manifest { path, .. }
            | LoadError::BadManifest { path, .. } => path,
        }
    }
}

/// A plugin library that loaded and passed every check.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// Canonical path of the library.
    pub path: PathBuf,
    pub manifest: PluginManifest,
    pub module: PluginModRef,
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// The family `name`, if this library serves it.
    pub fn family(&self, name: &str) -> Option<&FamilyInfo> {
        self.manifest.families.iter().find(|f| f.name == name)
    }

    pub fn family_names(&self) -> impl Iterator<Item = &str> {
        self.manifest.families.iter().map(|f| f.name.as_str())
    }
}

type LoadResult = Result<Arc<LoadedPlugin>, LoadError>;

fn cache() -> &'static Mutex<HashMap<PathBuf, LoadResult>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, LoadResult>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Load the plugin library at `path` (once per process) and check it.
pub fn load(path: &Path) -> LoadResult {
    let canonical = match path.canonicalize() {
        Ok(p) => p,
        Err(_) => return Err(LoadError::NotFound { path: path.to_path_buf() }),
    };
    if !canonical.is_file() {
        return Err(LoadError::NotALibrary {
            path: path.to_path_buf(),
            reason: "it is a folder, not a file".into(),
        });
    }
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    cache.entry(canonical.clone()).or_insert_with(|| load_uncached(&canonical).map(Arc::new)).clone()
}

fn load_uncached(path: &Path) -> Result<LoadedPlugin, LoadError> {
    super::torch_env::ensure_cuda_backend();
    let p = || path.to_path_buf();
    // A file cut short would be mapped and then fault (SIGBUS): check first.
    super::elf::check(path).map_err(|reason| LoadError::NotALibrary { path: p(), reason })?;
    let header = lib_header_from_path(path).map_err(|e| match e {
        LibraryError::OpenError { err, .. } => {
            LoadError::NotALibrary { path: p(), reason: strip_path(&err.to_string(), path) }
        }
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin { path: p() },
        other => LoadError::AbiLayout { path: p(), details: other.to_string() },
    })?;
    let module = header.init_root_module::<PluginModRef>().map_err(|e| match e {
        LibraryError::IncompatibleVersionNumber { actual_version, .. } => LoadError::ApiVersion {
            path: p(),
            plugin: actual_version.to_string(),
            host: API_VERSION.to_owned(),
            host_compat: api_compat_key(API_VERSION),
        },
        LibraryError::ParseVersionError(err) => {
            LoadError::AbiLayout { path: p(), details: format!("unreadable version: {err}") }
        }
        other => LoadError::AbiLayout { path: p(), details: other.to_string() },
    })?;
    let manifest = (module.manifest())().into_result().map_err(|error| LoadError::Manifest {
        path: p(),
        error,
    })?;
    check_manifest(path, &manifest)?;
    Ok(LoadedPlugin { path: p(), manifest, module })
}

/// The checks abi_stable cannot make.
fn check_manifest(path: &Path, m: &PluginManifest) -> Result<(), LoadError> {
    let p = || path.to_path_buf();
    if api_compat_key(&m.api_version) != api_compat_key(API_VERSION) {
        return Err(LoadError::ApiVersion {
            path: p(),
            plugin: m.api_version.to_string(),
            host: API_VERSION.to_owned(),
            host_compat: api_compat_key(API_VERSION),
        });
    }
    if libtorch_release(&m.libtorch_version) != libtorch_release(LIBTORCH_VERSION) {
        return Err(LoadError::Libtorch {
            path: p(),
            plugin: m.libtorch_version.to_string(),
            host: LIBTORCH_VERSION.to_owned(),
            host_release: libtorch_release(LIBTORCH_VERSION).to_owned(),
        });
    }
    if m.families.is_empty() {
        return Err(LoadError::BadManifest { path: p(), message: "it serves no family".into() });
    }
    let mut seen = std::collections::HashSet::new();
    for f in m.families.iter() {
        if !FamilyInfo::is_valid_name(&f.name) {
            return Err(LoadError::BadManifest {
                path: p(),
                message: format!("family name {:?} is not [a-z][a-z0-9_]*", f.name.as_str()),
            });
        }
        if !seen.insert(f.name.as_str()) {
            return Err(LoadError::BadManifest {
                path: p(),
                message: format!("family {:?} is declared twice", f.name.as_str()),
            });
        }
    }
    Ok(())
}

/// libloading repeats the path in its message; keep the reason only.
fn strip_path(message: &str, path: &Path) -> String {
    let shown = path.display().to_string();
    message.replace(&format!("{shown}: "), "").replace(&shown, "the file")
}

fn is_library_file(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let wanted = if cfg!(target_os = "macos") {
        "dylib"
    } else if cfg!(windows) {
        "dll"
    } else {
        "so"
    };
    ext == wanted && path.is_file()
}

/// Everything found on the search path.
#[derive(Debug, Default)]
pub struct Discovery {
    /// The folders searched, in order.
    pub searched: Vec<SearchDir>,
    /// Usable plugins, in search order, each library once.
    pub plugins: Vec<Arc<LoadedPlugin>>,
    /// Libraries that export a vlmhost root module but cannot be used.
    pub problems: Vec<LoadError>,
}

impl Discovery {
    /// Search `dirs` and load every plugin library found.
    pub fn run(dirs: Vec<SearchDir>) -> Discovery {
        let mut out = Discovery { searched: dirs, ..Default::default() };
        let mut seen = std::collections::HashSet::new();
        for dir in out.searched.clone() {
            let Ok(entries) = std::fs::read_dir(&dir.path) else { continue };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_library_file(p))
                .collect();
            files.sort();
            for file in files {
                let key = file.canonicalize().unwrap_or_else(|_| file.clone());
                if !seen.insert(key) {
                    continue;
                }
                match load(&file) {
                    Ok(plugin) => out.plugins.push(plugin),
                    Err(LoadError::NotAPlugin { path }) => {
                        tracing::debug!("{}: not a vlmhost plugin, skipped", path.display())
                    }
                    Err(e) => out.problems.push(e),
                }
            }
        }
        out
    }

    /// Search the default search path.
    pub fn default_path() -> Discovery {
        Discovery::run(search_path())
    }

    /// Families served by more than one library: family -> libraries.
    pub fn duplicates(&self) -> BTreeMap<String, Vec<PathBuf>> {
        let mut by_family: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for p in &self.plugins {
            for f in p.family_names() {
                by_family.entry(f.to_owned()).or_default().push(p.path.clone());
            }
        }
        by_family.retain(|_, libs| libs.len() > 1);
        by_family
    }

    /// All family names found, sorted.
    pub fn families(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.plugins.iter().flat_map(|p| p.family_names().map(str::to_owned)).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The one library serving `family`.
    pub fn find(&self, family: &str) -> Result<Arc<LoadedPlugin>, ResolveError> {
        let serving: Vec<&Arc<LoadedPlugin>> =
            self.plugins.iter().filter(|p| p.family(family).is_some()).collect();
        match serving.as_slice() {
            [one] => Ok(Arc::clone(one)),
            [] => Err(ResolveError::UnknownFamily {
                family: family.to_owned(),
                found: self.families(),
                searched: self.searched.clone(),
                problems: self.problems.iter().map(ToString::to_string).collect(),
            }),
            many => Err(ResolveError::Duplicate {
                family: family.to_owned(),
                libraries: many.iter().map(|p| p.path.clone()).collect(),
            }),
        }
    }
}

/// Why `--plugin` could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{}", unknown_family_message(.family, .found, .searched, .problems))]
    UnknownFamily {
        family: String,
        found: Vec<String>,
        searched: Vec<SearchDir>,
        problems: Vec<String>,
    },
    #[error("{}", duplicate_message(.family, .libraries))]
    Duplicate { family: String, libraries: Vec<PathBuf> },
    #[error(transparent)]
    Load(#[from] LoadError),
}

fn unknown_family_message(
    family: &str,
    found: &[String],
    searched: &[SearchDir],
    problems: &[String],
) -> String {
    let mut s = format!("no plugin serves the family {family:?}.\n");
    if found.is_empty() {
        s.push_str("No plugin was found at all.\n");
    } else {
        s.push_str(&format!("Families found: {}.\n", found.join(", ")));
    }
    s.push_str("Folders searched, in order:\n");
    for d in searched {
        let note = if d.path.is_dir() { "" } else { " (does not exist)" };
        s.push_str(&format!("  {} [{}]{note}\n", d.path.display(), d.origin));
    }
    if !problems.is_empty() {
        s.push_str("Libraries that failed to load:\n");
        for p in problems {
            s.push_str(&format!("  {p}\n"));
        }
    }
    s.push_str(&format!(
        "Put the plugin library in one of these folders, add its folder to ${PLUGIN_PATH_VAR}, \
         or pass --plugin path/to/the/library."
    ));
    s
}

fn duplicate_message(family: &str, libraries: &[PathBuf]) -> String {
    let mut s = format!("the family {family:?} is served by {} libraries:\n", libraries.len());
    for l in libraries {
        s.push_str(&format!("  {}\n", l.display()));
    }
    s.push_str("Refusing to guess: remove all but one, or pass --plugin path/to/the/library.");
    s
}

/// Whether a `--plugin` value names a file rather than a family.
pub fn is_path_spec(spec: &str) -> bool {
    spec.contains(std::path::MAIN_SEPARATOR)
        || spec.contains('/')
        || [".so", ".dylib", ".dll"].iter().any(|e| spec.ends_with(e))
}

/// Resolve a `--plugin` value: a library path, or a family name searched for
/// on the default search path.
pub fn resolve(spec: &str) -> Result<Arc<LoadedPlugin>, ResolveError> {
    if is_path_spec(spec) {
        return Ok(load(Path::new(spec))?);
    }
    let discovery = Discovery::default_path();
    let found = discovery.find(spec)?;
    for problem in &discovery.problems {
        tracing::warn!("skipped: {problem}");
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_path_order() {
        let var = std::ffi::OsString::from("/a:/b::/c");
        let dirs = search_path_from(Some(&var), Some(Path::new("/opt/vlmhost/bin/vlmhost")));
        let paths: Vec<_> = dirs.iter().map(|d| d.path.to_str().unwrap()).collect();
        assert_eq!(paths, ["/a", "/b", "/c", "/opt/vlmhost/bin", "plugins"]);
        assert_eq!(dirs[0].origin, SearchOrigin::PluginPathVar);
        assert_eq!(dirs[3].origin, SearchOrigin::BinaryFolder);
        assert_eq!(dirs[4].origin, SearchOrigin::WorkingDirPlugins);
    }

    #[test]
    fn path_specs() {
        assert!(is_path_spec("./libx.so"));
        assert!(is_path_spec("target/debug/libx.so"));
        assert!(is_path_spec("libx.so"));
        assert!(!is_path_spec("deepseek_ocr"));
    }

    #[test]
    fn missing_file() {
        let err = load(Path::new("/nonexistent/libnothing.so")).unwrap_err();
        assert!(matches!(err, LoadError::NotFound { .. }), "{err}");
    }
}
