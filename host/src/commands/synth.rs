//! Synthetic OCR data: images of words, numbers and short lines drawn with
//! the embedded font ([`crate::font::DEJAVU_SANS`], rasterised by ab_glyph),
//! and a `data.jsonl` in the messages format the data loader reads
//! ([`vlmhost_plugin_api::sample::parse_line`]):
//!
//! ```json
//! {"messages": [{"role": "user", "content": [{"type": "image", "path": "images/00000.png"}, {"type": "text", "text": "Free OCR."}]},
//!               {"role": "assistant", "content": [{"type": "text", "text": "<the rendered text>"}]}]}
//! ```
//!
//! Each sample varies the font size, position, text and background colours
//! (WCAG contrast ratio at least 4.5) and adds light Gaussian-like pixel noise.
//! Sample `i` draws from its own ChaCha8 stream of `seed`, so a seed gives
//! byte-identical PNGs, and a larger `count` only appends samples. The text's
//! inked pixels always lie inside the image, `margin` pixels from the edge:
//! the font shrinks until the text fits, and a text that cannot fit even at
//! `min_font_px` is drawn again.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::{Path, PathBuf};
use vlmhost_plugin_api::sample::{Message, Part, Sample, Speaker};
use std::process::ExitCode;

/// What [`synth_ocr`] makes.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    /// Number of samples.
    pub count: usize,
    pub seed: u64,
    /// Image size in pixels.
    pub width: u32,
    pub height: u32,
    /// The user's text after the image.
    pub prompt: String,
    /// Font size range in pixels (ascent to descent); the font shrinks below
    /// the drawn size until the text fits, never below `min_font_px`.
    pub min_font_px: f32,
    pub max_font_px: f32,
    /// Free pixels between the text's ink and the image's edge.
    pub margin: u32,
    /// Standard deviation of the pixel noise, in 0..255 units (0: none).
    pub noise: f32,
    /// Fixed pitch: each character centred in a cell this many pixels wide,
    /// the first cell on the cell grid after the margin, the line centred
    /// vertically (a receipt printer's or a form field's layout); 0: the
    /// font's own spacing, anywhere in the image.
    pub pitch: u32,
    /// The kinds of text drawn (at least one), in the proportions of
    /// [`random_text`] among those given.
    pub kinds: Vec<TextKind>,
    /// Write into a non-empty output folder (images and `data.jsonl` of the
    /// same names are overwritten; other files are left as they are).
    pub force: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            count: 1000,
            seed: 0,
            width: 256,
            height: 64,
            prompt: "Free OCR.".to_owned(),
            min_font_px: 12.0,
            max_font_px: 40.0,
            margin: 2,
            noise: 4.0,
            pitch: 0,
            kinds: TextKind::DEFAULT.to_vec(),
            force: false,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = SynthOptions::default().count)]
    count: usize,
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    #[arg(long, default_value_t = SynthOptions::default().seed)]
    seed: u64,
    #[arg(long, default_value_t = SynthOptions::default().width)]
    width: u32,
    #[arg(long, default_value_t = SynthOptions::default().height)]
    height: u32,
    /// The user's text after the image.
    #[arg(long, default_value_t = SynthOptions::default().prompt)]
    prompt: String,
    /// The kinds of text drawn, comma-separated: words, numbers (integers,
    /// decimals, ISO dates), lines (2-4 words), letters (2-8 random letters).
    #[arg(long, value_delimiter = ',', default_value = "words,numbers,lines", value_parser = parse_text_kind)]
    kinds: Vec<TextKind>,
    /// Smallest font size in pixels (the font shrinks down to it until the text fits).
    #[arg(long, default_value_t = SynthOptions::default().min_font_px)]
    min_font_px: f32,
    /// Largest font size in pixels.
    #[arg(long, default_value_t = SynthOptions::default().max_font_px)]
    max_font_px: f32,
    /// Standard deviation of the pixel noise, in 0..255 units (0: none).
    #[arg(long, default_value_t = SynthOptions::default().noise)]
    noise: f32,
    /// Fixed pitch: each character centred in a cell this many pixels wide,
    /// left-aligned on the cell grid, centred vertically (0: the font's own
    /// spacing, anywhere in the image).
    #[arg(long, default_value_t = SynthOptions::default().pitch)]
    pitch: u32,
    /// Write into a folder that is not empty.
    #[arg(long)]
    force: bool,
}

