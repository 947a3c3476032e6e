//! Chat templates (issue #17): the families with a Jinja chat template (LLaVA, Qwen2-VL) render
//! the checkpoint's template, or the user's, with one engine, the crate
//! [`vlmhost_chat_template`], and label what the template says. See docs/plugin-guide.md,
//! "Chat templates and labels".
//!
//! * [`CommonOptions`]: the processor options every family understands (`chat_template`), taken
//!   out of the family's own by [`FamilyPlugin`](crate::FamilyPlugin) before
//!   [`Family::open_with`](crate::Family::open_with); families without a template refuse it.
//! * [`load_template`]: the template of a checkpoint folder, or the override.
//! * [`render`]: a conversation rendered by it, as a [`RenderedChat`]: the text, the answer spans
//!   (by the template's `{% generation %}` blocks, or by the prefix rule when it has none), each
//!   answer closed by the family's end-of-turn token, and the images in order.
//!
//! What stays with the family: expanding each image placeholder of the text into its image
//! tokens, tokenising, and its default layout when a checkpoint has no template.

use crate::labels::RenderedChat;
use crate::ProcessorError;
use std::path::{Path, PathBuf};
use vlmhost_chat_template::{RenderOptions, Value};
use vlmhost_plugin_api::sample::{Message, Part};
use vlmhost_plugin_api::{ModelOptions, PluginError};

pub use vlmhost_chat_template::{ChatTemplate, ChatTemplateError, LabelRule};

/// The processor option holding the user's chat template (`chat_template:` in the training
/// config, `--chat-template FILE`): the path of a file, a `.json` config holding `chat_template`
/// or, any other name, the template text. It wins over the checkpoint's own template.
pub const CHAT_TEMPLATE_OPTION: &str = "chat_template";

/// The processor options every family understands, besides its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommonOptions {
    /// The user's chat template file ([`CHAT_TEMPLATE_OPTION`]).
    pub chat_template: Option<PathBuf>,
}

impl CommonOptions {
    /// Takes the common options out of `options`: them, and the family's own.
    pub fn split(options: &ModelOptions) -> Result<(CommonOptions, ModelOptions), PluginError> {
        let mut own = options.clone();
        let chat_template = match own.0.remove(CHAT_TEMPLATE_OPTION) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(PathBuf::from(s)),
            Some(other) => {
                return Err(PluginError::invalid(
                    format!("processor option {CHAT_TEMPLATE_OPTION}"),
                    format!("expected the path of a chat template file, got {other}"),
                ))
            }
        };
        Ok((CommonOptions { chat_template }, own))
    }

    /// For a family that renders no Jinja chat template (its processor writes conversations in a
    /// fixed layout): an error when the user gave one.
    pub fn refuse_chat_template(&self, family: &str) -> Result<(), PluginError> {
        match &self.chat_template {
            None => Ok(()),
            Some(file) => Err(PluginError::invalid_with_hint(
                format!("processor option {CHAT_TEMPLATE_OPTION}"),
                format!(
                    "the {family} family takes no chat template ({} given): its processor writes every conversation \
                     in its fixed layout",
                    file.display()
                ),
                format!("remove `{CHAT_TEMPLATE_OPTION}` for {family}; its README describes the layout and the labels"),
            )),
        }
    }
}

/// The chat template for a checkpoint folder: `override_file` when given (see
/// [`CHAT_TEMPLATE_OPTION`]), else the folder's (`chat_template.jinja`, `chat_template.json`,
/// `tokenizer_config.json`'s `chat_template`); the special tokens from the folder. `None`: the
/// folder has none, the family's default applies.
pub fn load_template(dir: &Path, override_file: Option<&Path>) -> Result<Option<ChatTemplate>, ProcessorError> {
    Ok(ChatTemplate::resolve(dir, override_file)?)
}

