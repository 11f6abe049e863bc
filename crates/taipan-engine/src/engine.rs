//! The engine thread: continuous batching over a paged KV cache with prefix reuse.
//!
//! Each step: take new requests, drop sequences whose client left, admit waiting sequences in
//! arrival order while blocks and slots allow, then run ONE forward pass over every running
//! sequence — one token for those decoding, a chunk of prompt for those prefilling, within a
//! token budget so a long prompt never stalls the others for more than a step — sample, and send
//! each request its events. There are no prefill or decode phases: a sequence simply has
//! `tokens.len() - computed` tokens left to run.
//!
//! A request with `n > 1` runs its first choice alone until the prompt is done; the other
//! choices are then admitted and find the prompt's full blocks in the prefix cache, so the prompt
//! is computed once and its blocks are shared.

use crate::cache::BlockManager;
use crate::constraint::{Constraint, Guide, Progress};
use crate::detokenizer::IncrementalDecoder;
use crate::generate::FinishReason;
pub use crate::metrics::EngineStats;
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use taipan_kernels::ops::log_softmax;
use taipan_kernels::Compute;
use taipan_model::{BatchItem, KvPool, Logits, Model, Scratch, SeqState};

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
        }
    }
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
    /// Bytes of KV cache (the pool is allocated once at this size).
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

/// Starts the engine thread for `model`. The thread ends when every handle is dropped.
pub fn start(model: Arc<Model>, config: EngineConfig) -> EngineHandle {
    let (tx, rx) = mpsc::channel::<Job>();
    let stats = Arc::new(EngineStats::default());
    let handle =
        EngineHandle { tx, max_queue: config.max_queue.max(1), stats: Arc::clone(&stats), model: Arc::clone(&model) };
    std::thread::Builder::new()
        .name("taipan-engine".into())
        .spawn(move || Engine::new(model, config, stats).run(rx))
        .expect("spawning the engine thread");
    handle
}

/// A request in flight: its listener and the choices still running.
struct RequestState {
    sink: Box<dyn EventSink>,
    request: Arc<GenRequest>,
    received: Instant,
    choices_left: usize,
    /// Choices 1..n are admitted once choice 0 has computed the prompt.
    forked: bool,
    first_token_seen: bool,
    failed: bool,
}

/// One choice of one request.
struct Seq {
    req: u64,
    choice: usize,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions whose keys and values are in the pool.
    computed: usize,
    blocks: Vec<u32>,
    /// Chained hashes of the leading full blocks already registered for reuse.
    hashes: Vec<u64>,
    sampler: Sampler,
    detok: IncrementalDecoder,
    stops: StopMatcher,
    generated: usize,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    last_token_at: Option<Instant>,
    /// Admission order, for preempting the newest first.
    admitted: u64,
    /// Own state, for models that do not batch over the paged pool (recurrent models).
    state: Option<SeqState>,
    guide: Option<Guide>,
}

/// Whole sequence states saved at prompt ends and sequence ends, for models whose recurrent state
/// cannot be rebuilt from cached blocks: a new prompt that extends a saved token sequence resumes
/// from a copy of its state. Least recently used entries go first when over the byte budget.
struct Snapshots {
    entries: Vec<(Vec<u32>, SeqState, u64)>,
    bytes: usize,
    budget: usize,
    tick: u64,
}

impl Snapshots {
    /// The saved state with the longest key that is a proper prefix of `tokens`.
    fn lookup(&mut self, tokens: &[u32]) -> Option<(usize, SeqState)> {
        self.tick += 1;
        let best = self
            .entries
            .iter_mut()
            .filter(|(k, _, _)| k.len() < tokens.len() && tokens.starts_with(k))
            .max_by_key(|(k, _, _)| k.len())?;
        best.2 = self.tick;
        Some((best.0.len(), best.1.clone()))
    }

