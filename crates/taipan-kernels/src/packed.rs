//! Weights repacked once at load for integer dot products against 8-bit activations.
//!
//! Every supported block format is decoded to unsigned integer levels with a per-32 scale `d`
//! and offset `m` (`x = d·level + m`), so one family of kernels serves them all:
//!
//! `row · a = Σ_b d_b·da_b·(level_b · qa_b) + m_b·sa_b`, with `sa_b = da_b·Σqa_b`.
//!
//! Levels of 4-bit formats are stored two per byte, with blocks `2p` and `2p+1` of a row sharing
//! 32 bytes (block `2p` in the low nibbles). Unpacking 32 bytes with a mask and a shift then gives
//! the 64 levels of the pair in natural order, matching the activations byte for byte. Wider levels
//! (Q5, Q8, K-quants) take one byte each.

use crate::formats::{kquants, legacy, DType, SizeMismatch};
use crate::quant::{padded_len, QBLOCK};

/// How levels are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LevelWidth {
    /// 4-bit levels, two blocks interleaved per 32 bytes.
    Nibble,
    /// Levels up to 255, one byte each.
    Byte,
}

/// A weight matrix `[rows, cols]` in packed integer form.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Padded row length (multiple of 64).
    pub stride: usize,
    pub width: LevelWidth,
    /// Levels, `row_bytes()` per row.
    pub qs: Vec<u8>,
    /// `[rows, stride/32]` block scales.
    pub d: Vec<f32>,
    /// `[rows, stride/32]` block offsets.
    pub m: Vec<f32>,
    /// The format it was packed from.
    pub source: DType,
}

impl PackedMatrix {
    /// Whether `dtype` can be packed (its sub-blocks are 32 elements with one scale and offset).
    pub fn supports(dtype: DType) -> bool {
        matches!(
            dtype,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::Q4K | DType::Q5K
        )
    }

    /// Packs a row-major matrix stored in `dtype`. Returns `None` for formats that cannot be packed.
    pub fn from_blocks(
        dtype: DType,
        data: &[u8],
        rows: usize,
        cols: usize,
    ) -> Option<Result<Self, SizeMismatch>> {
        if !Self::supports(dtype) {
            return None;
        }
        let mismatch = SizeMismatch { dtype, bytes: data.len(), elems: rows * cols };
        let row_bytes = match dtype.row_bytes(cols) {
            Some(n) if n * rows == data.len() => n,
            _ => return Some(Err(mismatch)),
        };
        let width = match dtype {
            DType::Q4_0 | DType::Q4_1 | DType::Q4K => LevelWidth::Nibble,
            _ => LevelWidth::Byte,
        };
        let stride = padded_len(cols);
        let nb = stride / QBLOCK;
        let mut out = PackedMatrix {
            rows,
            cols,
            stride,
            width,
            qs: vec![0; rows * packed_row_bytes(width, stride)],
            d: vec![0.0; rows * nb],
            m: vec![0.0; rows * nb],
            source: dtype,
        };
        let mut levels = Vec::with_capacity(nb);
        for r in 0..rows {
            levels.clear();
            let src = &data[r * row_bytes..(r + 1) * row_bytes];
            match dtype {
                DType::Q4_0 => levels.extend(src.chunks_exact(18).map(legacy::levels_q4_0)),
                DType::Q4_1 => levels.extend(src.chunks_exact(20).map(legacy::levels_q4_1)),
                DType::Q5_0 => levels.extend(src.chunks_exact(22).map(legacy::levels_q5_0)),
                DType::Q5_1 => levels.extend(src.chunks_exact(24).map(legacy::levels_q5_1)),
                DType::Q8_0 => levels.extend(src.chunks_exact(34).map(legacy::levels_q8_0)),
                DType::Q4K => levels.extend(src.chunks_exact(144).flat_map(kquants::levels_q4_k)),
                DType::Q5K => levels.extend(src.chunks_exact(176).flat_map(kquants::levels_q5_k)),
                _ => unreachable!("checked by supports()"),
            }
            out.write_row(r, &levels);
        }
        Some(Ok(out))
    }

