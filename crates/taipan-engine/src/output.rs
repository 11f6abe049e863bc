//! Output processing of one sequence: from a row of logits to the next token and the text a
//! client may see. Thinking budget, grammar mask, `min_tokens`, sampling, log-probabilities,
//! incremental detokenization, stop strings and the length limit, in that order — one path for
//! the engine and the single-stream CLI alike.

use crate::constraint::{Constraint, GrammarFailure, Guide, Progress};
use crate::detokenizer::IncrementalDecoder;
use crate::generate::FinishReason;
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use std::time::Duration;
use taipan_kernels::ops::log_softmax;
use taipan_model::Tokenizer;

/// A token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// `logprobs[id]` with the `top` most likely tokens.
pub fn token_logprob(logprobs: &[f32], id: u32, top: usize) -> TokenLogprob {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &lp) in logprobs.iter().enumerate() {
            if best.len() < top || lp > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, v)| v >= lp);
                best.insert(at, (i as u32, lp));
                best.truncate(top);
            }
        }
    }
    TokenLogprob { id, logprob: logprobs[id as usize], top: best }
}

/// How one sequence's output is produced and when it ends.
#[derive(Debug, Clone)]
pub struct OutputParams {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Stop tokens are ignored until this many tokens were generated.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    /// Report the chosen token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Decode special tokens as their text.
    pub special_text: bool,
    pub constraint: Option<Constraint>,
    /// The prompt opened a thinking block that must close within a budget.
    pub thinking_budget: Option<ThinkingBudget>,
}

/// At most `tokens` tokens of thinking: then the closing token `close` is the next token, whatever
/// the model prefers (a sequence that closes its thinking itself is not touched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkingBudget {
    pub tokens: usize,
    pub close: u32,
}

/// What one token produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Emitted {
    /// The sampled token; `None` when the sequence ended without one.
    pub token: Option<u32>,
    /// Text the client may see now (stop strings held back or cut; the held-back tail on finish).
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    /// Set when the sequence has ended.
    pub finish: Option<FinishReason>,
    /// Set when the sequence cannot go on correctly (its grammar failed): it must end with this
    /// error, not as a finished answer.
    pub error: Option<GrammarFailure>,
}

/// One sequence's sampler, grammar, decoder and stop matcher.
pub struct SeqOutput {
    params: OutputParams,
    sampler: Sampler,
    guide: Option<Guide>,
    detok: IncrementalDecoder,
    stops: StopMatcher,
    generated: usize,
    /// Inside the thinking block the prompt opened, under a budget.
    thinking: bool,
    /// Log-probability buffer (vocabulary-sized).
    lp: Vec<f32>,
}

impl SeqOutput {
    pub fn new(params: OutputParams) -> Self {
        SeqOutput {
            sampler: Sampler::new(params.sampling),
            guide: params.constraint.as_ref().map(Guide::new),
            detok: IncrementalDecoder::new(!params.special_text),
            stops: StopMatcher::new(params.stop.clone()),
            generated: 0,
            thinking: params.thinking_budget.is_some(),
            lp: Vec::new(),
            params,
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Tokens constrained by the grammar and the time spent on them since the last call.
    pub fn take_grammar_cost(&mut self) -> (u64, Duration) {
        self.guide.as_mut().map_or((0, Duration::ZERO), |g| g.take_cost())
    }

    /// Chooses the next token from `logits` (masked in place) and turns it into text.
    /// `room` is how many more tokens the context can take, this one included.
    pub fn next(&mut self, logits: &mut [f32], tokenizer: &Tokenizer, room: usize) -> Emitted {
        let p = &self.params;
        if self.generated >= p.max_tokens || room == 0 {
            return self.finish(tokenizer, FinishReason::Length, Emitted::default());
        }
        let stop_ids = &tokenizer.specials.stop_ids;
        // Under an active grammar the grammar decides where the answer ends.
        if self.generated < p.min_tokens && !self.guide.as_ref().is_some_and(|g| g.active()) {
            for &id in stop_ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(budget) = p.thinking_budget.filter(|b| self.thinking && self.generated >= b.tokens) {
            let kept = logits.get(budget.close as usize).copied().filter(|l| l.is_finite()).unwrap_or(0.0);
            logits.fill(f32::NEG_INFINITY);
            if let Some(l) = logits.get_mut(budget.close as usize) {
                *l = kept;
            }
        }
        let left = (p.max_tokens - self.generated).min(room);
        let next = match self.guide.as_mut() {
            None => self.sampler.sample(logits),
            Some(g) => match g.sample(&mut self.sampler, logits, left) {
                Ok(t) => t,
                Err(e) => return Emitted { error: Some(e), ..Default::default() },
            },
        };
        self.generated += 1;
        if self.params.thinking_budget.is_some_and(|b| b.close == next) {
            self.thinking = false;
        }
        let mut out = Emitted { token: Some(next), ..Default::default() };
        if let Some(top) = self.params.logprobs {
            self.lp.resize(logits.len(), 0.0);
            log_softmax(&mut self.lp, logits);
            out.logprobs.push(token_logprob(&self.lp, next, top));
        }
        if !self.params.ignore_eos && stop_ids.contains(&next) {
            return self.finish(tokenizer, FinishReason::Stop, out);
        }
        let piece = self.detok.push(tokenizer, next);
        let grammar_done = match self.guide.as_mut().map(|g| g.advance(next, &piece)) {
            Some(Ok(Progress::Complete)) => true,
            Some(Ok(Progress::Continue)) | None => false,
            Some(Err(e)) => return Emitted { error: Some(e), ..Default::default() },
        };
        let check = self.stops.push(&piece);
        out.text = check.emit;
        if check.stopped {
            // The matched stop string and whatever was held back are never shown.
            out.finish = Some(FinishReason::Stop);
            return out;
        }
        if grammar_done {
            return self.finish(tokenizer, FinishReason::Stop, out);
        }
        if self.generated >= self.params.max_tokens || room <= 1 {
            return self.finish(tokenizer, FinishReason::Length, out);
        }
        out
    }

    /// Ends the sequence: releases text held back for an incomplete stop string or an
    /// incomplete character, unless a stop string turns up in it.
    pub fn finish(&mut self, tokenizer: &Tokenizer, reason: FinishReason, mut out: Emitted) -> Emitted {
        let rest = self.detok.flush(tokenizer);
        let check = self.stops.push(&rest);
        out.text.push_str(&check.emit);
        if !check.stopped {
            out.text.push_str(&self.stops.flush());
        }
        out.finish = Some(if check.stopped { FinishReason::Stop } else { reason });
        out
    }
}