fn parse_text_kind(s: &str) -> Result<TextKind, String> {
    TextKind::parse(s).ok_or_else(|| format!("{s:?} is not a kind of text: use words, numbers, lines or letters"))
}

/// `vlmhost data synth-ocr`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Args { count, output, seed, width, height, prompt, kinds, min_font_px, max_font_px, noise, pitch, force } = args;
    let opts = SynthOptions { count, seed, width, height, prompt, kinds, min_font_px, max_font_px, noise, pitch, force, ..Default::default() };
    let r = synth_ocr(&output, &opts)?;
    println!(
        "{} samples ({} words, {} numbers, {} lines, {} letter strings) written to {}",
        r.count, r.words, r.numbers, r.lines, r.letters, r.data_file.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// What [`synth_ocr`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthReport {
    pub count: usize,
    pub data_file: PathBuf,
    pub images_dir: PathBuf,
    /// Samples of each kind.
    pub words: usize,
    pub numbers: usize,
    pub lines: usize,
    pub letters: usize,
}

/// The kinds of text drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// One common English word, lower, capitalised or upper case.
    Word,
    /// An integer, a decimal or an ISO date.
    Number,
    /// Two to four words, sometimes with a full stop.
    Line,
    /// Two to eight random letters, upper or lower case: text with no
    /// language to guess from, only the image to read.
    Letters,
}

impl TextKind {
    /// What synth-ocr draws unless told otherwise.
    pub const DEFAULT: [TextKind; 3] = [TextKind::Word, TextKind::Number, TextKind::Line];
    pub const ALL: [TextKind; 4] = [TextKind::Word, TextKind::Number, TextKind::Line, TextKind::Letters];

    /// `words`, `numbers`, `lines` (the names `--kinds` takes).
    pub fn name(self) -> &'static str {
        match self {
            TextKind::Word => "words",
            TextKind::Number => "numbers",
            TextKind::Line => "lines",
            TextKind::Letters => "letters",
        }
    }

    pub fn parse(s: &str) -> Option<TextKind> {
        TextKind::ALL.into_iter().find(|k| k.name() == s.trim())
    }

    /// Relative frequency when every kind is drawn (out of 20).
    fn weight(self) -> u32 {
        match self {
            TextKind::Word => 8,
            TextKind::Number => 5,
            TextKind::Line => 7,
            TextKind::Letters => 8,
        }
    }
}

/// Common English words the texts are made of.
pub const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his", "they", "at", "be",
    "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said",
    "there", "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up", "other", "about", "out", "many", "then",
    "them", "these", "so", "some", "her", "would", "make", "like", "him", "into", "time", "has", "look", "two", "more", "write", "go",
    "see", "number", "no", "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now", "find",
    "long", "down", "day", "did", "get", "come", "made", "may", "part", "over", "new", "sound", "take", "only", "little", "work", "know",
    "place", "year", "live", "me", "back", "give", "most", "very", "after", "thing", "our", "just", "name", "good", "sentence", "man",
    "think", "say", "great", "where", "help", "through", "much", "before", "line", "right", "too", "mean", "old", "any", "same", "tell",
    "boy", "follow", "came", "want", "show", "also", "around", "form", "three", "small", "set", "put", "end", "does", "another", "well",
    "large", "must", "big", "even", "such", "because", "turn", "here", "why", "ask", "went", "men", "read", "need", "land", "different",
    "home", "us", "move", "try", "kind", "hand", "picture", "again", "change", "off", "play", "spell", "air", "away", "animal", "house",
    "point", "page", "letter", "mother", "answer", "found", "study", "still", "learn", "should", "America", "world", "high", "every",
    "near", "add", "food", "between", "own", "below", "country", "plant", "last", "school",
];

