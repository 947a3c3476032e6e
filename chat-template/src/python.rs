//! What transformers' Jinja environment prints the Python way: `json.dumps` (its `tojson`
//! filter) and `str()` of values (`{{ none }}` is `None`, `{{ [1, 'a'] }}` is `[1, 'a']`).

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// Options of transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
pub(crate) struct JsonOptions {
    pub ensure_ascii: bool,
    /// `None`: one line; `Some(unit)`: a newline and `unit` per level (Python's `indent`).
    pub indent: Option<String>,
    pub item_separator: String,
    pub key_separator: String,
    pub sort_keys: bool,
}

impl JsonOptions {
    /// Python's defaults for the separators: `(', ', ': ')` on one line, `(',', ': ')` with an indent.
    pub fn new(ensure_ascii: bool, indent: Option<String>, separators: Option<(String, String)>, sort_keys: bool) -> Self {
        let (item_separator, key_separator) = separators.unwrap_or_else(|| {
            if indent.is_some() {
                (",".into(), ": ".into())
            } else {
                (", ".into(), ": ".into())
            }
        });
        JsonOptions { ensure_ascii, indent, item_separator, key_separator, sort_keys }
    }
}

/// `json.dumps(value, ...)` as CPython writes it.
pub(crate) fn dumps(value: &Value, opts: &JsonOptions) -> Result<String, Error> {
    let mut out = String::new();
    dump(value, opts, 0, &mut out)?;
    Ok(out)
}

fn not_serializable(value: &Value) -> Error {
    let ty = match value.kind() {
        ValueKind::Undefined => "Undefined".to_string(),
        ValueKind::Bytes => "bytes".to_string(),
        kind => kind.to_string(),
    };
    Error::new(ErrorKind::InvalidOperation, format!("Object of type {ty} is not JSON serializable"))
}

fn newline_indent(opts: &JsonOptions, level: usize, out: &mut String) {
    if let Some(unit) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(unit);
        }
    }
}

fn dump(value: &Value, opts: &JsonOptions, level: usize, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&json_number(value)?),
        ValueKind::String => json_string(value.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_separator);
                }
                newline_indent(opts, level + 1, out);
                dump(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_separator);
                }
                newline_indent(opts, level + 1, out);
                json_string(key, opts.ensure_ascii, out);
                out.push_str(&opts.key_separator);
                dump(item, opts, level + 1, out)?;
            }
            newline_indent(opts, level, out);
            out.push('}');
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// A dict key as json.dumps converts it: strings as they are, numbers, booleans and None to text.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::None => Ok("null".into()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.into()),
        ValueKind::Number => json_number(key),
        _ => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("keys must be str, int, float, bool or None, not {}", key.kind()),
        )),
    }
}

fn json_number(value: &Value) -> Result<String, Error> {
    if value.is_integer() {
        return Ok(value.to_string());
    }
    let f = f64::try_from(value.clone())?;
    Ok(if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        float_repr(f)
    })
}

/// `json.dumps` string escaping (`ESCAPE` / `ESCAPE_ASCII` in CPython's json.encoder).
fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-trip digits, scientific below 1e-4 and from 1e16,
/// with a signed two-digit exponent (`1e-05`, `1e+16`).
pub(crate) fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // Rust's Debug output is the shortest round-trip representation and switches to scientific
    // notation at the same thresholds as Python's repr (exponent < -4 or >= 16).
    let s = format!("{f:?}");
    match s.split_once('e') {
        None => s,
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            let mantissa = mantissa.strip_suffix(".0").unwrap_or(mantissa);
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

/// Python's `repr(str)`.
fn str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str(value)` for what `{{ value }}` prints; `None` for values left to minijinja
/// (strings, undefined, objects).
pub(crate) fn py_str(value: &Value) -> Option<String> {
    match value.kind() {
        ValueKind::None => Some("None".into()),
        ValueKind::Bool => Some(if value.is_true() { "True" } else { "False" }.into()),
        ValueKind::Number if !value.is_integer() => f64::try_from(value.clone()).ok().map(float_repr),
        ValueKind::Seq | ValueKind::Map => {
            let mut out = String::new();
            py_repr(value, &mut out).ok()?;
            Some(out)
        }
        _ => None,
    }
}

/// Python's `repr(value)` for JSON-like values (lists, dicts, strings, numbers, None, booleans).
fn py_repr(value: &Value, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::String => str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out)?;
                out.push_str(": ");
                py_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        ValueKind::Undefined => out.push_str("Undefined"),
        _ => match py_str(value) {
            Some(s) => out.push_str(&s),
            None => out.push_str(&value.to_string()),
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        assert_eq!(float_repr(1.0), "1.0");
        assert_eq!(float_repr(0.1), "0.1");
        assert_eq!(float_repr(1e16), "1e+16");
        assert_eq!(float_repr(1.5e-5), "1.5e-05");
        assert_eq!(float_repr(0.0001), "0.0001");
        assert_eq!(float_repr(123456789012345680.0), "1.2345678901234568e+17");
        assert_eq!(float_repr(-2.5), "-2.5");
    }

    #[test]
    fn dumps_matches_python() {
        let v: Value = serde_json::from_str(r#"{"b": [1, 2.0, "é<&>'\n"], "a": {}, "c": null, "d": true, "e": []}"#).unwrap();
        let one_line = JsonOptions::new(false, None, None, false);
        assert_eq!(dumps(&v, &one_line).unwrap(), r#"{"b": [1, 2.0, "é<&>'\n"], "a": {}, "c": null, "d": true, "e": []}"#);
        let ascii_sorted = JsonOptions::new(true, Some("  ".into()), None, true);
        assert_eq!(
            dumps(&v, &ascii_sorted).unwrap(),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0,\n    \"\\u00e9<&>'\\n\"\n  ],\n  \"c\": null,\n  \"d\": true,\n  \"e\": []\n}"
        );
    }

    #[test]
    fn str_matches_python() {
        let v: Value = serde_json::from_str(r#"[{"type": "text", "text": "it's"}, null, true, 1.0, 3]"#).unwrap();
        assert_eq!(py_str(&v).unwrap(), r#"[{'type': 'text', 'text': "it's"}, None, True, 1.0, 3]"#);
    }
}
