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
use crate::huge::{WeightArena, WeightBytes};
use crate::kpacked::{self, KLayout, QK_K};
use crate::quant::{padded_len, QBLOCK};
use half::f16;

/// How levels are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LevelWidth {
    /// 4-bit levels, two per byte (and, in the compact form of 5-bit formats, a plane of fifth
    /// bits after them).
    Nibble,
    /// Levels up to 255, one byte each.
    Byte,
}

impl LevelWidth {
    /// Bytes of a group's levels for one block (32 elements of [`GROUP`] rows), planes aside.
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

/// The compact form of a 32-element format: what the file carries, rearranged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compact {
    /// 5-bit levels: a plane of fifth bits follows the nibbles.
    pub plane: bool,
    /// The offset is stored (Q4_1, Q5_1); otherwise it is `−bias·d`.
    pub stored_m: bool,
    /// For formats without a stored offset, the level that means zero.
    pub bias: u8,
}

impl Compact {
    /// Offset of the scales inside a block: after the levels and the plane.
    pub fn scales_at(&self, width: LevelWidth) -> usize {
        width.block_level_bytes() + if self.plane { 64 } else { 0 }
    }

    /// Bytes of one block of a group.
    pub fn block_bytes(&self, width: LevelWidth) -> usize {
        self.scales_at(width) + if self.stored_m { 4 * GROUP } else { 2 * GROUP }
    }
}

/// How a packed matrix lays out its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// 32-element formats with levels widened to nibbles or bytes and an f32 scale and offset
    /// per block (about 20–80% more bytes than the file). Kept to compare against
    /// (`TAIPAN_PACKED_FORM=wide`): the compact form measured as fast in prefill and faster in
    /// decode on every CPU tried.
    Wide,
    /// 32-element formats in their file's bytes: nibbles (plus a plane of fifth bits) or bytes,
    /// the f16 scale, and the f16 offset where the format has one.
    Compact(Compact),
    /// The K super-block formats (see `crate::kpacked`).
    K(KLayout),
}

/// Which form 32-element formats take when packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyForm {
    Wide,
    Compact,
}

impl LegacyForm {
    /// The form the kernels take: compact, the file's bytes, on every CPU (decode is bound by
    /// the bytes it reads). `TAIPAN_PACKED_FORM=wide` packs the wide form instead, to compare.
    pub fn for_this_cpu() -> LegacyForm {
        match std::env::var("TAIPAN_PACKED_FORM").as_deref() {
            Ok("wide") => LegacyForm::Wide,
            _ => LegacyForm::Compact,
        }
    }
}

/// A weight matrix `[rows, cols]` in packed integer form.
///
/// Rows are stored in groups of [`GROUP`] (the last group padded with zero rows). For each
/// 32-element block `b` a group holds, in order:
/// - levels as 64-byte vectors whose 4-byte lane `i` holds 4 consecutive elements of row `i`:
///   eight vectors (elements `4k..4k+4`, k = 0..8) for byte levels; for nibble levels four
///   vectors whose low nibbles hold elements `4k..4k+4` and high nibbles `16+4k..16+4k+4`;
/// - compact 5-bit formats: one 64-byte plane, lane-aligned with the nibble vectors, whose bit
///   `k` is the fifth bit of vector `k`'s low-nibble element and bit `4+k` that of its high one;
/// - wide: the 16 rows' scales `d` (f32), then their offsets `m` (f32); compact: the scales
///   (f16), then the offsets (f16) where the format stores them.
///
/// K formats have their own layout ([`Layout::K`]).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Padded row length (multiple of 64).
    pub stride: usize,
    pub width: LevelWidth,
    pub data: WeightBytes,
    /// The format it was packed from.
    pub source: DType,
    pub layout: Layout,
}

impl PackedMatrix {
    /// Whether `dtype` can be packed: every quantized format can.
    pub fn supports(dtype: DType) -> bool {
        dtype.block_elems() > 1
    }

    /// Packs a row-major matrix stored in `dtype`, in the form this CPU's kernels want, into
    /// bytes from `arena`. Returns `None` for formats that cannot be packed.
    pub fn from_blocks(
        arena: &WeightArena,
        dtype: DType,
        data: &[u8],
        rows: usize,
        cols: usize,
    ) -> Option<Result<Self, SizeMismatch>> {
        Self::from_blocks_as(arena, dtype, data, rows, cols, LegacyForm::for_this_cpu())
    }

