//! The template: compiled like transformers' `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])`, rendered like its
//! `render_jinja_template`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use chrono::format::{Item, StrftimeItems};
use indexmap::IndexMap;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};

use crate::error::ChatTemplateError;
use crate::python::{self, JsonOptions};

/// Marks the start of a `{% generation %}` block's output while rendering (a Unicode noncharacter,
/// cut out of the text afterwards; messages may not contain it).
pub(crate) const GEN_START: char = '\u{FDD0}';
/// Marks the end of a `{% generation %}` block's output.
pub(crate) const GEN_END: char = '\u{FDD1}';
/// The filter `{% generation %}` blocks become (`{% filter __vlmhost_generation %}`).
const GEN_FILTER: &str = "__vlmhost_generation";

/// The time `strftime_now(format)` formats.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Clock {
    /// The local time, as transformers' `datetime.now()`.
    #[default]
    Local,
    /// A fixed time (tests, reproducible data).
    Fixed(chrono::NaiveDateTime),
}

/// How the rendering is asked for, besides the messages.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// The `add_generation_prompt` flag: end with the header of an assistant turn.
    pub add_generation_prompt: bool,
    /// More template variables (transformers' `**kwargs` of `apply_chat_template`, e.g.
    /// `add_vision_id`); they override the special tokens of the same name.
    pub extra: BTreeMap<String, Value>,
}

impl RenderOptions {
    /// Options with `add_generation_prompt` set to `yes`.
    pub fn generation_prompt(yes: bool) -> Self {
        RenderOptions { add_generation_prompt: yes, ..Default::default() }
    }
}

/// A rendered conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The text, exactly as transformers renders it.
    pub text: String,
    /// Byte ranges of `text` that are answers: the output of each `{% generation %}` block
    /// (transformers' `generation_indices`, in the order the blocks close), or the spans the
    /// prefix rule found (see [`ChatTemplate::answer_spans`]).
    pub spans: Vec<Range<usize>>,
}

impl Rendered {
    /// The spans in characters (Unicode scalar values) instead of bytes: Python's string indices,
    /// which transformers' `generation_indices` are, and the units of the offsets the
    /// `tokenizers` crate gives with `encode_char_offsets`.
    pub fn char_spans(&self) -> Vec<Range<usize>> {
        let to_char = |byte: usize| self.text[..byte].chars().count();
        self.spans.iter().map(|s| to_char(s.start)..to_char(s.end)).collect()
    }

    /// Closes each answer with `end_of_turn` (`</s>`, `<|im_end|>`), which is learnt with it
    /// (docs/plugin-guide.md, "Chat templates and labels"): spans that touch or overlap are one
    /// answer (llava-hf writes one block per text part; empty spans are dropped); an answer that,
    /// less trailing whitespace, ends with the token is kept; one that the template follows
    /// immediately with the token is extended over it; otherwise (a template that never writes
    /// it, such as llava-hf's) the token is inserted into the text right after the answer and the
    /// answer extended over it. An empty `end_of_turn` only merges the spans.
    pub fn close_answers(&mut self, end_of_turn: &str) {
        let mut sorted: Vec<Range<usize>> = self.spans.iter().filter(|s| !s.is_empty()).cloned().collect();
        sorted.sort_by_key(|s| (s.start, s.end));
        let mut answers: Vec<Range<usize>> = Vec::with_capacity(sorted.len());
        for s in sorted {
            match answers.last_mut() {
                Some(last) if s.start <= last.end => last.end = last.end.max(s.end),
                _ => answers.push(s),
            }
        }
        if !end_of_turn.is_empty() {
            for i in (0..answers.len()).rev() {
                let Range { start, end } = answers[i].clone();
                if self.text[start..end].trim_end().ends_with(end_of_turn) {
                    continue;
                }
                answers[i].end = end + end_of_turn.len();
                if self.text[end..].starts_with(end_of_turn) {
                    continue;
                }
                self.text.insert_str(end, end_of_turn);
                for later in &mut answers[i + 1..] {
                    later.start += end_of_turn.len();
                    later.end += end_of_turn.len();
                }
            }
        }
        self.spans = answers;
    }

    /// Per-token answer mask from the tokens' offsets into `text` (bytes, as
    /// `Tokenizer::encode` gives them), by transformers' rule: see [`crate::token_mask`].
    pub fn token_mask(&self, byte_offsets: &[(usize, usize)]) -> Vec<u8> {
        crate::token_mask(&self.spans, byte_offsets)
    }
}

