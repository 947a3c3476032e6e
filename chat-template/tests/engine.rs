//! Loading order, errors and the label rules, on small templates written here.

use std::path::{Path, PathBuf};

use vlmhost_chat_template::{token_mask, ChatTemplate, ChatTemplateError, LabelRule, RenderOptions, Rendered, Value};

/// A fresh, empty folder under the target directory's tmp.
fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chat-template-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn messages(json: &str) -> Vec<Value> {
    serde_json::from_str(json).unwrap()
}

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const CONVERSATION: &str = r#"[
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye."}
]"#;

#[test]
fn load_takes_jinja_then_chat_template_json_then_tokenizer_config() {
    let dir = temp_dir("load-order");
    assert!(ChatTemplate::load(&dir).unwrap().is_none(), "an empty folder has no template");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "from tokenizer_config", "eos_token": {"content": "</s>", "special": true}, "bos_token": "<s>", "unk_token": null}"#,
    )
    .unwrap();
    let t = ChatTemplate::load(&dir).unwrap().unwrap();
    assert_eq!(t.source(), "from tokenizer_config");
    assert_eq!(t.special_tokens().get("eos_token").map(String::as_str), Some("</s>"));
    assert_eq!(t.special_tokens().get("bos_token").map(String::as_str), Some("<s>"));
    assert!(!t.special_tokens().contains_key("unk_token"));

    std::fs::write(dir.join("chat_template.json"), r#"{"chat_template": "from chat_template.json"}"#).unwrap();
    assert_eq!(ChatTemplate::load(&dir).unwrap().unwrap().source(), "from chat_template.json");

    std::fs::write(dir.join("chat_template.jinja"), "from chat_template.jinja\n").unwrap();
    let t = ChatTemplate::load(&dir).unwrap().unwrap();
    assert_eq!(t.source(), "from chat_template.jinja\n");
    assert!(t.name().ends_with("chat_template.jinja"));
    // Jinja2 drops the template's final newline (keep_trailing_newline=False).
    assert_eq!(t.render(&[], &RenderOptions::default()).unwrap().text, "from chat_template.jinja");
}

#[test]
fn tokenizer_config_list_takes_default_and_names_the_others() {
    let dir = temp_dir("named");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
    )
    .unwrap();
    assert_eq!(ChatTemplate::load(&dir).unwrap().unwrap().source(), "D");
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#).unwrap();
    let err = ChatTemplate::load(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("rag") && err.contains("default"), "{err}");
}

#[test]
fn override_file_replaces_the_checkpoint_template_but_keeps_its_tokens() {
    let dir = temp_dir("override");
    std::fs::write(dir.join("chat_template.jinja"), "checkpoint").unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|end|>"}"#).unwrap();
    let file = dir.join("mine.jinja");
    std::fs::write(&file, "mine {{ eos_token }}").unwrap();
    let t = ChatTemplate::resolve(&dir, Some(&file)).unwrap().unwrap();
    assert_eq!(t.render(&[], &RenderOptions::default()).unwrap().text, "mine <|end|>");
    assert_eq!(ChatTemplate::resolve(&dir, None).unwrap().unwrap().source(), "checkpoint");
    // A .json override is read as a config holding `chat_template`.
    let json = dir.join("mine.json");
    std::fs::write(&json, r#"{"chat_template": "json {{ eos_token }}"}"#).unwrap();
    let t = ChatTemplate::resolve(&dir, Some(&json)).unwrap().unwrap();
    assert_eq!(t.render(&[], &RenderOptions::default()).unwrap().text, "json <|end|>");
}

#[test]
fn syntax_error_names_file_and_line() {
    let dir = temp_dir("syntax");
    let file = dir.join("broken.jinja");
    std::fs::write(&file, "{% for m in messages %}\n{{ m.content }\n{% endfor %}").unwrap();
    let err = ChatTemplate::from_file(&file).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Syntax { line: Some(2), .. }), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("broken.jinja, line 2: syntax error"), "{shown}");

    let err = ChatTemplate::from_source("a\n{% generation %}b", "<inline>").unwrap_err().to_string();
    assert!(err.contains("<inline>, line 2") && err.contains("never closed"), "{err}");
}

