//! Parity of the DeepSeek-OCR preprocessing with the original code.
//!
//! * The shared reference fixture computed by the original remote code's `infer`
//!   (`$VLMHOST_DEEPSEEK_OCR_REFERENCE`, default the repository's copy `tests/fixtures/deepseek_ocr`; its README
//!   explains every tensor): ids, labels, mask, views and bf16 values, bit for bit.
//! * The preprocessing cases written by `scripts/fixtures/make_deepseek_ocr_fixture.py` with
//!   Pillow (`$VLMHOST_DEEPSEEK_OCR_FIXTURE`, default `target/fixtures/deepseek_ocr`, made by
//!   `scripts/fixtures.sh`), which also holds the model folder with the stand-in tokenizer.
//! * Error messages.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use vlmhost_imaging::{load_image, RgbImage};
use vlmhost_plugin_api::sample::{Message, Part, Speaker};
use vlmhost_plugin_deepseek_ocr::processor::*;

fn reference_dir() -> PathBuf {
    vlmhost_plugin_sdk::fixture_dir("VLMHOST_DEEPSEEK_OCR_REFERENCE", "tests/fixtures/deepseek_ocr", "inputs.safetensors", "point it at the folder holding inputs.safetensors")
}

fn fixture_dir() -> PathBuf {
    let dir = std::env::var_os("VLMHOST_DEEPSEEK_OCR_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fixtures/deepseek_ocr")
        });
    assert!(
        dir.join("model/tokenizer.json").is_file()
            && dir.join("preprocess/manifest.json").is_file(),
        "DeepSeek-OCR fixture not found at {} (run scripts/fixtures.sh, or set \
         VLMHOST_DEEPSEEK_OCR_FIXTURE)",
        dir.display()
    );
    dir
}

/// The options the shared fixture used: base 256, tiles 128, crop mode.
const FIXTURE_OPTIONS: ImageOptions = ImageOptions {
    base_size: 256,
    image_size: 128,
    crop_mode: true,
};

fn processor(options: ImageOptions) -> DeepseekOcrProcessor {
    DeepseekOcrProcessor::from_dir(&fixture_dir().join("model"), options).unwrap()
}

struct Tensors {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl Tensors {
    fn load(path: PathBuf) -> Self {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes, path }
    }

    fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .tensor(name)
            .is_ok()
    }

    fn get(&self, name: &str, dtype: Dtype) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("{}: tensor {name}: {e}", self.path.display()));
        assert_eq!(t.dtype(), dtype, "{name}");
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn i64s(&self, name: &str) -> Vec<i64> {
        let (_, d) = self.get(name, Dtype::I64);
        d.chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn u8s(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        self.get(name, Dtype::U8)
    }

    /// bfloat16 values widened to f32 (exact).
    fn bf16s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, d) = self.get(name, Dtype::BF16);
        let v = d
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect();
        (shape, v)
    }
}

/// Bitwise equality of two float vectors, reporting the first difference.
fn assert_bits_eq(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let diffs = ours
        .iter()
        .zip(theirs)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    if diffs > 0 {
        let i = ours
            .iter()
            .zip(theirs)
            .position(|(a, b)| a.to_bits() != b.to_bits())
            .unwrap();
        panic!(
            "{what}: {diffs} of {} values differ; first at {i}: {} vs {}",
            ours.len(),
            ours[i],
            theirs[i]
        );
    }
}

fn tiles_bytes(tiles: &[RgbImage]) -> Vec<u8> {
    tiles.iter().flat_map(|t| t.data.iter().copied()).collect()
}

fn text(t: &str) -> Part {
    Part::Text { text: t.into() }
}

fn image(p: &Path) -> Part {
    Part::Image {
        path: p.to_path_buf(),
    }
}

fn msg(role: Speaker, content: Vec<Part>) -> Message {
    Message { role, content }
}

/// Byte-tokenizer ids of `s` (id = UTF-8 byte + 2).
fn bytes(s: &str) -> Vec<i64> {
    s.bytes().map(|b| b as i64 + 2).collect()
}

// ---------------------------------------------------------------------------------------------
// (a) the original code's infer() on the shared fixture
// ---------------------------------------------------------------------------------------------

