//! Loading Jamba's weights from any [`WeightSource`] (GGUF or safetensors, through GGUF names),
//! with every tensor's shape checked against the config.

use super::attention::Attention;
use super::ffn::{Ffn, Mlp};
use super::mamba::Mamba;
use super::{Jamba, JambaConfig, Layer, Mixer};
use crate::weights::{RawTensor, WeightSource};
use crate::ModelError;
use taipan_kernels::huge::WeightArena;
use taipan_kernels::{formats, ssm, DType, MatmulMode, Matrix};

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

/// How matrices are built: the matmul mode, an optional on-load quantization, and the arena
/// the packed ones are laid out in (every packed matrix end to end on huge pages).
#[derive(Clone, Copy)]
struct Build<'a> {
    mode: MatmulMode,
    quantize: Option<DType>,
    arena: &'a WeightArena,
}

impl Build<'_> {
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
            return Matrix::from_stored(self.arena, DType::Q8_0, &q, rows, cols, self.mode);
        }
        Matrix::from_stored(self.arena, dtype, data, rows, cols, self.mode)
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
    // Parts in different formats stay apart, each in its own packed form.
    let mut stack = Vec::with_capacity(tensors.len());
    for (t, (n, r)) in tensors.iter().zip(parts) {
        stack.push(mode.matrix(t.dtype, &t.data, *r, cols).map_err(|e| tensor_err(src, n, e.to_string()))?);
    }
    Ok(Matrix::stack(stack))
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
        let arena = WeightArena::new();
        let mode = Build { mode: opts.mode, quantize: opts.quantize, arena: &arena };
        let exact = Build { mode: MatmulMode::Exact, quantize: None, arena: &arena };
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
                    kv_layer: attn_slots,
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
                    conv_w: ssm::taps_major(&f32s(src, &conv)?, di),
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
                    state_layer: mamba_slots,
                };
                mamba_slots += 1;
                Mixer::Mamba(Box::new(m))
            };
            let router = name("ffn_gate_inp.weight");
            if src.has(&router) != c.moe[i] {
                let message = if c.moe[i] {
                    "missing: the config makes this layer a mixture of experts".to_string()
                } else {
                    "present, but the config makes this layer a dense MLP (check num_experts and the expert layer period)"
                        .to_string()
                };
                return Err(tensor_err(src, &router, message));
            }
            let ffn = if c.moe[i] {
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
                        Matrix::stack(vec![
                            mode.matrix(gt, &gb, f, h).map_err(err)?,
                            mode.matrix(ut, &ub, f, h).map_err(err)?,
                        ])
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
}
