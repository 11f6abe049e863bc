//! The Llama architecture (SmolLM2, Llama 2/3, Mistral-style GQA models) from GGUF.
//!
//! Forward pass, per layer: `x += Wo·attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x))`, then
//! `x += Wdown·(silu(Wgate·n(x)) ⊙ Wup·n(x))`, with `n` an RMSNorm; logits = `Wout·n(x)` where
//! `Wout` is the token embedding when the model ties them. GGUF llama files store q/k rows
//! permuted so that RoPE rotates adjacent pairs (jamba-arch.md §7.3).
//! Reference: Touvron et al. 2023, "Llama 2"; llama.cpp `src/models/llama.cpp`.

use crate::cache::{BatchItem, KvPool, Logits};
use crate::gguf::{GgufError, GgufFile, TensorInfo};
use crate::ModelError;
use taipan_kernels::matmul::MatmulScratch;
use taipan_kernels::ops::{self, AttentionShape, AttnSeq, KvLayer, Rope, RopeStyle};
use taipan_kernels::{formats, Compute, DType, MatmulMode, Matrix};

/// Validated hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_dims: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub vocab: usize,
    pub context: usize,
}

impl LlamaConfig {
    /// Reads `llama.*` (or `<arch>.*`) keys.
    pub fn from_gguf(f: &GgufFile, arch: &str) -> Result<Self, GgufError> {
        let key = |k: &str| format!("{arch}.{k}");
        let d_model = f.get_u64(&key("embedding_length"))? as usize;
        let heads = f.get_u64(&key("attention.head_count"))? as usize;
        let kv_heads = f.get_u64(&key("attention.head_count_kv")).unwrap_or(heads as u64) as usize;
        let head_dim = f.get_u64(&key("attention.key_length")).map(|v| v as usize).unwrap_or(d_model / heads.max(1));
        let vocab = match f.get_u64(&key("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => f.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let cfg = LlamaConfig {
            layers: f.get_u64(&key("block_count"))? as usize,
            d_model,
            d_ff: f.get_u64(&key("feed_forward_length"))? as usize,
            heads,
            kv_heads,
            head_dim,
            rope_dims: f.get_u64(&key("rope.dimension_count")).map(|v| v as usize).unwrap_or(head_dim),
            rope_base: f.get_f64(&key("rope.freq_base")).unwrap_or(10000.0) as f32,
            rms_eps: f.get_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32,
            vocab,
            context: f.get_u64(&key("context_length")).unwrap_or(4096) as usize,
        };
        let bad = |message: String| GgufError::Corrupt {
            path: f.path.clone(),
            what: format!("{arch} hyper-parameters"),
            message,
        };
        if cfg.heads == 0 || cfg.kv_heads == 0 || !cfg.heads.is_multiple_of(cfg.kv_heads) {
            return Err(bad(format!("{} heads cannot be grouped over {} kv heads", cfg.heads, cfg.kv_heads)));
        }
        if cfg.layers == 0 || cfg.d_model == 0 || cfg.d_ff == 0 || cfg.head_dim == 0 || cfg.vocab == 0 {
            return Err(bad("a dimension is zero".into()));
        }
        use super::{MAX_CONTEXT, MAX_HEADS, MAX_HEAD_DIM, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH};
        let bounds = [
            ("block_count", cfg.layers, MAX_LAYERS),
            ("embedding_length", cfg.d_model, MAX_WIDTH),
            ("feed_forward_length", cfg.d_ff, MAX_WIDTH),
            ("attention.head_count", cfg.heads, MAX_HEADS),
            ("attention.key_length", cfg.head_dim, MAX_HEAD_DIM),
            ("vocab_size", cfg.vocab, MAX_VOCAB),
            ("context_length", cfg.context, MAX_CONTEXT),
        ];
        for (field, value, max) in bounds {
            if value > max {
                return Err(bad(format!("{arch}.{field} = {value} is beyond the supported maximum {max}")));
            }
        }
        if cfg.context == 0 {
            return Err(bad(format!("{arch}.context_length is zero")));
        }
        if cfg.rope_dims > cfg.head_dim || !cfg.rope_dims.is_multiple_of(2) {
            return Err(bad(format!("rope dimension {} does not fit head size {}", cfg.rope_dims, cfg.head_dim)));
        }
        Ok(cfg)
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Keys and values in every layer; no recurrent state.
    pub fn cache_spec(&self) -> crate::CacheSpec {
        crate::CacheSpec {
            attention_layers: self.layers,
            kv_dim: self.kv_dim(),
            recurrent_layers: 0,
            conv_floats: 0,
            ssm_floats: 0,
            context: self.context,
        }
    }
}

/// One transformer block's weights.
#[derive(Debug)]
struct Layer {
    /// `[d_model]`
    attn_norm: Vec<f32>,
    /// `[q_dim + 2·kv_dim, d_model]`: q, k and v projections stacked, one product per step.
    wqkv: Matrix,
    /// `[d_model, q_dim]`
    wo: Matrix,
    /// `[d_model]`
    ffn_norm: Vec<f32>,
    /// `[2·d_ff, d_model]`: gate then up.
    w_gate_up: Matrix,
    /// `[d_model, d_ff]`
    w_down: Matrix,
}

/// Where token embeddings come from.
#[derive(Debug)]
enum Embedding {
    /// Kept in their stored format (`[vocab, d_model]`); rows are dequantized on lookup.
    Stored { dtype: DType, data: Vec<u8>, row_bytes: usize },
    /// The model ties its output matrix to the embedding: rows are read from the output
    /// matrix rather than kept twice.
    Tied,
}

/// A Llama model's weights.
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    /// `[d_model]`
    out_norm: Vec<f32>,
    /// `[vocab, d_model]`
    output: Matrix,
    rope: Rope,
    pub mode: MatmulMode,
}

/// Buffers of one forward pass, kept between calls.
#[derive(Debug, Default)]
pub struct LlamaScratch {
    /// Position of every row of the batch, and its rotary angles `[rows, rope_dims/2]`.
    positions: Vec<usize>,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    /// Rows whose logits are wanted.
    logit_rows: Vec<usize>,
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    pub logits: Vec<f32>,
    mm: MatmulScratch,
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

fn load_f32(f: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let t = f.tensor_shaped(name, &[n as u64])?;
    let mut out = vec![0f32; n];
    formats::dequantize(t.dtype, f.tensor_data(t), &mut out).map_err(|e| ModelError::tensor(f, name, e.to_string()))?;
    Ok(out)
}

/// Loads one or more matrices that share an input dimension, stacked by rows.
fn load_stacked(f: &GgufFile, names: &[(&str, usize)], cols: usize, mode: MatmulMode) -> Result<Matrix, ModelError> {
    let infos: Vec<&TensorInfo> =
        names.iter().map(|(n, rows)| f.tensor_shaped(n, &[cols as u64, *rows as u64])).collect::<Result<_, _>>()?;
    let rows: usize = names.iter().map(|(_, r)| r).sum();
    let same = infos.iter().all(|t| t.dtype == infos[0].dtype);
    let result = if same {
        let mut bytes = Vec::with_capacity(infos.iter().map(|t| t.bytes as usize).sum());
        for t in &infos {
            bytes.extend_from_slice(f.tensor_data(t));
        }
        Matrix::from_stored(infos[0].dtype, &bytes, rows, cols, mode)
    } else {
        // Parts in different formats stay apart, each in its own packed form.
        let mut parts = Vec::with_capacity(infos.len());
        for (t, (name, r)) in infos.iter().zip(names) {
            let part = Matrix::from_stored(t.dtype, f.tensor_data(t), *r, cols, mode)
                .map_err(|e| ModelError::tensor(f, name, e.to_string()))?;
            parts.push(part);
        }
        Ok(Matrix::stack(parts))
    };
    result.map_err(|e| ModelError::tensor(f, names[0].0, e.to_string()))
}

impl Llama {
    pub fn from_gguf(f: &GgufFile, arch: &str, mode: MatmulMode) -> Result<Self, ModelError> {
        let c = LlamaConfig::from_gguf(f, arch)?;
        let (d, qd, kvd) = (c.d_model, c.q_dim(), c.kv_dim());
        let emb = f.tensor_shaped("token_embd.weight", &[d as u64, c.vocab as u64])?;
        let row_bytes = emb
            .dtype
            .row_bytes(d)
            .ok_or_else(|| ModelError::tensor(f, "token_embd.weight", "row is not whole blocks".into()))?;
        let tied = !f.has_tensor("output.weight");
        let embedding = if tied {
            Embedding::Tied
        } else {
            Embedding::Stored { dtype: emb.dtype, data: f.tensor_data(emb).to_vec(), row_bytes }
        };
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: load_f32(f, &n("attn_norm"), d)?,
                wqkv: load_stacked(f, &[(&n("attn_q"), qd), (&n("attn_k"), kvd), (&n("attn_v"), kvd)], d, mode)?,
                wo: load_stacked(f, &[(&n("attn_output"), d)], qd, mode)?,
                ffn_norm: load_f32(f, &n("ffn_norm"), d)?,
                w_gate_up: load_stacked(f, &[(&n("ffn_gate"), c.d_ff), (&n("ffn_up"), c.d_ff)], d, mode)?,
                w_down: load_stacked(f, &[(&n("ffn_down"), d)], c.d_ff, mode)?,
            });
        }
        let out_name = if tied { "token_embd.weight" } else { "output.weight" };
        let output = load_stacked(f, &[(out_name, c.vocab)], d, mode)?;
        let rope = Rope::new(c.rope_dims, c.rope_base);
        Ok(Llama { out_norm: load_f32(f, "output_norm.weight", d)?, config: c, embedding, layers, output, rope, mode })
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| l.wqkv.memory_bytes() + l.wo.memory_bytes() + l.w_gate_up.memory_bytes() + l.w_down.memory_bytes())
            .sum();
        let embedding = match &self.embedding {
            Embedding::Stored { data, .. } => data.len(),
            Embedding::Tied => 0,
        };
        l + self.output.memory_bytes() + embedding
    }

    /// One forward pass over several sequences at once: every weight matrix is read once for all
    /// their tokens. Keys and values of the new tokens are written to `pool` through each item's
    /// block table. Logits land in `scratch.logits`, one row per wanted token, in item order.
    pub fn forward_batch(
        &self,
        compute: &Compute,
        items: &[BatchItem<'_>],
        pool: &mut KvPool,
        scratch: &mut LlamaScratch,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        crate::cache::check_items(items, pool, &c.cache_spec(), c.vocab)?;
        let bs = pool.block_size;
        let t_n: usize = items.iter().map(|it| it.tokens.len()).sum();
        let (d, qd, kvd, ff) = (c.d_model, c.q_dim(), c.kv_dim(), c.d_ff);
        let qkv_w = qd + 2 * kvd;
        let s = scratch;
        s.positions.clear();
        s.logit_rows.clear();
        for it in items {
            let first = s.positions.len();
            s.positions.extend(it.start..it.start + it.tokens.len());
            match it.logits {
                Logits::None => {}
                Logits::Last => s.logit_rows.push(s.positions.len() - 1),
                Logits::All => s.logit_rows.extend(first..s.positions.len()),
            }
        }
        self.rope.angles(&s.positions, &mut s.rope_cos, &mut s.rope_sin);
        let half = c.rope_dims / 2;
        grow(&mut s.x, t_n * d);
        grow(&mut s.h, t_n * d);
        grow(&mut s.qkv, t_n * qkv_w);
        grow(&mut s.q, t_n * qd);
        grow(&mut s.att, t_n * qd);
        grow(&mut s.proj, t_n * d);
        grow(&mut s.gate_up, t_n * 2 * ff);
        grow(&mut s.act, t_n * ff);
        let x = &mut s.x[..t_n * d];
        for (t, &tok) in items.iter().flat_map(|it| it.tokens).enumerate() {
            let out = &mut x[t * d..(t + 1) * d];
            match &self.embedding {
                Embedding::Stored { dtype, data, row_bytes } => {
                    let row = &data[tok as usize * row_bytes..][..*row_bytes];
                    formats::dequantize(*dtype, row, out).map_err(|e| ModelError::Input(e.to_string()))?;
                }
                Embedding::Tied => self.output.row_f32(tok as usize, out),
            }
        }
        let mut attn_seqs = Vec::with_capacity(items.len());
        let mut row = 0;
        for it in items {
            attn_seqs.push(AttnSeq { first_row: row, tokens: it.tokens.len(), start: it.start, blocks: it.blocks });
            row += it.tokens.len();
        }
        let shape = AttentionShape {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let h = &mut s.h[..t_n * d];
            ops::rms_norm_into(h, &x[..h.len()], &layer.attn_norm, c.rms_eps);
            let qkv = &mut s.qkv[..t_n * qkv_w];
            compute.matmul(qkv, h, t_n, &layer.wqkv, &mut s.mm);
            let q = &mut s.q[..t_n * qd];
            for (t, it_row) in qkv.chunks_exact_mut(qkv_w).enumerate() {
                let (cos, sin) = (&s.rope_cos[t * half..(t + 1) * half], &s.rope_sin[t * half..(t + 1) * half]);
                self.rope.apply(&mut it_row[..qd + kvd], c.head_dim, cos, sin, RopeStyle::Adjacent);
                q[t * qd..(t + 1) * qd].copy_from_slice(&it_row[..qd]);
            }
            let mut t = 0;
            for it in items {
                for pos in it.start..it.start + it.tokens.len() {
                    let r = &qkv[t * qkv_w..(t + 1) * qkv_w];
                    pool.write(li, it.blocks[pos / bs], pos % bs, &r[qd..qd + kvd], &r[qd + kvd..]);
                    t += 1;
                }
            }
            let att = &mut s.att[..t_n * qd];
            let (k, v) = pool.layer(li);
            ops::attention(
                &compute.kernels,
                att,
                q,
                KvLayer { k, v, block_size: bs },
                &attn_seqs,
                shape,
                &compute.pool,
            );
            let proj = &mut s.proj[..t_n * d];
            compute.matmul(proj, att, t_n, &layer.wo, &mut s.mm);
            ops::add_in_place(x, proj);
            let h = &mut s.h[..t_n * d];
            ops::rms_norm_into(h, &x[..h.len()], &layer.ffn_norm, c.rms_eps);
            let gu = &mut s.gate_up[..t_n * 2 * ff];
            compute.matmul(gu, h, t_n, &layer.w_gate_up, &mut s.mm);
            let act = &mut s.act[..t_n * ff];
            for t in 0..t_n {
                let (g, u) = gu[t * 2 * ff..(t + 1) * 2 * ff].split_at(ff);
                for ((a, &gv), &uv) in act[t * ff..(t + 1) * ff].iter_mut().zip(g).zip(u) {
                    *a = ops::silu(gv) * uv;
                }
            }
            compute.matmul(proj, act, t_n, &layer.w_down, &mut s.mm);
            ops::add_in_place(x, proj);
        }
        let rows = s.logit_rows.len();
        if s.logits.len() != rows * c.vocab {
            s.logits.resize(rows * c.vocab, 0.0);
        }
        if rows == 0 {
            return Ok(());
        }
        let h = &mut s.h[..rows * d];
        for (i, &t) in s.logit_rows.iter().enumerate() {
            ops::rms_norm_into(&mut h[i * d..(i + 1) * d], &x[t * d..(t + 1) * d], &self.out_norm, c.rms_eps);
        }
        compute.matmul(&mut s.logits, h, rows, &self.output, &mut s.mm);
        Ok(())
    }
}
