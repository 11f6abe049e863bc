//! The inference engine: sequences, sampling, incremental detokenization and the generation loop.
//!
//! The shaping decision: the engine knows tokens, sampling and model calls but no wire format;
//! the server turns its results into JSON.

pub mod detokenizer;
pub mod eval;
pub mod generate;
pub mod sampler;

pub use detokenizer::IncrementalDecoder;
pub use generate::{generate, FinishReason, GenerateParams, Generation};
pub use sampler::{Sampler, SamplingParams};
