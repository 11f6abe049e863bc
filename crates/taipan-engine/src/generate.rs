//! One sequence, start to finish: prefill the prompt, then decode token by token.
//!
//! This is the single-stream path used by the CLI; the server's batching engine drives the same
//! model calls for many sequences at once, and both turn logits into tokens and text through the
//! same [`SeqOutput`].

use crate::constraint::Constraint;
use crate::output::{OutputParams, SeqOutput};
use crate::sampler::SamplingParams;
use std::time::{Duration, Instant};
use taipan_kernels::Compute;
use taipan_model::{Model, ModelError, Scratch};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_tokens` was reached (or the context filled up).
    Length,
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Decode rate over the tokens after the first (the first comes from the prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past stop tokens (benchmarks).
    pub ignore_eos: bool,
    /// A grammar the output must follow.
    pub constraint: Option<Constraint>,
}

/// Generates from `prompt` ids, calling `on_text` with each new piece of text.
pub fn generate(
    model: &Model,
    compute: &Compute,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    let mut state = model.new_state();
    let mut scratch = Scratch::default();
    let mut output = SeqOutput::new(OutputParams {
        sampling: params.sampling,
        max_tokens: params.max_tokens,
        min_tokens: 0,
        ignore_eos: params.ignore_eos,
        stop: vec![],
        logprobs: None,
        special_text: false,
        constraint: params.constraint.clone(),
        thinking_budget: None,
    });
    let t0 = Instant::now();
    model.forward(compute, prompt, &mut state, &mut scratch, false)?;
    let prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let mut tokens = Vec::new();
    let mut text = String::new();
    loop {
        let room = model.context_length().saturating_sub(state.len());
        let emitted = output.next(scratch.logits_mut(), &model.tokenizer, room);
        if let Some(e) = emitted.error {
            return Err(e.into());
        }
        if !emitted.text.is_empty() {
            on_text(&emitted.text);
            text.push_str(&emitted.text);
        }
        tokens.extend(emitted.token);
        match (emitted.finish, emitted.token) {
            (Some(finish), _) => {
                let decode_time = t1.elapsed();
                return Ok(Generation { tokens, text, finish, prompt_tokens: prompt.len(), prefill_time, decode_time });
            }
            (None, Some(next)) => model.forward(compute, &[next], &mut state, &mut scratch, false)?,
            (None, None) => unreachable!("a token is sampled unless the sequence ends or fails"),
        }
    }
}

/// Why a single-stream generation stopped short.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Grammar(#[from] crate::constraint::GrammarFailure),
}
