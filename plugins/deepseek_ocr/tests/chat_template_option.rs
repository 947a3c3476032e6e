//! deepseek_ocr has no Jinja chat template: its processor writes every conversation in its fixed
//! layout, so the common processor option `chat_template` (issue #17) is refused, clearly.

use std::path::Path;
use vlmhost_plugin_deepseek_ocr::DeepseekOcrModel;
use vlmhost_plugin_api::{ModelOptions, Plugin};
use vlmhost_plugin_sdk::FamilyPlugin;

#[test]
fn a_chat_template_is_refused_with_the_fixed_layout_named() {
    let options = ModelOptions::from_json(r#"{"chat_template": "/templates/mine.jinja"}"#).unwrap();
    let err = FamilyPlugin::<DeepseekOcrModel>::open("deepseek_ocr", Path::new("/nonexistent"), &options).err().expect("refused").to_string();
    for needle in ["chat_template", "deepseek_ocr", "fixed layout", "/templates/mine.jinja"] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}
