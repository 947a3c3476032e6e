//! The processor against transformers' `FuyuProcessor` on the fixture made by
//! `scripts/fixtures/make_fuyu_fixture.py`: token ids, labels, the uint8 image
//! the patches are cut from, and the patches, bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};
use vlmhost_plugin_api::sample::parse_line;
use vlmhost_plugin_api::ModelOptions;
use vlmhost_plugin_sdk::Family;
use vlmhost_plugin_fuyu::processor::{FuyuProcessor, FuyuSample};
use vlmhost_plugin_fuyu::FuyuModel;

fn fixture() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fixtures/fuyu");
    assert!(dir.join("manifest.json").is_file(), "{} is missing: run scripts/fixtures.sh", dir.display());
    dir
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture().join("reference").join(name)).unwrap().into_iter().collect()
}

fn samples() -> Vec<FuyuSample> {
    let data = fixture().join("samples/data.jsonl");
    std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(|l| FuyuSample::from_messages(&parse_line(l, data.parent().unwrap()).unwrap().messages).unwrap())
        .collect()
}

fn ids(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.reshape([-1])).unwrap()
}

fn check(p: &FuyuProcessor, s: &FuyuSample, r: &HashMap<String, Tensor>, what: &str) {
    let out = p.process(s).unwrap();
    assert_eq!(out.ids.input_ids, ids(&r["input_ids"]), "{what}: input ids");
    assert_eq!(out.ids.labels, ids(&r["labels"]), "{what}: labels");
    assert_eq!(out.prompt_len as i64, r["prompt_len"].int64_value(&[0]), "{what}: prompt length");
    // The uint8 image: transformers' is [C, H, W].
    let img = Tensor::from_slice(&out.image.image.data)
        .view([out.image.image.height as i64, out.image.image.width as i64, 3])
        .permute([2, 0, 1]);
    assert_eq!(img.size(), r["image_u8"].size(), "{what}: image size");
    assert!(img.equal(&r["image_u8"].to_kind(Kind::Uint8)), "{what}: uint8 image differs");
    let patches = Tensor::from_slice(&out.image.patches).view([-1, 2700]);
    assert!(patches.equal(&r["pixel_values"]), "{what}: patches differ (max {})", (patches - &r["pixel_values"]).abs().max());
    let n_image = out.image_token_mask.iter().filter(|&&m| m).count();
    assert_eq!(n_image, out.image.rows * (out.image.cols + 1), "{what}: image token mask");
}

#[test]
fn inputs_and_patches_equal_transformers() {
    let p = FuyuProcessor::from_dir(&fixture().join("model"), None).unwrap();
    assert_eq!(p.image_config.size, (60, 90));
    for (i, s) in samples().iter().enumerate() {
        check(&p, s, &reference(&format!("sample_{i}.safetensors")), &format!("sample {i}"));
    }
}

#[test]
fn target_size_option_equals_transformers_size_argument() {
    let mut o = ModelOptions::default();
    o.0.insert("target_height".into(), "120".into());
    o.0.insert("target_width".into(), 120.into());
    let m = FuyuModel::open(&fixture().join("model"), &o).unwrap();
    assert_eq!(m.processor.image_config.size, (120, 120));
    let s = &samples()[2];
    check(&m.processor, s, &reference("sample_2_size_120x120.safetensors"), "sample 2 at 120x120");
}

#[test]
fn bad_options_and_samples_are_explained() {
    let dir = fixture().join("model");
    let open = |pairs: &[(&str, &str)]| {
        let mut o = ModelOptions::default();
        for (k, v) in pairs {
            o.0.insert((*k).into(), (*v).into());
        }
        FuyuModel::open(&dir, &o).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let e = open(&[("target_size", "100")]);
    assert!(e.contains("unknown option(s) target_size") && e.contains("target_height, target_width"), "{e}");
    let e = open(&[("target_height", "100"), ("target_width", "90")]);
    assert!(e.contains("not a positive multiple of the 30x30 patch"), "{e}");
    let e = open(&[("target_height", "90")]);
    assert!(e.contains("go together"), "{e}");
    let e = open(&[("target_height", "tall"), ("target_width", "90")]);
    assert!(e.contains("processor option target_height: expected a whole number"), "{e}");

    let m = FuyuModel::open(&dir, &ModelOptions::default()).unwrap();
    let base = fixture().join("samples");
    let prepare = |line: &str| m.prepare(&parse_line(line, &base).unwrap()).err().map(|e| e.to_string()).unwrap_or_default();
    let e = prepare(r#"{"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}], "images": ["nope.png"]}"#);
    assert!(e.contains("nope.png") && e.contains("not found"), "{e}");
    let e = prepare(
        r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}], "images": ["img0_rgb_90x60.png"]}"#,
    );
    assert!(e.contains("3 message(s)") && e.contains("no system message"), "{e}");
    let e = prepare(
        r#"{"messages": [{"role": "user", "content": "<image><image>hi"}, {"role": "assistant", "content": "x"}], "images": ["img0_rgb_90x60.png", "img1_rgb_47x35.png"]}"#,
    );
    assert!(e.contains("2 image(s)"), "{e}");
}
