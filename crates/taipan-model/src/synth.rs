//! Synthetic Jamba checkpoints with random weights, for benchmarks of realistic proportions when
//! no real weights can be downloaded (shared/spec/performance.md, "a synthetic model").
//!
//! Matrices are Q8_0 with magnitudes chosen so activations stay O(1) through the layers; norms
//! are ones; the SSM parameters follow Mamba's initialisation ranges. The tokenizer and chat
//! template are copied from a donor GGUF.

use crate::gguf::writer::{to_bytes, TensorSpec};
use crate::gguf::{GgufFile, Value};
use crate::ModelError;
use half::f16;
use std::path::Path;

/// Shape of a synthetic Jamba.
#[derive(Debug, Clone)]
pub struct SynthJamba {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub experts: usize,
    pub experts_per_token: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub dt_rank: usize,
    pub attn_period: usize,
    pub attn_offset: usize,
    /// Vocabulary size; the donor's tokens are padded with unused ones up to it (`None`: the
    /// donor's own).
    pub vocab: Option<usize>,
    pub seed: u64,
}

impl SynthJamba {
    /// The same layer pattern at hidden 256 (4 heads, 2 KV heads, 4 experts): small enough for
    /// tests to build and run in a second, large enough for the packed int8 kernels.
    pub fn hidden_256() -> Self {
        SynthJamba {
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            intermediate: 512,
            experts: 4,
            dt_rank: 16,
            ..Default::default()
        }
    }

    /// Jamba Reasoning 3B's form at hidden 256: no experts (every MLP dense) and one KV head
    /// shared by all four query heads.
    pub fn dense_one_kv_head_256() -> Self {
        SynthJamba { kv_heads: 1, experts: 1, ..Self::hidden_256() }
    }

    /// Jamba Reasoning 3B's shape as far as it is public (28 layers, 2 of them attention, 20
    /// query heads sharing one KV head of 128, a dense MLP, a 64K vocabulary); the attention
    /// layers' places, the MLP width and the untied output are estimates. ≈3.2 B parameters.
    pub fn reasoning_3b() -> Self {
        SynthJamba {
            hidden: 2560,
            layers: 28,
            heads: 20,
            kv_heads: 1,
            intermediate: 8192,
            experts: 1,
            experts_per_token: 1,
            dt_rank: 160,
            attn_period: 14,
            attn_offset: 7,
            vocab: Some(65536),
            ..Default::default()
        }
    }

    /// The shapes `taipan synth-jamba --shape` knows.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "mini-scaled" => Some(Self::default()),
            "reasoning-3b" => Some(Self::reasoning_3b()),
            "hidden-256" => Some(Self::hidden_256()),
            _ => None,
        }
    }

    pub const NAMES: [&'static str; 3] = ["mini-scaled", "reasoning-3b", "hidden-256"];
}