#[test]
fn tokenizer_and_special_ids_come_from_the_model_folder() {
    let p = processor(FIXTURE_OPTIONS);
    assert_eq!((p.image_token_id(), p.bos_id(), p.eos_id()), (300, 0, 1));
    assert_eq!(p.options(), FIXTURE_OPTIONS);
    let enc = p.tokenizer().encode("\nFree OCR.", false).unwrap();
    let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
    assert_eq!(ids, bytes("\nFree OCR."));
    // The model folder's config.json carries the SAM window as a vlmhost extension key.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("model/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["vision_config"]["width"]["sam_vit_b"]["window_size"],
        3
    );
}

#[test]
fn sample_matches_the_original_infer() {
    let reference = reference_dir();
    let inputs = Tensors::load(reference.join("inputs.safetensors"));
    let p = processor(FIXTURE_OPTIONS);
    let png = reference.join("image.png");
    let conv = vec![
        msg(Speaker::User, vec![image(&png), text("Free OCR. ")]),
        msg(Speaker::Assistant, vec![text("HELLO 42")]),
    ];
    let out = p.process(&conv).unwrap();

    assert_eq!(out.ids.input_ids, inputs.i64s("input_ids"), "input_ids");
    assert_eq!(out.ids.labels, inputs.i64s("labels"), "labels");
    let (_, mask) = inputs.u8s("images_seq_mask");
    let mask: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
    assert_eq!(out.images_seq_mask, mask, "images_seq_mask");
    let prompt_len = inputs.i64s("prompt_len")[0] as usize;
    assert!(out.ids.labels[..prompt_len].iter().all(|&l| l == IGNORE_INDEX));
    assert!(out.ids.labels[prompt_len..].iter().all(|&l| l != IGNORE_INDEX));

    assert_eq!(out.images.len(), 1);
    let img = &out.images[0];
    let crop = inputs.i64s("images_spatial_crop");
    assert_eq!([img.grid.0 as i64, img.grid.1 as i64], [crop[0], crop[1]]);
    assert_eq!(img.num_tokens, mask.iter().filter(|&&m| m).count());

    let (shape, ori) = inputs.bf16s("images_ori");
    assert_eq!(shape, vec![1, 3, 256, 256]);
    assert_eq!(img.global_size, 256);
    assert_bits_eq(&img.global, &ori, "global view (images_ori)");
    let (shape, crops) = inputs.bf16s("images_crop");
    assert_eq!(shape, vec![6, 3, 128, 128]);
    assert_eq!((img.n_tiles, img.tile_size), (6, 128));
    assert_bits_eq(&img.tiles, &crops, "tiles (images_crop)");
}

#[test]
fn views_match_the_original_uint8_views() {
    let reference = reference_dir();
    let inputs = Tensors::load(reference.join("inputs.safetensors"));
    let loaded = load_image(&reference.join("image.png")).unwrap();
    let (shape, raw) = inputs.u8s("image_uint8");
    assert_eq!(shape, vec![loaded.height, loaded.width, 3]);
    assert!(loaded.data == raw, "loaded image differs");

    let views = processor(FIXTURE_OPTIONS).image_views(&loaded);
    let (shape, global) = inputs.u8s("global_view_uint8");
    assert_eq!(shape, vec![256, 256, 3]);
    assert_eq!((views.global.width, views.global.height), (256, 256));
    assert!(views.global.data == global, "global view pixels differ");
    let (shape, crops) = inputs.u8s("crops_uint8");
    assert_eq!(shape, vec![6, 128, 128, 3]);
    assert_eq!(views.tiles.len(), 6);
    assert!(tiles_bytes(&views.tiles) == crops, "tile pixels differ");
    assert_eq!(views.grid, (3, 2));
}

// ---------------------------------------------------------------------------------------------
// (b) the generated cases (Pillow reference)
// ---------------------------------------------------------------------------------------------

