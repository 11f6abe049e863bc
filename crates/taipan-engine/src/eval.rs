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
/// llama.cpp's `llama-perplexity` does, which also puts BOS first in every chunk of a model that
/// wants one (its first token is never scored).
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
    let specials = &model.tokenizer.specials;
    let bos = specials.bos.filter(|_| specials.add_bos);
    let mut chunk = Vec::with_capacity(ctx);
    for c in 0..chunks {
        chunk.clear();
        chunk.extend_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let mut state = model.new_state();
        model.forward(compute, &chunk, &mut state, &mut scratch, true)?;
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

/// Aggregate decode rate of `batch` sequences stepped together, one token each per forward pass
/// over a shared cache (what the engine does with that many streams), and where a step's time
/// goes. Each sequence first runs a `prompt_tokens` prompt of its own.
#[derive(Debug, Clone)]
pub struct BatchBenchResult {
    pub batch: usize,
    /// Generated tokens per second, all sequences together.
    pub decode_tok_s: f64,
    /// Milliseconds per step (one token for every sequence).
    pub step_ms: f64,
    pub step_breakdown: Vec<(&'static str, f64)>,
}

pub fn bench_batched(
    model: &Model,
    compute: &Compute,
    batch: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
) -> Result<BatchBenchResult, ModelError> {
    use taipan_model::{BatchItem, Cache, Logits};
    let vocab = model.vocab_size() as u32;
    let spec = model.cache_spec();
    let bs = 16;
    let per_seq = (prompt_tokens + gen_tokens + 1).div_ceil(bs);
    let mut cache = Cache::new(&spec, bs, batch * per_seq, if spec.is_recurrent() { batch } else { 0 });
    let tables: Vec<Vec<u32>> =
        (0..batch).map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect()).collect();
    let slot = |i: usize| spec.is_recurrent().then_some(i as u32);
    let mut scratch = Scratch::default();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| (0..prompt_tokens.max(1) as u32).map(|t| (t * 7919 + 100 + i as u32 * 31) % vocab).collect())
        .collect();
    let items: Vec<BatchItem<'_>> = (0..batch)
        .map(|i| BatchItem {
            tokens: &prompts[i],
            start: 0,
            blocks: &tables[i],
            state_slot: slot(i),
            logits: Logits::Last,
            prompt: true,
        })
        .collect();
    model.forward_batch(compute, &items, &mut cache, &mut scratch)?;
    let mut next: Vec<u32> =
        (0..batch).map(|i| crate::sampler::argmax(&scratch.logits()[i * vocab as usize..][..vocab as usize])).collect();
    let start = prompts[0].len();
    // One warm-up step, then the timed ones.
    let mut elapsed = 0.0;
    for step in 0..=gen_tokens {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let items: Vec<BatchItem<'_>> = (0..batch)
            .map(|i| BatchItem {
                tokens: &tokens[i],
                start: start + step,
                blocks: &tables[i],
                state_slot: slot(i),
                logits: Logits::Last,
                prompt: false,
            })
            .collect();
        if step == 1 {
            scratch.set_profile(true);
        }
        let t = Instant::now();
        model.forward_batch(compute, &items, &mut cache, &mut scratch)?;
        if step > 0 {
            elapsed += t.elapsed().as_secs_f64();
        }
        let v = vocab as usize;
        next = (0..batch).map(|i| crate::sampler::argmax(&scratch.logits()[i * v..(i + 1) * v])).collect();
    }
    let parts = scratch.profile();
    let total: f64 = parts.iter().map(|p| p.1).sum();
    Ok(BatchBenchResult {
        batch,
        decode_tok_s: (batch * gen_tokens) as f64 / elapsed,
        step_ms: 1e3 * elapsed / gen_tokens as f64,
        step_breakdown: parts.into_iter().map(|(n, v)| (n, if total > 0.0 { v / total } else { 0.0 })).collect(),
    })
}

/// The machine's read bandwidth in GB/s as `threads` threads see it: a streaming read of `bytes`
/// (at least 1 GiB makes caches irrelevant), best of three, from a buffer on huge pages where the
/// system allows, as the weights are (on 4 KiB pages this machine streamed ~25 GB/s, on 2 MiB
/// pages ~35). Decode and batched steps that read every weight once are bound by it.
pub fn read_bandwidth(compute: &Compute, bytes: usize) -> f64 {
    let words = bytes / 8;
    let mut data = taipan_kernels::huge::HugeBuf::<u64>::zeroed(words);
    for (i, v) in data.iter_mut().enumerate() {
        *v = i as u64;
    }
    let sums: Vec<std::sync::atomic::AtomicU64> = (0..compute.pool.threads() * 4).map(|_| Default::default()).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let chunk = words.div_ceil(sums.len());
        compute.pool.run(sums.len(), &|i| {
            let part = &data[(i * chunk).min(words)..((i + 1) * chunk).min(words)];
            let s = part.iter().fold(0u64, |a, &v| a.wrapping_add(v));
            sums[i].fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&sums);
    (words * 8) as f64 / best / 1e9
}