fn capitalised(w: &str) -> String {
    let mut c = w.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

fn word(rng: &mut ChaCha8Rng) -> String {
    let w = WORDS[rng.gen_range(0..WORDS.len())];
    match rng.gen_range(0..10) {
        0..=5 => w.to_owned(),
        6..=8 => capitalised(w),
        _ => w.to_uppercase(),
    }
}

fn number(rng: &mut ChaCha8Rng) -> String {
    match rng.gen_range(0..3) {
        0 => {
            let digits = rng.gen_range(1..=6u32);
            let n = rng.gen_range(0..10u64.pow(digits));
            if rng.gen_bool(0.1) {
                format!("-{n}")
            } else {
                n.to_string()
            }
        }
        1 => {
            let int_digits = rng.gen_range(1..=4u32);
            let int = rng.gen_range(0..10u64.pow(int_digits));
            let decimals = rng.gen_range(1..=2usize);
            let frac = rng.gen_range(0..10u64.pow(decimals as u32));
            format!("{int}.{frac:0decimals$}")
        }
        _ => {
            let year = rng.gen_range(1990..=2030);
            let month = rng.gen_range(1..=12u32);
            let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
            let days = match month {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            format!("{year}-{month:02}-{:02}", rng.gen_range(1..=days))
        }
    }
}

fn line(rng: &mut ChaCha8Rng) -> String {
    let n = rng.gen_range(2..=4);
    let mut words: Vec<String> = (0..n).map(|_| WORDS[rng.gen_range(0..WORDS.len())].to_owned()).collect();
    if rng.gen_bool(0.5) {
        words[0] = capitalised(&words[0]);
    }
    let mut s = words.join(" ");
    if rng.gen_bool(0.3) {
        s.push('.');
    }
    s
}

fn letters(rng: &mut ChaCha8Rng) -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let n = rng.gen_range(2..=8);
    (0..n).map(|_| LETTERS[rng.gen_range(0..LETTERS.len())] as char).collect()
}

/// A random text of one of `kinds` (not empty): with all three, a word
/// (40%), a number (25%: integer, decimal or ISO date) or 2-4 words (35%);
/// with fewer, the same proportions among those.
pub fn random_text(rng: &mut ChaCha8Rng, kinds: &[TextKind]) -> (TextKind, String) {
    let total: u32 = kinds.iter().map(|k| k.weight()).sum();
    let mut pick = rng.gen_range(0..total.max(1));
    let kind = *kinds
        .iter()
        .find(|k| {
            let hit = pick < k.weight();
            pick = pick.saturating_sub(k.weight());
            hit
        })
        .unwrap_or(&TextKind::Word);
    let text = match kind {
        TextKind::Word => word(rng),
        TextKind::Number => number(rng),
        TextKind::Line => line(rng),
        TextKind::Letters => letters(rng),
    };
    (kind, text)
}

/// Relative luminance (WCAG 2) of an sRGB colour.
fn luminance(c: [u8; 3]) -> f64 {
    let lin = |v: u8| {
        let v = v as f64 / 255.0;
        if v <= 0.04045 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2])
}

