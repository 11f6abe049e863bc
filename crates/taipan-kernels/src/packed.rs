//! Weights repacked once at load for integer dot products against 8-bit activations.
//!
//! Every supported block format is decoded to unsigned integer levels with a per-32 scale `d`
//! and offset `m` (`x = d·level + m`), so one family of kernels serves them all:
//!
//! `row · a = Σ_b d_b·da_b·(level_b · qa_b) + m_b·sa_b`, with `sa_b = da_b·Σqa_b`.
//!
//! Rows are interleaved in groups of 16 so that an i32 lane of a 512-bit dot product belongs to
//! one row: the per-block scale and offset then apply lane-wise, with no horizontal sums. Levels
//! of 4-bit formats are stored two per byte; wider levels (Q5, Q8) take one byte each.
//!
//! The K-quant formats use the same row groups and nibble vectors with their own scale layout,
//! closer to the file's bytes (see `crate::kpacked`); a group says which layout it holds.

use crate::formats::{legacy, DType, SizeMismatch};
use crate::kpacked::{self, KLayout, QK_K};
use crate::quant::{padded_len, QBLOCK};

/// How levels are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LevelWidth {
    /// 4-bit levels, two per byte.
    Nibble,
    /// Levels up to 255, one byte each.
    Byte,
}

impl LevelWidth {
    /// Bytes of a group's levels for one block (32 elements of [`GROUP`] rows).
    pub fn block_level_bytes(self) -> usize {
        match self {
            LevelWidth::Nibble => GROUP * 16,
            LevelWidth::Byte => GROUP * 32,
        }
    }
}

/// Rows interleaved per group: one 512-bit integer dot product step covers 4 elements of all
/// 16 rows, so each i32 lane accumulates one row and no horizontal sums are needed.
pub const GROUP: usize = 16;

/// A weight matrix `[rows, cols]` in packed integer form.
///
/// Rows are stored in groups of [`GROUP`] (the last group padded with zero rows). For each
/// 32-element block `b` a group holds, in order:
/// - levels as 64-byte vectors whose 4-byte lane `i` holds 4 consecutive elements of row `i`:
///   eight vectors (elements `4k..4k+4`, k = 0..8) for byte levels; for nibble levels four
///   vectors whose low nibbles hold elements `4k..4k+4` and high nibbles `16+4k..16+4k+4`;
/// - the 16 rows' scales `d` (f32), then their offsets `m` (f32).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Padded row length (multiple of 64).
    pub stride: usize,
    pub width: LevelWidth,
    pub data: Vec<u8>,
    /// The format it was packed from.
    pub source: DType,
    /// The K-quant layout, for K formats.
    pub k: Option<KLayout>,
}

impl PackedMatrix {
    /// Whether `dtype` can be packed: every quantized format can.
    pub fn supports(dtype: DType) -> bool {
        dtype.block_elems() > 1
    }

    /// Packs a row-major matrix stored in `dtype`. Returns `None` for formats that cannot be packed.
    pub fn from_blocks(dtype: DType, data: &[u8], rows: usize, cols: usize) -> Option<Result<Self, SizeMismatch>> {
        if !Self::supports(dtype) {
            return None;
        }
        let mismatch = SizeMismatch { dtype, bytes: data.len(), elems: rows * cols };
        let row_bytes = match dtype.row_bytes(cols) {
            Some(n) if n * rows == data.len() => n,
            _ => return Some(Err(mismatch)),
        };
        let width = match dtype {
            DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => LevelWidth::Byte,
            _ => LevelWidth::Nibble,
        };
        let stride = padded_len(cols);
        let k = KLayout::of(dtype);
        let mut out = PackedMatrix { rows, cols, stride, width, data: Vec::new(), source: dtype, k };
        out.data = vec![0; out.groups() * out.group_bytes()];
        if let Some(layout) = k {
            debug_assert_eq!(stride, cols, "K rows are whole 256-element super-blocks");
            kpacked::pack_rows(layout, data, rows, cols, &mut out.data);
            return Some(Ok(out));
        }
        let mut levels = Vec::with_capacity(out.blocks());
        for r in 0..rows {
            levels.clear();
            let src = &data[r * row_bytes..(r + 1) * row_bytes];
            match dtype {
                DType::Q4_0 => levels.extend(src.chunks_exact(18).map(legacy::levels_q4_0)),
                DType::Q4_1 => levels.extend(src.chunks_exact(20).map(legacy::levels_q4_1)),
                DType::Q5_0 => levels.extend(src.chunks_exact(22).map(legacy::levels_q5_0)),
                DType::Q5_1 => levels.extend(src.chunks_exact(24).map(legacy::levels_q5_1)),
                DType::Q8_0 => levels.extend(src.chunks_exact(34).map(legacy::levels_q8_0)),
                _ => unreachable!("every other quantized format has a K layout"),
            }
            out.write_row(r, &levels);
        }
        Some(Ok(out))
    }

