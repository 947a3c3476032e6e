//! The engine against transformers 5.23: the fixture written by
//! scripts/fixtures/make_chat_template_fixture.py (run scripts/fixtures.sh), at
//! `$VLMHOST_CHAT_TEMPLATE_FIXTURE` or `target/fixtures/chat_template` in the workspace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value as Json;
use tokenizers::Tokenizer;
use vlmhost_chat_template::{token_mask, ChatTemplate, ChatTemplateError, Clock, LabelRule, RenderOptions, Value};

struct Fixture {
    dir: PathBuf,
    cases: Json,
    /// The conversations, parsed keeping their keys' order (as Python has them).
    conversations: Value,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::var_os("VLMHOST_CHAT_TEMPLATE_FIXTURE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures/chat_template"));
        let path = dir.join("cases.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the chat-template fixture is missing ({}: {e}); build it with scripts/fixtures.sh \
                 (scripts/fixtures/make_chat_template_fixture.py) or point VLMHOST_CHAT_TEMPLATE_FIXTURE at it",
                path.display()
            )
        });
        let cases: Json = serde_json::from_str(&text).expect("cases.json is JSON");
        let all: Value = serde_json::from_str(&text).expect("cases.json is JSON");
        let conversations = all.get_attr("conversations").unwrap();
        Fixture { dir, cases, conversations }
    })
}

fn now() -> chrono::NaiveDateTime {
    let now = fixture().cases["now"].as_str().unwrap();
    chrono::NaiveDateTime::parse_from_str(now, "%Y-%m-%dT%H:%M:%S").unwrap()
}

fn special_tokens(tokenizer: &str) -> BTreeMap<String, String> {
    serde_json::from_value(fixture().cases["special_tokens"][tokenizer].clone()).unwrap()
}

fn template(name: &str, tokenizer: &str) -> ChatTemplate {
    let f = fixture();
    let file = f.dir.join(f.cases["templates"][name]["file"].as_str().unwrap());
    ChatTemplate::from_file(&file)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_special_tokens(special_tokens(tokenizer))
        .with_clock(Clock::Fixed(now()))
}

fn conversation(name: &str) -> Vec<Value> {
    let conv = fixture().conversations.get_attr(name).unwrap();
    assert!(!conv.is_undefined(), "no conversation {name}");
    conv.try_iter().unwrap().collect()
}

fn tokenizer(name: &str) -> Tokenizer {
    Tokenizer::from_file(fixture().dir.join("tokenizers").join(name).join("tokenizer.json")).unwrap()
}

fn cases() -> &'static [Json] {
    fixture().cases["cases"].as_array().unwrap()
}

fn case_name(case: &Json) -> String {
    format!(
        "{} / {} / {} / add_generation_prompt={}",
        case["tokenizer"].as_str().unwrap(),
        case["template"].as_str().unwrap(),
        case["conversation"].as_str().unwrap(),
        case["add_generation_prompt"]
    )
}

fn spans_of(json: &Json) -> Vec<std::ops::Range<usize>> {
    json.as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_u64().unwrap() as usize..s[1].as_u64().unwrap() as usize)
        .collect()
}

