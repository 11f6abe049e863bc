//! The inference engine: a scheduler (pure bookkeeping), a model runner (one forward pass per
//! step for every architecture) and output processing (sampling, grammar, detokenization, stop
//! strings), wired together on the engine thread; plus the single-stream loop of the CLI.
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
pub mod output;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod stop;

pub use constraint::{Constraint, ConstraintError, Grammar, GrammarCompiler, GrammarFailure};
pub use detokenizer::IncrementalDecoder;
pub use engine::{
    EngineConfig, EngineHandle, EngineStats, Event, EventSink, Fault, GenRequest, SubmitError, TokenLogprob,
};
pub use generate::{generate, FinishReason, GenerateError, GenerateParams, Generation};
pub use sampler::{Sampler, SamplingParams};
