//! A thinking model (jamba-tiny-dense: its generation prompt opens `<think>`): a thinking budget
//! closes the block after that many tokens, and a grammar waiting for the end of the thinking
//! constrains the answer and nothing before it.

mod common;

use common::*;
use std::sync::{mpsc, Arc, OnceLock};
use taipan_engine::engine::start;
use taipan_engine::output::ThinkingBudget;
use taipan_engine::{Constraint, EngineConfig, EngineHandle, Event, FinishReason, GenRequest, GrammarCompiler};
use taipan_engine::{SamplingParams, TokenLogprob};
use taipan_model::{LoadOptions, Model};

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    Arc::clone(M.get_or_init(|| {
        Arc::new(Model::load(&fixtures_dir().join("jamba-tiny-dense.gguf"), LoadOptions::default()).expect("loads"))
    }))
}

fn engine() -> EngineHandle {
    start(model(), EngineConfig { threads: 2, kv_cache_bytes: 16 << 20, ..Default::default() }).expect("starts")
}

fn close_id() -> u32 {
    model().tokenizer.token_id("</think>").expect("</think> is a token")
}

/// Text and token ids of one choice.
fn collect(rx: mpsc::Receiver<Event>) -> (String, Vec<u32>, FinishReason) {
    let (mut text, mut ids) = (String::new(), Vec::new());
    loop {
        match rx.recv().expect("engine answers") {
            Event::Delta { text: t, logprobs, .. } => {
                text.push_str(&t);
                ids.extend(logprobs.iter().map(|l: &TokenLogprob| l.id));
            }
            Event::Done { finish, .. } => return (text, ids, finish),
            Event::PromptLogprobs(_) => {}
            Event::Error(e) | Event::Cancelled(e) => panic!("engine error: {e}"),
        }
    }
}

fn request(budget: Option<usize>, constraint: Option<Constraint>, seed: u64, max_tokens: usize) -> GenRequest {
    let m = model();
    let mut r = GenRequest::new(chat_ids(&m, "What is 2+2?"), max_tokens);
    r.sampling = SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed };
    r.logprobs = Some(0);
    r.thinking_budget = budget.map(|tokens| ThinkingBudget { tokens, close: close_id() });
    r.constraint = constraint;
    r
}

fn run(e: &EngineHandle, r: GenRequest) -> (String, Vec<u32>, FinishReason) {
    let (tx, rx) = mpsc::channel();
    e.submit(r, Box::new(tx)).expect("queued");
    collect(rx)
}

#[test]
fn the_prompt_opens_thinking() {
    let m = model();
    let ids = chat_ids(&m, "Hi");
    let think = m.tokenizer.token_id("<think>").expect("<think> is a token");
    // `<think>`, then the newline (SentencePiece's legacy mode puts a `▁` piece between).
    assert!(ids.iter().rev().take(3).any(|&t| t == think), "{ids:?}");
}

/// The random model practically never closes its thinking by itself; a budget of k closes it as
/// token k + 1, and a model that closed it earlier is left alone.
#[test]
fn a_budget_closes_the_thinking_after_that_many_tokens() {
    let e = engine();
    for (k, seed) in [(0, 1), (3, 2), (9, 3)] {
        let (_, ids, _) = run(&e, request(Some(k), None, seed, 16));
        assert_eq!(ids.iter().position(|&t| t == close_id()), Some(k), "budget {k}: {ids:?}");
        assert_eq!(ids.iter().filter(|&&t| t == close_id()).count(), 1, "closed once: {ids:?}");
    }
    let (_, free, _) = run(&e, request(None, None, 4, 16));
    assert!(!free.contains(&close_id()), "without a budget the thinking runs on: {free:?}");
}

/// JSON mode behind the thinking: the thinking is free text (no JSON in it), the answer after
/// `</think>` is a complete JSON object.
#[test]
fn a_grammar_after_the_thinking_constrains_only_the_answer() {
    let m = model();
    let compiler = Arc::new(GrammarCompiler::new(&m.tokenizer, m.vocab_size()).expect("trie"));
    let grammar = Arc::new(compiler.compile(r#"start: %json {"type": "object", "minProperties": 1}"#).unwrap());
    let constraint = Constraint { grammar, triggers: vec!["</think>".into()], compiler };
    let e = engine();
    for seed in 1..=4 {
        let (text, _, finish) = run(&e, request(Some(6), Some(constraint.clone()), seed, 120));
        let (thinking, answer) = text.split_once("</think>").expect("the thinking closed");
        assert!(serde_json::from_str::<serde_json::Value>(thinking.trim()).is_err(), "{thinking:?}");
        let v: serde_json::Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
        assert!(v.as_object().is_some_and(|o| !o.is_empty()), "{answer}");
        assert_eq!(finish, FinishReason::Stop, "{text}");
    }
    // Cut inside the thinking: the budget never came, no grammar ever applied.
    let (text, _, finish) = run(&e, request(Some(50), Some(constraint), 5, 10));
    assert!(!text.contains("</think>"), "{text}");
    assert_eq!(finish, FinishReason::Length);
}
