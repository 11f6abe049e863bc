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
    for r in 0..GROUP {
        for (t, a) in acts.iter().enumerate() {
            // SAFETY: forwarded contract.
            out[r * t_n + t] = unsafe { dot_row(w, r, a) };
        }
    }
}

/// Σ over 32 products of u8 levels (< 16) and i8 activations, as 8 i32 lanes.
#[target_feature(enable = "avx2")]
fn dot32_small(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_row(w: &PackedGroup<'_>, r: usize, a: &ActRow<'_>) -> f32 {
    let nb = w.blocks;
    let lvl = w.width.pair_bytes();
    let chunk = GROUP * lvl + GROUP * 8;
    assert!(w.data.len() >= (nb / 2) * chunk + GROUP * nb * 4, "packed group too short");
    assert!(a.d.len() >= nb && a.s.len() >= nb && a.qs.len() >= 32 * nb);
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut offsets = 0f32;
    for b in 0..nb {
        let row = (b / 2) * chunk + r * lvl;
        // SAFETY: `row + lvl <= (nb / 2) * chunk` and activations were asserted above.
        let levels_dot = unsafe {
            let av = _mm256_loadu_si256(a.qs.as_ptr().add(32 * b) as *const __m256i);
            match w.width {
                LevelWidth::Nibble => {
                    let raw = _mm256_loadu_si256(w.data.as_ptr().add(row) as *const __m256i);
                    let lv = if b % 2 == 0 {
                        _mm256_and_si256(raw, low4)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)
                    };
                    dot32_small(lv, av)
                }
                LevelWidth::Byte => {
                    // maddubs saturates at i16, so split 8-bit levels into nibbles.
                    let raw = _mm256_loadu_si256(w.data.as_ptr().add(row + 32 * (b % 2)) as *const __m256i);
                    let lo = dot32_small(_mm256_and_si256(raw, low4), av);
                    let hi = dot32_small(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), av);
                    _mm256_add_epi32(lo, _mm256_slli_epi32(hi, 4))
                }
            }
        };
        let scale = _mm256_set1_ps(w.d(r, b) * a.d[b]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(levels_dot), scale, acc);
        offsets += w.m(r, b) * a.s[b];
    }
    hsum256(acc) + offsets
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