    /// [`PackedMatrix::from_blocks`] with the form of 32-element formats chosen by the caller.
    pub fn from_blocks_as(
        arena: &WeightArena,
        dtype: DType,
        data: &[u8],
        rows: usize,
        cols: usize,
        form: LegacyForm,
    ) -> Option<Result<Self, SizeMismatch>> {
        if !Self::supports(dtype) {
            return None;
        }
        let mismatch = SizeMismatch { dtype, bytes: data.len(), elems: rows * cols };
        let row_bytes = match dtype.row_bytes(cols) {
            Some(n) if n * rows == data.len() => n,
            _ => return Some(Err(mismatch)),
        };
        let layout = match (KLayout::of(dtype), form) {
            (Some(k), _) => Layout::K(k),
            (None, LegacyForm::Wide) => Layout::Wide,
            (None, LegacyForm::Compact) => Layout::Compact(Compact {
                plane: matches!(dtype, DType::Q5_0 | DType::Q5_1),
                stored_m: matches!(dtype, DType::Q4_1 | DType::Q5_1),
                bias: match dtype {
                    DType::Q4_0 => 8,
                    DType::Q5_0 => 16,
                    _ => 128,
                },
            }),
        };
        let width = match (dtype, layout) {
            (DType::Q8_0, _) | (DType::Q5_0 | DType::Q5_1, Layout::Wide) => LevelWidth::Byte,
            _ => LevelWidth::Nibble,
        };
        let stride = padded_len(cols);
        let mut out = PackedMatrix { rows, cols, stride, width, data: WeightBytes::zeroed(0), source: dtype, layout };
        out.data = arena.zeroed(out.groups() * out.group_bytes());
        if let Layout::K(k) = layout {
            debug_assert_eq!(stride, cols, "K rows are whole 256-element super-blocks");
            kpacked::pack_rows(k, data, rows, cols, &mut out.data);
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
        let (group_bytes, block_stride) = (self.group_bytes(), self.block_stride());
        for (b, l) in levels.iter().enumerate() {
            let blk = &mut self.data[g * group_bytes + b * block_stride..][..block_stride];
            match self.width {
                LevelWidth::Byte => {
                    for k in 0..8 {
                        blk[k * 64 + ri * 4..k * 64 + ri * 4 + 4].copy_from_slice(&l.level[4 * k..4 * k + 4]);
                    }
                }
                LevelWidth::Nibble => {
                    for k in 0..4 {
                        for j in 0..4 {
                            let (lo, hi) = (l.level[4 * k + j], l.level[16 + 4 * k + j]);
                            blk[k * 64 + ri * 4 + j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
                            if matches!(self.layout, Layout::Compact(Compact { plane: true, .. })) {
                                blk[lvl + ri * 4 + j] |= ((lo >> 4) & 1) << k | ((hi >> 4) & 1) << (4 + k);
                            }
                        }
                    }
                }
            }
            match self.layout {
                Layout::Compact(c) => {
                    // The file's scale and offset are f16 values, so these conversions are exact.
                    let at = c.scales_at(self.width) + 2 * ri;
                    blk[at..at + 2].copy_from_slice(&f16::from_f32(l.d).to_le_bytes());
                    if c.stored_m {
                        let at = at + 2 * GROUP;
                        blk[at..at + 2].copy_from_slice(&f16::from_f32(l.m).to_le_bytes());
                    }
                }
                _ => {
                    blk[lvl + ri * 4..lvl + ri * 4 + 4].copy_from_slice(&l.d.to_le_bytes());
                    blk[lvl + 64 + ri * 4..lvl + 64 + ri * 4 + 4].copy_from_slice(&l.m.to_le_bytes());
                }
            }
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

    /// Bytes of one block of one group (32-element formats).
    pub fn block_stride(&self) -> usize {
        block_stride(self.layout, self.width)
    }

    /// Bytes of one group.
    pub fn group_bytes(&self) -> usize {
        match self.layout {
            Layout::K(k) => self.stride / QK_K * k.super_bytes(),
            _ => self.blocks() * self.block_stride(),
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
            layout: self.layout,
        }
    }

    /// Whether products with this matrix need the activations' half sums.
    pub fn needs_half_sums(&self) -> bool {
        matches!(self.layout, Layout::K(_))
    }

    /// Row `r`, dequantized into `out` (`cols` values): embedding lookups read the packed
    /// output matrix of models that tie the two, rather than keep a second copy.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "dequantize_row shape");
        let group = self.group(r / GROUP);
        let ri = r % GROUP;
        for (b, chunk) in out.chunks_mut(QBLOCK).enumerate() {
            match &group.layout {
                Layout::K(k) => {
                    for h in 0..2 {
                        let (d, dmin) = (group.k_d(k, ri, b), group.k_dmin(k, ri, b));
                        let (sc, mn) = (group.k_scale(k, ri, b, h), group.k_min(k, ri, b, h));
                        for (e, o) in chunk.iter_mut().enumerate().skip(16 * h).take(16) {
                            let level = group.k_level(k, ri, b * QBLOCK + e) as i32;
                            *o = d * (sc * level) as f32 - dmin * mn as f32;
                        }
                    }
                }
                _ => {
                    let (d, m) = (group.d(ri, b), group.m(ri, b));
                    for (e, o) in chunk.iter_mut().enumerate() {
                        *o = d * group.level(ri, b * QBLOCK + e) as f32 + m;
                    }
                }
            }
        }
    }
}

fn block_stride(layout: Layout, width: LevelWidth) -> usize {
    match layout {
        Layout::Compact(c) => c.block_bytes(width),
        _ => width.block_level_bytes() + 2 * GROUP * 4,
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
    pub layout: Layout,
}

impl PackedGroup<'_> {
    /// Bytes of one block: levels, plane, scales, offsets (32-element formats).
    pub fn block_stride(&self) -> usize {
        block_stride(self.layout, self.width)
    }

    /// Level of element `i` of row `r` of the group (32-element formats).
    pub fn level(&self, r: usize, i: usize) -> u8 {
        let (b, e) = (i / QBLOCK, i % QBLOCK);
        let base = b * self.block_stride();
        match self.width {
            LevelWidth::Byte => self.data[base + (e / 4) * 64 + r * 4 + e % 4],
            LevelWidth::Nibble => {
                let (k, j) = ((e % 16) / 4, e % 4);
                let byte = self.data[base + k * 64 + r * 4 + j];
                let low = if e < 16 { byte & 0x0F } else { byte >> 4 };
                match self.layout {
                    Layout::Compact(Compact { plane: true, .. }) => {
                        let bits = self.data[base + LevelWidth::Nibble.block_level_bytes() + r * 4 + j];
                        low | (((bits >> (k + if e < 16 { 0 } else { 4 })) & 1) << 4)
                    }
                    _ => low,
                }
            }
        }
    }

    fn f32_at(&self, at: usize) -> f32 {
        f32::from_le_bytes([self.data[at], self.data[at + 1], self.data[at + 2], self.data[at + 3]])
    }

    fn f16_at(&self, at: usize) -> f32 {
        f16::from_le_bytes([self.data[at], self.data[at + 1]]).to_f32()
    }

    /// Scale of block `b` of row `r` (32-element formats).
    pub fn d(&self, r: usize, b: usize) -> f32 {
        let base = b * self.block_stride();
        match self.layout {
            Layout::Compact(c) => self.f16_at(base + c.scales_at(self.width) + 2 * r),
            _ => self.f32_at(base + self.width.block_level_bytes() + r * 4),
        }
    }

    /// Offset of block `b` of row `r` (32-element formats).
    pub fn m(&self, r: usize, b: usize) -> f32 {
        let base = b * self.block_stride();
        match self.layout {
            Layout::Compact(c) if c.stored_m => self.f16_at(base + c.scales_at(self.width) + 2 * GROUP + 2 * r),
            Layout::Compact(c) => -(c.bias as f32) * self.d(r, b),
            _ => self.f32_at(base + self.width.block_level_bytes() + 64 + r * 4),
        }
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
    if let Layout::K(k) = &w.layout {
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

/// Scalar reference tile: `out[t * GROUP + r] = row r · acts[t]` for the group's rows.
pub fn dot_group_ref(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
    for r in 0..GROUP {
        for (t, a) in acts.iter().enumerate() {
            out[t * GROUP + r] = dot_packed_ref(w, r, a);
        }
    }
}
