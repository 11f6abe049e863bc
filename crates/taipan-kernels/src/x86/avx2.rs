//! AVX2 + FMA kernels, for x86 CPUs without AVX-512.

use crate::packed::{ActRow, Compact, Layout, LevelWidth, PackedGroup, GROUP};
use std::arch::x86_64::*;

/// Packed-group × activation tile, `out[t * GROUP + r] = row r · acts[t]`, for the wide
/// and compact forms of 32-element formats.
///
/// Each weight vector is loaded and unpacked once for all (up to 4) activation rows of the tile.
/// Levels below 128 go straight into `maddubs` (two products of a level and an i8 fit an i16;
/// for nibbles, eight such pairs do, and for 5-bit levels four). Wide byte levels (Q8_0's
/// 0..=255) use the sign trick: with `w = level − 128` (an i8), `maddubs(|w|, sign(a, w))` is
/// `Σ w·a` without saturation (|w| ≤ 128, |a| ≤ 127), and the 128·Σa it leaves out is folded
/// into the block offset (`m + 128·d`, exactly 0 for Q8_0, so nothing cancels).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Shapes are asserted.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_group_packed(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
    let nb = w.blocks;
    let compact = match w.layout {
        Layout::Wide => None,
        Layout::Compact(c) => Some(c),
        Layout::K(_) => panic!("K-quant groups have their own kernel"),
    };
    assert!(w.data.len() >= nb * w.block_stride(), "packed group too short");
    assert!(out.len() >= GROUP * acts.len());
    for a in acts {
        assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb && a.s.len() >= nb);
    }
    let form = compact.unwrap_or(Compact { plane: false, stored_m: true, bias: 0 });
    let mut t0 = 0;
    while t0 < acts.len() {
        let nt = (acts.len() - t0).min(4);
        let part = &acts[t0..t0 + nt];
        macro_rules! tile {
            ($nt:literal) => {
                match (w.width, compact.is_some(), form.plane) {
                    (LevelWidth::Nibble, false, _) => nibble_tile::<$nt, false, false>(w, form, part, out, t0),
                    (LevelWidth::Nibble, true, false) => nibble_tile::<$nt, true, false>(w, form, part, out, t0),
                    (LevelWidth::Nibble, true, true) => nibble_tile::<$nt, true, true>(w, form, part, out, t0),
                    (LevelWidth::Byte, false, _) => byte_tile::<$nt, false>(w, form, part, out, t0),
                    (LevelWidth::Byte, true, _) => byte_tile::<$nt, true>(w, form, part, out, t0),
                }
            };
        }
        // SAFETY: the caller guarantees AVX2, FMA and F16C; lengths were asserted above.
        unsafe {
            match nt {
                1 => tile!(1),
                2 => tile!(2),
                3 => tile!(3),
                _ => tile!(4),
            }
        }
        t0 += nt;
    }
}

/// The scales and offsets of rows `8·half..8·half+8` of the block whose scales start at `at`:
/// f32 pairs in the wide form, f16 (offsets stored or `−bias·d`) in the compact one.
///
/// # Safety
/// `at` must point at the block's scales, inside the group.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn block_scales<const COMPACT: bool>(at: *const u8, half: usize, form: Compact) -> (__m256, __m256) {
    // SAFETY: forwarded to the caller.
    unsafe {
        if !COMPACT {
            return (
                _mm256_loadu_ps(at.add(32 * half) as *const f32),
                _mm256_loadu_ps(at.add(64 + 32 * half) as *const f32),
            );
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(at.add(16 * half) as *const __m128i));
        let m = if form.stored_m {
            _mm256_cvtph_ps(_mm_loadu_si128(at.add(2 * GROUP + 16 * half) as *const __m128i))
        } else {
            _mm256_mul_ps(d, _mm256_set1_ps(-(form.bias as f32)))
        };
        (d, m)
    }
}

/// Adds a block's integer sums (rows of one half) into the float accumulators:
/// `acc += isum·d·da + m·sa`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn scale_block<const NT: usize>(
    acc: &mut [__m256; NT],
    isum: &[__m256i; NT],
    d: __m256,
    m: __m256,
    acts: &[ActRow<'_>],
    b: usize,
) {
    for t in 0..NT {
        let scale = _mm256_mul_ps(d, _mm256_set1_ps(acts[t].d[b]));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), scale, acc[t]);
        acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(acts[t].s[b]), acc[t]);
    }
}

