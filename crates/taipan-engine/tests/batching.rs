//! The batching engine on the default model: batching never changes greedy outputs, prefixes are
//! reused, n > 1 shares its prompt, and cancelled requests free their blocks.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, OnceLock};
use taipan_engine::engine::start;
use taipan_engine::{EngineConfig, EngineHandle, Event, FinishReason, GenRequest, SamplingParams};
use taipan_model::{LoadOptions, Model};

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    Arc::clone(M.get_or_init(|| Arc::new(Model::load(&default_model(), LoadOptions::default()).expect("model loads"))))
}

fn engine(max_batch_tokens: usize) -> EngineHandle {
    start(
        model(),
        EngineConfig {
            threads: 2,
            max_queue: 64,
            kv_cache_bytes: 256 << 20,
            block_size: 16,
            max_batch_tokens,
            max_running: 32,
        },
    )
    .expect("engine starts")
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenRequest {
    GenRequest::new(prompt, max_tokens)
}

/// Text and finish of every choice.
fn collect(rx: mpsc::Receiver<Event>, n: usize) -> Vec<(String, FinishReason, usize)> {
    let mut out = vec![(String::new(), FinishReason::Length, 0); n];
    let mut done = 0;
    while done < n {
        match rx.recv().expect("engine answers") {
            Event::Delta { choice, text, .. } => out[choice].0.push_str(&text),
            Event::Done { choice, finish, completion_tokens, .. } => {
                out[choice].1 = finish;
                out[choice].2 = completion_tokens;
                done += 1;
            }
            Event::PromptLogprobs(_) => {}
            Event::Error(e) | Event::Cancelled(e) => panic!("engine error: {e}"),
        }
    }
    out
}

fn run(e: &EngineHandle, req: GenRequest) -> Vec<(String, FinishReason, usize)> {
    let n = req.n;
    let (tx, rx) = mpsc::channel();
    e.submit(req, Box::new(tx)).unwrap();
    collect(rx, n)
}

const QUESTIONS: [&str; 16] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "List three prime numbers.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "My name is Ada. What is my name?",
    "Name a famous painter.",
    "Why is the sky blue?",
    "Give me a word that rhymes with cat.",
    "What is the largest planet?",
    "Describe a cat in one sentence.",
    "What do bees make?",
    "Suggest a name for a dog.",
    "What is the boiling point of water in Celsius? Answer with the number and a short explanation of why it changes with altitude, please.",
];

#[test]
fn sixteen_concurrent_requests_return_what_they_return_alone() {
    let m = model();
    // A small step budget forces chunked prefills mixed with decodes.
    let e = engine(48);
    let reqs: Vec<GenRequest> = QUESTIONS.iter().map(|q| greedy(chat_ids(&m, q), 40)).collect();
    let alone: Vec<_> = reqs.iter().map(|r| run(&e, r.clone())).collect();
    let receivers: Vec<_> = reqs
        .iter()
        .map(|r| {
            let (tx, rx) = mpsc::channel();
            e.submit(r.clone(), Box::new(tx)).unwrap();
            rx
        })
        .collect();
    let together: Vec<_> = receivers.into_iter().map(|rx| collect(rx, 1)).collect();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i} ({}) changed when batched", QUESTIONS[i]);
    }
    assert!(e.stats.steps.load(Ordering::Relaxed) > 0);
}

#[test]
fn shared_prefix_is_reused_and_gives_the_same_answer() {
    let m = model();
    let e = engine(384);
    let text = std::fs::read_to_string(smollm_fixtures().join("ppl_text.txt")).unwrap();
    let history = m.tokenizer.encode(&text, false).unwrap()[..1000].to_vec();
    let mut a = history.clone();
    a.extend(chat_ids(&m, "Summarise this."));
    let cold_hits = e.stats.prefix_hit_tokens.load(Ordering::Relaxed);
    let first = run(&e, greedy(a.clone(), 8));
    assert_eq!(e.stats.prefix_hit_tokens.load(Ordering::Relaxed), cold_hits, "a cold prompt has no hits");
    // Same prompt again: everything but the last partial block comes from the cache.
    let again = run(&e, greedy(a.clone(), 8));
    assert_eq!(first, again);
    let hits = e.stats.prefix_hit_tokens.load(Ordering::Relaxed) - cold_hits;
    assert!(hits as usize >= (a.len() - 1) / 16 * 16 && hits >= 992, "only {hits} of {} prompt tokens reused", a.len());
    // A different question after the same 1000-token history reuses the history.
    let before = e.stats.prefix_hit_tokens.load(Ordering::Relaxed);
    let mut b = history.clone();
    b.extend(chat_ids(&m, "What is this about?"));
    run(&e, greedy(b, 4));
    assert!(e.stats.prefix_hit_tokens.load(Ordering::Relaxed) - before >= 992);
}

#[test]
fn n_choices_share_the_prompt_and_seeds_reproduce() {
    let m = model();
    let e = engine(384);
    let prompt = chat_ids(&m, "Tell me a story about a dragon and a knight who become friends.");
    let req = GenRequest {
        n: 3,
        sampling: SamplingParams { temperature: 1.0, top_p: 0.95, top_k: 0, seed: 11 },
        ignore_eos: true,
        ..greedy(prompt.clone(), 12)
    };
    let before = e.stats.prefix_hit_tokens.load(Ordering::Relaxed);
    let a = run(&e, req.clone());
    let shared = e.stats.prefix_hit_tokens.load(Ordering::Relaxed) - before;
    assert!(shared >= 2 * ((prompt.len() - 1) / 16 * 16) as u64, "forks recomputed the prompt ({shared} hits)");
    assert!(a.iter().all(|c| c.2 == 12 && c.1 == FinishReason::Length));
    let b = run(&e, req);
    assert_eq!(a, b, "same seed, same samples");
    assert!(a[0].0 != a[1].0 || a[1].0 != a[2].0, "choices are sampled independently");
}

#[test]
fn cancelled_requests_free_their_blocks() {
    let m = model();
    let e = engine(384);
    for _ in 0..3 {
        let (tx, rx) = mpsc::channel();
        e.submit(GenRequest { ignore_eos: true, ..greedy(chat_ids(&m, "Count to one thousand."), 2000) }, Box::new(tx))
            .unwrap();
        // Wait for a few tokens, then leave.
        let mut seen = 0;
        while seen < 3 {
            if let Event::Delta { .. } = rx.recv().unwrap() {
                seen += 1;
            }
        }
        drop(rx);
    }
    // The engine notices at its next step and the next request runs normally.
    let out = run(&e, greedy(chat_ids(&m, "What is the capital of France?"), 4));
    assert_eq!(out[0].2, 4);
    assert_eq!(e.stats.requests_cancelled.load(Ordering::Relaxed), 3);
    // Gauges are published after the step that sent the last event.
    let settled = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(5));
        e.stats.running.load(Ordering::Relaxed) == 0
    });
    assert!(settled, "sequences still running");
    assert_eq!(e.stats.kv_blocks_used.load(Ordering::Relaxed), 0, "blocks leaked");
}
