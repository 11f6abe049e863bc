//! AVX-512 attention for many query rows against one KV head: the tiled kernel of
//! `crate::x86::avx2_attention` with 512-bit vectors, so a score tile's 16 keys are one register
//! and a value tile covers 64 output dimensions per pass. Keys are transposed by that module's
//! code.
//!
//! A row's arithmetic never depends on the rows beside it (each score is its own FMA chain over
//! the dimensions, each output its own over the positions), so batched and lone rows agree.

use super::avx2_attention::transpose_keys;
use super::avx2_attention::KEYS;
use super::avx512::exp16;
use crate::ops::KvView;
use std::arch::x86_64::*;

/// Query rows per score micro-tile (one accumulator of 16 keys each).
const SCORE_ROWS: usize = 8;
/// Query rows per value micro-tile (four 16-float accumulators each).
const VALUE_ROWS: usize = 6;

/// `out[i] = softmax(scale · K q[i]) · V` over positions `spans[i].0..spans[i].1`, for every row
/// `i` of `q` and `out` (`[rows, head_dim]`, contiguous). See `crate::ops::attend_rows_ref`.
///
/// # Safety
/// The CPU must support AVX-512 F/VL, AVX2 and FMA. Shapes are asserted.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
pub unsafe fn attend_rows(
    out: &mut [f32],
    q: &[f32],
    spans: &[(usize, usize)],
    kv: &KvView<'_>,
    scale: f32,
    scratch: &mut Vec<f32>,
) {
    let rows = spans.len();
    assert!(rows > 0 && q.len().is_multiple_of(rows) && out.len() == q.len());
    let hd = q.len() / rows;
    if !hd.is_multiple_of(8) {
        crate::ops::attend_rows_ref(out, q, spans, kv, scale, scratch);
        return;
    }
    assert!(spans.iter().all(|&(first, end)| first < end), "every row attends to at least one position");
    let n = spans.iter().map(|s| s.1).max().unwrap_or(0);
    let base = spans.iter().map(|s| s.0).min().unwrap_or(0) / KEYS * KEYS;
    kv.check(n, hd);
    let stride = (n - base).next_multiple_of(KEYS);
    scratch.clear();
    scratch.resize(rows * stride + KEYS * hd, 0.0);
    let (scores, kt) = scratch.split_at_mut(rows * stride);
    // SAFETY: `check` proved positions 0..n lie inside the pool; every offset below is inside
    // `q`, `out`, `scores` or `kt` by construction.
    unsafe {
        for p0 in (base..n).step_by(KEYS) {
            transpose_keys(kt, kv, p0, (n - p0).min(KEYS), hd);
            let mut r0 = 0;
            while r0 < rows {
                let at = scores.as_mut_ptr().add(r0 * stride + p0 - base);
                let qr = q.as_ptr().add(r0 * hd);
                match rows - r0 {
                    1 => score_tile::<1>(at, stride, qr, hd, kt, scale),
                    2 => score_tile::<2>(at, stride, qr, hd, kt, scale),
                    3 => score_tile::<3>(at, stride, qr, hd, kt, scale),
                    4 => score_tile::<4>(at, stride, qr, hd, kt, scale),
                    5 => score_tile::<5>(at, stride, qr, hd, kt, scale),
                    6 => score_tile::<6>(at, stride, qr, hd, kt, scale),
                    7 => score_tile::<7>(at, stride, qr, hd, kt, scale),
                    _ => score_tile::<SCORE_ROWS>(at, stride, qr, hd, kt, scale),
                }
                r0 += SCORE_ROWS;
            }
        }
        for (r, &(first, end)) in spans.iter().enumerate() {
            softmax_span(&mut scores[r * stride..(r + 1) * stride], first - base, end - base);
        }
        let mut r0 = 0;
        while r0 < rows {
            let o = out.as_mut_ptr().add(r0 * hd);
            let w = scores.as_ptr().add(r0 * stride);
            let group = &spans[r0..(r0 + VALUE_ROWS).min(rows)];
            let from = group.iter().map(|s| s.0).min().unwrap_or(base);
            let reach = group.iter().map(|s| s.1).max().unwrap_or(0);
            let span = (base, from, reach);
            match rows - r0 {
                1 => value_tile::<1>(o, w, stride, kv, span, hd),
                2 => value_tile::<2>(o, w, stride, kv, span, hd),
                3 => value_tile::<3>(o, w, stride, kv, span, hd),
                4 => value_tile::<4>(o, w, stride, kv, span, hd),
                5 => value_tile::<5>(o, w, stride, kv, span, hd),
                _ => value_tile::<VALUE_ROWS>(o, w, stride, kv, span, hd),
            }
            r0 += VALUE_ROWS;
        }
    }
}

