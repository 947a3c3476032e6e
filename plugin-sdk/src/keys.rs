//! The checkpoint key layouts a family reads and the names transformers 5
//! gives its parameters in memory, stated once: [`KeyRules`].

use vlmhost_plugin_api::builder::{key_rule, SpecBuilder};
use vlmhost_plugin_api::model::{KeyRule, RoleRule};
use vlmhost_plugin_api::ModelSpec;

/// A family's key rules, in order (the first matching prefix wins). A rule
/// added with [`KeyRules::in_memory`] is also how transformers 5 names those
/// parameters in memory (what PEFT saves adapters under): its inverse goes
/// into the spec's `transformers_names`, in the same order.
#[derive(Default)]
pub struct KeyRules {
    read: Vec<KeyRule>,
    transformers_names: Vec<KeyRule>,
}

impl KeyRules {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys under `theirs` (transformers 5's in-memory name) are the plugin's under `ours`.
    pub fn in_memory(mut self, theirs: &str, ours: &str) -> Self {
        self.read.push(key_rule(theirs, ours));
        self.transformers_names.push(key_rule(ours, theirs));
        self
    }

    /// Keys under `from` (another layout the family reads) are the plugin's under `to`.
    pub fn also(mut self, from: &str, to: &str) -> Self {
        self.read.push(key_rule(from, to));
        self
    }

    /// The spec of family `family` built by `b`, with these key rules.
    pub fn spec(self, b: SpecBuilder, family: &str, roles: Vec<RoleRule>, ignored_keys: &[&str], has_vision_encoder: bool) -> ModelSpec {
        let ignored = ignored_keys.iter().map(|k| k.to_string()).collect();
        let mut spec = b.build(family, roles, self.read, ignored, has_vision_encoder);
        spec.transformers_names = self.transformers_names.into();
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmhost_plugin_api::model::map_key;

    #[test]
    fn in_memory_rules_read_and_name_both_ways() {
        let spec = KeyRules::new()
            .in_memory("model.language_model.", "language_model.model.")
            .also("model.", "model.")
            .in_memory("lm_head.", "language_model.lm_head.")
            .spec(SpecBuilder::new(), "test", vec![], &["**.inv_freq"], false);
        assert_eq!(map_key(&spec.key_rules, "model.language_model.layers.0.w"), "language_model.model.layers.0.w");
        assert_eq!(map_key(&spec.key_rules, "model.norm.w"), "model.norm.w");
        assert_eq!(map_key(&spec.key_rules, "lm_head.weight"), "language_model.lm_head.weight");
        assert_eq!(spec.key_rules.len(), 3);
        let names = [key_rule("language_model.model.", "model.language_model."), key_rule("language_model.lm_head.", "lm_head.")];
        assert_eq!(spec.transformers_names.as_slice(), names);
        assert_eq!(spec.ignored_keys.len(), 1);
    }
}
