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

/// `v` rounded to bf16 (to nearest, ties to even; a NaN stays a quiet NaN), as `half` rounds,
/// written without branches so that loops over rows vectorize.
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    (if v.is_nan() { quiet_nan } else { rounded }) as u16
}

#[inline(always)]
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
            buf.resize(len * hd);
        }
        let steps = hd / K_STEP;
        let (mut hi, mut lo, mut second) = (vec![0u16; hd], vec![0u16; hd], vec![0u16; hd]);
        // Keys: dimensions 2m and 2m+1 of position 16c + i sit side by side at pair
        // (c·hd/2 + m)·16 + i, so a position's row is converted whole, then spread.
        for p in 0..len {
            if p < n {
                let at = kv.at(p);
                for ((h, l), &x) in hi.iter_mut().zip(lo.iter_mut()).zip(&kv.k[at..at + hd]) {
                    (*h, *l) = split_bf16(x);
                }
            } else {
                hi.fill(0);
                lo.fill(0);
            }
            let (c, i) = (p / 16, p % 16);
            for m in 0..hd / 2 {
                let pair = 2 * ((c * steps * 16 + m) * 16 + i);
                self.k_hi[pair..pair + 2].copy_from_slice(&hi[2 * m..2 * m + 2]);
                self.k_lo[pair..pair + 2].copy_from_slice(&lo[2 * m..2 * m + 2]);
            }
        }
        // Values: positions 2q and 2q+1 of dimension 16c + i sit side by side at pair
        // ((q/16 · hd/16 + c)·16 + q%16)·16 + i, so two rows are interleaved 16 dimensions at a time.
        let dim_tiles = hd / 16;
        for q in 0..len / 2 {
            for (row, p) in [&mut hi, &mut second].into_iter().zip([2 * q, 2 * q + 1]) {
                if p < n {
                    let at = kv.at(p);
                    for (b, &x) in row.iter_mut().zip(&kv.v[at..at + hd]) {
                        *b = bf16_bits(x);
                    }
                } else {
                    row.fill(0);
                }
            }
            let (s, j) = (q / 16, q % 16);
            for c in 0..dim_tiles {
                let base = 2 * (((s * dim_tiles + c) * 16 + j) * 16);
                let out = &mut self.v[base..base + 32];
                for ((o, &a), &b) in
                    out.chunks_exact_mut(2).zip(&hi[16 * c..16 * c + 16]).zip(&second[16 * c..16 * c + 16])
                {
                    o[0] = a;
                    o[1] = b;
                }
            }
        }
    }
}

/// `x ≈ hi + lo` as two bf16 values.
#[inline(always)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half_everywhere_that_matters() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            -3e-39,
        ];
        let mut seed = 7u64;
        let randoms = (0..100_000).map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            f32::from_bits((seed >> 32) as u32)
        });
        // Ties: the 16 bits below a bf16 are exactly half a step.
        let ties = (0..1000u32).map(|i| f32::from_bits(0x3F80_8000 + (i << 16)));
        for x in specials.into_iter().chain(randoms).chain(ties) {
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x:e} ({:#010x})", x.to_bits());
        }
    }

    /// The panels hold each key and value where the layout documented on [`KvPanels`] puts it,
    /// padding positions zero, for a sequence whose positions lie in scattered blocks.
    #[test]
    fn kv_panels_follow_their_documented_layout() {
        let (hd, bs, stride, offset) = (64, 16, 3 * 64, 64);
        let blocks = [5u32, 0, 3, 1, 4];
        let cells = 6 * bs * stride;
        let k: Vec<f32> = (0..cells).map(|i| ((i * 7919 % 4001) as f32 - 2000.0) / 333.0).collect();
        let v: Vec<f32> = (0..cells).map(|i| ((i * 104_729 % 3001) as f32 - 1500.0) / 77.0).collect();
        let view = crate::ops::KvView { k: &k, v: &v, blocks: &blocks, block_size: bs, stride, offset };
        let mut panels = KvPanels::default();
        for n in [77, 1, 31, 32, 33] {
            panels.fill(&view, n, hd);
            let len = n.div_ceil(K_STEP) * K_STEP;
            assert_eq!((panels.len, panels.k_hi.len(), panels.v.len()), (len, len * hd, len * hd));
            let (steps, dim_tiles) = (hd / K_STEP, hd / 16);
            for p in 0..len {
                for d in 0..hd {
                    let (key, value) = if p < n { (k[view.at(p) + d], v[view.at(p) + d]) } else { (0.0, 0.0) };
                    let (c, i, s, j, e) = (p / 16, p % 16, d / 32, (d % 32) / 2, d % 2);
                    let at = ((c * steps + s) * 16 + j) * 32 + 2 * i + e;
                    assert_eq!((panels.k_hi[at], panels.k_lo[at]), split_bf16(key), "key {p}.{d} of {n}");
                    let (s, j, e, c, i) = (p / 32, (p % 32) / 2, p % 2, d / 16, d % 16);
                    let at = ((s * dim_tiles + c) * 16 + j) * 32 + 2 * i + e;
                    assert_eq!(panels.v[at], bf16_bits(value), "value {p}.{d} of {n}");
                }
            }
        }
    }
}
