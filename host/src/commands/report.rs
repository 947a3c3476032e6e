//! `vlmhost report RUN_DIR...`: runs side by side ([`crate::report::runs`]).

use super::print_json;
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run folders of `vlmhost train`.
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// The loss-curve PNG.
    #[arg(long, value_name = "FILE", default_value = "report.png")]
    output: PathBuf,
    /// Print JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let r = crate::report::runs::report(&args.runs, &args.output)?;
    if args.json {
        print_json(&r)?;
    } else {
        print!("{}", r.markdown());
        if let Some(p) = &r.plot {
            eprintln!("loss curves: {}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
