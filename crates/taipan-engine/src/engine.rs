//! The engine thread: takes generation requests from a bounded queue, runs them on the model, and
//! sends each request its events.
//!
//! Requests run one at a time in arrival order (continuous batching replaces this loop later;
//! the request and event types are already what a batching scheduler needs). A request whose
//! receiver is gone is dropped at the next token, freeing the engine for the next one.

use crate::detokenizer::IncrementalDecoder;
use crate::generate::FinishReason;
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;
use taipan_kernels::ops::log_softmax;
use taipan_kernels::Compute;
use taipan_model::{Model, Scratch};

/// One generation request, already validated and tokenized.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// Independent samples from the same prompt (the prompt is run once).
    pub n: usize,
    pub max_tokens: usize,
    /// Stop tokens are ignored until this many tokens were generated.
    pub min_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Report the chosen token's log-probability and this many alternatives per step.
    pub logprobs: Option<usize>,
    /// Report log-probabilities of the prompt tokens (with this many alternatives).
    pub prompt_logprobs: Option<usize>,
}

/// A token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What a request hears back.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text of one choice (may be empty when only logprobs advance).
    Delta { choice: usize, text: String, logprobs: Vec<TokenLogprob> },
    /// A choice ended.
    Done { choice: usize, finish: FinishReason, completion_tokens: usize },
    /// Log-probabilities of the prompt tokens (the first has none).
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// The request failed; no more events follow.
    Error(String),
}

/// Where a request's events go. `send` returns false once nobody listens.
pub trait EventSink: Send {
    fn send(&mut self, event: Event) -> bool;
    /// Whether the listener is still there (checked between tokens).
    fn alive(&self) -> bool {
        true
    }
}

impl EventSink for mpsc::Sender<Event> {
    fn send(&mut self, event: Event) -> bool {
        mpsc::Sender::send(self, event).is_ok()
    }
}

/// Counters the server exports as metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub requests_finished: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Sum of times to first token, microseconds.
    pub ttft_us_sum: AtomicU64,
    pub ttft_count: AtomicU64,
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

struct Job {
    request: GenRequest,
    sink: Box<dyn EventSink>,
    received: Instant,
}

/// A cheap handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    max_queue: usize,
    pub stats: Arc<EngineStats>,
    pub model: Arc<Model>,
}

impl EngineHandle {
    /// Queues a request; its events go to `sink`.
    pub fn submit(&self, request: GenRequest, sink: Box<dyn EventSink>) -> Result<(), SubmitError> {
        let queued = self.stats.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.max_queue {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(queued));
        }
        self.tx.send(Job { request, sink, received: Instant::now() }).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }
}

/// Starts the engine thread for `model`, with `threads` compute threads and room for
/// `max_queue` waiting requests. The thread ends when every handle is dropped.
pub fn start(model: Arc<Model>, threads: usize, max_queue: usize) -> EngineHandle {
    let (tx, rx) = mpsc::channel::<Job>();
    let stats = Arc::new(EngineStats::default());
    let handle = EngineHandle { tx, max_queue: max_queue.max(1), stats: Arc::clone(&stats), model: Arc::clone(&model) };
    std::thread::Builder::new()
        .name("taipan-engine".into())
        .spawn(move || {
            let compute = Compute::new(threads);
            let mut runner = Runner { model, compute, scratch: Scratch::default(), stats };
            while let Ok(job) = rx.recv() {
                runner.stats.queued.fetch_sub(1, Ordering::SeqCst);
                runner.stats.running.fetch_add(1, Ordering::SeqCst);
                runner.run(job);
                runner.stats.running.fetch_sub(1, Ordering::SeqCst);
            }
        })
        .expect("spawning the engine thread");
    handle
}

struct Runner {
    model: Arc<Model>,
    compute: Compute,
    scratch: Scratch,
    stats: Arc<EngineStats>,
}

