//! Elementwise and normalisation kernels, RoPE and causal attention.

use crate::dispatch::Kernels;
use crate::pool::ThreadPool;
use crate::tiles;
use std::cell::RefCell;

/// Runs `f` — an elementwise loop — compiled for the widest vectors of this CPU (AVX-512, else
/// AVX2); the crate itself is built for baseline x86-64, whose loops go four lanes at a time.
/// The loops have no reductions across lanes the compiler could reorder, so every width gives
/// the same bits.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F.
            return unsafe { with_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

/// `out = x / rms(x) · weight` over each row of `weight.len()` values, in place.
///
/// The sum of squares is accumulated in f64, as ggml does, so exact-mode outputs agree; in eight
/// lanes, so that it vectorizes (the lanes change the sum by f64 rounding only).
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let n = weight.len();
    assert!(n > 0 && x.len().is_multiple_of(n), "rms_norm shape");
    wide(
        #[inline(always)]
        || {
            for row in x.chunks_exact_mut(n) {
                let mut lanes = [0f64; 8];
                let mut chunks = row.chunks_exact(8);
                for c in chunks.by_ref() {
                    for (l, &v) in lanes.iter_mut().zip(c) {
                        *l += (v as f64) * (v as f64);
                    }
                }
                let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
                let sum = lanes.iter().sum::<f64>() + tail;
                let mean = (sum / n as f64) as f32;
                let scale = 1.0 / (mean + eps).sqrt();
                for (v, w) in row.iter_mut().zip(weight) {
                    *v = *v * scale * w;
                }
            }
        },
    )
}

/// `out = rms_norm(x)` into a separate buffer.
pub fn rms_norm_into(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    out.copy_from_slice(x);
    rms_norm(out, weight, eps);
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Log-softmax into `out`, with the normaliser accumulated in f64.
pub fn log_softmax(out: &mut [f32], x: &[f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64 - lse) as f32;
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `e^x` from a degree-6 polynomial after range reduction to `[-ln2/2, ln2/2]` (within 2 ulp
/// of `f32::exp` over `[-87, 88]`), written without calls or branches so that loops over slices
/// compile to SIMD on any target; `f32::exp` is a libm call per element.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // Round to nearest through the float mantissa (1.5·2^23 pushes the fraction out); `t`'s
    // low bits then hold the integer `n` itself (offset by 1.5·2^23's bits), so 2^n is built
    // without a float-to-int conversion, whose saturating semantics LLVM scalarizes.
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    p = p * (r * r) + (r + 1.0);
    p * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

/// `ln x` for positive, finite, normal `x` (Cephes' polynomial on the mantissa in
/// `[√½, √2)`, within 2 ulp of `f32::ln`), branch-free like [`fast_exp`] so loops vectorise.
#[inline(always)]
pub fn fast_ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 126;
    let m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F00_0000);
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    e -= small as i32;
    let m = if small { m + m } else { m } - 1.0;
    let z = m * m;
    let mut y = 7.037_683_6e-2f32;
    y = y * m - 1.151_461_1e-1;
    y = y * m + 1.167_699_9e-1;
    y = y * m - 1.242_014_1e-1;
    y = y * m + 1.424_932_3e-1;
    y = y * m - 1.666_805_8e-1;
    y = y * m + 2.000_071_5e-1;
    y = y * m - 2.499_999_4e-1;
    y = y * m + 3.333_333e-1;
    y *= m * z;
    let e = e as f32;
    y += -2.121_944_4e-4 * e;
    y += -0.5 * z;
    (m + y) + 0.693_359_4 * e
}

/// `x = silu(x)` over a slice (the vectorisable form of [`silu`]).
pub fn silu_in_place(x: &mut [f32]) {
    wide(
        #[inline(always)]
        || {
            for v in x.iter_mut() {
                *v /= 1.0 + fast_exp(-*v);
            }
        },
    )
}

/// `out = silu(gate) ⊙ up` over slices (the vectorisable form).
pub fn swiglu_into(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert!(out.len() == gate.len() && gate.len() == up.len());
    wide(
        #[inline(always)]
        || {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + fast_exp(-g)) * u;
            }
        },
    )
}

/// `gate = silu(gate) ⊙ up`, in place.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// GELU in its tanh form, `x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`: what ggml's `gelu`
/// and Gemma's `gelu_pytorch_tanh` compute.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// `out = gelu_tanh(gate) ⊙ up` over slices, vectorisable: `x/2·(1 + tanh u)` is `x·σ(2u)`,
/// so it takes one [`fast_exp`] and no libm call.
pub fn geglu_into(out: &mut [f32], gate: &[f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    assert!(out.len() == gate.len() && gate.len() == up.len());
    wide(
        #[inline(always)]
        || {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                let two_u = 2.0 * SQRT_2_OVER_PI * g * (1.0 + 0.044_715 * g * g);
                *o = g / (1.0 + fast_exp(-two_u)) * u;
            }
        },
    )
}

