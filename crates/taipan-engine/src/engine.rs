//! The engine thread: continuous batching of every architecture, in three parts.
//!
//! Each step: take new requests, drop those whose client left, let the [`Scheduler`] plan the
//! step (admission, tokens per sequence, blocks and state slots, preemption), let the
//! [`ModelRunner`] run ONE forward pass over every scheduled sequence — one token for those
//! decoding, a chunk of prompt for those prefilling — and turn each finished row of logits into
//! a token and text with the sequence's [`SeqOutput`]; then send each request its events.
//!
//! A request with `n > 1` runs its first choice alone until the prompt is done; the other
//! choices are then admitted and find the prompt in the prefix cache (or, for recurrent models,
//! a state saved one token before the prompt's end), so the prompt is computed once.

use crate::constraint::Constraint;
use crate::generate::FinishReason;
pub use crate::metrics::EngineStats;
pub use crate::output::TokenLogprob;
use crate::output::{token_logprob, OutputParams, SeqOutput};
use crate::runner::ModelRunner;
use crate::sampler::SamplingParams;
use crate::scheduler::{BudgetError, MemoryPlan, NewSeq, Scheduler, SchedulerConfig, SchedulerOutput, SeqId};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use taipan_kernels::ops::log_softmax;
use taipan_model::{Logits, Model};

/// One generation request, already validated and tokenized.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// Independent samples from the same prompt (the prompt is computed once).
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
    /// Prompt positions (e.g. chat-message boundaries) where a recurrent model's state is saved
    /// for reuse by later prompts that share the prefix.
    pub snapshot_at: Vec<usize>,
    /// A grammar the output must follow (JSON mode, tool calls).
    pub constraint: Option<Constraint>,
    /// Decode special tokens as their text (a tool-call tag may be one).
    pub special_text: bool,
    /// The prompt opened a thinking block that must close within this budget.
    pub thinking_budget: Option<crate::output::ThinkingBudget>,
    /// A fault to inject while this request runs (tests of the engine's isolation only; the
    /// server honours it only when started with fault injection enabled).
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// Faults a test can inject into the engine through a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A panic in this request's own part of a step (its output processing): it fails alone.
    PanicInSequence,
    /// A panic inside the batched forward pass: every request in that batch fails.
    PanicInForward,
    /// A panic outside any isolation: the engine thread dies.
    KillEngine,
}

impl GenRequest {
    /// One greedy choice of at most `max_tokens` tokens; every other setting at its default.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        GenRequest {
            prompt,
            n: 1,
            max_tokens,
            min_tokens: 0,
            sampling: SamplingParams::default(),
            stop: vec![],
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            snapshot_at: vec![],
            constraint: None,
            special_text: false,
            thinking_budget: None,
            fault: None,
        }
    }
}

/// What a request hears back.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text of one choice (may be empty when only logprobs advance).
    Delta { choice: usize, text: String, logprobs: Vec<TokenLogprob> },
    /// A choice ended. `cached_tokens`: prompt tokens the request's first admission took from the
    /// prefix cache or a saved state instead of computing them.
    Done { choice: usize, finish: FinishReason, completion_tokens: usize, cached_tokens: usize },
    /// Log-probabilities of the prompt tokens (the first has none).
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// The request failed; no more events follow.
    Error(String),
    /// The engine ended the request, not for anything in it (the server is shutting down); no
    /// more events follow.
    Cancelled(String),
}

/// Where a request's events go. `send` returns false once nobody listens.
pub trait EventSink: Send {
    fn send(&mut self, event: Event) -> bool;
    /// Whether the listener is still there (checked every step).
    fn alive(&self) -> bool {
        true
    }
}

impl EventSink for mpsc::Sender<Event> {
    fn send(&mut self, event: Event) -> bool {
        mpsc::Sender::send(self, event).is_ok()
    }
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub threads: usize,
    /// Requests that may wait for admission before new ones are refused.
    pub max_queue: usize,
    /// Bytes for attention KV blocks, recurrent-state slots and saved states together
    /// (allocated once at start-up).
    pub kv_cache_bytes: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Tokens one step may run (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            max_queue: 64,
            kv_cache_bytes: default_kv_cache_bytes(),
            block_size: 16,
            max_batch_tokens: 384,
            max_running: 64,
        }
    }
}

