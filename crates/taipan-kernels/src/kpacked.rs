//! K-quant weights (Q2_K … Q6_K) repacked at load, keeping close to the bytes the file carries.
//!
//! Every K super-block reads as `x = d·sc·level − dmin·mn` per 16-element sub-block
//! ([`KSuper`]): unsigned integer levels, small integer scales and mins, and two f16 floats per
//! 256 elements. The packed form keeps exactly that: levels as nibbles plus, for 5- and 6-bit
//! formats, one or two planes of high bits; scales and mins as bytes, one per 16 elements where
//! the format has that many (Q2_K, Q3_K, Q6_K) and one per 32-element block where it has one per
//! 32 (Q4_K, Q5_K); `d` and `dmin` as f16. So Q6_K takes the file's 6.56 bits per weight, Q5_K
//! 5.63 (file 5.5), Q4_K 4.63 (file 4.5): weights stream at the file's size.
//!
//! The integer sums stay exact: against 8-bit activations a 32-element block contributes
//! `d·da·(sc_lo·Σ_lo level·qa + sc_hi·Σ_hi level·qa) − dmin·da·(mn_lo·S_lo + mn_hi·S_hi)`, where
//! `S_lo`/`S_hi` are the activation block's half sums ([`crate::quant::QuantizedActs::compute_half_sums`]).
//! Formats without mins (Q3_K, Q6_K) store signed levels; they are shifted by a bias to be
//! unsigned, which turns into the min term `bias·sc` with `dmin = d`, derived in the kernel and
//! not stored.
//!
//! Layout of one group of [`GROUP`] rows, per super-block (256 columns):
//! - header: `d` of the 16 rows (f16), then `dmin` (f16; formats with mins only);
//! - 8 blocks of 32 columns, each:
//!   - four 64-byte nibble vectors, as the legacy nibble layout (`crate::packed`): 4-byte lane `i`
//!     holds row `i`'s elements `4k..4k+4` in low nibbles and `16+4k..16+4k+4` in high nibbles;
//!   - high-bit planes, 64 bytes each, lane-aligned with the nibble vectors: with one plane, bit
//!     `k` of a byte is bit 4 of the low-nibble element of vector `k` and bit `4+k` that of the
//!     high-nibble one; with two planes, the first holds bits 4–5 of low-nibble elements at bits
//!     `2k..2k+2` and the second those of high-nibble elements;
//!   - the rows' scales as (first 16 elements, last 16) i8 pairs, 32 bytes — or, for formats
//!     with one scale per 32 elements ([`KLayout::paired`] false), one i8 per row, 16 bytes;
//!   - the rows' mins likewise, u8 (formats with mins only).

use crate::formats::{kquants, kquants::KSuper, DType};
use crate::packed::{ActRow, PackedGroup, GROUP};
use crate::quant::QBLOCK;
use half::f16;

/// Super-block size of every K format.
pub const QK_K: usize = 256;
/// 32-element blocks per super-block.
pub const BLOCKS_PER_SUPER: usize = QK_K / QBLOCK;

/// How one K format is laid out and multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KLayout {
    pub dtype: DType,
    /// Level bits above the nibble: 0, 1 or 2 planes.
    pub high_planes: usize,
    /// For formats without mins: the shift that made levels unsigned (min = bias·scale).
    pub bias: Option<u8>,
    /// Largest level (bounds the kernels' 16-bit partial sums).
    pub max_level: u8,
    /// A scale (and min) per 16-element half of each block; else one per block, both halves
    /// sharing it (the kernels read it as a pair of equal halves).
    pub paired: bool,
}

impl KLayout {
    pub fn of(dtype: DType) -> Option<KLayout> {
        let (high_planes, bias, max_level, paired) = match dtype {
            DType::Q2K => (0, None, 3, true),
            DType::Q3K => (0, Some(4), 7, true),
            DType::Q4K => (0, None, 15, false),
            DType::Q5K => (1, None, 31, false),
            DType::Q6K => (2, Some(32), 63, true),
            _ => return None,
        };
        Some(KLayout { dtype, high_planes, bias, max_level, paired })
    }

    pub fn has_mins(&self) -> bool {
        self.bias.is_none()
    }