/// `x += y`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    wide(
        #[inline(always)]
        || {
            for (a, &b) in x.iter_mut().zip(y) {
                *a += b;
            }
        },
    )
}

/// `x += y` over rows of `row_len` values, spread over the pool (a whole batch's residual add
/// is megabytes).
pub fn add_rows(pool: &ThreadPool, x: &mut [f32], y: &[f32], row_len: usize) {
    assert_eq!(x.len(), y.len());
    pool.for_rows_mut(x, row_len, &|t, row| add_in_place(row, &y[t * row_len..(t + 1) * row_len]));
}

/// `out = rms_norm(x)` over rows of `weight.len()` values, spread over the pool.
pub fn rms_norm_rows(pool: &ThreadPool, out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let n = weight.len();
    assert_eq!(out.len(), x.len());
    pool.for_rows_mut(out, n, &|t, row| rms_norm_into(row, &x[t * n..(t + 1) * n], weight, eps));
}

/// Which dimensions RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF llama weights, whose q/k rows the converter permuted.
    Adjacent,
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints ("rotate half").
    Half,
}

/// How a model stretches RoPE beyond the context it was trained on (GGUF `rope.scaling.*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (position interpolation).
    Linear {
        factor: f32,
    },
    /// YaRN (Peng et al. 2023): low-frequency pairs interpolated by `factor`, high-frequency ones
    /// kept, a linear ramp between the pairs whose wavelengths make `beta_fast` and `beta_slow`
    /// turns over `original_context`; cosines and sines scaled by `(1 + 0.1·ln factor)·attn_factor`.
    /// The same arithmetic as ggml's `rope_yarn`.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
        attn_factor: f32,
    },
}

/// Rotary position embedding: pairs of each head turn by `pos · base^(−2i/d)` (divided by the
/// model's per-pair frequency factors where it has them, and scaled as [`RopeScaling`] says).
///
/// Nothing is tabulated per position (a model may declare millions of them): a forward pass
/// computes the angles of its own positions once ([`Rope::angles`]) and every layer reuses them.
#[derive(Debug, Clone)]
pub struct Rope {
    pub dims: usize,
    pub base: f32,
    /// Angle per position of pair `i`, scaling included.
    freqs: Vec<f64>,
    /// Magnitude of the rotation (1 except under YaRN).
    magnitude: f64,
}

impl Rope {
    pub fn new(dims: usize, base: f32) -> Self {
        Rope::scaled(dims, base, RopeScaling::None, None)
    }

