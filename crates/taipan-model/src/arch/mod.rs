//! Model architectures, one module each.

//!
//! Hyper-parameters from a model file are bounded before anything is sized by them, so that a
//! hostile or corrupt file is an error naming the field, never an allocation of petabytes. The
//! bounds sit far above any published model (Jamba Large: hidden 8192, 72 layers).

/// Most layers a model may declare.
pub const MAX_LAYERS: usize = 1024;
/// Widest hidden, feed-forward or inner size.
pub const MAX_WIDTH: usize = 1 << 20;
/// Most attention heads, and the largest head size.
pub const MAX_HEADS: usize = 4096;
pub const MAX_HEAD_DIM: usize = 4096;
/// Most experts per MoE layer.
pub const MAX_EXPERTS: usize = 4096;
/// Largest vocabulary.
pub const MAX_VOCAB: usize = 1 << 24;
/// Longest context a model may declare (nothing is allocated per declared position).
pub const MAX_CONTEXT: usize = 1 << 30;

pub mod jamba;
pub mod llama;