    fn write_row(&mut self, r: usize, levels: &[legacy::Levels32]) {
        let nb = self.stride / QBLOCK;
        let rb = self.row_bytes();
        let qs = &mut self.qs[r * rb..(r + 1) * rb];
        for (b, l) in levels.iter().enumerate() {
            self.d[r * nb + b] = l.d;
            self.m[r * nb + b] = l.m;
            match self.width {
                LevelWidth::Byte => qs[b * 32..b * 32 + 32].copy_from_slice(&l.level),
                LevelWidth::Nibble => {
                    let pair = &mut qs[(b / 2) * 32..(b / 2) * 32 + 32];
                    let shift = if b % 2 == 0 { 0 } else { 4 };
                    for (dst, &v) in pair.iter_mut().zip(&l.level) {
                        *dst |= v << shift;
                    }
                }
            }
        }
    }

    /// Bytes of levels per row.
    pub fn row_bytes(&self) -> usize {
        packed_row_bytes(self.width, self.stride)
    }

    /// Blocks per row (padded).
    pub fn blocks(&self) -> usize {
        self.stride / QBLOCK
    }

    /// Bytes held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.m.len())
    }

    /// The borrowed view of row `r` the kernels take.
    pub fn row(&self, r: usize) -> PackedRow<'_> {
        let nb = self.blocks();
        let rb = self.row_bytes();
        PackedRow {
            width: self.width,
            qs: &self.qs[r * rb..(r + 1) * rb],
            d: &self.d[r * nb..(r + 1) * nb],
            m: &self.m[r * nb..(r + 1) * nb],
        }
    }
}

fn packed_row_bytes(width: LevelWidth, stride: usize) -> usize {
    match width {
        LevelWidth::Nibble => stride / 2,
        LevelWidth::Byte => stride,
    }
}

/// One packed weight row.
#[derive(Clone, Copy)]
pub struct PackedRow<'a> {
    pub width: LevelWidth,
    pub qs: &'a [u8],
    pub d: &'a [f32],
    pub m: &'a [f32],
}

impl PackedRow<'_> {
    /// The level of element `i`.
    #[inline]
    pub fn level(&self, i: usize) -> u8 {
        match self.width {
            LevelWidth::Byte => self.qs[i],
            LevelWidth::Nibble => {
                let (pair, within) = (i / 64, i % 64);
                let byte = self.qs[pair * 32 + within % 32];
                if within < 32 {
                    byte & 0x0F
                } else {
                    byte >> 4
                }
            }
        }
    }
}

/// One quantized activation row, as the kernels take it.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub d_lanes: &'a [f32],
}

impl<'a> ActRow<'a> {
    pub fn of(acts: &'a crate::quant::QuantizedActs, r: usize) -> Self {
        ActRow { qs: acts.row_qs(r), d: acts.row_d(r), s: acts.row_s(r), d_lanes: acts.row_d_lanes(r) }
    }
}

/// Scalar reference: the dot product of one packed row with one activation row.
pub fn dot_packed_ref(w: &PackedRow<'_>, a: &ActRow<'_>) -> f32 {
    let mut total = 0f32;
    for b in 0..w.d.len() {
        let mut isum = 0i32;
        for j in 0..QBLOCK {
            isum += w.level(b * QBLOCK + j) as i32 * a.qs[b * QBLOCK + j] as i32;
        }
        total += w.d[b] * a.d[b] * isum as f32 + w.m[b] * a.s[b];
    }
    total
}

/// Scalar reference tile: `out[t] = w · acts[t]`.
pub fn dot_tile_ref(w: &PackedRow<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acts) {
        *o = dot_packed_ref(w, a);
    }
}
