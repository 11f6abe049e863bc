//! Jamba: a hybrid of attention and Mamba (selective state-space) layers, with mixture-of-experts
//! FFNs on some layers (Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model";
//! reference code: transformers `models/jamba/modeling_jamba.py`, llama.cpp `src/models/jamba.cpp`).
//!
//! Per layer: `x += mixer(norm(x))` with the mixer attention (GQA, no positional encoding) or a
//! Mamba-1 mixer (in_proj → causal conv → SiLU → x_proj → RMSNorm'd dt/B/C → selective scan →
//! gate → out_proj); then `x += ffn(norm(x))` with the FFN a dense SwiGLU MLP or a softmax-routed
//! top-k mixture of such MLPs whose top-k weights are NOT renormalised.
//! Loaded from a Hugging Face directory (config.json + safetensors) or a llama.cpp `jamba` GGUF;
//! both are read through GGUF tensor names (see `weights`).

use crate::gguf::GgufFile;
use crate::weights::{RawTensor, WeightSource};
use crate::ModelError;
use serde_json::Value;
use taipan_kernels::matmul::MatmulScratch;
use taipan_kernels::ops::{self, AttentionShape, AttnSeq, KvLayer};
use taipan_kernels::ssm::{self, ScanShape};
use taipan_kernels::{formats, Compute, DType, MatmulMode, Matrix};

/// Validated hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct JambaConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub context: usize,
    /// Per layer: attention (true) or Mamba.
    pub attention: Vec<bool>,
    pub experts: usize,
    pub experts_per_token: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub d_inner: usize,
    pub dt_rank: usize,
    pub conv_bias: bool,
    pub proj_bias: bool,
    pub tied_embeddings: bool,
}

fn cfg_err(path: &std::path::Path, field: &str, message: &str) -> ModelError {
    ModelError::Config { path: path.into(), field: field.into(), message: message.into() }
}

impl JambaConfig {
    /// Reads `config.json` in any form transformers accepts for Jamba.
    pub fn from_hf(path: &std::path::Path, v: &Value) -> Result<Self, ModelError> {
        let int = |k: &str| -> Result<Option<usize>, ModelError> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| cfg_err(path, k, "must be a non-negative integer")),
            }
        };
        let req = |k: &str| int(k)?.ok_or_else(|| cfg_err(path, k, "required field is missing"));
        let boolean = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let hidden = req("hidden_size")?;
        let layers = req("num_hidden_layers")?;
        let heads = req("num_attention_heads")?;
        let kv_heads = int("num_key_value_heads")?.unwrap_or(heads);
        let period = int("attn_layer_period")?.unwrap_or(8);
        let offset = int("attn_layer_offset")?.unwrap_or(4);
        if period == 0 || offset >= period {
            return Err(cfg_err(path, "attn_layer_offset", "must be smaller than attn_layer_period"));
        }
        let e_period = int("expert_layer_period")?.unwrap_or(2);
        let e_offset = int("expert_layer_offset")?.unwrap_or(1);
        if e_period == 0 || e_offset >= e_period {
            return Err(cfg_err(path, "expert_layer_offset", "must be smaller than expert_layer_period"));
        }
        let dt_rank = match v.get("mamba_dt_rank") {
            None | Some(Value::Null) => hidden.div_ceil(16),
            Some(Value::String(s)) if s == "auto" => hidden.div_ceil(16),
            Some(x) => {
                x.as_u64().ok_or_else(|| cfg_err(path, "mamba_dt_rank", "must be an integer or \"auto\""))? as usize
            }
        };
        let experts = int("num_experts")?.or(int("num_local_experts")?).unwrap_or(16);
        let c = JambaConfig {
            vocab: int("vocab_size")?.unwrap_or(65536),
            hidden,
            intermediate: req("intermediate_size")?,
            layers,
            heads,
            kv_heads,
            head_dim: int("head_dim")?.unwrap_or(hidden / heads.max(1)),
            rms_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            context: int("max_position_embeddings")?.or(int("n_ctx")?).unwrap_or(262144),
            attention: (0..layers).map(|i| i % period == offset).collect(),
            experts,
            experts_per_token: int("num_experts_per_tok")?.unwrap_or(2),
            d_state: int("mamba_d_state")?.unwrap_or(16),
            d_conv: int("mamba_d_conv")?.unwrap_or(4),
            d_inner: int("mamba_expand")?.unwrap_or(2) * hidden,
            dt_rank,
            conv_bias: boolean("mamba_conv_bias", true),
            proj_bias: boolean("mamba_proj_bias", false),
            tied_embeddings: boolean("tie_word_embeddings", false),
        };
        c.validate(path)?;
        Ok(c)
    }

    /// Reads `jamba.*` GGUF keys; the per-layer KV-head array marks attention layers.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let k = |s: &str| format!("jamba.{s}");
        let hidden = f.get_u64(&k("embedding_length"))? as usize;
        let heads = f.get_u64(&k("attention.head_count"))? as usize;
        let kv: Vec<usize> = match f.get(&k("attention.head_count_kv")) {
            Some(crate::gguf::Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(0) as usize).collect(),
            Some(v) => vec![v.as_u64().unwrap_or(0) as usize],
            None => return Err(cfg_err(&f.path, "jamba.attention.head_count_kv", "required key is missing")),
        };
        let layers = f.get_u64(&k("block_count"))? as usize;
        if kv.len() != layers {
            return Err(cfg_err(&f.path, "jamba.attention.head_count_kv", "needs one entry per layer"));
        }
        let kv_heads = kv.iter().copied().find(|&n| n > 0).unwrap_or(heads);
        let c = JambaConfig {
            vocab: f.get_array("tokenizer.ggml.tokens").map(|a| a.len())?,
            hidden,
            intermediate: f.get_u64(&k("feed_forward_length"))? as usize,
            layers,
            heads,
            kv_heads,
            head_dim: hidden / heads.max(1),
            rms_eps: f.get_f64(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6) as f32,
            context: f.get_u64(&k("context_length")).unwrap_or(262144) as usize,
            attention: kv.iter().map(|&n| n > 0).collect(),
            experts: f.get_u64(&k("expert_count")).unwrap_or(1) as usize,
            experts_per_token: f.get_u64(&k("expert_used_count")).unwrap_or(1) as usize,
            d_state: f.get_u64(&k("ssm.state_size"))? as usize,
            d_conv: f.get_u64(&k("ssm.conv_kernel"))? as usize,
            d_inner: f.get_u64(&k("ssm.inner_size"))? as usize,
            dt_rank: f.get_u64(&k("ssm.time_step_rank"))? as usize,
            conv_bias: true,
            proj_bias: false,
            tied_embeddings: !f.has_tensor("output.weight"),
        };
        c.validate(&f.path)?;
        Ok(c)
    }

    fn validate(&self, path: &std::path::Path) -> Result<(), ModelError> {
        let checks = [
            (self.hidden > 0, "hidden_size", "must be positive"),
            (
                self.heads > 0 && self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
                "num_key_value_heads",
                "must divide num_attention_heads",
            ),
            (
                self.d_conv >= 1 && self.d_state >= 1 && self.dt_rank >= 1,
                "mamba_d_conv",
                "Mamba sizes must be positive",
            ),
            (
                self.experts_per_token >= 1 && self.experts_per_token <= self.experts.max(1),
                "num_experts_per_tok",
                "must be between 1 and num_experts",
            ),
            (self.vocab > 0, "vocab_size", "must be positive"),
        ];
        for (ok, field, msg) in checks {
            if !ok {
                return Err(cfg_err(path, field, msg));
            }
        }
        Ok(())
    }
}

