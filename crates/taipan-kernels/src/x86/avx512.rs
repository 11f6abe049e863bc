//! AVX-512 kernels (F, BW, and VNNI for the integer dot products).

use crate::packed::{ActRow, LevelWidth, PackedRow};
use std::arch::x86_64::*;

/// Packed-row × activation tile: `out[r * acts.len() + t] = ws[r] · acts[t]`, up to 4×4.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI. All rows and activations must share one padded
/// length (a multiple of 64), which `PackedMatrix` and `QuantizedActs` guarantee.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn dot_tile_packed(ws: &[PackedRow<'_>], acts: &[ActRow<'_>], out: &mut [f32]) {
    // SAFETY: forwarded contract; the match only picks a monomorphized size.
    unsafe {
        macro_rules! go {
            ($r:literal, $t:literal) => {
                if ws[0].width == LevelWidth::Nibble {
                    tile::<$r, $t, true>(ws, acts, out)
                } else {
                    tile::<$r, $t, false>(ws, acts, out)
                }
            };
        }
        match (ws.len(), acts.len()) {
            (1, 1) => go!(1, 1),
            (1, 2) => go!(1, 2),
            (1, 3) => go!(1, 3),
            (1, 4) => go!(1, 4),
            (2, 1) => go!(2, 1),
            (2, 2) => go!(2, 2),
            (2, 3) => go!(2, 3),
            (2, 4) => go!(2, 4),
            (3, 1) => go!(3, 1),
            (4, 1) => go!(4, 1),
            (r, t) => {
                for (i, w) in ws.iter().enumerate() {
                    for (j, a) in acts.iter().enumerate() {
                        out[i * t + j] = {
                            let mut one = [0f32];
                            if w.width == LevelWidth::Nibble {
                                tile::<1, 1, true>(std::slice::from_ref(w), std::slice::from_ref(a), &mut one)
                            } else {
                                tile::<1, 1, false>(std::slice::from_ref(w), std::slice::from_ref(a), &mut one)
                            }
                            one[0]
                        };
                    }
                }
                let _ = r;
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize, const T: usize, const NIBBLE: bool>(
    ws: &[PackedRow<'_>],
    acts: &[ActRow<'_>],
    out: &mut [f32],
) {
    let nb = ws[0].d.len();
    let npairs = nb / 2;
    for w in ws {
        assert!(w.d.len() == nb && w.m.len() == nb);
        assert!(w.qs.len() >= if NIBBLE { 32 * npairs } else { 64 * npairs });
    }
    for a in acts {
        assert!(a.qs.len() >= 64 * npairs && a.d_lanes.len() >= 16 * npairs && a.s.len() >= nb);
    }
    // Lanes 0-7 take the first block's scale, lanes 8-15 the second's.
    let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for p in 0..npairs {
        let mut wv = [_mm512_setzero_si512(); R];
        let mut wd = [_mm512_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: bounds asserted above; unaligned loads.
            unsafe {
                wv[r] = if NIBBLE {
                    let raw = _mm256_loadu_si256(ws[r].qs.as_ptr().add(32 * p) as *const __m256i);
                    let lo = _mm256_and_si256(raw, low4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
                } else {
                    _mm512_loadu_si512(ws[r].qs.as_ptr().add(64 * p) as *const _)
                };
                let d2 = _mm_castsi128_ps(_mm_loadl_epi64(ws[r].d.as_ptr().add(2 * p) as *const __m128i));
                wd[r] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d2));
            }
        }
        for t in 0..T {
            // SAFETY: bounds asserted above.
            let (a, ad) = unsafe {
                (
                    _mm512_loadu_si512(acts[t].qs.as_ptr().add(64 * p) as *const _),
                    _mm512_loadu_ps(acts[t].d_lanes.as_ptr().add(16 * p)),
                )
            };
            for r in 0..R {
                let dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], a);
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(dp), ad);
                acc[r][t] = _mm512_fmadd_ps(f, wd[r], acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: lengths asserted above; the tail uses masked loads.
            let offsets = unsafe { dot_f32_raw(ws[r].m.as_ptr(), acts[t].s.as_ptr(), nb) };
            out[r * T + t] = _mm512_reduce_add_ps(acc[r][t]) + offsets;
        }
    }
}

/// Σ a[i]·b[i] over `n` f32 values.
#[target_feature(enable = "avx512f")]
unsafe fn dot_f32_raw(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    // SAFETY: the caller guarantees `n` readable values behind both pointers.
    unsafe {
        while i + 16 <= n {
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), acc);
            i += 16;
        }
        if i < n {
            let k: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a.add(i)), _mm512_maskz_loadu_ps(k, b.add(i)), acc);
        }
    }
    _mm512_reduce_add_ps(acc)
}

/// f32 tile: `out[r * xs.len() + t] = ws[r] · xs[t]` for rows and vectors of equal length.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_tile_f32(ws: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
    // SAFETY: forwarded contract.
    unsafe {
        match (ws.len(), xs.len()) {
            (4, 1) => tile_f32::<4, 1>(ws, xs, out),
            (1, 4) => tile_f32::<1, 4>(ws, xs, out),
            (2, 4) => tile_f32::<2, 4>(ws, xs, out),
            (4, 4) => tile_f32::<4, 4>(ws, xs, out),
            (r, t) => {
                for i in 0..r {
                    for j in 0..t {
                        let mut one = [0f32];
                        tile_f32::<1, 1>(&ws[i..i + 1], &xs[j..j + 1], &mut one);
                        out[i * t + j] = one[0];
                    }
                }
            }
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn tile_f32<const R: usize, const T: usize>(ws: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
    let n = ws[0].len();
    for w in ws {
        assert_eq!(w.len(), n);
    }
    for x in xs {
        assert_eq!(x.len(), n);
    }
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut i = 0;
    while i < n {
        let k: __mmask16 = if n - i >= 16 { 0xFFFF } else { (1u32 << (n - i)) as u16 - 1 };
        let mut wv = [_mm512_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: the mask keeps the load inside `ws[r]`.
            wv[r] = unsafe { _mm512_maskz_loadu_ps(k, ws[r].as_ptr().add(i)) };
        }
        for t in 0..T {
            // SAFETY: as above for `xs[t]`.
            let xv = unsafe { _mm512_maskz_loadu_ps(k, xs[t].as_ptr().add(i)) };
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
        i += 16;
    }
    for r in 0..R {
        for t in 0..T {
            out[r * T + t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}
