//! DeepSeek-OCR preprocessing: image views (global view and tiles), the "plain" template,
//! tokenisation, image tokens, labels.
//!
//! Follows the original remote code of deepseek-ai/DeepSeek-OCR (the files and blob ids listed in
//! the shared fixture's README): `modeling_deepseekocr.py` `DeepseekOCRForCausalLM.infer`,
//! `dynamic_preprocess`, `find_closest_aspect_ratio`, `text_encode`, `load_pil_images`,
//! `BasicImageTransform`, and `conversation.py`'s "plain" template (`SeparatorStyle.PLAIN`, empty
//! separators), extended to training the way the shared fixture's README describes: the answer
//! and eos follow the prompt and are the only labelled tokens.
//!
//! Image pipeline (Pillow 13 semantics through `vlmhost-imaging`, bit-exact for PNG inputs):
//!
//! * crop mode (Gundam): an image with both sides <= the tile size is not tiled (grid (1, 1));
//!   otherwise [`tile_grid`] picks the grid, the image is resized (bicubic) to the grid's pixel
//!   size and cut into tiles left to right, top to bottom. The global view is
//!   `ImageOps.pad(image, (base_size, base_size), color=(127, 127, 127))`.
//! * non-crop modes (Tiny/Small/Base/Large): when `image_size <= 640` the image is first resized
//!   (bicubic) to `image_size` x `image_size` (infer's "directly resize"), then padded to
//!   `image_size` (a no-op after that resize); Large (1280) is only padded.
//! * every view: `x / 255` (float32), `(x - 0.5) / 0.5`, rounded to bfloat16 (nearest even) as
//!   infer's `.to(torch.bfloat16)`; kept as f32 (exact).
//!
//! The original hard-codes the tile size 640 (Gundam's `image_size`) in two places (the no-tiling
//! test and `dynamic_preprocess`'s default); here both use [`ImageOptions::image_size`], which is
//! the same for every official mode.
//!
//! Outputs are plain vectors; nothing here depends on libtorch.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;
use vlmhost_imaging::{crop, pad, resize, ImageError, ResampleFilter, RgbImage};
use vlmhost_plugin_api::sample::{Message, Part, Speaker};

/// The image placeholder of the prompt and the token that stands for image features.
pub const IMAGE_TOKEN: &str = "<image>";
/// DeepSeek's bos / eos tokens (ids 0 and 1 in the real tokenizer).
pub const BOS_TOKEN: &str = "<｜begin▁of▁sentence｜>";
pub const EOS_TOKEN: &str = "<｜end▁of▁sentence｜>";
/// Label value of positions that do not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;
/// Colour the global view is padded with: `int(0.5 * 255)` per channel (infer's mean).
pub const PAD_FILL: [u8; 3] = [127, 127, 127];
/// Tile counts `dynamic_preprocess` chooses between (infer uses its defaults).
pub const MIN_TILES: usize = 2;
pub const MAX_TILES: usize = 9;
/// infer's `patch_size` and `downsample_ratio`: one image token per 64 x 64 pixels.
const PATCH_SIZE: usize = 16;
const DOWNSAMPLE_RATIO: usize = 4;
/// infer resizes the image to the view size first ("directly resize") up to this size.
const DIRECT_RESIZE_MAX: usize = 640;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "tokenizer file missing: {path} (the model folder needs the tokenizer.json of \
         deepseek-ai/DeepSeek-OCR, as save_pretrained of its fast tokenizer writes it)"
    )]
    TokenizerMissing { path: PathBuf },
    #[error("cannot load tokenizer {path}: {message}")]
    TokenizerLoad { path: PathBuf, message: String },
    #[error(
        "the image token {IMAGE_TOKEN:?} is not in the vocabulary of {path}: this is not a \
         DeepSeek-OCR tokenizer (it must define {IMAGE_TOKEN:?} as an added token)"
    )]
    ImageTokenUnknown { path: PathBuf },
    #[error(
        "unknown DeepSeek-OCR image mode {name:?}: use one of tiny (512), small (640), \
         base (1024), large (1280) or gundam (1024 global view + 640 tiles)"
    )]
    UnknownMode { name: String },
    #[error(
        "invalid image options (base_size {base_size}, image_size {image_size}): both sizes \
         must be at least {PATCH_SIZE} pixels"
    )]
    InvalidOptions { base_size: usize, image_size: usize },
    #[error("message {message}, part {part}: {source}")]
    Image {
        message: usize,
        part: usize,
        #[source]
        source: ImageError,
    },
    #[error(
        "message {index} is a system message, but DeepSeek-OCR's \"plain\" template has no \
         system turn: put its text at the start of the first user message"
    )]
    SystemMessage { index: usize },
    #[error(
        "message {message} (assistant), part {part} is an image: answers must be text only; \
         move the image into the user message before it"
    )]
    ImageInAnswer { message: usize, part: usize },
    #[error(
        "message {message}, part {part}: the text contains the literal image placeholder \
         {IMAGE_TOKEN:?}, which would take an image that is not there; give images as image \
         parts (or remove the placeholder from the text)"
    )]
    PlaceholderInText { message: usize, part: usize },
    #[error(
        "message {index} (assistant) has an empty answer: nothing to train on; leave the \
         message out or give it text"
    )]
    EmptyAnswer { index: usize },
    #[error("tokenizing message {index} failed: {message}")]
    Tokenize { index: usize, message: String },
}

