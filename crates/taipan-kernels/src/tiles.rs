//! bf16 tile products: the layouts the AMX kernels (`crate::x86::amx`) take and their scalar
//! twins, which are the specification the tests hold the tiles to.
//!
//! A product `Y = X · Wᵀ` with many activation rows goes by weight groups of [`GROUP`] rows:
//! each group is dequantized once into a bf16 *panel*, the activations are rounded to bf16
//! once, and a tile product multiplies them with f32 sums. Layouts (a `u16` holds a bf16's bits):
//! - panel of a group: pair `p` of columns (`2p`, `2p + 1`) is 32 values, row `i`'s two at
//!   `32p + 2i` and `32p + 2i + 1` — the right-hand operand layout of a bf16 tile product;
//! - activations: row-major `[tokens, kp]`, `kp` a multiple of [`K_STEP`], the token count a
//!   multiple of [`TILE_TOKENS`], padding zero;
//! - output of a call over P panels: `out[t · 16P + 16p + r]`.

use crate::kpacked::BLOCKS_PER_SUPER;
use crate::packed::{Layout, PackedGroup, GROUP};
use crate::quant::QBLOCK;

/// Activation rows per tile.
pub const TILE_TOKENS: usize = 16;
/// Columns one tile product consumes (32 bf16 values, 64 bytes per tile row).
pub const K_STEP: usize = 32;

/// A growable buffer of tile operands or results that starts on a 64-byte boundary. Tile rows
/// are 64 bytes; a tile load whose rows straddle cache lines took 15 ns against 2.4 ns aligned
/// (one 1 KiB tile from L1, measured on a Xeon with AMX), more than the product it feeds.
pub struct TileBuf<T> {
    lines: Vec<Line>,
    len: usize,
    of: std::marker::PhantomData<T>,
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

mod sealed {
    /// Element types for which every bit pattern is a value and all-zero bytes are zero.
    pub trait Plain: Copy + Default {}
    impl Plain for u16 {}
    impl Plain for f32 {}
}

impl<T: sealed::Plain> TileBuf<T> {
    pub const fn new() -> Self {
        TileBuf { lines: Vec::new(), len: 0, of: std::marker::PhantomData }
    }

    /// Sets the length to `len`, keeping the values before it; new values are zero.
    pub fn resize(&mut self, len: usize) {
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        if lines > self.lines.len() {
            self.lines.resize(lines, Line([0; 64]));
        }
        let old = self.len.min(len);
        self.len = len;
        self[old..].fill(T::default());
    }

    /// `len` zeros.
    pub fn zeroed(&mut self, len: usize) {
        self.len = 0;
        self.resize(len);
    }
}

impl<T: sealed::Plain> Default for TileBuf<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: sealed::Plain> Clone for TileBuf<T> {
    fn clone(&self) -> Self {
        TileBuf { lines: self.lines.clone(), len: self.len, of: std::marker::PhantomData }
    }
}

impl<T> std::fmt::Debug for TileBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TileBuf({} values)", self.len)
    }
}

impl<T: sealed::Plain> std::ops::Deref for TileBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len` values of `T` (`resize`), are aligned for it (64
        // bytes), and any bytes are a valid `T` (`Plain`).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: sealed::Plain> std::ops::DerefMut for TileBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`, borrowed uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

/// `u16` values of one group's panel for `kp` columns.
pub fn panel_len(kp: usize) -> usize {
    kp * GROUP
}

/// Pads a column count to whole tile steps.
pub fn padded_k(k: usize) -> usize {
    k.div_ceil(K_STEP) * K_STEP
}

fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