impl Default for SynthJamba {
    /// Jamba-1.5-Mini's proportions scaled to hidden 1024 (performance.md): 646 M parameters.
    fn default() -> Self {
        SynthJamba {
            hidden: 1024,
            layers: 8,
            heads: 16,
            kv_heads: 4,
            intermediate: 2816,
            experts: 16,
            experts_per_token: 2,
            d_state: 16,
            d_conv: 4,
            dt_rank: 64,
            attn_period: 8,
            attn_offset: 4,
            vocab: None,
            seed: 1,
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn f32_tensor(name: String, dims: Vec<u64>, values: impl Iterator<Item = f32>) -> TensorSpec {
    TensorSpec { name, dims, type_id: 0, data: values.flat_map(f32::to_le_bytes).collect() }
}

/// A `[rows, cols]` Q8_0 matrix with uniform values of standard deviation ~`1/sqrt(cols)`.
fn q8_matrix(rng: &mut Rng, name: String, dims: Vec<u64>, cols: usize) -> TensorSpec {
    let elems: u64 = dims.iter().product();
    let blocks = elems as usize / 32;
    // Uniform levels in [-127, 127] have a standard deviation of about 73.
    let d = f16::from_f32(1.0 / (73.0 * (cols as f32).sqrt())).to_le_bytes();
    let mut data = Vec::with_capacity(blocks * 34);
    for _ in 0..blocks {
        data.extend_from_slice(&d);
        for _ in 0..4 {
            let r = rng.next();
            for k in 0..8 {
                let v = ((r >> (8 * k)) & 0xFF) as u8;
                data.push(if v == 0x80 { 0 } else { v });
            }
        }
    }
    TensorSpec { name, dims, type_id: 8, data }
}

/// Writes a synthetic Jamba GGUF to `out`, taking the tokenizer from `donor` (a Jamba GGUF).
pub fn write_synthetic_jamba(out: &Path, donor: &Path, s: &SynthJamba) -> Result<u64, ModelError> {
    let donor = GgufFile::open(donor)?;
    let donor_vocab = donor.get_array("tokenizer.ggml.tokens")?.len();
    let vocab = s.vocab.unwrap_or(donor_vocab);
    if vocab < donor_vocab {
        return Err(ModelError::Input(format!("a vocabulary of {vocab} is smaller than the donor's {donor_vocab}")));
    }
    let (h, f, e) = (s.hidden, s.intermediate, s.experts);
    let di = 2 * h;
    let (hd, n, r, k) = (h / s.heads, s.d_state, s.dt_rank, s.d_conv);
    let u = |v: usize| v as u64;
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("jamba".into())),
        ("general.name".into(), Value::String(format!("synthetic-jamba-h{h}-l{}", s.layers))),
        ("jamba.block_count".into(), Value::U32(s.layers as u32)),
        ("jamba.context_length".into(), Value::U32(262144)),
        ("jamba.embedding_length".into(), Value::U32(h as u32)),
        ("jamba.feed_forward_length".into(), Value::U32(f as u32)),
        ("jamba.attention.head_count".into(), Value::U32(s.heads as u32)),
        (
            "jamba.attention.head_count_kv".into(),
            Value::Array(
                (0..s.layers)
                    .map(|i| Value::U32(if i % s.attn_period == s.attn_offset { s.kv_heads as u32 } else { 0 }))
                    .collect(),
            ),
        ),
        ("jamba.ssm.conv_kernel".into(), Value::U32(k as u32)),
        ("jamba.ssm.inner_size".into(), Value::U32(di as u32)),
        ("jamba.ssm.state_size".into(), Value::U32(n as u32)),
        ("jamba.ssm.time_step_rank".into(), Value::U32(r as u32)),
        ("jamba.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-6)),
        ("jamba.expert_count".into(), Value::U32(e as u32)),
        ("jamba.expert_used_count".into(), Value::U32(s.experts_per_token as u32)),
    ];
    for (key, v) in &donor.metadata {
        if !key.starts_with("tokenizer.") {
            continue;
        }
        // Padding the vocabulary: unused tokens (llama.cpp's type 5) that text never maps to.
        let pad = |f: &dyn Fn(usize) -> Value| -> Value {
            match v {
                Value::Array(a) if a.len() == donor_vocab => {
                    Value::Array(a.iter().cloned().chain((a.len()..vocab).map(f)).collect())
                }
                other => other.clone(),
            }
        };
        let padded = match key.as_str() {
            "tokenizer.ggml.tokens" => pad(&|i| Value::String(format!("<unused_{i}>"))),
            "tokenizer.ggml.scores" => pad(&|_| Value::F32(-1e9)),
            "tokenizer.ggml.token_type" => match v {
                Value::Array(a) if matches!(a.first(), Some(Value::U32(_))) => pad(&|_| Value::U32(5)),
                _ => pad(&|_| Value::I32(5)),
            },
            _ => v.clone(),
        };
        md.push((key.clone(), padded));
    }
    let mut rng = Rng(s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let ones = |name: String, len: usize| f32_tensor(name, vec![u(len)], std::iter::repeat_n(1.0, len));
    let mut tensors = vec![
        q8_matrix(&mut rng, "token_embd.weight".into(), vec![u(h), u(vocab)], 1),
        ones("output_norm.weight".into(), h),
        q8_matrix(&mut rng, "output.weight".into(), vec![u(h), u(vocab)], h),
    ];
    // The embedding should have unit-scale rows, not 1/sqrt(h): rescale its block scales.
    let scale = f16::from_f32(1.0 / 73.0).to_le_bytes();
    for b in tensors[0].data.chunks_exact_mut(34) {
        b[..2].copy_from_slice(&scale);
    }
    for i in 0..s.layers {
        let name = |t: &str| format!("blk.{i}.{t}");
        tensors.push(ones(name("attn_norm.weight"), h));
        tensors.push(ones(name("ffn_norm.weight"), h));
        if i % s.attn_period == s.attn_offset {
            let (qd, kvd) = (s.heads * hd, s.kv_heads * hd);
            tensors.push(q8_matrix(&mut rng, name("attn_q.weight"), vec![u(h), u(qd)], h));
            tensors.push(q8_matrix(&mut rng, name("attn_k.weight"), vec![u(h), u(kvd)], h));
            tensors.push(q8_matrix(&mut rng, name("attn_v.weight"), vec![u(h), u(kvd)], h));
            tensors.push(q8_matrix(&mut rng, name("attn_output.weight"), vec![u(qd), u(h)], qd));
        } else {
            tensors.push(q8_matrix(&mut rng, name("ssm_in.weight"), vec![u(h), u(2 * di)], h));
            let conv: Vec<f32> = (0..di * k).map(|_| (rng.unit() - 0.5) * 0.5).collect();
            tensors.push(f32_tensor(name("ssm_conv1d.weight"), vec![u(k), u(di)], conv.into_iter()));
            let cb: Vec<f32> = (0..di).map(|_| (rng.unit() - 0.5) * 0.1).collect();
            tensors.push(f32_tensor(name("ssm_conv1d.bias"), vec![u(di)], cb.into_iter()));
            tensors.push(q8_matrix(&mut rng, name("ssm_x.weight"), vec![u(di), u(r + 2 * n)], di));
            tensors.push(ones(name("ssm_dt_norm.weight"), r));
            tensors.push(ones(name("ssm_b_norm.weight"), n));
            tensors.push(ones(name("ssm_c_norm.weight"), n));
            let dtw: Vec<f32> = (0..di * r).map(|_| (rng.unit() - 0.5) * 2.0 / (r as f32).sqrt()).collect();
            tensors.push(f32_tensor(name("ssm_dt.weight"), vec![u(r), u(di)], dtw.into_iter()));
            // dt ≈ softplus(bias) in [0.001, 0.1], as Mamba initialises it.
            let dtb: Vec<f32> = (0..di)
                .map(|_| {
                    let dt = (0.001f32.ln() + rng.unit() * (0.1f32.ln() - 0.001f32.ln())).exp();
                    dt + (-(-dt).exp_m1()).ln()
                })
                .collect();
            tensors.push(f32_tensor(name("ssm_dt.bias"), vec![u(di)], dtb.into_iter()));
            let a: Vec<f32> = (0..di * n).map(|j| -((j % n) as f32 + 1.0)).collect();
            tensors.push(f32_tensor(name("ssm_a"), vec![u(n), u(di)], a.into_iter()));
            tensors.push(ones(name("ssm_d"), di));
            tensors.push(q8_matrix(&mut rng, name("ssm_out.weight"), vec![u(di), u(h)], di));
        }
        if i % 2 == 1 && e > 1 {
            let router: Vec<f32> = (0..e * h).map(|_| (rng.unit() - 0.5) / (h as f32).sqrt()).collect();
            tensors.push(f32_tensor(name("ffn_gate_inp.weight"), vec![u(h), u(e)], router.into_iter()));
            tensors.push(q8_matrix(&mut rng, name("ffn_gate_exps.weight"), vec![u(h), u(f), u(e)], h));
            tensors.push(q8_matrix(&mut rng, name("ffn_up_exps.weight"), vec![u(h), u(f), u(e)], h));
            tensors.push(q8_matrix(&mut rng, name("ffn_down_exps.weight"), vec![u(f), u(h), u(e)], f));
        } else {
            tensors.push(q8_matrix(&mut rng, name("ffn_gate.weight"), vec![u(h), u(f)], h));
            tensors.push(q8_matrix(&mut rng, name("ffn_up.weight"), vec![u(h), u(f)], h));
            tensors.push(q8_matrix(&mut rng, name("ffn_down.weight"), vec![u(f), u(h)], f));
        }
    }
    let params: u64 = tensors.iter().map(|t| t.dims.iter().product::<u64>()).sum();
    let bytes = to_bytes(&md, &tensors);
    std::fs::write(out, bytes).map_err(|e| ModelError::Input(format!("{}: {e}", out.display())))?;
    Ok(params)
}
