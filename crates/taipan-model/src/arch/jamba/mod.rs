//! Jamba: a hybrid of attention and Mamba (selective state-space) layers, with mixture-of-experts
//! FFNs on some layers (Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model";
//! reference code: transformers `models/jamba/modeling_jamba.py`, llama.cpp `src/models/jamba.cpp`).
//!
//! Per layer: `x += mixer(norm(x))` with the mixer attention (GQA, no positional encoding, see
//! `attention`) or a Mamba-1 mixer (see `mamba`); then `x += ffn(norm(x))` with the FFN a dense
//! SwiGLU MLP or a softmax-routed top-k mixture of such MLPs (see `ffn`).
//! Loaded from a Hugging Face directory (config.json + safetensors) or a llama.cpp `jamba` GGUF;
//! both are read through GGUF tensor names (see `names`, `load`).
//!
//! One forward pass runs a whole batch: every projection, MLP and expert is one product over the
//! rows of all sequences; only the causal conv and the selective scan run per sequence, on that
//! sequence's state slot, and attention per sequence over its own blocks.

mod attention;
mod config;
mod ffn;
mod load;
mod mamba;
mod names;

use crate::cache::{BatchItem, Cache, Logits};
use crate::ModelError;
use attention::Attention;
pub use config::JambaConfig;
use ffn::Ffn;
use mamba::Mamba;
pub use names::hf_name;
use std::time::Instant;
use taipan_kernels::matmul::MatmulScratch;
use taipan_kernels::ops::{self, AttnSeq};
use taipan_kernels::{formats, Compute, DType, Matrix};

#[derive(Debug)]
enum Mixer {
    Attention(Attention),
    Mamba(Box<Mamba>),
}

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    mixer: Mixer,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
}

/// A Jamba model's weights.
#[derive(Debug)]
pub struct Jamba {
    pub config: JambaConfig,
    emb_dtype: DType,
    /// `[V, H]` as stored.
    embedding: Vec<u8>,
    emb_row_bytes: usize,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    /// `[V, H]`
    output: Matrix,
}

/// Buffers of one forward pass, kept between calls so that a step allocates nothing.
#[derive(Debug, Default)]
pub struct JambaScratch {
    /// Residual stream `[rows, H]`.
    x: Vec<f32>,
    /// The current block's normalised input `[rows, H]`.
    normed: Vec<f32>,
    /// The current mixer's or FFN's output `[rows, H]`.
    out: Vec<f32>,
    attention: attention::AttentionScratch,
    mamba: mamba::MambaScratch,
    ffn: ffn::FfnScratch,
    mm: MatmulScratch,
    /// Rows whose logits are wanted.
    logit_rows: Vec<usize>,
    /// `[logit rows, V]`
    pub logits: Vec<f32>,
    /// When set, every layer's intermediate outputs are recorded here (for debugging numerics).
    pub trace: Option<Vec<(String, Vec<f32>)>>,
    /// When set, seconds spent in attention, Mamba mixers, routed experts, dense MLPs, and the
    /// rest (embedding, norms, output head) are added here.
    pub profile: Option<[f64; 5]>,
}

/// Names of the entries of [`JambaScratch::profile`].
pub const PROFILE_PARTS: [&str; 5] = ["attention", "mamba mixer", "experts (MoE)", "dense MLP", "other"];

