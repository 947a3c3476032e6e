//! vlmhost's chat-template engine (issue #17): renders a checkpoint's Jinja chat template
//! exactly as transformers does (`apply_chat_template`, jinja2 with `trim_blocks`,
//! `lstrip_blocks`, the `{% generation %}` extension, loop controls, `raise_exception`,
//! `strftime_now`, its `tojson`), with [minijinja](https://docs.rs/minijinja), and finds the
//! answers to learn (the labels):
//!
//! * templates with `{% generation %}` blocks: the output of each block, and per token the
//!   tokens overlapping it ([`token_mask`], transformers' rule);
//! * templates without: the prefix rule ([`ChatTemplate::prefix_answer_spans`]).
//!
//! ```
//! use vlmhost_chat_template::{ChatTemplate, RenderOptions, Value};
//! let t = ChatTemplate::from_source(
//!     "{% for m in messages %}{{ m.role | upper }}: {% if m.role == 'assistant' %}\
//!      {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }} {% endif %}{% endfor %}",
//!     "<inline>",
//! )
//! .unwrap()
//! .with_special_tokens([("eos_token".to_string(), "</s>".to_string())].into());
//! let messages: Vec<Value> = serde_json::from_str(
//!     r#"[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]"#,
//! ).unwrap();
//! let r = t.answer_spans(&messages, &RenderOptions::default()).unwrap();
//! assert_eq!(r.text, "USER: Hi ASSISTANT: Hello</s>");
//! assert_eq!(&r.text[r.spans[0].clone()], "Hello</s>");
//! ```
//!
//! Messages are [`Value`]s (minijinja's): deserialize them from JSON (`serde_json::from_str::<Vec<Value>>`
//! keeps the keys' order, as Python does) or build them with `Value::from_serialize`.

mod error;
mod labels;
mod load;
mod python;
mod template;

pub use error::ChatTemplateError;
pub use labels::{token_mask, LabelRule};
pub use load::{find_template_source, load_special_tokens, SPECIAL_TOKEN_NAMES, TEMPLATE_FILES};
pub use minijinja::Value;
pub use template::{ChatTemplate, Clock, RenderOptions, Rendered};
