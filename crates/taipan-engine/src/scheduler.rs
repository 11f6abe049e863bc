//! The scheduler: which sequences run in the next step, how many tokens each, and where their
//! state lives. Pure bookkeeping over token ids, block ids and slot ids; it knows nothing of
//! weights or tensors, so its tests run without a model.
//!
//! Every step ([`Scheduler::schedule`]): save recurrent states that reached a snapshot position,
//! admit waiting sequences in arrival order while a state slot and blocks for their prompt are
//! to be had (looking up cached prefix blocks, or a saved state for recurrent models), then give
//! each running sequence its tokens within the step budget, decoding sequences first (one token
//! each keeps every stream moving), prefills in chunks. A sequence that needs a block when none is
//! free first evicts saved states (least recently used first), then preempts the newest other
//! sequence, which goes back to the front of the queue. There are no prefill or decode phases: a
//! sequence has `tokens.len() - computed` tokens left to run.
//!
//! One memory budget: attention blocks, the slots of running sequences and the saved states
//! (a slot plus references to the blocks of their prefix) are all carved from pools allocated
//! once ([`MemoryPlan`]); nothing grows past them.

use crate::cache::BlockManager;
use std::collections::{HashMap, VecDeque};
use taipan_model::{CacheSpec, Logits};

/// A sequence's id, stable for its life (never an index that shifts).
pub type SeqId = u64;

/// How the pools are sized from one memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub block_size: usize,
    /// Attention KV blocks.
    pub blocks: usize,
    /// Recurrent-state slots (running sequences and saved states share them).
    pub slots: usize,
    /// Bytes the pools take: at most the budget.
    pub bytes: usize,
    /// The longest sequence the pools can hold (the model's context, or less).
    pub context: usize,
}

/// Why a budget cannot serve a model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a KV cache budget of {budget_mib} MiB cannot serve this model: {reason}")]
pub struct BudgetError {
    pub budget_mib: usize,
    pub reason: String,
}

impl MemoryPlan {
    /// Splits `budget` bytes between attention blocks and recurrent-state slots. Recurrent models
    /// get a slot for every sequence that may run and as many again for saved states, within half
    /// the budget; the rest holds blocks.
    pub fn new(spec: &CacheSpec, budget: usize, block_size: usize, max_running: usize) -> Result<Self, BudgetError> {
        let bs = block_size.max(1);
        let err = |reason: String| BudgetError { budget_mib: budget >> 20, reason };
        let block_bytes = spec.kv_bytes_per_position() * bs;
        let slot_bytes = spec.state_bytes();
        let slots = if spec.is_recurrent() {
            let slots = (2 * max_running.max(1)).min(budget / 2 / slot_bytes);
            if slots == 0 {
                return Err(err(format!("one sequence's recurrent state takes {slot_bytes} bytes")));
            }
            slots
        } else {
            0
        };
        let left = budget - slots * slot_bytes;
        // No attention layers: blocks cost nothing; enough to cover every running context.
        let blocks = left
            .checked_div(block_bytes)
            .unwrap_or_else(|| spec.context.div_ceil(bs).saturating_mul(max_running.max(1)).min(1 << 22));
        if blocks < 2 {
            return Err(err(format!("one block of {bs} positions takes {block_bytes} bytes")));
        }
        let context = spec.context.min(blocks * bs);
        Ok(MemoryPlan { block_size: bs, blocks, slots, bytes: blocks * block_bytes + slots * slot_bytes, context })
    }
}

/// Scheduler sizing.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub memory: MemoryPlan,
    /// Tokens one step may run (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Sequences carry recurrent state: one slot each, prefix reuse through saved states.
    pub recurrent: bool,
}

/// A sequence to schedule.
#[derive(Debug, Clone)]
pub struct NewSeq {
    pub id: SeqId,
    /// The prompt.
    pub tokens: Vec<u32>,
    /// Wants every prompt position's logits (prompt logprobs), so nothing may come from a cache.
    pub prompt_logits: bool,
    /// Prompt positions where a recurrent state is saved for later prompts that share the prefix.
    pub snapshot_at: Vec<usize>,
}

