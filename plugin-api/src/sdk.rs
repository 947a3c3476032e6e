//! The plugin author's side: a plain Rust trait and the [`export_plugin!`]
//! macro that turns it into the root module, with a panic guard on every entry.
//!
//! [`export_plugin!`]: crate::export_plugin

use crate::{FamilyInfo, PluginError, PluginManifest};
use abi_stable::std_types::{RResult, RString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a plugin crate implements. Plain Rust: no FFI types, no `unsafe`.
pub trait Plugin: 'static {
    /// The families this library serves (at least one).
    fn families() -> Vec<FamilyInfo>;
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
/// ```ignore
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
                $crate::PluginMod { manifest }.leak_into_prefix()
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
    }

    #[test]
    fn bad_family_names_are_refused() {
        let err = manifest_of::<BadName>("p", "0", "2.11.0").unwrap_err();
        assert!(err.to_string().contains("\"Bad-Name\" is not valid"), "{err}");
    }
}
