//! AVX2 + FMA kernels, for x86 CPUs without AVX-512.

use crate::packed::{ActRow, LevelWidth, PackedGroup, GROUP};
use std::arch::x86_64::*;

/// Packed-group × activation tile, `out[r * acts.len() + t] = row r · acts[t]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA. Shapes are asserted.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_group_packed(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
    let t_n = acts.len();
    let nb = w.blocks;
    let nibble = w.width == LevelWidth::Nibble;
    let lvl = w.width.block_level_bytes();
    let stride = lvl + 2 * GROUP * 4;
    assert!(w.data.len() >= nb * stride, "packed group too short");
    assert!(out.len() >= GROUP * t_n);
    let low4 = _mm256_set1_epi8(0x0F);
    let base = w.data.as_ptr();
    for (t, a) in acts.iter().enumerate() {
        assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb && a.s.len() >= nb);
        // Rows 0-7 and 8-15 in two 8-lane halves.
        for half in 0..2 {
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                // SAFETY: reads stay within the asserted lengths.
                unsafe {
                    let blk = base.add(b * stride);
                    let av = a.qs.as_ptr().add(32 * b) as *const i32;
                    let mut isum = _mm256_setzero_si256();
                    if nibble {
                        for k in 0..4 {
                            let raw = _mm256_loadu_si256(blk.add(64 * k + 32 * half) as *const __m256i);
                            let lo = _mm256_and_si256(raw, low4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low4);
                            isum =
                                _mm256_add_epi32(isum, dot4_small(lo, _mm256_set1_epi32(av.add(k).read_unaligned())));
                            isum = _mm256_add_epi32(
                                isum,
                                dot4_small(hi, _mm256_set1_epi32(av.add(4 + k).read_unaligned())),
                            );
                        }
                    } else {
                        for k in 0..8 {
                            let raw = _mm256_loadu_si256(blk.add(64 * k + 32 * half) as *const __m256i);
                            let a4 = _mm256_set1_epi32(av.add(k).read_unaligned());
                            // maddubs saturates at i16, so split 8-bit levels into nibbles.
                            let lo = dot4_small(_mm256_and_si256(raw, low4), a4);
                            let hi = dot4_small(_mm256_and_si256(_mm256_srli_epi16::<4>(raw), low4), a4);
                            isum = _mm256_add_epi32(isum, _mm256_add_epi32(lo, _mm256_slli_epi32::<4>(hi)));
                        }
                    }
                    let d = _mm256_loadu_ps(blk.add(lvl + 32 * half) as *const f32);
                    let m = _mm256_loadu_ps(blk.add(lvl + 64 + 32 * half) as *const f32);
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d[b]));
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc);
                    acc = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s[b]), acc);
                }
            }
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
            for (i, &v) in lanes.iter().enumerate() {
                out[(8 * half + i) * t_n + t] = v;
            }
        }
    }
}

/// Per i32 lane, the sum of 4 products of u8 levels (< 16) and i8 activations.
#[target_feature(enable = "avx2")]
fn dot4_small(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2")]
fn hsum256(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// f32 tile, `out[r * xs.len() + t] = ws[r] · xs[t]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_tile_f32(ws: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
    let t_n = xs.len();
    for (r, w) in ws.iter().enumerate() {
        for (t, x) in xs.iter().enumerate() {
            assert_eq!(w.len(), x.len());
            let n = w.len();
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: `i + 8 <= n` for both slices.
                unsafe {
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(w.as_ptr().add(i)), _mm256_loadu_ps(x.as_ptr().add(i)), acc);
                }
                i += 8;
            }
            let mut s = hsum256(acc);
            while i < n {
                s += w[i] * x[i];
                i += 1;
            }
            out[r * t_n + t] = s;
        }
    }
}