thread_local! {
    /// What `raise_exception` said during the current render on this thread.
    static RAISED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A compiled chat template.
pub struct ChatTemplate {
    name: String,
    source: String,
    env: Environment<'static>,
    generation_blocks: usize,
    special_tokens: BTreeMap<String, String>,
    clock: Arc<Mutex<Clock>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("generation_blocks", &self.generation_blocks)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `name` (a file path, `<inline>`) names it in errors.
    pub fn from_source(source: &str, name: &str) -> Result<ChatTemplate, ChatTemplateError> {
        // Jinja2 normalises the template's newlines (`\r\n`, `\r`) to `\n`, in text and string literals.
        let source = source.replace("\r\n", "\n").replace('\r', "\n");
        let (rewritten, generation_blocks) = rewrite_generation_tags(&source).map_err(|(line, detail)| {
            ChatTemplateError::Syntax { name: name.to_string(), line: Some(line), detail }
        })?;
        let clock = Arc::new(Mutex::new(Clock::Local));
        let env = build_env(name, rewritten, clock.clone())?;
        Ok(ChatTemplate {
            name: name.to_string(),
            source,
            env,
            generation_blocks,
            special_tokens: BTreeMap::new(),
            clock,
        })
    }

    /// The template's name in errors (its file).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The template text (newlines normalised to `\n`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks answers with `{% generation %}` blocks (then
    /// [`answer_spans`](Self::answer_spans) uses them; otherwise the prefix rule).
    pub fn has_generation_blocks(&self) -> bool {
        self.generation_blocks > 0
    }

    /// The special tokens passed as variables (`bos_token`, `eos_token`, ...).
    pub fn special_tokens(&self) -> &BTreeMap<String, String> {
        &self.special_tokens
    }

    /// Sets the special tokens passed as variables (transformers passes the tokenizer's
    /// `special_tokens_map`: `bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`,
    /// `cls_token`, `mask_token`, those that are set). [`ChatTemplate::load`] reads them.
    pub fn with_special_tokens(mut self, tokens: BTreeMap<String, String>) -> Self {
        self.special_tokens = tokens;
        self
    }

    /// Sets the time `strftime_now` formats.
    pub fn with_clock(self, clock: Clock) -> Self {
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = clock;
        self
    }

    /// Renders `messages` (a list of objects with `role` and `content`, a string or a list of
    /// typed parts such as `{"type": "image"}` and `{"type": "text", "text": ...}`) as
    /// transformers' `apply_chat_template(messages, tokenize=False)` does: the same text, and
    /// the `{% generation %}` spans (`return_assistant_tokens_mask=True`).
    ///
    /// Like transformers, keys whose value is `null` are dropped from each message, and a
    /// message's reasoning (`reasoning_content`, `thinking` or `reasoning`) is offered under
    /// `thinking` and `reasoning_content`. The template sees `messages`, `tools` and `documents`
    /// (`none`), `add_generation_prompt`, the special tokens and `options.extra`.
    pub fn render(&self, messages: &[Value], options: &RenderOptions) -> Result<Rendered, ChatTemplateError> {
        let messages = self.prepare_messages(messages)?;
        self.render_prepared(&messages, options)
    }

    pub(crate) fn prepare_messages(&self, messages: &[Value]) -> Result<Vec<Value>, ChatTemplateError> {
        messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                prepare_message(m).map_err(|detail| ChatTemplateError::Messages {
                    name: self.name.clone(),
                    detail: format!("message {i}: {detail}"),
                })
            })
            .collect()
    }

    pub(crate) fn render_prepared(&self, messages: &[Value], options: &RenderOptions) -> Result<Rendered, ChatTemplateError> {
        let mut ctx: IndexMap<Value, Value> = IndexMap::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(Value::from(k.as_str()), Value::from(v.as_str()));
        }
        for (k, v) in &options.extra {
            if let Some(path) = find_marker(v) {
                return Err(ChatTemplateError::Messages {
                    name: self.name.clone(),
                    detail: format!("variable {k}{path} contains U+FDD0 or U+FDD1, which this engine reserves"),
                });
            }
            ctx.insert(Value::from(k.as_str()), v.clone());
        }
        ctx.insert(Value::from("messages"), Value::from(messages.to_vec()));
        ctx.insert(Value::from("tools"), Value::from(()));
        ctx.insert(Value::from("documents"), Value::from(()));
        ctx.insert(Value::from("add_generation_prompt"), Value::from(options.add_generation_prompt));

        let template = self.env.get_template(&self.name).map_err(|e| self.error(e))?;
        RAISED.with(|r| r.borrow_mut().take());
        let raw = template.render(Value::from(ctx)).map_err(|e| self.error(e))?;
        Ok(cut_markers(&raw))
    }

    /// Maps a minijinja error to ours: a syntax error, what `raise_exception` said, or a render error.
    fn error(&self, e: Error) -> ChatTemplateError {
        let name = self.name.clone();
        let line = e.line();
        if let Some(message) = RAISED.with(|r| r.borrow_mut().take()) {
            return ChatTemplateError::Raised { name, line, message };
        }
        let detail = describe(&e);
        match e.kind() {
            ErrorKind::SyntaxError | ErrorKind::BadEscape => ChatTemplateError::Syntax { name, line, detail },
            _ => ChatTemplateError::Render { name, line, detail },
        }
    }
}

