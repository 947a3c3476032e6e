//! The plugin author's side: a plain Rust trait and the [`export_plugin!`]
//! macro that turns it into the root module, with a panic guard on every entry.
//!
//! [`export_plugin!`]: crate::export_plugin

use crate::host::Host;
use crate::model::{Batch, CachedOutput, HostOpsRef, Model, ModelBox, ModelSpec, NamedTensor, Prepared, Segment};
use crate::sample::Sample;
use crate::tensor::{OwnedTensor, TensorRef};
use crate::{FamilyInfo, ModelOptions, PluginError, PluginManifest};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RString, RVec};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use tch::Tensor;

/// What a plugin crate implements. Plain Rust: no FFI types, no `unsafe`.
pub trait Plugin: 'static {
    /// The families this library serves (at least one).
    fn families() -> Vec<FamilyInfo>;

    /// Open the model in `model_dir` (a Hugging Face checkpoint folder: its
    /// `config.json`, tokenizer and processor files) as family `family`.
    /// Weights are the host's business: do not read the safetensors here.
    /// `options` are the user's processor options; refuse keys you do not
    /// know ([`ModelOptions::check_keys`]).
    fn open(family: &str, model_dir: &Path, options: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError>;

    /// Write a new checkpoint's files (config.json, tokenizer, processor
    /// files; not the weights, which the host draws from the spec) for
    /// `preset` (`tiny`: trains in seconds per hundred steps on a CPU;
    /// `small`) into the existing, empty folder `dir`, so that `open` accepts
    /// it. `vlmhost init` calls it.
    fn init(family: &str, preset: &str, _dir: &Path) -> Result<(), PluginError> {
        Err(PluginError::unsupported(format!("{family}: this plugin cannot create new checkpoints (preset {preset:?})")))
    }
}

/// One sample turned into inputs, plugin side (see [`Prepared`]).
pub struct PreparedSample {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub image_token_mask: Vec<bool>,
    pub tensors: Vec<(String, Tensor)>,
}

/// A batch, plugin side (see [`Batch`]).
pub struct BatchInputs {
    /// `[batch, seq]` int64.
    pub input_ids: Tensor,
    /// `[batch, seq]` int64.
    pub attention_mask: Tensor,
    /// The prepared tensors, concatenated along dimension 0.
    pub tensors: Vec<(String, Tensor)>,
}

impl BatchInputs {
    /// The tensor named `name`, or an error saying the host did not pass it.
    pub fn tensor(&self, name: &str) -> Result<&Tensor, PluginError> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| PluginError::invalid("batch", format!("missing input tensor {name:?}")))
    }

    /// The tensor named `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The positions whose logits the host needs, when it says so (training
    /// and evaluation: those whose next token is labelled): `[n]` int64 rows
    /// of the flattened `[batch * seq]` positions, in order (tensor
    /// [`LOGIT_ROWS`]). A plugin may then run its head on those rows only and
    /// return logits `[1, n, vocab]` ([`crate::ops::select_rows`] before the
    /// head); returning the whole `[batch, seq, vocab]` stays correct.
    pub fn logit_rows(&self) -> Option<&Tensor> {
        self.get(LOGIT_ROWS)
    }
}

/// The batch tensor of [`BatchInputs::logit_rows`].
pub const LOGIT_ROWS: &str = "logit_rows";

/// A model opened by a plugin, in plain Rust.
pub trait FamilyModel: Send + Sync + 'static {
    /// Parameters, modules, roles and key layouts, under checkpoint names.
    fn spec(&self) -> ModelSpec;

    /// Turn one sample into inputs.
    fn prepare(&self, sample: &Sample) -> Result<PreparedSample, PluginError>;

    /// Logits `[batch, seq, vocab]` for a batch, with the host's parameters.
    fn forward(&self, host: Host<'_, '_>, batch: &BatchInputs) -> Result<Tensor, PluginError>;

    /// Incremental decoding with a key/value cache (see
    /// [`Model::forward_cached`]): logits of the new tokens and the cache for
    /// the next call. `past` is empty on the first call. Families that do not
    /// implement it make `vlmhost generate` refuse with this error.
    fn forward_cached(
        &self,
        _host: Host<'_, '_>,
        _batch: &BatchInputs,
        _past: &[Tensor],
    ) -> Result<(Tensor, Vec<Tensor>), PluginError> {
        Err(PluginError::unsupported("incremental decoding (forward_cached) is not implemented by this family"))
    }

    /// Run segment `id` on `inputs`, as the forward pass asked the host to
    /// with [`Host::segment`]: the host calls this (once, or twice with
    /// activation checkpointing: again in the backward pass, with the same
    /// inputs). Families that mark no segments never receive it.
    fn run_segment(&self, _host: Host<'_, '_>, id: Segment, _inputs: &[Tensor]) -> Result<Vec<Tensor>, PluginError> {
        Err(PluginError::unsupported(format!("segment {id:?}: this family marks no segments (run_segment is not implemented)")))
    }
}