/// Writes the accumulators of rows `8·half..8·half+8` to `out[(t_first + t) * GROUP + r]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn store_half<const NT: usize>(acc: &[__m256; NT], out: &mut [f32], half: usize, t_first: usize) {
    for (t, v) in acc.iter().enumerate() {
        let at = (t_first + t) * GROUP + 8 * half;
        // SAFETY: the eight floats at `at` are inside `out` (checked just before).
        assert!(at + 8 <= out.len());
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at), *v) };
    }
}

/// # Safety
/// AVX2, FMA and F16C; `dot_group_packed` asserted the lengths.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibble_tile<const NT: usize, const COMPACT: bool, const PLANE: bool>(
    w: &PackedGroup<'_>,
    form: Compact,
    acts: &[ActRow<'_>],
    out: &mut [f32],
    t_first: usize,
) {
    let nb = w.blocks;
    let lvl = w.width.block_level_bytes();
    let stride = w.block_stride();
    let scales_at = if COMPACT { form.scales_at(w.width) } else { lvl };
    let low4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let ones = _mm256_set1_epi16(1);
    let base = w.data.as_ptr();
    // Rows 0-7 and 8-15 in two 8-lane halves.
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); NT];
        for b in 0..nb {
            // SAFETY: reads stay within the asserted lengths.
            unsafe {
                let blk = base.add(b * stride);
                let plane = if PLANE {
                    _mm256_loadu_si256(blk.add(lvl + 32 * half) as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                };
                let mut sum_lo = [_mm256_setzero_si256(); NT];
                let mut sum_hi = [_mm256_setzero_si256(); NT];
                for k in 0..4 {
                    let raw = _mm256_loadu_si256(blk.add(64 * k + 32 * half) as *const __m256i);
                    let mut lo = _mm256_and_si256(raw, low4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low4);
                    if PLANE {
                        // Bit k → bit 4 for the low nibbles, bit 4 + k → bit 4 for the high ones.
                        let up = _mm256_sll_epi16(plane, _mm_cvtsi32_si128(4 - k as i32));
                        let down = _mm256_srl_epi16(plane, _mm_cvtsi32_si128(k as i32));
                        lo = _mm256_or_si256(lo, _mm256_and_si256(up, bit4));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(down, bit4));
                    }
                    for t in 0..NT {
                        let av = acts[t].qs.as_ptr().add(32 * b) as *const i32;
                        let a_lo = _mm256_set1_epi32(av.add(k).read_unaligned());
                        let a_hi = _mm256_set1_epi32(av.add(4 + k).read_unaligned());
                        // Each maddubs lane is at most 2·15·127 for nibbles (eight fit an i16)
                        // and 2·31·127 for 5-bit levels (four fit, so halves stay apart).
                        if PLANE {
                            sum_lo[t] = _mm256_add_epi16(sum_lo[t], _mm256_maddubs_epi16(lo, a_lo));
                            sum_hi[t] = _mm256_add_epi16(sum_hi[t], _mm256_maddubs_epi16(hi, a_hi));
                        } else {
                            let both = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi));
                            sum_lo[t] = _mm256_add_epi16(sum_lo[t], both);
                        }
                    }
                }
                let isum: [__m256i; NT] = std::array::from_fn(|t| {
                    let lo = _mm256_madd_epi16(sum_lo[t], ones);
                    if PLANE {
                        _mm256_add_epi32(lo, _mm256_madd_epi16(sum_hi[t], ones))
                    } else {
                        lo
                    }
                });
                let (d, m) = block_scales::<COMPACT>(blk.add(scales_at), half, form);
                scale_block::<NT>(&mut acc, &isum, d, m, acts, b);
            }
        }
        store_half::<NT>(&acc, out, half, t_first);
    }
}