fn token_logprob(logprobs: &[f32], id: u32, top: usize) -> TokenLogprob {
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

impl Runner {
    fn run(&mut self, mut job: Job) {
        if !job.sink.alive() {
            self.stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let req = &job.request;
        let model = Arc::clone(&self.model);
        let vocab = model.vocab_size();
        let mut state = model.new_state();
        let all = req.prompt_logprobs.is_some();
        if let Err(e) = model.forward(&self.compute, &req.prompt, &mut state, &mut self.scratch, all) {
            job.sink.send(Event::Error(e.to_string()));
            return;
        }
        self.stats.prompt_tokens.fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
        let logits = self.scratch.logits();
        let first_logits = logits[logits.len() - vocab..].to_vec();
        if let Some(top) = req.prompt_logprobs {
            let mut lp = vec![0f32; vocab];
            let mut out = vec![None];
            for (pos, &next) in req.prompt.iter().enumerate().skip(1) {
                log_softmax(&mut lp, &logits[(pos - 1) * vocab..pos * vocab]);
                out.push(Some(token_logprob(&lp, next, top)));
            }
            if !job.sink.send(Event::PromptLogprobs(out)) {
                self.stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut first_token = true;
        for choice in 0..req.n.max(1) {
            let st = if choice + 1 < req.n { state.clone() } else { std::mem::replace(&mut state, model.new_state()) };
            let params = SamplingParams { seed: req.sampling.seed.wrapping_add(choice as u64), ..req.sampling };
            let outcome = self.run_choice(
                &job.request,
                choice,
                st,
                &first_logits,
                params,
                &mut *job.sink,
                &mut first_token,
                job.received,
            );
            match outcome {
                Ok(true) => {}
                Ok(false) => {
                    self.stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    job.sink.send(Event::Error(e));
                    return;
                }
            }
        }
        self.stats.requests_finished.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs one choice to its end. `Ok(false)` means the listener left.
    #[allow(clippy::too_many_arguments)]
    fn run_choice(
        &mut self,
        req: &GenRequest,
        choice: usize,
        mut state: taipan_model::SeqState,
        first_logits: &[f32],
        params: SamplingParams,
        sink: &mut dyn EventSink,
        first_token: &mut bool,
        received: Instant,
    ) -> Result<bool, String> {
        let model = Arc::clone(&self.model);
        let tok = &model.tokenizer;
        let stop_ids = &tok.specials.stop_ids;
        let mut sampler = Sampler::new(params);
        let mut detok = IncrementalDecoder::new(true);
        let mut stops = StopMatcher::new(req.stop.clone());
        let mut logits = first_logits.to_vec();
        let mut lp = vec![0f32; logits.len()];
        let mut generated = 0usize;
        let mut matched_stop_string = false;
        let finish;
        loop {
            if generated >= req.max_tokens {
                finish = FinishReason::Length;
                break;
            }
            if !sink.alive() {
                return Ok(false);
            }
            if generated < req.min_tokens {
                for &s in stop_ids {
                    if let Some(l) = logits.get_mut(s as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let next = sampler.sample(&logits);
            generated += 1;
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if *first_token {
                *first_token = false;
                self.stats.ttft_us_sum.fetch_add(received.elapsed().as_micros() as u64, Ordering::Relaxed);
                self.stats.ttft_count.fetch_add(1, Ordering::Relaxed);
            }
            let logprobs = match req.logprobs {
                Some(top) => {
                    log_softmax(&mut lp, &logits);
                    vec![token_logprob(&lp, next, top)]
                }
                None => vec![],
            };
            let is_stop_token = !req.ignore_eos && stop_ids.contains(&next);
            if is_stop_token {
                if !logprobs.is_empty() && !sink.send(Event::Delta { choice, text: String::new(), logprobs }) {
                    return Ok(false);
                }
                finish = FinishReason::Stop;
                break;
            }
            let piece = detok.push(tok, next);
            let check = stops.push(&piece);
            if (!check.emit.is_empty() || !logprobs.is_empty())
                && !sink.send(Event::Delta { choice, text: check.emit, logprobs })
            {
                return Ok(false);
            }
            if check.stopped {
                matched_stop_string = true;
                finish = FinishReason::Stop;
                break;
            }
            if generated >= req.max_tokens || state.len() + 1 > model.context_length() {
                finish = FinishReason::Length;
                break;
            }
            model.forward(&self.compute, &[next], &mut state, &mut self.scratch, false).map_err(|e| e.to_string())?;
            logits.copy_from_slice(self.scratch.logits());
        }
        if !matched_stop_string {
            // Release text held back for a stop string that never completed.
            let rest = detok.flush(tok);
            let check = stops.push(&rest);
            let mut tail = check.emit;
            if !check.stopped {
                tail.push_str(&stops.flush());
            }
            if !tail.is_empty() && !sink.send(Event::Delta { choice, text: tail, logprobs: vec![] }) {
                return Ok(false);
            }
        }
        Ok(sink.send(Event::Done { choice, finish, completion_tokens: generated }))
    }
}