/// Hugging Face tensor name → GGUF name for Jamba checkpoints.
pub fn hf_name(name: &str) -> Option<String> {
    let direct = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.final_layernorm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.into());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let mapped = match rest {
        "input_layernorm.weight" => "attn_norm.weight".to_string(),
        "pre_ff_layernorm.weight" => "ffn_norm.weight".to_string(),
        "self_attn.q_proj.weight" => "attn_q.weight".to_string(),
        "self_attn.k_proj.weight" => "attn_k.weight".to_string(),
        "self_attn.v_proj.weight" => "attn_v.weight".to_string(),
        "self_attn.o_proj.weight" => "attn_output.weight".to_string(),
        "mamba.in_proj.weight" => "ssm_in.weight".to_string(),
        "mamba.in_proj.bias" => "ssm_in.bias".to_string(),
        "mamba.conv1d.weight" => "ssm_conv1d.weight".to_string(),
        "mamba.conv1d.bias" => "ssm_conv1d.bias".to_string(),
        "mamba.x_proj.weight" => "ssm_x.weight".to_string(),
        "mamba.dt_layernorm.weight" => "ssm_dt_norm.weight".to_string(),
        "mamba.b_layernorm.weight" => "ssm_b_norm.weight".to_string(),
        "mamba.c_layernorm.weight" => "ssm_c_norm.weight".to_string(),
        "mamba.dt_proj.weight" => "ssm_dt.weight".to_string(),
        "mamba.dt_proj.bias" => "ssm_dt.bias".to_string(),
        "mamba.A_log" => "ssm_a".to_string(),
        "mamba.D" => "ssm_d".to_string(),
        "mamba.out_proj.weight" => "ssm_out.weight".to_string(),
        "mamba.out_proj.bias" => "ssm_out.bias".to_string(),
        "feed_forward.gate_proj.weight" => "ffn_gate.weight".to_string(),
        "feed_forward.up_proj.weight" => "ffn_up.weight".to_string(),
        "feed_forward.down_proj.weight" => "ffn_down.weight".to_string(),
        "feed_forward.router.weight" => "ffn_gate_inp.weight".to_string(),
        other => {
            let e = other.strip_prefix("feed_forward.experts.")?;
            let (idx, part) = e.split_once('.')?;
            let kind = match part {
                "gate_proj.weight" => "ffn_gate",
                "up_proj.weight" => "ffn_up",
                "down_proj.weight" => "ffn_down",
                _ => return None,
            };
            format!("{kind}.{idx}.weight")
        }
    };
    Some(format!("blk.{layer}.{mapped}"))
}

