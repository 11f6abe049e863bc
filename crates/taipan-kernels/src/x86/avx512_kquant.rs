//! AVX-512 VNNI kernel for K-quant groups (`crate::kpacked`).

use crate::kpacked::{KLayout, BLOCKS_PER_SUPER};
use crate::packed::{ActRow, PackedGroup, GROUP};
use crate::quant::QBLOCK;
use std::arch::x86_64::*;

/// K-packed group × 1 to 4 activation rows, `out[t * GROUP + r] = row r · acts[t]`
/// (`crate::dispatch` feeds it more in fours).
///
/// A 512-bit register holds one nibble vector of all 16 rows, so each i32 lane of a `dpbusd`
/// accumulates one row. The two 16-element halves of a block (low and high nibbles) have scales
/// of their own: their sums are kept apart and multiplied by the rows' scales lane-wise; the
/// min term is one `madd` of the rows' (min_lo, min_hi) pairs with the activation block's half
/// sums. Levels go into `dpbusd` unsigned and whole (up to 63), so no partial sum can saturate.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI. Shapes are asserted.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn dot_group_kpacked(w: &PackedGroup<'_>, k: &KLayout, acts: &[ActRow<'_>], out: &mut [f32]) {
    assert!((1..=4).contains(&acts.len()), "the K tile takes 1 to 4 activation rows");
    assert!(out.len() >= GROUP * acts.len());
    check_shapes(std::slice::from_ref(w), k, acts);
    // SAFETY: the caller guarantees AVX-512 F/BW/VNNI; lengths were checked above.
    unsafe {
        match acts.len() {
            1 => k_tile_of::<1, 1>([w], k, acts, out),
            2 => k_tile_of::<2, 1>([w], k, acts, out),
            3 => k_tile_of::<3, 1>([w], k, acts, out),
            _ => k_tile_of::<4, 1>([w], k, acts, out),
        };
    }
}

/// Consecutive K-packed groups of one matrix × one activation row, `out[g * GROUP + r] = row r
/// of ws[g] · act`: a lone decoding sequence's product.
///
/// The groups go through the tile four at a time: each activation word is broadcast once for
/// 64 rows rather than 16, and the core streams four runs of weights at once, which this
/// memory-bound product turns into speed (Intel Xeon, two threads, from DRAM: a 2,560 × 8,192
/// Q4_K mat-vec 25.5 → 31–32 GB/s, 8,192 × 2,560 26 → 29–30, Q6_K 26 → 28–30; six groups
/// measured the same as four, eight slower). Each group's sums are computed exactly as [`dot_group_kpacked`] computes them.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI. Shapes are asserted.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn dot_groups_kpacked(ws: &[PackedGroup<'_>], k: &KLayout, act: &ActRow<'_>, out: &mut [f32]) {
    assert!(out.len() >= GROUP * ws.len());
    let acts = std::slice::from_ref(act);
    check_shapes(ws, k, acts);
    let mut g = 0;
    // SAFETY: the caller guarantees AVX-512 F/BW/VNNI; lengths were checked above.
    unsafe {
        while g < ws.len() {
            let out = &mut out[g * GROUP..];
            g += match ws.len() - g {
                1 => k_tile_of::<1, 1>([&ws[g]], k, acts, out),
                2 | 3 => k_tile_of::<1, 2>([&ws[g], &ws[g + 1]], k, acts, out),
                _ => k_tile_of::<1, 4>([&ws[g], &ws[g + 1], &ws[g + 2], &ws[g + 3]], k, acts, out),
            };
        }
    }
}

/// Asserts what the tiles read: whole super-blocks in every group, every activation row as long.
fn check_shapes(ws: &[PackedGroup<'_>], k: &KLayout, acts: &[ActRow<'_>]) {
    let nb = ws.first().map_or(0, |w| w.blocks);
    assert!(nb.is_multiple_of(BLOCKS_PER_SUPER), "K rows are whole super-blocks");
    for w in ws {
        assert!(w.blocks == nb, "groups of one product have one length");
        assert!(w.data.len() >= nb / BLOCKS_PER_SUPER * k.super_bytes(), "packed group too short");
    }
    for a in acts {
        assert!(a.qs.len() >= QBLOCK * nb && a.d.len() >= nb && a.hs.len() >= nb, "activation row too short");
    }
}

