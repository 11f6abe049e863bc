//! Results shaped into each dialect's responses and stream chunks (pure functions).

use crate::pyjson;
use crate::tools::ToolCall;
use serde_json::{json, Map, Value};

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache or a saved state (OpenAI dialect only).
    pub cached_tokens: usize,
}

impl Usage {
    /// AI21's usage object: the three counts of the captured exchange, nothing more.
    pub fn to_json(self) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
               "total_tokens": self.prompt_tokens + self.completion_tokens})
    }

    /// OpenAI's usage object, with `prompt_tokens_details.cached_tokens` (where OpenAI clients
    /// and routers read prefix-cache hits).
    pub fn to_openai_json(self) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
               "total_tokens": self.prompt_tokens + self.completion_tokens,
               "prompt_tokens_details": {"cached_tokens": self.cached_tokens}})
    }
}

/// One sampled token's log-probability with its alternatives: text, and the token's own bytes
/// (which differ from the text's where a token holds part of a UTF-8 character).
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    /// `(text, logprob, bytes)` of the most likely tokens.
    pub top: Vec<(String, f32, Vec<u8>)>,
}

fn openai_logprob(e: &LogprobEntry) -> Value {
    json!({
        "token": e.token, "logprob": e.logprob, "bytes": e.bytes,
        "top_logprobs": e.top.iter().map(|(t, lp, b)| json!({"token": t, "logprob": lp, "bytes": b})).collect::<Vec<_>>(),
    })
}

/// One finished choice.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceOut {
    pub index: usize,
    /// `None` when the answer is only tool calls.
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: String,
    pub logprobs: Option<Vec<LogprobEntry>>,
    /// A thinking model's thinking, kept apart from `content` (shown only when set).
    pub reasoning_content: Option<String>,
}

impl ChoiceOut {
    /// `tool_calls` as the wire shows them: `null` when there are none.
    fn tool_calls_json(&self) -> Value {
        if self.tool_calls.is_empty() {
            Value::Null
        } else {
            Value::Array(self.tool_calls.iter().map(ToolCall::to_json).collect())
        }
    }

    /// The message, with `reasoning_content` after the other keys when there is thinking.
    fn message(&self, mut message: Value) -> Value {
        if let (Some(r), Some(m)) = (&self.reasoning_content, message.as_object_mut()) {
            m.insert("reasoning_content".into(), Value::from(r.as_str()));
        }
        message
    }
}

/// AI21 non-streaming response; keys in the order of the captured exchange.
pub fn ai21_chat_response(id: &str, choices: &[ChoiceOut], usage: Usage) -> String {
    let choices: Vec<Value> = choices
        .iter()
        .map(|c| {
            json!({"index": c.index,
                   "message": c.message(json!({"role": "assistant", "content": c.content, "tool_calls": c.tool_calls_json()})),
                   "logprobs": null, "finish_reason": c.finish_reason})
        })
        .collect();
    json!({"id": id, "choices": choices, "usage": usage.to_json()}).to_string()
}

/// One AI21 stream event's JSON (Python layout, as on the wire). `usage` only on the last one.
pub fn ai21_chat_chunk(id: &str, delta: Value, finish_reason: Option<&str>, usage: Option<Usage>) -> String {
    let mut o = Map::new();
    o.insert("id".into(), id.into());
    o.insert("choices".into(), json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]));
    if let Some(u) = usage {
        o.insert("usage".into(), u.to_json());
    }
    pyjson::to_string(&Value::Object(o))
}

/// OpenAI non-streaming chat response.
pub fn openai_chat_response(id: &str, created: u64, model: &str, choices: &[ChoiceOut], usage: Usage) -> String {
    let choices: Vec<Value> = choices
        .iter()
        .map(|c| {
            let logprobs = c
                .logprobs
                .as_ref()
                .map(|l| json!({"content": l.iter().map(openai_logprob).collect::<Vec<_>>(), "refusal": null}));
            json!({"index": c.index,
                   "message": c.message(json!({"role": "assistant", "content": c.content, "refusal": null,
                               "tool_calls": c.tool_calls_json()})),
                   "logprobs": logprobs, "finish_reason": c.finish_reason})
        })
        .collect();
    json!({"id": id, "object": "chat.completion", "created": created, "model": model,
           "choices": choices, "usage": usage.to_openai_json()})
    .to_string()
}

/// Fields shared by every chunk of one OpenAI stream.
#[derive(Debug, Clone)]
pub struct OpenAiStream<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    /// With `stream_options.include_usage`, every chunk carries `"usage": null`.
    pub include_usage: bool,
}