    fn insert(&mut self, key: &[u32], state: &SeqState) {
        if key.is_empty() || self.entries.iter().any(|(k, _, _)| k == key) {
            return;
        }
        let size = state.memory_bytes() + 4 * key.len();
        if size > self.budget {
            return;
        }
        while self.bytes + size > self.budget {
            let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.2).map(|(i, _)| i) else { break };
            let (k, st, _) = self.entries.swap_remove(oldest);
            self.bytes -= st.memory_bytes() + 4 * k.len();
        }
        self.tick += 1;
        self.bytes += size;
        self.entries.push((key.to_vec(), state.clone(), self.tick));
    }
}

struct Engine {
    model: Arc<Model>,
    compute: Compute,
    scratch: Scratch,
    pool: KvPool,
    blocks: BlockManager,
    stats: Arc<EngineStats>,
    config: EngineConfig,
    requests: HashMap<u64, RequestState>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_req: u64,
    admissions: u64,
    lp: Vec<f32>,
    /// Requests whose listener refused an event this step.
    gone: Vec<u64>,
    /// Whether the model batches over the paged pool; otherwise sequences keep their own state.
    batched: bool,
    snapshots: Snapshots,
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

/// What one sequence contributes to a step.
struct Planned {
    seq: usize,
    start: usize,
    len: usize,
    logits: Logits,
}

impl Engine {
    fn new(model: Arc<Model>, config: EngineConfig, stats: Arc<EngineStats>) -> Self {
        let bs = config.block_size.max(1);
        let batched = model.supports_batching();
        let block_bytes = model.kv_bytes_per_token() * bs;
        let n_blocks = if batched {
            (config.kv_cache_bytes / block_bytes.max(1)).max(model.context_length().div_ceil(bs) + 1)
        } else {
            0
        };
        stats.kv_blocks_total.store(n_blocks, Ordering::Relaxed);
        let pool = model.new_pool(bs, n_blocks);
        Engine {
            compute: Compute::new(config.threads),
            scratch: Scratch::default(),
            pool,
            blocks: BlockManager::new(n_blocks, bs),
            stats,
            snapshots: Snapshots { entries: Vec::new(), bytes: 0, budget: config.kv_cache_bytes / 2, tick: 0 },
            config,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_req: 0,
            admissions: 0,
            lp: vec![0f32; model.vocab_size()],
            gone: Vec::new(),
            batched,
            model,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            // Block for work only when idle.
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.accept(job);
            }
            self.drop_abandoned();
            self.admit();
            self.step();
            self.publish_stats();
        }
    }

    fn new_seq(req: u64, choice: usize, r: &GenRequest) -> Seq {
        let params = SamplingParams { seed: r.sampling.seed.wrapping_add(choice as u64), ..r.sampling };
        Seq {
            req,
            choice,
            tokens: r.prompt.clone(),
            prompt_len: r.prompt.len(),
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            sampler: Sampler::new(params),
            detok: IncrementalDecoder::new(!r.special_text),
            stops: StopMatcher::new(r.stop.clone()),
            generated: 0,
            prompt_logprobs: Vec::new(),
            last_token_at: None,
            admitted: 0,
            state: None,
            guide: r.constraint.as_ref().map(Guide::new),
        }
    }

    fn accept(&mut self, job: Job) {
        let id = self.next_req;
        self.next_req += 1;
        let request = Arc::new(job.request);
        let mut state = RequestState {
            sink: job.sink,
            request: Arc::clone(&request),
            received: job.received,
            choices_left: request.n.max(1),
            forked: request.n <= 1,
            first_token_seen: false,
            failed: false,
        };
        let blocks_needed = (request.prompt.len() + 1).div_ceil(self.blocks.block_size);
        if request.prompt.is_empty() || (self.batched && blocks_needed > self.blocks.total()) {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            self.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
            state.sink.send(Event::Error(format!(
                "the prompt of {} tokens does not fit the KV cache ({} blocks of {})",
                request.prompt.len(),
                self.blocks.total(),
                self.blocks.block_size
            )));
            return;
        }
        let seq = Self::new_seq(id, 0, &request);
        self.requests.insert(id, state);
        self.waiting.push_back(seq);
    }

    fn release_seq(&mut self, seq: &mut Seq) {
        for &b in &seq.blocks {
            self.blocks.release(b);
        }
        seq.blocks.clear();
        seq.hashes.clear();
        seq.computed = 0;
        seq.state = None;
    }