type Result<T, E = ProcessorError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Image options (the official modes)
// ---------------------------------------------------------------------------------------------

/// View sizes of infer's `base_size` / `image_size` / `crop_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    /// Global view size in crop mode.
    pub base_size: usize,
    /// Tile size in crop mode; the (only) view size otherwise.
    pub image_size: usize,
    pub crop_mode: bool,
}

impl ImageOptions {
    /// Gundam: 1024 global view + 640 tiles. The default.
    pub const GUNDAM: ImageOptions = ImageOptions {
        base_size: 1024,
        image_size: 640,
        crop_mode: true,
    };

    /// tiny (512/512, no crop), small (640/640, no crop), base (1024/1024, no crop), large
    /// (1280/1280, no crop), gundam (1024 global + 640 tiles, crop) — the official modes
    /// (DeepSeek-OCR's README and run script); names are case-insensitive.
    pub fn mode(name: &str) -> Result<ImageOptions, ProcessorError> {
        let plain = |size| ImageOptions {
            base_size: size,
            image_size: size,
            crop_mode: false,
        };
        match name.to_ascii_lowercase().as_str() {
            "tiny" => Ok(plain(512)),
            "small" => Ok(plain(640)),
            "base" => Ok(plain(1024)),
            "large" => Ok(plain(1280)),
            "gundam" => Ok(Self::GUNDAM),
            _ => Err(ProcessorError::UnknownMode {
                name: name.to_string(),
            }),
        }
    }

    fn validate(self) -> Result<Self> {
        if self.base_size < PATCH_SIZE || self.image_size < PATCH_SIZE {
            return Err(ProcessorError::InvalidOptions {
                base_size: self.base_size,
                image_size: self.image_size,
            });
        }
        Ok(self)
    }
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self::GUNDAM
    }
}

// ---------------------------------------------------------------------------------------------
// Tiling (dynamic_preprocess)
// ---------------------------------------------------------------------------------------------

/// The grids (columns, rows) `dynamic_preprocess` considers, in the order it tries them: every
/// (i, j) with `min_tiles <= i * j <= max_tiles`, sorted by i * j.
///
/// The original builds them as a Python `set` and sorts with a stable sort by i * j, so grids
/// with equal products keep the set's iteration order. That order (deterministic in CPython:
/// tuples of ints hash without randomisation, but not obviously i-ascending) cannot change the
/// result, so this uses i ascending: see [`find_closest_grid`].
pub fn candidate_grids(min_tiles: usize, max_tiles: usize) -> Vec<(usize, usize)> {
    let mut grids = Vec::new();
    for n in min_tiles..=max_tiles {
        for i in 1..=n {
            if n % i == 0 {
                grids.push((i, n / i));
            }
        }
    }
    grids
}