#[test]
fn generated_cases_match_pillow_bit_for_bit() {
    let dir = fixture_dir().join("preprocess");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() >= 10, "manifest lists {} cases", cases.len());
    let mut modes = std::collections::BTreeSet::new();
    for case in cases {
        let name = format!("{} {}", case["image"], case["mode"]);
        let options = ImageOptions {
            base_size: case["base_size"].as_u64().unwrap() as usize,
            image_size: case["image_size"].as_u64().unwrap() as usize,
            crop_mode: case["crop_mode"].as_bool().unwrap(),
        };
        modes.insert((options.base_size, options.image_size, options.crop_mode));
        let p = processor(options);
        let img = load_image(&dir.join(case["image"].as_str().unwrap())).unwrap();
        assert_eq!(
            [img.width as u64, img.height as u64],
            [
                case["width"].as_u64().unwrap(),
                case["height"].as_u64().unwrap()
            ],
            "{name}"
        );
        let t = Tensors::load(dir.join(case["file"].as_str().unwrap()));
        let views = p.image_views(&img);
        let processed = p.process_image(&img);

        let (shape, global) = t.u8s("global_uint8");
        assert_eq!(
            shape,
            vec![views.global.height, views.global.width, 3],
            "{name}"
        );
        assert!(
            views.global.data == global,
            "{name}: global view pixels differ"
        );
        let (_, global_bf16) = t.bf16s("global_bf16");
        assert_bits_eq(
            &processed.global,
            &global_bf16,
            &format!("{name}: global view"),
        );
        assert_eq!(processed.global_size, shape[0], "{name}");

        let grid = t.i64s("grid");
        assert_eq!(
            [views.grid.0 as i64, views.grid.1 as i64],
            [grid[0], grid[1]],
            "{name}"
        );
        assert_eq!(processed.grid, views.grid, "{name}");
        assert_eq!(
            processed.num_tokens as i64,
            t.i64s("num_tokens")[0],
            "{name}: image tokens"
        );
        let n_tiles = case["n_tiles"].as_u64().unwrap() as usize;
        assert_eq!(processed.n_tiles, n_tiles, "{name}");
        if n_tiles > 0 {
            let (shape, tiles) = t.u8s("tiles_uint8");
            assert_eq!(shape[0], views.tiles.len(), "{name}");
            assert!(
                tiles_bytes(&views.tiles) == tiles,
                "{name}: tile pixels differ"
            );
            let (_, tiles_bf16) = t.bf16s("tiles_bf16");
            assert_bits_eq(&processed.tiles, &tiles_bf16, &format!("{name}: tiles"));
        } else {
            assert!(!t.has("tiles_uint8"), "{name}");
            assert!(
                views.tiles.is_empty() && processed.tiles.is_empty(),
                "{name}"
            );
            assert_eq!(views.grid, (1, 1), "{name}");
        }
    }
    // Crop mode, direct resize and pad-only (> 640) are all covered.
    assert!(modes.contains(&(256, 128, true)));
    assert!(modes.iter().any(|m| !m.2 && m.1 <= 640));
    assert!(modes.iter().any(|m| !m.2 && m.1 > 640));
}

// ---------------------------------------------------------------------------------------------
// Conversations
// ---------------------------------------------------------------------------------------------

#[test]
fn turns_concatenate_without_separators_and_only_answers_are_labelled() {
    let dir = fixture_dir().join("preprocess/images");
    let p = processor(FIXTURE_OPTIONS);
    let (small, wide) = (dir.join("small.png"), dir.join("wide.png"));
    let conv = vec![
        msg(Speaker::User, vec![text("  Hi "), image(&small)]),
        msg(Speaker::Assistant, vec![text(" A b\n")]),
        msg(Speaker::User, vec![image(&wide), text("x"), text("y ")]),
        msg(Speaker::Assistant, vec![text("C")]),
    ];
    let out = p.process(&conv).unwrap();
    // "Hi <image>\n" stripped -> "Hi <image>"; "<image>\nxy" stays.
    let (n_small, n_wide) = (21, 35);
    let mut ids = vec![0];
    let mut labels = vec![-100];
    let mut mask = vec![false];
    let mut push = |t: Vec<i64>, lab: bool, img: bool| {
        labels.extend(t.iter().map(|&i| if lab { i } else { -100 }));
        mask.extend(std::iter::repeat_n(img, t.len()));
        ids.extend(t);
    };
    push(bytes("Hi "), false, false);
    push(vec![300; n_small], false, true);
    push([bytes("A b"), vec![1]].concat(), true, false);
    push(vec![300; n_wide], false, true);
    push(bytes("\nxy"), false, false);
    push([bytes("C"), vec![1]].concat(), true, false);
    assert_eq!(out.ids.input_ids, ids);
    assert_eq!(out.ids.labels, labels);
    assert_eq!(out.images_seq_mask, mask);
    assert_eq!(out.images.len(), 2);
    assert_eq!((out.images[0].grid, out.images[1].grid), ((1, 1), (3, 1)));
    assert_eq!(out.images[0].n_tiles, 0);
    assert!(out.images[0].tiles.is_empty());
}

