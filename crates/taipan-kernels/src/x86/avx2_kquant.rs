//! AVX2 kernel for K-quant groups (`crate::kpacked`); AVX-512 machines have their own
//! (`super::avx512_kquant`).

use super::avx2::store_half;
use crate::kpacked::{KLayout, BLOCKS_PER_SUPER};
use crate::packed::{ActRow, PackedGroup, GROUP};
use crate::quant::QBLOCK;
use std::arch::x86_64::*;

/// K-packed group × activation tile, `out[t * GROUP + r] = row r · acts[t]`.
///
/// Per block and half-group of 8 rows, each nibble vector (with its high bits) is unpacked once
/// for up to four activation rows. `maddubs` sums pairs of level·activation into i16 lanes that
/// hold one 16-element half of one row, so `madd` against the rows' (scale, scale) pairs gives
/// the scaled i32 sums directly; the min term is one `madd` of the rows' (min_lo, min_hi) pairs
/// with the activation block's half sums.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Shapes are asserted.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_group_kpacked(w: &PackedGroup<'_>, k: &KLayout, acts: &[ActRow<'_>], out: &mut [f32]) {
    let nb = w.blocks;
    assert!(nb.is_multiple_of(BLOCKS_PER_SUPER), "K rows are whole super-blocks");
    assert!(w.data.len() >= nb / BLOCKS_PER_SUPER * k.super_bytes(), "packed group too short");
    assert!(out.len() >= GROUP * acts.len());
    for a in acts {
        assert!(a.qs.len() >= QBLOCK * nb && a.d.len() >= nb && a.hs.len() >= nb, "activation row too short");
    }
    let mut t0 = 0;
    while t0 < acts.len() {
        let nt = (acts.len() - t0).min(4);
        let part = &acts[t0..t0 + nt];
        macro_rules! tile {
            ($nt:literal) => {
                match (k.high_planes, k.has_mins(), k.max_level > 31, k.paired) {
                    (0, true, _, true) => k_tile::<$nt, 0, true, false, true>(w, k, part, out, t0),
                    (0, true, _, false) => k_tile::<$nt, 0, true, false, false>(w, k, part, out, t0),
                    (0, false, _, true) => k_tile::<$nt, 0, false, false, true>(w, k, part, out, t0),
                    (1, true, _, false) => k_tile::<$nt, 1, true, false, false>(w, k, part, out, t0),
                    (2, false, true, true) => k_tile::<$nt, 2, false, true, true>(w, k, part, out, t0),
                    other => panic!("no AVX2 kernel for K layout {other:?}"),
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

/// Eight rows' (half `half` of the group) per-half bytes (scales or mins) at `at` as (first
/// half, last half) byte pairs: stored as pairs, or one byte per row standing for both halves.
///
/// # Safety
/// The group's 32 bytes (paired) or 16 must be readable at `at`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn half_pairs<const PAIRED: bool>(at: *const u8, half: usize) -> __m128i {
    // SAFETY: forwarded contract.
    unsafe {
        if PAIRED {
            _mm_loadu_si128(at.add(16 * half) as *const __m128i)
        } else {
            let one = _mm_loadl_epi64(at.add(8 * half) as *const __m128i);
            _mm_unpacklo_epi8(one, one)
        }
    }
}

/// `x << n` (n ≥ 0) or `x >> −n` in 16-bit lanes; `n` is a constant once the loops unroll.
#[inline]
#[target_feature(enable = "avx2")]
fn shift16(x: __m256i, n: i32) -> __m256i {
    if n >= 0 {
        _mm256_sll_epi16(x, _mm_cvtsi32_si128(n))
    } else {
        _mm256_srl_epi16(x, _mm_cvtsi32_si128(-n))
    }
}

/// # Safety
/// AVX2, FMA and F16C; `dot_group_kpacked` asserted the lengths.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_tile<const NT: usize, const PLANES: usize, const MINS: bool, const SPLIT: bool, const PAIRED: bool>(
    w: &PackedGroup<'_>,
    k: &KLayout,
    acts: &[ActRow<'_>],
    out: &mut [f32],
    t_first: usize,
) {
    let supers = w.blocks / BLOCKS_PER_SUPER;
    let (header, block_bytes, super_bytes) = (k.header_bytes(), k.block_bytes(), k.super_bytes());
    let (scales_at, mins_at) = (k.scales_at(), k.mins_at());
    let bias = _mm256_set1_epi16(k.bias.unwrap_or(0) as i16);
    let low4 = _mm256_set1_epi8(0x0F);
    let plane_mask = _mm256_set1_epi8(if PLANES == 2 { 0x30 } else { 0x10 });
    // (scale_lo, scale_lo) and (scale_hi, scale_hi) pairs from the rows' (lo, hi) bytes.
    let dup_lo = _mm_setr_epi8(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
    let dup_hi = _mm_setr_epi8(1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15);
    let base = w.data.as_ptr();
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); NT];
        for s in 0..supers {
            // SAFETY: every read below stays inside the asserted group and activation lengths.
            unsafe {
                let sb = base.add(s * super_bytes);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(sb.add(16 * half) as *const __m128i));
                let dmin =
                    if MINS { _mm256_cvtph_ps(_mm_loadu_si128(sb.add(32 + 16 * half) as *const __m128i)) } else { d };
                for bi in 0..BLOCKS_PER_SUPER {
                    let b = s * BLOCKS_PER_SUPER + bi;
                    let blk = sb.add(header + bi * block_bytes);
                    let pairs = half_pairs::<PAIRED>(blk.add(scales_at), half);
                    let sc_lo = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(pairs, dup_lo));
                    let sc_hi = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(pairs, dup_hi));
                    let mins = if MINS {
                        _mm256_cvtepu8_epi16(half_pairs::<PAIRED>(blk.add(mins_at), half))
                    } else {
                        _mm256_mullo_epi16(_mm256_cvtepi8_epi16(pairs), bias)
                    };
                    let plane0 = if PLANES > 0 {
                        _mm256_loadu_si256(blk.add(KLayout::PLANES_AT + 32 * half) as *const __m256i)
                    } else {
                        _mm256_setzero_si256()
                    };
                    let plane1 = if PLANES == 2 {
                        _mm256_loadu_si256(blk.add(KLayout::PLANES_AT + 64 + 32 * half) as *const __m256i)
                    } else {
                        _mm256_setzero_si256()
                    };
                    let mut isum = [_mm256_setzero_si256(); NT];
                    let mut sum_lo = [_mm256_setzero_si256(); NT];
                    let mut sum_hi = [_mm256_setzero_si256(); NT];
                    for vk in 0..4 {
                        let raw = _mm256_loadu_si256(blk.add(64 * vk + 32 * half) as *const __m256i);
                        let mut lo = _mm256_and_si256(raw, low4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low4);
                        if PLANES == 1 {
                            // Bit vk → bit 4 for the low nibbles, bit 4 + vk → bit 4 for the high.
                            lo = _mm256_or_si256(lo, _mm256_and_si256(shift16(plane0, 4 - vk as i32), plane_mask));
                            hi = _mm256_or_si256(hi, _mm256_and_si256(shift16(plane0, -(vk as i32)), plane_mask));
                        } else if PLANES == 2 {
                            // Bits 2vk, 2vk + 1 → bits 4, 5.
                            let by = 4 - 2 * vk as i32;
                            lo = _mm256_or_si256(lo, _mm256_and_si256(shift16(plane0, by), plane_mask));
                            hi = _mm256_or_si256(hi, _mm256_and_si256(shift16(plane1, by), plane_mask));
                        }
                        for t in 0..NT {
                            let av = acts[t].qs.as_ptr().add(QBLOCK * b) as *const i32;
                            let a_lo = _mm256_set1_epi32(av.add(vk).read_unaligned());
                            let a_hi = _mm256_set1_epi32(av.add(4 + vk).read_unaligned());
                            // Each maddubs lane is at most 2·63·127; two (6-bit levels) or four
                            // (5-bit and narrower) of them fit an i16.
                            sum_lo[t] = _mm256_add_epi16(sum_lo[t], _mm256_maddubs_epi16(lo, a_lo));
                            sum_hi[t] = _mm256_add_epi16(sum_hi[t], _mm256_maddubs_epi16(hi, a_hi));
                        }
                        if (!SPLIT && vk < 3) || (SPLIT && vk % 2 == 0) {
                            continue;
                        }
                        for t in 0..NT {
                            let scaled = _mm256_add_epi32(
                                _mm256_madd_epi16(sum_lo[t], sc_lo),
                                _mm256_madd_epi16(sum_hi[t], sc_hi),
                            );
                            isum[t] = _mm256_add_epi32(isum[t], scaled);
                            sum_lo[t] = _mm256_setzero_si256();
                            sum_hi[t] = _mm256_setzero_si256();
                        }
                    }
                    for t in 0..NT {
                        let halves = _mm256_set1_epi32(acts[t].hs[b] as i32);
                        let min_sum = _mm256_madd_epi16(mins, halves);
                        let da = _mm256_set1_ps(acts[t].d[b]);
                        if MINS {
                            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(d, da), acc[t]);
                            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(min_sum), _mm256_mul_ps(dmin, da), acc[t]);
                        } else {
                            let net = _mm256_sub_epi32(isum[t], min_sum);
                            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(net), _mm256_mul_ps(d, da), acc[t]);
                        }
                    }
                }
            }
        }
        store_half::<NT>(&acc, out, half, t_first);
    }
}
