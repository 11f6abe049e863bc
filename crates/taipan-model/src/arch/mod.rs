//! Model architectures, one module each.

pub mod jamba;
pub mod llama;