fn batch_inputs(batch: &Batch<'_>) -> BatchInputs {
    BatchInputs {
        input_ids: batch.input_ids.to_tensor(),
        attention_mask: batch.attention_mask.to_tensor(),
        tensors: batch.tensors.iter().map(|t| (t.name.as_str().to_owned(), t.tensor.to_tensor())).collect(),
    }
}

/// Adapts a [`FamilyModel`] to the ABI's [`Model`], with a panic guard on every call.
struct ModelAdapter(Box<dyn FamilyModel>);

impl Model for ModelAdapter {
    fn spec(&self) -> ModelSpec {
        // `spec` has no error channel: a panic here becomes an empty spec,
        // which the host refuses with a message.
        match guard(|| Ok(self.0.spec())) {
            RResult::ROk(spec) => spec,
            RResult::RErr(e) => ModelSpec {
                family: format!("<spec failed: {e}>").into(),
                params: Default::default(),
                modules: Default::default(),
                roles: Default::default(),
                key_rules: Default::default(),
                ignored_keys: Default::default(),
                has_vision_encoder: false,
                transformers_names: Default::default(),
            },
        }
    }

    fn prepare(&self, sample_json: RStr<'_>) -> RResult<Prepared, PluginError> {
        guard(|| {
            let sample: Sample = serde_json::from_str(sample_json.as_str()).map_err(|e| {
                PluginError::invalid("sample", format!("not a vlmhost sample: {e}"))
            })?;
            let p = self.0.prepare(&sample)?;
            if p.labels.len() != p.input_ids.len() || p.image_token_mask.len() != p.input_ids.len() {
                return Err(PluginError::invalid(
                    "prepare",
                    "input_ids, labels and image_token_mask differ in length (plugin bug)",
                ));
            }
            Ok(Prepared {
                input_ids: p.input_ids.into(),
                labels: p.labels.into(),
                image_token_mask: p.image_token_mask.into(),
                tensors: p
                    .tensors
                    .into_iter()
                    .map(|(name, t)| NamedTensor { name: name.into(), tensor: OwnedTensor::new(t) })
                    .collect(),
            })
        })
    }

    fn forward(&self, host: &HostOpsRef<'_>, batch: &Batch<'_>) -> RResult<OwnedTensor, PluginError> {
        guard(|| {
            let logits = self.0.forward(Host::new(host), &batch_inputs(batch))?;
            Ok(OwnedTensor::new(logits))
        })
    }

    fn forward_cached(
        &self,
        host: &HostOpsRef<'_>,
        batch: &Batch<'_>,
        past: RVec<TensorRef<'_>>,
    ) -> RResult<CachedOutput, PluginError> {
        guard(|| {
            let past: Vec<Tensor> = past.iter().map(|t| t.to_tensor()).collect();
            let (logits, cache) = self.0.forward_cached(Host::new(host), &batch_inputs(batch), &past)?;
            Ok(CachedOutput { logits: OwnedTensor::new(logits), cache: cache.into_iter().map(OwnedTensor::new).collect() })
        })
    }

    fn run_segment(
        &self,
        host: &HostOpsRef<'_>,
        id: Segment,
        inputs: RVec<TensorRef<'_>>,
    ) -> RResult<RVec<OwnedTensor>, PluginError> {
        guard(|| {
            let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_tensor()).collect();
            let outputs = self.0.run_segment(Host::new(host), id, &inputs)?;
            Ok(outputs.into_iter().map(OwnedTensor::new).collect())
        })
    }
}

