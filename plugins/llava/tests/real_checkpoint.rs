//! The real `llava-hf/llava-1.5-7b-hf`: its config.json (kept in this folder)
//! and its weight names and shapes (computed by transformers on the meta
//! device into the fixture's `real_checkpoint_keys.json`) are exactly what
//! this plugin declares, in all three key layouts. Nothing is downloaded.

use std::collections::BTreeMap;
use std::path::Path;
use vlmhost_plugin_api::model::map_key;
use vlmhost_plugin_llava::config::LlavaConfig;
use vlmhost_plugin_llava::model::Llava;

fn keys() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fixtures/llava/real_checkpoint_keys.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/fixtures.sh", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_plugin_declares_exactly_the_real_checkpoint() {
    let config = LlavaConfig::from_json(include_str!("llava-1.5-7b-hf.config.json")).unwrap();
    let spec = Llava::new(config).spec;
    let ours: BTreeMap<String, Vec<i64>> = spec.params.iter().map(|p| (p.name.to_string(), p.shape.to_vec())).collect();
    let k = keys();
    assert_eq!(k["source_config"], "plugins/llava/tests/llava-1.5-7b-hf.config.json");
    for layout in ["hub", "transformers_save_format", "in_memory"] {
        let theirs: BTreeMap<String, Vec<i64>> = k[layout]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, shape)| {
                let shape = shape.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
                (map_key(&spec.key_rules, name), shape)
            })
            .collect();
        assert_eq!(theirs.len(), k[layout].as_object().unwrap().len(), "{layout}: two keys map to one name");
        let missing: Vec<&String> = theirs.keys().filter(|n| !ours.contains_key(*n)).collect();
        let extra: Vec<&String> = ours.keys().filter(|n| !theirs.contains_key(*n)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{layout}: not declared {missing:?}; not in the checkpoint {extra:?}");
        assert_eq!(ours, theirs, "{layout}: shapes differ");
    }
    let total: i64 = spec.params.iter().map(|p| p.shape.iter().product::<i64>()).sum();
    assert_eq!(total, k["num_parameters"].as_i64().unwrap());
}