#[derive(Debug)]
struct Mamba {
    /// `[2·Di, H]`: x rows, then gate z rows.
    in_proj: Matrix,
    in_bias: Option<Vec<f32>>,
    /// `[Di, K]`
    conv_w: Vec<f32>,
    /// `[Di]`
    conv_b: Option<Vec<f32>>,
    /// `[R + 2N, Di]`: dt, B, C rows.
    x_proj: Matrix,
    dt_norm: Vec<f32>,
    b_norm: Vec<f32>,
    c_norm: Vec<f32>,
    /// `[Di, R]`
    dt_proj: Matrix,
    /// `[Di]`
    dt_bias: Vec<f32>,
    /// `[Di, N]`, `−exp(A_log)`.
    a: Vec<f32>,
    /// `[Di]`
    d: Vec<f32>,
    /// `[H, Di]`
    out_proj: Matrix,
    out_bias: Option<Vec<f32>>,
    /// Index of this layer's conv and SSM state in a sequence's state.
    slot: usize,
}

#[derive(Debug)]
struct Attention {
    /// `[nH·hd + 2·nKV·hd, H]`
    wqkv: Matrix,
    /// `[H, nH·hd]`
    wo: Matrix,
    /// Index of this layer's KV cache in a sequence's state.
    slot: usize,
}

#[derive(Debug)]
enum Mixer {
    Attention(Attention),
    Mamba(Box<Mamba>),
}

/// A SwiGLU MLP: `[2F, H]` gate-then-up, `[H, F]` down.
#[derive(Debug)]
struct Mlp {
    gate_up: Matrix,
    down: Matrix,
}

#[derive(Debug)]
enum Ffn {
    Dense(Mlp),
    Moe { router: Matrix, experts: Vec<Mlp>, top_k: usize },
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

/// Per-sequence state: KV caches of the attention layers, conv and SSM states of the Mamba layers.
#[derive(Debug, Clone)]
pub struct JambaState {
    /// Per attention layer `[positions, kv_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Per Mamba layer `[K-1, Di]`: the last raw conv inputs.
    conv: Vec<Vec<f32>>,
    /// Per Mamba layer `[Di, N]`.
    ssm: Vec<Vec<f32>>,
    pub len: usize,
}

impl JambaState {
    /// Bytes of recurrent (Mamba) state: constant in the sequence length.
    pub fn recurrent_bytes(&self) -> usize {
        4 * self.conv.iter().chain(&self.ssm).map(Vec::len).sum::<usize>()
    }

