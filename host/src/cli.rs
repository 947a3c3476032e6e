//! The `vlmhost` command line.

use crate::doctor::{DoctorReport, PluginsReport};
use crate::config::TrainConfig;
use anyhow::Context as _;
use crate::dataset::{self, BadSamplePolicy, DatasetOptions, TooLongPolicy};
use crate::inspect::InspectReport;
use crate::loader::{self, Discovery};
use crate::model::{HostModel, OpenOptions};
use crate::train::{self, Resume, TrainJob};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
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
    /// The dry run: what would train, per role, and the LoRA targets.
    ///
    /// Opens the checkpoint through its plugin and checks its keys and shapes
    /// without loading tensor data.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune: check the data, apply the rules, train, checkpoint.
    ///
    /// `TRAINING_MODE=llm vlmhost train --dataset data.jsonl` takes the plugin
    /// and the model from config/train_config.yaml.
    Train {
        #[command(flatten)]
        model: ModelArgs,
        /// Messages JSONL or LLaVA JSON/JSONL; image paths relative to its folder.
        #[arg(long, value_name = "FILE")]
        dataset: PathBuf,
        /// Run folder [default: runs/FAMILY-MODE].
        #[arg(long, value_name = "DIR")]
        output: Option<PathBuf>,
        /// Continue a run: its latest checkpoint, or the checkpoint folder given.
        #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "latest")]
        resume: Option<String>,
        /// Start from an earlier stage's checkpoint (stage 2 from stage 1's
        /// projector), or from an adapter PEFT saved (continue training it).
        #[arg(long, value_name = "CHECKPOINT")]
        init_from: Option<PathBuf>,
        /// Optimizer steps (overrides train.max_steps and train.epochs).
        #[arg(long)]
        max_steps: Option<usize>,
        /// Held-out data for validation (overrides train.val_dataset and train.val_size).
        #[arg(long, value_name = "FILE")]
        val_dataset: Option<PathBuf>,
    },
    /// Loss on a data set: the mean over assistant tokens and each sample's.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// A checkpoint folder of `vlmhost train` to evaluate instead of the base model.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
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
    },
    /// Greedy decoding from an image and a prompt, streamed to the terminal,
    /// with the family's key/value cache.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// A vlmhost checkpoint or a PEFT adapter folder.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
        /// The image (families that read images need one).
        #[arg(long, value_name = "FILE")]
        image: Option<PathBuf>,
        /// The user's text.
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Print JSON (tokens, text, why it stopped) instead of streaming.
        #[arg(long)]
        json: bool,
    },
    /// A complete Hugging Face checkpoint with the adapter merged: LoRA folded
    /// into its weights, fully trained modules included, config, tokenizer and
    /// processor files copied.
    Merge {
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
    },
    /// The same data and rules over several families, one after another: a
    /// report (Markdown, JSON, loss-curve PNG) of parameters per role, losses,
    /// held-out CER, tokens/s and peak memory.
    Compare {
        /// Families (or plugin library paths), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        plugins: Vec<String>,
        /// A model folder for a family, FAMILY=DIR (repeatable); the others
        /// get a new `--preset` checkpoint from `vlmhost init`.
        #[arg(long = "model", value_name = "FAMILY=DIR")]
        models: Vec<String>,
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long, value_name = "FILE")]
        dataset: PathBuf,
        /// Held-out data: final loss and CER of generated answers.
        #[arg(long, value_name = "FILE")]
        val_dataset: Option<PathBuf>,
        /// One training configuration for every family.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long)]
        max_steps: Option<usize>,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// A processor option for every family, KEY=VALUE (repeatable).
        #[arg(long = "processor", value_name = "KEY=VALUE")]
        processor: Vec<String>,
        #[arg(long, value_name = "DIR")]
        output: PathBuf,
    },
    /// A new, randomly initialised checkpoint of a family (config, weights,
    /// tokenizer, processor settings), to train with nothing downloaded.
    Init {
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
    },
    /// Data sets: check every sample before training; make synthetic OCR data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Runs side by side: a Markdown table (or JSON) of their losses, speed
    /// and eval metrics (eval.json), and one PNG of their loss curves.
    Report {
        /// Run folders of `vlmhost train`.
        #[arg(required = true, value_name = "RUN_DIR")]
        runs: Vec<PathBuf>,
        /// The loss-curve PNG.
        #[arg(long, value_name = "FILE", default_value = "report.png")]
        output: PathBuf,
        /// Print JSON instead of Markdown.
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

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Prepare every sample with the family's plugin and summarise the
    /// problems (missing or corrupt images, placeholder/image mismatches,
    /// empty answers, samples too long), with file, line and sample index.
    Check {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        data: DataArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Synthetic OCR data: rendered words, numbers, dates and short lines
    /// (embedded font; varied size, position, colour, noise) with their text
    /// as the answer, as messages JSONL + PNG files, from a fixed seed.
    SynthOcr {
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, value_name = "DIR")]
        output: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 256)]
        width: u32,
        #[arg(long, default_value_t = 64)]
        height: u32,
        /// The user's text after the image.
        #[arg(long, default_value = "Free OCR.")]
        prompt: String,
        /// The kinds of text drawn, comma-separated: words, numbers (integers,
        /// decimals, ISO dates), lines (2-4 words), letters (2-8 random letters).
        #[arg(long, value_delimiter = ',', default_value = "words,numbers,lines", value_parser = parse_text_kind)]
        kinds: Vec<crate::synth::TextKind>,
        /// Smallest font size in pixels (the font shrinks down to it until the text fits).
        #[arg(long, default_value_t = 12.0)]
        min_font_px: f32,
        /// Largest font size in pixels.
        #[arg(long, default_value_t = 40.0)]
        max_font_px: f32,
        /// Standard deviation of the pixel noise, in 0..255 units (0: none).
        #[arg(long, default_value_t = 4.0)]
        noise: f32,
        /// Fixed pitch: each character centred in a cell this many pixels wide,
        /// left-aligned on the cell grid, centred vertically (0: the font's own
        /// spacing, anywhere in the image).
        #[arg(long, default_value_t = 0)]
        pitch: u32,
        /// Write into a folder that is not empty.
        #[arg(long)]
        force: bool,
    },
}

