//! Activations quantized to 8 bits in blocks of 32, the left operand of the packed integer kernels.
//!
//! Each row is padded with zeros to a multiple of 64 so that kernels always work on block pairs.

/// Elements per activation block.
pub const QBLOCK: usize = 32;
/// Rows are padded to this many elements: the packed kernels consume two blocks per step.
pub const QPAIR: usize = 64;

/// Pads a row length to whole block pairs.
pub fn padded_len(k: usize) -> usize {
    k.div_ceil(QPAIR) * QPAIR
}

/// `rows` activation vectors of `cols` values each, quantized to i8 with one f32 scale per block.
///
/// Buffers are kept between calls and only grow, so a decode step allocates nothing.
#[derive(Default, Debug, Clone)]
pub struct QuantizedActs {
    pub rows: usize,
    pub cols: usize,
    /// Padded row length (multiple of 64).
    pub stride: usize,
    /// `[rows, stride]` quantized values.
    pub qs: Vec<i8>,
    /// `[rows, stride/32]` block scales.
    pub d: Vec<f32>,
    /// `[rows, stride/32]` block sums `d · Σq`, for formats with an offset term.
    pub s: Vec<f32>,
    /// `[rows, stride/32]` integer sums of each block's first and last 16 values, as an i16
    /// pair (low half in the low 16 bits), for the K-quant kernels; empty until computed.
    pub half_sums: Vec<u32>,
}

impl QuantizedActs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.stride / QBLOCK
    }

    /// Quantizes `rows` consecutive rows of `cols` values from `x` (row-major).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols, "activation shape");
        let stride = padded_len(cols);
        let nb = stride / QBLOCK;
        self.rows = rows;
        self.cols = cols;
        self.stride = stride;
        self.qs.resize(rows * stride, 0);
        self.d.resize(rows * nb, 0.0);
        self.s.resize(rows * nb, 0.0);
        self.half_sums.clear();
        let simd = if cols.is_multiple_of(QBLOCK) { simd_level() } else { SimdLevel::None };
        for r in 0..rows {
            let src = &x[r * cols..(r + 1) * cols];
            let qs = &mut self.qs[r * stride..(r + 1) * stride];
            let d = &mut self.d[r * nb..(r + 1) * nb];
            let s = &mut self.s[r * nb..(r + 1) * nb];
            let full = if simd == SimdLevel::None { 0 } else { cols / QBLOCK };
            #[cfg(target_arch = "x86_64")]
            if full > 0 {
                let (x, q, d, s) = (&src[..full * QBLOCK], &mut qs[..full * QBLOCK], &mut d[..full], &mut s[..full]);
                match simd {
                    // SAFETY: AVX-512 F/BW were detected; the slices hold `full` whole blocks.
                    SimdLevel::Avx512 => unsafe { quantize_blocks_avx512(x, q, d, s) },
                    // SAFETY: AVX2 was detected; the slices hold `full` whole blocks.
                    SimdLevel::Avx2 => unsafe { quantize_blocks_avx2(x, q, d, s) },
                    SimdLevel::None => {}
                }
            }
            for b in full..nb {
                let lo = (b * QBLOCK).min(cols);
                let hi = ((b + 1) * QBLOCK).min(cols);
                let (scale, sum) = quantize_block(&src[lo..hi], &mut qs[b * QBLOCK..(b + 1) * QBLOCK]);
                d[b] = scale;
                s[b] = scale * sum as f32;
            }
        }
    }

    pub fn row_qs(&self, r: usize) -> &[i8] {
        &self.qs[r * self.stride..(r + 1) * self.stride]
    }
    pub fn row_d(&self, r: usize) -> &[f32] {
        let nb = self.blocks();
        &self.d[r * nb..(r + 1) * nb]
    }
    pub fn row_s(&self, r: usize) -> &[f32] {
        let nb = self.blocks();
        &self.s[r * nb..(r + 1) * nb]
    }

    /// Row `r`'s half sums, or an empty slice when they were not computed.
    pub fn row_half_sums(&self, r: usize) -> &[u32] {
        let nb = self.blocks();
        self.half_sums.get(r * nb..(r + 1) * nb).unwrap_or(&[])
    }

    /// Computes the half sums of every block (once per quantization; a no-op when present).
    pub fn compute_half_sums(&mut self) {
        let nb = self.blocks();
        if self.half_sums.len() == self.rows * nb {
            return;
        }
        self.half_sums.clear();
        self.half_sums.extend(self.qs[..self.rows * self.stride].chunks_exact(QBLOCK).map(|block| {
            let lo: i32 = block[..16].iter().map(|&q| q as i32).sum();
            let hi: i32 = block[16..].iter().map(|&q| q as i32).sum();
            // |Σ| ≤ 16·127, well inside an i16.
            (lo as i16 as u16 as u32) | ((hi as i16 as u16 as u32) << 16)
        }));
    }
}