/// # Safety
/// AVX2, FMA and F16C; `dot_group_packed` asserted the lengths.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn byte_tile<const NT: usize, const COMPACT: bool>(
    w: &PackedGroup<'_>,
    form: Compact,
    acts: &[ActRow<'_>],
    out: &mut [f32],
    t_first: usize,
) {
    let nb = w.blocks;
    let lvl = w.width.block_level_bytes();
    let stride = w.block_stride();
    let scales_at = if COMPACT { form.scales_at(w.width) } else { lvl };
    let bias = _mm256_set1_epi8(if w.wide { -128 } else { 0 });
    let shift = if w.wide { 128.0 } else { 0.0 };
    let ones = _mm256_set1_epi16(1);
    let wide = w.wide;
    let base = w.data.as_ptr();
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); NT];
        for b in 0..nb {
            // SAFETY: reads stay within the asserted lengths.
            unsafe {
                let blk = base.add(b * stride);
                let mut isum = [_mm256_setzero_si256(); NT];
                for k in 0..8 {
                    let raw = _mm256_loadu_si256(blk.add(64 * k + 32 * half) as *const __m256i);
                    // Narrow levels are their own magnitude and never negative.
                    let signed = _mm256_xor_si256(raw, bias);
                    let magnitude = if wide { _mm256_sign_epi8(signed, signed) } else { raw };
                    for t in 0..NT {
                        let av = acts[t].qs.as_ptr().add(32 * b) as *const i32;
                        let a4 = _mm256_set1_epi32(av.add(k).read_unaligned());
                        let a4 = if wide { _mm256_sign_epi8(a4, signed) } else { a4 };
                        let prod = _mm256_maddubs_epi16(magnitude, a4);
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(prod, ones));
                    }
                }
                let (d, m) = block_scales::<COMPACT>(blk.add(scales_at), half, form);
                // level·a = (level − 128)·a + 128·Σa, and d·da·Σa = d·sa.
                let m = _mm256_fmadd_ps(d, _mm256_set1_ps(shift), m);
                scale_block::<NT>(&mut acc, &isum, d, m, acts, b);
            }
        }
        store_half::<NT>(&acc, out, half, t_first);
    }
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

/// `e^x` for 8 lanes (Cephes-style range reduction and polynomial, as `avx512::exp16`).
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.3));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // 2^n through the exponent bits (n is within [-126, 127] after the clamp).
    let pow2n =
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    _mm256_mul_ps(p, pow2n)
}

/// The selective scan for state sizes that are multiples of 8; see `crate::ssm::selective_scan_ref`.
///
/// # Safety
/// The CPU must support AVX2 and FMA. Shapes are asserted.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn selective_scan(y: &mut [f32], i: &crate::ssm::ScanInputs<'_>, h: &mut [f32], s: crate::ssm::ScanShape) {
    let (t_n, ch, n, m) = (s.tokens, s.channels, s.state, s.count);
    if !n.is_multiple_of(8) {
        crate::ssm::selective_scan_ref(y, i, h, s);
        return;
    }
    i.check(y, h, s);
    for t in 0..t_n {
        for jj in 0..m {
            if t == 0 && jj % 16 == 0 {
                // Two blocks of 16 channels ahead, as the AVX-512 scan (261 → 219 µs a decode layer at
                // 16 sequences with these kernels on an Intel Xeon).
                super::prefetch_state(h.as_ptr().wrapping_add((jj + 32) * n), 16 * n);
            }
            let k = s.first + jj;
            let (dtv, xv) = (i.dt[t * ch + k], i.x[t * ch + k]);
            // SAFETY: all offsets are inside the checked lengths (n is a multiple of 8).
            unsafe {
                let dtx = _mm256_set1_ps(dtv);
                let xx = _mm256_set1_ps(xv);
                let mut acc = _mm256_setzero_ps();
                for j in (0..n).step_by(8) {
                    let hp = h.as_mut_ptr().add(jj * n + j);
                    let da = exp8(_mm256_mul_ps(dtx, _mm256_loadu_ps(i.a.as_ptr().add(k * n + j))));
                    let db = _mm256_mul_ps(dtx, _mm256_loadu_ps(i.b.as_ptr().add(t * n + j)));
                    let hv = _mm256_fmadd_ps(da, _mm256_loadu_ps(hp), _mm256_mul_ps(db, xx));
                    _mm256_storeu_ps(hp, hv);
                    acc = _mm256_fmadd_ps(hv, _mm256_loadu_ps(i.c.as_ptr().add(t * n + j)), acc);
                }
                let out = hsum256(acc) + i.d[k] * xv;
                let zv = i.z[t * ch + k];
                y[t * m + jj] = out * (zv / (1.0 + (-zv).exp()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp8_is_accurate_over_the_softmax_range() {
        if !crate::dispatch::Kernels::testable(crate::dispatch::Isa::Avx2) {
            return;
        }
        let xs: Vec<f32> = (0..8 * 800).map(|i| -87.0 + i as f32 * 0.0137).collect();
        for c in xs.chunks_exact(8) {
            let mut got = [0f32; 8];
            // SAFETY: avx2 and fma were detected above.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
            for (g, &x) in got.iter().zip(c) {
                let want = (x as f64).exp();
                assert!(((*g as f64) - want).abs() <= 3e-7 * want, "exp({x}) = {g}, want {want}");
            }
        }
    }
}
