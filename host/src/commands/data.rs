//! `vlmhost data check`: every sample prepared by the family's plugin, and
//! the problems summarised with file, line and sample index; with `--show N`,
//! the first N samples as the model sees them.

use super::args::{DataArgs, ModelArgs};
use super::print_json;
use crate::model::generate::Detokenizer;
use crate::model::{HostModel, PreparedSample};
use crate::train::dataset::{self, Record};
use crate::train::micro_batch;
use anyhow::Result;
use serde::Serialize;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Also print the first N usable samples as the model sees them: the
    /// decoded text with each run of image tokens collapsed and the labelled
    /// (supervised) tokens between [[ and ]], with token counts.
    #[arg(long, value_name = "N", default_value_t = 0)]
    show: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn check(args: CheckArgs) -> Result<ExitCode> {
    let (cfg, opts) = args.model.resolve()?;
    let m = crate::model::open(&opts, &cfg)?;
    let ds = dataset::load(&args.data.dataset, &m, &args.data.options())?;
    let shown = if args.show == 0 {
        Vec::new()
    } else {
        let detok = Detokenizer::from_dir(m.model_dir())?;
        ds.records.iter().take(args.show).map(|r| SampleView::of(&m, &detok, r)).collect::<Result<Vec<_>>>()?
    };
    if args.json {
        print_json(&serde_json::json!({
            "total": ds.total,
            "usable": ds.records.len(),
            "truncated": ds.truncated,
            "tokens": ds.records.iter().map(|r| r.length).sum::<usize>(),
            "supervised_tokens": ds.records.iter().map(|r| r.supervised).sum::<usize>(),
            "problems": ds.problems,
            "shown": shown,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", ds.summary(&args.data.dataset));
    if !shown.is_empty() {
        println!("\nThe first {} usable sample(s) as the model sees them (labelled tokens between [[ and ]]):", shown.len());
    }
    for s in &shown {
        println!(
            "\n--- {}: {} tokens ({} image, {} labelled){}",
            s.origin,
            s.tokens,
            s.image_tokens,
            s.labelled_tokens,
            if s.truncated { ", truncated" } else { "" }
        );
        println!("{}", s.text);
    }
    Ok(ExitCode::SUCCESS)
}

/// One sample as the model sees it.
#[derive(Debug, Serialize)]
struct SampleView {
    index: usize,
    origin: String,
    tokens: usize,
    image_tokens: usize,
    labelled_tokens: usize,
    truncated: bool,
    /// The decoded tokens, special ones included; image-token runs collapsed
    /// to `<TOKEN ×N>`, labelled runs between `[[` and `]]`.
    text: String,
}

/// What a token is, for showing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image,
    Labelled,
    Prompt,
}

impl SampleView {
    fn of(m: &HostModel, detok: &Detokenizer, r: &Record) -> Result<SampleView> {
        let p = micro_batch::prepare(m, &[r])?.remove(0);
        Ok(SampleView {
            index: r.origin.index,
            origin: r.origin.to_string(),
            tokens: p.input_ids.len(),
            image_tokens: p.image_token_mask.iter().filter(|&&b| b).count(),
            labelled_tokens: p.labels.iter().filter(|&&l| l != crate::model::batch::IGNORE_INDEX).count(),
            truncated: r.truncate_to.is_some(),
            text: marked_text(&p, detok)?,
        })
    }
}

/// The sample's tokens decoded run by run (a run: consecutive tokens of one [`Kind`]).
fn marked_text(p: &PreparedSample, detok: &Detokenizer) -> Result<String> {
    let kind = |i: usize| {
        if p.image_token_mask.get(i).copied().unwrap_or(false) {
            Kind::Image
        } else if p.labels[i] != crate::model::batch::IGNORE_INDEX {
            Kind::Labelled
        } else {
            Kind::Prompt
        }
    };
    let mut out = String::new();
    let mut start = 0;
    while start < p.input_ids.len() {
        let k = kind(start);
        let end = (start..p.input_ids.len()).find(|&i| kind(i) != k).unwrap_or(p.input_ids.len());
        let ids = &p.input_ids[start..end];
        match k {
            Kind::Image => {
                let token = detok.decode_with_special(&ids[..1])?;
                out.push_str(&format!("<{} ×{}>", token.trim_matches(|c| c == '<' || c == '>'), ids.len()));
            }
            Kind::Labelled => out.push_str(&format!("[[{}]]", detok.decode_with_special(ids)?)),
            Kind::Prompt => out.push_str(&detok.decode_with_special(ids)?),
        }
        start = end;
    }
    Ok(out)
}
