//! Constrained decoding on the default model: whatever the sampler draws, the output follows the
//! grammar; a lazy constraint leaves text alone until its trigger appears.

mod common;

use common::*;
use std::sync::{mpsc, Arc, OnceLock};
use taipan_engine::engine::start;
use taipan_engine::{
    Constraint, EngineConfig, EngineHandle, Event, FinishReason, GenRequest, GrammarCompiler, SamplingParams,
};
use taipan_model::{LoadOptions, Model};

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    Arc::clone(M.get_or_init(|| Arc::new(Model::load(&default_model(), LoadOptions::default()).expect("model loads"))))
}

fn compiler() -> Arc<GrammarCompiler> {
    static C: OnceLock<Arc<GrammarCompiler>> = OnceLock::new();
    let m = model();
    Arc::clone(C.get_or_init(|| Arc::new(GrammarCompiler::new(&m.tokenizer, m.vocab_size()).expect("trie builds"))))
}

fn engine() -> EngineHandle {
    start(
        model(),
        EngineConfig {
            threads: 2,
            max_queue: 256,
            kv_cache_bytes: 256 << 20,
            block_size: 16,
            max_batch_tokens: 384,
            max_running: 32,
        },
    )
    .expect("engine starts")
}

fn constraint(lark: &str, triggers: &[&str]) -> Constraint {
    let c = compiler();
    Constraint {
        grammar: Arc::new(c.compile(lark).expect("grammar compiles")),
        triggers: triggers.iter().map(|t| t.to_string()).collect(),
        compiler: c,
    }
}

fn sampled(prompt: Vec<u32>, max_tokens: usize, seed: u64, c: &Constraint) -> GenRequest {
    let mut r = GenRequest::new(prompt, max_tokens);
    r.sampling = SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed };
    r.constraint = Some(c.clone());
    r
}

fn collect(rx: mpsc::Receiver<Event>) -> (String, FinishReason) {
    let mut text = String::new();
    loop {
        match rx.recv().expect("engine answers") {
            Event::Delta { text: t, .. } => text.push_str(&t),
            Event::Done { finish, .. } => return (text, finish),
            Event::PromptLogprobs(_) => {}
            Event::Error(e) | Event::Cancelled(e) => panic!("engine error: {e}"),
        }
    }
}

/// Byte-level BPE tokens spell their text byte for byte (the grammar matches these bytes).
#[test]
fn token_bytes_spell_the_encoded_text() {
    let m = model();
    let bytes = m.tokenizer.token_bytes();
    let text = "Hello, wörld! 😀\n\t{\"a\": [1, 2.5e-3]}  ";
    let ids = m.tokenizer.encode(text, false).unwrap();
    let spelled: Vec<u8> = ids.iter().flat_map(|&i| bytes[i as usize].clone()).collect();
    assert_eq!(spelled, text.as_bytes());
    let im_end = m.tokenizer.token_id("<|im_end|>").unwrap();
    assert_eq!(bytes[im_end as usize], b"\xFF<|im_end|>");
    // One token's own bytes (what logprobs report): exact where a token holds part of a
    // character, which decoding the token alone turns into U+FFFD.
    for (id, b) in bytes.iter().enumerate() {
        let own = m.tokenizer.bytes_of(id as u32);
        assert_eq!(&own[..], b.strip_prefix(b"\xFF").unwrap_or(b), "token {id}");
    }
    let emoji_ids = m.tokenizer.encode("😀", false).unwrap();
    assert!(emoji_ids.len() > 1, "the emoji is split: {emoji_ids:?}");
    let joined: Vec<u8> = emoji_ids.iter().flat_map(|&i| m.tokenizer.bytes_of(i)).collect();
    assert_eq!(joined, "😀".as_bytes());
    assert!(emoji_ids.iter().any(|&i| m.tokenizer.decode(&[i], false).unwrap().contains('\u{FFFD}')));
}

const OBJECT: &str = r#"start: %json {"x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}, "type": "object"}"#;