    fn write_row(&mut self, r: usize, levels: &[legacy::Levels32]) {
        let (g, ri) = (r / GROUP, r % GROUP);
        let lvl = self.width.block_level_bytes();
        for (b, l) in levels.iter().enumerate() {
            let base = g * self.group_bytes() + b * self.block_stride();
            match self.width {
                LevelWidth::Byte => {
                    for k in 0..8 {
                        let at = base + k * 64 + ri * 4;
                        self.data[at..at + 4].copy_from_slice(&l.level[4 * k..4 * k + 4]);
                    }
                }
                LevelWidth::Nibble => {
                    for k in 0..4 {
                        for j in 0..4 {
                            self.data[base + k * 64 + ri * 4 + j] = l.level[4 * k + j] | (l.level[16 + 4 * k + j] << 4);
                        }
                    }
                }
            }
            let d_at = base + lvl + ri * 4;
            self.data[d_at..d_at + 4].copy_from_slice(&l.d.to_le_bytes());
            let m_at = base + lvl + 64 + ri * 4;
            self.data[m_at..m_at + 4].copy_from_slice(&l.m.to_le_bytes());
        }
    }

    /// Blocks per row (padded).
    pub fn blocks(&self) -> usize {
        self.stride / QBLOCK
    }

    /// Row groups (the last may be partly padding).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// Bytes of one block of one group: levels, scales, offsets.
    pub fn block_stride(&self) -> usize {
        self.width.block_level_bytes() + 2 * GROUP * 4
    }

    /// Bytes of one group.
    pub fn group_bytes(&self) -> usize {
        match self.k {
            Some(k) => self.stride / QK_K * k.super_bytes(),
            None => self.blocks() * self.block_stride(),
        }
    }

    /// Bytes held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.data.len()
    }

    /// One group's bytes, as the kernels take it.
    pub fn group(&self, g: usize) -> PackedGroup<'_> {
        let gb = self.group_bytes();
        PackedGroup {
            width: self.width,
            wide: self.source == DType::Q8_0,
            blocks: self.blocks(),
            data: &self.data[g * gb..(g + 1) * gb],
            k: self.k,
        }
    }

    /// Whether products with this matrix need the activations' half sums.
    pub fn needs_half_sums(&self) -> bool {
        self.k.is_some()
    }
}

/// The packed data of [`GROUP`] rows.
#[derive(Clone, Copy)]
pub struct PackedGroup<'a> {
    pub width: LevelWidth,
    /// Levels may reach 128 or more (Q8_0's 0..=255): an unsigned level times an i8 activation,
    /// summed in pairs, can then exceed an i16 (which matters to AVX2's `maddubs`).
    pub wide: bool,
    pub blocks: usize,
    pub data: &'a [u8],
    /// The K-quant layout, when the group holds one (`width` and `wide` then do not apply).
    pub k: Option<KLayout>,
}

impl PackedGroup<'_> {
    /// Bytes of one block: levels, scales, offsets.
    pub fn block_stride(&self) -> usize {
        self.width.block_level_bytes() + 2 * GROUP * 4
    }

    /// Level of element `i` of row `r` of the group.
    pub fn level(&self, r: usize, i: usize) -> u8 {
        let (b, e) = (i / QBLOCK, i % QBLOCK);
        let base = b * self.block_stride();
        match self.width {
            LevelWidth::Byte => self.data[base + (e / 4) * 64 + r * 4 + e % 4],
            LevelWidth::Nibble => {
                let byte = self.data[base + ((e % 16) / 4) * 64 + r * 4 + e % 4];
                if e < 16 {
                    byte & 0x0F
                } else {
                    byte >> 4
                }
            }
        }
    }

    fn f32_at(&self, at: usize) -> f32 {
        f32::from_le_bytes([self.data[at], self.data[at + 1], self.data[at + 2], self.data[at + 3]])
    }

    /// Scale of block `b` of row `r`.
    pub fn d(&self, r: usize, b: usize) -> f32 {
        self.f32_at(b * self.block_stride() + self.width.block_level_bytes() + r * 4)
    }

    /// Offset of block `b` of row `r`.
    pub fn m(&self, r: usize, b: usize) -> f32 {
        self.f32_at(b * self.block_stride() + self.width.block_level_bytes() + 64 + r * 4)
    }
}

/// One quantized activation row, as the kernels take it.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    /// Per block, the sums of the first and last 16 values as an i16 pair (low half first);
    /// empty unless computed ([`crate::quant::QuantizedActs::compute_half_sums`]).
    pub hs: &'a [u32],
}

impl<'a> ActRow<'a> {
    pub fn of(acts: &'a crate::quant::QuantizedActs, r: usize) -> Self {
        ActRow { qs: acts.row_qs(r), d: acts.row_d(r), s: acts.row_s(r), hs: acts.row_half_sums(r) }
    }
}

/// Scalar reference: row `r` of a group dotted with one activation row.
pub fn dot_packed_ref(w: &PackedGroup<'_>, r: usize, a: &ActRow<'_>) -> f32 {
    if let Some(k) = &w.k {
        return kpacked::dot_kpacked_ref(w, k, r, a);
    }
    let mut total = 0f32;
    for b in 0..w.blocks {
        let mut isum = 0i32;
        for j in 0..QBLOCK {
            isum += w.level(r, b * QBLOCK + j) as i32 * a.qs[b * QBLOCK + j] as i32;
        }
        total += w.d(r, b) * a.d[b] * isum as f32 + w.m(r, b) * a.s[b];
    }
    total
}

/// Scalar reference tile: `out[r * acts.len() + t] = row r · acts[t]` for the group's rows.
pub fn dot_group_ref(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
    for r in 0..GROUP {
        for (t, a) in acts.iter().enumerate() {
            out[r * acts.len() + t] = dot_packed_ref(w, r, a);
        }
    }
}
