//! The `vlmhost` command line: it parses and dispatches; each command's
//! arguments and logic live in its module under [`crate::commands`].

use crate::commands::{self, compare, data, doctor, eval, generate, init, inspect, merge, plugins, report, synth, train};
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "vlmhost", version, about = "Fine-tune vision-language models; model families are plugins")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the plugin libraries found and the model families they serve.
    ///
    /// Searched, in order: $VLMHOST_PLUGIN_PATH (colon-separated), the folder of
    /// the vlmhost binary, ./plugins.
    Plugins(plugins::Args),
    /// The dry run: what would train, per role, and the LoRA targets.
    ///
    /// Opens the checkpoint through its plugin and checks its keys and shapes
    /// without loading tensor data.
    Inspect(inspect::Args),
    /// Fine-tune: check the data, apply the rules, train, checkpoint.
    ///
    /// `TRAINING_MODE=llm vlmhost train --dataset data.jsonl` takes the plugin
    /// and the model from config/train_config.yaml.
    Train(train::Args),
    /// Loss on a data set: the mean over assistant tokens and each sample's.
    Eval(eval::Args),
    /// Greedy decoding from an image and a prompt, streamed to the terminal,
    /// with the family's key/value cache.
    Generate(generate::Args),
    /// A complete Hugging Face checkpoint with the adapter merged: LoRA folded
    /// into its weights, fully trained modules included, config, tokenizer and
    /// processor files copied.
    Merge(merge::Args),
    /// The same data and rules over several families, one after another: a
    /// report (Markdown, JSON, loss-curve PNG) of parameters per role, losses,
    /// held-out CER, tokens/s and peak memory.
    Compare(compare::Args),
    /// A new, randomly initialised checkpoint of a family (config, weights,
    /// tokenizer, processor settings), to train with nothing downloaded.
    Init(init::Args),
    /// Data sets: check every sample before training; make synthetic OCR data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Runs side by side: a Markdown table (or JSON) of their losses, speed
    /// and eval metrics (eval.json), and one PNG of their loss curves.
    Report(report::Args),
    /// Check libtorch, CUDA and every plugin; report every problem at once.
    ///
    /// Exits non-zero when anything is broken.
    Doctor(doctor::Args),
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Prepare every sample with the family's plugin and summarise the
    /// problems (missing or corrupt images, placeholder/image mismatches,
    /// empty answers, samples too long), with file, line and sample index.
    Check(data::CheckArgs),
    /// Synthetic OCR data: rendered words, numbers, dates and short lines
    /// (embedded font; varied size, position, colour, noise) with their text
    /// as the answer, as messages JSONL + PNG files, from a fixed seed.
    SynthOcr(synth::Args),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    init_tracing();
    crate::plugin::torch_env::ensure_cuda_backend();
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("VLMHOST_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Plugins(args) => plugins::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Init(args) => init::run(args),
        Command::Data(DataCommand::Check(args)) => data::check(args),
        Command::Data(DataCommand::SynthOcr(args)) => synth::run(args),
        Command::Report(args) => report::run(args),
        Command::Doctor(args) => doctor::run(args),
    }
}

// The shared argument groups, where code outside the binary (tools, tests) expects them.
pub use commands::args::{parse_device, parse_processor_option, DataArgs, ModelArgs};