/// Sampled at temperature 1 with budgets from tight to roomy, every answer is one JSON object:
/// near the end of its budget the output is steered to close what it opened.
#[test]
fn sampled_json_objects_always_parse() {
    let e = engine();
    let c = constraint(OBJECT, &[]);
    let prompts = ["Describe a cat.", "Give me a user profile.", "What is the weather like?", "List two fruits."];
    let budgets = [12, 24, 40, 64, 200];
    let rxs: Vec<_> = (0..20)
        .map(|i| {
            let (tx, rx) = mpsc::channel();
            let req = sampled(chat_ids(&model(), prompts[i % prompts.len()]), budgets[i % budgets.len()], i as u64, &c);
            e.submit(req, Box::new(tx)).unwrap();
            rx
        })
        .collect();
    for rx in rxs {
        let (text, finish) = collect(rx);
        assert_eq!(finish, FinishReason::Stop, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v.is_object(), "{text}");
    }
}

/// A lazy constraint changes nothing before its trigger and everything after it.
#[test]
fn lazy_constraint_starts_at_its_trigger() {
    let e = engine();
    let prompt = chat_ids(&model(), "What is the capital of France?");
    let free = {
        let (tx, rx) = mpsc::channel();
        e.submit(GenRequest::new(prompt.clone(), 12), Box::new(tx)).unwrap();
        collect(rx).0
    };
    // The first word ends where a token ends (the next one starts with its space).
    let first_word = &free[..free.find(' ').expect("several words")];
    let c = constraint(r#"start: " Atlantis, of course.""#, &[first_word]);
    let mut req = GenRequest::new(prompt.clone(), 40);
    req.constraint = Some(c);
    let (tx, rx) = mpsc::channel();
    e.submit(req, Box::new(tx)).unwrap();
    let (text, finish) = collect(rx);
    assert_eq!(text, format!("{first_word} Atlantis, of course."));
    assert_eq!(finish, FinishReason::Stop);

    // Two triggers are waited for in order (as `</think>` and then a tool call's tag are): the
    // grammar starts after the second word; asked for in the other order, it never starts.
    let second_word = free[first_word.len() + 1..].split(' ').next().expect("a second word");
    let run = |triggers: &[&str], max_tokens| {
        let mut req = GenRequest::new(prompt.clone(), max_tokens);
        req.constraint = Some(constraint(r#"start: " Atlantis, of course.""#, triggers));
        let (tx, rx) = mpsc::channel();
        e.submit(req, Box::new(tx)).unwrap();
        collect(rx)
    };
    let (text, finish) = run(&[first_word, second_word], 40);
    assert_eq!(text, format!("{first_word} {second_word} Atlantis, of course."));
    assert_eq!(finish, FinishReason::Stop);
    assert_eq!(run(&[second_word, first_word], 12).0, free, "out of order, the text stays free");
}

/// Text after a lazy grammar's trigger that does not fit the grammar ends the sequence with an
/// error: never a `stop`, never an answer that carries on unconstrained.
#[test]
fn output_that_breaks_its_grammar_fails_loudly() {
    use taipan_engine::output::{OutputParams, SeqOutput};
    let m = model();
    // One token that holds the trigger "(" and then ")", which the digits grammar refuses.
    let ids = m.tokenizer.encode("()", false).expect("tokenizes");
    assert_eq!(ids.len(), 1, "the fixture needs \"()\" to be one token: {ids:?}");
    let mut out = SeqOutput::new(OutputParams {
        sampling: SamplingParams::default(),
        max_tokens: 8,
        min_tokens: 0,
        ignore_eos: false,
        stop: vec![],
        logprobs: None,
        special_text: false,
        constraint: Some(constraint(r#"start: /[0-9]+/"#, &["("])),
        thinking_budget: None,
    });
    let mut logits = vec![0f32; m.vocab_size()];
    logits[ids[0] as usize] = 50.0;
    let emitted = out.next(&mut logits, &m.tokenizer, 100);
    let err = emitted.error.expect("the grammar failure is reported");
    assert!(err.to_string().contains("does not fit the grammar"), "{err}");
    assert_eq!(emitted.finish, None);
    assert!(emitted.text.is_empty(), "no text of a broken answer is shown: {:?}", emitted.text);
}