#[test]
fn a_prompt_without_answer_has_no_labels() {
    let dir = fixture_dir().join("preprocess/images");
    let p = processor(ImageOptions {
        base_size: 128,
        image_size: 128,
        crop_mode: false,
    });
    let conv = vec![msg(
        Speaker::User,
        vec![image(&dir.join("tall.png")), text("Free OCR.")],
    )];
    let out = p.process(&conv).unwrap();
    assert_eq!(out.ids.input_ids.len(), 1 + 7 + 10);
    assert!(out.ids.labels.iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(out.images[0].global_size, 128);
}

// ---------------------------------------------------------------------------------------------
// (c) errors
// ---------------------------------------------------------------------------------------------

/// What the fixture processor refuses `conv` with.
fn refusal(conv: &[Message]) -> String {
    processor(FIXTURE_OPTIONS).process(conv).unwrap_err().to_string()
}

#[test]
fn missing_image_names_the_file_and_the_part() {
    let path = fixture_dir().join("preprocess/images/does_not_exist.png");
    let err = refusal(&[msg(Speaker::User, vec![text("Look: "), image(&path)]), msg(Speaker::Assistant, vec![text("x")])]);
    assert!(err.starts_with("message 0, part 1: image file not found: ") && err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("does_not_exist.png") && err.contains("message 0, part 1"), "{err}");
}

#[test]
fn a_system_message_is_rejected_with_advice() {
    let err = refusal(&[
        msg(Speaker::System, vec![text("You are an OCR engine.")]),
        msg(Speaker::User, vec![text("hi")]),
        msg(Speaker::Assistant, vec![text("x")]),
    ]);
    assert!(err.starts_with("message 0 is a system message"), "{err}");
    assert!(err.contains("message 0") && err.contains("first user message"), "{err}");
}

#[test]
fn an_image_in_an_answer_is_rejected() {
    let png = fixture_dir().join("preprocess/images/small.png");
    let err = refusal(&[msg(Speaker::User, vec![text("hi")]), msg(Speaker::Assistant, vec![text("see"), image(&png)])]);
    assert!(err.starts_with("message 1 (assistant), part 1 is an image"), "{err}");
    assert!(err.contains("message 1 (assistant), part 1"), "{err}");
}

#[test]
fn a_literal_placeholder_and_an_empty_answer_are_rejected() {
    let err = refusal(&[msg(Speaker::User, vec![text("a <image> b")]), msg(Speaker::Assistant, vec![text("x")])]);
    assert!(err.starts_with("message 0, part 0: the text contains the literal image placeholder"), "{err}");
    let err = refusal(&[msg(Speaker::User, vec![text("hi")]), msg(Speaker::Assistant, vec![text("  \n")])]);
    assert!(err.starts_with("message 1 (assistant) has an empty answer"), "{err}");
}

#[test]
fn a_missing_tokenizer_names_the_file() {
    let dir = std::env::temp_dir().join(format!("vlmhost-dsocr-notok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixture_dir().join("model/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = DeepseekOcrProcessor::from_dir(&dir, ImageOptions::GUNDAM)
        .err()
        .expect("a folder without tokenizer.json must be rejected");
    assert!(
        matches!(&err, ProcessorError::TokenizerMissing { path } if *path == dir.join("tokenizer.json")),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bos_and_eos_fall_back_to_config_json() {
    // A tokenizer without DeepSeek's bos/eos tokens: ids from config.json.
    let dir = std::env::temp_dir().join(format!("vlmhost-dsocr-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tok: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("model/tokenizer.json")).unwrap(),
    )
    .unwrap();
    tok["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["content"] == "<image>");
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    vocab.remove("<｜begin▁of▁sentence｜>");
    vocab.remove("<｜end▁of▁sentence｜>");
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"bos_token_id": 7, "eos_token_id": 9}"#,
    )
    .unwrap();
    let p = DeepseekOcrProcessor::from_dir(&dir, ImageOptions::GUNDAM).unwrap();
    assert_eq!((p.bos_id(), p.eos_id(), p.image_token_id()), (7, 9, 300));
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let p = DeepseekOcrProcessor::from_dir(&dir, ImageOptions::GUNDAM).unwrap();
    assert_eq!((p.bos_id(), p.eos_id()), (0, 1));
    let _ = std::fs::remove_dir_all(&dir);
}