/// `find_closest_aspect_ratio`: the grid whose i / j is closest to `width / height` (float64,
/// as Python); on an exact tie with the best so far, a later grid replaces it when the image
/// area exceeds half the grid's pixel area (`area > 0.5 * tile * tile * i * j`, compared here
/// in exact integers, as Python compares int and float exactly).
///
/// Why the order of grids with equal i * j does not matter: the result is decided among the
/// grids at the minimum distance, whose ratios are `a - d` and `a + d` (at most two distinct
/// ratios). Grids of equal product and equal ratio are the same grid, so two of them could only
/// tie at distinct ratios `a - d` < `a + d`; no candidate ratio lies strictly between those (it
/// would be strictly closer), so they are neighbours in the sorted list of candidate ratios, and
/// no two neighbouring ratios share a product (`neighbouring_ratios_never_share_a_product`
/// checks this for 2..=9 tiles). Ties that do happen (e.g. (2, 2) and (3, 3) for a square image,
/// or (2, 2), (3, 2), (3, 3) at 5:4) are between different products, whose order the sort fixes.
pub fn find_closest_grid(
    width: usize,
    height: usize,
    tile: usize,
    grids: &[(usize, usize)],
) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let area = width as u128 * height as u128;
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for &(i, j) in grids {
        let diff = (aspect - i as f64 / j as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (i, j);
        } else if diff == best_diff && 2 * area > (tile * tile * i * j) as u128 {
            best = (i, j);
        }
    }
    best
}

/// The tile grid (columns, rows) infer uses in crop mode for a `width` x `height` image:
/// `None` when both sides are at most `tile` (no tiles), else `dynamic_preprocess`'s choice
/// among 2..=9 tiles.
pub fn tile_grid(width: usize, height: usize, tile: usize) -> Option<(usize, usize)> {
    if width <= tile && height <= tile {
        return None;
    }
    let grids = candidate_grids(MIN_TILES, MAX_TILES);
    Some(find_closest_grid(width, height, tile, &grids))
}

/// `dynamic_preprocess` after the grid choice: resize (bicubic) to the grid's pixel size, cut
/// `tile` x `tile` tiles left to right, top to bottom.
pub fn cut_tiles(image: &RgbImage, grid: (usize, usize), tile: usize) -> Vec<RgbImage> {
    let (cols, rows) = grid;
    let resized = resize(image, cols * tile, rows * tile, ResampleFilter::Bicubic);
    let mut tiles = Vec::with_capacity(cols * rows);
    for r in 0..rows {
        for c in 0..cols {
            let (x0, y0) = (c * tile, r * tile);
            tiles.push(crop(&resized, x0, y0, x0 + tile, y0 + tile));
        }
    }
    tiles
}

// ---------------------------------------------------------------------------------------------
// Views, normalisation, token counts
// ---------------------------------------------------------------------------------------------

/// The 8-bit views of one image, before normalisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageViews {
    /// The global view (`base_size` in crop mode, `image_size` otherwise), square.
    pub global: RgbImage,
    /// The tiles, left to right, top to bottom; empty when the image is not tiled.
    pub tiles: Vec<RgbImage>,
    /// (tiles across, tiles down); (1, 1) when not tiled.
    pub grid: (usize, usize),
}

/// Views of `image` exactly as infer builds them (see the module docs).
pub fn image_views(image: &RgbImage, options: ImageOptions) -> ImageViews {
    if options.crop_mode {
        let tile = options.image_size;
        let (tiles, grid) = match tile_grid(image.width, image.height, tile) {
            Some(grid) => (cut_tiles(image, grid, tile), grid),
            None => (Vec::new(), (1, 1)),
        };
        let global = pad(image, options.base_size, options.base_size, PAD_FILL);
        ImageViews {
            global,
            tiles,
            grid,
        }
    } else {
        let size = options.image_size;
        let global = if size <= DIRECT_RESIZE_MAX {
            let resized = resize(image, size, size, ResampleFilter::Bicubic);
            pad(&resized, size, size, PAD_FILL)
        } else {
            pad(image, size, size, PAD_FILL)
        };
        ImageViews {
            global,
            tiles: Vec::new(),
            grid: (1, 1),
        }
    }
}

