//! From a validated chat request to prompt token ids, with the model's chat template.

use serde_json::{Map, Value};
use taipan_api::chat::{ChatRequest, Message};
use taipan_api::{ApiError, ErrorKind};
use taipan_model::{ChatMessage, Model, RenderOptions};

fn template_message(m: &Message) -> ChatMessage {
    let mut extra = Map::new();
    if let Some(tc) = &m.tool_calls {
        extra.insert("tool_calls".into(), tc.clone());
    }
    if let Some(id) = &m.tool_call_id {
        extra.insert("tool_call_id".into(), Value::from(id.as_str()));
    }
    // Templates concatenate content as a string; a tool-call-only assistant turn has none.
    ChatMessage { role: m.role.clone(), content: Value::from(m.content.clone().unwrap_or_default()), extra }
}

/// Renders and tokenizes the conversation.
pub fn chat_prompt(model: &Model, req: &ChatRequest) -> Result<Vec<u32>, ApiError> {
    let messages: Vec<ChatMessage> = req.messages.iter().map(template_message).collect();
    let opts = RenderOptions {
        add_generation_prompt: true,
        tools: (!req.tools.is_empty()).then(|| Value::Array(req.tools.clone())),
        documents: (!req.documents.is_empty()).then(|| Value::Array(req.documents.clone())),
        extra: Map::new(),
    };
    let text = model
        .render_chat(&messages, &opts)
        .map_err(|e| ApiError::invalid("messages", format!("the chat template rejected the conversation: {e}")))?;
    let mut ids = model.tokenizer.encode(&text, true).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    // A template that does not emit BOS itself relies on the tokenizer for it.
    if model.tokenizer.specials.add_bos {
        if let Some(bos) = model.tokenizer.specials.bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
    }
    Ok(ids)
}

/// Token positions in `ids` where each of the last few messages ends, found by rendering the
/// conversation up to that message; a position counts only if its tokens are exactly a prefix
/// of the full prompt (so a state saved there can be reused by the next turn).
pub fn message_boundaries(model: &Model, req: &ChatRequest, ids: &[u32]) -> Vec<usize> {
    const LAST: usize = 4;
    let messages: Vec<ChatMessage> = req.messages.iter().map(template_message).collect();
    let mut out = Vec::new();
    for k in messages.len().saturating_sub(LAST).max(1)..messages.len() {
        let opts = RenderOptions {
            add_generation_prompt: false,
            tools: (!req.tools.is_empty()).then(|| Value::Array(req.tools.clone())),
            documents: (!req.documents.is_empty()).then(|| Value::Array(req.documents.clone())),
            extra: Map::new(),
        };
        let Ok(text) = model.render_chat(&messages[..k], &opts) else { continue };
        let Ok(mut prefix) = model.tokenizer.encode(&text, true) else { continue };
        if model.tokenizer.specials.add_bos {
            if let Some(bos) = model.tokenizer.specials.bos {
                if prefix.first() != Some(&bos) {
                    prefix.insert(0, bos);
                }
            }
        }
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
    context: usize,
    requested: Option<usize>,
    default_cap: Option<usize>,
) -> Result<usize, ApiError> {
    if prompt_len >= context {
        return Err(ApiError {
            kind: ErrorKind::ContextLength,
            field: Some("messages".into()),
            message: format!("the prompt has {prompt_len} tokens, but the model's context window is {context} tokens"),
        });
    }
    let room = context - prompt_len;
    Ok(match requested {
        Some(n) => n.min(room),
        None => default_cap.map_or(room, |c| c.min(room)),
    })
}