    /// Bytes of attention KV cache held.
    pub fn kv_bytes(&self) -> usize {
        4 * self.k.iter().chain(&self.v).map(Vec::len).sum::<usize>()
    }
}

/// Buffers of one forward pass.
#[derive(Debug, Default)]
pub struct JambaScratch {
    x: Vec<f32>,
    h: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    d: Vec<f32>,
    e: Vec<f32>,
    f: Vec<f32>,
    g: Vec<f32>,
    pub logits: Vec<f32>,
    mm: MatmulScratch,
    dt_lr: Vec<f32>,
    bm: Vec<f32>,
    cm: Vec<f32>,
    /// When set, every layer's intermediate outputs are recorded here (for debugging numerics).
    pub trace: Option<Vec<(String, Vec<f32>)>>,
    /// When set, seconds spent in attention, Mamba mixers, routed experts, dense MLPs, and the
    /// rest (embedding, norms, output head) are added here.
    pub profile: Option<[f64; 5]>,
}

/// Names of the entries of [`JambaScratch::profile`].
pub const PROFILE_PARTS: [&str; 5] = ["attention", "mamba mixer", "experts (MoE)", "dense MLP", "other"];

fn resize(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

fn tensor_err(src: &dyn WeightSource, t: &str, message: String) -> ModelError {
    ModelError::Tensor { path: src.path().into(), tensor: t.into(), message }
}

fn f32s(src: &dyn WeightSource, t: &RawTensor<'_>) -> Result<Vec<f32>, ModelError> {
    let mut out = vec![0f32; t.elements()];
    formats::dequantize(t.dtype, &t.data, &mut out).map_err(|e| tensor_err(src, &t.name, e.to_string()))?;
    Ok(out)
}

fn vector(src: &dyn WeightSource, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let t = src.get(name)?;
    if t.elements() != n || t.dims.iter().filter(|&&d| d != 1).count() > 1 {
        return Err(tensor_err(src, name, format!("shape {:?}, expected [{n}]", t.dims)));
    }
    f32s(src, &t)
}

fn optional_vector(src: &dyn WeightSource, name: &str, n: usize) -> Result<Option<Vec<f32>>, ModelError> {
    if src.has(name) {
        vector(src, name, n).map(Some)
    } else {
        Ok(None)
    }
}

/// How matrices are built: the matmul mode, and an optional on-load quantization.
#[derive(Clone, Copy)]
struct Build {
    mode: MatmulMode,
    quantize: Option<DType>,
}

impl Build {
    /// A `[rows, cols]` matrix from stored bytes, quantized first when asked and possible.
    fn matrix(
        &self,
        dtype: DType,
        data: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Matrix, taipan_kernels::formats::SizeMismatch> {
        let float = matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        if self.quantize == Some(DType::Q8_0) && float && cols.is_multiple_of(32) {
            let mut f = vec![0f32; rows * cols];
            formats::dequantize(dtype, data, &mut f)?;
            let q = formats::legacy::quantize_q8_0(&f);
            return Matrix::from_stored(DType::Q8_0, &q, rows, cols, self.mode);
        }
        Matrix::from_stored(dtype, data, rows, cols, self.mode)
    }
}

/// A `[rows, cols]` matrix (GGUF dims `{cols, rows}`).
fn matrix(src: &dyn WeightSource, name: &str, rows: usize, cols: usize, b: Build) -> Result<Matrix, ModelError> {
    let t = src.get(name)?;
    if t.dims != [cols, rows] {
        return Err(tensor_err(src, name, format!("shape {:?}, expected {:?}", t.dims, [cols, rows])));
    }
    b.matrix(t.dtype, &t.data, rows, cols).map_err(|e| tensor_err(src, name, e.to_string()))
}

/// Matrices with the same input size stacked by rows (one product instead of several).
fn stacked(src: &dyn WeightSource, parts: &[(&str, usize)], cols: usize, mode: Build) -> Result<Matrix, ModelError> {
    let tensors: Vec<RawTensor<'_>> = parts.iter().map(|(n, _)| src.get(n)).collect::<Result<_, _>>()?;
    for (t, (n, rows)) in tensors.iter().zip(parts) {
        if t.dims != [cols, *rows] {
            return Err(tensor_err(src, n, format!("shape {:?}, expected {:?}", t.dims, [cols, *rows])));
        }
    }
    let rows: usize = parts.iter().map(|p| p.1).sum();
    if tensors.iter().all(|t| t.dtype == tensors[0].dtype) {
        let bytes: Vec<u8> = tensors.iter().flat_map(|t| t.data.iter().copied()).collect();
        return mode
            .matrix(tensors[0].dtype, &bytes, rows, cols)
            .map_err(|e| tensor_err(src, parts[0].0, e.to_string()));
    }
    let mut data = Vec::with_capacity(rows * cols);
    for t in &tensors {
        data.extend(f32s(src, t)?);
    }
    Ok(Matrix::from_f32(data, rows, cols))
}

/// Expert `e`'s `[rows, cols]` matrix from a GGUF stack `{cols, rows, E}` or a per-expert tensor.
fn expert_part(
    src: &dyn WeightSource,
    layer: usize,
    kind: &str,
    e: usize,
    experts: usize,
    rows: usize,
    cols: usize,
) -> Result<(DType, Vec<u8>), ModelError> {
    let stacked = format!("blk.{layer}.{kind}_exps.weight");
    if src.has(&stacked) {
        let t = src.get(&stacked)?;
        if t.dims != [cols, rows, experts] {
            return Err(tensor_err(src, &stacked, format!("shape {:?}, expected {:?}", t.dims, [cols, rows, experts])));
        }
        let per =
            t.dtype.row_bytes(cols).ok_or_else(|| tensor_err(src, &stacked, "rows are not whole blocks".into()))?
                * rows;
        return Ok((t.dtype, t.data[e * per..(e + 1) * per].to_vec()));
    }
    let name = format!("blk.{layer}.{kind}.{e}.weight");
    let t = src.get(&name)?;
    if t.dims != [cols, rows] {
        return Err(tensor_err(src, &name, format!("shape {:?}, expected {:?}", t.dims, [cols, rows])));
    }
    Ok((t.dtype, t.data.to_vec()))
}

impl Jamba {
    /// Loads the weights; `config` comes from the same source.
    pub fn load(src: &dyn WeightSource, config: JambaConfig, opts: crate::LoadOptions) -> Result<Self, ModelError> {
        let mode = Build { mode: opts.mode, quantize: opts.quantize };
        let exact = Build { mode: MatmulMode::Exact, quantize: None };
        let c = &config;
        let (h, f, di, r, n, k) = (c.hidden, c.intermediate, c.d_inner, c.dt_rank, c.d_state, c.d_conv);
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let emb = src.get("token_embd.weight")?;
        if emb.dims != [h, c.vocab] {
            return Err(tensor_err(
                src,
                "token_embd.weight",
                format!("shape {:?}, expected {:?}", emb.dims, [h, c.vocab]),
            ));
        }
        let emb_row_bytes = emb
            .dtype
            .row_bytes(h)
            .ok_or_else(|| tensor_err(src, "token_embd.weight", "rows are not whole blocks".into()))?;
        let (mut attn_slots, mut mamba_slots) = (0, 0);
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let name = |s: &str| format!("blk.{i}.{s}");
            let mixer = if c.attention[i] {
                let a = Attention {
                    wqkv: stacked(
                        src,
                        &[(&name("attn_q.weight"), qd), (&name("attn_k.weight"), kvd), (&name("attn_v.weight"), kvd)],
                        h,
                        mode,
                    )?,
                    wo: matrix(src, &name("attn_output.weight"), h, qd, mode)?,
                    slot: attn_slots,
                };
                attn_slots += 1;
                Mixer::Attention(a)
            } else {
                let conv = src.get(&name("ssm_conv1d.weight"))?;
                if conv.elements() != di * k || conv.dims[0] != k {
                    return Err(tensor_err(
                        src,
                        &name("ssm_conv1d.weight"),
                        format!("shape {:?}, expected [{k}, {di}]", conv.dims),
                    ));
                }
                let a_t = src.get(&name("ssm_a"))?;
                if a_t.dims != [n, di] {
                    return Err(tensor_err(
                        src,
                        &name("ssm_a"),
                        format!("shape {:?}, expected {:?}", a_t.dims, [n, di]),
                    ));
                }
                let mut a = f32s(src, &a_t)?;
                if src.is_hf() {
                    // Checkpoints store A_log; GGUF already holds A = −exp(A_log).
                    for v in a.iter_mut() {
                        *v = -v.exp();
                    }
                }
                let m = Mamba {
                    in_proj: matrix(src, &name("ssm_in.weight"), 2 * di, h, mode)?,
                    in_bias: optional_vector(src, &name("ssm_in.bias"), 2 * di)?,
                    conv_w: f32s(src, &conv)?,
                    conv_b: optional_vector(src, &name("ssm_conv1d.bias"), di)?,
                    x_proj: matrix(src, &name("ssm_x.weight"), r + 2 * n, di, mode)?,
                    dt_norm: vector(src, &name("ssm_dt_norm.weight"), r)?,
                    b_norm: vector(src, &name("ssm_b_norm.weight"), n)?,
                    c_norm: vector(src, &name("ssm_c_norm.weight"), n)?,
                    dt_proj: matrix(src, &name("ssm_dt.weight"), di, r, mode)?,
                    dt_bias: vector(src, &name("ssm_dt.bias"), di)?,
                    a,
                    d: vector(src, &name("ssm_d"), di)?,
                    out_proj: matrix(src, &name("ssm_out.weight"), h, di, mode)?,
                    out_bias: optional_vector(src, &name("ssm_out.bias"), h)?,
                    slot: mamba_slots,
                };
                mamba_slots += 1;
                Mixer::Mamba(Box::new(m))
            };
            let ffn = if src.has(&name("ffn_gate_inp.weight")) {
                let e_n = c.experts;
                let mut experts = Vec::with_capacity(e_n);
                for e in 0..e_n {
                    let (gt, gb) = expert_part(src, i, "ffn_gate", e, e_n, f, h)?;
                    let (ut, ub) = expert_part(src, i, "ffn_up", e, e_n, f, h)?;
                    let (dt, db) = expert_part(src, i, "ffn_down", e, e_n, h, f)?;
                    let err = |e: taipan_kernels::formats::SizeMismatch| {
                        tensor_err(src, &name("ffn_gate_exps.weight"), e.to_string())
                    };
                    let gate_up = if gt == ut {
                        mode.matrix(gt, &[gb, ub].concat(), 2 * f, h).map_err(err)?
                    } else {
                        let mut both = vec![0f32; 2 * f * h];
                        formats::dequantize(gt, &gb, &mut both[..f * h]).map_err(err)?;
                        formats::dequantize(ut, &ub, &mut both[f * h..]).map_err(err)?;
                        Matrix::from_f32(both, 2 * f, h)
                    };
                    experts.push(Mlp { gate_up, down: mode.matrix(dt, &db, h, f).map_err(err)? });
                }
                Ffn::Moe {
                    router: matrix(src, &name("ffn_gate_inp.weight"), e_n, h, exact)?,
                    experts,
                    top_k: c.experts_per_token,
                }
            } else {
                Ffn::Dense(Mlp {
                    gate_up: stacked(src, &[(&name("ffn_gate.weight"), f), (&name("ffn_up.weight"), f)], h, mode)?,
                    down: matrix(src, &name("ffn_down.weight"), h, f, mode)?,
                })
            };
            layers.push(Layer {
                attn_norm: vector(src, &name("attn_norm.weight"), h)?,
                mixer,
                ffn_norm: vector(src, &name("ffn_norm.weight"), h)?,
                ffn,
            });
        }
        let output = if src.has("output.weight") {
            matrix(src, "output.weight", c.vocab, h, mode)?
        } else {
            mode.matrix(emb.dtype, &emb.data, c.vocab, h)
                .map_err(|e| tensor_err(src, "token_embd.weight", e.to_string()))?
        };
        // With on-load quantization the embedding rows are quantized too, as converters do.
        let (emb_dtype, embedding, emb_row_bytes) = if opts.quantize == Some(DType::Q8_0)
            && matches!(emb.dtype, DType::F32 | DType::F16 | DType::BF16)
            && h.is_multiple_of(32)
        {
            let f = f32s(src, &emb)?;
            (DType::Q8_0, formats::legacy::quantize_q8_0(&f), h / 32 * 34)
        } else {
            (emb.dtype, emb.data.to_vec(), emb_row_bytes)
        };
        Ok(Jamba {
            out_norm: vector(src, "output_norm.weight", h)?,
            emb_dtype,
            embedding,
            emb_row_bytes,
            layers,
            output,
            config,
        })
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let mlp = |m: &Mlp| m.gate_up.memory_bytes() + m.down.memory_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let mixer = match &l.mixer {
                    Mixer::Attention(a) => a.wqkv.memory_bytes() + a.wo.memory_bytes(),
                    Mixer::Mamba(m) => {
                        m.in_proj.memory_bytes()
                            + m.x_proj.memory_bytes()
                            + m.dt_proj.memory_bytes()
                            + m.out_proj.memory_bytes()
                            + 4 * (m.conv_w.len() + m.a.len())
                    }
                };
                let ffn = match &l.ffn {
                    Ffn::Dense(m) => mlp(m),
                    Ffn::Moe { router, experts, .. } => router.memory_bytes() + experts.iter().map(mlp).sum::<usize>(),
                };
                mixer + ffn
            })
            .sum();
        layers + self.embedding.len() + self.output.memory_bytes()
    }

