//! The block manager: which KV blocks are free, which are in use (and by how many sequences),
//! and which hold a known prefix that a later request may reuse.
//!
//! A full block is identified by a hash chained over every token before it, so a hit on block `i`
//! implies the whole prefix up to it matches (tokens are compared too, so a hash collision cannot
//! hand out wrong keys). Unreferenced cached blocks stay reusable until the pool needs them,
//! least recently used first. Only full blocks are ever shared, so shared blocks are immutable.
//!
//! Recurrent models (Jamba) need per-sequence state that cannot be rewound; a prefix hit there
//! needs a saved state at exactly the hit's end, which the scheduler keeps beside these blocks
//! (holding references to the blocks of its prefix).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Hash of a full block's tokens, chained on the hash of everything before it.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug, Clone)]
struct CachedBlock {
    hash: u64,
    parent: u64,
    tokens: Vec<u32>,
}

/// Allocation, reference counts and the prefix cache of a fixed pool of blocks.
#[derive(Debug)]
pub struct BlockManager {
    pub block_size: usize,
    refs: Vec<u32>,
    /// Blocks holding nothing reusable.
    free: Vec<u32>,
    /// Content of blocks registered in the prefix cache.
    content: Vec<Option<CachedBlock>>,
    by_hash: HashMap<u64, u32>,
    /// Unreferenced cached blocks by last use.
    idle: BTreeMap<u64, u32>,
    idle_tick: Vec<u64>,
    tick: u64,
}

impl BlockManager {
    pub fn new(blocks: usize, block_size: usize) -> Self {
        BlockManager {
            block_size,
            refs: vec![0; blocks],
            free: (0..blocks as u32).rev().collect(),
            content: vec![None; blocks],
            by_hash: HashMap::new(),
            idle: BTreeMap::new(),
            idle_tick: vec![0; blocks],
            tick: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be handed out now (free, or cached but unreferenced).
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    /// Blocks holding a reusable prefix.
    pub fn cached(&self) -> usize {
        self.by_hash.len()
    }

    fn forget(&mut self, b: u32) {
        if let Some(c) = self.content[b as usize].take() {
            self.by_hash.remove(&c.hash);
        }
    }

    /// A block for exclusive use, evicting the least recently used cached block if needed.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (&tick, &b) = self.idle.iter().next()?;
                self.idle.remove(&tick);
                self.forget(b);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Drops one reference.
    pub fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        // A second release would put the block on the free list twice and hand it to two
        // sequences: stop here (the engine then reports itself dead) rather than corrupt answers.
        assert!(*r > 0, "releasing free block {b}: block bookkeeping is broken");
        *r -= 1;
        if *r == 0 {
            if self.content[b as usize].is_some() {
                self.tick += 1;
                self.idle_tick[b as usize] = self.tick;
                self.idle.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Takes one more reference on a block that is in use or cached (sharing a prefix).
    pub fn share(&mut self, b: u32) {
        self.take_ref(b);
    }

    fn take_ref(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            self.idle.remove(&self.idle_tick[b as usize]);
        }
        self.refs[b as usize] += 1;
    }

    /// The cached blocks covering the longest block-aligned prefix of `tokens`, each now
    /// referenced by the caller. At least one token is always left to compute.
    pub fn match_prefix(&mut self, tokens: &[u32]) -> (Vec<u32>, Vec<u64>) {
        let bs = self.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = 0u64;
        for i in 0..max_blocks {
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let h = block_hash(parent, chunk);
            let Some(&b) = self.by_hash.get(&h) else { break };
            let ok = self.content[b as usize].as_ref().is_some_and(|c| c.parent == parent && c.tokens == chunk);
            if !ok {
                break;
            }
            self.take_ref(b);
            blocks.push(b);
            hashes.push(h);
            parent = h;
        }
        (blocks, hashes)
    }

    /// Records that block `b` now holds the full block `tokens` after the prefix hashed `parent`.
    /// Returns its hash. A prefix already cached elsewhere keeps its first block.
    pub fn register(&mut self, b: u32, parent: u64, tokens: &[u32]) -> u64 {
        let h = block_hash(parent, tokens);
        if self.content[b as usize].is_none() && !self.by_hash.contains_key(&h) {
            self.content[b as usize] = Some(CachedBlock { hash: h, parent, tokens: tokens.to_vec() });
            self.by_hash.insert(h, b);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "releasing free block")]
    fn releasing_a_free_block_is_refused_in_every_build() {
        let mut m = BlockManager::new(4, 16);
        let b = m.allocate().expect("a block");
        m.release(b);
        m.release(b);
    }

    #[test]
    fn allocate_release_and_reuse_prefixes() {
        let mut m = BlockManager::new(4, 2);
        let toks = [1, 2, 3, 4, 5];
        let a = m.allocate().unwrap();
        let b = m.allocate().unwrap();
        let h0 = m.register(a, 0, &toks[0..2]);
        m.register(b, h0, &toks[2..4]);
        assert_eq!(m.used(), 2);
        m.release(a);
        m.release(b);
        assert_eq!((m.used(), m.cached(), m.available()), (0, 2, 4));
        // Same prefix: both blocks come back; at least one token is left to compute.
        let (hit, _) = m.match_prefix(&toks);
        assert_eq!(hit, vec![a, b]);
        assert_eq!(m.used(), 2);
        let (hit, _) = m.match_prefix(&toks[..4]);
        assert_eq!(hit, vec![a], "the last token must be computed");
        // A different second block stops the match after the first.
        let (hit, _) = m.match_prefix(&[1, 2, 9, 9, 9]);
        assert_eq!(hit, vec![a]);
    }

    #[test]
    fn eviction_takes_least_recently_used_cached_blocks_last() {
        let mut m = BlockManager::new(2, 1);
        let a = m.allocate().unwrap();
        let b = m.allocate().unwrap();
        m.register(a, 0, &[7]);
        m.register(b, 0, &[8]);
        m.release(a);
        m.release(b);
        assert!(m.allocate().is_some());
        // `a` was idle longest, so it went first; the prefix [8] survives.
        assert_eq!(m.match_prefix(&[8, 0]).0, vec![b]);
        assert_eq!(m.match_prefix(&[7, 0]).0, Vec::<u32>::new());
        assert!(m.allocate().is_none(), "every block is referenced");
    }
}