/// The tile for `k`'s form, `NT` activation rows × `G` groups; returns `G`.
///
/// # Safety
/// AVX-512 F/BW/VNNI; [`check_shapes`] passed and `out` holds `G · NT · GROUP` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn k_tile_of<const NT: usize, const G: usize>(
    ws: [&PackedGroup<'_>; G],
    k: &KLayout,
    acts: &[ActRow<'_>],
    out: &mut [f32],
) -> usize {
    assert!(acts.len() == NT && out.len() >= G * NT * GROUP);
    // SAFETY: forwarded contract.
    unsafe {
        match (k.high_planes, k.has_mins(), k.paired) {
            (0, true, true) => k_tile::<NT, G, 0, true, true>(ws, k, acts, out),
            (0, true, false) => q4k_tile::<NT, G>(ws, k, acts, out),
            (0, false, true) => k_tile::<NT, G, 0, false, true>(ws, k, acts, out),
            (1, true, false) => k_tile::<NT, G, 1, true, false>(ws, k, acts, out),
            (2, false, true) => k_tile::<NT, G, 2, false, true>(ws, k, acts, out),
            other => panic!("no AVX-512 kernel for K layout {other:?}"),
        }
    }
    G
}

/// The 16 rows' per-half bytes (scales or mins) at `at` as (first half, last half) byte pairs:
/// stored as pairs, or one byte per row standing for both halves.
///
/// # Safety
/// 32 bytes (paired) or 16 must be readable at `at`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn half_pairs<const PAIRED: bool>(at: *const u8) -> __m256i {
    // SAFETY: forwarded contract.
    unsafe {
        if PAIRED {
            _mm256_loadu_si256(at as *const __m256i)
        } else {
            let one = _mm_loadu_si128(at as *const __m128i);
            _mm256_set_m128i(_mm_unpackhi_epi8(one, one), _mm_unpacklo_epi8(one, one))
        }
    }
}

/// `x << n` (n ≥ 0) or `x >> −n` in 16-bit lanes; `n` is a constant once the loops unroll.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) fn shift16(x: __m512i, n: i32) -> __m512i {
    if n >= 0 {
        _mm512_sll_epi16(x, _mm_cvtsi32_si128(n))
    } else {
        _mm512_srl_epi16(x, _mm_cvtsi32_si128(-n))
    }
}

/// The activation words that meet nibble vector `vk` of block `b`, broadcast, for each row:
/// (the low nibbles' elements `4vk..4vk + 4`, the high nibbles' 16 further on).
///
/// # Safety
/// AVX-512 F; block `b` must lie inside every activation row.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn act_words<const NT: usize>(acts: &[ActRow<'_>], b: usize, vk: usize) -> ([__m512i; NT], [__m512i; NT]) {
    let (mut lo, mut hi) = ([_mm512_setzero_si512(); NT], [_mm512_setzero_si512(); NT]);
    for t in 0..NT {
        // SAFETY: the caller guarantees the block's 32 bytes are inside the row.
        unsafe {
            let av = acts[t].qs.as_ptr().add(QBLOCK * b) as *const i32;
            lo[t] = _mm512_set1_epi32(av.add(vk).read_unaligned());
            hi[t] = _mm512_set1_epi32(av.add(4 + vk).read_unaligned());
        }
    }
    (lo, hi)
}

/// Adds one group's nibble vector (`lo`, `hi` levels) times every activation row's words to
/// the rows' two sums.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn nibble_products<const NT: usize>(
    sum_lo: &mut [__m512i; NT],
    sum_hi: &mut [__m512i; NT],
    (lo, hi): (__m512i, __m512i),
    (a_lo, a_hi): &([__m512i; NT], [__m512i; NT]),
) {
    for t in 0..NT {
        sum_lo[t] = _mm512_dpbusd_epi32(sum_lo[t], lo, a_lo[t]);
        sum_hi[t] = _mm512_dpbusd_epi32(sum_hi[t], hi, a_hi[t]);
    }
}

