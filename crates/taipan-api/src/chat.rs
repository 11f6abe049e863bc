//! Chat-completion requests of both dialects, validated into one [`ChatRequest`].

use crate::error::{ApiError, Dialect};
use crate::fields::*;
use crate::guided::{output_shape, Guided};
use crate::tools::{parse_tool_choice, ToolChoice};
use serde_json::Value;

/// One conversation message after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool` (`developer` becomes `system`).
    pub role: String,
    pub content: Option<String>,
    /// Assistant tool calls, as sent (`[{id, type, function: {name, arguments}}]`).
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
}

/// What shape the answer must take.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema(Value),
}

/// A validated chat request, the same for both dialects.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub tools: Vec<Value>,
    pub documents: Vec<Value>,
    pub n: usize,
    /// `None`: the dialect's default, applied once the prompt length is known.
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub seed: Option<u64>,
    pub response_format: ResponseFormat,
    /// The shape the answer must have (from `response_format` or vLLM's guided-decoding fields).
    pub guided: Option<Guided>,
    /// OpenAI `stream_options.include_usage`.
    pub include_usage: bool,
    /// OpenAI `logprobs` / `top_logprobs`.
    pub logprobs: bool,
    pub top_logprobs: usize,
    /// Extensions accepted as vLLM and llama.cpp accept them.
    pub ignore_eos: bool,
    pub min_tokens: usize,
    pub tool_choice: ToolChoice,
    /// OpenAI `parallel_tool_calls` (default true): more than one call per answer.
    pub parallel_tool_calls: bool,
}

/// Largest `max_tokens` the AI21 dialect accepts.
pub const AI21_MAX_TOKENS: usize = 4096;

/// Validates a chat-completions body.
pub fn parse_chat(body: &[u8], dialect: Dialect) -> Result<ChatRequest, ApiError> {
    let o = body_object(body)?;
    let model = match present(&o, "model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(ApiError::invalid("model", "model must be a non-empty string")),
        None => return Err(ApiError::invalid("model", "field required")),
    };
    let messages = parse_messages(&o, dialect)?;
    let stream = opt_bool(&o, "stream")?.unwrap_or(false);
    let n = opt_int(&o, "n", 1, 16)?.unwrap_or(1) as usize;
    if dialect == Dialect::Ai21 && stream && n > 1 {
        return Err(ApiError::invalid("n", "n must be 1 when stream is true"));
    }
    let max_tokens = match dialect {
        Dialect::Ai21 => opt_int(&o, "max_tokens", 1, AI21_MAX_TOKENS as i64)?,
        Dialect::OpenAi => match opt_int(&o, "max_completion_tokens", 1, i32::MAX as i64)? {
            Some(v) => Some(v),
            None => opt_int(&o, "max_tokens", 1, i32::MAX as i64)?,
        },
    }
    .map(|v| v as usize);
    let default_temperature = if dialect == Dialect::Ai21 { 0.4 } else { 1.0 };
    let temperature = opt_num(&o, "temperature", 0.0, 2.0, false)?.unwrap_or(default_temperature) as f32;
    let top_p = opt_num(&o, "top_p", 0.0, 1.0, true)?.unwrap_or(1.0) as f32;
    let top_k = opt_int(&o, "top_k", 0, i32::MAX as i64)?.unwrap_or(0) as usize;
    let response_format = parse_response_format(&o, dialect)?;
    let guided = output_shape(&o, &response_format)?;
    let (include_usage, logprobs, top_logprobs) = match dialect {
        Dialect::Ai21 => (false, false, 0),
        Dialect::OpenAi => {
            let include_usage = match present(&o, "stream_options") {
                None => false,
                Some(Value::Object(so)) => opt_bool(so, "include_usage")
                    .map_err(|_| ApiError::invalid("stream_options.include_usage", "include_usage must be a boolean"))?
                    .unwrap_or(false),
                Some(_) => return Err(ApiError::invalid("stream_options", "stream_options must be an object")),
            };
            let logprobs = opt_bool(&o, "logprobs")?.unwrap_or(false);
            let top = opt_int(&o, "top_logprobs", 0, 20)?;
            if top.is_some_and(|t| t > 0) && !logprobs {
                return Err(ApiError::invalid("top_logprobs", "top_logprobs requires logprobs to be true"));
            }
            (include_usage, logprobs, top.unwrap_or(0) as usize)
        }
    };
    let tools = parse_tools(&o)?;
    let tool_choice = parse_tool_choice(present(&o, "tool_choice"), &tools)?;
    Ok(ChatRequest {
        model,
        messages,
        tools,
        documents: parse_documents(&o)?,
        n,
        max_tokens,
        temperature,
        top_p,
        top_k,
        stop: stop_list(&o)?,
        stream,
        seed: opt_seed(&o)?,
        response_format,
        guided,
        include_usage,
        logprobs,
        top_logprobs,
        ignore_eos: opt_bool(&o, "ignore_eos")?.unwrap_or(false),
        min_tokens: opt_int(&o, "min_tokens", 0, i32::MAX as i64)?.unwrap_or(0) as usize,
        tool_choice,
        parallel_tool_calls: opt_bool(&o, "parallel_tool_calls")?.unwrap_or(true),
    })
}

