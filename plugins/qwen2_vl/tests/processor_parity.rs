//! Parity of the Qwen2-VL preprocessing and position logic with transformers 5.23 (PIL
//! backend), on the fixture written by `scripts/fixtures/make_qwen2_vl_fixture.py`.
//!
//! Fixture folder: `$VLMHOST_QWEN2_VL_FIXTURE`, default `target/fixtures/qwen2_vl`
//! (made by scripts/fixtures.sh).

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use vlmhost_plugin_api::sample::{parse_line, Message, Part, Speaker};
use vlmhost_plugin_api::ModelOptions;
use vlmhost_plugin_qwen2_vl::processor::*;
use vlmhost_plugin_qwen2_vl::rope::rope_index;

fn fixture_dir() -> PathBuf {
    vlmhost_plugin_sdk::fixture_dir("VLMHOST_QWEN2_VL_FIXTURE", "target/fixtures/qwen2_vl", "manifest.json", "run scripts/fixtures.sh")
}

/// Reference tensors of one file, as (dtype, shape, little-endian bytes).
struct Reference(HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>);

impl Reference {
    fn load(name: &str) -> Self {
        let path = fixture_dir().join("reference").join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        Reference(st.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect())
    }
    fn i64s(&self, name: &str) -> Vec<i64> {
        let (dtype, _, data) = &self.0[name];
        assert_eq!(*dtype, Dtype::I64, "{name}");
        data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let (dtype, _, data) = &self.0[name];
        assert_eq!(*dtype, Dtype::F32, "{name}");
        data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.0[name].1.clone()
    }
}

fn processor(options: PixelOptions) -> Qwen2VlProcessor {
    Qwen2VlProcessor::from_dir(&fixture_dir().join("model"), options).unwrap()
}

fn conversations() -> Vec<Vec<Message>> {
    let data = fixture_dir().join("samples/data.jsonl");
    std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(|l| parse_line(l, data.parent().unwrap()).unwrap().messages)
        .collect()
}

fn samples_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("reference/samples.json")).unwrap()).unwrap()
}

fn grids(r: &Reference) -> Vec<[i64; 3]> {
    r.i64s("image_grid_thw").chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
}

#[test]
fn ids_labels_pixels_and_grids_equal_transformers() {
    let p = processor(PixelOptions::default());
    assert_eq!(p.image_config.max_pixels, 12544, "the fixture's own max_pixels is below the cap");
    let convs = conversations();
    assert_eq!(convs.len(), 8);
    for (i, conv) in convs.iter().enumerate() {
        let r = Reference::load(&format!("sample_{i}.safetensors"));
        let out = p.process(conv).unwrap();
        assert_eq!(out.ids.input_ids, r.i64s("input_ids"), "sample {i}: input ids");
        assert_eq!(out.ids.labels, r.i64s("labels"), "sample {i}: labels");
        assert_eq!(out.grids, grids(&r), "sample {i}: image_grid_thw");
        let theirs = r.f32s("pixel_values");
        assert_eq!(out.pixel_values.len(), theirs.len(), "sample {i}: pixel value count");
        let diff = out.pixel_values.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // PNG inputs: bit-identical (the bound of the issue is 1e-5).
        assert_eq!(diff, 0.0, "sample {i}: pixel values differ by up to {diff}");
        let labelled = out.ids.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        eprintln!("qwen2_vl sample {i}: {} tokens, {labelled} labelled, grids {:?}, pixels bit-identical", out.ids.input_ids.len(), out.grids);
    }
}

#[test]
fn mrope_positions_equal_get_rope_index() {
    let p = processor(PixelOptions::default());
    let meta = samples_json();
    let image = meta["image_token_id"].as_i64().unwrap();
    for i in 0..8 {
        let r = Reference::load(&format!("sample_{i}.safetensors"));
        let ids = r.i64s("input_ids");
        let (pos, deltas) = rope_index(&ids, None, 1, image, &grids(&r), 2).unwrap();
        assert_eq!(pos, r.i64s("position_ids"), "sample {i}: position ids");
        assert_eq!(deltas, r.i64s("rope_deltas"), "sample {i}: rope deltas");
        assert_eq!(image, p.image_token_id);
    }
    // A right-padded batch (images, text only, images): images taken row after row.
    let b = Reference::load("batch.safetensors");
    let shape = b.shape("input_ids");
    let (pos, deltas) =
        rope_index(&b.i64s("input_ids"), Some(&b.i64s("attention_mask")), shape[0], image, &grids(&b), 2).unwrap();
    let theirs = b.i64s("position_ids");
    let mask = b.i64s("attention_mask");
    let seq = shape[1];
    for a in 0..3 {
        for row in 0..shape[0] {
            for t in 0..seq {
                if mask[row * seq + t] == 1 {
                    let k = (a * shape[0] + row) * seq + t;
                    assert_eq!(pos[k], theirs[k], "batch axis {a} row {row} token {t}");
                }
            }
        }
    }
    assert_eq!(deltas, b.i64s("rope_deltas"));
}

