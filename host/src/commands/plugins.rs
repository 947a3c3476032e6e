//! `vlmhost plugins`: the plugin libraries found and the families they serve.

use super::doctor::PluginsReport;
use super::print_json;
use crate::plugin::loader::{self, Discovery};
use anyhow::Result;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show only the library `--plugin` would load: a family name or a library path.
    #[arg(long, value_name = "NAME|PATH")]
    plugin: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let discovery = match &args.plugin {
        Some(spec) => {
            let plugin = loader::resolve(spec)?;
            Discovery { searched: loader::search_path(), plugins: vec![plugin], problems: vec![] }
        }
        None => Discovery::default_path(),
    };
    let report = PluginsReport::from_discovery(&discovery);
    if args.json {
        print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    if report.plugins.is_empty() {
        println!("no plugins found");
    } else {
        print!("{}", report.table());
    }
    for p in &report.problems {
        eprintln!("warning: {}", p.error);
    }
    for (family, libs) in &report.duplicates {
        let libs: Vec<String> = libs.iter().map(|p| p.display().to_string()).collect();
        eprintln!("warning: family {family:?} is served by several libraries: {}", libs.join(", "));
    }
    if report.plugins.is_empty() || !report.problems.is_empty() {
        let dirs: Vec<String> = report.searched.iter().map(|d| d.path.display().to_string()).collect();
        eprintln!("searched: {}", dirs.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
