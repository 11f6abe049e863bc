//! Where a sequence's state lives between forward calls: attention keys and values in a paged
//! pool, recurrent (Mamba) state in fixed slots.
//!
//! The KV pool is a fixed number of blocks of `block_size` positions; a sequence owns a block
//! table (block ids in position order), so sequences grow without copying and share whole blocks
//! of a common prefix. The state pool is a fixed number of slots, each holding one sequence's
//! conv and SSM states for every Mamba layer; a sequence owns one slot. Both are allocated once:
//! memory does not grow with the number of requests.

use taipan_kernels::huge::HugeBuf;

/// Keys and values of every attention layer, in blocks.
#[derive(Debug, Clone)]
pub struct KvPool {
    pub layers: usize,
    /// Floats per position per layer (`kv_heads · head_dim`).
    pub kv_dim: usize,
    pub block_size: usize,
    blocks: usize,
    /// Per layer `[blocks, block_size, kv_dim]`.
    k: Vec<HugeBuf<f32>>,
    v: Vec<HugeBuf<f32>>,
}

impl KvPool {
    /// A pool of `blocks` blocks, resident from the start (see [`resident_zeros`]).
    pub fn new(layers: usize, kv_dim: usize, block_size: usize, blocks: usize) -> Self {
        let n = blocks * block_size * kv_dim;
        KvPool {
            layers,
            kv_dim,
            block_size,
            blocks,
            k: (0..layers).map(|_| resident_zeros(n)).collect(),
            v: (0..layers).map(|_| resident_zeros(n)).collect(),
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Bytes of one block (all layers, keys and values).
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.block_size * self.kv_dim * 4
    }

    /// Grows to at least `blocks` blocks (single-sequence use; the engine's pool is fixed).
    pub fn grow(&mut self, blocks: usize) {
        if blocks <= self.blocks {
            return;
        }
        let n = blocks * self.block_size * self.kv_dim;
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.grow_zeroed(n);
        }
        self.blocks = blocks;
    }

    /// Copies block `from` into block `to` (copy-on-write of a shared, partly filled block).
    pub fn copy_block(&mut self, from: u32, to: u32) {
        let n = self.block_size * self.kv_dim;
        let (f, t) = (from as usize * n, to as usize * n);
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.copy_within(f..f + n, t);
        }
    }

    /// Stores position `row` of block `block` for `layer`.
    pub(crate) fn write(&mut self, layer: usize, block: u32, row: usize, k: &[f32], v: &[f32]) {
        let at = (block as usize * self.block_size + row) * self.kv_dim;
        self.k[layer][at..at + self.kv_dim].copy_from_slice(k);
        self.v[layer][at..at + self.kv_dim].copy_from_slice(v);
    }

    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
}

/// What an architecture keeps per sequence, so that the engine can size its pools without
/// knowing the architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSpec {
    /// Layers with attention (each keeps keys and values per position).
    pub attention_layers: usize,
    /// Floats per position per attention layer, for keys and again for values.
    pub kv_dim: usize,
    /// Layers with recurrent state.
    pub recurrent_layers: usize,
    /// Floats of conv state per recurrent layer.
    pub conv_floats: usize,
    /// Floats of SSM state per recurrent layer.
    pub ssm_floats: usize,
    /// Longest sequence the model was made for.
    pub context: usize,
}

impl CacheSpec {
    /// Bytes of keys and values one position takes (all attention layers).
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.attention_layers * self.kv_dim * 4
    }

    /// Bytes of one sequence's recurrent state (0 for pure attention models).
    pub fn state_bytes(&self) -> usize {
        self.recurrent_layers * (self.conv_floats + self.ssm_floats) * 4
    }

    /// Whether sequences carry state that cannot be rebuilt from cached keys and values.
    pub fn is_recurrent(&self) -> bool {
        self.recurrent_layers > 0
    }
}

/// Recurrent state of many sequences: `slots` slots, each `[layers, conv + ssm]` floats, so that
/// one slot is one contiguous run (saving or restoring a sequence is one copy).
#[derive(Debug, Clone)]
pub struct StatePool {
    layers: usize,
    conv: usize,
    ssm: usize,
    slots: usize,
    data: HugeBuf<f32>,
}

impl StatePool {
    pub fn new(spec: &CacheSpec, slots: usize) -> Self {
        let per = spec.recurrent_layers * (spec.conv_floats + spec.ssm_floats);
        StatePool {
            layers: spec.recurrent_layers,
            conv: spec.conv_floats,
            ssm: spec.ssm_floats,
            slots,
            data: resident_zeros(slots * per),
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    fn slot_floats(&self) -> usize {
        self.layers * (self.conv + self.ssm)
    }

    /// Bytes of one slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_floats() * 4
    }

    /// One slot's floats: every layer's conv state then SSM state, layer after layer.
    pub fn slot(&self, slot: u32) -> &[f32] {
        let n = self.slot_floats();
        &self.data[slot as usize * n..(slot as usize + 1) * n]
    }

    /// Zeroes a slot (a sequence starting from nothing).
    pub fn reset(&mut self, slot: u32) {
        let n = self.slot_floats();
        self.data[slot as usize * n..(slot as usize + 1) * n].fill(0.0);
    }

    /// Copies slot `from` into slot `to` (saving or restoring a snapshot).
    pub fn copy(&mut self, from: u32, to: u32) {
        let n = self.slot_floats();
        if from != to {
            self.data.copy_within(from as usize * n..(from as usize + 1) * n, to as usize * n);
        }
    }

    /// Mutable views of several distinct slots, in the order asked; `None` if a slot repeats or
    /// is out of range.
    pub(crate) fn slots_mut(&mut self, wanted: &[u32]) -> Option<Vec<SlotMut<'_>>> {
        let n = self.slot_floats();
        let mut order: Vec<(u32, usize)> = wanted.iter().copied().zip(0..).collect();
        order.sort_unstable();
        if order.windows(2).any(|w| w[0].0 == w[1].0) || order.last().is_some_and(|l| l.0 as usize >= self.slots) {
            return None;
        }
        let mut out: Vec<Option<SlotMut<'_>>> = (0..wanted.len()).map(|_| None).collect();
        let (mut rest, mut base) = (&mut self.data[..], 0usize);
        for (slot, at) in order {
            let skip = slot as usize * n - base;
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
            let (mine, tail) = tail.split_at_mut(n);
            rest = tail;
            base = (slot as usize + 1) * n;
            out[at] = Some(SlotMut { data: mine, conv: self.conv, ssm: self.ssm });
        }
        Some(out.into_iter().flatten().collect())
    }
}

