//! Output shapes a request can demand, as grammars for constrained decoding: JSON (any object, or
//! a schema) from `response_format`, and vLLM's guided-decoding fields — `guided_json`,
//! `guided_regex`, `guided_choice`, `guided_grammar`, or the newer `structured_outputs` object
//! with the same four keys — so clients written for vLLM work unchanged.

use crate::chat::ResponseFormat;
use crate::error::ApiError;
use crate::fields::{present, Obj};
use serde_json::{json, Map, Value};

/// What the whole answer must match.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputShape {
    /// One JSON value following the schema; `None`: any non-empty JSON object.
    Json(Option<Value>),
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
}

/// An output shape and the request field it came from (errors in the grammar name it).
#[derive(Debug, Clone, PartialEq)]
pub struct Guided {
    pub shape: OutputShape,
    pub field: String,
}

/// JSON generation options shared by every grammar: no free whitespace (a small model would
/// loop on it), Python's separators.
pub(crate) fn with_json_options(schema: &Value) -> Value {
    let mut out = Map::new();
    out.insert(
        "x-guidance".into(),
        json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
    );
    match schema {
        Value::Object(o) => {
            for (k, v) in o {
                if k != "x-guidance" {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        other => {
            // `true`/`false` schemas: wrap so the options still apply.
            out.insert("allOf".into(), json!([other]));
        }
    }
    Value::Object(out)
}

/// A quoted Lark string literal.
pub(crate) fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl OutputShape {
    /// The shape as a Lark grammar for `llguidance`.
    pub fn lark(&self) -> String {
        match self {
            OutputShape::Json(schema) => {
                // An empty object is valid but never what JSON mode is for.
                let schema = schema.clone().unwrap_or_else(|| json!({"type": "object", "minProperties": 1}));
                format!("start: %json {}\n", with_json_options(&schema))
            }
            OutputShape::Regex(rx) => format!("start: /{}/\n", escape_slashes(rx)),
            OutputShape::Choice(options) => {
                let alts: Vec<String> = options.iter().map(|o| lark_string(o)).collect();
                format!("start: {}\n", alts.join(" | "))
            }
            OutputShape::Lark(grammar) => grammar.clone(),
        }
    }
}

/// A regex between Lark's `/` delimiters: unescaped slashes get a backslash.
fn escape_slashes(rx: &str) -> String {
    let mut out = String::with_capacity(rx.len());
    let mut escaped = false;
    for c in rx.chars() {
        if c == '/' && !escaped {
            out.push('\\');
        }
        escaped = c == '\\' && !escaped;
        out.push(c);
    }
    out
}

fn shape_of(key: &str, value: &Value, field: &str) -> Result<OutputShape, ApiError> {
    let text = |what: &str| -> Result<String, ApiError> {
        match value {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(ApiError::invalid(field, format!("{what} must be a non-empty string"))),
        }
    };
    match key {
        "json" => match value {
            Value::Object(_) | Value::Bool(_) => Ok(OutputShape::Json(Some(value.clone()))),
            Value::String(s) => serde_json::from_str::<Value>(s)
                .ok()
                .filter(|v| v.is_object() || v.is_boolean())
                .map(|v| OutputShape::Json(Some(v)))
                .ok_or_else(|| ApiError::invalid(field, "a JSON schema (object or JSON text) is required")),
            _ => Err(ApiError::invalid(field, "a JSON schema (object or JSON text) is required")),
        },
        "regex" => Ok(OutputShape::Regex(text("the regex")?)),
        "grammar" => Ok(OutputShape::Lark(text("the grammar")?)),
        "choice" => match value {
            Value::Array(items) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .ok_or_else(|| ApiError::invalid(format!("{field}.{i}"), "choices must be non-empty strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(OutputShape::Choice),
            _ => Err(ApiError::invalid(field, "a non-empty list of strings is required")),
        },
        _ => Err(ApiError::invalid(field, "unknown output shape")),
    }
}

/// The JSON shape `response_format` asks for, if any.
pub(crate) fn from_response_format(rf: &ResponseFormat) -> Option<Guided> {
    match rf {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(Guided { shape: OutputShape::Json(None), field: "response_format".into() }),
        ResponseFormat::JsonSchema(s) => Some(Guided {
            shape: OutputShape::Json(Some(s.clone())),
            field: "response_format.json_schema.schema".into(),
        }),
    }
}

/// The output shape of a request: vLLM's fields, else `response_format`; both at once is an error.
pub(crate) fn output_shape(o: &Obj, rf: &ResponseFormat) -> Result<Option<Guided>, ApiError> {
    match (parse_guided(o)?, from_response_format(rf)) {
        (Some(g), Some(_)) => {
            Err(ApiError::invalid(g.field, "only one output shape may be given; response_format already sets one"))
        }
        (g, r) => Ok(g.or(r)),
    }
}

const KINDS: [&str; 4] = ["json", "regex", "choice", "grammar"];

/// vLLM's guided-decoding fields of a request body, if any (at most one shape may be given).
pub fn parse_guided(o: &Obj) -> Result<Option<Guided>, ApiError> {
    let mut found: Vec<Guided> = Vec::new();
    for kind in KINDS {
        let field = format!("guided_{kind}");
        if let Some(v) = present(o, &field) {
            found.push(Guided { shape: shape_of(kind, v, &field)?, field });
        }
    }
    match present(o, "structured_outputs") {
        None => {}
        Some(Value::Object(so)) => {
            for kind in KINDS {
                let field = format!("structured_outputs.{kind}");
                if let Some(v) = so.get(kind).filter(|v| !v.is_null()) {
                    found.push(Guided { shape: shape_of(kind, v, &field)?, field });
                }
            }
        }
        Some(_) => return Err(ApiError::invalid("structured_outputs", "structured_outputs must be an object")),
    }
    if found.len() > 1 {
        return Err(ApiError::invalid(
            found[1].field.clone(),
            format!("only one output shape may be given; {} is already set", found[0].field),
        ));
    }
    Ok(found.pop())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guided(body: Value) -> Result<Option<Guided>, ApiError> {
        parse_guided(body.as_object().unwrap())
    }

    #[test]
    fn vllm_fields_become_shapes() {
        let g = guided(json!({"guided_choice": ["yes", "no"]})).unwrap().unwrap();
        assert_eq!(g.shape.lark(), "start: \"yes\" | \"no\"\n");
        let g = guided(json!({"structured_outputs": {"regex": "a/b\\/c"}})).unwrap().unwrap();
        assert_eq!((g.field.as_str(), g.shape.lark()), ("structured_outputs.regex", "start: /a\\/b\\/c/\n".into()));
        let g = guided(json!({"guided_json": "{\"type\": \"integer\"}"})).unwrap().unwrap();
        assert_eq!(g.shape, OutputShape::Json(Some(json!({"type": "integer"}))));
        assert!(guided(json!({"guided_regex": null})).unwrap().is_none());
    }

    #[test]
    fn bad_or_conflicting_fields_name_themselves() {
        let field = |b: Value| guided(b).unwrap_err().field;
        assert_eq!(field(json!({"guided_choice": []})).as_deref(), Some("guided_choice"));
        assert_eq!(field(json!({"guided_choice": ["a", 3]})).as_deref(), Some("guided_choice.1"));
        assert_eq!(field(json!({"guided_json": "not json"})).as_deref(), Some("guided_json"));
        assert_eq!(
            field(json!({"guided_regex": "a", "guided_grammar": "start: \"x\""})).as_deref(),
            Some("guided_grammar")
        );
        assert_eq!(field(json!({"structured_outputs": 1})).as_deref(), Some("structured_outputs"));
    }
}