    /// RoPE with scaling and optional per-pair frequency factors (`rope_freqs`, as Llama 3's
    /// long-context scaling is written to GGUF; `d/2` values, each dividing its pair's frequency).
    pub fn scaled(dims: usize, base: f32, scaling: RopeScaling, factors: Option<&[f32]>) -> Self {
        let half = dims / 2;
        let raw = |i: usize| {
            let f = (base as f64).powf(-2.0 * i as f64 / dims as f64);
            f / factors.map_or(1.0, |v| v[i] as f64)
        };
        let (freqs, magnitude) = match scaling {
            RopeScaling::None => ((0..half).map(raw).collect(), 1.0),
            RopeScaling::Linear { factor } => ((0..half).map(|i| raw(i) / factor as f64).collect(), 1.0),
            RopeScaling::Yarn { factor, original_context, beta_fast, beta_slow, attn_factor } => {
                let corr = |turns: f32| {
                    dims as f32 * (original_context as f32 / (turns * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let low = corr(beta_fast).floor().max(0.0);
                let high = corr(beta_slow).ceil().min(dims as f32 - 1.0);
                let freqs = (0..half)
                    .map(|i| {
                        let y = (i as f32 - low) / (high - low).max(0.001);
                        let keep = 1.0 - y.clamp(0.0, 1.0);
                        raw(i) * ((1.0 - keep as f64) / factor as f64 + keep as f64)
                    })
                    .collect();
                (freqs, (1.0 + 0.1 * (factor as f64).ln()) * attn_factor as f64)
            }
        };
        Rope { dims, base, freqs, magnitude }
    }

    /// Cosines and sines for `positions`: `[positions.len(), d/2]` each.
    pub fn angles(&self, positions: &[usize], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.clear();
        sin.clear();
        for &p in positions {
            for &f in &self.freqs {
                let angle = p as f64 * f;
                cos.push((angle.cos() * self.magnitude) as f32);
                sin.push((angle.sin() * self.magnitude) as f32);
            }
        }
    }

    /// Rotates every head of `x` (`[heads, head_dim]`, the first `dims` of each head) by the
    /// angles of one position (`cos`, `sin`: its `d/2` values from [`Rope::angles`]).
    pub fn apply(&self, x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], style: RopeStyle) {
        let half = self.dims / 2;
        assert!(cos.len() >= half && sin.len() >= half && self.dims <= head_dim);
        for head in x.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = match style {
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                    RopeStyle::Half => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// Keys and values of one layer in a paged pool, as one sequence and one KV head see them.
///
/// The pool stores `[blocks, block_size, stride]` floats for K and for V; position `p` of the
/// sequence lives in block `blocks[p / block_size]`, row `p % block_size`, at `offset` within the row.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub blocks: &'a [u32],
    pub block_size: usize,
    pub stride: usize,
    pub offset: usize,
}

impl KvView<'_> {
    /// Float index of position `p`'s key (and value) for this head.
    #[inline]
    pub fn at(&self, p: usize) -> usize {
        (self.blocks[p / self.block_size] as usize * self.block_size + p % self.block_size) * self.stride + self.offset
    }

    /// Panics unless positions `0..n` are inside the pool for a head of `hd` floats.
    pub fn check(&self, n: usize, hd: usize) {
        assert!(n <= self.blocks.len() * self.block_size, "block table too short for {n} positions");
        assert!(self.offset + hd <= self.stride, "head outside the row");
        let rows = self.k.len().min(self.v.len()) / self.stride;
        let needed = n.div_ceil(self.block_size);
        for &b in &self.blocks[..needed] {
            assert!((b as usize + 1) * self.block_size <= rows, "block {b} outside the pool");
        }
    }
}

/// Scalar reference of one attention head: `out = softmax(scale · K q) · V` over the positions
/// `span` (a causal row sees `0..=pos`; a sliding-window row only the last `window` of those).
pub fn attend_head_ref(
    out: &mut [f32],
    q: &[f32],
    kv: &KvView<'_>,
    span: (usize, usize),
    scale: f32,
    scores: &mut Vec<f32>,
) {
    let hd = q.len();
    let (first, end) = span;
    assert!(out.len() == hd && first < end);
    kv.check(end, hd);
    scores.clear();
    scores.extend((first..end).map(|p| {
        let at = kv.at(p);
        dot(q, &kv.k[at..at + hd]) * scale
    }));
    softmax(scores);
    out.fill(0.0);
    for (p, &w) in (first..end).zip(scores.iter()) {
        let at = kv.at(p);
        for (o, &x) in out.iter_mut().zip(&kv.v[at..at + hd]) {
            *o += w * x;
        }
    }
}

/// Scalar reference of several query rows against one KV head: row `i` of `out` is
/// [`attend_head_ref`] of row `i` of `q` over positions `spans[i].0..spans[i].1`.
pub fn attend_rows_ref(
    out: &mut [f32],
    q: &[f32],
    spans: &[(usize, usize)],
    kv: &KvView<'_>,
    scale: f32,
    scratch: &mut Vec<f32>,
) {
    assert!(!spans.is_empty() && q.len().is_multiple_of(spans.len()) && out.len() == q.len());
    let hd = q.len() / spans.len();
    for (i, &span) in spans.iter().enumerate() {
        attend_head_ref(&mut out[i * hd..(i + 1) * hd], &q[i * hd..(i + 1) * hd], kv, span, scale, scratch);
    }
}

/// Query tokens of one sequence that share a tiled attention job (with all the query heads of
/// one KV head): enough rows to amortise each key and value load, few enough for many jobs.
const TILE_TOKENS: usize = 8;

/// Shapes shared by every sequence of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding-window attention: a query at position `p` sees only positions `p + 1 − w ..= p`
    /// (llama.cpp's standard SWA mask; Gemma's local layers). `None`: every earlier position.
    pub window: Option<usize>,
}

impl AttentionShape {
    /// Positions a query at `pos` attends to, as `(first, end)`.
    #[inline]
    pub fn span(&self, pos: usize) -> (usize, usize) {
        let first = match self.window {
            Some(w) => (pos + 1).saturating_sub(w.max(1)),
            None => 0,
        };
        (first, pos + 1)
    }
}

/// One sequence's part of a batched attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq<'a> {
    /// Row of its first query in `q`/`out`.
    pub first_row: usize,
    /// Query tokens (its new tokens this step).
    pub tokens: usize,
    /// Absolute position of its first query token; query `i` sees positions `0..=start + i`.
    pub start: usize,
    /// Its block table (keys and values of the new tokens already written).
    pub blocks: &'a [u32],
    /// Its tokens are prompt tokens: attended in bf16 tiles where the CPU has them (see
    /// `crate::dispatch::TileKernels`).
    pub prompt: bool,
}

/// Paged pool storage of one layer.
#[derive(Clone, Copy, Debug)]
pub struct KvLayer<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub block_size: usize,
}