/// A quarter of the memory available now, at most 2 GiB (at least 64 MiB).
pub fn default_kv_cache_bytes() -> usize {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30);
    (available / 4).clamp(64 << 20, 2 << 30)
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
    /// How the memory budget was split; `memory.context` is the longest sequence it holds.
    pub memory: MemoryPlan,
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

    /// Cancels every request in flight, and every later one, with [`Event::Cancelled`]: for a
    /// shutdown whose grace period ran out, so that each client hears why its answer stopped.
    pub fn cancel_everything(&self) {
        self.stats.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether the engine thread still runs (false once it died; nothing is served after that).
    pub fn is_running(&self) -> bool {
        !self.stats.stopped.load(Ordering::SeqCst)
    }

    /// The longest prompt plus answer the engine can hold: the model's context, or less when the
    /// memory budget holds less.
    pub fn context_limit(&self) -> usize {
        self.memory.context
    }
}

/// Starts the engine thread for `model`, with its pools allocated once from the memory budget.
/// The thread ends when every handle is dropped.
pub fn start(model: Arc<Model>, config: EngineConfig) -> Result<EngineHandle, BudgetError> {
    let spec = model.cache_spec();
    let memory = MemoryPlan::new(&spec, config.kv_cache_bytes, config.block_size, config.max_running)?;
    let (tx, rx) = mpsc::channel::<Job>();
    let stats = Arc::new(EngineStats::default());
    stats.kv_blocks_total.store(memory.blocks, Ordering::Relaxed);
    stats.state_slots_total.store(memory.slots, Ordering::Relaxed);
    let handle = EngineHandle {
        tx,
        max_queue: config.max_queue.max(1),
        stats: Arc::clone(&stats),
        model: Arc::clone(&model),
        memory,
    };
    let scheduler = Scheduler::new(SchedulerConfig {
        memory,
        max_batch_tokens: config.max_batch_tokens.max(1),
        max_running: config.max_running.max(1),
        recurrent: spec.is_recurrent(),
    });
    let runner = ModelRunner::new(Arc::clone(&model), config.threads, &memory);
    std::thread::Builder::new()
        .name("taipan-engine".into())
        .spawn(move || {
            let _mark = MarkStopped(Arc::clone(&stats));
            Engine::new(model, scheduler, runner, stats).run(rx)
        })
        .expect("spawning the engine thread");
    Ok(handle)
}

/// Marks the engine stopped when its thread ends, by return or by panic.
struct MarkStopped(Arc<EngineStats>);

impl Drop for MarkStopped {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::SeqCst);
    }
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A request in flight: its listener and the choices still running.
struct RequestState {
    sink: Box<dyn EventSink>,
    request: Arc<GenRequest>,
    received: Instant,
    /// Its sequences, by choice.
    seqs: Vec<SeqId>,
    choices_left: usize,
    /// Choices 1..n are queued once choice 0 has computed the prompt.
    forked: bool,
    /// Choice 0 was admitted (the request left the queue).
    admitted: bool,
    first_token_seen: bool,
    failed: bool,
    /// Prompt tokens reused at choice 0's first admission (a preempted sequence's later
    /// admissions do not change what the client was served from the cache).
    cached_tokens: Option<usize>,
}

/// The engine's side of one choice: whose it is, and its output processing.
struct SeqEntry {
    req: u64,
    choice: usize,
    output: SeqOutput,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    last_token_at: Option<Instant>,
}

struct Engine {
    model: Arc<Model>,
    scheduler: Scheduler,
    runner: ModelRunner,
    stats: Arc<EngineStats>,
    requests: HashMap<u64, RequestState>,
    seqs: HashMap<SeqId, SeqEntry>,
    next_req: u64,
    next_seq: SeqId,
    lp: Vec<f32>,
    /// Requests whose listener refused an event this step.
    gone: Vec<u64>,
}