/// Open a model through `P` (used by [`export_plugin!`](crate::export_plugin)).
#[doc(hidden)]
pub fn open_model<P: Plugin>(
    family: RStr<'_>,
    model_dir: RStr<'_>,
    options: RStr<'_>,
) -> RResult<ModelBox, PluginError> {
    guard(|| {
        let family = family.as_str();
        if !P::families().iter().any(|f| f.name == family) {
            return Err(PluginError::invalid("family", format!("this plugin does not serve {family:?}")));
        }
        let options = ModelOptions::from_json(options.as_str())?;
        let model = P::open(family, Path::new(model_dir.as_str()), &options)?;
        Ok(ModelBox::from_value(ModelAdapter(model), TD_Opaque))
    })
}


thread_local! {
    /// Where the last panic on this thread happened (set by the SDK's hook).
    static PANIC_LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    /// How many [`guard`]s are active on this thread.
    static GUARD_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Install, once, a panic hook that, inside a [`guard`], records the location
/// instead of printing (the host reports the panic as an error, with the
/// location); outside a guard it defers to the previous hook.
///
/// A `cdylib` carries its own copy of `std`, so in a plugin this hook governs
/// the plugin's panics only.
fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARD_DEPTH.with(|d| d.get()) == 0 {
                return previous(info);
            }
            let location =
                info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            PANIC_LOCATION.with(|cell| *cell.borrow_mut() = location);
        }));
    });
}