/// Turns `row[first..end]` into softmax weights and zeroes the rest of the row, 16 lanes at a
/// time (the tail masked).
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
pub(crate) fn softmax_span(row: &mut [f32], first: usize, end: usize) {
    row[..first].fill(0.0);
    row[end..].fill(0.0);
    let seen = &mut row[first..end];
    let n = seen.len();
    let mask = |i: usize| -> __mmask16 { ((1u32 << (n - i).min(16)) - 1) as __mmask16 };
    let p = seen.as_mut_ptr();
    // SAFETY: every access is masked to `seen[..n]`.
    unsafe {
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..n).step_by(16) {
            mx = _mm512_mask_max_ps(mx, mask(i), mx, _mm512_maskz_loadu_ps(mask(i), p.add(i)));
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask(i), p.add(i)), max));
            _mm512_mask_storeu_ps(p.add(i), mask(i), e);
            sum = _mm512_mask_add_ps(sum, mask(i), sum, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for i in (0..n).step_by(16) {
            let v = _mm512_maskz_loadu_ps(mask(i), p.add(i));
            _mm512_mask_storeu_ps(p.add(i), mask(i), _mm512_mul_ps(v, inv));
        }
    }
}

/// Scores of `R` consecutive query rows against one transposed key tile (`kt[d·16 + i]`).
///
/// # Safety
/// `scores` has `R` rows of `stride` floats from the tile's first position on; `q` has `R` rows
/// of `hd`; `kt` holds the transposed tile.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn score_tile<const R: usize>(
    scores: *mut f32,
    stride: usize,
    q: *const f32,
    hd: usize,
    kt: &[f32],
    scale: f32,
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let kp = kt.as_ptr();
        for d in 0..hd {
            let k = _mm512_loadu_ps(kp.add(d * KEYS));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(r * hd + d)), k, *a);
            }
        }
        let sv = _mm512_set1_ps(scale);
        for (r, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(scores.add(r * stride), _mm512_mul_ps(*a, sv));
        }
    }
}

/// `out[r] = Σ_p w[r][p − base] · V[p]` for `R` rows over positions `from..reach` (weights outside
/// a row's own span are zero), 64 output dimensions per pass (masked at the head's end).
///
/// # Safety
/// `out` has `R` rows of `hd`; `w` has `R` rows of `stride` weights from position `base` on;
/// positions `from..reach` are inside the checked view.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn value_tile<const R: usize>(
    out: *mut f32,
    w: *const f32,
    stride: usize,
    kv: &KvView<'_>,
    (base, from, reach): (usize, usize, usize),
    hd: usize,
) {
    let bs = kv.block_size;
    // SAFETY: forwarded to the caller; masked loads and stores stay inside the head.
    unsafe {
        let mut c0 = 0;
        while c0 < hd {
            let width = (hd - c0).min(64);
            let masks: [__mmask16; 4] = std::array::from_fn(|j| {
                let left = width.saturating_sub(16 * j).min(16);
                ((1u32 << left) - 1) as __mmask16
            });
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            for bi in from / bs..reach.div_ceil(bs) {
                let (b, first) = (kv.blocks[bi], bi * bs);
                for i in from.saturating_sub(first)..bs.min(reach - first) {
                    let p = first + i - base;
                    let vp = kv.v.as_ptr().add((b as usize * bs + i) * kv.stride + kv.offset + c0);
                    let v: [__m512; 4] = std::array::from_fn(|j| _mm512_maskz_loadu_ps(masks[j], vp.add(16 * j)));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(*w.add(r * stride + p));
                        for (x, &vv) in a.iter_mut().zip(&v) {
                            *x = _mm512_fmadd_ps(wv, vv, *x);
                        }
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (j, x) in a.iter().enumerate() {
                    if masks[j] != 0 {
                        _mm512_mask_storeu_ps(out.add(r * hd + c0 + 16 * j), masks[j], *x);
                    }
                }
            }
            c0 += width;
        }
    }
}