fn text_content(v: Option<&Value>, field: &str, dialect: Dialect) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        // OpenAI allows content as a list of parts; only text parts exist for a text model.
        Some(Value::Array(parts)) if dialect == Dialect::OpenAi => {
            let mut text = String::new();
            for (i, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{field}.{i}"),
                            "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                        ))
                    }
                }
            }
            Ok(Some(text))
        }
        Some(_) => Err(ApiError::invalid(field, "content must be a string")),
    }
}

fn parse_messages(o: &Obj, dialect: Dialect) -> Result<Vec<Message>, ApiError> {
    let items = match present(o, "messages") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("messages", "messages must be a list")),
        None => return Err(ApiError::invalid("messages", "field required")),
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "messages must contain at least one message"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let f = |k: &str| format!("messages.{i}.{k}");
        let Value::Object(m) = m else {
            return Err(ApiError::invalid(format!("messages.{i}"), "each message must be an object"));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            Some(_) => return Err(ApiError::invalid(f("role"), "role must be a string")),
            None => return Err(ApiError::invalid(f("role"), "field required")),
        };
        let role = match (role, dialect) {
            ("system" | "user" | "assistant" | "tool", _) => role,
            ("developer", Dialect::OpenAi) => "system",
            (other, _) => {
                let allowed = if dialect == Dialect::OpenAi {
                    "system, developer, user, assistant or tool"
                } else {
                    "system, user, assistant or tool"
                };
                return Err(ApiError::invalid(f("role"), format!("unknown role '{other}': expected {allowed}")));
            }
        };
        let content = text_content(m.get("content"), &f("content"), dialect)?;
        let mut msg = Message { role: role.to_string(), content, tool_calls: None, tool_call_id: None };
        match role {
            "system" | "user" => {
                if msg.content.is_none() {
                    return Err(ApiError::invalid(f("content"), "field required"));
                }
                if role == "system" && msg.content.as_deref() == Some("") && dialect == Dialect::Ai21 {
                    continue;
                }
            }
            "assistant" => {
                match m.get("tool_calls") {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(calls)) => {
                        for (j, c) in calls.iter().enumerate() {
                            let name = c.pointer("/function/name").and_then(Value::as_str);
                            let args = c.pointer("/function/arguments");
                            if name.is_none() {
                                return Err(ApiError::invalid(
                                    format!("messages.{i}.tool_calls.{j}.function.name"),
                                    "field required",
                                ));
                            }
                            if !matches!(args, Some(Value::String(_))) {
                                return Err(ApiError::invalid(
                                    format!("messages.{i}.tool_calls.{j}.function.arguments"),
                                    "arguments must be a JSON string",
                                ));
                            }
                        }
                        if !calls.is_empty() {
                            msg.tool_calls = Some(Value::Array(calls.clone()));
                        }
                    }
                    Some(_) => return Err(ApiError::invalid(f("tool_calls"), "tool_calls must be a list")),
                }
                if msg.content.is_none() && msg.tool_calls.is_none() {
                    return Err(ApiError::invalid(f("content"), "an assistant message needs content or tool_calls"));
                }
            }
            _ => {
                if msg.content.is_none() {
                    return Err(ApiError::invalid(f("content"), "field required"));
                }
                match m.get("tool_call_id") {
                    Some(Value::String(id)) => msg.tool_call_id = Some(id.clone()),
                    None | Some(Value::Null) if dialect == Dialect::OpenAi => {
                        return Err(ApiError::invalid(f("tool_call_id"), "field required"))
                    }
                    None | Some(Value::Null) => return Err(ApiError::invalid(f("tool_call_id"), "field required")),
                    Some(_) => return Err(ApiError::invalid(f("tool_call_id"), "tool_call_id must be a string")),
                }
            }
        }
        out.push(msg);
    }
    if out.is_empty() {
        return Err(ApiError::invalid("messages", "messages must contain at least one non-empty message"));
    }
    Ok(out)
}

