//! Jamba's attention mixer: grouped-query attention without positional encoding (the Mamba
//! layers carry position), over the paged KV pool shared by every sequence of the batch.

use super::{resize, JambaConfig};
use crate::cache::KvPool;
use taipan_kernels::matmul::MatmulScratch;
use taipan_kernels::ops::{self, AttentionShape, AttnSeq, KvLayer};
use taipan_kernels::{Compute, Matrix};

#[derive(Debug)]
pub(super) struct Attention {
    /// `[nH·hd + 2·nKV·hd, H]`: q, k and v stacked, one product per step.
    pub wqkv: Matrix,
    /// `[H, nH·hd]`
    pub wo: Matrix,
    /// This layer's index among the attention layers (its layer in the KV pool).
    pub kv_layer: usize,
}

#[derive(Debug, Default)]
pub(super) struct AttentionScratch {
    /// `[rows, nH·hd + 2·nKV·hd]`
    qkv: Vec<f32>,
    /// `[rows, nH·hd]`
    q: Vec<f32>,
    /// `[rows, nH·hd]`
    att: Vec<f32>,
}

impl Attention {
    pub fn weight_bytes(&self) -> usize {
        self.wqkv.memory_bytes() + self.wo.memory_bytes()
    }

    /// `out = Wo · attention(q, K, V)` for every row of `normed`, after writing the rows' keys and
    /// values into their sequences' blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        compute: &Compute,
        c: &JambaConfig,
        seqs: &[AttnSeq<'_>],
        normed: &[f32],
        out: &mut [f32],
        kv: &mut KvPool,
        s: &mut AttentionScratch,
        mm: &mut MatmulScratch,
    ) {
        let rows = normed.len() / c.hidden;
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let w = qd + 2 * kvd;
        let qkv = resize(&mut s.qkv, rows * w);
        compute.matmul(qkv, normed, rows, &self.wqkv, mm);
        let q = resize(&mut s.q, rows * qd);
        let bs = kv.block_size;
        for seq in seqs {
            for t in 0..seq.tokens {
                let row = seq.first_row + t;
                let r = &qkv[row * w..(row + 1) * w];
                q[row * qd..(row + 1) * qd].copy_from_slice(&r[..qd]);
                let pos = seq.start + t;
                kv.write(self.kv_layer, seq.blocks[pos / bs], pos % bs, &r[qd..qd + kvd], &r[qd + kvd..]);
            }
        }
        let att = resize(&mut s.att, rows * qd);
        let shape = AttentionShape {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: None,
        };
        let (k, v) = kv.layer(self.kv_layer);
        ops::attention(&compute.kernels, att, q, KvLayer { k, v, block_size: bs }, seqs, shape, &compute.pool);
        compute.matmul(out, att, rows, &self.wo, mm);
    }
}