/// `NT` activation rows × `G` groups, `out[(g * NT + t) * GROUP + r]`, any K form.
///
/// # Safety
/// AVX-512 F/BW/VNNI; [`check_shapes`] passed and `out` is long enough ([`k_tile_of`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn k_tile<const NT: usize, const G: usize, const PLANES: usize, const MINS: bool, const PAIRED: bool>(
    ws: [&PackedGroup<'_>; G],
    k: &KLayout,
    acts: &[ActRow<'_>],
    out: &mut [f32],
) {
    let supers = ws[0].blocks / BLOCKS_PER_SUPER;
    let (header, block_bytes, super_bytes) = (k.header_bytes(), k.block_bytes(), k.super_bytes());
    let (scales_at, mins_at) = (k.scales_at(), k.mins_at());
    let bias = _mm512_set1_epi16(k.bias.unwrap_or(0) as i16);
    let low4 = _mm512_set1_epi8(0x0F);
    let plane_mask = _mm512_set1_epi8(if PLANES == 2 { 0x30 } else { 0x10 });
    let mut acc = [[_mm512_setzero_ps(); NT]; G];
    for s in 0..supers {
        // SAFETY: every read below stays inside the checked group and activation lengths;
        // prefetches may point past them, which is harmless.
        unsafe {
            let mut sb = [ws[0].data.as_ptr(); G];
            for g in 0..G {
                sb[g] = ws[g].data.as_ptr().add(s * super_bytes);
            }
            for bi in 0..BLOCKS_PER_SUPER {
                let b = s * BLOCKS_PER_SUPER + bi;
                let mut blk = sb;
                let (mut plane0, mut plane1) = ([_mm512_setzero_si512(); G], [_mm512_setzero_si512(); G]);
                for g in 0..G {
                    blk[g] = sb[g].add(header + bi * block_bytes);
                    if NT <= 2 {
                        super::avx512::prefetch_ahead(blk[g], block_bytes);
                    }
                    if PLANES > 0 {
                        plane0[g] = _mm512_loadu_si512(blk[g].add(KLayout::PLANES_AT) as *const _);
                    }
                    if PLANES == 2 {
                        plane1[g] = _mm512_loadu_si512(blk[g].add(KLayout::PLANES_AT + 64) as *const _);
                    }
                }
                let mut sum_lo = [[_mm512_setzero_si512(); NT]; G];
                let mut sum_hi = [[_mm512_setzero_si512(); NT]; G];
                for vk in 0..4 {
                    let words = act_words::<NT>(acts, b, vk);
                    for g in 0..G {
                        let raw = _mm512_loadu_si512(blk[g].add(64 * vk) as *const _);
                        let mut lo = _mm512_and_si512(raw, low4);
                        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4);
                        if PLANES == 1 {
                            // Bit vk → bit 4 for the low nibbles, bit 4 + vk → bit 4 for the high.
                            lo = _mm512_or_si512(lo, _mm512_and_si512(shift16(plane0[g], 4 - vk as i32), plane_mask));
                            hi = _mm512_or_si512(hi, _mm512_and_si512(shift16(plane0[g], -(vk as i32)), plane_mask));
                        } else if PLANES == 2 {
                            // Bits 2vk, 2vk + 1 → bits 4, 5.
                            let by = 4 - 2 * vk as i32;
                            lo = _mm512_or_si512(lo, _mm512_and_si512(shift16(plane0[g], by), plane_mask));
                            hi = _mm512_or_si512(hi, _mm512_and_si512(shift16(plane1[g], by), plane_mask));
                        }
                        nibble_products(&mut sum_lo[g], &mut sum_hi[g], (lo, hi), &words);
                    }
                }
                for g in 0..G {
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(sb[g] as *const __m256i));
                    let dmin = if MINS {
                        _mm512_cvtph_ps(_mm256_loadu_si256(sb[g].add(2 * GROUP) as *const __m256i))
                    } else {
                        d
                    };
                    // Row r's (scale_lo, scale_hi) as i16 lanes 2r and 2r + 1.
                    let pairs = _mm512_cvtepi8_epi16(half_pairs::<PAIRED>(blk[g].add(scales_at)));
                    let sc_lo = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(pairs));
                    let sc_hi = _mm512_srai_epi32::<16>(pairs);
                    let mins = if MINS {
                        _mm512_cvtepu8_epi16(half_pairs::<PAIRED>(blk[g].add(mins_at)))
                    } else {
                        _mm512_mullo_epi16(pairs, bias)
                    };
                    for t in 0..NT {
                        // One scale for both halves: one multiply (the same i32 result).
                        let scaled = if PAIRED {
                            _mm512_add_epi32(
                                _mm512_mullo_epi32(sum_lo[g][t], sc_lo),
                                _mm512_mullo_epi32(sum_hi[g][t], sc_hi),
                            )
                        } else {
                            _mm512_mullo_epi32(_mm512_add_epi32(sum_lo[g][t], sum_hi[g][t]), sc_lo)
                        };
                        let min_sum = _mm512_madd_epi16(mins, _mm512_set1_epi32(*acts[t].hs.get_unchecked(b) as i32));
                        let da = _mm512_set1_ps(*acts[t].d.get_unchecked(b));
                        let a = &mut acc[g][t];
                        if MINS {
                            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled), _mm512_mul_ps(d, da), *a);
                            *a = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(min_sum), _mm512_mul_ps(dmin, da), *a);
                        } else {
                            let net = _mm512_sub_epi32(scaled, min_sum);
                            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(net), _mm512_mul_ps(d, da), *a);
                        }
                    }
                }
            }
        }
    }
    store_tiles(&acc, out);
}

