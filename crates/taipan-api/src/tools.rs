//! Tool calls and structured output as text: the grammars that constrain them, the parser that
//! reads tool calls out of a model's answer, and the incremental version of that parser for
//! streams.
//!
//! A tool call is written as `OPEN [{"name": ..., "arguments": {...}}, ...] CLOSE`, where the tags
//! are the model family's: Jamba's `<tool_calls>`/`</tool_calls>`, or `<tool_call>`/`</tool_call>`
//! for models whose template knows no tools (the fallback format SmolLM2 was trained on) — or,
//! Hermes-style (Jamba Reasoning 3B, Qwen), each call in its own tags:
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block after another.
//! Grammars are Lark text for `llguidance`, with JSON schemas embedded as `%json {...}`; JSON is
//! written compactly with Python's separators (`", "`, `": "`), which is how the templates render
//! tool calls, so what the model writes is exactly what a later prompt shows it.

use crate::error::ApiError;
use crate::guided::{lark_string, with_json_options};
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// Whether and how the model may call tools (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides; a call, once started, is constrained.
    #[default]
    Auto,
    /// No calls: tools are left out of the prompt and nothing is parsed.
    None,
    /// The answer is one or more calls.
    Required,
    /// The answer is a call of this function.
    Named(String),
}

/// Validates `tool_choice` against the declared tools.
pub fn parse_tool_choice(value: Option<&Value>, tools: &[Value]) -> Result<ToolChoice, ApiError> {
    let choice = match value {
        None | Some(Value::Null) => return Ok(if tools.is_empty() { ToolChoice::None } else { ToolChoice::Auto }),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        },
        Some(Value::Object(o)) => match o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) if o.get("type").and_then(Value::as_str).unwrap_or("function") == "function" => {
                ToolChoice::Named(name.to_string())
            }
            _ => return Err(ApiError::invalid("tool_choice.function.name", "field required")),
        },
        Some(_) => return Err(ApiError::invalid("tool_choice", "tool_choice must be a string or an object")),
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Named(_) if tools.is_empty() => {
            Err(ApiError::invalid("tool_choice", "tool_choice needs tools to choose from"))
        }
        ToolChoice::Named(name) if !tools.iter().any(|t| tool_name(t) == Some(name.as_str())) => {
            Err(ApiError::invalid("tool_choice.function.name", format!("'{name}' is not one of the declared tools")))
        }
        ToolChoice::Auto if tools.is_empty() => Ok(ToolChoice::None),
        _ => Ok(choice),
    }
}

/// The function name of a `{"type": "function", "function": {...}}` tool.
pub fn tool_name(tool: &Value) -> Option<&str> {
    tool.pointer("/function/name").and_then(Value::as_str)
}

/// A tool's parameter schema (an empty object schema when none is given).
fn tool_parameters(tool: &Value) -> Value {
    tool.pointer("/function/parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))
}

/// The tags around a model family's tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSyntax {
    pub open: String,
    pub close: String,
    /// The tags are single special tokens of the vocabulary (written `<tag>` unquoted in Lark).
    pub special_tags: bool,
    /// Each call in its own tags, one object each (Hermes); else one list of calls in one pair.
    pub per_call: bool,
}

impl ToolSyntax {
    /// Jamba's `<tool_calls>[...]</tool_calls>`.
    pub fn jamba(special_tags: bool) -> Self {
        ToolSyntax { open: "<tool_calls>".into(), close: "</tool_calls>".into(), special_tags, per_call: false }
    }

    /// The fallback for templates without tool support: `<tool_call>[...]</tool_call>`.
    pub fn generic(special_tags: bool) -> Self {
        ToolSyntax { open: "<tool_call>".into(), close: "</tool_call>".into(), special_tags, per_call: false }
    }

    /// Hermes-style calls, for templates that write them: `<tool_call>\n{...}\n</tool_call>` per
    /// call.
    pub fn hermes(special_tags: bool) -> Self {
        ToolSyntax { per_call: true, ..Self::generic(special_tags) }
    }

