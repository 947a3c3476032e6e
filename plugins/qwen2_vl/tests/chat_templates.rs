//! Qwen2-VL with chat templates (issue #17): the checkpoint's template or the user's
//! (`chat_template` processor option) rendered by the SDK, on the fixture written by
//! `scripts/fixtures/make_template_labels_fixture.py` (`target/fixtures/template_labels`, or
//! `$VLMHOST_TEMPLATE_LABELS_FIXTURE`) over the tiny Qwen2-VL fixture's model
//! (`target/fixtures/qwen2_vl/model`, or `$VLMHOST_QWEN2_VL_FIXTURE`).
//!
//! * `real`: Qwen2-VL-2B-Instruct's template, verbatim, without generation blocks: the prefix
//!   rule; the reference is transformers' ids, and its assistant mask under a copy of the template
//!   with generation blocks around each answer and its `<|im_end|>`.
//! * `custom`: its own system prompt, each answer and `<|im_end|>` in a generation block:
//!   transformers' ids and assistant mask.

use std::path::Path;
use vlmhost_plugin_qwen2_vl::processor::{PixelOptions, Qwen2VlProcessor};
use vlmhost_plugin_qwen2_vl::Qwen2VlModel;
use vlmhost_plugin_sdk::chat::{LabelRule, TemplateLabelsFixture};

const FAMILY: &str = "qwen2_vl";

fn fixture() -> TemplateLabelsFixture {
    TemplateLabelsFixture::of(FAMILY)
}

fn processor(dir: &Path, template: Option<&Path>) -> Qwen2VlProcessor {
    Qwen2VlProcessor::from_dir_with(dir, PixelOptions::default(), template).unwrap()
}

/// Every sample of `template` (real, custom) processed by `processor` equals the reference:
/// transformers' ids (the template's own text: Qwen's templates write `<|im_end|>`), labels
/// where the reference mask says.
fn assert_matches(processor: &Qwen2VlProcessor, template: &str) {
    let (rule, cases) = fixture().cases(template);
    assert_eq!(processor.template.as_ref().expect("a template").label_rule(), rule, "{template}");
    for (s, messages) in &cases {
        let i = &s["index"];
        assert_eq!(s["end_of_turn_inserted"], 0);
        let p = processor.process(messages).unwrap_or_else(|e| panic!("{template} sample {i}: {e}"));
        assert_eq!(p.ids.input_ids, TemplateLabelsFixture::i64s(&s["transformers"]["input_ids"]), "{template} sample {i}: input_ids");
        assert_eq!(p.ids.labels, TemplateLabelsFixture::i64s(&s["labels"]), "{template} sample {i}: labels");
        assert_eq!(vec![1; p.ids.input_ids.len()], TemplateLabelsFixture::i64s(&s["attention_mask"]), "{template} sample {i}: attention_mask");
        if rule == LabelRule::Generation {
            // transformers' own mask, `<|im_end|>` inside the block.
            let mask = TemplateLabelsFixture::i64s(&s["transformers"]["assistant_masks"]);
            let from_mask: Vec<i64> = p.ids.input_ids.iter().zip(&mask).map(|(&id, &m)| if m == 1 { id } else { -100 }).collect();
            assert_eq!(p.ids.labels, from_mask, "{template} sample {i}");
        }
    }
}

#[test]
fn real_template_without_generation_blocks_gets_prefix_rule_labels() {
    let p = processor(&fixture().model_dir(), Some(&fixture().template_file("real")));
    assert!(!p.template.as_ref().unwrap().has_generation_blocks());
    assert_matches(&p, "real");
    let chat = p.render(&fixture().samples()[1]).unwrap();
    let answers: Vec<&str> = chat.generation_spans.iter().map(|s| &chat.text[s.clone()]).collect();
    assert_eq!(answers, ["There are two circles.<|im_end|>", "They are both yellow.<|im_end|>"]);
}

#[test]
fn custom_template_with_its_own_system_prompt_equals_transformers() {
    assert_matches(&processor(&fixture().model_dir(), Some(&fixture().template_file("custom"))), "custom");
}

#[test]
fn the_checkpoint_template_is_rendered_and_the_override_wins() {
    let dir = fixture().checkpoint_with("real", Some(&fixture().template_file("real")));
    assert_matches(&processor(&dir, None), "real");
    fixture().assert_option_wins::<Qwen2VlModel>(&dir, "custom");
    assert_matches(&processor(&dir, Some(&fixture().template_file("custom"))), "custom");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_a_template_the_default_is_the_fixture_template() {
    // The default (Qwen2-VL-Instruct's layout with each answer and `<|im_end|>` as the span,
    // rendered natively) gives what the fixture's own `chat_template.jinja` gives, and what the
    // real template gives by the prefix rule.
    let dir = fixture().checkpoint_with("none", None);
    let default = processor(&dir, None);
    assert!(default.template.is_none());
    let own = processor(&fixture().model_dir(), None);
    assert!(own.template.as_ref().unwrap().has_generation_blocks());
    let real = fixture().reference()["templates"]["real"]["samples"].clone();
    for (i, messages) in fixture().samples().iter().enumerate() {
        let (a, b) = (default.process(messages).unwrap(), own.process(messages).unwrap());
        assert_eq!(a.ids, b.ids, "sample {i}");
        assert_eq!((a.ids.input_ids, a.ids.labels), (TemplateLabelsFixture::i64s(&real[i]["input_ids"]), TemplateLabelsFixture::i64s(&real[i]["labels"])), "sample {i}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_raising_template_says_what_and_where() {
    let raises = fixture().reference()["raises"].clone();
    let file = fixture().dir.join(raises["file"].as_str().unwrap());
    let p = processor(&fixture().model_dir(), Some(&file));
    let sample = raises["sample"].as_u64().unwrap() as usize;
    let err = p.process(&fixture().samples()[sample]).unwrap_err().to_string();
    let message = raises["message"].as_str().unwrap();
    assert!(err.contains(&format!("raised an exception: {message}")), "{err}");
    assert!(err.contains(&file.display().to_string()) && err.contains("line 3"), "{err}");
}

#[test]
fn a_template_that_drops_images_is_refused() {
    let file = std::env::temp_dir().join(format!("vlmhost-qwen2-vl-noimg-{}.jinja", std::process::id()));
    std::fs::write(
        &file,
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for p in m.content %}{{ p.text }}{% endfor %}<|im_end|>\n{% endfor %}",
    )
    .unwrap();
    let err = processor(&fixture().model_dir(), Some(&file)).process(&fixture().samples()[0]).unwrap_err().to_string();
    assert!(err.contains("0 \"<|image_pad|>\" for 1 image(s)"), "{err}");
    std::fs::remove_file(file).unwrap();
}