fn parse_text_kind(s: &str) -> Result<crate::synth::TextKind, String> {
    crate::synth::TextKind::parse(s).ok_or_else(|| format!("{s:?} is not a kind of text: use words, numbers, lines or letters"))
}

/// How a data set is read.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Messages JSONL or LLaVA JSON/JSONL; image paths relative to its folder.
    #[arg(long, value_name = "FILE")]
    pub dataset: PathBuf,
    /// Maximum tokens per sample.
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Longer samples: truncate (never into image tokens) or skip.
    #[arg(long, value_enum, default_value_t = TooLongArg::Truncate)]
    pub too_long: TooLongArg,
    /// Bad samples: skip them (counted and listed) or fail.
    #[arg(long, value_enum, default_value_t = OnBadArg::Skip)]
    pub on_bad_sample: OnBadArg,
    /// A system prompt for samples without one.
    #[arg(long)]
    pub system_prompt: Option<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TooLongArg {
    Truncate,
    Skip,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OnBadArg {
    Skip,
    Fail,
}

impl DataArgs {
    pub fn options(&self) -> DatasetOptions {
        DatasetOptions {
            max_length: self.max_length,
            too_long: match self.too_long {
                TooLongArg::Truncate => TooLongPolicy::Truncate,
                TooLongArg::Skip => TooLongPolicy::Skip,
            },
            on_bad_sample: match self.on_bad_sample {
                OnBadArg::Skip => BadSamplePolicy::Skip,
                OnBadArg::Fail => BadSamplePolicy::Fail,
            },
            system_prompt: self.system_prompt.clone(),
        }
    }
}

/// Where the model comes from and which rules apply.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Family name or plugin library path [default: the config file's `plugin`].
    #[arg(long, value_name = "NAME|PATH")]
    pub plugin: Option<String>,
    /// Hugging Face checkpoint folder [default: the config file's `model`].
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Training configuration [default: config/train_config.yaml if present].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// projector | llm | vision | both [default: $TRAINING_MODE, then the config file, then llm].
    #[arg(long)]
    pub mode: Option<String>,
    /// Initialise parameters the checkpoint lacks (a new head) instead of failing.
    #[arg(long)]
    pub allow_missing: bool,
    /// auto (the first GPU if CUDA is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A processor option for the family's plugin, as KEY=VALUE (repeatable;
    /// overrides the config file's `processor:`), e.g. `--processor mode=tiny`.
    #[arg(long = "processor", value_name = "KEY=VALUE")]
    pub processor: Vec<String>,
}