    fn lark_tag(&self, tag: &str) -> String {
        if self.special_tags {
            tag.to_string()
        } else {
            lark_string(tag)
        }
    }
}

/// A grammar for a list of tool calls. `only` restricts the calls to one function; `parallel`
/// allows more than one call; `with_open` includes the opening tag (a forced call) — without it
/// the grammar starts right after the tag (a call the model started itself).
pub fn tool_call_grammar(
    tools: &[Value],
    only: Option<&str>,
    parallel: bool,
    syntax: &ToolSyntax,
    with_open: bool,
) -> String {
    let variants: Vec<Value> = tools
        .iter()
        .filter_map(|t| {
            let name = tool_name(t)?;
            if only.is_some_and(|o| o != name) {
                return None;
            }
            Some(json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": tool_parameters(t)},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            }))
        })
        .collect();
    let call = with_json_options(&json!({"anyOf": variants}));
    let (open_tag, close_tag) = (syntax.lark_tag(&syntax.open), syntax.lark_tag(&syntax.close));
    if syntax.per_call {
        // As the template writes them: the object on its own line between the tags, blocks one
        // line apart (any short run of blanks is accepted where a newline is written).
        let more = if parallel { format!(" (SPACE {open_tag} SPACE call SPACE {close_tag})*") } else { String::new() };
        let open = if with_open { format!("SPACE {open_tag} ") } else { String::new() };
        return format!(
            "start: {open}SPACE call SPACE {close_tag}{more}\n\
             call: %json {call}\n\
             SPACE: /[ \\n]{{0,8}}/\n"
        );
    }
    let more = if parallel { " (\",\" SPACE call)*" } else { "" };
    let open = if with_open { format!("\" \"? {open_tag} ") } else { String::new() };
    format!(
        "start: {open}calls {close}\n\
         calls: \"[\" SPACE call{more} SPACE \"]\"\n\
         call: %json {call}\n\
         SPACE: /[ \\n]{{0,8}}/\n",
        close = close_tag,
    )
}

/// One parsed call, `arguments` as a JSON string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// The call as the wire shows it.
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// A model's answer split into text and tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAnswer {
    /// `None` when the answer is only tool calls.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

/// Text before a call counts as content unless it is blank.
fn content_before(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.to_string())
}

/// One call as written: the name, and the arguments' JSON text untouched.
#[derive(serde::Deserialize)]
struct WrittenCall<'a> {
    name: String,
    #[serde(borrow, default, alias = "parameters")]
    arguments: Option<&'a RawValue>,
}

/// The arguments string of a call: the object exactly as the model wrote it (under a grammar it
/// is compact JSON with `", "` and `": "`), or the JSON text inside a string; `{}` when absent.
fn arguments_text(raw: Option<&RawValue>) -> Option<String> {
    let Some(raw) = raw else { return Some("{}".into()) };
    match serde_json::from_str::<Value>(raw.get()).ok()? {
        Value::Object(_) => Some(raw.get().to_string()),
        Value::String(inner) => serde_json::from_str::<Value>(&inner).ok().filter(Value::is_object).map(|_| inner),
        _ => None,
    }
}

/// `{"name", "arguments"}` naming a declared tool, as a call.
fn call_from(text: &str, tools: &[Value], new_id: &mut dyn FnMut() -> String) -> Option<ToolCall> {
    let call: WrittenCall<'_> = serde_json::from_str(text).ok()?;
    if !tools.iter().any(|t| tool_name(t) == Some(call.name.as_str())) {
        return None;
    }
    let arguments = arguments_text(call.arguments)?;
    Some(ToolCall { id: new_id(), name: call.name, arguments })
}

/// A list of calls, or a single one.
fn calls_from(text: &str, tools: &[Value], new_id: &mut dyn FnMut() -> String) -> Option<Vec<ToolCall>> {
    let text = text.trim();
    let calls: Vec<ToolCall> = if text.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
        items.iter().map(|c| call_from(c.get(), tools, new_id)).collect::<Option<_>>()?
    } else {
        vec![call_from(text, tools, new_id)?]
    };
    (!calls.is_empty()).then_some(calls)
}

