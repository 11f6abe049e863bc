//! The engine serving a hybrid (Jamba) model: sequences are batched into one forward pass, each
//! on its own recurrent-state slot, and saved states let the next turn of a conversation skip
//! recomputing its history.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, OnceLock};
use taipan_engine::engine::start;
use taipan_engine::{EngineConfig, EngineHandle, Event, GenRequest};
use taipan_kernels::{Compute, MatmulMode};
use taipan_model::{LoadOptions, Model, Scratch};

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    Arc::clone(M.get_or_init(|| {
        let dir = fixtures_dir().join("jamba-tiny-a");
        Arc::new(
            Model::load(&dir, LoadOptions { mode: MatmulMode::Exact, quantize: None }).expect("jamba-tiny-a loads"),
        )
    }))
}

fn engine() -> EngineHandle {
    engine_for(model())
}

fn engine_for(model: Arc<Model>) -> EngineHandle {
    start(
        model,
        EngineConfig {
            threads: 2,
            max_queue: 16,
            kv_cache_bytes: 64 << 20,
            block_size: 16,
            max_batch_tokens: 32,
            max_running: 16,
        },
    )
    .expect("engine starts")
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenRequest {
    GenRequest { ignore_eos: true, ..GenRequest::new(prompt, max_tokens) }
}

/// Token ids of the answer, recovered from the text is not possible, so ask for logprobs.
fn run_ids(e: &EngineHandle, mut req: GenRequest) -> Vec<u32> {
    req.logprobs = Some(0);
    let (tx, rx) = mpsc::channel();
    e.submit(req, Box::new(tx)).unwrap();
    let mut ids = Vec::new();
    loop {
        match rx.recv().unwrap() {
            Event::Delta { logprobs, .. } => ids.extend(logprobs.iter().map(|l| l.id)),
            Event::Done { .. } => return ids,
            Event::Error(e) | Event::Cancelled(e) => panic!("{e}"),
            Event::PromptLogprobs(_) => {}
        }
    }
}

fn direct_greedy_on(m: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let compute = Compute::new(2);
    let mut st = m.new_state();
    let mut sc = Scratch::default();
    m.forward(&compute, prompt, &mut st, &mut sc, false).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = taipan_engine::sampler::argmax(sc.logits());
        out.push(next);
        m.forward(&compute, &[next], &mut st, &mut sc, false).unwrap();
    }
    out
}

fn prompt_ids(text: &str) -> Vec<u32> {
    let m = model();
    let mut ids = vec![m.tokenizer.specials.bos.unwrap()];
    ids.extend(m.tokenizer.encode(text, true).unwrap());
    ids
}

/// Submits every prompt at once and checks each answer against the same prompt run alone.
fn concurrent_equals_alone(m: Arc<Model>, prompts: &[Vec<u32>], tokens: usize) {
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| direct_greedy_on(&m, p, tokens)).collect();
    let e = engine_for(Arc::clone(&m));
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (tx, rx) = mpsc::channel();
            let mut r = greedy(p.clone(), tokens);
            r.logprobs = Some(0);
            e.submit(r, Box::new(tx)).unwrap();
            rx
        })
        .collect();
    for (i, (rx, w)) in receivers.into_iter().zip(&want).enumerate() {
        let mut ids = Vec::new();
        loop {
            match rx.recv().unwrap() {
                Event::Delta { logprobs, .. } => ids.extend(logprobs.iter().map(|l| l.id)),
                Event::Done { .. } => break,
                Event::Error(err) | Event::Cancelled(err) => panic!("{err}"),
                Event::PromptLogprobs(_) => {}
            }
        }
        assert_eq!(&ids, w, "request {i} (prompt of {} tokens)", prompts[i].len());
    }
    // Several sequences shared each step: the steps were batched.
    let steps = e.stats.steps.load(Ordering::Relaxed) as usize;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    assert!(steps < prompt_tokens.div_ceil(32) + tokens * prompts.len() / 2, "{steps} steps: not batched");
}