    /// Ends a request early: frees every sequence of it.
    fn drop_request(&mut self, req: u64) {
        let mut running = std::mem::take(&mut self.running);
        running.retain_mut(|s| {
            if s.req == req {
                self.release_seq(s);
                false
            } else {
                true
            }
        });
        self.running = running;
        let before = self.waiting.len();
        let mut waiting = std::mem::take(&mut self.waiting);
        waiting.retain_mut(|s| {
            if s.req == req {
                if s.choice == 0 && s.admitted == 0 {
                    self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                }
                self.release_seq(s);
                false
            } else {
                true
            }
        });
        let _ = before;
        self.waiting = waiting;
        self.requests.remove(&req);
    }

    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = self.requests.iter().filter(|(_, r)| !r.sink.alive()).map(|(&id, _)| id).collect();
        for id in gone {
            self.stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            self.drop_request(id);
        }
    }

    /// Admits waiting sequences in order while slots and blocks allow (no overtaking, so no
    /// request starves behind smaller ones).
    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            let wants_prompt_lp = self.requests.get(&seq.req).is_some_and(|r| r.request.prompt_logprobs.is_some());
            if !self.batched {
                if seq.state.is_none() {
                    let hit = if wants_prompt_lp { None } else { self.snapshots.lookup(&seq.tokens) };
                    let (computed, state) = hit.unwrap_or_else(|| (0, self.model.new_state()));
                    seq.computed = computed;
                    seq.state = Some(state);
                }
            } else if seq.blocks.is_empty() && !wants_prompt_lp {
                let (hit, hashes) = self.blocks.match_prefix(&seq.tokens);
                seq.computed = hit.len() * self.blocks.block_size;
                seq.blocks = hit;
                seq.hashes = hashes;
            }
            let need = (seq.tokens.len() + 1).div_ceil(self.blocks.block_size).saturating_sub(seq.blocks.len());
            if self.batched && need > self.blocks.available() {
                // Not now: give back what the prefix match took and wait for blocks to free up.
                self.release_seq(&mut seq);
                self.waiting.push_front(seq);
                break;
            }
            if seq.admitted == 0 {
                if seq.choice == 0 {
                    self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                }
                // Every choice's prompt counts: forks show up as hits.
                self.stats.prompt_tokens.fetch_add(seq.prompt_len as u64, Ordering::Relaxed);
                self.stats.prefix_hit_tokens.fetch_add(seq.computed as u64, Ordering::Relaxed);
            }
            self.admissions += 1;
            seq.admitted = self.admissions;
            self.running.push(seq);
        }
    }

    /// Makes sure `running[i]` has blocks for positions `..upto`, preempting the newest other
    /// sequences if the pool is full. Returns false if even that is not enough.
    fn ensure_blocks(&mut self, i: usize, upto: usize) -> bool {
        let bs = self.blocks.block_size;
        while self.running[i].blocks.len() * bs < upto {
            match self.blocks.allocate() {
                Some(b) => self.running[i].blocks.push(b),
                None => {
                    let me = self.running[i].admitted;
                    let victim = self
                        .running
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.admitted != me)
                        .max_by_key(|(_, s)| s.admitted)
                        .map(|(j, _)| j);
                    let Some(j) = victim else { return false };
                    let mut v = self.running.remove(j);
                    self.release_seq(&mut v);
                    self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
                    self.waiting.push_front(v);
                    if j < i {
                        return self.ensure_blocks(i - 1, upto);
                    }
                }
            }
        }
        true
    }

    fn plan(&mut self) -> Vec<Planned> {
        let mut budget = self.config.max_batch_tokens.max(1);
        let mut plan = Vec::new();
        // Decoding sequences first: one token each keeps every stream moving.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| (self.running[i].tokens.len() - self.running[i].computed > 1, self.running[i].admitted));
        let mut chosen: Vec<(u64, usize)> = Vec::new();
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            let left = s.tokens.len() - s.computed;
            let mut len = left.min(budget);
            if !self.batched {
                // Stop prefill chunks at snapshot positions so the state there can be saved.
                if let Some(b) = self
                    .requests
                    .get(&s.req)
                    .and_then(|r| r.request.snapshot_at.iter().copied().filter(|&b| b > s.computed).min())
                {
                    len = len.min(b - s.computed);
                }
            }
            budget -= len;
            chosen.push((s.admitted, len));
        }
        // Blocks may preempt sequences and shift indices, so look sequences up by admission id.
        for (admitted, len) in chosen {
            let Some(i) = self.running.iter().position(|s| s.admitted == admitted) else { continue };
            let upto = self.running[i].computed + len;
            if self.batched && !self.ensure_blocks(i, upto) {
                continue;
            }
            let Some(i) = self.running.iter().position(|s| s.admitted == admitted) else { continue };
            let s = &self.running[i];
            let reaches_end = s.computed + len == s.tokens.len();
            let wants_prompt_lp = self.requests.get(&s.req).is_some_and(|r| r.request.prompt_logprobs.is_some());
            let logits = if wants_prompt_lp && s.computed < s.prompt_len {
                Logits::All
            } else if reaches_end {
                Logits::Last
            } else {
                Logits::None
            };
            plan.push(Planned { seq: admitted as usize, start: s.computed, len, logits });
        }
        // Translate admission ids back to current indices.
        for p in plan.iter_mut() {
            p.seq = self.running.iter().position(|s| s.admitted == p.seq as u64).unwrap_or(usize::MAX);
        }
        plan.retain(|p| p.seq != usize::MAX);
        plan
    }

    fn step(&mut self) {
        let plan = self.plan();
        if plan.is_empty() {
            if !self.running.is_empty() || !self.waiting.is_empty() {
                // Nothing fits: wait briefly for a cancellation or a finish to free blocks.
                std::thread::sleep(Duration::from_millis(1));
            }
            return;
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let mut finished: Vec<usize> = Vec::new();
        if self.batched {
            let items: Vec<BatchItem<'_>> = plan
                .iter()
                .map(|p| {
                    let s = &self.running[p.seq];
                    BatchItem {
                        tokens: &s.tokens[p.start..p.start + p.len],
                        start: p.start,
                        blocks: &s.blocks,
                        logits: p.logits,
                    }
                })
                .collect();
            let result = self.model.forward_batch(&self.compute, &items, &mut self.pool, &mut self.scratch);
            drop(items);
            if let Err(e) = result {
                let reqs: Vec<u64> = plan.iter().map(|p| self.running[p.seq].req).collect();
                for r in reqs {
                    self.fail(r, e.to_string());
                }
                return;
            }
            let mut row = 0;
            for p in &plan {
                row += self.after_forward(p, row, &mut finished);
            }
        } else {
            // Recurrent models: one forward per sequence on its own state.
            let mut failed = Vec::new();
            for p in &plan {
                let s = &mut self.running[p.seq];
                let Some(state) = s.state.as_mut() else { continue };
                let all = p.logits == Logits::All;
                let tokens = &s.tokens[p.start..p.start + p.len];
                if let Err(e) = self.model.forward(&self.compute, tokens, state, &mut self.scratch, all) {
                    failed.push((s.req, e.to_string()));
                    continue;
                }
                let logits = if p.logits == Logits::None { Logits::Last } else { p.logits };
                let rows_plan = Planned { seq: p.seq, start: p.start, len: p.len, logits };
                self.after_forward(&rows_plan, 0, &mut finished);
            }
            finished.sort_unstable();
            finished.dedup();
            let mut keep = Vec::new();
            for i in finished.into_iter().rev() {
                let mut s = self.running.remove(i);
                if let Some(st) = s.state.as_ref() {
                    self.snapshots.insert(&s.tokens[..s.computed], st);
                }
                self.release_seq(&mut s);
            }
            finished = std::mem::take(&mut keep);
            for (req, e) in failed {
                self.fail(req, e);
            }
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let mut s = self.running.remove(i);
            self.release_seq(&mut s);
        }
        for req in std::mem::take(&mut self.gone) {
            if self.requests.contains_key(&req) {
                self.stats.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                self.drop_request(req);
            }
        }
    }

    /// Book-keeping after a forward pass for one planned item whose logits start at `row`:
    /// progress, prefix registration, prompt logprobs, sampling. Returns the logits rows it used.
    fn after_forward(&mut self, p: &Planned, row: usize, finished: &mut Vec<usize>) -> usize {
        let vocab = self.model.vocab_size();
        let rows = match p.logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => p.len,
        };
        self.running[p.seq].computed += p.len;
        if self.batched {
            self.register_full_blocks(p.seq);
        }
        let s = &mut self.running[p.seq];
        if p.logits == Logits::All {
            let top = self.requests.get(&s.req).and_then(|r| r.request.prompt_logprobs).unwrap_or(0);
            let logits = self.scratch.logits();
            for k in 0..rows {
                let pos = p.start + k;
                if s.prompt_logprobs.is_empty() {
                    s.prompt_logprobs.push(None);
                }
                if pos + 1 < s.prompt_len {
                    log_softmax(&mut self.lp, &logits[(row + k) * vocab..(row + k + 1) * vocab]);
                    s.prompt_logprobs.push(Some(token_logprob(&self.lp, s.tokens[pos + 1], top)));
                }
            }
        }
        if !self.batched && s.generated == 0 {
            let at_boundary = s.computed == s.prompt_len
                || self.requests.get(&s.req).is_some_and(|r| r.request.snapshot_at.contains(&s.computed));
            if at_boundary {
                if let Some(st) = s.state.as_ref() {
                    self.snapshots.insert(&s.tokens[..s.computed], st);
                }
            }
        }
        let s = &self.running[p.seq];
        if rows > 0 && s.computed == s.tokens.len() && self.sample_into(p.seq, row + rows - 1) {
            finished.push(p.seq);
        }
        rows
    }

    /// Registers the sequence's newly completed full blocks in the prefix cache.
    fn register_full_blocks(&mut self, i: usize) {
        let bs = self.blocks.block_size;
        let s = &mut self.running[i];
        while (s.hashes.len() + 1) * bs <= s.computed {
            let k = s.hashes.len();
            let parent = if k == 0 { 0 } else { s.hashes[k - 1] };
            let h = self.blocks.register(s.blocks[k], parent, &s.tokens[k * bs..(k + 1) * bs]);
            s.hashes.push(h);
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

    /// Samples the next token of `running[i]` from logits row `row`; sends its events.
    /// Returns true when the sequence has finished.
    fn sample_into(&mut self, i: usize, row: usize) -> bool {
        let vocab = self.model.vocab_size();
        let model = Arc::clone(&self.model);
        let tok = &model.tokenizer;
        let stop_ids = &tok.specials.stop_ids;
        let s = &mut self.running[i];
        let Some(r) = self.requests.get_mut(&s.req) else { return true };
        let req = Arc::clone(&r.request);
        let now = Instant::now();
        // Prompt done: report prompt logprobs once, and let the other choices in.
        if s.generated == 0 && s.choice == 0 {
            if req.prompt_logprobs.is_some()
                && !r.sink.send(Event::PromptLogprobs(std::mem::take(&mut s.prompt_logprobs)))
            {
                self.gone.push(s.req);
                return true;
            }
            if !r.forked {
                r.forked = true;
                for c in (1..req.n).rev() {
                    let mut fork = Self::new_seq(s.req, c, &req);
                    fork.admitted = 0;
                    self.waiting.push_front(fork);
                }
            }
        }
        let s = &mut self.running[i];
        let Some(r) = self.requests.get_mut(&s.req) else { return true };
        if s.generated >= req.max_tokens {
            return self.finish(i, FinishReason::Length);
        }
        let logits = &mut self.scratch.logits_mut()[row * vocab..(row + 1) * vocab];
        // Under an active grammar the grammar decides where the answer ends.
        if s.generated < req.min_tokens && !s.guide.as_ref().is_some_and(|g| g.active()) {
            for &id in stop_ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        // Tokens the budget has left, this one included.
        let left =
            (req.max_tokens.saturating_sub(s.generated)).min(model.context_length().saturating_sub(s.tokens.len()));
        let next = match s.guide.as_mut() {
            None => s.sampler.sample(logits),
            Some(g) => match g.sample(&mut s.sampler, logits, left) {
                Some(t) => t,
                // The grammar allows nothing more (it cannot happen once complete: stop ids stay).
                None => return self.finish(i, FinishReason::Stop),
            },
        };
        s.generated += 1;
        s.tokens.push(next);
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if !r.first_token_seen {
            r.first_token_seen = true;
            self.stats.time_to_first_token.observe(r.received.elapsed().as_secs_f64());
        }
        if let Some(prev) = s.last_token_at {
            self.stats.inter_token_latency.observe(now.duration_since(prev).as_secs_f64());
        }
        s.last_token_at = Some(now);
        let logprobs = match req.logprobs {
            Some(top) => {
                log_softmax(&mut self.lp, logits);
                vec![token_logprob(&self.lp, next, top)]
            }
            None => vec![],
        };
        if !req.ignore_eos && stop_ids.contains(&next) {
            if !logprobs.is_empty() && !r.sink.send(Event::Delta { choice: s.choice, text: String::new(), logprobs }) {
                self.gone.push(s.req);
                return true;
            }
            return self.finish(i, FinishReason::Stop);
        }
        let piece = s.detok.push(tok, next);
        let progress = s.guide.as_mut().map(|g| g.advance(next, &piece));
        if let Some(g) = s.guide.as_mut() {
            let (tokens, spent) = g.take_cost();
            self.stats.constrained_tokens.fetch_add(tokens, Ordering::Relaxed);
            self.stats.constraint_us.fetch_add(spent.as_micros() as u64, Ordering::Relaxed);
        }
        let grammar_done = match progress {
            Some(Progress::Complete) => true,
            Some(Progress::Abandoned) => {
                s.guide = None;
                false
            }
            _ => false,
        };
        let check = s.stops.push(&piece);
        if (!check.emit.is_empty() || !logprobs.is_empty())
            && !r.sink.send(Event::Delta { choice: s.choice, text: check.emit, logprobs })
        {
            self.gone.push(s.req);
            return true;
        }
        if check.stopped {
            return self.finish_matched(i);
        }
        if grammar_done {
            return self.finish(i, FinishReason::Stop);
        }
        if s.generated >= req.max_tokens || s.tokens.len() >= model.context_length() {
            return self.finish(i, FinishReason::Length);
        }
        false
    }

    /// Ends a choice that hit a stop string (nothing held back is released).
    fn finish_matched(&mut self, i: usize) -> bool {
        self.send_done(i, FinishReason::Stop);
        true
    }

    /// Ends a choice, releasing text held back for an incomplete stop string.
    fn finish(&mut self, i: usize, reason: FinishReason) -> bool {
        let model = Arc::clone(&self.model);
        let s = &mut self.running[i];
        let rest = s.detok.flush(&model.tokenizer);
        let check = s.stops.push(&rest);
        let mut tail = check.emit;
        if !check.stopped {
            tail.push_str(&s.stops.flush());
        }
        if !tail.is_empty() {
            if let Some(r) = self.requests.get_mut(&s.req) {
                r.sink.send(Event::Delta { choice: s.choice, text: tail, logprobs: vec![] });
            }
        }
        self.send_done(i, if check.stopped { FinishReason::Stop } else { reason });
        true
    }

    fn send_done(&mut self, i: usize, finish: FinishReason) {
        let s = &self.running[i];
        let (req, choice, generated) = (s.req, s.choice, s.generated);
        let Some(r) = self.requests.get_mut(&req) else { return };
        if !r.sink.send(Event::Done { choice, finish, completion_tokens: generated }) {
            self.gone.push(req);
        }
        r.choices_left -= 1;
        if r.choices_left == 0 {
            if !r.failed {
                self.stats.requests_finished.fetch_add(1, Ordering::Relaxed);
            }
            self.requests.remove(&req);
        }
    }

    fn publish_stats(&self) {
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        self.stats.kv_blocks_used.store(self.blocks.used(), Ordering::Relaxed);
        self.stats.kv_blocks_cached.store(self.blocks.cached(), Ordering::Relaxed);
    }
}