/// Reads tool calls out of an answer: `OPEN json CLOSE` after optional text (the closing tag may
/// be missing at the very end), or, for models that skip the tags, an answer that is nothing but
/// such JSON. Anything that does not parse into calls of declared tools stays text.
pub fn parse_answer(
    text: &str,
    syntax: &ToolSyntax,
    tools: &[Value],
    new_id: &mut dyn FnMut() -> String,
) -> ParsedAnswer {
    let as_text = || ParsedAnswer { content: Some(text.to_string()), calls: vec![] };
    if syntax.per_call {
        if let Some(at) = text.find(&syntax.open) {
            return match per_call_blocks(&text[at..], syntax, tools, new_id) {
                Some(calls) => ParsedAnswer { content: content_before(&text[..at]), calls },
                None => as_text(),
            };
        }
    } else if let Some(at) = text.find(&syntax.open) {
        let body = &text[at + syntax.open.len()..];
        let body = close_at(body, &syntax.close).map_or(body, |end| &body[..end]);
        return match calls_from(body, tools, new_id) {
            Some(calls) => ParsedAnswer { content: content_before(&text[..at]), calls },
            None => as_text(),
        };
    }
    let trimmed = text.trim();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        if let Some(calls) = calls_from(trimmed, tools, new_id) {
            return ParsedAnswer { content: None, calls };
        }
    }
    as_text()
}

/// Hermes blocks from the first opening tag on: one call object in each `OPEN ... CLOSE` (the last
/// one's closing tag may be missing at the very end), blocks separated by blanks only. `None` if
/// any block is not a call of a declared tool, or text other than blanks sits between blocks.
fn per_call_blocks(
    mut rest: &str,
    syntax: &ToolSyntax,
    tools: &[Value],
    new_id: &mut dyn FnMut() -> String,
) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let body = rest.strip_prefix(syntax.open.as_str())?;
        let (object, after) = match close_at(body, &syntax.close) {
            Some(end) => (&body[..end], &body[end + syntax.close.len()..]),
            None => (body, ""),
        };
        calls.push(call_from(object.trim(), tools, new_id)?);
        rest = after;
    }
    (!calls.is_empty()).then_some(calls)
}

/// What a stream sends next for an answer that may contain tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamPiece {
    Content(String),
    /// A call begins: its id and complete name.
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// Arguments of call `index` (fragments concatenate to the arguments string).
    CallArguments {
        index: usize,
        arguments: String,
    },
}

/// Turns a stream of text into content and tool-call pieces. Text that might be the start of the
/// opening tag is held back until it is clearly not; after the tag, a call's name is sent as soon
/// as it is complete, and its arguments as they are written (the object's text goes out as it
/// grows; arguments given as a string go out whole once the call is complete), so the stream adds
/// up to the non-streamed answer.
pub struct ToolStream {
    syntax: ToolSyntax,
    tools: Vec<Value>,
    /// Text not yet sent before the tag, or everything after it.
    pending: String,
    in_calls: bool,
    /// Content was sent (so later blanks are content too).
    sent_text: bool,
    calls: Vec<CallProgress>,
    /// Calls whose object is complete and fully sent.
    finished: usize,
    /// Blank text before the tag, not sent: it is text after all if no call follows.
    blank_before_tag: String,
}

struct CallProgress {
    id: String,
    /// Bytes of the arguments' text already sent.
    sent: usize,
}

impl ToolStream {
    pub fn new(syntax: ToolSyntax, tools: Vec<Value>) -> Self {
        ToolStream {
            syntax,
            tools,
            pending: String::new(),
            in_calls: false,
            sent_text: false,
            calls: vec![],
            finished: 0,
            blank_before_tag: String::new(),
        }
    }

    /// Whether any call was started.
    pub fn has_calls(&self) -> bool {
        !self.calls.is_empty()
    }