fn parse_tools(o: &Obj) -> Result<Vec<Value>, ApiError> {
    let items = match present(o, "tools") {
        None => return Ok(vec![]),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("tools", "tools must be a list")),
    };
    for (i, t) in items.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid(format!("tools.{i}.type"), "only tools of type 'function' are supported"));
        }
        match t.pointer("/function/name") {
            Some(Value::String(n)) if !n.is_empty() => {}
            _ => return Err(ApiError::invalid(format!("tools.{i}.function.name"), "field required")),
        }
        if let Some(p) = t.pointer("/function/parameters") {
            if !p.is_object() {
                return Err(ApiError::invalid(
                    format!("tools.{i}.function.parameters"),
                    "parameters must be an object",
                ));
            }
            // Arguments are a JSON object; a schema for anything else could never be met.
            if p.get("type").is_some_and(|ty| ty != "object") {
                return Err(ApiError::invalid(
                    format!("tools.{i}.function.parameters.type"),
                    "parameters must describe an object (type \"object\")",
                ));
            }
        }
    }
    Ok(items.clone())
}

fn parse_documents(o: &Obj) -> Result<Vec<Value>, ApiError> {
    let items = match present(o, "documents") {
        None => return Ok(vec![]),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("documents", "documents must be a list")),
    };
    for (i, d) in items.iter().enumerate() {
        let Value::Object(d) = d else {
            return Err(ApiError::invalid(format!("documents.{i}"), "each document must be an object"));
        };
        match d.get("content") {
            Some(Value::String(_)) => {}
            Some(_) => return Err(ApiError::invalid(format!("documents.{i}.content"), "content must be a string")),
            None => return Err(ApiError::invalid(format!("documents.{i}.content"), "field required")),
        }
        match d.get("metadata") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_string()) {
                    return Err(ApiError::invalid(
                        format!("documents.{i}.metadata.{k}"),
                        "metadata values must be strings",
                    ));
                }
            }
            Some(Value::Array(pairs)) => {
                for (j, p) in pairs.iter().enumerate() {
                    if !(p.get("key").is_some_and(Value::is_string) && p.get("value").is_some_and(Value::is_string)) {
                        return Err(ApiError::invalid(
                            format!("documents.{i}.metadata.{j}"),
                            "metadata entries must be {\"key\": string, \"value\": string}",
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("documents.{i}.metadata"),
                    "metadata must be an object of strings",
                ))
            }
        }
    }
    Ok(items.clone())
}

