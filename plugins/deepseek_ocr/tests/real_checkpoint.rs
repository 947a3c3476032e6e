//! The real `deepseek-ai/DeepSeek-OCR` is accepted without a download: its
//! config.json builds a spec whose parameters are exactly the checkpoint's
//! tensors, names and shapes (`deepseek-ocr.weights.json`, built from the
//! original code's constructors on the meta device and checked against the
//! public model.safetensors.index.json; see its "source").

use std::collections::BTreeMap;
use vlmhost_plugin_api::ParamKind;
use vlmhost_plugin_deepseek_ocr::config::DeepseekOcrConfig;
use vlmhost_plugin_deepseek_ocr::model::DeepseekOcr;

fn read(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn the_real_checkpoint_is_accepted() {
    let config = DeepseekOcrConfig::from_value(&read("deepseek-ocr.config.json")).unwrap();
    assert_eq!((config.sam.window_size, config.sam.neck_channels, config.clip.grid, config.sam.grid), (14, 256, 16, 64));
    let model = DeepseekOcr::new(config, 128815);
    let spec = &model.spec;
    let want: BTreeMap<String, Vec<i64>> = read("deepseek-ocr.weights.json")["weights"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()))
        .collect();
    let got: BTreeMap<String, Vec<i64>> =
        spec.params.iter().map(|p| (p.name.to_string(), p.shape.iter().copied().collect())).collect();
    // The one buffer in the checkpoint is ignored, by pattern.
    let buffer = "model.vision_model.embeddings.position_ids";
    assert!(want.contains_key(buffer));
    assert!(spec.ignored_keys.iter().any(|k| k.as_str() == buffer));
    let want: BTreeMap<_, _> = want.into_iter().filter(|(k, _)| k != buffer).collect();
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing from the spec: {missing:?}; not in the checkpoint: {extra:?}");
    for (name, shape) in &want {
        assert_eq!(&got[name], shape, "{name}");
    }
    let total: i64 = want.values().map(|s| s.iter().product::<i64>()).sum();
    assert_eq!(total, 3_336_106_240, "parameters of DeepSeek-OCR");
    // The routers are bare parameters, never modules (so never LoRA targets);
    // every expert's linear layers are modules.
    let gates: Vec<_> = spec.params.iter().filter(|p| p.name.ends_with(".mlp.gate.weight")).collect();
    assert_eq!(gates.len(), 11, "layers 1..=11 are MoE layers");
    assert!(gates.iter().all(|p| p.kind == ParamKind::Weight));
    assert!(!spec.modules.iter().any(|m| m.name.ends_with(".mlp.gate")));
    let experts = spec.modules.iter().filter(|m| m.name.contains(".mlp.experts.") && m.lora).count();
    assert_eq!(experts, 11 * 64 * 3);
    // Convolutions (patch embeddings, the neck, net_2, net_3) never take LoRA.
    assert!(spec.modules.iter().filter(|m| m.name.contains("sam_model.neck") || m.name.ends_with("net_3")).all(|m| !m.lora));
}