/// Image tokens per side of a view: `ceil((size // 16) / 4)`.
fn queries(size: usize) -> usize {
    (size / PATCH_SIZE).div_ceil(DOWNSAMPLE_RATIO)
}

/// Number of image tokens infer writes for an image with tile grid `grid` (`None`: not tiled):
/// crop mode `(q_base + 1) * q_base + 1` plus `(q * cols + 1) * (q * rows)` for tiles;
/// otherwise `(q + 1) * q + 1` with q from `image_size`.
pub fn num_image_tokens(options: ImageOptions, grid: Option<(usize, usize)>) -> usize {
    if options.crop_mode {
        let qb = queries(options.base_size);
        let mut n = (qb + 1) * qb + 1;
        if let Some((cols, rows)) = grid {
            let q = queries(options.image_size);
            n += (q * cols + 1) * (q * rows);
        }
        n
    } else {
        let q = queries(options.image_size);
        (q + 1) * q + 1
    }
}

/// float32 to bfloat16 precision, round to nearest even (c10::BFloat16 `round_to_nearest_even`),
/// returned as float32. Inputs here are finite.
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xffff_0000)
}

/// The 256 normalised values: torchvision ToTensor (`float32(u) / 255`, a true float32
/// division as torch's CPU `div` does), Normalize(0.5, 0.5) (`(x - 0.5) / 0.5`), then bf16.
fn normalised_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (u, v) in t.iter_mut().enumerate() {
        let x = u as f32 / 255.0f32;
        *v = round_bf16((x - 0.5f32) / 0.5f32);
    }
    t
}

/// A view as infer's `image_transform(view).to(torch.bfloat16)`: CHW `[3, H, W]`, values in
/// bf16 precision stored as f32.
pub fn normalize(image: &RgbImage) -> Vec<f32> {
    let table = normalised_table();
    image
        .to_chw()
        .into_iter()
        .map(|u| table[u as usize])
        .collect()
}

/// One image, ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessedImage {
    /// The global view, CHW, normalised ((x/255-0.5)/0.5) then rounded to bfloat16 precision
    /// (round-to-nearest-even) exactly as the original `.to(torch.bfloat16)`, stored as f32.
    pub global: Vec<f32>,
    pub global_size: usize,
    /// Tiles [n_tiles, 3, tile, tile], same normalisation; empty when the image is not tiled.
    pub tiles: Vec<f32>,
    pub tile_size: usize,
    pub n_tiles: usize,
    /// (tiles across, tiles down); (1, 1) when not tiled — as images_spatial_crop.
    pub grid: (usize, usize),
    /// Number of image tokens this image takes in the text.
    pub num_tokens: usize,
}

/// Model inputs of one conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    /// `[L]`: bos, then the messages (image tokens in place of the images).
    pub input_ids: Vec<i64>,
    /// `[L]`: the answer tokens and their eos; -100 elsewhere. Not shifted.
    pub labels: Vec<i64>,
    /// `[L]`: true at image tokens.
    pub images_seq_mask: Vec<bool>,
    /// In the order of the image parts.
    pub images: Vec<ProcessedImage>,
}

// ---------------------------------------------------------------------------------------------
// The processor
// ---------------------------------------------------------------------------------------------

/// DeepSeek-OCR processor: tokenizer + image options.
pub struct DeepseekOcrProcessor {
    tokenizer: Tokenizer,
    image_token_id: i64,
    bos_id: i64,
    eos_id: i64,
    options: ImageOptions,
}