#[test]
fn render_error_says_what_failed() {
    let t = ChatTemplate::from_source("{{ messages[0].content.nope() }}", "t.jinja").unwrap();
    let err = t.render(&messages(r#"[{"role": "user", "content": "x"}]"#), &RenderOptions::default()).unwrap_err();
    let shown = err.in_sample(4).to_string();
    assert!(shown.starts_with("sample 4: chat template t.jinja, line 1: render error"), "{shown}");
    assert!(shown.contains("nope"), "{shown}");
}

#[test]
fn template_without_generation_blocks_gets_prefix_rule_labels() {
    let t = ChatTemplate::from_source(CHATML, "chatml").unwrap();
    assert_eq!(t.label_rule(), LabelRule::Prefix);
    let r = t.answer_spans(&messages(CONVERSATION), &RenderOptions::default()).unwrap();
    let answers: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(answers, ["Hello!<|im_end|>", "Bye.<|im_end|>"]);
    // The same spans with the generation prompt at the end.
    let r2 = t.answer_spans(&messages(CONVERSATION), &RenderOptions::generation_prompt(true)).unwrap();
    assert_eq!(r2.spans, r.spans);
    assert!(r2.text.ends_with("<|im_start|>assistant\n"));
    // No assistant message, no answer.
    let r3 = t.answer_spans(&messages(r#"[{"role": "user", "content": "Hi"}]"#), &RenderOptions::default()).unwrap();
    assert!(r3.spans.is_empty());
}

#[test]
fn prefix_rule_refuses_templates_that_rewrite_earlier_turns() {
    // The last message is rendered differently: an earlier rendering is no prefix of a later one.
    let t = ChatTemplate::from_source(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} [last]{% endif %}\n{% endfor %}\
         {% if add_generation_prompt %}assistant: {% endif %}",
        "rewrites.jinja",
    )
    .unwrap();
    let err = t.answer_spans(&messages(CONVERSATION), &RenderOptions::default()).unwrap_err();
    assert!(matches!(err, ChatTemplateError::NotAPrefix { message: 2, .. }), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("rewrites.jinja") && shown.contains("message 2") && shown.contains("[last]"), "{shown}");
}

#[test]
fn generation_spans_and_end_of_turn() {
    let t = ChatTemplate::from_source(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{{ eos_token }}\
         {% else %}{{ m.role }}: {{ m.content }} {% endif %}{% endfor %}",
        "eot",
    )
    .unwrap()
    .with_special_tokens([("eos_token".to_string(), "</s>".to_string())].into());
    assert_eq!(t.label_rule(), LabelRule::Generation);
    let mut r = t.answer_spans(&messages(CONVERSATION), &RenderOptions::default()).unwrap();
    let answers: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(answers, ["Hello!", "Bye."]);
    r.close_answers("</s>");
    let answers: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(answers, ["Hello!</s>", "Bye.</s>"]);
}

/// A rendering with the given answer spans (byte ranges of `text`), closed by `end_of_turn`.
fn closed(text: &str, spans: &[std::ops::Range<usize>], end_of_turn: &str) -> (String, Vec<String>) {
    let mut r = Rendered { text: text.to_string(), spans: spans.to_vec() };
    r.close_answers(end_of_turn);
    let answers = r.spans.iter().map(|s| r.text[s.clone()].to_string()).collect();
    (r.text, answers)
}

#[test]
fn answers_are_closed_by_the_end_of_turn_token() {
    // llava-hf: one block per text part, `text + ' '`, no `</s>`: merged, then `</s>` inserted.
    let (t, answers) = closed("USER: q ASSISTANT: a b USER: r ASSISTANT: c ", &[19..21, 21..23, 42..44], "</s>");
    assert_eq!(t, "USER: q ASSISTANT: a b </s>USER: r ASSISTANT: c </s>");
    assert_eq!(answers, ["a b </s>", "c </s>"]);
    // Written inside the block (less trailing whitespace): kept; right after it: extended.
    let (t, answers) = closed("x a</s>\n y b</s>", &[2..8, 11..12], "</s>");
    assert_eq!(t, "x a</s>\n y b</s>");
    assert_eq!(answers, ["a</s>\n", "b</s>"]);
    // Empty spans are no answers.
    assert!(closed("ab", &[1..1], "</s>").1.is_empty());
}

#[test]
#[allow(clippy::single_range_in_vec_init)]
fn token_mask_follows_transformers_rule() {
    // Tokens: "ab" "cd" "ef" "" (an added special token without offsets) "gh".
    let offsets = [(0, 2), (2, 4), (4, 6), (0, 0), (6, 8)];
    // Any overlap: a span inside one token marks it; a span across tokens marks all of them.
    assert_eq!(token_mask(&[3..4], &offsets), [0, 1, 0, 0, 0]);
    assert_eq!(token_mask(&[1..5], &offsets), [1, 1, 1, 0, 0]);
    // The last character in token 0 (or in no token): transformers marks to the end.
    assert_eq!(token_mask(&[0..1], &offsets), [1, 1, 1, 1, 1]);
    assert_eq!(token_mask(&[6..9], &offsets), [0, 0, 0, 0, 1]);
    // A span starting outside every token stops the marking (truncation).
    assert_eq!(token_mask(&[9..10, 2..3], &offsets), [0, 0, 0, 0, 0]);
}

#[test]
fn messages_are_prepared_like_transformers() {
    let t = ChatTemplate::from_source("{% for m in messages %}{{ m | tojson }}\n{% endfor %}", "t").unwrap();
    let r = t
        .render(
            &messages(r#"[{"role": "assistant", "content": "x", "tool_calls": null, "reasoning": "why"}, {"role": "user", "content": "é"}]"#),
            &RenderOptions::default(),
        )
        .unwrap();
    // null keys dropped; reasoning offered as `thinking` (first) and `reasoning_content` (last);
    // keys in their order; no HTML escaping, no ASCII escaping.
    assert_eq!(
        r.text,
        "{\"thinking\": \"why\", \"role\": \"assistant\", \"content\": \"x\", \"reasoning\": \"why\", \"reasoning_content\": \"why\"}\n\
         {\"role\": \"user\", \"content\": \"é\"}\n"
    );
    let err = t.render(&messages(r#"[{"role": "user", "content": "a\uFDD0b"}]"#), &RenderOptions::default()).unwrap_err();
    assert!(err.to_string().contains("[\"content\"]"), "{err}");
    let err = t.render(&messages(r#"["not an object"]"#), &RenderOptions::default()).unwrap_err();
    assert!(err.to_string().contains("message 0"), "{err}");
}

#[test]
fn extra_variables_and_special_tokens() {
    let t = ChatTemplate::from_source("{{ bos_token }}|{{ add_vision_id }}|{{ tools }}|{{ documents is none }}", "t")
        .unwrap()
        .with_special_tokens([("bos_token".to_string(), "<s>".to_string())].into());
    let mut options = RenderOptions::default();
    options.extra.insert("add_vision_id".into(), Value::from(true));
    assert_eq!(t.render(&[], &options).unwrap().text, "<s>|True|None|True");
    // Extra variables override special tokens of the same name.
    options.extra.insert("bos_token".into(), Value::from("<B>"));
    assert_eq!(t.render(&[], &options).unwrap().text, "<B>|True|None|True");
}