/// A cache operation the runner applies, in order, before the step's forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOp {
    /// Zero a state slot (a sequence starting from nothing).
    ResetState(u32),
    /// Copy a state slot (save a snapshot, or resume from one).
    CopyState { from: u32, to: u32 },
    /// Copy an attention block (a partly filled block that a resumed sequence will write to).
    CopyBlock { from: u32, to: u32 },
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq: SeqId,
    /// Position of the first token to run.
    pub start: usize,
    pub len: usize,
    /// The sequence's block table, covering `start + len` positions.
    pub blocks: Vec<u32>,
    pub state_slot: Option<u32>,
    pub logits: Logits,
    /// The tokens are the prompt's (chunks never straddle its end, so a chunk has one role).
    pub prompt: bool,
}

/// What the next step runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SchedulerOutput {
    pub ops: Vec<CacheOp>,
    pub items: Vec<ScheduledSeq>,
    /// Sequences admitted this step (first admission only), with the prompt tokens reused.
    pub admitted: Vec<(SeqId, usize)>,
    /// Sequences sent back to the queue to free blocks.
    pub preempted: Vec<SeqId>,
}

impl SchedulerOutput {
    /// Tokens the step runs.
    pub fn tokens(&self) -> usize {
        self.items.iter().map(|i| i.len).sum()
    }
}

#[derive(Debug)]
struct Entry {
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions whose keys, values and state are computed.
    computed: usize,
    blocks: Vec<u32>,
    /// Chained hashes of the leading full blocks registered for reuse.
    hashes: Vec<u64>,
    slot: Option<u32>,
    prompt_logits: bool,
    snapshot_at: Vec<usize>,
    /// Admission order (newest is preempted first); 0 before the first admission.
    admitted: u64,
    ever_admitted: bool,
}

/// A saved recurrent state: the tokens it has seen, its slot, and references to the blocks that
/// hold its attention keys and values.
#[derive(Debug)]
struct Snapshot {
    key: Vec<u32>,
    slot: u32,
    blocks: Vec<u32>,
    last_used: u64,
}