impl OpenAiStream<'_> {
    fn base(&self, object: &str) -> Map<String, Value> {
        let mut o = Map::new();
        o.insert("id".into(), self.id.into());
        o.insert("object".into(), object.into());
        o.insert("created".into(), self.created.into());
        o.insert("model".into(), self.model.into());
        o
    }

    /// A chat chunk for one choice.
    pub fn chat_chunk(
        &self,
        index: usize,
        delta: Value,
        finish_reason: Option<&str>,
        logprobs: Option<&[LogprobEntry]>,
    ) -> String {
        let mut o = self.base("chat.completion.chunk");
        let lp =
            logprobs.map(|l| json!({"content": l.iter().map(openai_logprob).collect::<Vec<_>>(), "refusal": null}));
        o.insert(
            "choices".into(),
            json!([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}]),
        );
        if self.include_usage {
            o.insert("usage".into(), Value::Null);
        }
        Value::Object(o).to_string()
    }

    /// The extra last chunk with usage and no choices.
    pub fn usage_chunk(&self, object: &str, usage: Usage) -> String {
        let mut o = self.base(object);
        o.insert("choices".into(), json!([]));
        o.insert("usage".into(), usage.to_openai_json());
        Value::Object(o).to_string()
    }

    /// A legacy-completions chunk for one choice.
    pub fn completion_chunk(
        &self,
        index: usize,
        text: &str,
        finish_reason: Option<&str>,
        logprobs: Option<Value>,
    ) -> String {
        let mut o = self.base("text_completion");
        o.insert(
            "choices".into(),
            json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]),
        );
        if self.include_usage {
            o.insert("usage".into(), Value::Null);
        }
        Value::Object(o).to_string()
    }
}

/// Legacy completions `logprobs` object for a run of tokens starting at text offset `offset`.
/// Entries with `None` (the first prompt token) have null log-probabilities.
pub fn completion_logprobs(entries: &[(String, Option<LogprobEntry>)], offset: usize) -> Value {
    let mut tokens = vec![];
    let mut token_logprobs = vec![];
    let mut top_logprobs = vec![];
    let mut text_offset = vec![];
    let mut at = offset;
    for (text, e) in entries {
        tokens.push(Value::from(text.as_str()));
        text_offset.push(Value::from(at));
        at += text.len();
        match e {
            Some(e) => {
                token_logprobs.push(Value::from(e.logprob));
                let mut top = Map::new();
                for (t, lp, _) in &e.top {
                    top.insert(t.clone(), Value::from(*lp));
                }
                top_logprobs.push(Value::Object(top));
            }
            None => {
                token_logprobs.push(Value::Null);
                top_logprobs.push(Value::Null);
            }
        }
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
}

/// Legacy completions response.
pub fn completion_response(
    id: &str,
    created: u64,
    model: &str,
    choices: &[(usize, String, String, Option<Value>)],
    usage: Usage,
) -> String {
    let choices: Vec<Value> = choices
        .iter()
        .map(|(i, text, finish, lp)| json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish}))
        .collect();
    json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": usage.to_openai_json()})
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ai21_response_has_the_captured_shape() {
        let c = ChoiceOut {
            index: 0,
            content: Some("Hi".into()),
            tool_calls: vec![],
            finish_reason: "stop".into(),
            logprobs: None,
            reasoning_content: None,
        };
        let s =
            ai21_chat_response("chat-0123", &[c], Usage { prompt_tokens: 40, completion_tokens: 2, cached_tokens: 0 });
        assert_eq!(
            s,
            r#"{"id":"chat-0123","choices":[{"index":0,"message":{"role":"assistant","content":"Hi","tool_calls":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":40,"completion_tokens":2,"total_tokens":42}}"#
        );
    }

    #[test]
    fn ai21_chunks_match_the_wire_capture() {
        assert_eq!(
            ai21_chat_chunk("chat-a", json!({"role": "assistant"}), None, None),
            r#"{"id": "chat-a", "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": null, "finish_reason": null}]}"#
        );
        assert_eq!(
            ai21_chat_chunk(
                "chat-a",
                json!({"content": ""}),
                Some("stop"),
                Some(Usage { prompt_tokens: 40, completion_tokens: 216, cached_tokens: 0 })
            ),
            r#"{"id": "chat-a", "choices": [{"index": 0, "delta": {"content": ""}, "logprobs": null, "finish_reason": "stop"}], "usage": {"prompt_tokens": 40, "completion_tokens": 216, "total_tokens": 256}}"#
        );
    }

    #[test]
    fn openai_stream_usage_fields() {
        let s = OpenAiStream { id: "chatcmpl-1", created: 5, model: "m", include_usage: true };
        let c: Value = serde_json::from_str(&s.chat_chunk(0, json!({"content": "x"}), None, None)).unwrap();
        assert!(c["usage"].is_null() && c.get("usage").is_some());
        let u: Value = serde_json::from_str(
            &s.usage_chunk("chat.completion.chunk", Usage { prompt_tokens: 1, completion_tokens: 2, cached_tokens: 0 }),
        )
        .unwrap();
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"]["total_tokens"], 3);
    }
}
