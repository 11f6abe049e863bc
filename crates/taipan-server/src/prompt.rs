//! From a validated chat request to prompt token ids, with the model's chat template.
//!
//! Tools, documents and JSON mode go to the template when it reads them (`tools`, `documents`,
//! Jamba's `knobs`). A template that does not (SmolLM2's ChatML) gets them as text in the system
//! message instead, in the fallback formats below (documented in the README), and sees earlier
//! tool calls written in the fallback tool-call syntax.

use crate::structured::tool_syntax;
use serde_json::{json, Map, Value};
use taipan_api::chat::{ChatRequest, Message};
use taipan_api::tools::{ToolChoice, ToolSyntax};
use taipan_api::{ApiError, ErrorKind, ResponseFormat};
use taipan_model::{ChatMessage, Model, RenderOptions};

/// Assistant tool calls as the fallback syntax writes them.
fn calls_as_text(calls: &Value, syntax: &ToolSyntax) -> String {
    let items: Vec<Value> = calls
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let f = c.get("function").unwrap_or(c);
                    let args = match f.get("arguments") {
                        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
                        Some(v) => v.clone(),
                        None => json!({}),
                    };
                    json!({"name": f.get("name").cloned().unwrap_or(Value::Null), "arguments": args})
                })
                .collect()
        })
        .unwrap_or_default();
    format!("{}{}{}", syntax.open, taipan_api::pyjson::to_string_unicode(&items), syntax.close)
}

fn template_message(m: &Message, calls_in_text: Option<&ToolSyntax>) -> ChatMessage {
    let mut extra = Map::new();
    let mut content = m.content.clone().unwrap_or_default();
    if let Some(tc) = &m.tool_calls {
        match calls_in_text {
            Some(syntax) => content.push_str(&calls_as_text(tc, syntax)),
            None => {
                extra.insert("tool_calls".into(), tc.clone());
            }
        }
    }
    if let Some(id) = &m.tool_call_id {
        extra.insert("tool_call_id".into(), Value::from(id.as_str()));
    }
    // Templates concatenate content as a string; a tool-call-only assistant turn has none.
    ChatMessage { role: m.role.clone(), content: Value::from(content), extra }
}

/// The fallback tool section of the system message.
fn tools_text(tools: &[Value], syntax: &ToolSyntax) -> String {
    let functions: Vec<&Value> = tools.iter().map(|t| t.get("function").unwrap_or(t)).collect();
    format!(
        "You are an expert at calling functions. You are given a question and a set of functions. \
         If a function can serve the question, call it.\n\n\
         The functions you can call:\n<tools>{}</tools>\n\n\
         To call functions, reply with nothing but the calls, in this format:\n\
         {}[{{\"name\": \"function_name\", \"arguments\": {{\"argument_name\": \"value\"}}}}]{}\n\
         If none of the functions fits, say so.",
        taipan_api::pyjson::to_string_unicode(&functions),
        syntax.open,
        syntax.close
    )
}

/// Metadata pairs of a document in order, from either accepted form.
fn metadata_pairs(doc: &Value) -> Vec<(String, String)> {
    match doc.get("metadata") {
        Some(Value::Object(m)) => {
            m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect()
        }
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|p| Some((p.get("key")?.as_str()?.to_string(), p.get("value")?.as_str()?.to_string())))
            .collect(),
        _ => vec![],
    }
}

/// AI21 documents as Jamba's template reads them: `text`, then metadata keys (`title` first).
fn template_documents(docs: &[Value]) -> Value {
    Value::Array(
        docs.iter()
            .map(|d| {
                let mut o = Map::new();
                let pairs = metadata_pairs(d);
                if let Some((_, title)) = pairs.iter().find(|(k, _)| k == "title") {
                    o.insert("title".into(), title.clone().into());
                }
                for (k, v) in pairs.iter().filter(|(k, _)| k != "title" && k != "text") {
                    o.insert(k.clone(), v.clone().into());
                }
                o.insert("text".into(), d.get("content").cloned().unwrap_or_default());
                Value::Object(o)
            })
            .collect(),
    )
}

/// The fallback documents section of the system message.
fn documents_text(docs: &[Value]) -> String {
    let mut s = String::from("Use these documents to answer:\n<documents>");
    for (i, d) in docs.iter().enumerate() {
        s.push_str(&format!("\n## Document {i}"));
        if let Some(id) = d.get("id").and_then(Value::as_str) {
            s.push_str(&format!(" (id: {id})"));
        }
        for (k, v) in metadata_pairs(d) {
            s.push_str(&format!("\n{k}: {v}"));
        }
        s.push('\n');
        s.push_str(d.get("content").and_then(Value::as_str).unwrap_or_default());
        s.push('\n');
    }
    s.push_str("</documents>");
    s
}

/// The fallback JSON-mode instruction.
fn json_text(format: &ResponseFormat) -> Option<String> {
    match format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some("Answer with a single JSON object and nothing else.".into()),
        ResponseFormat::JsonSchema(schema) => Some(format!(
            "Answer with a single JSON object and nothing else, following this JSON schema: {}",
            taipan_api::pyjson::to_string_unicode(schema)
        )),
    }
}

/// Whether the request's tools reach the model (a `none` choice keeps them out of the prompt).
pub fn tools_offered(req: &ChatRequest) -> bool {
    !req.tools.is_empty() && req.tool_choice != ToolChoice::None
}