#[test]
fn rope_index_cases_equal_transformers() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("reference/rope_index.json")).unwrap()).unwrap();
    let img = samples_json()["image_token_id"].as_i64().unwrap();
    for c in cases.as_array().unwrap() {
        let rows: Vec<Vec<i64>> = serde_json::from_value(c["input_ids"].clone()).unwrap();
        let grids: Vec<[i64; 3]> = serde_json::from_value(c["image_grid_thw"].clone()).unwrap();
        let mask: Option<Vec<Vec<i64>>> = serde_json::from_value(c["attention_mask"].clone()).unwrap();
        let flat: Vec<i64> = rows.iter().flatten().map(|&t| if t == 1 { img } else { t }).collect();
        let mask_flat: Option<Vec<i64>> = mask.map(|m| m.into_iter().flatten().collect());
        let (pos, deltas) = rope_index(&flat, mask_flat.as_deref(), rows.len(), img, &grids, 2).unwrap();
        let theirs: Vec<Vec<Vec<i64>>> = serde_json::from_value(c["position_ids"].clone()).unwrap();
        let theirs: Vec<i64> = theirs.into_iter().flatten().flatten().collect();
        assert_eq!(pos, theirs, "{}", c["name"]);
        assert_eq!(deltas, serde_json::from_value::<Vec<i64>>(c["rope_deltas"].clone()).unwrap(), "{}", c["name"]);
    }
}

#[test]
fn smart_resize_cases_equal_transformers() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("reference/smart_resize.json")).unwrap()).unwrap();
    for c in cases.as_array().unwrap() {
        let n = |k: &str| c[k].as_u64().unwrap() as usize;
        let ours = smart_resize(n("height"), n("width"), 28, n("min_pixels"), n("max_pixels"));
        match c.get("resized") {
            Some(r) => assert_eq!(ours, Ok((r[0].as_u64().unwrap() as usize, r[1].as_u64().unwrap() as usize)), "{c}"),
            None => assert_eq!(ours.unwrap_err(), c["error"].as_str().unwrap(), "{c}"),
        }
    }
}

#[test]
fn pixel_options_change_the_grid_and_unknown_keys_are_refused() {
    let conv = &conversations()[2]; // a 200x150 image: 84x112 at max_pixels 12544
    assert_eq!(processor(PixelOptions::default()).process(conv).unwrap().grids, [[1, 6, 8]]);
    let small = processor(PixelOptions { min_pixels: None, max_pixels: Some(3136) }).process(conv).unwrap();
    assert_eq!(small.grids, [[1, 2, 4]]); // smart_resize(150, 200, 28, 3136, 3136) = (28, 56)
    let image = samples_json()["image_token_id"].as_i64().unwrap();
    assert_eq!(small.ids.input_ids.iter().filter(|&&t| t == image).count(), 2);
    let options = ModelOptions::from_json(r#"{"max_pixels": 3136, "resolution": "high"}"#).unwrap();
    let e = vlmhost_plugin_qwen2_vl::pixel_options(&options).unwrap_err().to_string();
    assert!(e.contains("unknown option(s) resolution") && e.contains("min_pixels, max_pixels"), "{e}");
    let options = ModelOptions::from_json(r#"{"max_pixels": "a lot"}"#).unwrap();
    let e = vlmhost_plugin_qwen2_vl::pixel_options(&options).unwrap_err().to_string();
    assert!(e.contains("processor option max_pixels: expected a whole number"), "{e}");
}

#[test]
fn bad_samples_are_explained() {
    let p = processor(PixelOptions::default());
    let user = |parts: Vec<Part>| Message { role: Speaker::User, content: parts };
    let answer = |t: &str| Message { role: Speaker::Assistant, content: vec![Part::Text { text: t.into() }] };
    let text = |t: &str| Part::Text { text: t.into() };
    let err = |msgs: Vec<Message>| p.process(&msgs).unwrap_err().to_string();

    let e = err(vec![user(vec![Part::Image { path: "/nonexistent/cat.png".into() }, text("?")]), answer("A cat.")]);
    assert!(e.contains("image file not found: /nonexistent/cat.png"), "{e}");
    let e = err(vec![user(vec![text("look <|image_pad|> here")]), answer("No.")]);
    assert!(e.contains("message 0 (user) contains \"<|image_pad|>\""), "{e}");
    let img = fixture_dir().join("samples/img0_rgb_84x56.png");
    let e = err(vec![user(vec![text("Draw")]), Message { role: Speaker::Assistant, content: vec![Part::Image { path: img }] }]);
    assert!(e.contains("message 1 (assistant) contains an image"), "{e}");
    let e = err(vec![user(vec![text("Hi")]), answer("  ")]);
    assert!(e.contains("message 1 (assistant) has an empty answer"), "{e}");
    assert!(p.process(&[user(vec![text("q")])]).is_ok(), "a prompt needs no answer");
    let e = err(vec![Message { role: Speaker::System, content: vec![text("s")] }]);
    assert!(e.contains("no assistant message"), "{e}");
    // An extreme aspect ratio is refused with the file and what to do.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strip.png");
    ::image::RgbImage::new(250, 1).save(&path).unwrap();
    let e = err(vec![user(vec![Part::Image { path: path.clone() }]), answer("A line.")]);
    assert!(e.contains("strip.png (250x1): absolute aspect ratio must be smaller than 200") && e.contains("crop or pad"), "{e}");
}

#[test]
fn a_prompt_gets_the_generation_prompt_and_no_labels() {
    let p = processor(PixelOptions::default());
    let conv = &conversations()[0];
    let prompt = &conv[..1];
    let out = p.process(prompt).unwrap();
    assert!(out.ids.labels.iter().all(|&l| l == IGNORE_INDEX));
    let text = p.tokenizer().decode(&out.ids.input_ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), false).unwrap();
    assert!(text.ends_with("<|im_end|>\n<|im_start|>assistant\n"), "{text:?}");
    // The full sample starts with exactly these tokens.
    let full = p.process(conv).unwrap();
    assert_eq!(&full.ids.input_ids[..out.ids.input_ids.len()], &out.ids.input_ids[..]);
}
