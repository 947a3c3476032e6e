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

use std::path::{Path, PathBuf};

use serde_json::Value;
use vlmhost_plugin_api::sample::{Message, Sample};
use vlmhost_plugin_api::{ModelOptions, Plugin};
use vlmhost_plugin_llava::processor::LlavaProcessor;
use vlmhost_plugin_llava::LlavaModel;
use vlmhost_plugin_sdk::chat::{LabelRule, TemplateLabelsFixture};
use vlmhost_plugin_sdk::FamilyPlugin;

const FAMILY: &str = "llava";

fn model_dir() -> PathBuf {
    vlmhost_plugin_sdk::fixture_dir("VLMHOST_LLAVA_FIXTURE", "target/fixtures/llava", "model/config.json", "run scripts/fixtures.sh")
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


/// Every sample of `template` (real, custom) processed by `processor` equals the reference.
fn assert_matches(processor: &LlavaProcessor, template: &str) {
    let reference = reference();
    let t = &reference["templates"][template];
    let rule = if t["rule"] == "generation" { LabelRule::Generation } else { LabelRule::Prefix };
    assert_eq!(processor.template.as_ref().expect("a template").label_rule(), rule, "{template}");
    let expected = t["samples"].as_array().unwrap();
    let samples = samples();
    assert_eq!(expected.len(), samples.len());
    for (s, messages) in expected.iter().zip(&samples) {
        let p = processor.process(messages).unwrap_or_else(|e| panic!("{template} sample {}: {e}", s["index"]));
        let chat = processor.render(messages).unwrap();
        assert_eq!(chat.text, s["text"].as_str().unwrap(), "{template} sample {}: text", s["index"]);
        assert_eq!(p.input_ids, TemplateLabelsFixture::i64s(&s["input_ids"]), "{template} sample {}: input_ids", s["index"]);
        assert_eq!(p.labels, TemplateLabelsFixture::i64s(&s["labels"]), "{template} sample {}: labels", s["index"]);
        assert_eq!(p.attention_mask(), TemplateLabelsFixture::i64s(&s["attention_mask"]), "{template} sample {}: attention_mask", s["index"]);
        if s["end_of_turn_inserted"] == 0 {
            // The template's own text: transformers' ids, and its mask plus the end token.
            let tf = &s["transformers"];
            assert_eq!(p.input_ids, TemplateLabelsFixture::i64s(&tf["input_ids"]), "{template} sample {}", s["index"]);
            let eos = processor.tokenizer().token_to_id("</s>").unwrap() as i64;
            for (i, (&l, &m)) in p.labels.iter().zip(&TemplateLabelsFixture::i64s(&tf["assistant_masks"])).enumerate() {
                assert_eq!(l != -100, m == 1 || (l == eos && p.input_ids[i] == eos), "{template} sample {} token {i}", s["index"]);
            }
        }
    }
}

fn template_file(name: &str) -> PathBuf {
    fixture().dir.join("templates").join(format!("{FAMILY}_{name}.jinja"))
}

#[test]
fn real_template_gives_transformers_mask_plus_the_end_token() {
    let processor = LlavaProcessor::from_dir_with(&model_dir(), Some(&template_file("real"))).unwrap();
    assert_matches(&processor, "real");
    // Each answer of llava-hf's template is `text + ' '` per text part, closed by the inserted `</s>`.
    let chat = processor.render(&samples()[2]).unwrap();
    let answers: Vec<&str> = chat.generation_spans.iter().map(|s| &chat.text[s.clone()]).collect();
    assert_eq!(answers, ["The first one is faded. It says café. </s>"]);
}

#[test]
fn custom_template_with_its_own_system_prompt_equals_transformers() {
    let processor = LlavaProcessor::from_dir_with(&model_dir(), Some(&template_file("custom"))).unwrap();
    assert_matches(&processor, "custom");
}

/// A copy of the fixture's model folder whose checkpoint template is `template` (none: no template).
fn checkpoint_with(name: &str, template: Option<&Path>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlmhost-llava-chat-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap();
        if file == "chat_template.jinja" || file == "model.safetensors" {
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
    assert_matches(&LlavaProcessor::from_dir(&dir).unwrap(), "real");
    // The processor option through the plugin glue, as the host passes it.
    let options = ModelOptions::from_json(&serde_json::json!({"chat_template": template_file("custom")}).to_string()).unwrap();
    let model = FamilyPlugin::<LlavaModel>::open(FAMILY, &dir, &options).unwrap();
    let expected = reference()["templates"]["custom"]["samples"].clone();
    for (s, messages) in expected.as_array().unwrap().iter().zip(samples()) {
        let p = model.prepare(&Sample { messages }).unwrap();
        assert_eq!((p.input_ids, p.labels), (TemplateLabelsFixture::i64s(&s["input_ids"]), TemplateLabelsFixture::i64s(&s["labels"])), "sample {}", s["index"]);
    }
    let processor = LlavaProcessor::from_dir_with(&dir, Some(&template_file("custom"))).unwrap();
    assert_matches(&processor, "custom");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_a_template_the_default_is_the_fixture_template() {
    // The default (the llava-1.5-hf template with `</s>` inside the generation block, rendered
    // natively) gives what the fixture's own `chat_template.jinja`, which is that template, gives.
    let dir = checkpoint_with("none", None);
    let default = LlavaProcessor::from_dir(&dir).unwrap();
    assert!(default.template.is_none());
    let own = LlavaProcessor::from_dir(&model_dir()).unwrap();
    assert!(own.template.as_ref().unwrap().has_generation_blocks());
    for (i, messages) in samples().iter().enumerate() {
        let (a, b) = (default.process(messages).unwrap(), own.process(messages).unwrap());
        assert_eq!((a.input_ids, a.labels), (b.input_ids, b.labels), "sample {i}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_raising_template_says_what_and_where() {
    let raises = reference()["raises"].clone();
    let file = fixture().dir.join(raises["file"].as_str().unwrap());
    let processor = LlavaProcessor::from_dir_with(&model_dir(), Some(&file)).unwrap();
    let sample = raises["sample"].as_u64().unwrap() as usize;
    let err = processor.process(&samples()[sample]).unwrap_err().to_string();
    let message = raises["message"].as_str().unwrap();
    assert_eq!(message, "System messages are not supported (message 0)");
    assert!(err.contains(&format!("raised an exception: {message}")), "{err}");
    assert!(err.contains(&file.display().to_string()) && err.contains("line 3"), "{err}");
    // A template that does not parse names its file at load time.
    let bad = std::env::temp_dir().join(format!("vlmhost-llava-bad-{}.jinja", std::process::id()));
    std::fs::write(&bad, "{% for m in messages %}{{ m.role }").unwrap();
    let err = LlavaProcessor::from_dir_with(&model_dir(), Some(&bad)).err().unwrap().to_string();
    assert!(err.contains(&bad.display().to_string()) && err.contains("syntax error"), "{err}");
    std::fs::remove_file(bad).unwrap();
}
