//! The real `adept/fuyu-8b`: the spec built from its config.json (kept in this
//! folder) declares exactly its tensor names and shapes, as transformers 5.23
//! computes them on the meta device (`fuyu-8b.weights.json`, written by
//! `scripts/fixtures/make_fuyu_fixture.py --write-real-names`), in the hub
//! layout and in transformers 5's in-memory layout. Nothing is downloaded.

use std::collections::BTreeMap;
use vlmhost_plugin_api::model::map_key;
use vlmhost_plugin_api::Role;
use vlmhost_plugin_fuyu::config::FuyuConfig;
use vlmhost_plugin_fuyu::model::Fuyu;

fn names() -> serde_json::Value {
    serde_json::from_str(include_str!("fuyu-8b.weights.json")).unwrap()
}

fn layout(v: &serde_json::Value) -> BTreeMap<String, Vec<i64>> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(name, shape)| (name.clone(), shape.as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect()))
        .collect()
}

#[test]
fn the_plugin_declares_exactly_the_real_checkpoint() {
    let spec = Fuyu::new(FuyuConfig::from_json(include_str!("fuyu-8b.config.json")).unwrap()).spec;
    let ours: BTreeMap<String, Vec<i64>> = spec.params.iter().map(|p| (p.name.to_string(), p.shape.to_vec())).collect();
    let k = names();

    // The hub layout is the plugin's own naming: equal as it is.
    let hub = layout(&k["hub"]);
    let missing: Vec<&String> = hub.keys().filter(|n| !ours.contains_key(*n)).collect();
    let extra: Vec<&String> = ours.keys().filter(|n| !hub.contains_key(*n)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "not declared {missing:?}; not in the checkpoint {extra:?}");
    assert_eq!(ours, hub, "shapes differ");

    // transformers 5's names map onto ours through the key rules, and back through transformers_names.
    let memory = layout(&k["in_memory"]);
    let mapped: BTreeMap<String, Vec<i64>> = memory.iter().map(|(n, s)| (map_key(&spec.key_rules, n), s.clone())).collect();
    assert_eq!(mapped, ours, "in-memory layout");
    for name in ours.keys() {
        let theirs = map_key(&spec.transformers_names, name);
        assert!(memory.contains_key(&theirs), "{name} -> {theirs} is not a transformers name");
    }

    let total: i64 = spec.params.iter().map(|p| p.shape.iter().product::<i64>()).sum();
    assert_eq!(total, k["num_parameters"].as_i64().unwrap());
    assert_eq!(total, 9_408_238_592);
}

#[test]
fn roles_linears_and_layers_of_the_real_checkpoint() {
    let spec = Fuyu::new(FuyuConfig::from_json(include_str!("fuyu-8b.config.json")).unwrap()).spec;
    assert!(!spec.has_vision_encoder);
    assert!(spec.roles.iter().all(|r| r.role != Role::Vision));
    let proj = spec.roles.iter().find(|r| r.role == Role::Projector).unwrap();
    assert_eq!(proj.include.as_slice(), ["vision_embed_tokens.**"]);
    let linears: Vec<(&str, i64, i64)> = spec
        .modules
        .iter()
        .filter(|m| !m.name.contains(".layers.") || m.name.contains(".layers.0."))
        .map(|m| (m.name.as_str(), m.in_features, m.out_features))
        .collect();
    assert_eq!(
        linears,
        [
            ("vision_embed_tokens", 2700, 4096),
            ("language_model.model.layers.0.self_attn.query_key_value", 4096, 12288),
            ("language_model.model.layers.0.self_attn.dense", 4096, 4096),
            ("language_model.model.layers.0.mlp.dense_h_to_4h", 4096, 16384),
            ("language_model.model.layers.0.mlp.dense_4h_to_h", 16384, 4096),
            ("language_model.lm_head", 4096, 262144),
        ]
    );
}
