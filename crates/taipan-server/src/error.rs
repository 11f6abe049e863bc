//! The one place where errors become HTTP responses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use taipan_api::{ApiError, Dialect, ErrorKind};

/// An [`ApiError`] bound to the dialect of the route it happened on.
#[derive(Debug)]
pub struct HttpError {
    pub dialect: Dialect,
    pub error: ApiError,
    /// Seconds a client should wait before retrying (429).
    pub retry_after: Option<u32>,
}

impl HttpError {
    pub fn new(dialect: Dialect, error: ApiError) -> Self {
        HttpError { dialect, error, retry_after: None }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.error.status(self.dialect)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// The dialect a path belongs to (AI21 under `/studio/`, OpenAI elsewhere).
pub fn dialect_of(path: &str) -> Dialect {
    if path.starts_with("/studio/") {
        Dialect::Ai21
    } else {
        Dialect::OpenAi
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self.error, "request failed");
        }
        let mut resp = (status, self.error.body(self.dialect).to_string()).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.error.kind == ErrorKind::Unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.error.kind == ErrorKind::PayloadTooLarge {
            // The rest of the body is never read, so the connection cannot carry another
            // request: say so, or a keep-alive client sends its next request into a closed
            // socket (it did, about one run in eight of the e2e suite).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