/// Query rows, output rows and `(first, end)` position spans of one tiled attention job.
type TileRows = (Vec<f32>, Vec<f32>, Vec<(usize, usize)>);

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static TILE_SCRATCH: RefCell<tiles::AttnTileScratch> = RefCell::new(tiles::AttnTileScratch::default());
    /// A tiled job's gathered query rows, its output rows and the positions each row sees.
    static TILE: RefCell<TileRows> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Causal attention for a batch of sequences over a paged KV pool.
///
/// `q` and `out` are `[rows, heads·head_dim]` with each sequence's queries at its `first_row`.
pub fn attention(
    kernels: &Kernels,
    out: &mut [f32],
    q: &[f32],
    kv: KvLayer<'_>,
    seqs: &[AttnSeq<'_>],
    s: AttentionShape,
    pool: &ThreadPool,
) {
    let qdim = s.heads * s.head_dim;
    let kvdim = s.kv_heads * s.head_dim;
    assert!(s.heads.is_multiple_of(s.kv_heads));
    assert_eq!(q.len(), out.len());
    let rows: usize = seqs.iter().map(|x| x.tokens).sum();
    assert!(q.len() >= rows * qdim);
    for x in seqs {
        assert!((x.first_row + x.tokens) * qdim <= q.len());
    }
    // Jobs write their rows' outputs unsynchronised: sequences must not share a row.
    let mut spans: Vec<(usize, usize)> = seqs.iter().map(|x| (x.first_row, x.tokens)).collect();
    spans.sort_unstable();
    assert!(spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0), "attention: sequences' rows overlap");
    let group = s.heads / s.kv_heads;
    let sink = SharedOut(out.as_mut_ptr());
    let attend_rows = kernels.attend_rows;
    // Prompt sequences go through tiles where the CPU has them: their keys and values are laid
    // out as tile operands once, for all their jobs.
    let attend_tiles = kernels.tiles.map(|t| t.attend).filter(|_| s.head_dim.is_multiple_of(tiles::K_STEP));
    let tiled = |x: &AttnSeq<'_>| attend_tiles.is_some() && x.prompt;
    let mut panel_at = Vec::with_capacity(seqs.len());
    let mut owners: Vec<(usize, usize)> = Vec::new();
    for (i, x) in seqs.iter().enumerate() {
        panel_at.push(owners.len());
        if tiled(x) {
            owners.extend((0..s.kv_heads).map(|h| (i, h)));
        }
    }
    let mut panels: Vec<tiles::KvPanels> = Vec::new();
    panels.resize_with(owners.len(), Default::default);
    if !owners.is_empty() {
        let slots: Vec<std::sync::Mutex<&mut tiles::KvPanels>> = panels.iter_mut().map(std::sync::Mutex::new).collect();
        pool.run(owners.len(), &|j| {
            let (i, kvh) = owners[j];
            let x = &seqs[i];
            let view = KvView {
                k: kv.k,
                v: kv.v,
                blocks: x.blocks,
                block_size: kv.block_size,
                stride: kvdim,
                offset: kvh * s.head_dim,
            };
            if let Ok(mut slot) = slots[j].lock() {
                slot.fill(&view, x.start + x.tokens, s.head_dim);
            }
        });
    }
    let block_of = |x: &AttnSeq<'_>| if tiled(x) { tiles::TILE_TOKENS } else { TILE_TOKENS };
    // A job is one KV head of one sequence and a block of up to TILE_TOKENS of its query tokens,
    // with all the query heads that share the KV head. A row's arithmetic never depends on which
    // rows share its job, only on its role (prompt rows in tiles where the CPU has them), so a
    // token's output is the same whatever else the step holds and however the prompt is chunked.
    let jobs_of = |x: &AttnSeq<'_>| s.kv_heads * x.tokens.div_ceil(block_of(x));
    let mut starts = Vec::with_capacity(seqs.len() + 1);
    let mut total = 0;
    for x in seqs {
        starts.push(total);
        total += jobs_of(x);
    }
    let hd = s.head_dim;
    pool.run(total, &|job| {
        let si = starts.partition_point(|&st| st <= job) - 1;
        let x = &seqs[si];
        let local = job - starts[si];
        let view = |kvh: usize| KvView {
            k: kv.k,
            v: kv.v,
            blocks: x.blocks,
            block_size: kv.block_size,
            stride: kvdim,
            offset: kvh * hd,
        };
        let (kvh, block) = (local % s.kv_heads, local / s.kv_heads);
        let size = block_of(x);
        let tokens = block * size..((block + 1) * size).min(x.tokens);
        TILE.with(|tile| {
            let (q_rows, out_rows, spans) = &mut *tile.borrow_mut();
            q_rows.clear();
            spans.clear();
            for t in tokens.clone() {
                let at = (x.first_row + t) * qdim + kvh * group * hd;
                q_rows.extend_from_slice(&q[at..at + group * hd]);
                spans.extend(std::iter::repeat_n(s.span(x.start + t), group));
            }
            out_rows.resize(q_rows.len(), 0.0);
            match attend_tiles.filter(|_| tiled(x)) {
                Some(attend) => TILE_SCRATCH.with_borrow_mut(|scratch| {
                    attend(out_rows, q_rows, spans, &panels[panel_at[si] + kvh], s.scale, scratch)
                }),
                None => SCORES
                    .with(|cell| attend_rows(out_rows, q_rows, spans, &view(kvh), s.scale, &mut cell.borrow_mut())),
            }
            for (i, t) in tokens.enumerate() {
                let at = (x.first_row + t) * qdim + kvh * group * hd;
                // SAFETY: the query heads of KV head kvh for token t belong to this job alone.
                let o = unsafe { std::slice::from_raw_parts_mut(sink.at(at), group * hd) };
                o.copy_from_slice(&out_rows[i * group * hd..(i + 1) * group * hd]);
            }
        });
    });
}

pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: users write disjoint elements and wait for completion before reading.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `offset` must be in bounds of the buffer this pointer came from.
    pub(crate) unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: forwarded to the caller.
        unsafe { self.0.add(offset) }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums so the compiler can vectorise without reassociation flags.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_ln_matches_libm() {
        let mut x = 1.0e-30f32;
        while x < 1.0e30 {
            let (got, want) = (fast_ln(x) as f64, (x as f64).ln());
            assert!((got - want).abs() <= 2.5e-7 * want.abs().max(1.0), "ln({x}) = {got}, want {want}");
            x *= 1.0137;
        }
        for i in 1..20_000 {
            let x = 1.0 + i as f32 * 1.0e-4;
            let (got, want) = (fast_ln(x) as f64, (x as f64).ln());
            assert!((got - want).abs() <= 3.0 * f32::EPSILON as f64 * want, "ln({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn fast_exp_and_its_activations_match_libm() {
        for i in 0..40_000 {
            let x = -87.0 + i as f32 * 0.004375;
            let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 4e-7 * want, "exp({x}) = {got}, want {want}");
        }
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.05).collect();
        let mut got = xs.clone();
        silu_in_place(&mut got);
        let ups: Vec<f32> = xs.iter().map(|v| v * 0.3 - 1.0).collect();
        let mut sw = vec![0f32; xs.len()];
        swiglu_into(&mut sw, &xs, &ups);
        for ((&x, &g), (&s, &u)) in xs.iter().zip(&got).zip(sw.iter().zip(&ups)) {
            assert!((g - silu(x)).abs() <= 1e-6 * (1.0 + silu(x).abs()), "silu({x})");
            assert!((s - silu(x) * u).abs() <= 1e-6 * (1.0 + (silu(x) * u).abs()), "swiglu({x}, {u})");
        }
        let mut ge = vec![0f32; xs.len()];
        geglu_into(&mut ge, &xs, &ups);
        for ((&x, &u), &g) in xs.iter().zip(&ups).zip(&ge) {
            let want = gelu_tanh(x) * u;
            assert!((g - want).abs() <= 1e-6 * (1.0 + want.abs()), "geglu({x}, {u}) = {g}, want {want}");
        }
    }

    #[test]
    fn rms_norm_unit_rows() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0];
        rms_norm(&mut x, &[1.0, 1.0], 1e-6);
        let rms = (12.5f32 + 1e-6).sqrt();
        assert!((x[0] - 3.0 / rms).abs() < 1e-6 && (x[1] - 4.0 / rms).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 0.0]);
    }

    /// The elementwise loops run in the CPU's widest vectors and give the bits of the same
    /// arithmetic one value at a time; rms_norm's eight f64 lanes stay within f64 rounding of a
    /// plain sum (it is not tested bit for bit).
    #[test]
    fn wide_loops_give_the_bits_of_scalar_arithmetic() {
        let n = 1003;
        let g: Vec<f32> = (0..n).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 97.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 211.0).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut out = vec![0f32; n];
        swiglu_into(&mut out, &g, &u);
        let want: Vec<f32> =
            g.iter().zip(&u).map(|(&g, &u)| std::hint::black_box(g / (1.0 + fast_exp(-g))) * u).collect();
        assert_eq!(bits(&out), bits(&want));
        let mut x = g.clone();
        silu_in_place(&mut x);
        let want: Vec<f32> = g.iter().map(|&g| std::hint::black_box(g) / (1.0 + fast_exp(-g))).collect();
        assert_eq!(bits(&x), bits(&want));
        let mut x = g.clone();
        add_in_place(&mut x, &u);
        let want: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| std::hint::black_box(g) + u).collect();
        assert_eq!(bits(&x), bits(&want));
        let weight: Vec<f32> = (0..n).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
        let mut x = g.clone();
        rms_norm(&mut x, &weight, 1e-6);
        let sum: f64 = g.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((sum / n as f64) as f32 + 1e-6).sqrt();
        for i in 0..n {
            let want = g[i] * scale * weight[i];
            assert!((x[i] - want).abs() <= 1e-6 * want.abs(), "rms_norm[{i}]: {} vs {want}", x[i]);
        }
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = vec![1.0, 2.0, 3.0, -1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0] && x[3] == 0.0);
    }

    #[test]
    fn rope_styles_rotate_their_pairs() {
        let t = Rope::new(4, 10000.0);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        t.angles(&[0, 1, 1_000_000_000], &mut cos, &mut sin);
        let mut a = vec![1.0, 0.0, 1.0, 0.0];
        t.apply(&mut a, 4, &cos[2..], &sin[2..], RopeStyle::Adjacent);
        assert!((a[0] - 1f32.cos()).abs() < 1e-6 && (a[1] - 1f32.sin()).abs() < 1e-6);
        let mut b = vec![1.0, 1.0, 0.0, 0.0];
        t.apply(&mut b, 4, &cos[2..], &sin[2..], RopeStyle::Half);
        assert!((b[0] - 1f32.cos()).abs() < 1e-6 && (b[2] - 1f32.sin()).abs() < 1e-6);
        // A far position costs nothing to reach: angle 1e9 rad.
        assert!((cos[4] as f64 - 1e9f64.cos()).abs() < 1e-6);
        // Position 0 is the identity; norms are preserved.
        let mut c = vec![0.3, -0.7, 1.1, 2.0];
        t.apply(&mut c, 4, &cos[..2], &sin[..2], RopeStyle::Half);
        assert_eq!(c, vec![0.3, -0.7, 1.1, 2.0]);
    }

    /// Every output row of `attention` against a naive softmax over the positions its span sees.
    #[allow(clippy::too_many_arguments)]
    fn assert_matches_naive(
        out: &[f32],
        q: &[f32],
        (k, v): (&[f32], &[f32]),
        seqs: &[AttnSeq<'_>],
        shape: AttentionShape,
        bs: usize,
        tolerance: f32,
        label: &str,
    ) {
        let (heads, kv_heads, hd) = (shape.heads, shape.kv_heads, shape.head_dim);
        let kvdim = kv_heads * hd;
        for x in seqs {
            for t in 0..x.tokens {
                let row = x.first_row + t;
                for h in 0..heads {
                    let kvh = h / (heads / kv_heads);
                    let at = |p: usize| (x.blocks[p / bs] as usize * bs + p % bs) * kvdim + kvh * hd;
                    let qh = &q[(row * heads + h) * hd..][..hd];
                    let (first, end) = shape.span(x.start + t);
                    let mut w: Vec<f32> = (first..end)
                        .map(|p| qh.iter().zip(&k[at(p)..at(p) + hd]).map(|(a, b)| a * b).sum::<f32>() * shape.scale)
                        .collect();
                    softmax(&mut w);
                    for d in 0..hd {
                        let want: f32 = (first..end).zip(&w).map(|(p, wp)| wp * v[at(p) + d]).sum();
                        let got = out[(row * heads + h) * hd + d];
                        assert!((got - want).abs() < tolerance, "{label} row {row} head {h}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// Linear scaling divides positions; frequency factors divide their pair's frequency; YaRN
    /// keeps the fastest pairs, interpolates the slowest by its factor and scales magnitudes.
    #[test]
    fn rope_scalings_turn_pairs_as_their_definitions_say() {
        let (dims, base) = (64, 10000f32);
        let freq = |i: usize| (base as f64).powf(-2.0 * i as f64 / dims as f64);
        let angles = |r: &Rope, p: usize| {
            let (mut c, mut s) = (Vec::new(), Vec::new());
            r.angles(&[p], &mut c, &mut s);
            (c, s)
        };
        let linear = Rope::scaled(dims, base, RopeScaling::Linear { factor: 4.0 }, None);
        let (c, _) = angles(&linear, 400);
        let (c1, _) = angles(&Rope::new(dims, base), 100);
        for (a, b) in c.iter().zip(&c1) {
            assert!((a - b).abs() < 1e-5);
        }
        let factors: Vec<f32> = (0..dims / 2).map(|i| 1.0 + i as f32).collect();
        let (c, s) = angles(&Rope::scaled(dims, base, RopeScaling::None, Some(&factors)), 7);
        for i in 0..dims / 2 {
            let want = 7.0 * freq(i) / factors[i] as f64;
            assert!((c[i] as f64 - want.cos()).abs() < 1e-6 && (s[i] as f64 - want.sin()).abs() < 1e-6);
        }
        let yarn = RopeScaling::Yarn {
            factor: 8.0,
            original_context: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attn_factor: 1.0,
        };
        let (c, s) = angles(&Rope::scaled(dims, base, yarn, None), 3);
        let m = 1.0 + 0.1 * 8f64.ln();
        let last = dims / 2 - 1;
        for (i, scale) in [(0, 1.0), (last, 1.0 / 8.0)] {
            let want = 3.0 * freq(i) * scale;
            assert!((c[i] as f64 - m * want.cos()).abs() < 1e-5, "pair {i}");
            assert!((s[i] as f64 - m * want.sin()).abs() < 1e-5, "pair {i}");
        }
    }

    /// Prefill chunks take the tiled path (many query rows per job): long chunks, query heads
    /// sharing a KV head, head sizes with and without whole 32-float strips, chunks that start
    /// mid-sequence, beside a decode row; with full causal attention and with sliding windows
    /// narrower and wider than a key tile.
    #[test]
    fn tiled_prefill_attention_matches_naive_for_every_kernel_table() {
        let pool = ThreadPool::new(2);
        let mut seed = 17u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) % 2001) as f32 / 1000.0 - 1.0
        };
        for (heads, kv_heads, hd, bs) in [(9, 3, 64, 16), (4, 4, 24, 4), (6, 2, 40, 8), (8, 1, 128, 16)] {
            let kvdim = kv_heads * hd;
            let n_blocks = 12;
            let k: Vec<f32> = (0..n_blocks * bs * kvdim).map(|_| next() * 2.0).collect();
            let v: Vec<f32> = (0..n_blocks * bs * kvdim).map(|_| next()).collect();
            let tables: [Vec<u32>; 3] = [(0..6).rev().collect(), vec![11, 6, 7, 8], vec![9, 10]];
            let cap = |t: &Vec<u32>| t.len() * bs;
            let seqs = [
                AttnSeq { first_row: 0, tokens: cap(&tables[0]).min(37), start: 0, blocks: &tables[0], prompt: false },
                AttnSeq {
                    first_row: 37.min(cap(&tables[0])),
                    tokens: 1,
                    start: cap(&tables[1]) - 1,
                    blocks: &tables[1],
                    prompt: false,
                },
                AttnSeq {
                    first_row: 38.min(cap(&tables[0]) + 1),
                    tokens: 5,
                    start: cap(&tables[2]) - 5,
                    blocks: &tables[2],
                    prompt: false,
                },
            ];
            let rows: usize = seqs.iter().map(|x| x.tokens).sum();
            let q: Vec<f32> = (0..rows * heads * hd).map(|_| next()).collect();
            for window in [None, Some(1), Some(5), Some(20), Some(1000)] {
                let shape = AttentionShape { heads, kv_heads, head_dim: hd, scale: 1.0 / (hd as f32).sqrt(), window };
                for kern in Kernels::available() {
                    // As prompt rows (tiles where the CPU has them: bf16 operands) and as sampled rows.
                    for prompt in [false, true] {
                        let roles = [prompt, false, prompt];
                        let seqs: Vec<AttnSeq<'_>> =
                            seqs.iter().zip(roles).map(|(x, prompt)| AttnSeq { prompt, ..*x }).collect();
                        let mut out = vec![0f32; q.len()];
                        attention(&kern, &mut out, &q, KvLayer { k: &k, v: &v, block_size: bs }, &seqs, shape, &pool);
                        let label = format!("{:?} hd {hd} window {window:?} prompt {prompt}", kern.isa);
                        let tol = if prompt && kern.tiles.is_some() && hd.is_multiple_of(32) { 8e-3 } else { 1e-5 };
                        assert_matches_naive(&out, &q, (&k, &v), &seqs, shape, bs, tol, &label);
                    }
                }
            }
        }
    }

    /// A row's output does not depend on the rows computed beside it: a sequence's tokens give
    /// bit-identical outputs as one prefill chunk, as chunks of other sizes, and one at a time,
    /// as prompt rows (tiles where the CPU has them) and as sampled rows.
    #[test]
    fn attention_rows_are_batch_invariant() {
        let pool = ThreadPool::new(2);
        let (heads, kv_heads, hd, bs) = (6, 2, 64, 16);
        let kvdim = kv_heads * hd;
        let blocks: Vec<u32> = vec![3, 0, 2, 1];
        let n = 50;
        let k: Vec<f32> = (0..4 * bs * kvdim).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0).collect();
        let v: Vec<f32> = (0..4 * bs * kvdim).map(|i| (i * 104_729 % 997) as f32 / 997.0 - 0.5).collect();
        let q: Vec<f32> = (0..n * heads * hd).map(|i| (i * 31 % 127) as f32 / 127.0 - 0.5).collect();
        let shape = AttentionShape { heads, kv_heads, head_dim: hd, scale: 0.125, window: None };
        let kvl = KvLayer { k: &k, v: &v, block_size: bs };
        for (kern, prompt) in Kernels::available().into_iter().flat_map(|k| [(k, false), (k, true)]) {
            let mut whole = vec![0f32; q.len()];
            attention(
                &kern,
                &mut whole,
                &q,
                kvl,
                &[AttnSeq { first_row: 0, tokens: n, start: 0, blocks: &blocks, prompt }],
                shape,
                &pool,
            );
            for chunk in [1, 3, 7, 13, 20] {
                let mut parts = vec![0f32; q.len()];
                let mut t = 0;
                while t < n {
                    let len = chunk.min(n - t);
                    let rows = t * heads * hd..(t + len) * heads * hd;
                    let seq = [AttnSeq { first_row: 0, tokens: len, start: t, blocks: &blocks, prompt }];
                    attention(&kern, &mut parts[rows.clone()], &q[rows], kvl, &seq, shape, &pool);
                    t += len;
                }
                assert!(whole == parts, "{:?} prompt {prompt}: chunks of {chunk} differ from one chunk", kern.isa);
            }
        }
    }

    #[test]
    fn paged_attention_matches_naive_for_every_kernel_table() {
        let pool = ThreadPool::new(2);
        let (heads, kv_heads, hd, bs) = (4, 2, 32, 4);
        let kvdim = kv_heads * hd;
        let n_blocks = 8;
        let k: Vec<f32> = (0..n_blocks * bs * kvdim).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
        let v: Vec<f32> = (0..n_blocks * bs * kvdim).map(|i| ((i * 3 % 17) as f32 - 8.0) / 3.0).collect();
        // Two sequences with scattered blocks: 2 queries at positions 5,6 and 1 query at position 9.
        let tables: [Vec<u32>; 2] = [vec![6, 1], vec![3, 0, 7]];
        let seqs = [
            AttnSeq { first_row: 0, tokens: 2, start: 5, blocks: &tables[0], prompt: false },
            AttnSeq { first_row: 2, tokens: 1, start: 9, blocks: &tables[1], prompt: false },
        ];
        let q: Vec<f32> = (0..3 * heads * hd).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let shape = AttentionShape { heads, kv_heads, head_dim: hd, scale: 0.35, window: None };
        for kern in Kernels::available() {
            let mut out = vec![0f32; q.len()];
            attention(&kern, &mut out, &q, KvLayer { k: &k, v: &v, block_size: bs }, &seqs, shape, &pool);
            assert_matches_naive(&out, &q, (&k, &v), &seqs, shape, bs, 1e-4, &format!("{:?}", kern.isa));
        }
    }

    #[test]
    #[should_panic(expected = "rows overlap")]
    fn attention_refuses_sequences_that_share_query_rows() {
        let pool = ThreadPool::new(2);
        let (k, v) = (vec![0f32; 4 * 32], vec![0f32; 4 * 32]);
        let table = [0u32];
        // Rows 0..2 and 1..3 overlap: both jobs would write row 1 unsynchronised.
        let seqs = [
            AttnSeq { first_row: 0, tokens: 2, start: 0, blocks: &table, prompt: false },
            AttnSeq { first_row: 1, tokens: 2, start: 0, blocks: &table, prompt: false },
        ];
        let q = vec![0f32; 4 * 32];
        let mut out = vec![0f32; q.len()];
        let shape = AttentionShape { heads: 1, kv_heads: 1, head_dim: 32, scale: 1.0, window: None };
        attention(&Kernels::scalar(), &mut out, &q, KvLayer { k: &k, v: &v, block_size: 4 }, &seqs, shape, &pool);
    }
}