fn u32s(json: &Json) -> Vec<u32> {
    json.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn u8s(json: &Json) -> Vec<u8> {
    json.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect()
}

#[test]
fn fixture_covers_the_real_templates_and_every_feature() {
    let templates = fixture().cases["templates"].as_object().unwrap();
    for name in ["llava_hf", "qwen2_vl_instruct", "llava_fixture", "qwen2_vl_fixture", "custom", "raises", "tojson_strftime"] {
        assert!(templates.contains_key(name), "the fixture has no template {name}");
    }
    // The real llava-hf template marks its answers with generation blocks; Qwen2-VL's does not.
    assert!(template("llava_hf", "llava").has_generation_blocks());
    assert_eq!(template("qwen2_vl_instruct", "qwen2_vl").label_rule(), LabelRule::Prefix);
    assert!(cases().len() >= 100);
}

/// Text and `{% generation %}` spans identical to transformers' `render_jinja_template`, or the
/// same `raise_exception` message.
#[test]
fn renders_like_transformers() {
    let mut failures = Vec::new();
    for case in cases() {
        let name = case_name(case);
        let t = template(case["template"].as_str().unwrap(), case["tokenizer"].as_str().unwrap());
        let messages = conversation(case["conversation"].as_str().unwrap());
        let options = RenderOptions::generation_prompt(case["add_generation_prompt"].as_bool().unwrap());
        let expected = &case["render"];
        match (t.render(&messages, &options), expected.get("error")) {
            (Ok(r), None) => {
                let want = expected["text"].as_str().unwrap();
                if r.text != want {
                    failures.push(format!("{name}: text differs\n  ours:         {:?}\n  transformers: {want:?}", r.text));
                    continue;
                }
                let want_spans = spans_of(&expected["generation_indices"]);
                if r.char_spans() != want_spans {
                    failures.push(format!("{name}: spans {:?} != transformers' {want_spans:?}", r.char_spans()));
                }
            }
            (Err(e), Some(err)) => {
                let want = err["message"].as_str().unwrap();
                if e.raised_message() != Some(want) {
                    failures.push(format!("{name}: error {e} is not transformers' {want:?}"));
                }
            }
            (Ok(r), Some(err)) => failures.push(format!("{name}: rendered {:?}, transformers raised {err}", r.text)),
            (Err(e), None) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases().len(), failures.join("\n"));
}

/// Token ids and assistant masks identical to transformers' `apply_chat_template(...,
/// tokenize=True, return_dict=True, return_assistant_tokens_mask=True)`, with the `tokenizers`
/// crate on the same tokenizer.json; the mask from character spans and character offsets, and
/// from byte spans and byte offsets.
#[test]
fn token_masks_like_transformers() {
    let tokenizers: BTreeMap<&str, Tokenizer> = [("llava", tokenizer("llava")), ("qwen2_vl", tokenizer("qwen2_vl"))].into();
    let mut failures = Vec::new();
    let mut masked = 0;
    for case in cases() {
        let expected = &case["tokenized"];
        if expected.get("error").is_some() {
            continue;
        }
        let name = case_name(case);
        let tok = &tokenizers[case["tokenizer"].as_str().unwrap()];
        let t = template(case["template"].as_str().unwrap(), case["tokenizer"].as_str().unwrap());
        let messages = conversation(case["conversation"].as_str().unwrap());
        let options = RenderOptions::generation_prompt(case["add_generation_prompt"].as_bool().unwrap());
        let r = match t.render(&messages, &options) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let by_char = tok.encode_char_offsets(r.text.as_str(), false).unwrap();
        let want_ids = u32s(&expected["input_ids"]);
        if by_char.get_ids() != want_ids.as_slice() {
            failures.push(format!("{name}: ids differ"));
            continue;
        }
        let want_mask = u8s(&expected["assistant_masks"]);
        masked += want_mask.iter().filter(|&&m| m == 1).count();
        let mask = token_mask(&r.char_spans(), by_char.get_offsets());
        if mask != want_mask {
            failures.push(format!("{name}: mask (char offsets)\n  ours:         {mask:?}\n  transformers: {want_mask:?}"));
        }
        let by_byte = tok.encode(r.text.as_str(), false).unwrap();
        let mask = r.token_mask(by_byte.get_offsets());
        if mask != want_mask {
            failures.push(format!("{name}: mask (byte offsets)\n  ours:         {mask:?}\n  transformers: {want_mask:?}"));
        }
    }
    assert!(masked > 0, "no case has an answer token");
    assert!(failures.is_empty(), "{} cases differ:\n{}", failures.len(), failures.join("\n"));
}

/// The official Qwen2-VL template has no generation blocks: the prefix rule finds the same
/// answers (text up to and with `<|im_end|>`) as transformers does on the fixture's copy of it
/// with `{% generation %}` markers, hence the same labels.
#[test]
fn prefix_rule_on_official_qwen2_vl_matches_generation_markers() {
    let tok = tokenizer("qwen2_vl");
    let official = template("qwen2_vl_instruct", "qwen2_vl");
    let mut checked = 0;
    for case in cases() {
        if case["tokenizer"] != "qwen2_vl" || case["template"] != "qwen2_vl_fixture" {
            continue;
        }
        let name = case_name(case);
        let messages = conversation(case["conversation"].as_str().unwrap());
        let options = RenderOptions::generation_prompt(case["add_generation_prompt"].as_bool().unwrap());
        let r = official.answer_spans(&messages, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.text, case["render"]["text"].as_str().unwrap(), "{name}");
        assert_eq!(r.char_spans(), spans_of(&case["render"]["generation_indices"]), "{name}");
        let enc = tok.encode_char_offsets(r.text.as_str(), false).unwrap();
        assert_eq!(token_mask(&r.char_spans(), enc.get_offsets()), u8s(&case["tokenized"]["assistant_masks"]), "{name}");
        checked += 1;
    }
    assert!(checked >= 10);
}

/// `ChatTemplate::load` on a checkpoint folder (the fixture's llava tokenizer folder, as
/// save_pretrained wrote it) finds its chat_template.jinja and the special tokens transformers uses.
#[test]
fn load_reads_template_and_special_tokens_like_transformers() {
    for name in ["llava", "qwen2_vl"] {
        let dir = fixture().dir.join("tokenizers").join(name);
        let t = ChatTemplate::load(&dir).unwrap().expect("the folder has a template");
        assert!(t.name().ends_with("chat_template.jinja"), "{}", t.name());
        assert_eq!(t.special_tokens(), &special_tokens(name), "{name}");
        let fixture_template = if name == "llava" { "llava_fixture" } else { "qwen2_vl_fixture" };
        let file = fixture().dir.join(fixture().cases["templates"][fixture_template]["file"].as_str().unwrap());
        assert_eq!(t.source(), std::fs::read_to_string(file).unwrap());
    }
}

#[test]
fn raise_exception_names_the_message_line_and_sample() {
    let t = template("raises", "llava");
    let err = t.render(&conversation("system"), &RenderOptions::default()).unwrap_err();
    let ChatTemplateError::Raised { line, message, .. } = &err else { panic!("{err}") };
    assert_eq!(message, "System messages are not supported (message 0)");
    assert_eq!(*line, Some(3));
    let shown = err.in_sample(12).to_string();
    assert!(shown.starts_with("sample 12: chat template "), "{shown}");
    assert!(shown.contains("raises.jinja, line 3 raised an exception: System messages are not supported (message 0)"), "{shown}");
}
