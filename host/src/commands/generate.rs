//! `vlmhost generate`: greedy decoding from an image and a prompt, streamed
//! to the terminal as the text grows (or printed as JSON at the end).

use super::args::AdaptedModelArgs;
use super::print_json;
use crate::model::checkpoint::plugin_err;
use crate::model::generate::{greedy, prompt_sample, stop_tokens, warn_without_stop_tokens, Detokenizer};
use anyhow::{bail, Result};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: AdaptedModelArgs,
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
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Some(path) = &args.image {
        if !path.is_file() {
            bail!("--image {}: no such file", path.display());
        }
    }
    let m = args.model.open()?;
    let sample = prompt_sample(args.image.as_deref(), &args.prompt);
    let prepared = m
        .prepare(&serde_json::to_string(&sample)?)
        .map_err(|e| plugin_err(m.family(), "preparing the prompt", e))?;
    let detok = Detokenizer::from_dir(m.model_dir())?;
    let stop = stop_tokens(m.model_dir());
    warn_without_stop_tokens(m.model_dir(), &stop);
    let mut stream = Stream { detok: &detok, shown: String::new(), tokens: Vec::new() };
    let (tokens, stopped) = greedy(&m, &prepared, args.max_new_tokens, &stop, |t| if args.json { Ok(()) } else { stream.push(t) })?;
    if args.json {
        print_json(&serde_json::json!({
            "prompt_tokens": prepared.input_ids.len(),
            "tokens": tokens,
            "text": detok.decode(&tokens)?,
            "stopped": stopped,
        }))?;
    } else {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

/// The text generated so far, printed as it grows.
struct Stream<'a> {
    detok: &'a Detokenizer,
    shown: String,
    tokens: Vec<i64>,
}

impl Stream<'_> {
    /// Decode everything so far and print what is new (a character may span tokens).
    fn push(&mut self, token: i64) -> Result<()> {
        self.tokens.push(token);
        let text = self.detok.decode(&self.tokens)?;
        if let Some(new) = text.strip_prefix(self.shown.as_str()) {
            let mut out = std::io::stdout().lock();
            write!(out, "{new}")?;
            out.flush()?;
        }
        self.shown = text;
        Ok(())
    }
}