/// Parse `--processor KEY=VALUE`: the value as JSON when it parses (numbers,
/// booleans), else as a string.
pub fn parse_processor_option(s: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let (key, value) = s
        .split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .ok_or_else(|| anyhow::anyhow!("--processor {s:?}: write KEY=VALUE, e.g. --processor mode=tiny"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok((key.trim().to_owned(), value))
}

/// Parse `--device`.
pub fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    let device = match s {
        "auto" => tch::Device::cuda_if_available(),
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => anyhow::bail!("--device {other:?}: use auto, cpu, cuda or cuda:N"),
        },
    };
    if let tch::Device::Cuda(n) = device {
        let count = tch::Cuda::device_count();
        if !tch::Cuda::is_available() || n as i64 >= count {
            anyhow::bail!("--device {s}: CUDA has {count} usable device(s) here; `vlmhost doctor` says why");
        }
    }
    Ok(device)
}

impl ModelArgs {
    /// The configuration file and the open options, resolved with the
    /// precedence flags > environment > file > defaults.
    pub fn resolve(&self) -> anyhow::Result<(TrainConfig, OpenOptions)> {
        let default_cfg = PathBuf::from("config/train_config.yaml");
        let cfg = match &self.config {
            Some(p) => TrainConfig::from_file(p)?,
            None if default_cfg.is_file() => TrainConfig::from_file(&default_cfg)?,
            None => TrainConfig::default(),
        };
        cfg.apply_image_limit();
        let env_mode = std::env::var("TRAINING_MODE").ok();
        let mode = cfg.resolve_mode(self.mode.as_deref(), env_mode.as_deref())?;
        let plugin = self.plugin.clone().or_else(|| cfg.plugin.clone()).ok_or_else(|| {
            anyhow::anyhow!("no plugin: pass --plugin NAME (see `vlmhost plugins`) or set `plugin:` in the config file")
        })?;
        let model_dir = self.model.clone().or_else(|| cfg.model.clone()).ok_or_else(|| {
            anyhow::anyhow!("no model: pass --model DIR (a Hugging Face checkpoint folder) or set `model:` in the config file")
        })?;
        let opts = OpenOptions {
            plugin,
            model_dir,
            mode,
            kind: tch::Kind::Float,
            device: parse_device(&self.device)?,
            allow_missing: self.allow_missing,
            load_weights: true,
            processor: {
                let mut p = cfg.processor.clone();
                for s in &self.processor {
                    let (k, v) = parse_processor_option(s)?;
                    p.insert(k, v);
                }
                p
            },
        };
        Ok((cfg, opts))
    }
}