/// Python's `str.strip()` whitespace (`str.isspace`): Unicode White_Space plus the ASCII
/// separators U+001C..U+001F, which Python counts and Rust's `char::is_whitespace` does not.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn python_strip(s: &str) -> &str {
    s.trim_matches(is_python_space)
}

impl DeepseekOcrProcessor {
    /// Reads `tokenizer.json` in `dir` (error naming the file if missing); image token = the
    /// tokenizer's "<image>" token; bos/eos = the tokenizer's "<｜begin▁of▁sentence｜>" /
    /// "<｜end▁of▁sentence｜>" if present, else config.json's bos_token_id/eos_token_id (0 and 1
    /// by default, as `text_encode` hard-codes).
    pub fn from_dir(dir: &Path, options: ImageOptions) -> Result<Self> {
        let options = options.validate()?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(ProcessorError::TokenizerMissing { path: tok_path });
        }
        let load_err = |e: &dyn std::fmt::Display| ProcessorError::TokenizerLoad {
            path: tok_path.clone(),
            message: e.to_string(),
        };
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| load_err(&e))?;
        // transformers turns off the truncation/padding stored in tokenizer.json unless asked.
        tokenizer.with_truncation(None).map_err(|e| load_err(&e))?;
        tokenizer.with_padding(None);
        let image_token_id =
            tokenizer
                .token_to_id(IMAGE_TOKEN)
                .ok_or_else(|| ProcessorError::ImageTokenUnknown {
                    path: tok_path.clone(),
                })? as i64;

        let config_path = dir.join("config.json");
        let config: serde_json::Value = if config_path.is_file() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|source| ProcessorError::Io {
                    path: config_path.clone(),
                    source,
                })?;
            serde_json::from_str(&text).map_err(|source| ProcessorError::Json {
                path: config_path.clone(),
                source,
            })?
        } else {
            serde_json::Value::Null
        };
        let from_config = |key: &str, default: i64| {
            config
                .get(key)
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(default)
        };
        let bos_id = match tokenizer.token_to_id(BOS_TOKEN) {
            Some(id) => id as i64,
            None => from_config("bos_token_id", 0),
        };
        let eos_id = match tokenizer.token_to_id(EOS_TOKEN) {
            Some(id) => id as i64,
            None => from_config("eos_token_id", 1),
        };
        Ok(Self {
            tokenizer,
            image_token_id,
            bos_id,
            eos_id,
            options,
        })
    }

    pub fn image_token_id(&self) -> i64 {
        self.image_token_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn options(&self) -> ImageOptions {
        self.options
    }

    /// The 8-bit views of `image` with this processor's options ([`image_views`]).
    pub fn image_views(&self, image: &RgbImage) -> ImageViews {
        image_views(image, self.options)
    }

    /// One image as infer processes it, sizes from the options.
    pub fn process_image(&self, image: &RgbImage) -> ProcessedImage {
        let views = self.image_views(image);
        let tiled = !views.tiles.is_empty();
        let mut tiles = Vec::new();
        for t in &views.tiles {
            tiles.extend(normalize(t));
        }
        ProcessedImage {
            global: normalize(&views.global),
            global_size: views.global.width,
            tiles,
            tile_size: self.options.image_size,
            n_tiles: views.tiles.len(),
            grid: views.grid,
            num_tokens: num_image_tokens(self.options, tiled.then_some(views.grid)),
        }
    }

    /// Token ids of a text piece, without special tokens (`text_encode(..., bos=False)`).
    fn encode(&self, text: &str, index: usize) -> Result<Vec<i64>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ProcessorError::Tokenize {
                index,
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// One conversation through the "plain" template (module docs; the brief's semantics):
    /// bos; each user message rendered (image part -> "<image>\n", text as is), stripped, split
    /// at its images, text pieces tokenized without special tokens and images replaced by their
    /// image tokens; each assistant message stripped, tokenized, then eos, and labelled.
    /// Messages follow each other with no separator. A conversation without an answer is a
    /// prompt (nothing labelled).
    pub fn process(&self, messages: &[Message]) -> Result<Processed> {
        let mut input_ids = vec![self.bos_id];
        let mut labels = vec![IGNORE_INDEX];
        let mut images_seq_mask = vec![false];
        let mut images = Vec::new();
        let mut push = |ids: &[i64], labelled: bool, image: bool| {
            input_ids.extend_from_slice(ids);
            labels.extend(
                ids.iter()
                    .map(|&id| if labelled { id } else { IGNORE_INDEX }),
            );
            images_seq_mask.extend(std::iter::repeat_n(image, ids.len()));
        };

        for (index, m) in messages.iter().enumerate() {
            match m.role {
                Speaker::System => return Err(ProcessorError::SystemMessage { index }),
                Speaker::Assistant => {
                    let mut text = String::new();
                    for (part, p) in m.content.iter().enumerate() {
                        match p {
                            Part::Text { text: t } => text.push_str(t),
                            Part::Image { .. } => {
                                return Err(ProcessorError::ImageInAnswer {
                                    message: index,
                                    part,
                                })
                            }
                        }
                    }
                    let text = python_strip(&text);
                    if text.is_empty() {
                        return Err(ProcessorError::EmptyAnswer { index });
                    }
                    let mut ids = self.encode(text, index)?;
                    ids.push(self.eos_id);
                    push(&ids, true, false);
                }
                Speaker::User => {
                    // Render, remembering which part each placeholder came from.
                    let mut text = String::new();
                    let mut image_parts = Vec::new();
                    for (part, p) in m.content.iter().enumerate() {
                        match p {
                            Part::Text { text: t } => {
                                if t.contains(IMAGE_TOKEN) {
                                    return Err(ProcessorError::PlaceholderInText {
                                        message: index,
                                        part,
                                    });
                                }
                                text.push_str(t);
                            }
                            Part::Image { path } => {
                                text.push_str(IMAGE_TOKEN);
                                text.push('\n');
                                image_parts.push((part, path));
                            }
                        }
                    }
                    let text = python_strip(&text);
                    let mut pieces = text.split(IMAGE_TOKEN);
                    // `split` yields one more piece than there are placeholders.
                    let first = pieces.next().unwrap_or("");
                    push(&self.encode(first, index)?, false, false);
                    for ((part, path), piece) in image_parts.into_iter().zip(pieces) {
                        let img = vlmhost_imaging::load_image(path).map_err(|source| {
                            ProcessorError::Image {
                                message: index,
                                part,
                                source,
                            }
                        })?;
                        let processed = self.process_image(&img);
                        let tokens = vec![self.image_token_id; processed.num_tokens];
                        push(&tokens, false, true);
                        images.push(processed);
                        push(&self.encode(piece, index)?, false, false);
                    }
                }
            }
        }
        Ok(Processed {
            input_ids,
            labels,
            images_seq_mask,
            images,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_grids_are_sorted_by_tile_count() {
        let g = candidate_grids(MIN_TILES, MAX_TILES);
        // Every (i, j) with 2 <= i*j <= 9, once.
        let mut expect = Vec::new();
        for i in 1..=9usize {
            for j in 1..=9usize {
                if (2..=9).contains(&(i * j)) {
                    expect.push((i, j));
                }
            }
        }
        let mut sorted = g.clone();
        sorted.sort();
        assert_eq!(sorted, expect);
        assert!(g.windows(2).all(|w| w[0].0 * w[0].1 <= w[1].0 * w[1].1));
    }

    /// The premise of `find_closest_grid`'s argument that the order within a product does not
    /// matter: neighbouring distinct ratios never come from grids of equal product.
    #[test]
    fn neighbouring_ratios_never_share_a_product() {
        let g = candidate_grids(MIN_TILES, MAX_TILES);
        let mut ratios: Vec<(usize, usize)> = g.clone();
        // Sort by exact ratio i/j (cross-multiplication), keep one representative per ratio.
        ratios.sort_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)));
        ratios.dedup_by(|a, b| a.0 * b.1 == b.0 * a.1);
        let products = |r: (usize, usize)| -> Vec<usize> {
            g.iter()
                .filter(|c| c.0 * r.1 == r.0 * c.1)
                .map(|c| c.0 * c.1)
                .collect()
        };
        for w in ratios.windows(2) {
            let (a, b) = (products(w[0]), products(w[1]));
            assert!(a.iter().all(|p| !b.contains(p)), "{:?} {:?}", w[0], w[1]);
        }
    }

    /// Brute force: reversing the order within each product never changes the choice, for every
    /// image size up to 400 px and the tile sizes used.
    #[test]
    fn order_within_a_product_does_not_matter() {
        let g = candidate_grids(MIN_TILES, MAX_TILES);
        let mut rev = g.clone();
        rev.sort_by_key(|&(i, j)| (i * j, std::cmp::Reverse(i)));
        for tile in [128, 640] {
            for w in (1..=400).step_by(3) {
                for h in 1..=400 {
                    assert_eq!(
                        find_closest_grid(w, h, tile, &g),
                        find_closest_grid(w, h, tile, &rev),
                        "{w}x{h} tile {tile}"
                    );
                }
            }
        }
    }

    #[test]
    fn ties_prefer_the_larger_grid_for_large_images() {
        let g = candidate_grids(MIN_TILES, MAX_TILES);
        // Square: (2,2) and (3,3) tie; (3,3) when area > 0.5 * 128^2 * 9 = 73728.
        assert_eq!(find_closest_grid(200, 200, 128, &g), (2, 2));
        assert_eq!(find_closest_grid(272, 272, 128, &g), (3, 3)); // 73984
        assert_eq!(find_closest_grid(271, 272, 128, &g), (2, 2)); // 73712: the same tie, kept
                                                                  // 5:4 lies halfway between 1 and 3/2: (2,2), (3,2), (3,3) all at 0.25.
        assert_eq!(find_closest_grid(250, 200, 128, &g), (3, 2)); // 50000 > 49152
        assert_eq!(find_closest_grid(245, 196, 128, &g), (2, 2)); // 48020
                                                                  // The fixture image: 200x120 -> 3x2.
        assert_eq!(tile_grid(200, 120, 128), Some((3, 2)));
        assert_eq!(tile_grid(128, 128, 128), None);
    }

    #[test]
    fn token_counts_match_infer() {
        let fixture = ImageOptions {
            base_size: 256,
            image_size: 128,
            crop_mode: true,
        };
        assert_eq!(num_image_tokens(fixture, Some((3, 2))), 49);
        assert_eq!(num_image_tokens(fixture, None), 21);
        // The official modes: 64 / 100 / 256 / 400 tokens + a newline per row + the separator.
        let plain = |name| num_image_tokens(ImageOptions::mode(name).unwrap(), None);
        assert_eq!(plain("tiny"), 9 * 8 + 1);
        assert_eq!(plain("small"), 11 * 10 + 1);
        assert_eq!(plain("base"), 17 * 16 + 1);
        assert_eq!(plain("large"), 21 * 20 + 1);
        assert_eq!(
            num_image_tokens(ImageOptions::GUNDAM, Some((2, 3))),
            17 * 16 + 1 + 21 * 30
        );
        assert!(matches!(
            ImageOptions::mode("huge"),
            Err(ProcessorError::UnknownMode { .. })
        ));
        assert_eq!(
            ImageOptions::mode("Gundam").unwrap(),
            ImageOptions::default()
        );
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-0.2), -205.0 / 1024.0); // torch.tensor(-0.2).to(torch.bfloat16)
        let t = normalised_table();
        assert_eq!((t[0], t[255]), (-1.0, 1.0));
    }

    #[test]
    fn strip_is_pythons() {
        assert_eq!(python_strip("\u{1f} a b\n\u{3000}"), "a b");
        assert_eq!(python_strip("<image>\nFree OCR. "), "<image>\nFree OCR.");
    }
}
