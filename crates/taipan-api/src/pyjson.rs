//! JSON written the way Python's `json.dumps` writes it by default: `", "` and `": "` separators
//! and non-ASCII escaped as `\uXXXX`. AI21's stream chunks look like this on the wire.

use serde::Serialize;
use std::io::{self, Write};

struct PythonFormatter {
    ascii_only: bool,
}

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        if !self.ascii_only {
            return w.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() {
                continue;
            }
            w.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(w, "\\u{u:04x}")?;
            }
            start = i + c.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
    }
}

/// Serialises `value` with Python's default `json.dumps` layout.
pub fn to_string<T: Serialize>(value: &T) -> String {
    write(value, true)
}

/// Python's `json.dumps(value, ensure_ascii=False)`: the same layout, non-ASCII kept as is.
pub fn to_string_unicode<T: Serialize>(value: &T) -> String {
    write(value, false)
}

fn write<T: Serialize>(value: &T, ascii_only: bool) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter { ascii_only });
    // Serialising a `serde_json::Value` or plain data into memory cannot fail.
    if value.serialize(&mut ser).is_err() {
        return "null".into();
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_python_default_dumps() {
        let v = serde_json::json!({"id": "x", "choices": [{"index": 0, "delta": {"content": "café 😀"}}], "n": null});
        assert_eq!(
            super::to_string(&v),
            r#"{"id": "x", "choices": [{"index": 0, "delta": {"content": "caf\u00e9 \ud83d\ude00"}}], "n": null}"#
        );
        assert_eq!(super::to_string_unicode(&v["choices"][0]["delta"]), r#"{"content": "café 😀"}"#);
    }
}