/// Open the model with an adapter: a PEFT adapter folder (its modules decide
/// the rules) or a `vlmhost train` checkpoint (its saved rules decide).
pub fn open_with_adapter(opts: &OpenOptions, cfg: &TrainConfig, adapter: Option<&std::path::Path>) -> anyhow::Result<HostModel> {
    Ok(match adapter {
        Some(dir) if crate::peft::is_peft_dir(dir) => {
            let mut read = None;
            let m = HostModel::open_with(opts, |spec, roles| {
                let a = crate::peft::PeftAdapter::read(dir, spec)?;
                let chosen = a.train_config(spec, roles, cfg)?;
                read = Some(a);
                Ok(chosen)
            })?;
            read.expect("read when opened").load_into(&m)?;
            m
        }
        Some(dir) => {
            let saved = TrainConfig::from_file(&dir.join("config.yaml")).with_context(|| {
                format!("{} is neither a vlmhost checkpoint (config.yaml) nor a PEFT adapter (adapter_config.json)", dir.display())
            })?;
            let mode = saved.mode.unwrap_or(opts.mode);
            let m = HostModel::open_with(opts, |_, _| Ok((saved.clone(), mode)))?;
            m.load_tensors(&train::read_tensors(&dir.join("trainable.safetensors"))?, true)?;
            m
        }
        None => HostModel::open(opts, cfg)?,
    })
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
        Command::Inspect { model, json } => {
            let (cfg, mut opts) = model.resolve()?;
            opts.load_weights = false;
            let m = HostModel::open(&opts, &cfg)?;
            let report = InspectReport::new(&m);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train { model, dataset, output, resume, init_from, max_steps, val_dataset } => {
            let (mut cfg, opts) = model.resolve()?;
            if max_steps.is_some() {
                cfg.train.max_steps = max_steps;
                cfg.validate().map_err(|e| anyhow::anyhow!("--max-steps: {e}"))?;
            }
            if val_dataset.is_some() {
                cfg.train.val_dataset = val_dataset;
            }
            cfg.plugin = Some(opts.plugin.clone());
            cfg.model = Some(opts.model_dir.clone());
            cfg.mode = Some(opts.mode);
            // Continuing from an adapter PEFT saved: its modules decide the LoRA rules.
            let (m, init_from) = match &init_from {
                Some(dir) if crate::peft::is_peft_dir(dir) => {
                    let m = open_with_adapter(&opts, &cfg, Some(dir))?;
                    eprintln!("initialised from the PEFT adapter {}", dir.display());
                    (m, None)
                }
                _ => (HostModel::open(&opts, &cfg)?, init_from),
            };
            let cfg = m.config.clone();
            for w in &m.plan.warnings {
                eprintln!("warning: {w}");
            }
            let output = output.unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", m.family, m.plan.mode.name())));
            let job = TrainJob {
                dataset,
                output,
                resume: resume.map(|r| if r == "latest" { Resume::Latest } else { Resume::Path(r.into()) }),
                init_from,
                progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let summary = train::train(&m, &cfg, &job)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval { model, adapter, dataset, json, generate, max_new_tokens } => {
            let (cfg, opts) = model.resolve()?;
            let m = open_with_adapter(&opts, &cfg, adapter.as_deref())?;
            let cfg = m.config.clone();
            let ds = dataset::load(&dataset, &m, &train::dataset_options(&cfg))?;
            if !ds.problems.is_empty() {
                eprintln!("{}", ds.summary(&dataset));
            }
            let eval = train::Evaluation::run(&m, &ds.records, generate.then_some(max_new_tokens))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&eval.to_json()?)?);
            } else {
                let tokens: i64 = eval.samples.iter().map(|s| s.tokens).sum();
                println!("loss {:.6} over {} sample(s), {tokens} supervised token(s)", eval.loss, eval.samples.len());
                if let Some((o, _)) = &eval.generation {
                    println!("CER {:.4}, WER {:.4}, exact match {:.4} over {} generated answer(s)", o.cer, o.wer, o.exact_match, o.samples);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { model, adapter, image, prompt, max_new_tokens, json } => {
            use std::io::Write as _;
            let (cfg, opts) = model.resolve()?;
            if let Some(path) = &image {
                if !path.is_file() {
                    anyhow::bail!("--image {}: no such file", path.display());
                }
            }
            let m = open_with_adapter(&opts, &cfg, adapter.as_deref())?;
            let sample = crate::generate::prompt_sample(image.as_deref(), &prompt);
            let prepared = m
                .prepare(&serde_json::to_string(&sample)?)
                .map_err(|e| crate::model::plugin_err(&m.family, "preparing the prompt", e))?;
            let detok = crate::generate::Detokenizer::from_dir(&m.model_dir)?;
            let stop = crate::generate::stop_tokens(&m.model_dir);
            crate::generate::warn_without_stop_tokens(&m.model_dir, &stop);
            let mut shown = String::new();
            let mut sofar = Vec::new();
            let stdout = std::io::stdout();
            let (tokens, stopped) = crate::generate::greedy(&m, &prepared, max_new_tokens, &stop, |t| {
                if !json {
                    // Decode everything so far and print what is new (a
                    // character may span tokens).
                    sofar.push(t);
                    let text = detok.decode(&sofar)?;
                    if let Some(new) = text.strip_prefix(shown.as_str()) {
                        let mut out = stdout.lock();
                        write!(out, "{new}")?;
                        out.flush()?;
                    }
                    shown = text;
                }
                Ok(())
            })?;
            if json {
                let v = serde_json::json!({
                    "prompt_tokens": prepared.input_ids.len(),
                    "tokens": tokens,
                    "text": detok.decode(&tokens)?,
                    "stopped": stopped,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Merge { model, adapter, output, force, max_shard_size_gb } => {
            let (cfg, opts) = model.resolve()?;
            crate::merge::check_output(&output, &opts.model_dir, &adapter, force)?;
            let m = open_with_adapter(&opts, &cfg, Some(&adapter))?;
            let n = crate::merge::merge(&m, &adapter, &output, force, (max_shard_size_gb * 1e9) as usize)?;
            println!("merged checkpoint written to {} ({n} tensors)", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::Check { model, data, json }) => {
            let (cfg, opts) = model.resolve()?;
            let m = HostModel::open(&opts, &cfg)?;
            let ds = dataset::load(&data.dataset, &m, &data.options())?;
            if json {
                let v = serde_json::json!({
                    "total": ds.total,
                    "usable": ds.records.len(),
                    "truncated": ds.truncated,
                    "tokens": ds.records.iter().map(|r| r.length).sum::<usize>(),
                    "supervised_tokens": ds.records.iter().map(|r| r.supervised).sum::<usize>(),
                    "problems": ds.problems,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", ds.summary(&data.dataset));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(DataCommand::SynthOcr { count, output, seed, width, height, prompt, kinds, min_font_px, max_font_px, noise, pitch, force }) => {
            let opts = crate::synth::SynthOptions { count, seed, width, height, prompt, kinds, min_font_px, max_font_px, noise, pitch, force, ..Default::default() };
            let r = crate::synth::synth_ocr(&output, &opts)?;
            println!(
                "{} samples ({} words, {} numbers, {} lines, {} letter strings) written to {}",
                r.count, r.words, r.numbers, r.lines, r.letters, r.data_file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { runs, output, json } => {
            let r = crate::report::report(&runs, &output)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.markdown());
                if let Some(p) = &r.plot {
                    eprintln!("loss curves: {}", p.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare { plugins, models, preset, dataset, val_dataset, config, max_steps, max_new_tokens, processor, output } => {
            let models = models
                .iter()
                .map(|m| {
                    m.split_once('=')
                        .map(|(f, d)| (f.to_owned(), PathBuf::from(d)))
                        .ok_or_else(|| anyhow::anyhow!("--model {m:?}: write FAMILY=DIR"))
                })
                .collect::<anyhow::Result<_>>()?;
            let job = crate::compare::CompareJob {
                plugins, models, preset, dataset, val_dataset, config, max_steps, max_new_tokens, processor, output,
            };
            let r = crate::compare::compare(&job)?;
            print!("{}", r.markdown());
            eprintln!("report written to {}", job.output.join("report.md").display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { plugin, family, preset, output, seed, force } => {
            let r = crate::init::init(&plugin, family.as_deref(), &preset, &output, seed, force)?;
            println!(
                "{} checkpoint ({} preset, {} parameters in {} tensors, seed {seed}) written to {}",
                r.family, r.preset, r.parameters, r.tensors, r.output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
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