    /// `d` (and `dmin`) of a group's rows at the start of each super-block.
    pub fn header_bytes(&self) -> usize {
        if self.has_mins() {
            4 * GROUP
        } else {
            2 * GROUP
        }
    }

    /// Offset of the high-bit planes inside a block.
    pub const PLANES_AT: usize = 4 * 64;

    /// Offset of the scale pairs inside a block.
    pub fn scales_at(&self) -> usize {
        Self::PLANES_AT + 64 * self.high_planes
    }

    /// Bytes of a block's scales (and of its mins): a pair per row, or one byte.
    pub fn scale_bytes(&self) -> usize {
        if self.paired {
            2 * GROUP
        } else {
            GROUP
        }
    }

    /// Offset of the mins inside a block.
    pub fn mins_at(&self) -> usize {
        self.scales_at() + self.scale_bytes()
    }

    /// Bytes of one 32-column block of a group.
    pub fn block_bytes(&self) -> usize {
        self.mins_at() + if self.has_mins() { self.scale_bytes() } else { 0 }
    }

    /// Where row `r`'s scale (or min) of half `h` sits past `scales_at` (or `mins_at`).
    fn scale_offset(&self, r: usize, h: usize) -> usize {
        if self.paired {
            2 * r + h
        } else {
            r
        }
    }

    /// Bytes of one super-block of a group.
    pub fn super_bytes(&self) -> usize {
        self.header_bytes() + BLOCKS_PER_SUPER * self.block_bytes()
    }

    /// Decodes one stored super-block.
    pub fn decode(&self, block: &[u8]) -> KSuper {
        match self.dtype {
            DType::Q2K => kquants::super_q2_k(block),
            DType::Q3K => kquants::super_q3_k(block),
            DType::Q4K => kquants::super_q4_k(block),
            DType::Q5K => kquants::super_q5_k(block),
            _ => kquants::super_q6_k(block),
        }
    }
}

