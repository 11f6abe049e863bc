//! The Llama family of decoders from GGUF: `llama` (SmolLM2, Llama 2/3, Mistral-style GQA),
//! `qwen2`, `qwen3` and `gemma3`.
//!
//! Forward pass, per layer: `x += Wo·attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x))`, then
//! `x += Wdown·(silu(Wgate·n(x)) ⊙ Wup·n(x))`, with `n` an RMSNorm; logits = `Wout·n(x)` where
//! `Wout` is the token embedding when the model ties them. GGUF llama files store q/k rows
//! permuted so that RoPE rotates adjacent pairs (jamba-arch.md §7.3); the others rotate halves.
//! The family's variations, each switched on by what the file declares:
//! - q/k/v biases (`qwen2`; `llama` files that carry them);
//! - an RMSNorm over each q and k head before RoPE (`qwen3`, `gemma3`);
//! - `gemma3`: embeddings scaled by √hidden, GELU (tanh form) instead of SiLU, RMSNorms on the
//!   attention and FFN outputs before each residual add, sliding-window layers (five of every six
//!   by default) with their own RoPE base, optional final logit soft-capping;
//! - RoPE scaling (linear, YaRN) and per-pair frequency factors (`rope_freqs`, Llama 3.1+).
//!
//! References: Touvron et al. 2023, "Llama 2"; Gemma Team 2025, "Gemma 3 technical report";
//! llama.cpp `src/models/{llama,qwen2,qwen3,gemma3}.cpp`, whose GGUF reading this mirrors.

use crate::cache::{BatchItem, KvPool, Logits};
use crate::gguf::{GgufError, GgufFile, TensorInfo};
use crate::ModelError;
use taipan_kernels::huge::WeightArena;
use taipan_kernels::matmul::MatmulScratch;
use taipan_kernels::ops::{self, AttentionShape, AttnSeq, KvLayer, Rope, RopeScaling, RopeStyle};
use taipan_kernels::{formats, Compute, DType, MatmulMode, Matrix};

/// Which member of the family a file is (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Family {
    pub const NAMES: [&'static str; 4] = ["llama", "qwen2", "qwen3", "gemma3"];

    pub fn from_arch(name: &str) -> Option<Family> {
        match name {
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            "gemma3" => Some(Family::Gemma3),
            _ => None,
        }
    }

    pub fn arch(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3",
        }
    }

    /// llama.cpp's rope type for the architecture: only `llama`'s converter permutes q/k rows.
    fn rope_style(self) -> RopeStyle {
        match self {
            Family::Llama => RopeStyle::Adjacent,
            _ => RopeStyle::Half,
        }
    }
}

/// The feed-forward gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh form (Gemma).
    GeluTanh,
}

/// Sliding-window attention layers (Gemma 3's local layers).
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    /// Positions a query sees, itself included.
    pub window: usize,
    /// Per layer: true where the layer is local (windowed).
    pub local: Vec<bool>,
    /// RoPE base of the local layers (they are never scaled).
    pub rope_base: f32,
}

/// Validated hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub family: Family,
    pub layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_dims: usize,
    pub rope_base: f32,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    pub vocab: usize,
    pub context: usize,
    pub activation: Activation,
    /// Multiplies every token embedding (√hidden for Gemma).
    pub embed_scale: f32,
    /// Multiplies q·k before the softmax.
    pub attn_scale: f32,
    pub sliding: Option<SlidingWindow>,
    /// `c·tanh(logit/c)` on the output (Gemma 2/3 files may declare it).
    pub logit_softcap: Option<f32>,
}

