//! The two wire dialects taipan speaks — AI21 Studio (`/studio/v1/...`) and OpenAI (`/v1/...`) —
//! as validation of request JSON into dialect-neutral requests, and pure functions that shape
//! results into each dialect's responses and stream chunks.
//!
//! The shaping decision: requests are validated field by field from the raw JSON value rather than
//! through derived deserializers, so every error names its field, integral floats are accepted
//! for integers (Python clients compute limits with `/`), unknown fields are ignored, and each
//! dialect gets its own status codes and error bodies from one [`ApiError`]. This crate does no
//! I/O.

pub mod chat;
pub mod completions;
pub mod error;
mod fields;
pub mod guided;
pub mod pyjson;
pub mod reasoning;
pub mod response;
pub mod tools;

pub use chat::{parse_chat, ChatRequest, ResponseFormat};
pub use completions::{parse_completion, CompletionRequest, PromptInput};
pub use error::{ApiError, Dialect, ErrorKind};
pub use guided::{Guided, OutputShape};
pub use tools::{ToolCall, ToolChoice, ToolSyntax};
