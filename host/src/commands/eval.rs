//! `vlmhost eval`: the loss on a data set (the mean over assistant tokens and
//! each sample's), and with `--generate` the answers generated and scored.

use super::args::AdaptedModelArgs;
use super::print_json;
use crate::train::dataset::{self, DatasetOptions};
use crate::train::Evaluation;
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: AdaptedModelArgs,
    /// Messages JSONL or LLaVA JSON/JSONL; image paths relative to its folder.
    #[arg(long, value_name = "FILE")]
    dataset: PathBuf,
    /// Print JSON: {"loss": f, "samples": [{"index", "loss", "tokens"}]}
    /// (with --generate also "cer", "wer", "exact_match" and "generated").
    #[arg(long)]
    json: bool,
    /// Also generate each sample's answer (greedy) from its prompt and
    /// score it against the reference: character and word error rates
    /// and exact match.
    #[arg(long)]
    generate: bool,
    /// Longest generated answer, in tokens (with --generate).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let m = args.model.open()?;
    let ds = dataset::load(&args.dataset, &m, &DatasetOptions::from(&m.config().train))?;
    if !ds.problems.is_empty() {
        eprintln!("{}", ds.summary(&args.dataset));
    }
    let eval = Evaluation::run(&m, &ds.records, args.generate.then_some(args.max_new_tokens))?;
    if args.json {
        print_json(&eval.to_json()?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let tokens: i64 = eval.samples.iter().map(|s| s.tokens).sum();
    println!("loss {:.6} over {} sample(s), {tokens} supervised token(s)", eval.loss, eval.samples.len());
    if let Some((o, _)) = &eval.generation {
        println!("CER {:.4}, WER {:.4}, exact match {:.4} over {} generated answer(s)", o.cer, o.wer, o.exact_match, o.samples);
    }
    Ok(ExitCode::SUCCESS)
}
