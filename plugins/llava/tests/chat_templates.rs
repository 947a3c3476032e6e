//! LLaVA with chat templates (issue #17): the checkpoint's template or the user's
//! (`chat_template` processor option) rendered by the SDK, labels as transformers' assistant
//! mask plus `</s>`, on the fixture written by `scripts/fixtures/make_template_labels_fixture.py`
//! (`target/fixtures/template_labels`, or `$VLMHOST_TEMPLATE_LABELS_FIXTURE`) over the tiny LLaVA
//! fixture's model (`target/fixtures/llava/model`, or `$VLMHOST_LLAVA_FIXTURE`).
//!
//! * `real`: llava-hf/llava-1.5-7b-hf's template, verbatim: one generation block per text part of
//!   an answer, `text + ' '`, no `</s>`: the plugin inserts `</s>` right after each answer; the
//!   reference is transformers' processor on that text, with its mask plus `</s>`.
//! * `custom`: its own system prompt, a generation block per answer, `</s>` written right after
//!   the block: transformers' ids, and its mask plus `</s>`.

use vlmhost_plugin_llava::processor::LlavaProcessor;
use vlmhost_plugin_llava::LlavaModel;
use vlmhost_plugin_sdk::chat::TemplateLabelsFixture;

const FAMILY: &str = "llava";

fn fixture() -> TemplateLabelsFixture {
    TemplateLabelsFixture::of(FAMILY)
}

/// Every sample of `template` (real, custom) processed by `processor` equals the reference.
fn assert_matches(processor: &LlavaProcessor, template: &str) {
    let (rule, cases) = fixture().cases(template);
    assert_eq!(processor.template.as_ref().expect("a template").label_rule(), rule, "{template}");
    for (s, messages) in &cases {
        let p = processor.process(messages).unwrap_or_else(|e| panic!("{template} sample {}: {e}", s["index"]));
        let chat = processor.render(messages).unwrap();
        assert_eq!(chat.text, s["text"].as_str().unwrap(), "{template} sample {}: text", s["index"]);
        assert_eq!(p.ids.input_ids, TemplateLabelsFixture::i64s(&s["input_ids"]), "{template} sample {}: input_ids", s["index"]);
        assert_eq!(p.ids.labels, TemplateLabelsFixture::i64s(&s["labels"]), "{template} sample {}: labels", s["index"]);
        assert_eq!(p.attention_mask(), TemplateLabelsFixture::i64s(&s["attention_mask"]), "{template} sample {}: attention_mask", s["index"]);
        if s["end_of_turn_inserted"] == 0 {
            // The template's own text: transformers' ids, and its mask plus the end token.
            let tf = &s["transformers"];
            assert_eq!(p.ids.input_ids, TemplateLabelsFixture::i64s(&tf["input_ids"]), "{template} sample {}", s["index"]);
            let eos = processor.tokenizer().token_to_id("</s>").unwrap() as i64;
            for (i, (&l, &m)) in p.ids.labels.iter().zip(&TemplateLabelsFixture::i64s(&tf["assistant_masks"])).enumerate() {
                assert_eq!(l != -100, m == 1 || (l == eos && p.ids.input_ids[i] == eos), "{template} sample {} token {i}", s["index"]);
            }
        }
    }
}

#[test]
fn real_template_gives_transformers_mask_plus_the_end_token() {
    let processor = LlavaProcessor::from_dir_with(&fixture().model_dir(), Some(&fixture().template_file("real"))).unwrap();
    assert_matches(&processor, "real");
    // Each answer of llava-hf's template is `text + ' '` per text part, closed by the inserted `</s>`.
    let chat = processor.render(&fixture().samples()[2]).unwrap();
    let answers: Vec<&str> = chat.generation_spans.iter().map(|s| &chat.text[s.clone()]).collect();
    assert_eq!(answers, ["The first one is faded. It says café. </s>"]);
}

#[test]
fn custom_template_with_its_own_system_prompt_equals_transformers() {
    let processor = LlavaProcessor::from_dir_with(&fixture().model_dir(), Some(&fixture().template_file("custom"))).unwrap();
    assert_matches(&processor, "custom");
}

#[test]
fn the_checkpoint_template_is_rendered_and_the_override_wins() {
    let dir = fixture().checkpoint_with("real", Some(&fixture().template_file("real")));
    assert_matches(&LlavaProcessor::from_dir(&dir).unwrap(), "real");
    fixture().assert_option_wins::<LlavaModel>(&dir, "custom");
    let processor = LlavaProcessor::from_dir_with(&dir, Some(&fixture().template_file("custom"))).unwrap();
    assert_matches(&processor, "custom");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_a_template_the_default_is_the_fixture_template() {
    // The default (the llava-1.5-hf template with `</s>` inside the generation block, rendered
    // natively) gives what the fixture's own `chat_template.jinja`, which is that template, gives.
    let dir = fixture().checkpoint_with("none", None);
    let default = LlavaProcessor::from_dir(&dir).unwrap();
    assert!(default.template.is_none());
    let own = LlavaProcessor::from_dir(&fixture().model_dir()).unwrap();
    assert!(own.template.as_ref().unwrap().has_generation_blocks());
    for (i, messages) in fixture().samples().iter().enumerate() {
        let (a, b) = (default.process(messages).unwrap(), own.process(messages).unwrap());
        assert_eq!(a.ids, b.ids, "sample {i}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_raising_template_says_what_and_where() {
    let raises = fixture().reference()["raises"].clone();
    let file = fixture().dir.join(raises["file"].as_str().unwrap());
    let processor = LlavaProcessor::from_dir_with(&fixture().model_dir(), Some(&file)).unwrap();
    let sample = raises["sample"].as_u64().unwrap() as usize;
    let err = processor.process(&fixture().samples()[sample]).unwrap_err().to_string();
    let message = raises["message"].as_str().unwrap();
    assert_eq!(message, "System messages are not supported (message 0)");
    assert!(err.contains(&format!("raised an exception: {message}")), "{err}");
    assert!(err.contains(&file.display().to_string()) && err.contains("line 3"), "{err}");
    // A template that does not parse names its file at load time.
    let bad = std::env::temp_dir().join(format!("vlmhost-llava-bad-{}.jinja", std::process::id()));
    std::fs::write(&bad, "{% for m in messages %}{{ m.role }").unwrap();
    let err = LlavaProcessor::from_dir_with(&fixture().model_dir(), Some(&bad)).err().unwrap().to_string();
    assert!(err.contains(&bad.display().to_string()) && err.contains("syntax error"), "{err}");
    std::fs::remove_file(bad).unwrap();
}
