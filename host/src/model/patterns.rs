//! Name patterns, segment-wise and anchored: never substring matching.
//!
//! Names are dotted paths (`language_model.model.layers.0.self_attn.q_proj`).
//! A pattern is a dotted path too, whose segments are literals, `*` (exactly
//! one segment) or `**` (any number of segments, including none). A pattern
//! matches a name only as a whole: `q_proj` never matches `q_proj_x`, and
//! `visual.**` matches `visual.blocks.0.attn.qkv` but not `visual_x.y`.
//!
//! LoRA targets follow PEFT's rule, made segment-wise: a target matches a
//! module whose name *ends with* the target's segments (`q_proj` matches
//! `...self_attn.q_proj`; `self_attn.q_proj` too; `proj` matches nothing there).

/// A compiled segment pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    segments: Vec<Seg>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    One,
    Any,
}

impl Pattern {
    /// Compile `pattern`; empty segments (`a..b`) are refused.
    pub fn new(pattern: &str) -> Result<Pattern, String> {
        if pattern.is_empty() {
            return Err("an empty pattern matches nothing".into());
        }
        let segments = pattern
            .split('.')
            .map(|s| match s {
                "" => Err(format!("pattern {pattern:?} has an empty segment")),
                "*" => Ok(Seg::One),
                "**" => Ok(Seg::Any),
                lit if lit.contains('*') => Err(format!(
                    "pattern {pattern:?}: '*' must be a whole segment ('*' or '**'), not part of {lit:?}"
                )),
                lit => Ok(Seg::Literal(lit.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Pattern { source: pattern.to_owned(), segments })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('.').collect();
        match_from(&self.segments, &parts)
    }

    /// Whether `name` ends with segments matching this pattern (PEFT-style
    /// target matching, segment-wise).
    pub fn matches_suffix(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('.').collect();
        (0..parts.len()).any(|start| match_from(&self.segments, &parts[start..]))
    }
}

fn match_from(pattern: &[Seg], name: &[&str]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((Seg::Any, rest)) => (0..=name.len()).any(|skip| match_from(rest, &name[skip..])),
        Some((seg, rest)) => match name.split_first() {
            None => false,
            Some((first, tail)) => {
                let ok = match seg {
                    Seg::One => true,
                    Seg::Literal(l) => l == first,
                    Seg::Any => unreachable!(),
                };
                ok && match_from(rest, tail)
            }
        },
    }
}

/// The layer index of `name` under a layers pattern such as
/// `language_model.model.layers.*` (the segment where the `*` is).
pub fn layer_index(layers: &str, name: &str) -> Option<usize> {
    if layers.is_empty() {
        return None;
    }
    let pat: Vec<&str> = layers.split('.').collect();
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() < pat.len() {
        return None;
    }
    let mut index = None;
    for (p, n) in pat.iter().zip(&parts) {
        if *p == "*" {
            index = Some(n.parse().ok()?);
        } else if p != n {
            return None;
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    #[test]
    fn whole_name_matching() {
        assert!(p("visual.**").matches("visual.blocks.0.attn.qkv.weight"));
        assert!(p("visual.**").matches("visual"));
        assert!(!p("visual.**").matches("visual_x.blocks"));
        assert!(p("visual.merger.**").matches("visual.merger.mlp.0.weight"));
        assert!(p("model.layers.*.mlp.**").matches("model.layers.11.mlp.experts.3.up_proj.weight"));
        assert!(!p("model.layers.*.mlp").matches("model.layers.mlp"));
        assert!(p("image_newline").matches("image_newline"));
        assert!(!p("image_newline").matches("image_newline2"));
        assert!(p("**.bias").matches("a.b.c.bias"));
    }

    #[test]
    fn suffix_matching_is_segment_wise() {
        assert!(p("q_proj").matches_suffix("language_model.model.layers.0.self_attn.q_proj"));
        assert!(!p("q_proj").matches_suffix("language_model.model.layers.0.self_attn.q_proj_x"));
        assert!(!p("proj").matches_suffix("layers.0.self_attn.q_proj"));
        assert!(p("self_attn.q_proj").matches_suffix("layers.0.self_attn.q_proj"));
        assert!(p("layers.*.mlp.fc1").matches_suffix("vision.encoder.layers.3.mlp.fc1"));
        assert!(p("multi_modal_projector").matches_suffix("multi_modal_projector"));
    }

    #[test]
    fn bad_patterns() {
        assert!(Pattern::new("").is_err());
        assert!(Pattern::new("a..b").is_err());
        assert!(Pattern::new("q_*").is_err());
    }

    #[test]
    fn layer_indices() {
        let l = "language_model.model.layers.*";
        assert_eq!(layer_index(l, "language_model.model.layers.7.mlp.up_proj.weight"), Some(7));
        assert_eq!(layer_index(l, "language_model.model.norm.weight"), None);
        assert_eq!(layer_index("", "a.b"), None);
    }
}
