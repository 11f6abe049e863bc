//! Evaluation helpers: perplexity the way `llama-perplexity` computes it, and speed benchmarks.

use std::time::Instant;
use taipan_kernels::ops::log_softmax;
use taipan_kernels::Compute;
use taipan_model::{Model, ModelError, Scratch};

/// Result of a perplexity run.
#[derive(Debug, Clone)]
pub struct Perplexity {
    pub ppl: f64,
    /// Perplexity of each chunk on its own.
    pub chunk_ppl: Vec<f64>,
    pub scored_tokens: usize,
    pub tokens_per_second: f64,
}

/// Cuts `tokens` into `floor(n / ctx)` chunks of `ctx`, runs each from an empty state, and scores
/// the second half of each chunk (positions `ctx/2 .. ctx-1` predicting the next token), as
/// llama.cpp's `llama-perplexity` does.
pub fn perplexity(model: &Model, compute: &Compute, tokens: &[u32], ctx: usize) -> Result<Perplexity, ModelError> {
    if ctx < 4 {
        return Err(ModelError::Input("perplexity context must be at least 4 tokens".into()));
    }
    let chunks = tokens.len() / ctx;
    if chunks == 0 {
        return Err(ModelError::Input(format!("text has {} tokens, fewer than one context of {ctx}", tokens.len())));
    }
    let vocab = model.vocab_size();
    let mut scratch = Scratch::default();
    let mut lp = vec![0f32; vocab];
    let (mut nll, mut count) = (0f64, 0usize);
    let mut chunk_ppl = Vec::new();
    let start = Instant::now();
    for c in 0..chunks {
        let chunk = &tokens[c * ctx..(c + 1) * ctx];
        let mut state = model.new_state();
        model.forward(compute, chunk, &mut state, &mut scratch, true)?;
        let logits = scratch.logits();
        let (mut chunk_nll, mut chunk_n) = (0f64, 0usize);
        for pos in ctx / 2..ctx - 1 {
            log_softmax(&mut lp, &logits[pos * vocab..(pos + 1) * vocab]);
            chunk_nll -= lp[chunk[pos + 1] as usize] as f64;
            chunk_n += 1;
        }
        chunk_ppl.push((chunk_nll / chunk_n as f64).exp());
        nll += chunk_nll;
        count += chunk_n;
    }
    Ok(Perplexity {
        ppl: (nll / count as f64).exp(),
        chunk_ppl,
        scored_tokens: count,
        tokens_per_second: (chunks * ctx) as f64 / start.elapsed().as_secs_f64(),
    })
}

/// Prefill and decode speed of one configuration.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Median over repetitions, tokens per second.
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Share of decode time per part of the model, where the architecture reports it.
    pub decode_breakdown: Vec<(&'static str, f64)>,
}

/// Times a prefill of `prompt_tokens` from an empty state, and `gen_tokens` single-token decode
/// steps from another empty state (llama-bench's `pp` and `tg`), `reps` times after one warm-up,
/// reporting medians. Token ids are fixed and arbitrary: speed does not depend on them.
pub fn bench(
    model: &Model,
    compute: &Compute,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
) -> Result<BenchResult, ModelError> {
    let vocab = model.vocab_size() as u32;
    let prompt: Vec<u32> = (0..prompt_tokens as u32).map(|i| (i * 7919 + 100) % vocab).collect();
    let mut scratch = Scratch::default();
    let mut pre = Vec::new();
    let mut dec = Vec::new();
    for rep in 0..reps + 1 {
        let mut state = model.new_state();
        let t = Instant::now();
        model.forward(compute, &prompt, &mut state, &mut scratch, false)?;
        let p = t.elapsed().as_secs_f64();
        let mut state = model.new_state();
        let mut next = (rep as u32 * 31 + 5) % vocab;
        scratch.set_profile(rep > 0);
        let t = Instant::now();
        for _ in 0..gen_tokens {
            model.forward(compute, &[next], &mut state, &mut scratch, false)?;
            next = crate::sampler::argmax(scratch.logits());
        }
        let d = t.elapsed().as_secs_f64();
        if rep > 0 {
            pre.push(prompt_tokens as f64 / p);
            dec.push(gen_tokens as f64 / d);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let parts = scratch.profile();
    let total: f64 = parts.iter().map(|p| p.1).sum();
    let decode_breakdown = parts.into_iter().map(|(n, v)| (n, if total > 0.0 { v / total } else { 0.0 })).collect();
    Ok(BenchResult {
        prompt_tokens,
        gen_tokens,
        prefill_tok_s: median(&mut pre),
        decode_tok_s: median(&mut dec),
        decode_breakdown,
    })
}