impl Engine {
    fn new(model: Arc<Model>, scheduler: Scheduler, runner: ModelRunner, stats: Arc<EngineStats>) -> Self {
        Engine {
            lp: vec![0f32; model.vocab_size()],
            model,
            scheduler,
            runner,
            stats,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_req: 0,
            next_seq: 0,
            gone: Vec::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            // Block for work only when idle.
            if self.scheduler.is_idle() {
                match rx.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.accept(job);
            }
            if self.stats.shutting_down.load(Ordering::SeqCst) {
                self.cancel_all("the server is shutting down");
            }
            self.drop_abandoned();
            self.step();
            self.publish_stats();
        }
    }

    /// A new sequence for choice `choice` of request `req`.
    fn new_seq(&mut self, req: u64, choice: usize, r: &GenRequest) -> NewSeq {
        let id = self.next_seq;
        self.next_seq += 1;
        let params = OutputParams {
            sampling: SamplingParams { seed: r.sampling.seed.wrapping_add(choice as u64), ..r.sampling },
            max_tokens: r.max_tokens,
            min_tokens: r.min_tokens,
            ignore_eos: r.ignore_eos,
            stop: r.stop.clone(),
            logprobs: r.logprobs,
            special_text: r.special_text,
            constraint: r.constraint.clone(),
            thinking_budget: r.thinking_budget,
        };
        let entry =
            SeqEntry { req, choice, output: SeqOutput::new(params), prompt_logprobs: Vec::new(), last_token_at: None };
        self.seqs.insert(id, entry);
        let mut snapshot_at = r.snapshot_at.clone();
        if r.n > 1 {
            // The other choices resume one token before the prompt's end (recurrent models).
            snapshot_at.push(r.prompt.len() - 1);
        }
        NewSeq { id, tokens: r.prompt.clone(), prompt_logits: r.prompt_logprobs.is_some(), snapshot_at }
    }

    fn accept(&mut self, job: Job) {
        if job.request.fault == Some(Fault::KillEngine) {
            panic!("injected fault: the engine thread dies");
        }
        let id = self.next_req;
        self.next_req += 1;
        let request = Arc::new(job.request);
        let mut state = RequestState {
            sink: job.sink,
            request: Arc::clone(&request),
            received: job.received,
            seqs: Vec::new(),
            choices_left: request.n.max(1),
            forked: request.n <= 1,
            admitted: false,
            first_token_seen: false,
            cached_tokens: None,
            failed: false,
        };
        let vocab = self.model.vocab_size();
        if let Some(&bad) = request.prompt.iter().find(|&&t| t as usize >= vocab) {
            // Refused alone here, rather than failing every request of the batch it would join.
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            self.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
            state.sink.send(Event::Error(format!("token id {bad} is outside the model's vocabulary of {vocab}")));
            return;
        }
        let limit = self.scheduler.config().memory.context;
        if request.prompt.is_empty() || request.prompt.len() >= limit {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            self.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
            state.sink.send(Event::Error(format!(
                "the prompt of {} tokens does not fit: the engine holds sequences of at most {limit} tokens",
                request.prompt.len()
            )));
            return;
        }
        let seq = self.new_seq(id, 0, &request);
        state.seqs.push(seq.id);
        self.requests.insert(id, state);
        self.scheduler.add(seq);
    }