/// Stores `acc[g][t]` at `out[(g * NT + t) * GROUP..]`.
#[inline]
#[target_feature(enable = "avx512f")]
fn store_tiles<const NT: usize, const G: usize>(acc: &[[__m512; NT]; G], out: &mut [f32]) {
    for (g, row) in acc.iter().enumerate() {
        for (t, a) in row.iter().enumerate() {
            let at = &mut out[(g * NT + t) * GROUP..(g * NT + t + 1) * GROUP];
            // SAFETY: `at` holds GROUP floats (the slice above is bounds-checked).
            unsafe { _mm512_storeu_ps(at.as_mut_ptr(), *a) };
        }
    }
}

/// The Q4_K form (nibble levels, one scale and one min per 32-element block): [`k_tile`] with
/// fewer steps per block, as its decode streams at the speed its arithmetic allows. The high
/// nibbles are multiplied in place, 16 times their value (masked, not shifted), and the block's
/// two sums joined with one shift; the scale and min widen straight to one i32 lane per row;
/// the block's min term is one `madd` with the whole block's activation sum; `d` and `dmin`
/// apply once per super-block to sums already scaled by each block's `da`.
///
/// # Safety
/// AVX-512 F/BW/VNNI; [`check_shapes`] passed and `out` is long enough ([`k_tile_of`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q4k_tile<const NT: usize, const G: usize>(
    ws: [&PackedGroup<'_>; G],
    k: &KLayout,
    acts: &[ActRow<'_>],
    out: &mut [f32],
) {
    debug_assert!(k.high_planes == 0 && k.has_mins() && !k.paired);
    let supers = ws[0].blocks / BLOCKS_PER_SUPER;
    let (header, block_bytes, super_bytes) = (k.header_bytes(), k.block_bytes(), k.super_bytes());
    let (scales_at, mins_at) = (k.scales_at(), k.mins_at());
    let low4 = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); NT]; G];
    for s in 0..supers {
        // SAFETY: every read below stays inside the checked group and activation lengths;
        // prefetches may point past them, which is harmless.
        unsafe {
            let mut sb = [ws[0].data.as_ptr(); G];
            for g in 0..G {
                sb[g] = ws[g].data.as_ptr().add(s * super_bytes);
            }
            let mut scaled_acc = [[_mm512_setzero_ps(); NT]; G];
            let mut min_acc = [[_mm512_setzero_ps(); NT]; G];
            for bi in 0..BLOCKS_PER_SUPER {
                let b = s * BLOCKS_PER_SUPER + bi;
                let mut blk = sb;
                for g in 0..G {
                    blk[g] = sb[g].add(header + bi * block_bytes);
                    if NT <= 2 {
                        super::avx512::prefetch_ahead(blk[g], block_bytes);
                    }
                }
                let mut sum_lo = [[_mm512_setzero_si512(); NT]; G];
                let mut sum_hi16 = [[_mm512_setzero_si512(); NT]; G];
                for vk in 0..4 {
                    let words = act_words::<NT>(acts, b, vk);
                    for g in 0..G {
                        let raw = _mm512_loadu_si512(blk[g].add(64 * vk) as *const _);
                        let levels = (_mm512_and_si512(raw, low4), _mm512_andnot_si512(low4, raw));
                        nibble_products(&mut sum_lo[g], &mut sum_hi16[g], levels, &words);
                    }
                }
                for g in 0..G {
                    let scale = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk[g].add(scales_at) as *const __m128i));
                    // Each row's min in the low i16 of its lane, zero above: `madd` with the
                    // block's whole sum in the low i16 of every lane multiplies it once.
                    let mins = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk[g].add(mins_at) as *const __m128i));
                    for t in 0..NT {
                        // The high sums are exact multiples of 16: the shift is exact.
                        let sum = _mm512_add_epi32(sum_lo[g][t], _mm512_srai_epi32::<4>(sum_hi16[g][t]));
                        let scaled = _mm512_mullo_epi32(sum, scale);
                        let (s_lo, s_hi) = crate::quant::split_half_sums(*acts[t].hs.get_unchecked(b));
                        let min_sum = _mm512_madd_epi16(mins, _mm512_set1_epi32(s_lo + s_hi));
                        let da = _mm512_set1_ps(*acts[t].d.get_unchecked(b));
                        scaled_acc[g][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(scaled), da, scaled_acc[g][t]);
                        min_acc[g][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(min_sum), da, min_acc[g][t]);
                    }
                }
            }
            for g in 0..G {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(sb[g] as *const __m256i));
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(sb[g].add(2 * GROUP) as *const __m256i));
                for t in 0..NT {
                    acc[g][t] = _mm512_fmadd_ps(scaled_acc[g][t], d, acc[g][t]);
                    acc[g][t] = _mm512_fnmadd_ps(min_acc[g][t], dmin, acc[g][t]);
                }
            }
        }
    }
    store_tiles(&acc, out);
}
