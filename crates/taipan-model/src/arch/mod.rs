//! Model architectures, one module each.

pub mod llama;