    /// Ends a request early: frees every sequence of it.
    fn drop_request(&mut self, req: u64) {
        let Some(r) = self.requests.remove(&req) else { return };
        if !r.admitted {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
        }
        for seq in r.seqs {
            self.scheduler.finish(seq, false);
            self.seqs.remove(&seq);
        }
    }

    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = self.requests.iter().filter(|(_, r)| !r.sink.alive()).map(|(&id, _)| id).collect();
        for id in gone {
            self.stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            self.drop_request(id);
        }
    }

    fn cancel_all(&mut self, reason: &str) {
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        for id in ids {
            if let Some(r) = self.requests.get_mut(&id) {
                r.sink.send(Event::Cancelled(reason.to_string()));
            }
            self.stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            self.drop_request(id);
        }
    }

    fn fail(&mut self, req: u64, message: String) {
        if let Some(r) = self.requests.get_mut(&req) {
            r.failed = true;
            r.sink.send(Event::Error(message));
        }
        self.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
        self.drop_request(req);
    }

    fn step(&mut self) {
        let out = self.scheduler.schedule();
        self.record_admissions(&out);
        if out.items.is_empty() {
            // Cache operations still apply (a state saved, a slot reset), so that the pools
            // match the scheduler's books.
            self.runner.apply(&out.ops);
            if !self.scheduler.is_idle() {
                // Nothing fits: wait briefly for a cancellation or a finish to free room.
                std::thread::sleep(Duration::from_millis(1));
            }
            return;
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let inject = out.items.iter().any(|i| self.fault_of(i.seq) == Some(Fault::PanicInForward));
        let (runner, scheduler) = (&mut self.runner, &self.scheduler);
        let result = catch_unwind(AssertUnwindSafe(|| {
            if inject {
                panic!("injected fault: a panic inside the forward pass");
            }
            runner.execute(&out, scheduler)
        }));
        // A failed pass fails the requests of its batch (their states may be half-updated);
        // the others, waiting, go on.
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(payload) => {
                self.stats.internal_errors.fetch_add(1, Ordering::Relaxed);
                Some(format!("internal error in the forward pass: {}", panic_message(&*payload)))
            }
        };
        if let Some(message) = failure {
            let mut reqs: Vec<u64> = out.items.iter().filter_map(|i| self.seqs.get(&i.seq)).map(|s| s.req).collect();
            reqs.dedup();
            for r in reqs {
                self.fail(r, message.clone());
            }
            return;
        }
        self.scheduler.complete(&out);
        for (i, item) in out.items.iter().enumerate() {
            let (row, rows) = self.runner.item_rows(i);
            if item.logits == Logits::All {
                self.record_prompt_logprobs(item.seq, item.start, row, rows);
            }
            let reached_end = self.scheduler.tokens(item.seq).is_some_and(|t| item.start + item.len == t.len());
            if rows > 0 && reached_end {
                // One sequence's output processing failing ends its request, not the step.
                let sampled = catch_unwind(AssertUnwindSafe(|| self.sample(item.seq, row + rows - 1)));
                if let Err(payload) = sampled {
                    self.stats.internal_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(req) = self.seqs.get(&item.seq).map(|s| s.req) {
                        self.fail(req, format!("internal error in this request's step: {}", panic_message(&*payload)));
                    }
                }
            }
        }
        for req in std::mem::take(&mut self.gone) {
            if self.requests.contains_key(&req) {
                self.stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                self.drop_request(req);
            }
        }
    }

    fn record_admissions(&mut self, out: &SchedulerOutput) {
        for &(seq, reused) in &out.admitted {
            let Some(s) = self.seqs.get(&seq) else { continue };
            let Some(r) = self.requests.get_mut(&s.req) else { continue };
            if s.choice == 0 {
                r.cached_tokens.get_or_insert(reused);
                r.admitted = true;
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            }
            // Every choice's prompt counts: forks show up as hits.
            self.stats.prompt_tokens.fetch_add(r.request.prompt.len() as u64, Ordering::Relaxed);
            self.stats.prefix_hit_tokens.fetch_add(reused as u64, Ordering::Relaxed);
        }
        self.stats.preemptions.fetch_add(out.preempted.len() as u64, Ordering::Relaxed);
    }

    /// Log-probabilities of the prompt tokens after positions `start..start + rows`; positions
    /// already recorded (a preempted sequence computing its prompt again) are not added twice.
    fn record_prompt_logprobs(&mut self, seq: SeqId, start: usize, row: usize, rows: usize) {
        let Some(s) = self.seqs.get_mut(&seq) else { return };
        let top = self.requests.get(&s.req).and_then(|r| r.request.prompt_logprobs).unwrap_or(0);
        let tokens = self.scheduler.tokens(seq).unwrap_or(&[]);
        let prompt_len = self.scheduler.prompt_len(seq).unwrap_or(0);
        for k in 0..rows {
            let pos = start + k;
            if s.prompt_logprobs.is_empty() {
                s.prompt_logprobs.push(None);
            }
            // Entry i is the log-probability of prompt token i, predicted at position i - 1.
            if pos + 1 < prompt_len && s.prompt_logprobs.len() == pos + 1 {
                log_softmax(&mut self.lp, self.runner.logits_mut(row + k));
                s.prompt_logprobs.push(Some(token_logprob(&self.lp, tokens[pos + 1], top)));
            }
        }
    }

    fn fault_of(&self, seq: SeqId) -> Option<Fault> {
        self.seqs.get(&seq).and_then(|s| self.requests.get(&s.req)).and_then(|r| r.request.fault)
    }

    /// Samples the next token of `seq` from logits row `row`, sends its events, and ends the
    /// sequence when it is done.
    fn sample(&mut self, seq: SeqId, row: usize) {
        if self.fault_of(seq) == Some(Fault::PanicInSequence) {
            panic!("injected fault: a panic in one sequence's output processing");
        }
        let model = Arc::clone(&self.model);
        let Some(s) = self.seqs.get_mut(&seq) else { return };
        let Some(r) = self.requests.get_mut(&s.req) else { return };
        let req = Arc::clone(&r.request);
        // Prompt done: report prompt logprobs once, and let the other choices in.
        if s.output.generated() == 0 && s.choice == 0 {
            if req.prompt_logprobs.is_some()
                && !r.sink.send(Event::PromptLogprobs(std::mem::take(&mut s.prompt_logprobs)))
            {
                self.gone.push(s.req);
                return;
            }
            if !r.forked {
                r.forked = true;
                let req_id = s.req;
                for c in (1..req.n).rev() {
                    let fork = self.new_seq(req_id, c, &req);
                    if let Some(r) = self.requests.get_mut(&req_id) {
                        r.seqs.push(fork.id);
                    }
                    self.scheduler.add_front(fork);
                }
            }
        }
        let tokens_len = self.scheduler.tokens(seq).map_or(0, <[u32]>::len);
        let room = self.scheduler.config().memory.context.saturating_sub(tokens_len);
        let Some(s) = self.seqs.get_mut(&seq) else { return };
        let Some(r) = self.requests.get_mut(&s.req) else { return };
        let logits = self.runner.logits_mut(row);
        let now = Instant::now();
        let emitted = s.output.next(logits, &model.tokenizer, room);
        let (constrained, spent) = s.output.take_grammar_cost();
        self.stats.constrained_tokens.fetch_add(constrained, Ordering::Relaxed);
        self.stats.constraint_us.fetch_add(spent.as_micros() as u64, Ordering::Relaxed);
        if let Some(e) = emitted.error {
            // Output that breaks its grammar is never passed off as an answer.
            let req_id = s.req;
            self.fail(req_id, e.to_string());
            return;
        }
        if let Some(token) = emitted.token {
            self.scheduler.append_token(seq, token);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if !r.first_token_seen {
                r.first_token_seen = true;
                self.stats.time_to_first_token.observe(r.received.elapsed().as_secs_f64());
            }
            if let Some(prev) = s.last_token_at {
                self.stats.inter_token_latency.observe(now.duration_since(prev).as_secs_f64());
            }
            s.last_token_at = Some(now);
        }
        let (req_id, choice) = (s.req, s.choice);
        if (!emitted.text.is_empty() || !emitted.logprobs.is_empty())
            && !r.sink.send(Event::Delta { choice, text: emitted.text, logprobs: emitted.logprobs })
        {
            self.gone.push(req_id);
            return;
        }
        let Some(finish) = emitted.finish else { return };
        let completion_tokens = s.output.generated();
        let cached_tokens = r.cached_tokens.unwrap_or(0);
        if !r.sink.send(Event::Done { choice, finish, completion_tokens, cached_tokens }) {
            self.gone.push(req_id);
        }
        self.scheduler.finish(seq, true);
        self.seqs.remove(&seq);
        r.choices_left -= 1;
        if r.choices_left == 0 {
            if !r.failed {
                self.stats.requests_finished.fetch_add(1, Ordering::Relaxed);
            }
            self.requests.remove(&req_id);
        }
    }

    fn publish_stats(&self) {
        let s = &self.scheduler;
        self.stats.running.store(s.running().len(), Ordering::Relaxed);
        self.stats.kv_blocks_used.store(s.blocks_used(), Ordering::Relaxed);
        self.stats.kv_blocks_cached.store(s.blocks_cached(), Ordering::Relaxed);
        self.stats.state_slots_live.store(s.slots_live(), Ordering::Relaxed);
        self.stats.saved_states.store(s.snapshots(), Ordering::Relaxed);
    }
}