/// WCAG contrast ratio of two colours (1 to 21).
pub fn contrast(a: [u8; 3], b: [u8; 3]) -> f64 {
    let (la, lb) = (luminance(a), luminance(b));
    (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
}

/// Minimum contrast ratio of text against background.
pub const MIN_CONTRAST: f64 = 4.5;

/// Background and text colours: mostly dark text on a light background,
/// sometimes anything, always at least [`MIN_CONTRAST`].
fn colours(rng: &mut ChaCha8Rng) -> ([u8; 3], [u8; 3]) {
    let bg: [u8; 3] = if rng.gen_bool(0.75) {
        std::array::from_fn(|_| rng.gen_range(170..=255))
    } else {
        std::array::from_fn(|_| rng.gen())
    };
    for _ in 0..100 {
        let fg: [u8; 3] = std::array::from_fn(|_| rng.gen());
        if contrast(fg, bg) >= MIN_CONTRAST {
            return (bg, fg);
        }
    }
    let (black, white) = ([0; 3], [255; 3]);
    (bg, if contrast(black, bg) >= contrast(white, bg) { black } else { white })
}

/// A text's coverage mask (0..1 per pixel, `width * height`, row-major):
/// its inked pixels only, tightly bounded.
#[derive(Debug, Clone)]
pub struct Mask {
    pub width: u32,
    pub height: u32,
    pub coverage: Vec<f32>,
}

/// Rasterise `text` at `px` pixels; `None` when nothing is inked (blank text).
pub fn rasterise(font: &FontRef, text: &str, px: f32) -> Option<Mask> {
    let scale = PxScale::from(px);
    let scaled = font.as_scaled(scale);
    let mut caret = 0.0f32;
    let mut prev = None;
    let mut outlined = Vec::new();
    for ch in text.chars() {
        let id = font.glyph_id(ch);
        if let Some(p) = prev {
            caret += scaled.kern(p, id);
        }
        let glyph = id.with_scale_and_position(scale, ab_glyph::point(caret, scaled.ascent()));
        caret += scaled.h_advance(id);
        prev = Some(id);
        if let Some(o) = font.outline_glyph(glyph) {
            outlined.push(o);
        }
    }
    let (mut x0, mut y0, mut x1, mut y1) = (f32::INFINITY, f32::INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for o in &outlined {
        let b = o.px_bounds();
        x0 = x0.min(b.min.x);
        y0 = y0.min(b.min.y);
        x1 = x1.max(b.max.x);
        y1 = y1.max(b.max.y);
    }
    if outlined.is_empty() || x1 <= x0 || y1 <= y0 {
        return None;
    }
    // px_bounds are whole pixels.
    let (width, height) = ((x1 - x0) as u32, (y1 - y0) as u32);
    let mut coverage = vec![0.0f32; width as usize * height as usize];
    for o in &outlined {
        let b = o.px_bounds();
        let (ox, oy) = ((b.min.x - x0) as u32, (b.min.y - y0) as u32);
        o.draw(|x, y, c| {
            let (px, py) = (ox + x, oy + y);
            if px < width && py < height {
                let cell = &mut coverage[(py * width + px) as usize];
                *cell = (*cell + c).min(1.0);
            }
        });
    }
    Some(Mask { width, height, coverage })
}

/// Rasterise `text` at `px` pixels with every character centred in a cell
/// `pitch` pixels wide, on a common baseline; the mask spans all cells and
/// the font's full line height. `None` when nothing is inked.
pub fn rasterise_pitched(font: &FontRef, text: &str, px: f32, pitch: u32) -> Option<Mask> {
    let scale = PxScale::from(px);
    let scaled = font.as_scaled(scale);
    let (width, height) = (pitch * text.chars().count() as u32, (scaled.ascent() - scaled.descent()).ceil() as u32);
    let mut coverage = vec![0.0f32; width as usize * height as usize];
    let mut inked = false;
    for (i, ch) in text.chars().enumerate() {
        let id = font.glyph_id(ch);
        let x0 = (i as u32 * pitch) as f32 + (pitch as f32 - scaled.h_advance(id)) / 2.0;
        let Some(o) = font.outline_glyph(id.with_scale_and_position(scale, ab_glyph::point(x0, scaled.ascent()))) else { continue };
        let b = o.px_bounds();
        o.draw(|x, y, c| {
            let (px, py) = (b.min.x as i64 + x as i64, b.min.y as i64 + y as i64);
            if (0..width as i64).contains(&px) && (0..height as i64).contains(&py) {
                let cell = &mut coverage[(py as u32 * width + px as u32) as usize];
                *cell = (*cell + c).min(1.0);
                inked |= c > 0.0;
            }
        });
    }
    inked.then_some(Mask { width, height, coverage })
}

/// Where and how one text is drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub font_px: f32,
    /// Top-left corner of the ink box.
    pub x: u32,
    pub y: u32,
    pub ink_width: u32,
    pub ink_height: u32,
    pub background: [u8; 3],
    pub foreground: [u8; 3],
}

/// Draw `mask` at (`x`, `y`) in `fg` over an image filled with `bg`.
fn compose(mask: &Mask, x: u32, y: u32, fg: [u8; 3], bg: [u8; 3], width: u32, height: u32) -> image::RgbImage {
    let mut img = image::RgbImage::from_pixel(width, height, image::Rgb(bg));
    for my in 0..mask.height {
        for mx in 0..mask.width {
            let c = mask.coverage[(my * mask.width + mx) as usize];
            if c > 0.0 && x + mx < width && y + my < height {
                let p = img.get_pixel_mut(x + mx, y + my);
                for k in 0..3 {
                    p.0[k] = (bg[k] as f32 * (1.0 - c) + fg[k] as f32 * c).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    img
}

/// Gaussian-like noise (Irwin–Hall: a sum of four uniforms, scaled to unit variance).
fn add_noise(img: &mut image::RgbImage, sigma: f32, rng: &mut ChaCha8Rng) {
    if sigma <= 0.0 {
        return;
    }
    for p in img.pixels_mut() {
        for v in p.0.iter_mut() {
            let u: f32 = (0..4).map(|_| rng.gen::<f32>()).sum::<f32>() - 2.0;
            let n = u * 3.0f32.sqrt() * sigma;
            *v = (*v as f32 + n).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// Sample `index` of `opts.seed`: its kind, text, layout and image.
pub fn render_sample(font: &FontRef, index: usize, opts: &SynthOptions) -> anyhow::Result<(TextKind, String, Layout, image::RgbImage)> {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(index as u64);
    let avail_w = opts.width.saturating_sub(2 * opts.margin);
    let avail_h = opts.height.saturating_sub(2 * opts.margin);
    let max_px = opts.max_font_px.min(avail_h as f32).max(opts.min_font_px);
    for _ in 0..100 {
        let (kind, text) = random_text(&mut rng, &opts.kinds);
        let mut px = rng.gen_range(opts.min_font_px..=max_px);
        let (font_px, mask, x, y) = if opts.pitch > 0 {
            let Some(mask) = rasterise_pitched(font, &text, px, opts.pitch) else { continue };
            let x = opts.margin.div_ceil(opts.pitch) * opts.pitch;
            if x + mask.width + opts.margin > opts.width || mask.height > avail_h {
                continue;
            }
            let y = (opts.height - mask.height) / 2;
            (px, mask, x, y)
        } else {
            let fitted = loop {
                match rasterise(font, &text, px) {
                    Some(m) if m.width <= avail_w && m.height <= avail_h => break Some((px, m)),
                    _ if px <= opts.min_font_px => break None,
                    _ => px = (px * 0.9).max(opts.min_font_px),
                }
            };
            let Some((font_px, mask)) = fitted else { continue };
            let x = opts.margin + rng.gen_range(0..=avail_w - mask.width);
            let y = opts.margin + rng.gen_range(0..=avail_h - mask.height);
            (font_px, mask, x, y)
        };
        let (background, foreground) = colours(&mut rng);
        let mut img = compose(&mask, x, y, foreground, background, opts.width, opts.height);
        add_noise(&mut img, opts.noise, &mut rng);
        let layout = Layout { font_px, x, y, ink_width: mask.width, ink_height: mask.height, background, foreground };
        return Ok((kind, text, layout, img));
    }
    bail!(
        "sample {index}: no text fits a {}x{} image with margin {} at {} px or more: use a larger --width/--height or a smaller minimum font size",
        opts.width,
        opts.height,
        opts.margin,
        opts.min_font_px
    )
}

/// The data line of one sample (image path relative to the data file).
pub fn sample_line(image: &str, prompt: &str, text: &str) -> String {
    let sample = Sample {
        messages: vec![
            Message {
                role: Speaker::User,
                content: vec![Part::Image { path: image.into() }, Part::Text { text: prompt.to_owned() }],
            },
            Message { role: Speaker::Assistant, content: vec![Part::Text { text: text.to_owned() }] },
        ],
    };
    serde_json::to_string(&sample).expect("a sample of UTF-8 strings serialises")
}

fn check(opts: &SynthOptions) -> anyhow::Result<()> {
    if opts.count == 0 {
        bail!("count is 0: ask for at least one sample");
    }
    if opts.kinds.is_empty() {
        bail!("no kind of text to draw: name at least one of words, numbers, lines, letters");
    }
    if !(opts.min_font_px.is_finite() && opts.min_font_px >= 4.0 && opts.max_font_px >= opts.min_font_px) {
        bail!("font sizes {}..{} px: the minimum must be at least 4 and at most the maximum", opts.min_font_px, opts.max_font_px);
    }
    if !(opts.noise.is_finite() && opts.noise >= 0.0) {
        bail!("noise {} must be a finite number >= 0", opts.noise);
    }
    let (w, h) = (opts.width.saturating_sub(2 * opts.margin), opts.height.saturating_sub(2 * opts.margin));
    if (w as f32) < opts.min_font_px || (h as f32) < opts.min_font_px {
        bail!("a {}x{} image with margin {} has no room for {} px text", opts.width, opts.height, opts.margin, opts.min_font_px);
    }
    Ok(())
}

/// Write `opts.count` samples into `out_dir`: `images/NNNNN.png` and
/// `data.jsonl` (written last, atomically). Refuses a non-empty `out_dir`
/// unless `opts.force`.
pub fn synth_ocr(out_dir: &Path, opts: &SynthOptions) -> anyhow::Result<SynthReport> {
    check(opts)?;
    if let Ok(mut entries) = std::fs::read_dir(out_dir) {
        if entries.next().is_some() && !opts.force {
            bail!(
                "{} is not empty: choose an empty or new folder, or pass --force to write into it (images/NNNNN.png and data.jsonl are overwritten)",
                out_dir.display()
            );
        }
    } else if out_dir.exists() {
        bail!("{} exists and is not a folder", out_dir.display());
    }
    let images_dir = out_dir.join("images");
    std::fs::create_dir_all(&images_dir).with_context(|| format!("creating {}", images_dir.display()))?;
    let font = FontRef::try_from_slice(crate::font::DEJAVU_SANS).context("the embedded font does not parse")?;
    let digits = (opts.count - 1).to_string().len().max(5);
    let mut data = String::new();
    let (mut words, mut numbers, mut lines, mut letters) = (0, 0, 0, 0);
    for i in 0..opts.count {
        let (kind, text, _, img) = render_sample(&font, i, opts)?;
        match kind {
            TextKind::Word => words += 1,
            TextKind::Number => numbers += 1,
            TextKind::Line => lines += 1,
            TextKind::Letters => letters += 1,
        }
        let rel = format!("images/{i:0digits$}.png");
        let path = out_dir.join(&rel);
        img.save_with_format(&path, image::ImageFormat::Png).with_context(|| format!("writing {}", path.display()))?;
        data += &sample_line(&rel, &opts.prompt, &text);
        data.push('\n');
    }
    let data_file = out_dir.join("data.jsonl");
    crate::files::write_atomic(&data_file, data.as_bytes()).with_context(|| format!("writing {}", data_file.display()))?;
    Ok(SynthReport { count: opts.count, data_file, images_dir, words, numbers, lines, letters })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmhost_plugin_api::sample::parse_line;

    fn small(count: usize, seed: u64) -> SynthOptions {
        SynthOptions { count, seed, ..SynthOptions::default() }
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir.join("images"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
            })
            .collect();
        v.sort();
        v.push(("data.jsonl".into(), std::fs::read(dir.join("data.jsonl")).unwrap()));
        v
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_images() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        synth_ocr(&a, &small(12, 7)).unwrap();
        synth_ocr(&b, &small(12, 7)).unwrap();
        synth_ocr(&c, &small(12, 8)).unwrap();
        assert_eq!(files(&a), files(&b));
        assert_ne!(files(&a), files(&c));
        // A longer run only appends samples.
        let d = tmp.path().join("d");
        synth_ocr(&d, &small(13, 7)).unwrap();
        assert_eq!(files(&a)[..12], files(&d)[..12]);
    }

    #[test]
    fn count_and_lines_parse_as_samples() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = SynthOptions { prompt: "Read the \"text\".".into(), ..small(40, 1) };
        let rep = synth_ocr(tmp.path(), &opts).unwrap();
        assert_eq!(rep.count, 40);
        assert_eq!(rep.words + rep.numbers + rep.lines, 40);
        assert!(rep.words > 0 && rep.numbers > 0 && rep.lines > 0, "{rep:?}");
        assert_eq!(std::fs::read_dir(&rep.images_dir).unwrap().count(), 40);
        let text = std::fs::read_to_string(&rep.data_file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 40);
        assert!(lines[0].starts_with(r#"{"messages":[{"role":"user","content":[{"type":"image","path":"images/00000.png"},{"type":"text","text":"Read the \"text\"."}]},{"role":"assistant","content":[{"type":"text","text":""#), "{}", lines[0]);
        for (i, line) in lines.iter().enumerate() {
            let s = parse_line(line, tmp.path()).unwrap_or_else(|e| panic!("line {}: {e}", i + 1));
            assert_eq!(s.messages.len(), 2);
            assert_eq!(s.messages[0].role, Speaker::User);
            let img = tmp.path().join(format!("images/{i:05}.png"));
            assert_eq!(s.messages[0].content, vec![Part::Image { path: img.clone() }, Part::Text { text: opts.prompt.clone() }]);
            let Part::Text { text } = &s.messages[1].content[0] else { panic!("assistant text") };
            assert!(!text.is_empty() && text.is_ascii(), "{text:?}");
            let decoded = image::open(&img).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (256, 64));
        }
    }

    #[test]
    fn text_fits_inside_the_image() {
        let font = FontRef::try_from_slice(crate::font::DEJAVU_SANS).unwrap();
        for (w, h) in [(256, 64), (96, 32), (512, 128)] {
            let opts = SynthOptions { width: w, height: h, noise: 0.0, ..small(1, 3) };
            for i in 0..60 {
                let (_, text, l, img) = render_sample(&font, i, &opts).unwrap();
                assert!(l.font_px >= opts.min_font_px && l.font_px <= opts.max_font_px, "{l:?}");
                assert!(l.x >= opts.margin && l.x + l.ink_width <= w - opts.margin, "{text:?} {l:?}");
                assert!(l.y >= opts.margin && l.y + l.ink_height <= h - opts.margin, "{text:?} {l:?}");
                assert!(contrast(l.foreground, l.background) >= MIN_CONTRAST);
                // Without noise, every pixel outside the ink box is background, and there is ink.
                let bg = image::Rgb(l.background);
                let mut inked = 0;
                for (x, y, p) in img.enumerate_pixels() {
                    let inside = x >= l.x && x < l.x + l.ink_width && y >= l.y && y < l.y + l.ink_height;
                    if !inside {
                        assert_eq!(*p, bg, "{text:?}: pixel ({x}, {y}) outside the ink box {l:?}");
                    } else if *p != bg {
                        inked += 1;
                    }
                }
                assert!(inked > 0, "{text:?} drew nothing");
            }
        }
        // In a tiny image a sample either fits or is an error, never clipped.
        let opts = SynthOptions { width: 40, height: 20, noise: 0.0, ..small(1, 0) };
        for i in 0..40 {
            match render_sample(&font, i, &opts) {
                Ok((_, _, l, _)) => assert!(l.x + l.ink_width <= 38 && l.y + l.ink_height <= 18, "{l:?}"),
                Err(e) => assert!(e.to_string().contains("no text fits"), "{e}"),
            }
        }
        let e = check(&SynthOptions { width: 14, ..small(1, 0) }).unwrap_err().to_string();
        assert!(e.contains("no room"), "{e}");
    }

    #[test]
    fn refuses_a_non_empty_folder_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
        let e = synth_ocr(tmp.path(), &small(2, 0)).unwrap_err().to_string();
        assert!(e.contains("is not empty") && e.contains("--force"), "{e}");
        assert!(!tmp.path().join("data.jsonl").exists());
        synth_ocr(tmp.path(), &SynthOptions { force: true, ..small(2, 0) }).unwrap();
        assert_eq!(std::fs::read_to_string(tmp.path().join("notes.txt")).unwrap(), "mine");
        assert_eq!(std::fs::read_to_string(tmp.path().join("data.jsonl")).unwrap().lines().count(), 2);

        let e = synth_ocr(&tmp.path().join("new"), &small(0, 0)).unwrap_err().to_string();
        assert!(e.contains("count is 0"), "{e}");
    }

    #[test]
    fn texts_are_words_numbers_and_lines() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let date = regex::Regex::new(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$").unwrap();
        let num = regex::Regex::new(r"^-?\d+(\.\d{1,2})?$").unwrap();
        for _ in 0..500 {
            match random_text(&mut rng, &TextKind::DEFAULT) {
                (TextKind::Word, t) => assert!(!t.contains(' ') && WORDS.iter().any(|w| w.eq_ignore_ascii_case(&t)), "{t:?}"),
                (TextKind::Number, t) => assert!(date.is_match(&t) || num.is_match(&t), "{t:?}"),
                (TextKind::Line, t) => assert!((2..=4).contains(&t.split(' ').count()), "{t:?}"),
                (TextKind::Letters, t) => panic!("letters are not drawn by default: {t:?}"),
            }
        }
        assert!(contrast([0; 3], [255; 3]) > 20.9);
    }

    #[test]
    fn kinds_limit_what_is_drawn() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut seen = [0usize; 4];
        for _ in 0..300 {
            let (kind, text) = random_text(&mut rng, &[TextKind::Word, TextKind::Line]);
            assert_ne!(kind, TextKind::Number, "{text:?}");
            assert!(!text.chars().any(|c| c.is_ascii_digit()), "{text:?}");
            seen[kind as usize] += 1;
        }
        // 8 : 7 of 300 draws: both kinds appear (each expected ~140 times).
        assert!(seen[0] > 100 && seen[2] > 100, "{seen:?}");
        let only: Vec<_> = (0..50).map(|_| random_text(&mut rng, &[TextKind::Number]).0).collect();
        assert!(only.iter().all(|k| *k == TextKind::Number));
        assert_eq!(TextKind::parse("numbers"), Some(TextKind::Number));
        assert_eq!(TextKind::parse("digits"), None);
        for _ in 0..50 {
            let (_, t) = random_text(&mut rng, &[TextKind::Letters]);
            assert!((2..=8).contains(&t.len()) && t.chars().all(|c| c.is_ascii_alphabetic()), "{t:?}");
        }

        let tmp = tempfile::tempdir().unwrap();
        let e = synth_ocr(tmp.path(), &SynthOptions { kinds: vec![], ..small(2, 0) }).unwrap_err().to_string();
        assert!(e.contains("words, numbers, lines, letters"), "{e}");
    }
}
