//! Typed access to fields of a JSON object, with errors that name the field.

use crate::error::ApiError;
use serde_json::{Map, Value};

pub(crate) type Obj = Map<String, Value>;

/// Parses a request body into its top-level object.
pub(crate) fn body_object(body: &[u8]) -> Result<Obj, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::invalid("body", "request body must be a JSON object")),
    }
}

/// A present, non-null field.
pub(crate) fn present<'a>(o: &'a Obj, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

/// An integer field; integral floats (`4.0`) count as integers.
pub(crate) fn opt_int(o: &Obj, key: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
    let Some(v) = present(o, key) else { return Ok(None) };
    let n = match v {
        Value::Number(n) if n.is_i64() => n.as_i64(),
        Value::Number(n) if n.is_u64() => Some(i64::MAX),
        Value::Number(n) => n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64),
        _ => None,
    };
    let n = n.ok_or_else(|| ApiError::invalid(key, format!("{key} must be an integer")))?;
    if n < min || n > max {
        return Err(ApiError::invalid(key, format!("{key} must be between {min} and {max}, got {n}")));
    }
    Ok(Some(n))
}

/// A number field within `[min, max]` (or `(min, max]` when `min_exclusive`).
pub(crate) fn opt_num(o: &Obj, key: &str, min: f64, max: f64, min_exclusive: bool) -> Result<Option<f64>, ApiError> {
    let Some(v) = present(o, key) else { return Ok(None) };
    let x = v.as_f64().ok_or_else(|| ApiError::invalid(key, format!("{key} must be a number")))?;
    let low_ok = if min_exclusive { x > min } else { x >= min };
    if !low_ok || x > max || !x.is_finite() {
        let open = if min_exclusive { "(" } else { "[" };
        return Err(ApiError::invalid(key, format!("{key} must be in {open}{min}, {max}], got {x}")));
    }
    Ok(Some(x))
}

pub(crate) fn opt_bool(o: &Obj, key: &str) -> Result<Option<bool>, ApiError> {
    match present(o, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(key, format!("{key} must be a boolean"))),
    }
}

/// `stop`: a string or a list of non-empty strings.
/// Most stop strings one request may give: each is matched against every token's text.
pub const MAX_STOP_STRINGS: usize = 64;
/// Longest stop string, in bytes (text is held back while it could still become one).
pub const MAX_STOP_BYTES: usize = 1024;

pub(crate) fn stop_list(o: &Obj) -> Result<Vec<String>, ApiError> {
    let one = |field: String, s: &str| {
        if s.is_empty() {
            Err(ApiError::invalid(field, "stop strings must not be empty"))
        } else if s.len() > MAX_STOP_BYTES {
            Err(ApiError::invalid(field, format!("stop strings are at most {MAX_STOP_BYTES} bytes")))
        } else {
            Ok(s.to_string())
        }
    };
    match present(o, "stop") {
        None => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![one("stop".into(), s)?]),
        Some(Value::Array(items)) if items.len() > MAX_STOP_STRINGS => {
            Err(ApiError::invalid("stop", format!("at most {MAX_STOP_STRINGS} stop strings")))
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => one(format!("stop.{i}"), s),
                _ => Err(ApiError::invalid(format!("stop.{i}"), "stop must be a string or a list of strings")),
            })
            .collect(),
        Some(_) => Err(ApiError::invalid("stop", "stop must be a string or a list of strings")),
    }
}

/// `seed`: any integer (negative seeds are reinterpreted as unsigned).
pub(crate) fn opt_seed(o: &Obj) -> Result<Option<u64>, ApiError> {
    match present(o, "seed") {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_i64().map(|i| i as u64))
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64 as u64))
            .map(Some)
            .ok_or_else(|| ApiError::invalid("seed", "seed must be an integer")),
        Some(_) => Err(ApiError::invalid("seed", "seed must be an integer")),
    }
}
