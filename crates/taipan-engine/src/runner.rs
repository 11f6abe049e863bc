//! The model runner: executes what the scheduler planned. Applies the step's cache operations,
//! runs one forward pass over every scheduled sequence, and hands out the logits rows.
//! Every architecture goes through the same [`Model::forward_batch`].

use crate::scheduler::{CacheOp, MemoryPlan, Scheduler, SchedulerOutput};
use std::sync::Arc;
use taipan_kernels::Compute;
use taipan_model::{BatchItem, Cache, Logits, Model, ModelError, Scratch};

pub struct ModelRunner {
    model: Arc<Model>,
    compute: Compute,
    cache: Cache,
    scratch: Scratch,
    /// Per item of the last step: its first logits row and how many rows it has.
    rows: Vec<(usize, usize)>,
}

impl ModelRunner {
    /// Allocates the pools of `plan` once.
    pub fn new(model: Arc<Model>, threads: usize, plan: &MemoryPlan) -> Self {
        let cache = Cache::new(&model.cache_spec(), plan.block_size, plan.blocks, plan.slots);
        ModelRunner { compute: Compute::new(threads), cache, scratch: Scratch::default(), rows: Vec::new(), model }
    }

    /// Bytes of the pools.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Applies cache operations in order (saving, restoring and resetting states, copying blocks).
    pub fn apply(&mut self, ops: &[CacheOp]) {
        for op in ops {
            match *op {
                CacheOp::ResetState(slot) => self.cache.states.reset(slot),
                CacheOp::CopyState { from, to } => self.cache.states.copy(from, to),
                CacheOp::CopyBlock { from, to } => self.cache.kv.copy_block(from, to),
            }
        }
    }

    /// Runs one step: its cache operations, then one forward pass over its items. Token ids come
    /// from the scheduler, which owns the sequences.
    pub fn execute(&mut self, out: &SchedulerOutput, sched: &Scheduler) -> Result<(), ModelError> {
        self.apply(&out.ops);
        self.rows.clear();
        let mut row = 0;
        let mut items = Vec::with_capacity(out.items.len());
        for it in &out.items {
            let tokens = sched
                .tokens(it.seq)
                .and_then(|t| t.get(it.start..it.start + it.len))
                .ok_or_else(|| ModelError::Input(format!("sequence {} has no tokens at {}", it.seq, it.start)))?;
            let n = match it.logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => it.len,
            };
            self.rows.push((row, n));
            row += n;
            items.push(BatchItem {
                tokens,
                start: it.start,
                blocks: &it.blocks,
                state_slot: it.state_slot,
                logits: it.logits,
                prompt: it.prompt,
            });
        }
        if items.is_empty() {
            return Ok(());
        }
        self.model.forward_batch(&self.compute, &items, &mut self.cache, &mut self.scratch)
    }

    /// Logits rows of item `i` of the last step: `(first row, rows)`.
    pub fn item_rows(&self, i: usize) -> (usize, usize) {
        self.rows[i]
    }

    /// Logits row `row` of the last step, writable (samplers mask tokens in place).
    pub fn logits_mut(&mut self, row: usize) -> &mut [f32] {
        let vocab = self.model.vocab_size();
        &mut self.scratch.logits_mut()[row * vocab..(row + 1) * vocab]
    }
}