/// Packs `rows` rows of `cols` K-quant elements into `data` (sized by the caller).
pub(crate) fn pack_rows(layout: KLayout, src: &[u8], rows: usize, cols: usize, data: &mut [u8]) {
    let supers = cols / QK_K;
    let src_row = supers * layout.dtype.block_bytes();
    let group_bytes = supers * layout.super_bytes();
    for r in 0..rows {
        let (g, ri) = (r / GROUP, r % GROUP);
        for s in 0..supers {
            let at = (r * supers + s) * layout.dtype.block_bytes();
            debug_assert!(at + layout.dtype.block_bytes() <= rows * src_row);
            let k = layout.decode(&src[at..at + layout.dtype.block_bytes()]);
            let sb = &mut data[g * group_bytes + s * layout.super_bytes()..][..layout.super_bytes()];
            sb[2 * ri..2 * ri + 2].copy_from_slice(&f16::from_f32(k.d).to_le_bytes());
            if layout.has_mins() {
                sb[2 * GROUP + 2 * ri..2 * GROUP + 2 * ri + 2].copy_from_slice(&f16::from_f32(k.dmin).to_le_bytes());
            }
            for b in 0..BLOCKS_PER_SUPER {
                let blk = &mut sb[layout.header_bytes() + b * layout.block_bytes()..][..layout.block_bytes()];
                let level = &k.level[32 * b..32 * b + 32];
                for e in 0..16 {
                    let (vk, j) = (e / 4, e % 4);
                    let (lo, hi) = (level[e], level[16 + e]);
                    blk[vk * 64 + ri * 4 + j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
                    let lane = KLayout::PLANES_AT + ri * 4 + j;
                    match layout.high_planes {
                        1 => blk[lane] |= ((lo >> 4) & 1) << vk | ((hi >> 4) & 1) << (4 + vk),
                        2 => {
                            blk[lane] |= ((lo >> 4) & 3) << (2 * vk);
                            blk[lane + 64] |= ((hi >> 4) & 3) << (2 * vk);
                        }
                        _ => {}
                    }
                }
                for half in 0..2 {
                    // One byte per block is all a format with 32-element sub-blocks has.
                    debug_assert!(layout.paired || (k.sc[2 * b] == k.sc[2 * b + 1] && k.mn[2 * b] == k.mn[2 * b + 1]));
                    let at = layout.scale_offset(ri, half);
                    blk[layout.scales_at() + at] = k.sc[2 * b + half] as u8;
                    if layout.has_mins() {
                        // Stored mins are 4- or 6-bit unsigned values.
                        blk[layout.mins_at() + at] = k.mn[2 * b + half] as u8;
                    }
                }
            }
        }
    }
}

/// Readers of a K-packed group, for the scalar kernel and tests.
impl PackedGroup<'_> {
    fn k_block(&self, k: &KLayout, b: usize) -> usize {
        (b / BLOCKS_PER_SUPER) * k.super_bytes() + k.header_bytes() + (b % BLOCKS_PER_SUPER) * k.block_bytes()
    }

    /// Level of element `i` of row `r` (K layout).
    pub fn k_level(&self, k: &KLayout, r: usize, i: usize) -> u8 {
        let base = self.k_block(k, i / QBLOCK);
        let e = i % QBLOCK;
        let (vk, j, upper) = ((e % 16) / 4, e % 4, e >= 16);
        let byte = self.data[base + vk * 64 + r * 4 + j];
        let low = if upper { byte >> 4 } else { byte & 0x0F };
        let plane = base + KLayout::PLANES_AT + r * 4 + j;
        let high = match k.high_planes {
            1 => (self.data[plane] >> (vk + if upper { 4 } else { 0 })) & 1,
            2 => (self.data[plane + if upper { 64 } else { 0 }] >> (2 * vk)) & 3,
            _ => 0,
        };
        low | (high << 4)
    }

    /// Scale of half `h` (first or last 16 elements) of block `b` of row `r`.
    pub fn k_scale(&self, k: &KLayout, r: usize, b: usize, h: usize) -> i32 {
        self.data[self.k_block(k, b) + k.scales_at() + k.scale_offset(r, h)] as i8 as i32
    }

    /// Min of half `h` of block `b` of row `r` (`bias·scale` for formats without mins).
    pub fn k_min(&self, k: &KLayout, r: usize, b: usize, h: usize) -> i32 {
        match k.bias {
            Some(bias) => bias as i32 * self.k_scale(k, r, b, h),
            None => self.data[self.k_block(k, b) + k.mins_at() + k.scale_offset(r, h)] as i32,
        }
    }

    fn k_f16(&self, at: usize) -> f32 {
        f16::from_le_bytes([self.data[at], self.data[at + 1]]).to_f32()
    }

    /// `d` of row `r` in the super-block holding block `b`.
    pub fn k_d(&self, k: &KLayout, r: usize, b: usize) -> f32 {
        self.k_f16((b / BLOCKS_PER_SUPER) * k.super_bytes() + 2 * r)
    }

    /// `dmin` of row `r` in the super-block holding block `b` (`d` for formats without mins).
    pub fn k_dmin(&self, k: &KLayout, r: usize, b: usize) -> f32 {
        match k.bias {
            Some(_) => self.k_d(k, r, b),
            None => self.k_f16((b / BLOCKS_PER_SUPER) * k.super_bytes() + 2 * GROUP + 2 * r),
        }
    }
}

/// Scalar reference: row `r` of a K-packed group dotted with one activation row.
pub fn dot_kpacked_ref(w: &PackedGroup<'_>, k: &KLayout, r: usize, a: &ActRow<'_>) -> f32 {
    assert!(a.hs.len() >= w.blocks, "K-quant products need the activations' half sums");
    let mut total = 0f32;
    for b in 0..w.blocks {
        let mut half = [0i32; 2];
        for e in 0..QBLOCK {
            half[e / 16] += w.k_level(k, r, b * QBLOCK + e) as i32 * a.qs[b * QBLOCK + e] as i32;
        }
        let scaled = w.k_scale(k, r, b, 0) * half[0] + w.k_scale(k, r, b, 1) * half[1];
        let (s_lo, s_hi) = crate::quant::split_half_sums(a.hs[b]);
        let mins = w.k_min(k, r, b, 0) * s_lo + w.k_min(k, r, b, 1) * s_hi;
        let da = a.d[b];
        total += if k.has_mins() {
            w.k_d(k, r, b) * da * scaled as f32 - w.k_dmin(k, r, b) * da * mins as f32
        } else {
            w.k_d(k, r, b) * da * (scaled - mins) as f32
        };
    }
    total
}
