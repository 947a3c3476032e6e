//! The `vlmhost` command line.

use crate::doctor::{DoctorReport, PluginsReport};
use crate::loader::{self, Discovery};
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
    Plugins {
        /// Show only the library `--plugin` would load: a family name or a library path.
        #[arg(long, value_name = "NAME|PATH")]
        plugin: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check libtorch, CUDA and every plugin; report every problem at once.
    ///
    /// Exits non-zero when anything is broken.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    init_tracing();
    crate::torch_env::ensure_cuda_backend();
    let cli = Cli::parse();
    match run(cli) {
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Plugins { plugin, json } => plugins(plugin.as_deref(), json),
        Command::Doctor { json } => {
            let report = DoctorReport::collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

fn plugins(spec: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let discovery = match spec {
        Some(spec) => {
            let plugin = loader::resolve(spec)?;
            Discovery { searched: loader::search_path(), plugins: vec![plugin], problems: vec![] }
        }
        None => Discovery::default_path(),
    };
    let report = PluginsReport::from_discovery(&discovery);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
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
        eprintln!("searched: {}", {
            let dirs: Vec<String> = report.searched.iter().map(|d| d.path.display().to_string()).collect();
            dirs.join(", ")
        });
    }
    Ok(ExitCode::SUCCESS)
}