    pub fn push(&mut self, text: &str, new_id: &mut dyn FnMut() -> String) -> Vec<StreamPiece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        if !self.in_calls {
            if let Some(at) = self.pending.find(&self.syntax.open) {
                // Blank text before a call is no content (as in the non-streamed answer).
                let before = &self.pending[..at];
                if !before.is_empty() && (self.sent_text || !before.trim().is_empty()) {
                    out.push(StreamPiece::Content(before.to_string()));
                } else {
                    self.blank_before_tag = before.to_string();
                }
                self.pending.drain(..at + self.syntax.open.len());
                self.in_calls = true;
            } else {
                if !self.sent_text && self.pending.trim_start().starts_with(['{', '[']) {
                    // An answer that opens with JSON may be calls written without the tags: it
                    // is held to the end and parsed whole, as the non-streamed answer is.
                    return out;
                }
                let keep = partial_suffix(&self.pending, &self.syntax.open);
                let send = self.pending.len() - keep;
                // Leading blanks wait: they are no content if a call follows.
                if send > 0 && (self.sent_text || !self.pending[..send].trim().is_empty()) {
                    out.push(StreamPiece::Content(self.pending[..send].to_string()));
                    self.pending.drain(..send);
                    self.sent_text = true;
                }
                return out;
            }
        }
        self.scan_calls(&mut out, new_id);
        out
    }

    /// Sends what the call objects after the tag make known: names once complete, then arguments.
    fn scan_calls(&mut self, out: &mut Vec<StreamPiece>, new_id: &mut dyn FnMut() -> String) {
        let (body, nesting) = if self.syntax.per_call {
            (self.pending.as_str(), 0)
        } else {
            let body =
                close_at(&self.pending, &self.syntax.close).map_or(self.pending.as_str(), |e| &self.pending[..e]);
            // A list of calls, or (as the whole-answer parser also takes it) a single call.
            (body, usize::from(!body.trim_start().starts_with('{')))
        };
        for (k, (start, end)) in call_objects(body, nesting).into_iter().enumerate().skip(self.finished) {
            let slice = &body[start..end.unwrap_or(body.len())];
            let members = object_members(slice);
            let member = |keys: &[&str]| members.iter().find(|m| keys.contains(&m.key.as_str()));
            if k == self.calls.len() {
                let name = member(&["name"])
                    .and_then(|m| m.end.map(|e| &slice[m.start..e]))
                    .and_then(|t| serde_json::from_str::<String>(t).ok());
                let Some(name) = name else { return };
                if !self.tools.iter().any(|t| tool_name(t) == Some(name.as_str())) {
                    return;
                }
                let id = new_id();
                out.push(StreamPiece::CallStart { index: k, id: id.clone(), name });
                self.calls.push(CallProgress { id, sent: 0 });
            }
            let call = &mut self.calls[k];
            if let Some(m) = member(&["arguments", "parameters"]).filter(|m| slice[m.start..].starts_with('{')) {
                let upto = m.end.unwrap_or(slice.len());
                if upto > m.start + call.sent {
                    out.push(StreamPiece::CallArguments {
                        index: k,
                        arguments: slice[m.start + call.sent..upto].to_string(),
                    });
                    call.sent = upto - m.start;
                }
            }
            if end.is_none() {
                return;
            }
            let id = call.id.clone();
            let Some(whole) = call_from(slice, &self.tools, &mut || id.clone()) else { return };
            let rest = whole.arguments.get(call.sent..).unwrap_or_default();
            if !rest.is_empty() {
                out.push(StreamPiece::CallArguments { index: k, arguments: rest.to_string() });
            }
            call.sent = whole.arguments.len();
            self.finished += 1;
        }
    }

    /// The end of the answer: whatever is still held back. If a call could not be completed the
    /// raw text after the tag goes out as content (the same answer the non-streamed parser gives
    /// when nothing started; started calls keep what they sent).
    pub fn finish(&mut self, new_id: &mut dyn FnMut() -> String) -> Vec<StreamPiece> {
        let rest = std::mem::take(&mut self.pending);
        let held = rest.trim();
        if !self.in_calls && !self.sent_text && (held.starts_with('{') || held.starts_with('[')) {
            if let Some(calls) = calls_from(held, &self.tools, new_id) {
                let mut out = Vec::new();
                for (index, call) in calls.into_iter().enumerate() {
                    out.push(StreamPiece::CallStart { index, id: call.id.clone(), name: call.name });
                    out.push(StreamPiece::CallArguments { index, arguments: call.arguments.clone() });
                    self.calls.push(CallProgress { id: call.id, sent: call.arguments.len() });
                }
                self.finished = self.calls.len();
                return out;
            }
        }
        if self.in_calls && self.calls.is_empty() {
            // The tag was held back, and no call followed it: it is text after all.
            let blank = std::mem::take(&mut self.blank_before_tag);
            return vec![StreamPiece::Content(format!("{blank}{}{rest}", self.syntax.open))];
        }
        if rest.is_empty() || (self.in_calls && self.finished > 0 && self.finished == self.calls.len()) {
            return vec![];
        }
        vec![StreamPiece::Content(rest)]
    }
}