impl LlamaConfig {
    /// Reads `<arch>.*` keys.
    pub fn from_gguf(f: &GgufFile, family: Family) -> Result<Self, GgufError> {
        let arch = family.arch();
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| f.get_opt_u64(&key(k)).map(|v| v.map(|v| v as usize));
        let fl = |k: &str| f.get_opt_f64(&key(k));
        let bad = |message: String| GgufError::Corrupt {
            path: f.path.clone(),
            what: format!("{arch} hyper-parameters"),
            message,
        };
        let d_model = f.get_u64(&key("embedding_length"))? as usize;
        let heads = f.get_u64(&key("attention.head_count"))? as usize;
        let kv_heads = u("attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = u("attention.key_length")?.unwrap_or(d_model / heads.max(1));
        if let Some(v) = u("attention.value_length")? {
            if v != head_dim {
                return Err(bad(format!("value heads of {v} beside key heads of {head_dim} are not supported")));
            }
        }
        let vocab = match u("vocab_size")? {
            Some(v) => v,
            None => f.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let layers = f.get_u64(&key("block_count"))? as usize;
        if layers > super::MAX_LAYERS {
            return Err(bad(format!(
                "{arch}.block_count = {layers} is beyond the supported maximum {}",
                super::MAX_LAYERS
            )));
        }
        let rope_base = fl("rope.freq_base")?.unwrap_or(10000.0) as f32;
        let context = u("context_length")?.unwrap_or(4096);
        let rope_scaling = Self::rope_scaling(f, arch, context, &bad)?;
        let rms_eps = fl("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f32;
        let mut sliding = None;
        let (mut activation, mut embed_scale, mut attn_scale, mut logit_softcap) =
            (Activation::Silu, 1.0, 1.0 / (head_dim as f32).sqrt(), None);
        if family == Family::Gemma3 {
            activation = Activation::GeluTanh;
            embed_scale = (d_model as f32).sqrt();
            // Gemma's query_pre_attn_scalar: the head size, except Gemma 3 27B (62 layers) whose
            // checkpoints use hidden/heads; GGUF does not carry it, so llama.cpp decides by depth.
            if layers == 62 {
                attn_scale = 1.0 / ((d_model / heads.max(1)) as f32).sqrt();
            }
            logit_softcap = fl("final_logit_softcapping")?.map(|v| v as f32).filter(|&c| c != 0.0);
            if let Some(window) = u("attention.sliding_window")?.filter(|&w| w > 0) {
                let local = match f.get(&key("attention.sliding_window_pattern")) {
                    None => (0..layers).map(|i| i % 6 < 5).collect(),
                    Some(crate::gguf::Value::Array(items)) => {
                        if items.len() != layers {
                            return Err(bad(format!(
                                "sliding_window_pattern has {} entries for {layers} layers",
                                items.len()
                            )));
                        }
                        let flags: Option<Vec<bool>> = items
                            .iter()
                            .map(|v| match v {
                                crate::gguf::Value::Bool(b) => Some(*b),
                                _ => None,
                            })
                            .collect();
                        flags.ok_or_else(|| bad("sliding_window_pattern is not an array of booleans".into()))?
                    }
                    Some(v) => {
                        let n =
                            v.as_u64().ok_or_else(|| bad("sliding_window_pattern is not an integer".into()))? as usize;
                        (0..layers).map(|i| n == 0 || i % n < n - 1).collect()
                    }
                };
                let rope_base = fl("rope.freq_base_swa")?.unwrap_or(10000.0) as f32;
                sliding = Some(SlidingWindow { window, local, rope_base });
            }
        } else if f.get(&key("attention.sliding_window")).is_some() {
            return Err(bad(format!(
                "{arch}.attention.sliding_window is set: sliding-window attention is supported for gemma3 only"
            )));
        }
        let cfg = LlamaConfig {
            family,
            layers,
            d_model,
            d_ff: f.get_u64(&key("feed_forward_length"))? as usize,
            heads,
            kv_heads,
            head_dim,
            rope_dims: u("rope.dimension_count")?.unwrap_or(head_dim),
            rope_base,
            rope_scaling,
            rms_eps,
            vocab,
            context,
            activation,
            embed_scale,
            attn_scale,
            sliding,
            logit_softcap,
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

    /// `rope.scaling.*` as llama.cpp reads it: type `none`, `linear` (the default when only a
    /// factor is given) or `yarn`; anything else is refused by name.
    fn rope_scaling(
        f: &GgufFile,
        arch: &str,
        context: usize,
        bad: &dyn Fn(String) -> GgufError,
    ) -> Result<RopeScaling, GgufError> {
        let key = |k: &str| format!("{arch}.{k}");
        let kind = f.get_opt_str(&key("rope.scaling.type"))?.unwrap_or("linear");
        let factor = match f.get_opt_f64(&key("rope.scaling.factor"))? {
            Some(v) => Some(v),
            None => f.get_opt_f64(&key("rope.scale_linear"))?,
        }
        .filter(|&v| v != 0.0)
        .unwrap_or(1.0) as f32;
        let attn_factor = f.get_opt_f64(&key("rope.scaling.attn_factor"))?.unwrap_or(1.0) as f32;
        if !(factor.is_finite() && factor > 0.0) {
            return Err(bad(format!("rope.scaling.factor = {factor} is not a positive number")));
        }
        if kind != "yarn" && attn_factor != 1.0 {
            return Err(bad(format!("rope.scaling.attn_factor = {attn_factor} with {kind} scaling is not supported")));
        }
        match kind {
            "none" => Ok(RopeScaling::None),
            "linear" if factor == 1.0 => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor }),
            "yarn" => {
                if f.get_opt_f64(&key("rope.scaling.yarn_log_multiplier"))?.is_some_and(|v| v != 0.0) {
                    return Err(bad("YaRN with rope.scaling.yarn_log_multiplier is not supported".into()));
                }
                if factor == 1.0 {
                    return Ok(RopeScaling::None);
                }
                let original_context =
                    f.get_opt_u64(&key("rope.scaling.original_context_length"))?.map_or(context, |v| v as usize);
                let beta = |k: &str, d: f64| f.get_opt_f64(&key(k)).map(|v| v.unwrap_or(d) as f32);
                Ok(RopeScaling::Yarn {
                    factor,
                    original_context,
                    beta_fast: beta("rope.scaling.yarn_beta_fast", 32.0)?,
                    beta_slow: beta("rope.scaling.yarn_beta_slow", 1.0)?,
                    attn_factor,
                })
            }
            other => Err(bad(format!("rope.scaling.type '{other}' is not supported (none, linear, yarn)"))),
        }
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
    /// `[q_dim + 2·kv_dim]`, where the model has q/k/v biases.
    qkv_bias: Option<Vec<f32>>,
    /// `[head_dim]` each: RMSNorm weights of every q and k head.
    qk_norms: Option<(Vec<f32>, Vec<f32>)>,
    /// `[d_model, q_dim]`
    wo: Matrix,
    /// `[d_model]`: RMSNorm on the attention output before the residual add (Gemma).
    post_attn_norm: Option<Vec<f32>>,
    /// `[d_model]`
    ffn_norm: Vec<f32>,
    /// `[2·d_ff, d_model]`: gate then up.
    w_gate_up: Matrix,
    /// `[d_model, d_ff]`
    w_down: Matrix,
    /// `[d_model]`: RMSNorm on the FFN output before the residual add (Gemma).
    post_ffn_norm: Option<Vec<f32>>,
    /// Sliding-window layer (local attention, local RoPE).
    local: bool,
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
    /// RoPE of the global layers, and of the local (sliding-window) ones where they differ.
    rope: Rope,
    local_rope: Option<Rope>,
    pub mode: MatmulMode,
}

/// Buffers of one forward pass, kept between calls.
#[derive(Debug, Default)]
pub struct LlamaScratch {
    /// Position of every row of the batch, and its rotary angles `[rows, rope_dims/2]` (global
    /// layers, then local ones).
    positions: Vec<usize>,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    local_cos: Vec<f32>,
    local_sin: Vec<f32>,
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
fn load_stacked(
    f: &GgufFile,
    names: &[(&str, usize)],
    cols: usize,
    mode: MatmulMode,
    arena: &WeightArena,
) -> Result<Matrix, ModelError> {
    let infos: Vec<&TensorInfo> =
        names.iter().map(|(n, rows)| f.tensor_shaped(n, &[cols as u64, *rows as u64])).collect::<Result<_, _>>()?;
    let rows: usize = names.iter().map(|(_, r)| r).sum();
    let same = infos.iter().all(|t| t.dtype == infos[0].dtype);
    let result = if same {
        let mut bytes = Vec::with_capacity(infos.iter().map(|t| t.bytes as usize).sum());
        for t in &infos {
            bytes.extend_from_slice(f.tensor_data(t));
        }
        Matrix::from_stored(arena, infos[0].dtype, &bytes, rows, cols, mode)
    } else {
        // Parts in different formats stay apart, each in its own packed form.
        let mut parts = Vec::with_capacity(infos.len());
        for (t, (name, r)) in infos.iter().zip(names) {
            let part = Matrix::from_stored(arena, t.dtype, f.tensor_data(t), *r, cols, mode)
                .map_err(|e| ModelError::tensor(f, name, e.to_string()))?;
            parts.push(part);
        }
        Ok(Matrix::stack(parts))
    };
    result.map_err(|e| ModelError::tensor(f, names[0].0, e.to_string()))
}

/// An optional tensor of `n` floats: absent is `None`, present with another shape is an error.
fn load_opt_f32(f: &GgufFile, name: &str, n: usize) -> Result<Option<Vec<f32>>, ModelError> {
    if f.has_tensor(name) {
        load_f32(f, name, n).map(Some)
    } else {
        Ok(None)
    }
}

/// Refuses a file with a tensor this family does not use (an output bias, MLP biases, a fused
/// QKV, ...): running without it would silently compute another model.
fn check_every_tensor_is_used(f: &GgufFile, layers: usize) -> Result<(), ModelError> {
    const GLOBAL: [&str; 4] = ["token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"];
    const PER_LAYER: [&str; 16] = [
        "attn_norm.weight",
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_q.bias",
        "attn_k.bias",
        "attn_v.bias",
        "attn_q_norm.weight",
        "attn_k_norm.weight",
        "attn_output.weight",
        "post_attention_norm.weight",
        "ffn_norm.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
        "post_ffw_norm.weight",
    ];
    for t in &f.tensors {
        let known = GLOBAL.contains(&t.name.as_str())
            || t.name
                .strip_prefix("blk.")
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(i, part)| i.parse::<usize>().is_ok_and(|i| i < layers) && PER_LAYER.contains(&part));
        if !known {
            return Err(ModelError::tensor(
                f,
                &t.name,
                "this tensor is not part of the architecture as supported".into(),
            ));
        }
    }
    Ok(())
}

impl Llama {
    pub fn from_gguf(f: &GgufFile, family: Family, mode: MatmulMode) -> Result<Self, ModelError> {
        let c = LlamaConfig::from_gguf(f, family)?;
        check_every_tensor_is_used(f, c.layers)?;
        let (d, qd, kvd, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.head_dim);
        let emb = f.tensor_shaped("token_embd.weight", &[d as u64, c.vocab as u64])?;
        let row_bytes = emb
            .dtype
            .row_bytes(d)
            .ok_or_else(|| ModelError::tensor(f, "token_embd.weight", "row is not whole blocks".into()))?;
        let tied = !f.has_tensor("output.weight");
        // Every packed matrix end to end on huge pages.
        let arena = WeightArena::new();
        let embedding = if tied {
            Embedding::Tied
        } else {
            Embedding::Stored { dtype: emb.dtype, data: f.tensor_data(emb).to_vec(), row_bytes }
        };
        let required = |name: &str, what: &str| -> Result<(), ModelError> {
            if f.has_tensor(name) {
                Ok(())
            } else {
                Err(ModelError::tensor(f, name, format!("missing: {} requires {what}", family.arch())))
            }
        };
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let b = |s: &str| format!("blk.{i}.{s}.bias");
            let bias_parts = [(b("attn_q"), qd), (b("attn_k"), kvd), (b("attn_v"), kvd)];
            if family == Family::Qwen2 {
                for (name, _) in &bias_parts {
                    required(name, "q, k and v biases")?;
                }
            }
            let qkv_bias = if bias_parts.iter().any(|(name, _)| f.has_tensor(name)) {
                let mut all = Vec::with_capacity(qd + 2 * kvd);
                for (name, len) in &bias_parts {
                    all.extend(load_opt_f32(f, name, *len)?.unwrap_or_else(|| vec![0.0; *len]));
                }
                Some(all)
            } else {
                None
            };
            let needs_qk_norm = matches!(family, Family::Qwen3 | Family::Gemma3);
            if needs_qk_norm {
                required(&n("attn_q_norm"), "q and k norms")?;
                required(&n("attn_k_norm"), "q and k norms")?;
            }
            let qk_norms = match (load_opt_f32(f, &n("attn_q_norm"), hd)?, load_opt_f32(f, &n("attn_k_norm"), hd)?) {
                (Some(q), Some(k)) => Some((q, k)),
                (None, None) => None,
                _ => return Err(ModelError::tensor(f, &n("attn_q_norm"), "a q norm needs a k norm and back".into())),
            };
            if family == Family::Gemma3 {
                required(&n("post_attention_norm"), "post-attention norms")?;
                required(&n("post_ffw_norm"), "post-FFN norms")?;
            } else {
                for extra in ["post_attention_norm", "post_ffw_norm"] {
                    if f.has_tensor(&n(extra)) {
                        let why = format!("{} files do not use this tensor", family.arch());
                        return Err(ModelError::tensor(f, &n(extra), why));
                    }
                }
            }
            layers.push(Layer {
                attn_norm: load_f32(f, &n("attn_norm"), d)?,
                wqkv: load_stacked(
                    f,
                    &[(&n("attn_q"), qd), (&n("attn_k"), kvd), (&n("attn_v"), kvd)],
                    d,
                    mode,
                    &arena,
                )?,
                qkv_bias,
                qk_norms,
                wo: load_stacked(f, &[(&n("attn_output"), d)], qd, mode, &arena)?,
                post_attn_norm: load_opt_f32(f, &n("post_attention_norm"), d)?,
                ffn_norm: load_f32(f, &n("ffn_norm"), d)?,
                w_gate_up: load_stacked(f, &[(&n("ffn_gate"), c.d_ff), (&n("ffn_up"), c.d_ff)], d, mode, &arena)?,
                w_down: load_stacked(f, &[(&n("ffn_down"), d)], c.d_ff, mode, &arena)?,
                post_ffn_norm: load_opt_f32(f, &n("post_ffw_norm"), d)?,
                local: c.sliding.as_ref().is_some_and(|s| s.local[i]),
            });
        }
        let out_name = if tied { "token_embd.weight" } else { "output.weight" };
        let output = load_stacked(f, &[(out_name, c.vocab)], d, mode, &arena)?;
        let factors = load_opt_f32(f, "rope_freqs.weight", c.rope_dims / 2)?;
        let rope = Rope::scaled(c.rope_dims, c.rope_base, c.rope_scaling, factors.as_deref());
        let local_rope = c.sliding.as_ref().map(|s| Rope::new(c.rope_dims, s.rope_base));
        Ok(Llama {
            out_norm: load_f32(f, "output_norm.weight", d)?,
            config: c,
            embedding,
            layers,
            output,
            rope,
            local_rope,
            mode,
        })
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
        if let Some(local) = &self.local_rope {
            local.angles(&s.positions, &mut s.local_cos, &mut s.local_sin);
        }
        let half = c.rope_dims / 2;
        let style = c.family.rope_style();
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
            if c.embed_scale != 1.0 {
                out.iter_mut().for_each(|v| *v *= c.embed_scale);
            }
        }
        let mut attn_seqs = Vec::with_capacity(items.len());
        let mut row = 0;
        let tile_attention = taipan_kernels::tiles::attention_panels_fit(c.kv_heads, c.head_dim, c.context);
        s.mm.prompt_rows.clear();
        for it in items {
            attn_seqs.push(AttnSeq {
                first_row: row,
                tokens: it.tokens.len(),
                start: it.start,
                blocks: it.blocks,
                prompt: it.prompt && tile_attention,
            });
            s.mm.prompt_rows.extend(std::iter::repeat_n(it.prompt, it.tokens.len()));
            row += it.tokens.len();
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let shape = AttentionShape {
                heads: c.heads,
                kv_heads: c.kv_heads,
                head_dim: c.head_dim,
                scale: c.attn_scale,
                window: c.sliding.as_ref().filter(|_| layer.local).map(|s| s.window),
            };
            let (rope, rope_cos, rope_sin) = match (&self.local_rope, layer.local) {
                (Some(local), true) => (local, &s.local_cos, &s.local_sin),
                _ => (&self.rope, &s.rope_cos, &s.rope_sin),
            };
            let h = &mut s.h[..t_n * d];
            compute.pool.for_rows_mut(h, d, &|t, row| {
                ops::rms_norm_into(row, &x[t * d..(t + 1) * d], &layer.attn_norm, c.rms_eps)
            });
            let qkv = &mut s.qkv[..t_n * qkv_w];
            compute.matmul(qkv, h, t_n, &layer.wqkv, &mut s.mm);
            let q = &mut s.q[..t_n * qd];
            compute.pool.for_rows_mut(qkv, qkv_w, &|t, it_row| {
                if let Some(bias) = &layer.qkv_bias {
                    ops::add_in_place(it_row, bias);
                }
                if let Some((qn, kn)) = &layer.qk_norms {
                    let (qs, ks) = it_row[..qd + kvd].split_at_mut(qd);
                    for head in qs.chunks_exact_mut(c.head_dim) {
                        ops::rms_norm(head, qn, c.rms_eps);
                    }
                    for head in ks.chunks_exact_mut(c.head_dim) {
                        ops::rms_norm(head, kn, c.rms_eps);
                    }
                }
                let (cos, sin) = (&rope_cos[t * half..(t + 1) * half], &rope_sin[t * half..(t + 1) * half]);
                rope.apply(&mut it_row[..qd + kvd], c.head_dim, cos, sin, style);
            });
            for (t, it_row) in qkv.chunks_exact(qkv_w).enumerate() {
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
            if let Some(w) = &layer.post_attn_norm {
                compute.pool.for_rows_mut(proj, d, &|_, r| ops::rms_norm(r, w, c.rms_eps));
            }
            ops::add_rows(&compute.pool, x, proj, d);
            let h = &mut s.h[..t_n * d];
            compute.pool.for_rows_mut(h, d, &|t, row| {
                ops::rms_norm_into(row, &x[t * d..(t + 1) * d], &layer.ffn_norm, c.rms_eps)
            });
            let gu = &mut s.gate_up[..t_n * 2 * ff];
            compute.matmul(gu, h, t_n, &layer.w_gate_up, &mut s.mm);
            let act = &mut s.act[..t_n * ff];
            let gu = &*gu;
            compute.pool.for_rows_mut(act, ff, &|t, a| {
                let (g, u) = gu[t * 2 * ff..(t + 1) * 2 * ff].split_at(ff);
                match c.activation {
                    Activation::Silu => ops::swiglu_into(a, g, u),
                    Activation::GeluTanh => ops::geglu_into(a, g, u),
                }
            });
            compute.matmul(proj, act, t_n, &layer.w_down, &mut s.mm);
            if let Some(w) = &layer.post_ffn_norm {
                compute.pool.for_rows_mut(proj, d, &|_, r| ops::rms_norm(r, w, c.rms_eps));
            }
            ops::add_rows(&compute.pool, x, proj, d);
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
        // Logits rows are not token rows: the integer kernels take them all.
        s.mm.prompt_rows.clear();
        compute.matmul(&mut s.logits, h, rows, &self.output, &mut s.mm);
        if let Some(cap) = c.logit_softcap {
            s.logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        Ok(())
    }
}