/// The kind and detail of a minijinja error, without its location (we print that ourselves).
fn describe(e: &Error) -> String {
    let kind = e.kind().to_string();
    let mut out = match e.detail() {
        Some(d) => format!("{kind}: {d}"),
        None => kind,
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

fn build_env(name: &str, rewritten: String, clock: Arc<Mutex<Clock>>) -> Result<Environment<'static>, ChatTemplateError> {
    let mut env = Environment::new();
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_debug(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, state, value| match python::py_str(value) {
        Some(s) => {
            out.write_str(&s).map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write output"))?;
            Ok(())
        }
        None => minijinja::escape_formatter(out, state, value),
    });
    env.add_filter("tojson", tojson);
    env.add_filter(GEN_FILTER, |body: String| format!("{GEN_START}{body}{GEN_END}"));
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", move |format: String| strftime_now(&clock, &format));
    env.add_template_owned(name.to_string(), rewritten).map_err(|e| {
        let line = e.line();
        ChatTemplateError::Syntax { name: name.to_string(), line, detail: describe(&e) }
    })?;
    Ok(env)
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// `json.dumps` without Jinja's HTML escaping.
fn tojson(value: Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(Error::new(ErrorKind::TooManyArguments, "tojson takes at most 4 arguments"));
    }
    let mut params: [Value; 4] = Default::default();
    for (i, name) in NAMES.iter().enumerate() {
        if let Some(v) = args.get(i) {
            if kwargs.has(name) {
                return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson got multiple values for {name}")));
            }
            params[i] = v.clone();
        } else if kwargs.has(name) {
            params[i] = kwargs.get::<Value>(name)?;
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = params;
    let indent = match indent.kind() {
        ValueKind::Undefined | ValueKind::None => None,
        ValueKind::String => Some(indent.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => Some(" ".repeat(i64::try_from(indent)?.max(0) as usize)),
        _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be a number or a string")),
    };
    let separators = match separators.kind() {
        ValueKind::Undefined | ValueKind::None => None,
        _ => {
            let parts: Vec<Value> = separators.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    Some((a.as_str().unwrap().to_string(), b.as_str().unwrap().to_string()))
                }
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
            }
        }
    };
    let opts = JsonOptions::new(ensure_ascii.is_true(), indent, separators, sort_keys.is_true());
    python::dumps(&value, &opts)
}

fn raise_exception(message: Value) -> Result<Value, Error> {
    let message = match message.as_str() {
        Some(s) => s.to_string(),
        None => python::py_str(&message).unwrap_or_else(|| message.to_string()),
    };
    RAISED.with(|r| *r.borrow_mut() = Some(message.clone()));
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(clock: &Mutex<Clock>, format: &str) -> Result<String, Error> {
    let items: Vec<Item> = StrftimeItems::new(format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(ErrorKind::InvalidOperation, format!("strftime_now: unsupported format {format:?}")));
    }
    let clock = clock.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let formatted = match clock {
        Clock::Local => chrono::Local::now().format_with_items(items.into_iter()).to_string(),
        Clock::Fixed(t) => t.format_with_items(items.into_iter()).to_string(),
    };
    Ok(formatted)
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` into `{% filter __vlmhost_generation %}` /
/// `{% endfilter %}`: block tags too, so trim_blocks, lstrip_blocks and the `-`/`+` flags treat
/// them as Jinja2 treats the extension's tags, and the body renders into a string like the
/// extension's `caller()`. Lines stay where they were. Returns the source and the number of blocks;
/// an unpaired tag is an error (line, detail).
fn rewrite_generation_tags(source: &str) -> Result<(String, usize), (usize, String)> {
    let mut out = String::with_capacity(source.len() + 64);
    let mut rest = source;
    let mut depth_stack: Vec<usize> = Vec::new();
    let mut count = 0;
    let mut consumed = 0;
    while let Some(pos) = rest.find("{%") {
        let tag_start = pos + 2;
        let after = &rest[tag_start..];
        // `{%`, an optional `-` or `+`, whitespace, the word, whitespace, an optional `-`/`+`, `%}`.
        let flag_len = usize::from(after.starts_with('-') || after.starts_with('+'));
        let body = &after[flag_len..];
        let ws1 = body.len() - body.trim_start().len();
        let word_area = &body[ws1..];
        let word_len = word_area.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(word_area.len());
        let word = &word_area[..word_len];
        let tail = &word_area[word_len..];
        let ws2 = tail.len() - tail.trim_start().len();
        let tail2 = &tail[ws2..];
        let closes = tail2.starts_with("%}") || tail2.starts_with("-%}") || tail2.starts_with("+%}");
        let line = source[..consumed + pos].matches('\n').count() + 1;
        if closes && (word == "generation" || word == "endgeneration") {
            out.push_str(&rest[..tag_start + flag_len + ws1]);
            if word == "generation" {
                out.push_str("filter ");
                out.push_str(GEN_FILTER);
                depth_stack.push(line);
                count += 1;
            } else {
                if depth_stack.pop().is_none() {
                    return Err((line, "{% endgeneration %} without a {% generation %}".into()));
                }
                out.push_str("endfilter");
            }
            let used = tag_start + flag_len + ws1 + word_len;
            consumed += used;
            rest = &rest[used..];
        } else {
            out.push_str(&rest[..tag_start]);
            consumed += tag_start;
            rest = &rest[tag_start..];
        }
    }
    out.push_str(rest);
    if let Some(line) = depth_stack.pop() {
        return Err((line, "{% generation %} is never closed by {% endgeneration %}".into()));
    }
    Ok((out, count))
}

/// Cuts the generation markers out of the rendered text and records the spans between them.
fn cut_markers(raw: &str) -> Rendered {
    let mut text = String::with_capacity(raw.len());
    let mut open = Vec::new();
    let mut spans = Vec::new();
    for c in raw.chars() {
        match c {
            GEN_START => open.push(text.len()),
            GEN_END => {
                let start = open.pop().expect("the generation filter writes paired markers");
                spans.push(start..text.len());
            }
            c => text.push(c),
        }
    }
    Rendered { text, spans }
}

/// One message as transformers hands it to the template: keys with `None` values dropped,
/// reasoning aliased; an error if it is not an object or holds a reserved marker character.
fn prepare_message(message: &Value) -> Result<Value, String> {
    if message.kind() != ValueKind::Map {
        return Err(format!("messages must be objects, got {}", message.kind()));
    }
    if let Some(path) = find_marker(message) {
        return Err(format!("{path} contains U+FDD0 or U+FDD1, which this engine reserves"));
    }
    let mut entries: IndexMap<Value, Value> = IndexMap::new();
    for key in message.try_iter().map_err(|e| e.to_string())? {
        let value = message.get_item(&key).map_err(|e| e.to_string())?;
        if !value.is_none() && !value.is_undefined() {
            entries.insert(key, value);
        }
    }
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| entries.get(&Value::from(*k)).cloned());
    if let Some(r) = reasoning {
        // Python: {"thinking": r, **message, "reasoning_content": r}
        let mut aliased: IndexMap<Value, Value> = IndexMap::new();
        aliased.insert(Value::from("thinking"), r.clone());
        for (k, v) in entries {
            aliased.insert(k, v);
        }
        aliased.insert(Value::from("reasoning_content"), r);
        entries = aliased;
    }
    Ok(Value::from(entries))
}

/// Where (as `["content"][0]["text"]`) a string in `value` contains a marker character.
fn find_marker(value: &Value) -> Option<String> {
    match value.kind() {
        ValueKind::String => value
            .as_str()
            .filter(|s| s.contains([GEN_START, GEN_END]))
            .map(|_| String::new()),
        ValueKind::Seq => value.try_iter().ok()?.enumerate().find_map(|(i, item)| {
            find_marker(&item).map(|p| format!("[{i}]{p}"))
        }),
        ValueKind::Map => value.try_iter().ok()?.find_map(|key| {
            let item = value.get_item(&key).ok()?;
            find_marker(&key)
                .or_else(|| find_marker(&item))
                .map(|p| match key.as_str() {
                    Some(k) => format!("[{k:?}]{p}"),
                    None => format!("[{key}]{p}"),
                })
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_generation_tags_keeping_flags_and_lines() {
        let (out, n) = rewrite_generation_tags("a{%- generation +%}\nb{%endgeneration%}{% if x %}{% endif %}").unwrap();
        assert_eq!(n, 1);
        assert_eq!(out, "a{%- filter __vlmhost_generation +%}\nb{%endfilter%}{% if x %}{% endif %}");
        assert!(rewrite_generation_tags("{% generation %}").is_err());
        assert!(rewrite_generation_tags("x\n{% endgeneration %}").unwrap_err().0 == 2);
        // Words that only start like the tag are left alone.
        let (out, n) = rewrite_generation_tags("{% generations %}").unwrap();
        assert_eq!((out.as_str(), n), ("{% generations %}", 0));
    }
}
