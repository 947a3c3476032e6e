//! A checkpoint folder and the plugin that serves it: what `config.json` says
//! about the family, which family of a plugin serves it, the processor
//! defaults the folder carries (`vlmhost.json`), and the plugin's model
//! opened on it. Nothing here loads weights or applies rules ([`super::open`]).

use crate::plugin::loader::{Discovery, LoadedPlugin};
use abi_stable::std_types::RStr;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use vlmhost_plugin_api::model::ModelBox;
use vlmhost_plugin_api::PluginError;

/// What `config.json` says about the checkpoint's family.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    pub model_type: String,
    pub architectures: Vec<String>,
}

/// Read `model_type` and `architectures` from `dir/config.json`.
pub fn checkpoint_info(dir: &Path) -> Result<CheckpointInfo> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("{}: cannot read it; --model must be a Hugging Face checkpoint folder", path.display())
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("{}: no \"model_type\" key", path.display()))?
        .to_owned();
    let architectures = json
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    Ok(CheckpointInfo { model_type, architectures })
}

/// Pick the family of `plugin` that serves the checkpoint; if none does, say
/// which discovered plugin would.
pub fn choose_family(plugin: &LoadedPlugin, info: &CheckpointInfo, model_dir: &Path) -> Result<String> {
    // `model_type` decides (transformers' AutoConfig does the same); the
    // architectures list is informative only.
    let serves = |f: &vlmhost_plugin_api::FamilyInfo| f.model_types.iter().any(|t| *t == info.model_type);
    if let Some(f) = plugin.manifest.families.iter().find(|f| serves(f)) {
        return Ok(f.name.to_string());
    }
    let ours: Vec<&str> = plugin.family_names().collect();
    let mut msg = format!(
        "{}: model_type {:?} is not served by the {} plugin ({})",
        model_dir.join("config.json").display(),
        info.model_type,
        ours.join(", "),
        plugin.path.display()
    );
    let others: Vec<String> = Discovery::default_path()
        .plugins
        .iter()
        .flat_map(|p| p.manifest.families.iter().filter(|f| serves(f)).map(|f| f.name.to_string()).collect::<Vec<_>>())
        .collect();
    if others.is_empty() {
        msg.push_str("; no plugin found serves it");
    } else {
        msg.push_str(&format!("; use --plugin {}", others.join(" or --plugin ")));
    }
    bail!(msg)
}

/// The processor defaults a checkpoint folder carries in `vlmhost.json`
/// (`{"processor": {...}}`; `vlmhost init` writes it), empty if none.
pub fn processor_defaults(model_dir: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let path = model_dir.join("vlmhost.json");
    if !path.is_file() {
        return Ok(Default::default());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    match v.get("processor") {
        None => Ok(Default::default()),
        Some(serde_json::Value::Object(m)) => Ok(m.clone()),
        Some(other) => bail!("{}: \"processor\" must be an object, not {other}", path.display()),
    }
}

/// Open the checkpoint folder `dir` as `family` through `plugin`, with the
/// folder's own processor settings (`vlmhost.json`) under the user's `processor`.
pub fn open_family_model(
    plugin: &LoadedPlugin,
    family: &str,
    dir: &Path,
    processor: &serde_json::Map<String, serde_json::Value>,
) -> Result<ModelBox> {
    let mut options = processor_defaults(dir)?;
    options.extend(processor.clone());
    let options = serde_json::Value::Object(options).to_string();
    let path = dir.to_string_lossy();
    (plugin.module.open_model())(RStr::from(family), RStr::from(path.as_ref()), RStr::from(options.as_str()))
        .into_result()
        .map_err(|e| plugin_err(family, &format!("opening {}", dir.display()), e))
}

/// Whether a checkpoint file is one of the files that turn text and images
/// into inputs (tokenizer, image or video processor, chat template), which
/// an adapter folder carries as a transformers Trainer's output folder does.
pub fn is_processing_file(name: &str) -> bool {
    const EXACT: [&str; 10] = [
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "chat_template.json",
        "chat_template.jinja",
    ];
    EXACT.contains(&name) || name.starts_with("tokenizer") || name.ends_with(".model")
}

/// The processing files ([`is_processing_file`]) of checkpoint folder `dir`.
pub fn processing_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        if path.is_file() && is_processing_file(&name) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Write the chat template of `file` (a Jinja file, or a JSON file holding
/// `chat_template`) into the model or adapter folder `dir` as
/// `chat_template.jinja`, the file transformers and vlmhost read first; a
/// `chat_template.json` copied there from the base is removed, so that the
/// folder holds one template.
pub fn write_chat_template(dir: &Path, file: &Path) -> Result<()> {
    let template = vlmhost_chat_template::ChatTemplate::from_file(file).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    crate::files::write_atomic(&dir.join("chat_template.jinja"), template.source().as_bytes())?;
    let json = dir.join("chat_template.json");
    if json.is_file() {
        std::fs::remove_file(&json).with_context(|| format!("cannot remove {}", json.display()))?;
    }
    Ok(())
}

/// Turn a plugin error into an error with context.
pub fn plugin_err(family: &str, what: &str, e: PluginError) -> anyhow::Error {
    anyhow!("{family} plugin, {what}: {e}")
}