/// What a client rebuilds from a stream's pieces: the text, and each call with its arguments
/// joined. `None` if the pieces are out of order (a call's arguments before its start, or call
/// indices that skip), which a [`ToolStream`] never sends.
pub fn reassemble(pieces: impl IntoIterator<Item = StreamPiece>) -> Option<(String, Vec<ToolCall>)> {
    let mut content = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for p in pieces {
        match p {
            StreamPiece::Content(c) => content.push_str(&c),
            StreamPiece::CallStart { index, id, name } => {
                if index != calls.len() {
                    return None;
                }
                calls.push(ToolCall { id, name, arguments: String::new() });
            }
            StreamPiece::CallArguments { index, arguments } => calls.get_mut(index)?.arguments.push_str(&arguments),
        }
    }
    Some((content, calls))
}

/// One `"key": value` of a JSON object being written; `end` is `None` while the value is
/// unfinished.
struct Member {
    key: String,
    start: usize,
    end: Option<usize>,
}

/// The members of the (possibly unfinished) object that `s` starts with, as far as written.
fn object_members(s: &str) -> Vec<Member> {
    let b = s.as_bytes();
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        i = skip_ws(i);
        match b.get(i) {
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(b'"') => {}
            _ => return out,
        }
        let Some(key_end) = value_end(b, i) else { return out };
        let Ok(key) = serde_json::from_str::<String>(&s[i..key_end]) else { return out };
        i = skip_ws(key_end);
        if b.get(i) != Some(&b':') {
            return out;
        }
        let start = skip_ws(i + 1);
        if start >= b.len() {
            return out;
        }
        let end = value_end(b, start);
        out.push(Member { key, start, end });
        match end {
            Some(e) => i = e,
            None => return out,
        }
    }
}

/// The bytes of `b` from `from` on that lie outside JSON strings, with their positions: the
/// structure of a JSON text. A string's quotes are included, its contents are not.
fn outside_strings(b: &[u8], from: usize) -> impl Iterator<Item = (usize, u8)> + '_ {
    let (mut in_string, mut escaped) = (false, false);
    b.iter().enumerate().skip(from).filter_map(move |(j, &c)| {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    return Some((j, c));
                }
                _ => {}
            }
            return None;
        }
        in_string = c == b'"';
        Some((j, c))
    })
}

/// Where the closing tag first appears outside JSON strings: a tag written inside an argument
/// string is part of the string, not the end of the calls.
fn close_at(body: &str, close: &str) -> Option<usize> {
    let first = *close.as_bytes().first()?;
    outside_strings(body.as_bytes(), 0).find(|&(j, c)| c == first && body[j..].starts_with(close)).map(|(j, _)| j)
}

