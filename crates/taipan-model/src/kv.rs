//! Paged storage for attention keys and values.
//!
//! The pool is a fixed number of blocks of `block_size` positions; a sequence owns a block table
//! (block ids in position order), so sequences grow without copying and share whole blocks of a
//! common prefix. The pool is allocated once: memory does not grow with the number of requests.

/// Keys and values of every attention layer, in blocks.
#[derive(Debug, Clone)]
pub struct KvPool {
    pub layers: usize,
    /// Floats per position per layer (`kv_heads · head_dim`).
    pub kv_dim: usize,
    pub block_size: usize,
    blocks: usize,
    /// Per layer `[blocks, block_size, kv_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvPool {
    /// A pool of `blocks` blocks. Memory is zero-initialised lazily by the OS, so untouched
    /// blocks cost no resident memory.
    pub fn new(layers: usize, kv_dim: usize, block_size: usize, blocks: usize) -> Self {
        let n = blocks * block_size * kv_dim;
        KvPool {
            layers,
            kv_dim,
            block_size,
            blocks,
            k: (0..layers).map(|_| vec![0f32; n]).collect(),
            v: (0..layers).map(|_| vec![0f32; n]).collect(),
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
            l.resize(n, 0.0);
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
    pub logits: Logits,
}