/// A conversation as the template sees it (transformers' messages): `role`, and `content` as
/// typed parts: `{"type": "text", "text": ...}` and `{"type": "image", "path": ...}`, keys in that
/// order (the sample format's own serialisation), as Python's dicts keep them.
pub fn message_values(messages: &[Message]) -> Vec<Value> {
    // Through JSON text, which writes a struct's fields in their order (a `serde_json::Value`
    // would sort them); minijinja's values keep it.
    let json = serde_json::to_string(messages).expect("a conversation serialises");
    serde_json::from_str(&json).expect("JSON text is a template value")
}

/// Renders `messages` with `template` (with the generation prompt when `add_generation_prompt`)
/// and finds the answers: the output of its `{% generation %}` blocks or, for a template without
/// them, the prefix rule ([`ChatTemplate::answer_spans`]). Each answer is then closed by
/// `end_of_turn` ([`Rendered::close_answers`](vlmhost_chat_template::Rendered::close_answers)). The images are the image parts in conversation order.
pub fn render(
    template: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
    end_of_turn: &str,
) -> Result<RenderedChat, ProcessorError> {
    let values = message_values(messages);
    let mut rendered = template.answer_spans(&values, &RenderOptions::generation_prompt(add_generation_prompt))?;
    rendered.close_answers(end_of_turn);
    let images = messages
        .iter()
        .flat_map(|m| &m.content)
        .filter_map(|p| match p {
            Part::Image { path } => Some(path.clone()),
            Part::Text { .. } => None,
        })
        .collect();
    Ok(RenderedChat { text: rendered.text, generation_spans: rendered.spans, images })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmhost_plugin_api::sample::Speaker;

    #[test]
    fn the_chat_template_option_is_common() {
        let options = ModelOptions::from_json(r#"{"chat_template": "/t/x.jinja", "min_pixels": 4}"#).unwrap();
        let (common, own) = CommonOptions::split(&options).unwrap();
        assert_eq!(common.chat_template.as_deref(), Some(Path::new("/t/x.jinja")));
        assert_eq!(own.to_json(), r#"{"min_pixels":4}"#);
        let err = common.refuse_chat_template("fuyu").unwrap_err().to_string();
        assert!(err.contains("fixed layout") && err.contains("fuyu") && err.contains("chat_template"), "{err}");
        assert!(CommonOptions::split(&ModelOptions::from_json(r#"{"chat_template": 3}"#).unwrap()).is_err());
    }

    #[test]
    fn messages_are_typed_parts() {
        let m = vec![Message {
            role: Speaker::User,
            content: vec![Part::Image { path: "a.png".into() }, Part::Text { text: "Hi".into() }],
        }];
        let t = ChatTemplate::from_source(
            "{% for m in messages %}{{ m.role }}:{% for p in m.content %}[{{ p.type }}{{ p.text }}]{% endfor %}{% endfor %}",
            "<t>",
        )
        .unwrap();
        let r = render(&t, &m, false, "</s>").unwrap();
        assert_eq!(r.text, "user:[image][textHi]");
        assert_eq!(r.images, vec![PathBuf::from("a.png")]);
    }
}

/// The template-labels fixture (`scripts/fixtures/make_template_labels_fixture.py`,
/// `target/fixtures/template_labels` or `$VLMHOST_TEMPLATE_LABELS_FIXTURE`) that the
/// families' chat-template tests compare with: transformers' ids and labels per family,
/// template and sample.
pub struct TemplateLabelsFixture {
    /// The fixture folder.
    pub dir: std::path::PathBuf,
    family: &'static str,
}

impl TemplateLabelsFixture {
    /// The fixture's part for `family` (panics with a hint when it was not generated).
    pub fn of(family: &'static str) -> TemplateLabelsFixture {
        let dir = crate::fixture_dir("VLMHOST_TEMPLATE_LABELS_FIXTURE", "target/fixtures/template_labels", "reference.json", "run scripts/fixtures.sh");
        TemplateLabelsFixture { dir, family }
    }

    /// The family's references: `templates.<name>.samples[...]`.
    pub fn reference(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.join("reference.json")).expect("reference.json is readable");
        serde_json::from_str::<serde_json::Value>(&text).expect("reference.json is JSON")["families"][self.family].clone()
    }

    /// The family's samples, in the reference's order.
    pub fn samples(&self) -> Vec<Vec<Message>> {
        let dir = self.dir.join(self.family).join("samples");
        std::fs::read_to_string(dir.join("data.jsonl"))
            .expect("the samples are readable")
            .lines()
            .map(|l| vlmhost_plugin_api::sample::parse_line(l, &dir).expect("the samples parse").messages)
            .collect()
    }

    /// Template `name`'s label rule and its cases: each reference sample
    /// (`templates.<name>.samples[i]`) with the conversation it was made from.
    pub fn cases(&self, name: &str) -> (LabelRule, Vec<(serde_json::Value, Vec<Message>)>) {
        let t = &self.reference()["templates"][name];
        let rule = if t["rule"] == "generation" { LabelRule::Generation } else { LabelRule::Prefix };
        let expected = t["samples"].as_array().expect("the template's samples").clone();
        let samples = self.samples();
        assert_eq!(expected.len(), samples.len(), "{name}: reference samples");
        (rule, expected.into_iter().zip(samples).collect())
    }

    /// Family `F` opened on `dir` through the plugin glue, with template `name` as the
    /// processor option `chat_template` (as the host passes it), prepares each sample as the
    /// reference says.
    pub fn assert_option_wins<F: crate::Family>(&self, dir: &Path, name: &str) {
        use vlmhost_plugin_api::Plugin;
        let options = ModelOptions::from_json(&serde_json::json!({"chat_template": self.template_file(name)}).to_string()).unwrap();
        let model = crate::FamilyPlugin::<F>::open(F::ABOUT.name, dir, &options).unwrap();
        for (s, messages) in self.cases(name).1 {
            let p = model.prepare(&vlmhost_plugin_api::sample::Sample { messages }).unwrap();
            assert_eq!((p.input_ids, p.labels), (Self::i64s(&s["input_ids"]), Self::i64s(&s["labels"])), "{name} sample {}", s["index"]);
        }
    }

    /// The family's tiny fixture model the references were made with
    /// (`target/fixtures/<family>/model`, or `$VLMHOST_<FAMILY>_FIXTURE/model`).
    pub fn model_dir(&self) -> PathBuf {
        let var = format!("VLMHOST_{}_FIXTURE", self.family.to_uppercase());
        crate::fixture_dir(&var, &format!("target/fixtures/{}", self.family), "model/config.json", "run scripts/fixtures.sh").join("model")
    }

    /// The family's template `name` (`real`, `custom`).
    pub fn template_file(&self, name: &str) -> PathBuf {
        self.dir.join("templates").join(format!("{}_{name}.jinja", self.family))
    }

    /// A fresh copy of [`model_dir`](Self::model_dir) (its files, not the weights) in the temp
    /// folder, named after `name`, whose checkpoint template is `template` (none: no template).
    pub fn checkpoint_with(&self, name: &str, template: Option<&Path>) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vlmhost-{}-chat-{name}-{}", self.family, std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(self.model_dir()).unwrap() {
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

    /// A JSON array of integers.
    pub fn i64s(v: &serde_json::Value) -> Vec<i64> {
        v.as_array().expect("an array").iter().map(|x| x.as_i64().expect("an integer")).collect()
    }
}

/// The test of a family without a Jinja chat template (its processor writes
/// every conversation in a fixed layout): the common processor option
/// `chat_template` is refused, naming the option, the family, its fixed layout
/// and the file given. Panics otherwise.
pub fn assert_chat_template_refused<F: crate::Family>() {
    use vlmhost_plugin_api::Plugin;
    let options = ModelOptions::from_json(r#"{"chat_template": "/templates/mine.jinja"}"#).unwrap();
    let name = F::ABOUT.name;
    let err = crate::FamilyPlugin::<F>::open(name, Path::new("/nonexistent"), &options).err().expect("refused").to_string();
    for needle in ["chat_template", name, "fixed layout", "/templates/mine.jinja"] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}