/// The scheduler's state.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    free_slots: Vec<u32>,
    seqs: HashMap<SeqId, Entry>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    snapshots: Vec<Snapshot>,
    /// (sequence, position) whose state is saved at the start of the next step.
    pending_saves: Vec<(SeqId, usize)>,
    admissions: u64,
    tick: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let m = config.memory;
        Scheduler {
            blocks: BlockManager::new(m.blocks, m.block_size),
            free_slots: (0..m.slots as u32).rev().collect(),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            snapshots: Vec::new(),
            pending_saves: Vec::new(),
            admissions: 0,
            tick: 0,
            config,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a sequence behind the others.
    pub fn add(&mut self, seq: NewSeq) {
        let id = seq.id;
        self.insert(seq);
        self.waiting.push_back(id);
    }

    /// Queues a sequence ahead of the others (the other choices of a request whose prompt is done).
    pub fn add_front(&mut self, seq: NewSeq) {
        let id = seq.id;
        self.insert(seq);
        self.waiting.push_front(id);
    }

    fn insert(&mut self, seq: NewSeq) {
        let mut snapshot_at = seq.snapshot_at;
        snapshot_at.sort_unstable();
        snapshot_at.dedup();
        snapshot_at.retain(|&p| p > 0 && p <= seq.tokens.len());
        let entry = Entry {
            prompt_len: seq.tokens.len(),
            tokens: seq.tokens,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            slot: None,
            prompt_logits: seq.prompt_logits,
            snapshot_at,
            admitted: 0,
            ever_admitted: false,
        };
        self.seqs.insert(seq.id, entry);
    }

    pub fn tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|e| e.tokens.as_slice())
    }

    pub fn computed(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|e| e.computed)
    }

    pub fn prompt_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|e| e.prompt_len)
    }

    pub fn running(&self) -> &[SeqId] {
        &self.running
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn blocks_total(&self) -> usize {
        self.blocks.total()
    }

    /// Blocks referenced by running sequences or saved states.
    pub fn blocks_used(&self) -> usize {
        self.blocks.used()
    }

    pub fn blocks_cached(&self) -> usize {
        self.blocks.cached()
    }

    pub fn slots_total(&self) -> usize {
        self.config.memory.slots
    }

    /// Slots held by running sequences.
    pub fn slots_live(&self) -> usize {
        self.running.iter().filter(|id| self.seqs[id].slot.is_some()).count()
    }

    /// Saved recurrent states held.
    pub fn snapshots(&self) -> usize {
        self.snapshots.len()
    }

    /// Appends a sampled token to a running sequence.
    pub fn append_token(&mut self, seq: SeqId, token: u32) {
        if let Some(e) = self.seqs.get_mut(&seq) {
            e.tokens.push(token);
        }
    }

    /// Records that the step's forward pass ran: positions advance, full blocks become reusable,
    /// and recurrent states at snapshot positions are saved before the next step.
    pub fn complete(&mut self, out: &SchedulerOutput) {
        let bs = self.config.memory.block_size;
        for item in &out.items {
            let Some(e) = self.seqs.get_mut(&item.seq) else { continue };
            if e.computed != item.start {
                continue;
            }
            e.computed += item.len;
            while (e.hashes.len() + 1) * bs <= e.computed {
                let k = e.hashes.len();
                let parent = if k == 0 { 0 } else { e.hashes[k - 1] };
                let h = self.blocks.register(e.blocks[k], parent, &e.tokens[k * bs..(k + 1) * bs]);
                e.hashes.push(h);
            }
            let at_boundary = e.computed <= e.prompt_len
                && !e.prompt_logits
                && (e.computed == e.prompt_len || e.snapshot_at.binary_search(&e.computed).is_ok());
            if self.config.recurrent && at_boundary {
                self.pending_saves.push((item.seq, e.computed));
            }
        }
    }

    /// Ends a sequence and frees what it holds. A recurrent sequence's state is kept as a saved
    /// state (the next turn of a conversation resumes from it) when `keep_state` is set.
    pub fn finish(&mut self, seq: SeqId, keep_state: bool) {
        let Some(mut e) = self.seqs.remove(&seq) else { return };
        self.running.retain(|&s| s != seq);
        self.waiting.retain(|&s| s != seq);
        self.pending_saves.retain(|&(s, _)| s != seq);
        if keep_state && self.config.recurrent && !e.prompt_logits && e.computed > 0 {
            if let Some(slot) = e.slot.take() {
                let key = e.tokens[..e.computed].to_vec();
                if self.snapshots.iter().any(|s| s.key == key) {
                    self.free_slots.push(slot);
                } else {
                    let n = e.computed.div_ceil(self.config.memory.block_size);
                    let blocks: Vec<u32> = e.blocks.drain(..n.min(e.blocks.len())).collect();
                    self.tick += 1;
                    self.snapshots.push(Snapshot { key, slot, blocks, last_used: self.tick });
                }
            }
        }
        self.release(&mut e);
    }

    fn release(&mut self, e: &mut Entry) {
        for b in e.blocks.drain(..) {
            self.blocks.release(b);
        }
        e.hashes.clear();
        e.computed = 0;
        if let Some(s) = e.slot.take() {
            self.free_slots.push(s);
        }
    }

    /// Drops the least recently used saved state other than `keep`; false if there is none.
    fn evict_snapshot(&mut self, keep: Option<usize>) -> bool {
        let victim = self
            .snapshots
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != keep)
            .min_by_key(|(_, s)| s.last_used)
            .map(|(i, _)| i);
        let Some(i) = victim else { return false };
        let s = self.snapshots.swap_remove(i);
        for b in s.blocks {
            self.blocks.release(b);
        }
        self.free_slots.push(s.slot);
        true
    }

    /// A slot for a sequence or a saved state, evicting saved states if needed (never `keep`).
    fn take_slot(&mut self, keep: Option<usize>) -> Option<u32> {
        loop {
            if let Some(s) = self.free_slots.pop() {
                return Some(s);
            }
            if !self.evict_snapshot(keep) {
                return None;
            }
        }
    }

    /// A block, evicting saved states if needed (never `keep`).
    fn take_block(&mut self, keep: Option<usize>) -> Option<u32> {
        loop {
            if let Some(b) = self.blocks.allocate() {
                return Some(b);
            }
            if !self.evict_snapshot(keep) {
                return None;
            }
        }
    }

    /// The saved state with the longest key that is a proper prefix of `tokens`.
    fn lookup_snapshot(&self, tokens: &[u32]) -> Option<usize> {
        self.snapshots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.key.len() < tokens.len() && tokens.starts_with(&s.key))
            .max_by_key(|(_, s)| s.key.len())
            .map(|(i, _)| i)
    }

    /// Saves the states of sequences that reached a snapshot position in the last step.
    fn save_snapshots(&mut self, ops: &mut Vec<CacheOp>) {
        let bs = self.config.memory.block_size;
        for (seq, pos) in std::mem::take(&mut self.pending_saves) {
            let Some(e) = self.seqs.get(&seq) else { continue };
            let (Some(live), true) = (e.slot, e.computed == pos) else { continue };
            let key = e.tokens[..pos].to_vec();
            if let Some(s) = self.snapshots.iter_mut().find(|s| s.key == key) {
                self.tick += 1;
                s.last_used = self.tick;
                continue;
            }
            let Some(slot) = self.take_slot(None) else { continue };
            let e = &self.seqs[&seq];
            let blocks: Vec<u32> = e.blocks[..pos.div_ceil(bs)].to_vec();
            for &b in &blocks {
                self.blocks.share(b);
            }
            ops.push(CacheOp::CopyState { from: live, to: slot });
            self.tick += 1;
            self.snapshots.push(Snapshot { key, slot, blocks, last_used: self.tick });
        }
    }

    /// Places the front waiting sequence: its cached prefix or saved state, its slot, and blocks
    /// for its whole prompt and first token (taken now, so that admission never promises room it
    /// does not have). False, with nothing held, if there is no room for it now.
    fn place(&mut self, id: SeqId, ops: &mut Vec<CacheOp>) -> bool {
        let bs = self.config.memory.block_size;
        let recurrent = self.config.recurrent;
        let e = &self.seqs[&id];
        let reuse = !e.prompt_logits;
        let tokens = e.tokens.clone();
        let need_total = (tokens.len() + 1).div_ceil(bs);
        if recurrent {
            let hit = if reuse { self.lookup_snapshot(&tokens) } else { None };
            let covered = hit.map_or(0, |i| self.snapshots[i].key.len());
            // Full blocks of the saved prefix are shared; a partial last block is copied.
            let shared = covered / bs;
            let fresh = need_total - shared;
            while self.blocks.available() < fresh {
                if !self.evict_snapshot(hit) {
                    return false;
                }
            }
            let Some(slot) = self.take_slot(hit) else { return false };
            let mut blocks = Vec::with_capacity(need_total);
            match hit {
                Some(i) => {
                    self.tick += 1;
                    let snap = &mut self.snapshots[i];
                    snap.last_used = self.tick;
                    ops.push(CacheOp::CopyState { from: snap.slot, to: slot });
                    let (full, partial) = (snap.blocks[..shared].to_vec(), snap.blocks.get(shared).copied());
                    for b in full {
                        self.blocks.share(b);
                        blocks.push(b);
                    }
                    if covered % bs != 0 {
                        let (Some(from), Some(to)) = (partial, self.blocks.allocate()) else {
                            unreachable!("a block was made available above")
                        };
                        ops.push(CacheOp::CopyBlock { from, to });
                        blocks.push(to);
                    }
                }
                None => ops.push(CacheOp::ResetState(slot)),
            }
            while blocks.len() < need_total {
                let Some(b) = self.take_block(hit) else { unreachable!("blocks were made available above") };
                blocks.push(b);
            }
            let e = self.seqs.get_mut(&id).expect("placed sequence exists");
            e.slot = Some(slot);
            e.blocks = blocks;
            e.computed = covered;
            true
        } else {
            let (mut hit, hashes) = if reuse { self.blocks.match_prefix(&tokens) } else { (vec![], vec![]) };
            if need_total - hit.len() > self.blocks.available() {
                for b in hit {
                    self.blocks.release(b);
                }
                return false;
            }
            let computed = hit.len() * bs;
            while hit.len() < need_total {
                let Some(b) = self.blocks.allocate() else { unreachable!("blocks were available above") };
                hit.push(b);
            }
            let e = self.seqs.get_mut(&id).expect("placed sequence exists");
            e.computed = computed;
            e.blocks = hit;
            e.hashes = hashes;
            true
        }
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        self.save_snapshots(&mut out.ops);
        // 1. Admission, in arrival order (no overtaking, so no request starves).
        while self.running.len() < self.config.max_running {
            let Some(&id) = self.waiting.front() else { break };
            if !self.place(id, &mut out.ops) {
                break;
            }
            self.waiting.pop_front();
            self.admissions += 1;
            let e = self.seqs.get_mut(&id).expect("waiting sequence exists");
            e.admitted = self.admissions;
            if !e.ever_admitted {
                e.ever_admitted = true;
                out.admitted.push((id, e.computed));
            }
            self.running.push(id);
        }
        // 2. Tokens per sequence within the budget: decoding sequences first, then by age.
        let mut order: Vec<SeqId> = self.running.clone();
        order.sort_by_key(|id| {
            let e = &self.seqs[id];
            (e.tokens.len() - e.computed > 1, e.admitted)
        });
        let mut budget = self.config.max_batch_tokens.max(1);
        for id in order {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted earlier in this step
            }
            let e = &self.seqs[&id];
            let left = e.tokens.len() - e.computed;
            if left == 0 {
                continue;
            }
            let mut len = left.min(budget);
            if e.computed < e.prompt_len {
                // A chunk is all prompt or all sampled tokens (a preempted sequence recomputes
                // both): the model computes the two kinds of row with different kernels, and a
                // row's kernel must not depend on how its sequence was chunked.
                len = len.min(e.prompt_len - e.computed);
            }
            if self.config.recurrent {
                // Chunks stop where a state is to be saved.
                if let Some(&b) = e.snapshot_at.iter().find(|&&b| b > e.computed) {
                    len = len.min(b - e.computed);
                }
            }
            let upto = e.computed + len;
            if !self.ensure_blocks(id, upto, &mut out, &mut budget) {
                continue;
            }
            let e = &self.seqs[&id];
            let logits = if e.prompt_logits && e.computed < e.prompt_len {
                Logits::All
            } else if upto == e.tokens.len() {
                Logits::Last
            } else {
                Logits::None
            };
            budget -= len;
            out.items.push(ScheduledSeq {
                seq: id,
                start: e.computed,
                len,
                blocks: e.blocks.clone(),
                state_slot: e.slot,
                logits,
                prompt: e.computed < e.prompt_len,
            });
        }
        out
    }

    /// Gives `id` blocks for positions `..upto`, evicting saved states, then preempting the newest
    /// other sequences. False if even that is not enough.
    fn ensure_blocks(&mut self, id: SeqId, upto: usize, out: &mut SchedulerOutput, budget: &mut usize) -> bool {
        let bs = self.config.memory.block_size;
        while self.seqs[&id].blocks.len() * bs < upto {
            if let Some(b) = self.take_block(None) {
                self.seqs.get_mut(&id).expect("scheduled sequence exists").blocks.push(b);
                continue;
            }
            let me = self.seqs[&id].admitted;
            let victim =
                self.running.iter().copied().filter(|&v| v != id).max_by_key(|v| self.seqs[v].admitted).filter(|v| {
                    // Only preempt sequences admitted after this one.
                    self.seqs[v].admitted > me
                });
            let Some(v) = victim else { return false };
            self.preempt(v, out, budget);
        }
        true
    }

    fn preempt(&mut self, v: SeqId, out: &mut SchedulerOutput, budget: &mut usize) {
        if let Some(at) = out.items.iter().position(|i| i.seq == v) {
            *budget += out.items.remove(at).len;
        }
        self.running.retain(|&s| s != v);
        self.pending_saves.retain(|&(s, _)| s != v);
        let mut e = self.seqs.remove(&v).expect("preempted sequence exists");
        if e.computed >= e.prompt_len {
            // Its prompt's logits were produced and reported: the recomputation needs none.
            e.prompt_logits = false;
        }
        self.release(&mut e);
        self.seqs.insert(v, e);
        self.waiting.push_front(v);
        out.preempted.push(v);
    }
}

#[cfg(test)]
mod tests;
