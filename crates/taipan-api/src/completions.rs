//! OpenAI's legacy `/v1/completions`: a raw prompt (text or token ids), used by evaluation harnesses.

use crate::chat::parse_response_format;
use crate::error::{ApiError, Dialect};
use crate::fields::*;
use crate::guided::{output_shape, Guided};
use serde_json::Value;

/// The prompt as sent.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// A validated completions request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    /// One entry per prompt; each gets `n` choices.
    pub prompts: Vec<PromptInput>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub n: usize,
    pub stream: bool,
    /// Number of alternatives per token to report (`logprobs: k`), if any.
    pub logprobs: Option<usize>,
    pub echo: bool,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
    pub min_tokens: usize,
    pub include_usage: bool,
    /// The shape each answer must have (`response_format` or vLLM's guided-decoding fields).
    pub guided: Option<Guided>,
}

fn token_list(items: &[Value], field: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .filter(|&t| t <= u32::MAX as u64)
                .map(|t| t as u32)
                .ok_or_else(|| ApiError::invalid(format!("{field}.{i}"), "token ids must be non-negative integers"))
        })
        .collect()
}

/// Validates a completions body.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let o = body_object(body)?;
    let model = match present(&o, "model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err(ApiError::invalid("model", "model must be a non-empty string")),
        None => return Err(ApiError::invalid("model", "field required")),
    };
    let prompts = match present(&o, "prompt") {
        None => return Err(ApiError::invalid("prompt", "field required")),
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "prompt must not be empty"))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::Number(_) => vec![PromptInput::Tokens(token_list(items, "prompt")?)],
            Value::String(_) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().map(|s| PromptInput::Text(s.to_string())).ok_or_else(|| {
                        ApiError::invalid(format!("prompt.{i}"), "prompt list entries must all be strings")
                    })
                })
                .collect::<Result<_, _>>()?,
            Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Array(t) if !t.is_empty() => Ok(PromptInput::Tokens(token_list(t, &format!("prompt.{i}"))?)),
                    _ => Err(ApiError::invalid(format!("prompt.{i}"), "expected a non-empty list of token ids")),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(ApiError::invalid("prompt", "prompt must be text, a list of texts, or token ids")),
        },
        Some(_) => return Err(ApiError::invalid("prompt", "prompt must be text, a list of texts, or token ids")),
    };
    if prompts.iter().any(|p| matches!(p, PromptInput::Text(t) if t.is_empty())) {
        return Err(ApiError::invalid("prompt", "prompt must not be empty"));
    }
    let include_usage = match present(&o, "stream_options") {
        Some(Value::Object(so)) => opt_bool(so, "include_usage")?.unwrap_or(false),
        Some(_) => return Err(ApiError::invalid("stream_options", "stream_options must be an object")),
        None => false,
    };
    Ok(CompletionRequest {
        model,
        prompts,
        max_tokens: opt_int(&o, "max_tokens", 0, i32::MAX as i64)?.unwrap_or(16) as usize,
        temperature: opt_num(&o, "temperature", 0.0, 2.0, false)?.unwrap_or(1.0) as f32,
        top_p: opt_num(&o, "top_p", 0.0, 1.0, true)?.unwrap_or(1.0) as f32,
        top_k: opt_int(&o, "top_k", 0, i32::MAX as i64)?.unwrap_or(0) as usize,
        n: opt_int(&o, "n", 1, 16)?.unwrap_or(1) as usize,
        stream: opt_bool(&o, "stream")?.unwrap_or(false),
        logprobs: opt_int(&o, "logprobs", 0, 20)?.map(|v| v as usize),
        echo: opt_bool(&o, "echo")?.unwrap_or(false),
        stop: stop_list(&o)?,
        seed: opt_seed(&o)?,
        ignore_eos: opt_bool(&o, "ignore_eos")?.unwrap_or(false),
        min_tokens: opt_int(&o, "min_tokens", 0, i32::MAX as i64)?.unwrap_or(0) as usize,
        include_usage,
        guided: output_shape(&o, &parse_response_format(&o, Dialect::OpenAi)?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_forms() {
        let r = parse_completion(br#"{"model":"m","prompt":"hi","logprobs":2,"echo":true}"#).unwrap();
        assert_eq!(
            (r.prompts.clone(), r.logprobs, r.echo, r.max_tokens),
            (vec![PromptInput::Text("hi".into())], Some(2), true, 16)
        );
        let r = parse_completion(br#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.prompts, vec![PromptInput::Tokens(vec![1, 2, 3])]);
        let r = parse_completion(br#"{"model":"m","prompt":[[1],[2,3]]}"#).unwrap();
        assert_eq!(r.prompts.len(), 2);
        for (body, field) in [
            (r#"{"model":"m"}"#, "prompt"),
            (r#"{"model":"m","prompt":[1,-2]}"#, "prompt.1"),
            (r#"{"model":"m","prompt":["a",1]}"#, "prompt.1"),
            (r#"{"model":"m","prompt":"x","logprobs":21}"#, "logprobs"),
        ] {
            assert_eq!(parse_completion(body.as_bytes()).unwrap_err().field.as_deref(), Some(field), "{body}");
        }
    }
}