    /// A fresh sequence state.
    pub fn new_state(&self) -> JambaState {
        let c = &self.config;
        let attn = c.attention.iter().filter(|&&a| a).count();
        let mamba = c.layers - attn;
        JambaState {
            k: vec![Vec::new(); attn],
            v: vec![Vec::new(); attn],
            conv: vec![vec![0f32; (c.d_conv - 1) * c.d_inner]; mamba],
            ssm: vec![vec![0f32; c.d_inner * c.d_state]; mamba],
            len: 0,
        }
    }

    /// Runs `tokens` after the state's position. Logits land in `scratch.logits`: one row per
    /// token when `all_logits`, else the last token's.
    pub fn forward(
        &self,
        compute: &Compute,
        tokens: &[u32],
        state: &mut JambaState,
        s: &mut JambaScratch,
        all_logits: bool,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let t_n = tokens.len();
        if t_n == 0 {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        let start = state.len;
        if start + t_n > c.context {
            return Err(ModelError::Input(format!(
                "sequence of {} tokens exceeds the context length {}",
                start + t_n,
                c.context
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {}", c.vocab)));
        }
        let h = c.hidden;
        let mut x = std::mem::take(&mut s.x);
        let x_rows = resize(&mut x, t_n * h);
        for (t, &tok) in tokens.iter().enumerate() {
            let row = &self.embedding[tok as usize * self.emb_row_bytes..][..self.emb_row_bytes];
            formats::dequantize(self.emb_dtype, row, &mut x_rows[t * h..(t + 1) * h])
                .map_err(|e| ModelError::Input(e.to_string()))?;
        }
        let mut hb = std::mem::take(&mut s.h);
        let mut mixed = std::mem::take(&mut s.g);
        let started = std::time::Instant::now();
        let mut parts = [0f64; 5];
        for (li, layer) in self.layers.iter().enumerate() {
            let hn = resize(&mut hb, t_n * h);
            ops::rms_norm_into(hn, &x_rows[..hn.len()], &layer.attn_norm, c.rms_eps);
            let out = resize(&mut mixed, t_n * h);
            let t0 = std::time::Instant::now();
            match &layer.mixer {
                Mixer::Attention(a) => {
                    self.attention(compute, a, hn, out, start, state, s);
                    parts[0] += t0.elapsed().as_secs_f64();
                }
                Mixer::Mamba(m) => {
                    self.mamba(compute, m, hn, out, state, s);
                    parts[1] += t0.elapsed().as_secs_f64();
                }
            }
            if let Some(t) = s.trace.as_mut() {
                t.push((format!("layers.{li}.input_layernorm_out"), hn.to_vec()));
                t.push((format!("layers.{li}.mixer_out"), out.to_vec()));
            }
            ops::add_in_place(x_rows, out);
            let hn = resize(&mut hb, t_n * h);
            ops::rms_norm_into(hn, &x_rows[..hn.len()], &layer.ffn_norm, c.rms_eps);
            let out = resize(&mut mixed, t_n * h);
            let t0 = std::time::Instant::now();
            match &layer.ffn {
                Ffn::Dense(mlp) => {
                    self.mlp(compute, mlp, hn, t_n, out, s);
                    parts[3] += t0.elapsed().as_secs_f64();
                }
                Ffn::Moe { router, experts, top_k } => {
                    self.moe(compute, router, experts, *top_k, hn, out, s);
                    parts[2] += t0.elapsed().as_secs_f64();
                }
            }
            ops::add_in_place(x_rows, out);
            if let Some(t) = s.trace.as_mut() {
                t.push((format!("layers.{li}.pre_ff_layernorm_out"), hn.to_vec()));
                t.push((format!("layers.{li}.ffn_out"), out.to_vec()));
                t.push((format!("layers.{li}.out"), x_rows.to_vec()));
            }
        }
        state.len = start + t_n;
        let first = if all_logits { 0 } else { t_n - 1 };
        let rows = t_n - first;
        let hn = resize(&mut hb, rows * h);
        for (i, t) in (first..t_n).enumerate() {
            ops::rms_norm_into(&mut hn[i * h..(i + 1) * h], &x_rows[t * h..(t + 1) * h], &self.out_norm, c.rms_eps);
        }
        if s.logits.len() != rows * c.vocab {
            s.logits.resize(rows * c.vocab, 0.0);
        }
        compute.matmul(&mut s.logits, hn, rows, &self.output, &mut s.mm);
        if let Some(p) = s.profile.as_mut() {
            let accounted: f64 = parts.iter().sum();
            parts[4] = (started.elapsed().as_secs_f64() - accounted).max(0.0);
            for (acc, v) in p.iter_mut().zip(parts) {
                *acc += v;
            }
        }
        s.x = x;
        s.h = hb;
        s.g = mixed;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        compute: &Compute,
        a: &Attention,
        hn: &[f32],
        out: &mut [f32],
        start: usize,
        state: &mut JambaState,
        s: &mut JambaScratch,
    ) {
        let c = &self.config;
        let t_n = hn.len() / c.hidden;
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let w = qd + 2 * kvd;
        let qkv = resize(&mut s.a, t_n * w);
        compute.matmul(qkv, hn, t_n, &a.wqkv, &mut s.mm);
        let end = start + t_n;
        let (kc, vc) = (&mut state.k[a.slot], &mut state.v[a.slot]);
        if kc.len() < end * kvd {
            let cap = end.next_power_of_two().min(c.context).max(end) * kvd;
            kc.resize(cap, 0.0);
            vc.resize(cap, 0.0);
        }
        let q = resize(&mut s.b, t_n * qd);
        for t in 0..t_n {
            let row = &qkv[t * w..(t + 1) * w];
            q[t * qd..(t + 1) * qd].copy_from_slice(&row[..qd]);
            kc[(start + t) * kvd..(start + t + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
            vc[(start + t) * kvd..(start + t + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
        }
        let att = resize(&mut s.c, t_n * qd);
        let positions = kc.len() / kvd;
        let table = [0u32];
        let seq = [AttnSeq { first_row: 0, tokens: t_n, start, blocks: &table }];
        let shape = AttentionShape {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        ops::attention(
            &compute.kernels,
            att,
            q,
            KvLayer { k: kc, v: vc, block_size: positions },
            &seq,
            shape,
            &compute.pool,
        );
        compute.matmul(out, att, t_n, &a.wo, &mut s.mm);
    }

    fn mamba(
        &self,
        compute: &Compute,
        m: &Mamba,
        hn: &[f32],
        out: &mut [f32],
        state: &mut JambaState,
        s: &mut JambaScratch,
    ) {
        let c = &self.config;
        let t_n = hn.len() / c.hidden;
        let (di, r, n) = (c.d_inner, c.dt_rank, c.d_state);
        let xz = resize(&mut s.a, t_n * 2 * di);
        compute.matmul(xz, hn, t_n, &m.in_proj, &mut s.mm);
        if let Some(b) = &m.in_bias {
            for row in xz.chunks_exact_mut(2 * di) {
                ops::add_in_place(row, b);
            }
        }
        let (x, z) = (resize(&mut s.b, t_n * di), resize(&mut s.c, t_n * di));
        for t in 0..t_n {
            x[t * di..(t + 1) * di].copy_from_slice(&xz[t * 2 * di..t * 2 * di + di]);
            z[t * di..(t + 1) * di].copy_from_slice(&xz[t * 2 * di + di..(t + 1) * 2 * di]);
        }
        let xa = resize(&mut s.d, t_n * di);
        ssm::causal_conv1d(xa, x, &m.conv_w, m.conv_b.as_deref(), &mut state.conv[m.slot], di);
        for v in xa.iter_mut() {
            *v = ops::silu(*v);
        }
        let p_w = r + 2 * n;
        let p = resize(&mut s.e, t_n * p_w);
        compute.matmul(p, xa, t_n, &m.x_proj, &mut s.mm);
        let (mut dt_lr, mut bm, mut cm) =
            (std::mem::take(&mut s.dt_lr), std::mem::take(&mut s.bm), std::mem::take(&mut s.cm));
        dt_lr.resize(t_n * r, 0.0);
        bm.resize(t_n * n, 0.0);
        cm.resize(t_n * n, 0.0);
        for t in 0..t_n {
            let row = &p[t * p_w..(t + 1) * p_w];
            dt_lr[t * r..(t + 1) * r].copy_from_slice(&row[..r]);
            bm[t * n..(t + 1) * n].copy_from_slice(&row[r..r + n]);
            cm[t * n..(t + 1) * n].copy_from_slice(&row[r + n..]);
        }
        ops::rms_norm(&mut dt_lr, &m.dt_norm, c.rms_eps);
        ops::rms_norm(&mut bm, &m.b_norm, c.rms_eps);
        ops::rms_norm(&mut cm, &m.c_norm, c.rms_eps);
        let dt = resize(&mut s.f, t_n * di);
        compute.matmul(dt, &dt_lr, t_n, &m.dt_proj, &mut s.mm);
        for row in dt.chunks_exact_mut(di) {
            for (v, b) in row.iter_mut().zip(&m.dt_bias) {
                *v = ssm::softplus(*v + b);
            }
        }
        let y = resize(&mut s.b, t_n * di);
        let shape = ScanShape { tokens: t_n, channels: di, state: n };
        let xa = &s.d[..t_n * di];
        let z = &s.c[..t_n * di];
        let dt = &s.f[..t_n * di];
        let inputs = ssm::ScanInputs { x: xa, dt, z, b: &bm, c: &cm, a: &m.a, d: &m.d };
        (compute.kernels.selective_scan)(y, &inputs, &mut state.ssm[m.slot], shape);
        (s.dt_lr, s.bm, s.cm) = (dt_lr, bm, cm);
        compute.matmul(out, y, t_n, &m.out_proj, &mut s.mm);
        if let Some(b) = &m.out_bias {
            for row in out.chunks_exact_mut(c.hidden) {
                ops::add_in_place(row, b);
            }
        }
    }

    fn mlp(&self, compute: &Compute, mlp: &Mlp, hn: &[f32], rows: usize, out: &mut [f32], s: &mut JambaScratch) {
        let f = self.config.intermediate;
        let gu = resize(&mut s.a, rows * 2 * f);
        compute.matmul(gu, &hn[..rows * self.config.hidden], rows, &mlp.gate_up, &mut s.mm);
        let act = resize(&mut s.e, rows * f);
        for t in 0..rows {
            let (g, u) = gu[t * 2 * f..(t + 1) * 2 * f].split_at(f);
            for ((a, &gv), &uv) in act[t * f..(t + 1) * f].iter_mut().zip(g).zip(u) {
                *a = ops::silu(gv) * uv;
            }
        }
        compute.matmul(&mut out[..rows * self.config.hidden], act, rows, &mlp.down, &mut s.mm);
    }

    /// Softmax router over all experts, top-k, weights not renormalised; tokens are grouped per
    /// expert so each expert's matrices are read once per call.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        compute: &Compute,
        router: &Matrix,
        experts: &[Mlp],
        top_k: usize,
        hn: &[f32],
        out: &mut [f32],
        s: &mut JambaScratch,
    ) {
        let h = self.config.hidden;
        let t_n = hn.len() / h;
        let e_n = experts.len();
        let mut logits = vec![0f32; t_n * e_n];
        compute.matmul(&mut logits, hn, t_n, router, &mut s.mm);
        let mut routes: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_n];
        for t in 0..t_n {
            let p = &mut logits[t * e_n..(t + 1) * e_n];
            ops::softmax(p);
            let mut order: Vec<usize> = (0..e_n).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            for &e in &order[..top_k] {
                routes[e].push((t, p[e]));
            }
        }
        out.fill(0.0);
        let mut rows_in = Vec::new();
        let mut rows_out = Vec::new();
        for (e, route) in routes.iter().enumerate() {
            if route.is_empty() {
                continue;
            }
            rows_in.clear();
            for &(t, _) in route {
                rows_in.extend_from_slice(&hn[t * h..(t + 1) * h]);
            }
            rows_out.resize(route.len() * h, 0.0);
            self.mlp(compute, &experts[e], &rows_in, route.len(), &mut rows_out, s);
            for (i, &(t, w)) in route.iter().enumerate() {
                for (o, &v) in out[t * h..(t + 1) * h].iter_mut().zip(&rows_out[i * h..(i + 1) * h]) {
                    *o += w * v;
                }
            }
        }
    }
}