/// Renders the first `upto` messages (all: `None`) as the template, or the fallbacks, show them.
pub(crate) fn render(
    model: &Model,
    req: &ChatRequest,
    upto: Option<usize>,
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    let reads = |v: &str| model.template.as_ref().is_some_and(|t| t.reads(v));
    let syntax = tool_syntax(model);
    let calls_in_text = (!reads("tools")).then_some(&syntax);
    let mut messages: Vec<ChatMessage> = req.messages.iter().map(|m| template_message(m, calls_in_text)).collect();
    let mut opts = RenderOptions { add_generation_prompt, ..Default::default() };
    let mut system_extra: Vec<String> = Vec::new();
    if tools_offered(req) {
        if reads("tools") {
            opts.tools = Some(Value::Array(req.tools.clone()));
        } else {
            system_extra.push(tools_text(&req.tools, &syntax));
        }
    }
    if !req.documents.is_empty() {
        if reads("documents") {
            opts.documents = Some(template_documents(&req.documents));
        } else {
            system_extra.push(documents_text(&req.documents));
        }
    }
    if req.response_format != ResponseFormat::Text {
        if reads("knobs") {
            opts.extra.insert("knobs".into(), json!({"response_format": "json_object", "is_set": true}));
        }
        if !reads("knobs") || matches!(req.response_format, ResponseFormat::JsonSchema(_)) {
            system_extra.extend(json_text(&req.response_format));
        }
    }
    let mut shift = 0;
    if !system_extra.is_empty() {
        let extra = system_extra.join("\n\n");
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                let text = first.content.as_str().unwrap_or_default();
                first.content = Value::from(if text.is_empty() { extra } else { format!("{text}\n\n{extra}") });
            }
            _ => {
                messages.insert(0, ChatMessage::new("system", &extra));
                shift = 1;
            }
        }
    }
    let end = upto.map_or(messages.len(), |k| k + shift);
    model
        .render_chat(&messages[..end], &opts)
        .map_err(|e| ApiError::invalid("messages", format!("the chat template rejected the conversation: {e}")))
}

/// Token ids of a prompt text (special tokens parsed), with the model's BOS in front unless the
/// text already begins with it (a rendered template or a raw prompt may carry it as text).
pub(crate) fn tokenize(model: &Model, text: &str) -> Result<Vec<u32>, ApiError> {
    let mut ids = model.tokenizer.encode(text, true).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    if model.tokenizer.specials.add_bos {
        if let Some(bos) = model.tokenizer.specials.bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
    }
    Ok(ids)
}

/// Renders and tokenizes the conversation.
pub fn chat_prompt(model: &Model, req: &ChatRequest) -> Result<Vec<u32>, ApiError> {
    tokenize(model, &render(model, req, None, true)?)
}

/// Token positions in `ids` where each of the last few messages ends, found by rendering the
/// conversation up to that message; a position counts only if its tokens are exactly a prefix
/// of the full prompt (so a state saved there can be reused by the next turn).
pub fn message_boundaries(model: &Model, req: &ChatRequest, ids: &[u32]) -> Vec<usize> {
    const LAST: usize = 4;
    let n = req.messages.len();
    let mut out = Vec::new();
    for k in n.saturating_sub(LAST).max(1)..n {
        let Ok(text) = render(model, req, Some(k), false) else { continue };
        let Ok(prefix) = tokenize(model, &text) else { continue };
        if !prefix.is_empty() && prefix.len() < ids.len() && ids.starts_with(&prefix) {
            out.push(prefix.len());
        }
    }
    out
}

/// Token budget for the answer: the request's, else `default_cap` (None: all the room left), never
/// more than the context has left. A prompt that fills the context is an error.
pub fn resolve_max_tokens(
    prompt_len: usize,
    window: ContextWindow,
    requested: Option<usize>,
    default_cap: Option<usize>,
) -> Result<usize, ApiError> {
    let context = window.tokens;
    if prompt_len >= context {
        let why = if context < window.model {
            format!(" (the most the KV cache budget holds; the model's own is {} tokens)", window.model)
        } else {
            String::new()
        };
        return Err(ApiError {
            kind: ErrorKind::ContextLength,
            field: Some("messages".into()),
            message: format!("the prompt has {prompt_len} tokens, but the context window is {context} tokens{why}"),
        });
    }
    let room = context - prompt_len;
    Ok(match requested {
        Some(n) => n.min(room),
        None => default_cap.map_or(room, |c| c.min(room)),
    })
}

/// The longest prompt plus answer a request may have: the model's context, or less when the
/// engine's memory budget holds less.
#[derive(Debug, Clone, Copy)]
pub struct ContextWindow {
    pub tokens: usize,
    pub model: usize,
}

impl ContextWindow {
    pub fn of(engine: &taipan_engine::EngineHandle) -> Self {
        ContextWindow { tokens: engine.context_limit(), model: engine.model.context_length() }
    }
}

#[cfg(test)]
mod tests {
    use super::tokenize;
    use std::path::PathBuf;
    use taipan_model::{LoadOptions, Model};

    #[test]
    fn a_prompt_that_begins_with_bos_gets_no_second_one() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/jamba-tiny-a");
        let m = Model::load(&dir, LoadOptions::default()).expect("loads");
        let bos = m.tokenizer.specials.bos.expect("the fixture has a BOS");
        assert!(m.tokenizer.specials.add_bos);
        let bos_text = m.tokenizer.decode(&[bos], true).expect("decodes");
        let plain = tokenize(&m, "Hello").unwrap();
        assert_eq!(plain[0], bos);
        assert_ne!(plain.get(1), Some(&bos));
        let with = tokenize(&m, &format!("{bos_text}Hello")).unwrap();
        assert_eq!(with.iter().take_while(|&&t| t == bos).count(), 1, "{with:?}");
    }
}