fn bf16_value(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Scalar twin of the AMX panel builder: the same values, rounded the same way (each weight
/// is `scale·level + offset` in one f32 rounding, then rounded to bf16).
pub fn panel_from_group_ref(w: &PackedGroup<'_>, panel: &mut [u16]) {
    assert!(panel.len() >= panel_len(w.blocks * QBLOCK), "panel too short");
    for r in 0..GROUP {
        for b in 0..w.blocks {
            for e in 0..QBLOCK {
                let c = b * QBLOCK + e;
                let value = match &w.layout {
                    Layout::K(k) => {
                        let h = e / 16;
                        let d = w.k_d(k, r, b);
                        let scale = d * w.k_scale(k, r, b, h) as f32;
                        let offset = match k.bias {
                            Some(bias) => scale * -(bias as f32),
                            None => -w.k_dmin(k, r, b) * w.k_min(k, r, b, h) as f32,
                        };
                        debug_assert!(w.blocks.is_multiple_of(BLOCKS_PER_SUPER));
                        (w.k_level(k, r, c) as f32).mul_add(scale, offset)
                    }
                    _ => (w.level(r, c) as f32).mul_add(w.d(r, b), w.m(r, b)),
                };
                panel[(c / 2) * 32 + 2 * r + c % 2] = bf16_bits(value);
            }
        }
    }
}

/// Dense f32 rows (at most [`GROUP`]; missing rows are zero) into a panel of `kp` columns.
pub fn panel_from_rows(rows: &[&[f32]], kp: usize, panel: &mut [u16]) {
    assert!(rows.len() <= GROUP && panel.len() >= panel_len(kp) && kp.is_multiple_of(2));
    panel[..panel_len(kp)].fill(0);
    for (i, row) in rows.iter().enumerate() {
        assert!(row.len() <= kp, "row longer than the panel");
        for (c, &v) in row.iter().enumerate() {
            panel[(c / 2) * 32 + 2 * i + c % 2] = bf16_bits(v);
        }
    }
}

/// Rounds `tokens` rows of `k` values to bf16 rows of `kp` (zero-padded), and pads the row
/// count to whole tiles with zero rows; returns the padded count. Rows are rounded in parallel.
pub fn acts_to_bf16(
    pool: &crate::pool::ThreadPool,
    x: &[f32],
    tokens: usize,
    k: usize,
    kp: usize,
    out: &mut TileBuf<u16>,
) -> usize {
    assert!(x.len() == tokens * k && kp >= k, "activation shape");
    let padded = tokens.div_ceil(TILE_TOKENS) * TILE_TOKENS;
    out.resize(padded * kp);
    out[tokens * kp..].fill(0);
    let rows = RowsOut(out.as_mut_ptr());
    pool.for_chunks(tokens, 8, &|range| {
        for t in range {
            // SAFETY: row `t` of `out` (`kp` values, in bounds as sized above) is this task's alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(rows.at(t * kp), kp) };
            let src = &x[t * k..(t + 1) * k];
            dst[k..].fill(0);
            #[allow(unused_mut)]
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if crate::x86::amx::usable() {
                done = k / 16 * 16;
                // SAFETY: AMX use implies AVX-512 BF16 (checked by `usable`); both slices hold
                // `done` values.
                unsafe { crate::x86::amx::round_to_bf16(&src[..done], &mut dst[..done]) };
            }
            for (d, &v) in dst[done..k].iter_mut().zip(&src[done..]) {
                *d = bf16_bits(v);
            }
        }
    });
    padded
}

/// Rows of a bf16 buffer that tasks of one region fill, each row by one task.
struct RowsOut(*mut u16);
// SAFETY: tasks write disjoint rows; the region ends before the buffer's borrow does.
unsafe impl Sync for RowsOut {}

impl RowsOut {
    fn at(&self, offset: usize) -> *mut u16 {
        self.0.wrapping_add(offset)
    }
}

/// Scalar twin of the AMX tile product (same layouts; sums in f64).
pub fn gemm_ref(acts: &[u16], kp: usize, tokens: usize, panels: &[&[u16]], out: &mut [f32]) {
    let np = panels.len();
    for t in 0..tokens {
        for (p, panel) in panels.iter().enumerate() {
            for r in 0..GROUP {
                let mut sum = 0f64;
                for c in 0..kp {
                    sum += bf16_value(acts[t * kp + c]) as f64 * bf16_value(panel[(c / 2) * 32 + 2 * r + c % 2]) as f64;
                }
                out[t * np * GROUP + p * GROUP + r] = sum as f32;
            }
        }
    }
}

/// Most bytes a sequence's attention panels ([`KvPanels`], all KV heads of a layer) may take:
/// they are built for each prompt chunk beside the KV cache, outside its budget.
pub const ATTENTION_PANELS_MAX_BYTES: usize = 64 << 20;

/// Whether prompt attention may go through tiles for a model of this shape: its panels at the
/// full context must fit [`ATTENTION_PANELS_MAX_BYTES`] (SmolLM2 at 8,192 positions takes 9 MiB,
/// Gemma 3 270M at 32,768 takes 48 MiB; a 256K-context Jamba would take gigabytes, and its
/// panels would be rebuilt for every chunk).
/// A per-model answer, so a row's kernel never depends on how far its sequence has come.
pub fn attention_panels_fit(kv_heads: usize, head_dim: usize, context: usize) -> bool {
    kv_heads.saturating_mul(head_dim).saturating_mul(context).saturating_mul(6) <= ATTENTION_PANELS_MAX_BYTES
}

/// Keys and values of one KV head, positions `0..len` (`len` a multiple of [`K_STEP`], padding
/// zero), as tile operands for attention. Keys are split into a bf16 high part and a bf16 low
/// part (`k ≈ hi + lo` to ~16 significant bits), as queries are: scores are exponentiated, so
/// bf16's 8 bits alone would move a weight by several percent at the logit sizes of real models.
/// Values and the softmax weights are plain bf16.
///
/// Layouts for a head of `hd` dimensions (a multiple of [`K_STEP`]):
/// - keys: position `16c + i`, dimension `32s + 2j + e` at `((c·hd/32 + s)·16 + j)·32 + 2i + e`
///   (16 keys against 32 dimensions per tile);
/// - values: position `32s + 2j + e`, dimension `16c + i` at `((s·hd/16 + c)·16 + j)·32 + 2i + e`
///   (32 positions against 16 dimensions per tile).
#[derive(Default, Debug, Clone)]
pub struct KvPanels {
    pub len: usize,
    pub head_dim: usize,
    pub k_hi: TileBuf<u16>,
    pub k_lo: TileBuf<u16>,
    pub v: TileBuf<u16>,
}

impl KvPanels {
    /// Fills the panels with positions `0..n` of a view.
    pub fn fill(&mut self, kv: &crate::ops::KvView<'_>, n: usize, hd: usize) {
        assert!(hd.is_multiple_of(K_STEP), "tile attention takes head sizes in multiples of 32");
        kv.check(n, hd);
        let len = n.div_ceil(K_STEP) * K_STEP;
        self.len = len;
        self.head_dim = hd;
        for buf in [&mut self.k_hi, &mut self.k_lo, &mut self.v] {
            buf.zeroed(len * hd);
        }
        let (steps, dim_tiles) = (hd / K_STEP, hd / 16);
        for p in 0..n {
            let at = kv.at(p);
            let (key, value) = (&kv.k[at..at + hd], &kv.v[at..at + hd]);
            let (c, i) = (p / 16, p % 16);
            for (d, &x) in key.iter().enumerate() {
                let (s, j, e) = (d / 32, (d % 32) / 2, d % 2);
                let idx = ((c * steps + s) * 16 + j) * 32 + 2 * i + e;
                let (hi, lo) = split_bf16(x);
                self.k_hi[idx] = hi;
                self.k_lo[idx] = lo;
            }
            let (s, j, e) = (p / 32, (p % 32) / 2, p % 2);
            for (d, &x) in value.iter().enumerate() {
                let (c, i) = (d / 16, d % 16);
                self.v[((s * dim_tiles + c) * 16 + j) * 32 + 2 * i + e] = bf16_bits(x);
            }
        }
    }
}

/// `x ≈ hi + lo` as two bf16 values.
pub fn split_bf16(x: f32) -> (u16, u16) {
    let hi = bf16_bits(x);
    (hi, bf16_bits(x - bf16_value(hi)))
}

/// Scratch of one tile attention job, kept between jobs.
#[derive(Default, Debug)]
pub struct AttnTileScratch {
    pub q_hi: TileBuf<u16>,
    pub q_lo: TileBuf<u16>,
    pub scores: TileBuf<f32>,
    pub weights: TileBuf<u16>,
    pub out: TileBuf<f32>,
}
