//! `vlmhost data check`: every sample prepared by the family's plugin, and
//! the problems summarised with file, line and sample index.

use super::args::{DataArgs, ModelArgs};
use super::print_json;
use crate::train::dataset;
use anyhow::Result;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn check(args: CheckArgs) -> Result<ExitCode> {
    let (cfg, opts) = args.model.resolve()?;
    let m = crate::model::open(&opts, &cfg)?;
    let ds = dataset::load(&args.data.dataset, &m, &args.data.options())?;
    if args.json {
        print_json(&serde_json::json!({
            "total": ds.total,
            "usable": ds.records.len(),
            "truncated": ds.truncated,
            "tokens": ds.records.iter().map(|r| r.length).sum::<usize>(),
            "supervised_tokens": ds.records.iter().map(|r| r.supervised).sum::<usize>(),
            "problems": ds.problems,
        }))?;
    } else {
        println!("{}", ds.summary(&args.data.dataset));
    }
    Ok(ExitCode::SUCCESS)
}
