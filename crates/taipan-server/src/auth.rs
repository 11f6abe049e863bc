//! API keys: `Authorization: Bearer <key>` or `api-key: <key>`, compared in constant time.

use crate::error::{dialect_of, HttpError};
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use taipan_api::{ApiError, ErrorKind};

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // The whole length difference takes part (not a truncation of it), and every byte of the
    // longer input is visited whatever the contents.
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

/// The key a request presents, if any.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    headers.get("api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Middleware: with keys configured, every route but `/health` and the playground's static files
/// needs one of them.
pub async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    let path = req.uri().path();
    if keys.is_empty() || path == "/health" || crate::playground::PUBLIC_PATHS.contains(&path) {
        return next.run(req).await;
    }
    let ok = presented_key(req.headers())
        .is_some_and(|k| keys.iter().fold(false, |acc, key| acc | constant_time_eq(k.as_bytes(), key.as_bytes())));
    if ok {
        return next.run(req).await;
    }
    let dialect = dialect_of(req.uri().path());
    HttpError::new(dialect, ApiError::new(ErrorKind::Unauthorized, "invalid or missing API key")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_keys() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        // A length difference of 65,536 once vanished in a truncation to 16 bits.
        let mut padded = b"secret".to_vec();
        padded.resize(6 + 65536, 0);
        assert!(!constant_time_eq(b"secret", &padded));
        assert!(!constant_time_eq(&padded, b"secret"));
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(presented_key(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert("authorization", "Token abc".parse().unwrap());
        assert_eq!(presented_key(&h), None);
        h.insert("api-key", "k".parse().unwrap());
        assert_eq!(presented_key(&h), Some("k"));
    }
}
