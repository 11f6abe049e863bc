//! Failure isolation of the engine, with faults injected through requests: a panic in one
//! request's own part of a step fails that request alone; a panic in the batched forward pass
//! fails that batch and the engine goes on; a bad token id is refused alone; a dead engine says so.

mod common;

use common::*;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};
use taipan_engine::engine::start;
use taipan_engine::{EngineConfig, EngineHandle, Event, Fault, GenRequest, SubmitError};
use taipan_model::{LoadOptions, Model};

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    Arc::clone(M.get_or_init(|| Arc::new(Model::load(&default_model(), LoadOptions::default()).expect("model loads"))))
}

fn engine() -> EngineHandle {
    start(
        model(),
        EngineConfig {
            threads: 2,
            max_queue: 64,
            kv_cache_bytes: 64 << 20,
            block_size: 16,
            max_batch_tokens: 256,
            max_running: 16,
        },
    )
    .expect("engine starts")
}

fn prompt(text: &str) -> Vec<u32> {
    model().tokenizer.encode(text, false).expect("tokenizes")
}

/// The text of a one-choice request, or its error.
fn outcome(rx: mpsc::Receiver<Event>) -> Result<String, String> {
    let mut text = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)).expect("the engine answers") {
            Event::Delta { text: t, .. } => text.push_str(&t),
            Event::Done { .. } => return Ok(text),
            Event::PromptLogprobs(_) => {}
            Event::Error(e) | Event::Cancelled(e) => return Err(e),
        }
    }
}

fn submit(e: &EngineHandle, req: GenRequest) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel();
    e.submit(req, Box::new(tx)).expect("queued");
    rx
}

const PROMPTS: [&str; 4] = ["The capital of France is", "One, two, three,", "Bees make", "The sky is blue because"];

fn alone(e: &EngineHandle) -> Vec<String> {
    PROMPTS.iter().map(|p| outcome(submit(e, GenRequest::new(prompt(p), 12))).expect("succeeds")).collect()
}

#[test]
fn a_panic_in_one_sequence_fails_that_request_only() {
    let e = engine();
    let want = alone(&e);
    // All five run in the same steps; the faulty one panics in its output processing.
    let faulty = submit(&e, GenRequest { fault: Some(Fault::PanicInSequence), ..GenRequest::new(prompt("Hello"), 12) });
    let others: Vec<_> = PROMPTS.iter().map(|p| submit(&e, GenRequest::new(prompt(p), 12))).collect();
    let err = outcome(faulty).expect_err("the faulty request fails");
    assert!(err.contains("internal error") && err.contains("injected fault"), "{err}");
    let got: Vec<String> = others.into_iter().map(|rx| outcome(rx).expect("the others succeed")).collect();
    assert_eq!(got, want, "neighbours of the failed request answered differently");
    assert!(e.is_running());
    assert_eq!(e.stats.internal_errors.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn a_panic_in_the_forward_pass_fails_its_batch_and_the_engine_goes_on() {
    let e = engine();
    let want = alone(&e);
    let faulty = submit(&e, GenRequest { fault: Some(Fault::PanicInForward), ..GenRequest::new(prompt("Hello"), 12) });
    let err = outcome(faulty).expect_err("the faulty request fails");
    assert!(err.contains("internal error in the forward pass"), "{err}");
    assert!(e.is_running());
    // The engine serves on, with the same answers as before (the failed batch left no trace).
    assert_eq!(alone(&e), want);
    // Everything was freed: the running count (published after each step) returns to 0.
    let t = Instant::now();
    while e.stats.running.load(std::sync::atomic::Ordering::Relaxed) != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "sequences still running");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_token_id_outside_the_model_is_refused_alone() {
    let e = engine();
    let vocab = model().vocab_size() as u32;
    let bad = submit(&e, GenRequest::new(vec![1, 2, vocab + 5], 4));
    let good = submit(&e, GenRequest::new(prompt(PROMPTS[0]), 4));
    let err = outcome(bad).expect_err("refused");
    assert!(err.contains(&format!("token id {}", vocab + 5)), "{err}");
    assert!(outcome(good).is_ok());
}

#[test]
fn a_dead_engine_says_so() {
    let e = engine();
    let rx = submit(&e, GenRequest { fault: Some(Fault::KillEngine), ..GenRequest::new(prompt("Hello"), 4) });
    // The request's listener is dropped with the thread: no answer, no hang.
    assert!(rx.recv_timeout(Duration::from_secs(30)).is_err());
    let t = Instant::now();
    while e.is_running() {
        assert!(t.elapsed() < Duration::from_secs(10), "the engine is still reported running");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (tx, _rx) = mpsc::channel();
    assert_eq!(e.submit(GenRequest::new(prompt("Hello"), 4), Box::new(tx)), Err(SubmitError::Stopped));
}

#[test]
fn cancelling_everything_ends_running_and_later_requests_with_a_reason() {
    let e = engine();
    let long = GenRequest { ignore_eos: true, ..GenRequest::new(prompt("Count to a million:"), 4000) };
    let running = submit(&e, long);
    // Wait until it produces text, so that it is running, not queued.
    loop {
        if let Event::Delta { .. } = running.recv_timeout(Duration::from_secs(60)).expect("it runs") {
            break;
        }
    }
    e.cancel_everything();
    let reason = loop {
        match running.recv_timeout(Duration::from_secs(60)).expect("the engine answers") {
            Event::Cancelled(reason) => break reason,
            Event::Delta { .. } => {}
            other => panic!("expected a cancellation, got {other:?}"),
        }
    };
    assert_eq!(reason, "the server is shutting down");
    let later = submit(&e, GenRequest::new(prompt("Hello"), 4));
    assert!(matches!(later.recv_timeout(Duration::from_secs(60)), Ok(Event::Cancelled(_))));
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.stats.running.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "everything is freed");
        std::thread::sleep(Duration::from_millis(5));
    }
}
