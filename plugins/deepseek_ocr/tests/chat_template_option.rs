//! deepseek_ocr has no Jinja chat template: its processor writes every conversation in its fixed
//! layout, so the common processor option `chat_template` (issue #17) is refused, clearly.

use vlmhost_plugin_deepseek_ocr::DeepseekOcrModel;

#[test]
fn a_chat_template_is_refused_with_the_fixed_layout_named() {
    vlmhost_plugin_sdk::chat::assert_chat_template_refused::<DeepseekOcrModel>();
}
