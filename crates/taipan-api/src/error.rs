//! Errors with the status code and body each dialect uses.

use serde_json::{json, Value};

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// AI21 Studio: FastAPI-style bodies, validation errors are 422.
    Ai21,
    /// OpenAI: `{"error": {...}}` bodies, validation errors are 400.
    OpenAi,
}

/// What went wrong, independent of dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A field is missing, of the wrong type or out of range; or the JSON is malformed.
    Invalid,
    /// The requested model is not served.
    UnknownModel,
    /// The prompt does not fit the context window.
    ContextLength,
    Unauthorized,
    NotFound,
    PayloadTooLarge,
    /// The queue is full.
    Overloaded,
    /// The model is still loading or the server is shutting down.
    Unavailable,
    Internal,
}

/// An error to send back, with the field it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub kind: ErrorKind,
    /// Dotted path of the offending field (`messages.1.role`), if any.
    pub field: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, field: None, message: message.into() }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { kind: ErrorKind::Invalid, field: Some(field.into()), message: message.into() }
    }

    /// HTTP status for this error in `dialect`.
    pub fn status(&self, dialect: Dialect) -> u16 {
        match (self.kind, dialect) {
            (ErrorKind::Invalid, Dialect::Ai21) => 422,
            (ErrorKind::Invalid, Dialect::OpenAi) => 400,
            (ErrorKind::UnknownModel, Dialect::Ai21) => 422,
            (ErrorKind::UnknownModel, Dialect::OpenAi) => 404,
            (ErrorKind::ContextLength, Dialect::Ai21) => 422,
            (ErrorKind::ContextLength, Dialect::OpenAi) => 400,
            (ErrorKind::Unauthorized, _) => 401,
            (ErrorKind::NotFound, _) => 404,
            (ErrorKind::PayloadTooLarge, _) => 413,
            (ErrorKind::Overloaded, _) => 429,
            (ErrorKind::Unavailable, _) => 503,
            (ErrorKind::Internal, _) => 500,
        }
    }

    fn openai_type(&self) -> &'static str {
        match self.kind {
            ErrorKind::Invalid | ErrorKind::ContextLength | ErrorKind::UnknownModel => "invalid_request_error",
            ErrorKind::Unauthorized => "authentication_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::PayloadTooLarge => "invalid_request_error",
            ErrorKind::Overloaded => "rate_limit_error",
            ErrorKind::Unavailable | ErrorKind::Internal => "server_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self.kind {
            ErrorKind::UnknownModel => Some("model_not_found"),
            ErrorKind::ContextLength => Some("context_length_exceeded"),
            ErrorKind::Unauthorized => Some("invalid_api_key"),
            ErrorKind::Overloaded => Some("rate_limit_exceeded"),
            _ => None,
        }
    }

    /// The JSON body for this error in `dialect`.
    pub fn body(&self, dialect: Dialect) -> Value {
        match dialect {
            Dialect::Ai21 if self.status(dialect) == 422 => {
                let mut loc = vec![json!("body")];
                if let Some(f) = &self.field {
                    for part in f.split('.') {
                        loc.push(part.parse::<u64>().map(Value::from).unwrap_or_else(|_| Value::from(part)));
                    }
                }
                json!({"detail": [{"loc": loc, "msg": self.message, "type": "value_error"}]})
            }
            Dialect::Ai21 => json!({"detail": self.message}),
            Dialect::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.openai_type(),
                "param": self.field,
                "code": self.code(),
            }}),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ApiError {}
