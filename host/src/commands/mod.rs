//! One module per `vlmhost` command: its arguments (`Args`, parsed by
//! [`crate::cli`]) and its logic (`run`), over the model, training and
//! report layers. Argument groups several commands share are in [`args`];
//! opening a model with an adapter (PEFT's or a `vlmhost train` checkpoint)
//! is [`open_model`].
//!
//! Commands may use every other layer; nothing but [`crate::cli`] uses them.

pub mod args;
pub mod compare;
pub mod data;
pub mod doctor;
pub mod eval;
pub mod generate;
pub mod init;
pub mod inspect;
pub mod merge;
pub mod plugins;
pub mod report;
pub mod synth;
pub mod train;

use crate::config::TrainConfig;
use crate::model::peft::{self, PeftAdapter};
use crate::model::weights::read_tensors;
use crate::model::{HostModel, OpenOptions};
use crate::train::checkpoint::TRAINABLE_FILE;
use args::{set_chat_template, CHAT_TEMPLATE_OPTION};
use anyhow::{Context as _, Result};
use std::path::Path;

/// Open the model, with an adapter when one is given: a PEFT adapter folder
/// (its modules decide the rules) or a `vlmhost train` checkpoint (its saved
/// rules decide). The chat template the adapter was trained with renders
/// its conversations, unless the command names another.
pub fn open_model(opts: &OpenOptions, cfg: &TrainConfig, adapter: Option<&Path>) -> Result<HostModel> {
    let Some(dir) = adapter else { return crate::model::open(opts, cfg) };
    let mut opts = opts.clone();
    if peft::is_peft_dir(dir) {
        let mut cfg = cfg.clone();
        if !opts.processor.contains_key(CHAT_TEMPLATE_OPTION) {
            if let Some(template) = adapter_chat_template(dir, &opts.model_dir)? {
                set_chat_template(&mut opts.processor, &template);
                cfg.chat_template = Some(template);
            }
        }
        let mut read = None;
        let m = crate::model::open_with(&opts, |spec, roles| {
            let a = PeftAdapter::read(dir, spec)?;
            let chosen = a.train_config(spec, roles, &cfg)?;
            read = Some(a);
            Ok(chosen)
        })?;
        read.expect("read when opened").load_into(&m)?;
        return Ok(m);
    }
    let saved = TrainConfig::from_file(&dir.join("config.yaml")).with_context(|| {
        format!("{} is neither a vlmhost checkpoint (config.yaml) nor a PEFT adapter (adapter_config.json)", dir.display())
    })?;
    if let (Some(template), false) = (&saved.chat_template, opts.processor.contains_key(CHAT_TEMPLATE_OPTION)) {
        set_chat_template(&mut opts.processor, template);
    }
    let mode = saved.mode.unwrap_or(opts.mode);
    let m = crate::model::open_with(&opts, |_, _| Ok((saved.clone(), mode)))?;
    m.load_tensors(&read_tensors(&dir.join(TRAINABLE_FILE))?, true)?;
    Ok(m)
}

/// The chat template a PEFT adapter folder carries, when it is not the base
/// checkpoint's own (a run trained with another template writes it there).
fn adapter_chat_template(adapter: &Path, model_dir: &Path) -> Result<Option<std::path::PathBuf>> {
    let file = adapter.join("chat_template.jinja");
    if !file.is_file() {
        return Ok(None);
    }
    let ours = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let base = vlmhost_chat_template::find_template_source(model_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((base.map(|(_, source)| source) != Some(ours)).then_some(file))
}

/// Print `value` as pretty JSON on stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
