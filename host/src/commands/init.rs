//! `vlmhost init`: a new, randomly initialised checkpoint of any family whose
//! plugin implements `init_model`: the plugin writes config.json, tokenizer
//! and processor files for the preset; the host draws the weights from the
//! plugin's spec (as transformers' `_init_weights` does: normal(0, 0.02) for
//! weights and embeddings, ones for norm scales, zeros for biases and norm
//! shifts) and writes model.safetensors. The folder appears complete or not
//! at all (it is built as `DIR.partial` and renamed).

use crate::plugin::loader;
use crate::model::checkpoint::{open_family_model, plugin_err};
use crate::model::weights;
use anyhow::{anyhow, bail, Result};
use abi_stable::std_types::RStr;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};
use vlmhost_plugin_api::ParamKind;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Family name or plugin library path.
    #[arg(long, value_name = "NAME|PATH")]
    plugin: String,
    /// The family, when the library serves several.
    #[arg(long)]
    family: Option<String>,
    /// tiny (trains in seconds per hundred steps on a CPU) or small.
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace an output folder that exists and is not empty.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let r = init(&args.plugin, args.family.as_deref(), &args.preset, &args.output, args.seed, args.force)?;
    println!(
        "{} checkpoint ({} preset, {} parameters in {} tensors, seed {}) written to {}",
        r.family, r.preset, r.parameters, r.tensors, args.seed, r.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// What `init` made.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    pub family: String,
    pub preset: String,
    pub output: PathBuf,
    pub parameters: i64,
    pub tensors: usize,
}

/// Create the checkpoint `output` of `plugin` (a family name, or a library
/// path with the family in `family`) at `preset`.
pub fn init(plugin: &str, family: Option<&str>, preset: &str, output: &Path, seed: u64, force: bool) -> Result<InitReport> {
    let lib = loader::resolve(plugin)?;
    let families: Vec<String> = lib.manifest.families.iter().map(|f| f.name.to_string()).collect();
    let family = match family {
        Some(f) => f.to_owned(),
        None if families.iter().any(|f| f == plugin) => plugin.to_owned(),
        None if families.len() == 1 => families[0].clone(),
        None => bail!("{} serves several families ({}); name one with --family", lib.path.display(), families.join(", ")),
    };
    if !families.contains(&family) {
        bail!("{} does not serve family {family:?} (it serves {})", lib.path.display(), families.join(", "));
    }
    crate::files::check_output(output, &[], force)?;
    let partial = crate::files::fresh_partial(output)?;
    let made = write_checkpoint(&lib, &family, preset, &partial, seed);
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    let (parameters, tensors) = made?;
    crate::files::publish_dir(&partial, output)?;
    Ok(InitReport { family, preset: preset.to_owned(), output: output.to_path_buf(), parameters, tensors })
}

/// The plugin's files and the host's weights in `partial`: (values, tensors).
fn write_checkpoint(lib: &loader::LoadedPlugin, family: &str, preset: &str, partial: &Path, seed: u64) -> Result<(i64, usize)> {
    let init_model = lib
        .module
        .init_model()
        .ok_or_else(|| anyhow!("the {family} plugin ({}) predates `vlmhost init`: it cannot create checkpoints", lib.path.display()))?;
    let dir = partial.to_string_lossy().into_owned();
    init_model(RStr::from(family), RStr::from(preset), RStr::from(dir.as_str()))
        .into_result()
        .map_err(|e| plugin_err(family, &format!("init (preset {preset})"), e))?;

    let model = open_family_model(lib, family, partial, &Default::default())?;
    let spec = model.spec();
    tch::manual_seed(seed as i64);
    let mut tensors = Vec::new();
    let mut parameters = 0;
    for p in spec.params.iter() {
        if !p.tied_to.is_empty() {
            continue;
        }
        let shape: Vec<i64> = p.shape.iter().copied().collect();
        let shift = p.name.ends_with(".bias") || p.name.ends_with("_bias");
        let t = match p.kind {
            ParamKind::Weight | ParamKind::Embedding => Tensor::randn(shape.as_slice(), (Kind::Float, tch::Device::Cpu)) * 0.02,
            ParamKind::Bias => Tensor::zeros(shape.as_slice(), (Kind::Float, tch::Device::Cpu)),
            ParamKind::Norm if shift => Tensor::zeros(shape.as_slice(), (Kind::Float, tch::Device::Cpu)),
            ParamKind::Norm => Tensor::ones(shape.as_slice(), (Kind::Float, tch::Device::Cpu)),
        };
        parameters += t.numel() as i64;
        tensors.push((p.name.to_string(), t));
    }
    weights::save_safetensors(&partial.join("model.safetensors"), &tensors, None)?;
    Ok((parameters, tensors.len()))
}