/// The two sums packed by [`QuantizedActs::compute_half_sums`].
pub fn split_half_sums(pair: u32) -> (i32, i32) {
    (pair as u16 as i16 as i32, (pair >> 16) as u16 as i16 as i32)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SimdLevel {
    None,
    Avx2,
    Avx512,
}

/// The quantizer matching the kernel level in use (all give bit-identical results).
fn simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dispatch::{Isa, Kernels};
        static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| match Kernels::best().isa {
            Isa::Avx512Vnni | Isa::Amx
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") =>
            {
                SimdLevel::Avx512
            }
            Isa::Avx512Vnni | Isa::Avx2 if is_x86_feature_detected!("avx2") => SimdLevel::Avx2,
            _ => SimdLevel::None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        SimdLevel::None
    }
}

/// [`quantize_block`] for whole blocks, 8 values per step; results are bit-identical.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub unsafe fn quantize_blocks_avx2(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = d.len();
    assert!(x.len() == n * QBLOCK && qs.len() == n * QBLOCK && s.len() == n);
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let half = _mm256_set1_ps(0.5);
    let lim = _mm256_set1_ps(127.0);
    let neg_lim = _mm256_set1_ps(-127.0);
    for b in 0..n {
        // SAFETY: block `b` lies inside the asserted slices.
        unsafe {
            let p = x.as_ptr().add(b * QBLOCK);
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
            let scale = amax / 127.0;
            let id = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
            let mut sum = _mm256_setzero_si256();
            let mut q = [_mm256_setzero_si256(); 4];
            for (qi, &vi) in q.iter_mut().zip(&v) {
                let c = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(vi, id), neg_lim), lim);
                let h = _mm256_or_ps(half, _mm256_and_ps(c, sign_mask));
                *qi = _mm256_cvttps_epi32(_mm256_add_ps(c, h));
                sum = _mm256_add_epi32(sum, *qi);
            }
            // Narrow the 32 i32 lanes to i8 in element order (packs work within 128-bit lanes).
            let w01 = _mm256_packs_epi32(q[0], q[1]);
            let w23 = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_packs_epi16(w01, w23);
            let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qs.as_mut_ptr().add(b * QBLOCK) as *mut __m256i, ordered);
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
            d[b] = scale;
            s[b] = scale * total as f32;
        }
    }
}

/// [`quantize_block`] for whole blocks, 32 values per step; results are bit-identical.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_blocks_avx512(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = d.len();
    assert!(x.len() == n * QBLOCK && qs.len() == n * QBLOCK && s.len() == n);
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let sign_mask = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_set1_ps(0.5);
    let lim = _mm512_set1_ps(127.0);
    for b in 0..n {
        // SAFETY: block `b` lies inside the asserted slices.
        unsafe {
            let x0 = _mm512_loadu_ps(x.as_ptr().add(b * QBLOCK));
            let x1 = _mm512_loadu_ps(x.as_ptr().add(b * QBLOCK + 16));
            let a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x0), abs_mask));
            let a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x1), abs_mask));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
            let scale = amax / 127.0;
            let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let idv = _mm512_set1_ps(id);
            let round = |v: __m512| {
                let v =
                    _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, idv), _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
                let h = _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_castps_si512(half),
                    _mm512_and_si512(_mm512_castps_si512(v), sign_mask),
                ));
                _mm512_cvttps_epi32(_mm512_add_ps(v, h))
            };
            let q0 = round(x0);
            let q1 = round(x1);
            _mm_storeu_si128(qs.as_mut_ptr().add(b * QBLOCK) as *mut __m128i, _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(qs.as_mut_ptr().add(b * QBLOCK + 16) as *mut __m128i, _mm512_cvtsepi32_epi8(q1));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            d[b] = scale;
            s[b] = scale * sum as f32;
        }
    }
}

/// Quantizes up to 32 values into `out` (zero-filled past `x.len()`); returns the scale and Σq.
pub fn quantize_block(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (j, o) in out.iter_mut().enumerate() {
        let q = match x.get(j) {
            Some(v) => {
                // Round half away from zero (as roundf) without a libm call.
                let s = (v * id).clamp(-127.0, 127.0);
                (s + 0.5f32.copysign(s)) as i8
            }
            None => 0,
        };
        sum += q as i32;
        *o = q;
    }
    (d, sum)
}
