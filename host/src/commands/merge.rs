//! `vlmhost merge`: a complete Hugging Face checkpoint with the LoRA updates
//! merged into their weights and every fully trained module included (other
//! tools have lost fully trained vision towers here). Keys keep the base
//! checkpoint's own names and dtypes; files other than weights (config,
//! tokenizer, processor, chat template) are copied. The output never overlaps
//! the model or the adapter, and is written whole ([`crate::files`]).

use crate::model::HostModel;
use crate::files;
use crate::model::weights::{self, checkpoint_files, kind_of};
use anyhow::{Context, Result};
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use super::args::ModelArgs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tch::Tensor;
use vlmhost_plugin_api::model::map_key;


#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A vlmhost checkpoint or a PEFT adapter folder.
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Replace an output folder that exists and is not empty.
    #[arg(long)]
    force: bool,
    /// Largest shard, in GB.
    #[arg(long, default_value_t = 4.0)]
    max_shard_size_gb: f64,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let (cfg, opts) = args.model.resolve()?;
    check_output(&args.output, &opts.model_dir, &args.adapter, args.force)?;
    let m = super::open_model(&opts, &cfg, Some(&args.adapter))?;
    let n = merge(&m, &args.adapter, &args.output, args.force, (args.max_shard_size_gb * 1e9) as usize)?;
    println!("merged checkpoint written to {} ({n} tensors)", args.output.display());
    Ok(ExitCode::SUCCESS)
}

/// The checks `merge` makes before anything is read or written: `output` is
/// a folder outside the model and the adapter, and empty unless `force`.
pub fn check_output(output: &Path, model_dir: &Path, adapter: &Path, force: bool) -> Result<()> {
    files::check_output(output, &[("--model", model_dir), ("--adapter", adapter)], force)
}

/// Write the merged checkpoint of `model` (weights and the adapter read from
/// `adapter` loaded) to `output`: in `<output>.partial`, then renamed into place.
pub fn merge(model: &HostModel, adapter: &Path, output: &Path, force: bool, max_shard_bytes: usize) -> Result<usize> {
    check_output(output, model.model_dir(), adapter, force)?;
    let partial = files::fresh_partial(output)?;
    let written = write_merged(model, &partial, max_shard_bytes)?;
    files::publish_dir(&partial, output)?;
    Ok(written)
}

/// The merged checkpoint's files in `output`; returns the number of tensors.
fn write_merged(model: &HostModel, output: &Path, max_shard_bytes: usize) -> Result<usize> {
    let index: HashMap<&str, usize> = model.spec().params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
    // Weight index -> module with an adapter.
    let adapted: HashMap<usize, usize> = model.adapters().map(|(m, _)| (model.spec().modules[m].weight as usize, m)).collect();

    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    let mut written = 0usize;
    let _g = tch::no_grad_guard();
    for file in checkpoint_files(model.model_dir())? {
        let handle = std::fs::File::open(&file)?;
        // SAFETY: read-only map of the base checkpoint.
        let mmap = unsafe { Mmap::map(&handle) }?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        for key in names {
            let view = st.tensor(&key)?;
            let kind = kind_of(view.dtype()).with_context(|| format!("{}: {key} has dtype {:?}", file.display(), view.dtype()))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let name = map_key(&model.spec().key_rules, &key);
            let tensor = match index.get(name.as_str()) {
                Some(&i) if model.spec().params[i].tied_to.is_empty() => {
                    let p = &model.params()[i];
                    let merged = match adapted.get(&i).and_then(|&m| model.adapter(m)) {
                        Some(a) => a.merged_weight(p)?,
                        None => p.detach(),
                    };
                    merged.to_kind(kind).to_device(tch::Device::Cpu)
                }
                // Tied copies and buffers: as in the base checkpoint.
                _ => Tensor::f_from_data_size(view.data(), &shape, kind)?,
            };
            let bytes = tensor.numel() * kind.elt_size_in_bytes();
            if shard_bytes + bytes > max_shard_bytes && !shards.last().is_some_and(Vec::is_empty) {
                shards.push(Vec::new());
                shard_bytes = 0;
            }
            shard_bytes += bytes;
            shards.last_mut().expect("a shard").push((key, tensor));
            written += 1;
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        for (k, t) in shard {
            weight_map.insert(k.clone(), name.clone());
            total += t.numel() * t.kind().elt_size_in_bytes();
        }
        weights::save_safetensors(&output.join(&name), shard, Some(HashMap::from([("format".to_owned(), "pt".to_owned())])))?;
    }
    let index_json = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    files::write_atomic(&output.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index_json)?.as_bytes())?;
    // Everything else of the checkpoint folder: config, tokenizer, processor, template.
    for entry in std::fs::read_dir(model.model_dir())? {
        let path = entry?.path();
        let fname = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        if path.is_file() && !fname.ends_with(".safetensors") && fname != "model.safetensors.index.json" {
            std::fs::copy(&path, output.join(&fname)).with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    // The template the run trained with, when it was not the checkpoint's.
    if let Some(template) = &model.config().chat_template {
        crate::model::checkpoint::write_chat_template(output, template)?;
    }
    Ok(written)
}