pub(crate) fn parse_response_format(o: &Obj, dialect: Dialect) -> Result<ResponseFormat, ApiError> {
    let Some(rf) = present(o, "response_format") else { return Ok(ResponseFormat::Text) };
    let ty = rf.get("type").and_then(Value::as_str);
    match (ty, dialect) {
        (Some("text"), _) => Ok(ResponseFormat::Text),
        (Some("json_object"), _) => Ok(ResponseFormat::JsonObject),
        (Some("json_schema"), Dialect::OpenAi) => match rf.pointer("/json_schema/schema") {
            Some(s) if s.is_object() => Ok(ResponseFormat::JsonSchema(s.clone())),
            _ => Err(ApiError::invalid("response_format.json_schema.schema", "a JSON schema object is required")),
        },
        _ => {
            let allowed =
                if dialect == Dialect::OpenAi { "text, json_object or json_schema" } else { "text or json_object" };
            Err(ApiError::invalid("response_format.type", format!("response_format.type must be {allowed}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ai21(body: &str) -> Result<ChatRequest, ApiError> {
        parse_chat(body.as_bytes(), Dialect::Ai21)
    }

    #[test]
    fn seed_request_parses_with_ai21_defaults() {
        let r = ai21(
            r#"{"model":"jamba-1.5-large","messages":[{"role":"system","content":"S"},{"role":"user","content":"allo"},
            {"role":"assistant","content":"Hello!"},{"role":"user","content":"what"}],"documents":[],"tools":[],"n":1,
            "max_tokens":2048,"temperature":0.4,"top_p":1,"stop":[],"stream":false}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 4);
        assert_eq!((r.n, r.max_tokens, r.temperature, r.top_p, r.stream), (1, Some(2048), 0.4, 1.0, false));
        let d = ai21(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"unknown_field":{"a":1}}"#).unwrap();
        assert_eq!((d.temperature, d.max_tokens, d.n), (0.4, None, 1));
    }

    #[test]
    fn errors_name_their_field() {
        let cases = [
            (r#"{"model":"m","messages":[]}"#, "messages"),
            (r#"{"model":"m"}"#, "messages"),
            (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
            (r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#, "messages.0.role"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#, "temperature"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#, "temperature"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":0}"#, "top_p"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":17}"#, "n"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":1.5}"#, "n"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":5000}"#, "max_tokens"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, "max_tokens"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":[""]}"#, "stop.0"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":[1]}"#, "stop.0"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2,"stream":true}"#, "n"),
            (r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#, "messages.0.tool_call_id"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"documents":[{"id":"1"}]}"#,
                "documents.0.content",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],
                    "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"string"}}}]}"#,
                "tools.0.function.parameters.type",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"parallel_tool_calls":"yes"}"#,
                "parallel_tool_calls",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"xml"}}"#,
                "response_format.type",
            ),
            (r#"[1,2]"#, "body"),
            (r#"{"model":"#, "body"),
        ];
        let long_stop = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"stop":["a","{}"]}}"#,
            "x".repeat(1025)
        );
        let many_stops = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"stop":[{}]}}"#,
            ["\"s\""; 65].join(",")
        );
        let bounded = [(long_stop.as_str(), "stop.1"), (many_stops.as_str(), "stop")];
        for (body, field) in cases.into_iter().chain(bounded) {
            let e = ai21(body).expect_err(body);
            assert_eq!(e.field.as_deref(), Some(field), "{body}: {e}");
            assert_eq!(e.status(Dialect::Ai21), 422);
            assert_eq!(e.status(Dialect::OpenAi), 400);
        }
    }

    #[test]
    fn integral_floats_are_integers_and_openai_extras_parse() {
        let r = parse_chat(
            br#"{"model":"m","messages":[{"role":"developer","content":"S"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
               "max_tokens":10,"max_completion_tokens":7.0,"n":3,"stream":true,"stream_options":{"include_usage":true},
               "logprobs":true,"top_logprobs":2,"tool_choice":"auto"}"#,
            Dialect::OpenAi,
        )
        .unwrap();
        assert_eq!(r.messages[0].role, "system");
        assert_eq!(r.messages[1].content.as_deref(), Some("ab"));
        assert_eq!((r.max_tokens, r.n, r.include_usage, r.logprobs, r.top_logprobs), (Some(7), 3, true, true, 2));
        assert_eq!(r.temperature, 1.0);
    }

    #[test]
    fn assistant_messages_from_sdk_dumps_are_accepted() {
        let r = ai21(r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y","tool_calls":null},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
            {"role":"tool","content":"18 C","tool_call_id":"c1"}]}"#)
        .unwrap();
        assert_eq!(r.messages.len(), 4);
        assert!(r.messages[2].tool_calls.is_some());
        let e = ai21(r#"{"model":"m","messages":[{"role":"assistant","content":null}]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("messages.0.content"));
    }
}