/// Run `f`, turning a panic into [`PluginError::Panicked`] so it never unwinds
/// across `extern "C"` (which would abort the host).
pub fn guard<T>(f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, PluginError> {
    install_quiet_hook();
    GUARD_DEPTH.with(|d| d.set(d.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARD_DEPTH.with(|d| d.set(d.get() - 1));
    match result {
        Ok(Ok(value)) => RResult::ROk(value),
        Ok(Err(err)) => RResult::RErr(err),
        Err(payload) => {
            let mut message = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_owned()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "a panic with a non-string payload".to_owned()
            };
            if let Some(location) = PANIC_LOCATION.with(|cell| cell.borrow_mut().take()) {
                message.push_str(&format!(" (at {location})"));
            }
            RResult::RErr(PluginError::Panicked { message: RString::from(message) })
        }
    }
}

/// Write a new checkpoint's files through `P` (used by [`export_plugin!`](crate::export_plugin)).
#[doc(hidden)]
pub fn init_model<P: Plugin>(family: RStr<'_>, preset: RStr<'_>, dir: RStr<'_>) -> RResult<(), PluginError> {
    guard(|| {
        let family = family.as_str();
        if !P::families().iter().any(|f| f.name == family) {
            return Err(PluginError::invalid("family", format!("this plugin does not serve {family:?}")));
        }
        P::init(family, preset.as_str(), Path::new(dir.as_str()))
    })
}

/// Build the manifest of plugin `P` (used by [`export_plugin!`](crate::export_plugin)).
#[doc(hidden)]
pub fn manifest_of<P: Plugin>(
    plugin_name: &str,
    plugin_version: &str,
    libtorch_version: &str,
) -> Result<PluginManifest, PluginError> {
    let families = P::families();
    if families.is_empty() {
        return Err(PluginError::invalid(plugin_name, "the plugin declares no family"));
    }
    for family in &families {
        if !FamilyInfo::is_valid_name(&family.name) {
            return Err(PluginError::invalid_with_hint(
                plugin_name,
                format!("family name {:?} is not valid", family.name.as_str()),
                "use lower-case letters, digits and '_', starting with a letter",
            ));
        }
    }
    Ok(PluginManifest {
        plugin_name: plugin_name.into(),
        plugin_version: plugin_version.into(),
        api_version: crate::API_VERSION.into(),
        libtorch_version: libtorch_version.into(),
        tch_version: crate::TCH_VERSION.into(),
        families: families.into(),
    })
}

/// The symbol abi_stable looks up in a plugin library. Spelled out because the
/// macro below cannot call abi_stable's `const fn`; a test checks it against
/// `abi_stable::library::ROOT_MODULE_LOADER_NAME`.
#[doc(hidden)]
#[macro_export]
macro_rules! __vlmhost_root_symbol {
    ($($item:tt)*) => {
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        $($item)*
    };
}

/// Export a [`Plugin`] implementation as this library's root module.
///
/// ```text
/// vlmhost_plugin_api::export_plugin!(MyPlugin);
/// ```
///
/// Every entry point runs inside [`guard`]: a panic in plugin code becomes a
/// [`PluginError::Panicked`] returned to the host.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::export_plugin!(@export $plugin, $crate::LIBTORCH_VERSION);
    };
    // For the host's own tests only: report a libtorch version other than the
    // one this plugin was built against, to exercise the host's refusal.
    ($plugin:ty, __report_libtorch_version = $version:expr) => {
        $crate::export_plugin!(@export $plugin, $version);
    };
    (@export $plugin:ty, $libtorch:expr) => {
        #[doc(hidden)]
        pub mod __vlmhost_plugin_export {
            use super::*;
            use $crate::abi_stable;

            extern "C" fn open_model(
                family: abi_stable::std_types::RStr<'_>,
                model_dir: abi_stable::std_types::RStr<'_>,
                options: abi_stable::std_types::RStr<'_>,
            ) -> abi_stable::std_types::RResult<$crate::model::ModelBox, $crate::PluginError> {
                $crate::sdk::open_model::<$plugin>(family, model_dir, options)
            }

            extern "C" fn init_model(
                family: abi_stable::std_types::RStr<'_>,
                preset: abi_stable::std_types::RStr<'_>,
                dir: abi_stable::std_types::RStr<'_>,
            ) -> abi_stable::std_types::RResult<(), $crate::PluginError> {
                $crate::sdk::init_model::<$plugin>(family, preset, dir)
            }

            extern "C" fn manifest(
            ) -> abi_stable::std_types::RResult<$crate::PluginManifest, $crate::PluginError> {
                $crate::sdk::guard(|| {
                    $crate::sdk::manifest_of::<$plugin>(
                        env!("CARGO_PKG_NAME"),
                        env!("CARGO_PKG_VERSION"),
                        $libtorch,
                    )
                })
            }

            fn root_module() -> $crate::PluginModRef {
                use abi_stable::prefix_type::PrefixTypeTrait;
                $crate::PluginMod { manifest, open_model, init_model }.leak_into_prefix()
            }

            extern "C" fn erased_root_module() -> abi_stable::library::RootModuleResult {
                abi_stable::library::__call_root_module_loader(root_module)
            }

            $crate::__vlmhost_root_symbol! {
                pub static ROOT_MODULE_LOADER: abi_stable::library::LibHeader = unsafe {
                    abi_stable::library::LibHeader::from_constructor::<$crate::PluginModRef>(
                        erased_root_module,
                        abi_stable::library::CheckTypeLayout::Yes,
                    )
                };
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_symbol_matches_abi_stable() {
        assert_eq!(abi_stable::library::ROOT_MODULE_LOADER_NAME, "_1as_0lib_1header_0root_bmodule_bloader");
    }

    struct Panicky;
    impl Plugin for Panicky {
        fn families() -> Vec<FamilyInfo> {
            panic!("boom at {}", 42)
        }
        fn open(_: &str, _: &Path, _: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
            unreachable!()
        }
    }

    #[test]
    fn guard_turns_panics_into_errors() {
        let r = guard(|| manifest_of::<Panicky>("p", "0", "2.11.0"));
        match r {
            RResult::RErr(PluginError::Panicked { message }) => {
                assert!(message.starts_with("boom at 42 (at "), "{message}");
                assert!(message.contains("sdk.rs:"), "{message}");
            }
            other => panic!("expected a caught panic, got {other:?}"),
        }
    }

    struct BadName;
    impl Plugin for BadName {
        fn families() -> Vec<FamilyInfo> {
            vec![FamilyInfo::new("Bad-Name", "x")]
        }
        fn open(_: &str, _: &Path, _: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
            unreachable!()
        }
    }

    #[test]
    fn bad_family_names_are_refused() {
        let err = manifest_of::<BadName>("p", "0", "2.11.0").unwrap_err();
        assert!(err.to_string().contains("\"Bad-Name\" is not valid"), "{err}");
    }
}