/// The first `n` elements of `v`, grown if needed.
pub(crate) fn resize(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

impl Jamba {
    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let mixer = match &l.mixer {
                    Mixer::Attention(a) => a.weight_bytes(),
                    Mixer::Mamba(m) => m.weight_bytes(),
                };
                mixer + l.ffn.weight_bytes()
            })
            .sum();
        layers + self.embedding.len() + self.output.memory_bytes()
    }

    /// Refuses a batch the pass cannot run: what [`crate::cache::check_items`] refuses, and
    /// missing state slots (shared ones are refused when the slots are borrowed).
    fn check_batch(&self, items: &[BatchItem<'_>], cache: &Cache) -> Result<(), ModelError> {
        let c = &self.config;
        crate::cache::check_items(items, &cache.kv, &c.cache_spec(), c.vocab)?;
        for it in items {
            match it.state_slot {
                Some(s) if (s as usize) < cache.states.slots() => {}
                Some(s) => return Err(ModelError::Input(format!("state slot {s} is outside the pool"))),
                None => return Err(ModelError::Input("a Jamba sequence needs a recurrent-state slot".into())),
            }
        }
        Ok(())
    }

    /// One forward pass over `items` (see [`crate::Model::forward_batch`]).
    pub fn forward_batch(
        &self,
        compute: &Compute,
        items: &[BatchItem<'_>],
        cache: &mut Cache,
        s: &mut JambaScratch,
    ) -> Result<(), ModelError> {
        self.check_batch(items, cache)?;
        let c = &self.config;
        let h = c.hidden;
        let mut seqs = Vec::with_capacity(items.len());
        let mut rows = 0;
        s.logit_rows.clear();
        s.mm.prompt_rows.clear();
        let tile_attention = taipan_kernels::tiles::attention_panels_fit(c.kv_heads, c.head_dim, c.context);
        for it in items {
            seqs.push(AttnSeq {
                first_row: rows,
                tokens: it.tokens.len(),
                start: it.start,
                blocks: it.blocks,
                prompt: it.prompt && tile_attention,
            });
            s.mm.prompt_rows.extend(std::iter::repeat_n(it.prompt, it.tokens.len()));
            match it.logits {
                Logits::None => {}
                Logits::Last => s.logit_rows.push(rows + it.tokens.len() - 1),
                Logits::All => s.logit_rows.extend(rows..rows + it.tokens.len()),
            }
            rows += it.tokens.len();
        }
        let slot_ids: Vec<u32> = items.iter().filter_map(|it| it.state_slot).collect();
        let Cache { kv, states } = cache;
        let mut slots = states
            .slots_mut(&slot_ids)
            .ok_or_else(|| ModelError::Input("two sequences of one batch share a state slot".into()))?;

        let started = Instant::now();
        let mut parts = [0f64; 5];
        // 1. Token embeddings.
        let x = resize(&mut s.x, rows * h);
        for (t, &tok) in items.iter().flat_map(|it| it.tokens).enumerate() {
            let row = &self.embedding[tok as usize * self.emb_row_bytes..][..self.emb_row_bytes];
            formats::dequantize(self.emb_dtype, row, &mut x[t * h..(t + 1) * h])
                .map_err(|e| ModelError::Input(e.to_string()))?;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            // 2. Mixer: x += mixer(norm(x)).
            let normed = resize(&mut s.normed, rows * h);
            ops::rms_norm_rows(&compute.pool, normed, x, &layer.attn_norm, c.rms_eps);
            let out = resize(&mut s.out, rows * h);
            let t0 = Instant::now();
            match &layer.mixer {
                Mixer::Attention(a) => {
                    a.forward(compute, c, &seqs, normed, out, kv, &mut s.attention, &mut s.mm);
                    parts[0] += t0.elapsed().as_secs_f64();
                }
                Mixer::Mamba(m) => {
                    m.forward(compute, c, &seqs, normed, out, &mut slots, &mut s.mamba, &mut s.mm);
                    parts[1] += t0.elapsed().as_secs_f64();
                }
            }
            if let Some(t) = s.trace.as_mut() {
                t.push((format!("layers.{li}.input_layernorm_out"), normed.to_vec()));
                t.push((format!("layers.{li}.mixer_out"), out.to_vec()));
            }
            ops::add_rows(&compute.pool, x, out, h);
            // 3. FFN: x += ffn(norm(x)).
            ops::rms_norm_rows(&compute.pool, normed, x, &layer.ffn_norm, c.rms_eps);
            let t0 = Instant::now();
            layer.ffn.forward(compute, h, normed, rows, out, &mut s.ffn, &mut s.mm);
            parts[if matches!(layer.ffn, Ffn::Moe { .. }) { 2 } else { 3 }] += t0.elapsed().as_secs_f64();
            ops::add_rows(&compute.pool, x, out, h);
            if let Some(t) = s.trace.as_mut() {
                t.push((format!("layers.{li}.pre_ff_layernorm_out"), normed.to_vec()));
                t.push((format!("layers.{li}.ffn_out"), out.to_vec()));
                t.push((format!("layers.{li}.out"), x.to_vec()));
            }
        }
        // 4. Logits of the rows that want them.
        let wanted = s.logit_rows.len();
        let normed = resize(&mut s.normed, wanted * h);
        for (i, &t) in s.logit_rows.iter().enumerate() {
            ops::rms_norm_into(&mut normed[i * h..(i + 1) * h], &x[t * h..(t + 1) * h], &self.out_norm, c.rms_eps);
        }
        if s.logits.len() != wanted * c.vocab {
            s.logits.resize(wanted * c.vocab, 0.0);
        }
        if wanted > 0 {
            // Logits rows are not token rows: the integer kernels take them all.
            s.mm.prompt_rows.clear();
            compute.matmul(&mut s.logits, normed, wanted, &self.output, &mut s.mm);
        }
        if let Some(p) = s.profile.as_mut() {
            let accounted: f64 = parts.iter().sum();
            parts[4] = (started.elapsed().as_secs_f64() - accounted).max(0.0);
            for (acc, v) in p.iter_mut().zip(parts) {
                *acc += v;
            }
        }
        Ok(())
    }
}
