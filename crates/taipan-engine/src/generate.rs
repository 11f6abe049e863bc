//! One sequence, start to finish: prefill the prompt, then decode token by token.
//!
//! This is the single-stream path used by the CLI; the server's batching engine drives the same
//! model calls for many sequences at once.

use crate::constraint::{Constraint, Guide, Progress};
use crate::detokenizer::IncrementalDecoder;
use crate::sampler::{Sampler, SamplingParams};
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
) -> Result<Generation, ModelError> {
    let mut state = model.new_state();
    let mut scratch = Scratch::default();
    let mut sampler = Sampler::new(params.sampling);
    let mut detok = IncrementalDecoder::new(true);
    let stops = &model.tokenizer.specials.stop_ids;
    let t0 = Instant::now();
    model.forward(compute, prompt, &mut state, &mut scratch, false)?;
    let prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut finish = FinishReason::Length;
    let mut guide = params.constraint.as_ref().map(Guide::new);
    while tokens.len() < params.max_tokens {
        let left = (params.max_tokens - tokens.len()).min(model.context_length().saturating_sub(state.len()));
        let next = match guide.as_mut() {
            None => sampler.sample(scratch.logits()),
            Some(g) => match g.sample(&mut sampler, scratch.logits_mut(), left) {
                Some(t) => t,
                None => {
                    finish = FinishReason::Stop;
                    break;
                }
            },
        };
        tokens.push(next);
        if !params.ignore_eos && stops.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        let piece = detok.push(&model.tokenizer, next);
        if !piece.is_empty() {
            on_text(&piece);
            text.push_str(&piece);
        }
        match guide.as_mut().map(|g| g.advance(next, &piece)) {
            Some(Progress::Complete) => {
                finish = FinishReason::Stop;
                break;
            }
            Some(Progress::Abandoned) => guide = None,
            _ => {}
        }
        if tokens.len() >= params.max_tokens || state.len() + 1 > model.context_length() {
            break;
        }
        model.forward(compute, &[next], &mut state, &mut scratch, false)?;
    }
    let rest = detok.flush(&model.tokenizer);
    if !rest.is_empty() {
        on_text(&rest);
        text.push_str(&rest);
    }
    Ok(Generation { tokens, text, finish, prompt_tokens: prompt.len(), prefill_time, decode_time: t1.elapsed() })
}