/// One sequence's recurrent state, borrowed from the pool.
#[derive(Debug)]
pub(crate) struct SlotMut<'a> {
    data: &'a mut [f32],
    conv: usize,
    ssm: usize,
}

impl SlotMut<'_> {
    /// Conv state `[K-1, channels]` and SSM state `[channels, state]` of recurrent layer `layer`.
    pub(crate) fn layer(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        let per = self.conv + self.ssm;
        self.data[layer * per..(layer + 1) * per].split_at_mut(self.conv)
    }
}

/// `n` zeros with every page touched now. The memory budget is taken at start-up for real: a
/// machine without room for it fails here rather than mid-request, no request pays the page
/// faults, and the process's resident size stays flat while it serves.
pub fn resident_zeros(n: usize) -> HugeBuf<f32> {
    let mut v = HugeBuf::<f32>::zeroed(n);
    const PAGE_FLOATS: usize = 4096 / std::mem::size_of::<f32>();
    for i in (0..n).step_by(PAGE_FLOATS) {
        // A volatile store: writing the zero already there must not be optimised away.
        // SAFETY: `i < n`, so the pointer is inside the vector's initialised length.
        unsafe { std::ptr::write_volatile(v.as_mut_ptr().add(i), 0.0) };
    }
    v
}

/// Everything a model keeps between forward calls for the sequences that share it.
#[derive(Debug, Clone)]
pub struct Cache {
    pub kv: KvPool,
    pub states: StatePool,
}

impl Cache {
    /// Pools for `blocks` KV blocks of `block_size` positions and `slots` recurrent-state slots.
    pub fn new(spec: &CacheSpec, block_size: usize, blocks: usize, slots: usize) -> Self {
        Cache {
            kv: KvPool::new(spec.attention_layers, spec.kv_dim, block_size, blocks),
            states: StatePool::new(spec, slots),
        }
    }

    /// Bytes the pools hold.
    pub fn bytes(&self) -> usize {
        self.kv.blocks() * self.kv.block_bytes() + self.states.slots() * self.states.slot_bytes()
    }
}

/// Which logits a batch item wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    /// The last token's (the next-token distribution).
    Last,
    /// Every token's (prompt scoring).
    All,
}

/// One sequence's share of a batched forward pass.
#[derive(Clone, Copy, Debug)]
pub struct BatchItem<'a> {
    /// New tokens of this sequence.
    pub tokens: &'a [u32],
    /// Position of the first new token (earlier positions are already in the pool).
    pub start: usize,
    /// The sequence's block table, covering at least `start + tokens.len()` positions.
    pub blocks: &'a [u32],
    /// The sequence's recurrent-state slot (models with recurrent layers need one).
    pub state_slot: Option<u32>,
    pub logits: Logits,
    /// The tokens are given (a prompt), not sampled: on CPUs with tile units (Intel AMX) their
    /// rows are computed in bf16 tiles, sampled rows by the integer kernels. A row's kernel
    /// depends on this role alone, never on what else shares the step.
    pub prompt: bool,
}

/// Refuses a batch no architecture can run: a pool made for another shape, an empty item,
/// positions past the context, tokens outside the vocabulary, a block table that does not cover
/// the positions (when the model has attention layers).
pub(crate) fn check_items(
    items: &[BatchItem<'_>],
    kv: &KvPool,
    spec: &CacheSpec,
    vocab: usize,
) -> Result<(), crate::ModelError> {
    use crate::ModelError::Input;
    if kv.layers != spec.attention_layers || kv.kv_dim != spec.kv_dim {
        return Err(Input("KV pool was made for another model".into()));
    }
    let bs = kv.block_size;
    for it in items {
        let end = it.start + it.tokens.len();
        if it.tokens.is_empty() {
            return Err(Input("no tokens to run".into()));
        }
        if end > spec.context {
            return Err(Input(format!("sequence of {end} tokens exceeds the context length {}", spec.context)));
        }
        if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Input(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let covered =
            it.blocks.len() * bs >= end && it.blocks[..end.div_ceil(bs)].iter().all(|&b| (b as usize) < kv.blocks());
        if spec.attention_layers > 0 && !covered {
            return Err(Input("block table does not cover the sequence".into()));
        }
    }
    Ok(())
}
