//! New checkpoints (`vlmhost init`): choosing a preset, writing the files of
//! a checkpoint folder with errors that name them, and [`check_presets`], the
//! test every family's presets pass (each writes a folder the family opens;
//! an unknown preset names the known ones and writes nothing).

use crate::Family;
use serde_json::{json, Map, Value};
use std::path::Path;
use vlmhost_plugin_api::init::{unknown_preset, write_json, write_text};
use vlmhost_plugin_api::PluginError;

/// The preset called `name` among `presets` (name, value), or the error
/// naming the known ones.
pub fn choose<P: Clone>(name: &str, presets: &[(&str, P)]) -> Result<P, PluginError> {
    match presets.iter().find(|(n, _)| *n == name) {
        Some((_, p)) => Ok(p.clone()),
        None => Err(unknown_preset(name, &presets.iter().map(|(n, _)| *n).collect::<Vec<_>>())),
    }
}

/// A file of a new checkpoint: JSON (written pretty, as Hugging Face does) or text.
pub enum File<'a> {
    Json(&'a str, &'a Value),
    Text(&'a str, &'a str),
}

/// Write `files` into `dir`, in order.
pub fn write_files(dir: &Path, files: &[File<'_>]) -> Result<(), PluginError> {
    for file in files {
        match file {
            File::Json(name, value) => write_json(&dir.join(name), value)?,
            File::Text(name, text) => write_text(&dir.join(name), text)?,
        }
    }
    Ok(())
}

/// A new checkpoint's `config.json` for `preset`: the keys every family's
/// starts with (`_name_or_path` `vlmhost-init-<family>-<preset>`, its
/// architecture and `model_type`, `dtype` float32), then `keys`.
pub fn config_json<F: Family>(preset: &str, keys: Value) -> Value {
    let about = F::ABOUT;
    let head = json!({
        "_name_or_path": format!("vlmhost-init-{}-{preset}", about.name),
        "architectures": [about.architectures[0]],
        "model_type": about.model_types.first().unwrap_or(&about.name),
        "dtype": "float32",
    });
    joined([head, keys])
}

/// JSON objects joined into one, in order (a later key replaces an earlier one).
pub fn joined(objects: impl IntoIterator<Item = Value>) -> Value {
    let mut all = Map::new();
    for object in objects {
        match object {
            Value::Object(keys) => all.extend(keys),
            other => panic!("not a JSON object: {other}"),
        }
    }
    Value::Object(all)
}

/// The folder `F` wrote for `preset` must be one it opens: an error says which preset failed.
pub fn check_opens<F: Family>(preset: &str, dir: &Path) -> Result<F, PluginError> {
    F::open(dir, &Default::default()).map_err(|e| PluginError::invalid("init", format!("preset {preset}: {e}")))
}

/// The test of a family's presets: each of `presets` writes a folder the
/// family opens (`check` looks at the opened model), and an unknown preset is
/// refused by name, naming the known ones, with nothing written.
pub fn check_presets<F: Family>(family: &str, presets: &[&str], check: impl Fn(&str, &F)) {
    let fresh = |name: &str| {
        let dir = std::env::temp_dir().join(format!("vlmhost-init-{family}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    for &name in presets {
        let dir = fresh(name);
        (F::INIT)(name, &dir).unwrap_or_else(|e| panic!("{family} {name}: {e}"));
        let model = F::open(&dir, &Default::default()).unwrap_or_else(|e| panic!("{family} {name}: {e}"));
        assert!(!model.arch().spec().params.is_empty(), "{family} {name}");
        check(name, &model);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let dir = fresh("huge");
    let e = (F::INIT)("huge", &dir).err().expect("an unknown preset is refused").to_string();
    assert!(e.contains("\"huge\"") && e.contains(&presets.join(" or ")), "{e}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing written");
    std::fs::remove_dir_all(&dir).unwrap();
}