/// Where the JSON value starting at `b[i]` ends (one past it), if it is complete.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        // The second quote outside the string's contents closes it.
        b'"' => outside_strings(b, i).nth(1).map(|(j, _)| j + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            for (j, c) in outside_strings(b, i) {
                match c {
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
            }
            None
        }
        // A number or literal ends where a delimiter follows it.
        _ => b[i..].iter().position(|c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace()).map(|p| i + p),
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
pub(crate) fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// Byte spans of the call objects in `body` (the last one may be unfinished: end `None`): the
/// objects directly inside its top-level array (`nesting` 1), or its top-level objects themselves
/// (`nesting` 0, Hermes blocks, whose tags hold no brackets).
fn call_objects(body: &str, nesting: usize) -> Vec<(usize, Option<usize>)> {
    let mut out: Vec<(usize, Option<usize>)> = Vec::new();
    let mut depth = 0usize;
    for (i, b) in outside_strings(body.as_bytes(), 0) {
        match b {
            b'[' | b'{' => {
                if depth == nesting && b == b'{' {
                    out.push((i, None));
                }
                depth += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                if depth == nesting && b == b'}' {
                    if let Some(last) = out.last_mut() {
                        last.1 = Some(i + 1);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "add", "parameters": {"type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}),
        ]
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("call-{n}")
        }
    }

    #[test]
    fn tool_choice_is_validated_against_tools() {
        let t = tools();
        assert_eq!(parse_tool_choice(None, &t).unwrap(), ToolChoice::Auto);
        assert_eq!(parse_tool_choice(None, &[]).unwrap(), ToolChoice::None);
        assert_eq!(parse_tool_choice(Some(&json!("required")), &t).unwrap(), ToolChoice::Required);
        assert_eq!(
            parse_tool_choice(Some(&json!({"type": "function", "function": {"name": "add"}})), &t).unwrap(),
            ToolChoice::Named("add".into())
        );
        let e = parse_tool_choice(Some(&json!({"type": "function", "function": {"name": "nope"}})), &t).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tool_choice.function.name"));
        assert_eq!(parse_tool_choice(Some(&json!("sometimes")), &t).unwrap_err().field.as_deref(), Some("tool_choice"));
        assert!(parse_tool_choice(Some(&json!("required")), &[]).is_err());
    }

    #[test]
    fn jamba_calls_parse_with_content_before() {
        let text = "Let me check. <tool_calls>[\n    {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}},\n    {\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n]</tool_calls>";
        let a = parse_answer(text, &ToolSyntax::jamba(false), &tools(), &mut ids());
        assert_eq!(a.content.as_deref(), Some("Let me check. "));
        assert_eq!(a.calls.len(), 2);
        assert_eq!(a.calls[0].name, "get_weather");
        assert_eq!(a.calls[0].arguments, r#"{"city": "Zürich"}"#);
        assert_eq!(a.calls[1].arguments, r#"{"a": 1, "b": 2}"#);
        assert_eq!(a.calls[1].id, "call-2");
    }

    #[test]
    fn blank_content_is_none_and_bad_calls_stay_text() {
        let s = ToolSyntax::generic(false);
        let a =
            parse_answer(" <tool_call>[{\"name\": \"add\", \"arguments\": {}}]</tool_call>", &s, &tools(), &mut ids());
        assert_eq!(a.content, None);
        assert_eq!(a.calls[0].arguments, "{}");
        for bad in [
            "<tool_call>[{\"name\": \"rm_rf\", \"arguments\": {}}]</tool_call>",
            "<tool_call>[{\"name\": \"add\", \"arguments\": {</tool_call>",
            "<tool_call>[]</tool_call>",
        ] {
            let a = parse_answer(bad, &s, &tools(), &mut ids());
            assert_eq!((a.content.as_deref(), a.calls.len()), (Some(bad), 0));
        }
    }

    #[test]
    fn bare_json_calls_and_string_arguments_parse() {
        let s = ToolSyntax::generic(false);
        let a = parse_answer(r#"{"name": "add", "arguments": "{\"a\":1}"}"#, &s, &tools(), &mut ids());
        assert_eq!(a.calls[0].arguments, r#"{"a":1}"#);
        let plain = parse_answer(r#"{"a": 1}"#, &s, &tools(), &mut ids());
        assert_eq!(plain.calls.len(), 0);
    }

    #[test]
    fn stream_adds_up_to_the_parsed_answer() {
        let text = "Sure.<tool_calls>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"a}\\\"b\"}}, {\"name\": \"add\", \"arguments\": {\"a\": 1}}]</tool_calls>";
        let syntax = ToolSyntax::jamba(false);
        streams_like_whole(text, &syntax);
    }

    /// Every split of `text` into pieces of 1..7 characters streams to the answer parsed whole;
    /// returns that answer.
    fn streams_like_whole(text: &str, syntax: &ToolSyntax) -> ParsedAnswer {
        let whole = parse_answer(text, syntax, &tools(), &mut ids());
        for step in 1..7 {
            let mut stream = ToolStream::new(syntax.clone(), tools());
            let mut id = ids();
            let mut pieces = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(step) {
                pieces.extend(stream.push(&chunk.iter().collect::<String>(), &mut id));
            }
            pieces.extend(stream.finish(&mut id));
            let (content, calls) = reassemble(pieces).expect("pieces in order");
            assert_eq!(Some(content), whole.content, "step {step}");
            assert_eq!(calls, whole.calls, "step {step}");
        }
        whole
    }

    /// Hermes blocks, one call each, parse and stream to the same calls; a bad block, or text
    /// between blocks, leaves the whole answer as text.
    #[test]
    fn hermes_blocks_parse_and_stream_alike() {
        let syntax = ToolSyntax::hermes(false);
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"a}</tool_call>\\\"b\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>";
        let whole = streams_like_whole(text, &syntax);
        assert_eq!(whole.content.as_deref(), Some("Let me check.\n"));
        let names: Vec<&str> = whole.calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["get_weather", "add"]);
        assert_eq!(whole.calls[0].arguments, r#"{"city": "a}</tool_call>\"b"}"#);
        assert_eq!(whole.calls[1].arguments, r#"{"a": 1, "b": 2}"#);
        // The last block may end without its closing tag; the JSON-list form is not Hermes.
        let open_end =
            parse_answer("<tool_call>\n{\"name\": \"add\", \"arguments\": {}}", &syntax, &tools(), &mut ids());
        assert_eq!((open_end.content, open_end.calls.len()), (None, 1));
        for bad in [
            "<tool_call>\n{\"name\": \"nope\", \"arguments\": {}}\n</tool_call>",
            "<tool_call>{\"name\": \"add\", \"arguments\": {}}</tool_call> and then <tool_call>{\"name\": \"add\"}</tool_call>",
        ] {
            let p = parse_answer(bad, &syntax, &tools(), &mut ids());
            assert_eq!((p.content.as_deref(), p.calls.len()), (Some(bad), 0), "{bad}");
        }
    }

    #[test]
    fn calls_written_without_tags_stream_as_calls_as_they_parse_whole() {
        let s = ToolSyntax::generic(false);
        for text in [r#" {"name": "add", "arguments": "{\"a\":1}"}"#, r#"[{"name": "add", "arguments": {"a": 2}}]"#] {
            let whole = parse_answer(text, &s, &tools(), &mut ids());
            let mut stream = ToolStream::new(s.clone(), tools());
            let mut id = ids();
            let mut pieces = stream.push(&text[..9], &mut id);
            assert!(pieces.is_empty(), "held until it is known whether it is a call: {pieces:?}");
            pieces.extend(stream.push(&text[9..], &mut id));
            pieces.extend(stream.finish(&mut id));
            let call = &whole.calls[0];
            assert_eq!(
                pieces,
                vec![
                    StreamPiece::CallStart { index: 0, id: call.id.clone(), name: call.name.clone() },
                    StreamPiece::CallArguments { index: 0, arguments: call.arguments.clone() },
                ]
            );
            assert!(stream.has_calls());
        }
        // JSON that is not a call is the answer's text, sent whole at the end.
        let mut stream = ToolStream::new(s, tools());
        let mut id = ids();
        assert!(stream.push(r#"{"a": 1}"#, &mut id).is_empty());
        assert_eq!(stream.finish(&mut id), vec![StreamPiece::Content(r#"{"a": 1}"#.into())]);
    }

    #[test]
    fn blank_text_before_a_call_is_not_streamed_as_content() {
        let mut stream = ToolStream::new(ToolSyntax::jamba(false), tools());
        let mut id = ids();
        assert!(stream.push(" ", &mut id).is_empty());
        let pieces = stream.push("<tool_calls>[{\"name\": \"add\"", &mut id);
        assert!(matches!(pieces.as_slice(), [StreamPiece::CallStart { .. }]), "{pieces:?}");
        let mut plain = ToolStream::new(ToolSyntax::jamba(false), tools());
        assert!(plain.push(" ", &mut id).is_empty());
        assert_eq!(plain.push(" Hi", &mut id), vec![StreamPiece::Content("  Hi".into())]);
        assert!(plain.push(" ", &mut id) == vec![StreamPiece::Content(" ".into())]);
    }

    #[test]
    fn a_closing_tag_inside_an_argument_string_is_text() {
        let s = ToolSyntax::generic(false);
        let text = "<tool_call>[{\"name\": \"add\", \"arguments\": {\"a\": \"1}}]</tool_call> 2\"}}]</tool_call>";
        let parsed = parse_answer(text, &s, &tools(), &mut ids());
        assert_eq!(parsed.calls.len(), 1, "{parsed:?}");
        assert_eq!(parsed.calls[0].arguments, "{\"a\": \"1}}]</tool_call> 2\"}");
        let mut stream = ToolStream::new(s, tools());
        let mut id = ids();
        let mut args = String::new();
        for piece in text.as_bytes().chunks(5).map(|c| std::str::from_utf8(c).unwrap()) {
            for p in stream.push(piece, &mut id) {
                if let StreamPiece::CallArguments { arguments, .. } = p {
                    args.push_str(&arguments);
                }
            }
        }
        assert_eq!(args, parsed.calls[0].arguments);
    }

    #[test]
    fn stream_sends_arguments_as_they_are_written() {
        let mut stream = ToolStream::new(ToolSyntax::generic(false), tools());
        let mut id = ids();
        let mut pieces = stream.push("<tool_call>[{\"name\": \"add\", \"arguments\": {\"a\": 1", &mut id);
        assert_eq!(pieces.len(), 2, "{pieces:?}");
        assert_eq!(pieces[1], StreamPiece::CallArguments { index: 0, arguments: "{\"a\": 1".into() });
        pieces = stream.push("2, \"b\"", &mut id);
        assert_eq!(pieces, vec![StreamPiece::CallArguments { index: 0, arguments: "2, \"b\"".into() }]);
        pieces = stream.push(": 3}}]</tool_call>", &mut id);
        assert_eq!(pieces, vec![StreamPiece::CallArguments { index: 0, arguments: ": 3}".into() }]);
        assert!(stream.finish(&mut id).is_empty() && stream.has_calls());
    }

    #[test]
    fn stream_releases_a_false_tag_start_as_content() {
        let mut stream = ToolStream::new(ToolSyntax::generic(false), tools());
        let mut id = ids();
        let mut out = stream.push("a <tool", &mut id);
        assert_eq!(out, vec![StreamPiece::Content("a ".into())]);
        out = stream.push("box> b", &mut id);
        assert_eq!(out, vec![StreamPiece::Content("<toolbox> b".into())]);
        assert!(stream.finish(&mut id).is_empty());
    }

    #[test]
    fn grammars_name_the_tools_and_tags() {
        let g = tool_call_grammar(&tools(), Some("add"), false, &ToolSyntax::jamba(false), true);
        assert!(g.starts_with("start: \" \"? \"<tool_calls>\" calls \"</tool_calls>\""), "{g}");
        assert!(g.contains(r#""const":"add""#) && !g.contains("get_weather"), "{g}");
        let special = tool_call_grammar(&tools(), None, true, &ToolSyntax::jamba(true), false);
        assert!(special.starts_with("start: calls </tool_calls>"), "{special}");
        assert!(crate::guided::OutputShape::Json(None).lark().contains(r#""type":"object""#));
        let hermes = tool_call_grammar(&tools(), None, true, &ToolSyntax::hermes(false), true);
        assert!(
            hermes.starts_with(
                "start: SPACE \"<tool_call>\" SPACE call SPACE \"</tool_call>\" (SPACE \"<tool_call>\" SPACE call SPACE \"</tool_call>\")*"
            ),
            "{hermes}"
        );
    }
}
