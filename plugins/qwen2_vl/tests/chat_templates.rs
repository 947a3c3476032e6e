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

use std::path::{Path, PathBuf};

use serde_json::Value;
use vlmhost_plugin_api::sample::{Message, Sample};
use vlmhost_plugin_api::{ModelOptions, Plugin};
use vlmhost_plugin_qwen2_vl::processor::{PixelOptions, Qwen2VlProcessor};
use vlmhost_plugin_qwen2_vl::Qwen2VlModel;
use vlmhost_plugin_sdk::chat::{LabelRule, TemplateLabelsFixture};
use vlmhost_plugin_sdk::FamilyPlugin;

const FAMILY: &str = "qwen2_vl";

fn model_dir() -> PathBuf {
    vlmhost_plugin_sdk::fixture_dir("VLMHOST_QWEN2_VL_FIXTURE", "target/fixtures/qwen2_vl", "model/config.json", "run scripts/fixtures.sh")
        .join("model")
}

fn fixture() -> TemplateLabelsFixture {
    TemplateLabelsFixture::of(FAMILY)
}

fn reference() -> Value {
    fixture().reference()
}

fn samples() -> Vec<Vec<Message>> {
    fixture().samples()
}


fn processor(dir: &Path, template: Option<&Path>) -> Qwen2VlProcessor {
    Qwen2VlProcessor::from_dir_with(dir, PixelOptions::default(), template).unwrap()
}

/// Every sample of `template` (real, custom) processed by `processor` equals the reference:
/// transformers' ids (the template's own text: Qwen's templates write `<|im_end|>`), labels
/// where the reference mask says.
fn assert_matches(processor: &Qwen2VlProcessor, template: &str) {
    let reference = reference();
    let t = &reference["templates"][template];
    let rule = if t["rule"] == "generation" { LabelRule::Generation } else { LabelRule::Prefix };
    assert_eq!(processor.template.as_ref().expect("a template").label_rule(), rule, "{template}");
    let expected = t["samples"].as_array().unwrap();
    let samples = samples();
    assert_eq!(expected.len(), samples.len());
    for (s, messages) in expected.iter().zip(&samples) {
        let i = &s["index"];
        assert_eq!(s["end_of_turn_inserted"], 0);
        let p = processor.process(messages).unwrap_or_else(|e| panic!("{template} sample {i}: {e}"));
        assert_eq!(p.input_ids, TemplateLabelsFixture::i64s(&s["transformers"]["input_ids"]), "{template} sample {i}: input_ids");
        assert_eq!(p.labels, TemplateLabelsFixture::i64s(&s["labels"]), "{template} sample {i}: labels");
        assert_eq!(vec![1; p.input_ids.len()], TemplateLabelsFixture::i64s(&s["attention_mask"]), "{template} sample {i}: attention_mask");
        if rule == LabelRule::Generation {
            // transformers' own mask, `<|im_end|>` inside the block.
            let mask = TemplateLabelsFixture::i64s(&s["transformers"]["assistant_masks"]);
            let from_mask: Vec<i64> = p.input_ids.iter().zip(&mask).map(|(&id, &m)| if m == 1 { id } else { -100 }).collect();
            assert_eq!(p.labels, from_mask, "{template} sample {i}");
        }
    }
}

fn template_file(name: &str) -> PathBuf {
    fixture().dir.join("templates").join(format!("{FAMILY}_{name}.jinja"))
}

#[test]
fn real_template_without_generation_blocks_gets_prefix_rule_labels() {
    let p = processor(&model_dir(), Some(&template_file("real")));
    assert!(!p.template.as_ref().unwrap().has_generation_blocks());
    assert_matches(&p, "real");
    let chat = p.render(&samples()[1]).unwrap();
    let answers: Vec<&str> = chat.generation_spans.iter().map(|s| &chat.text[s.clone()]).collect();
    assert_eq!(answers, ["There are two circles.<|im_end|>", "They are both yellow.<|im_end|>"]);
}

#[test]
fn custom_template_with_its_own_system_prompt_equals_transformers() {
    assert_matches(&processor(&model_dir(), Some(&template_file("custom"))), "custom");
}

/// A copy of the fixture's model folder whose checkpoint template is `template` (none: no template).
fn checkpoint_with(name: &str, template: Option<&Path>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlmhost-qwen2-vl-chat-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap();
        if file == "chat_template.jinja" || file == "model.safetensors" || path.is_dir() {
            continue;
        }
        std::fs::copy(&path, dir.join(file)).unwrap();
    }
    if let Some(t) = template {
        std::fs::copy(t, dir.join("chat_template.jinja")).unwrap();
    }
    dir
}

#[test]
fn the_checkpoint_template_is_rendered_and_the_override_wins() {
    let dir = checkpoint_with("real", Some(&template_file("real")));
    assert_matches(&processor(&dir, None), "real");
    // The processor option through the plugin glue, as the host passes it.
    let options = ModelOptions::from_json(&serde_json::json!({"chat_template": template_file("custom")}).to_string()).unwrap();
    let model = FamilyPlugin::<Qwen2VlModel>::open(FAMILY, &dir, &options).unwrap();
    let expected = reference()["templates"]["custom"]["samples"].clone();
    for (s, messages) in expected.as_array().unwrap().iter().zip(samples()) {
        let p = model.prepare(&Sample { messages }).unwrap();
        assert_eq!((p.input_ids, p.labels), (TemplateLabelsFixture::i64s(&s["input_ids"]), TemplateLabelsFixture::i64s(&s["labels"])), "sample {}", s["index"]);
    }
    assert_matches(&processor(&dir, Some(&template_file("custom"))), "custom");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_a_template_the_default_is_the_fixture_template() {
    // The default (Qwen2-VL-Instruct's layout with each answer and `<|im_end|>` as the span,
    // rendered natively) gives what the fixture's own `chat_template.jinja` gives, and what the
    // real template gives by the prefix rule.
    let dir = checkpoint_with("none", None);
    let default = processor(&dir, None);
    assert!(default.template.is_none());
    let own = processor(&model_dir(), None);
    assert!(own.template.as_ref().unwrap().has_generation_blocks());
    let real = reference()["templates"]["real"]["samples"].clone();
    for (i, messages) in samples().iter().enumerate() {
        let (a, b) = (default.process(messages).unwrap(), own.process(messages).unwrap());
        assert_eq!((&a.input_ids, &a.labels), (&b.input_ids, &b.labels), "sample {i}");
        assert_eq!((a.input_ids, a.labels), (TemplateLabelsFixture::i64s(&real[i]["input_ids"]), TemplateLabelsFixture::i64s(&real[i]["labels"])), "sample {i}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_raising_template_says_what_and_where() {
    let raises = reference()["raises"].clone();
    let file = fixture().dir.join(raises["file"].as_str().unwrap());
    let p = processor(&model_dir(), Some(&file));
    let sample = raises["sample"].as_u64().unwrap() as usize;
    let err = p.process(&samples()[sample]).unwrap_err().to_string();
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
    let err = processor(&model_dir(), Some(&file)).process(&samples()[0]).unwrap_err().to_string();
    assert!(err.contains("0 \"<|image_pad|>\" for 1 image(s)"), "{err}");
    std::fs::remove_file(file).unwrap();
}