/// Sixteen prompts of mixed lengths (3 to ~80 tokens), more than one step's budget of 32 tokens
/// in all, so prefills are chunked and run beside other sequences' decode steps.
fn mixed_prompts(m: &Model) -> Vec<Vec<u32>> {
    let texts = [
        "Hello, my name is",
        "def parse(self, text):",
        "The quick brown fox",
        "import os\nimport sys\n\nclass Config:",
        "Once upon a time, in a land far away, there lived a king who had three daughters.",
        "1, 2, 3, 4, 5,",
        "Q: What is the capital of France?\nA:",
        "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
        "fn main() {",
        "The mitochondria is the powerhouse of the cell, and the ribosome is where proteins are made by translation of messenger RNA into chains of amino acids.",
        "SELECT name FROM users WHERE",
        "a",
        "Dear Sir or Madam, I am writing to complain about",
        "for i in range(10):\n    print(i)\n",
        "Jamba is a hybrid of attention and Mamba layers with a mixture of experts.",
        "Translate to French: good morning",
    ];
    texts
        .iter()
        .map(|t| {
            let mut ids = vec![m.tokenizer.specials.bos.unwrap()];
            ids.extend(m.tokenizer.encode(t, true).unwrap());
            ids
        })
        .collect()
}

#[test]
fn sixteen_concurrent_requests_answer_as_they_do_alone() {
    let m = model();
    let prompts = mixed_prompts(&m);
    assert!(prompts.iter().map(Vec::len).sum::<usize>() > 4 * 32);
    concurrent_equals_alone(m, &prompts, 12);
}

#[test]
fn sixteen_concurrent_requests_on_a_larger_synthetic_jamba_answer_as_they_do_alone() {
    let out = std::env::temp_dir().join(format!("taipan-synth-engine-{}.gguf", std::process::id()));
    let spec = taipan_model::synth::SynthJamba::hidden_256();
    taipan_model::synth::write_synthetic_jamba(&out, &fixtures_dir().join("jamba-tiny-a.gguf"), &spec).unwrap();
    let m = Arc::new(Model::load(&out, LoadOptions::default()).unwrap());
    let _ = std::fs::remove_file(&out);
    let prompts = mixed_prompts(&m);
    concurrent_equals_alone(m, &prompts, 10);
}

#[test]
fn next_turn_resumes_from_the_saved_state_and_matches_a_cold_run() {
    let m = model();
    let warm = engine();
    let turn1 = prompt_ids("<|im_start|>user\nWrite a function that parses a date.<|im_end|>\n<|im_start|>assistant\n");
    let answer = run_ids(&warm, greedy(turn1.clone(), 16));
    // The client resends the history verbatim plus a new message.
    let mut turn2 = turn1.clone();
    turn2.extend(&answer);
    turn2.extend(
        m.tokenizer
            .encode(
                "<|im_end|>\n<|im_start|>user\nNow make it handle time zones.<|im_end|>\n<|im_start|>assistant\n",
                true,
            )
            .unwrap(),
    );
    let hits_before = warm.stats.prefix_hit_tokens.load(Ordering::Relaxed);
    let warm_answer = run_ids(&warm, greedy(turn2.clone(), 12));
    let reused = warm.stats.prefix_hit_tokens.load(Ordering::Relaxed) - hits_before;
    // The state saved at the end of turn 1 covers its prompt and all but the last answer token.
    assert_eq!(reused as usize, turn1.len() + answer.len() - 1, "turn 2 recomputed its history");
    let cold = engine();
    let cold_answer = run_ids(&cold, greedy(turn2, 12));
    assert_eq!(cold.stats.prefix_hit_tokens.load(Ordering::Relaxed), 0);
    assert_eq!(warm_answer, cold_answer, "a resumed state must give the cold run's answer");
}
