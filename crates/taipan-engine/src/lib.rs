//! The inference engine: sequences, sampling, incremental detokenization and the generation loop.
//!
//! The shaping decision: the engine knows tokens, sampling and model calls but no wire format;
//! the server turns its results into JSON.

pub mod cache;
pub mod constraint;
pub mod detokenizer;
pub mod engine;
pub mod eval;
pub mod generate;
pub mod metrics;
pub mod sampler;
pub mod stop;

pub use constraint::{Constraint, ConstraintError, Grammar, GrammarCompiler};
pub use detokenizer::IncrementalDecoder;
pub use engine::{EngineConfig, EngineHandle, EngineStats, Event, EventSink, GenRequest, SubmitError, TokenLogprob};
pub use generate::{generate, FinishReason, GenerateParams, Generation};
pub use sampler::{Sampler, SamplingParams};
