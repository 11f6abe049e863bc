//! AVX2 attention for many query rows against one KV head (prefill chunks; the query heads that
//! share a KV head), tiled so that each key and value is read once for every row of the tile.
//! AVX-512 machines run `crate::x86::avx512_attention`, which shares the key transposition.

use super::avx2::exp8;
use crate::ops::KvView;
use std::arch::x86_64::*;

/// Positions per key tile: the keys are transposed so that 16 scores of a row are two vectors.
pub(crate) const KEYS: usize = 16;
/// Query rows per score micro-tile (8 accumulators, two key vectors, one broadcast).
const SCORE_ROWS: usize = 4;
/// Query rows per value micro-tile (three rows × four vectors of 8 output dimensions).
const VALUE_ROWS: usize = 3;

/// Positions a value tile sums over (`from..reach`) and the position of weight column 0.
#[derive(Clone, Copy)]
struct Positions {
    base: usize,
    from: usize,
    reach: usize,
}

/// `out[i] = softmax(scale · K q[i]) · V` over positions `spans[i].0..spans[i].1`, for every row
/// `i` of `q` and `out` (`[rows, head_dim]`, contiguous). See `crate::ops::attend_rows_ref`.
///
/// Scores go to `scratch` for all rows first (`[rows, positions]`, from the earliest position any
/// row sees, rounded down to a key tile), then each row's softmax, then the weighted values: key
/// tiles are transposed once and serve every row in register tiles, so no score needs a
/// horizontal sum.
///
/// # Safety
/// The CPU must support AVX2 and FMA. Shapes are asserted.
#[target_feature(enable = "avx2,fma")]
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
                match rows - r0 {
                    1 => score_tile::<1>(at, stride, q.as_ptr().add(r0 * hd), hd, kt, scale),
                    2 => score_tile::<2>(at, stride, q.as_ptr().add(r0 * hd), hd, kt, scale),
                    3 => score_tile::<3>(at, stride, q.as_ptr().add(r0 * hd), hd, kt, scale),
                    _ => score_tile::<SCORE_ROWS>(at, stride, q.as_ptr().add(r0 * hd), hd, kt, scale),
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
            let span = Positions { base, from, reach };
            match rows - r0 {
                1 => value_tile::<1>(o, w, stride, kv, span, hd),
                2 => value_tile::<2>(o, w, stride, kv, span, hd),
                _ => value_tile::<VALUE_ROWS>(o, w, stride, kv, span, hd),
            }
            r0 += VALUE_ROWS;
        }
    }
}

/// `kt[d·16 + i]` = element `d` of position `p0 + i`'s key, zero past `count`; eight keys by
/// eight dimensions at a time through registers.
///
/// # Safety
/// Positions `p0..p0 + count` must be inside the checked view; `kt` holds `16·hd` floats and
/// `hd` is a multiple of 8.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn transpose_keys(kt: &mut [f32], kv: &KvView<'_>, p0: usize, count: usize, hd: usize) {
    assert!(kt.len() >= KEYS * hd && hd.is_multiple_of(8));
    // SAFETY: rows of present keys are inside the view (checked by the caller); every store is
    // inside `kt` (asserted).
    unsafe {
        for i0 in (0..KEYS).step_by(8) {
            let rows: [Option<*const f32>; 8] =
                std::array::from_fn(|j| (i0 + j < count).then(|| kv.k.as_ptr().add(kv.at(p0 + i0 + j))));
            for d0 in (0..hd).step_by(8) {
                let r: [__m256; 8] = std::array::from_fn(|j| match rows[j] {
                    Some(p) => _mm256_loadu_ps(p.add(d0)),
                    None => _mm256_setzero_ps(),
                });
                let t = transpose8(r);
                for (j, v) in t.iter().enumerate() {
                    _mm256_storeu_ps(kt.as_mut_ptr().add((d0 + j) * KEYS + i0), *v);
                }
            }
        }
    }
}

/// The 8×8 transpose of eight row vectors.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Scores of `R` consecutive query rows against one transposed key tile.
///
/// # Safety
/// `scores` has `R` rows of `stride` floats from the tile's first position on; `q` has `R` rows
/// of `hd`; `kt` holds the transposed tile.
#[inline]
#[target_feature(enable = "avx2,fma")]
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
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let kp = kt.as_ptr();
        for d in 0..hd {
            let k0 = _mm256_loadu_ps(kp.add(d * KEYS));
            let k1 = _mm256_loadu_ps(kp.add(d * KEYS + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm256_broadcast_ss(&*q.add(r * hd + d));
                a[0] = _mm256_fmadd_ps(qv, k0, a[0]);
                a[1] = _mm256_fmadd_ps(qv, k1, a[1]);
            }
        }
        let sv = _mm256_set1_ps(scale);
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(scores.add(r * stride), _mm256_mul_ps(a[0], sv));
            _mm256_storeu_ps(scores.add(r * stride + 8), _mm256_mul_ps(a[1], sv));
        }
    }
}

/// Turns `row[first..end]` into softmax weights and zeroes the rest of the row.
#[target_feature(enable = "avx2,fma")]
fn softmax_span(row: &mut [f32], first: usize, end: usize) {
    row[..first].fill(0.0);
    row[end..].fill(0.0);
    let seen = &mut row[first..end];
    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mx = _mm256_set1_ps(max);
    let mut sum = 0f32;
    let whole = seen.len() / 8 * 8;
    // SAFETY: chunks are inside `seen[..whole]`.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for c in seen[..whole].chunks_exact_mut(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mx));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        sum += lanes.iter().sum::<f32>();
    }
    for x in &mut seen[whole..] {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in seen.iter_mut() {
        *x *= inv;
    }
}

/// `out[r] = Σ_p w[r][p − base] · V[p]` for `R` rows over positions `from..reach` (weights
/// outside a row's own span are zero).
///
/// # Safety
/// `out` has `R` rows of `hd`; `w` has `R` rows of `stride` weights from position `base` on;
/// positions `from..reach` are inside the checked view.
#[target_feature(enable = "avx2,fma")]
unsafe fn value_tile<const R: usize>(
    out: *mut f32,
    w: *const f32,
    stride: usize,
    kv: &KvView<'_>,
    span: Positions,
    hd: usize,
) {
    let bs = kv.block_size;
    let Positions { base, from, reach } = span;
    // SAFETY: forwarded to the caller.
    unsafe {
        let mut c0 = 0;
        while c0 < hd {
            // Four vectors of output at a time where the head allows, else one.
            let wide = hd - c0 >= 32;
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            for bi in from / bs..reach.div_ceil(bs) {
                let (b, first) = (kv.blocks[bi], bi * bs);
                for i in from.saturating_sub(first)..bs.min(reach - first) {
                    let p = first + i - base;
                    let vp = kv.v.as_ptr().add((b as usize * bs + i) * kv.stride + kv.offset + c0);
                    if wide {
                        let v = [
                            _mm256_loadu_ps(vp),
                            _mm256_loadu_ps(vp.add(8)),
                            _mm256_loadu_ps(vp.add(16)),
                            _mm256_loadu_ps(vp.add(24)),
                        ];
                        for (r, a) in acc.iter_mut().enumerate() {
                            let wv = _mm256_broadcast_ss(&*w.add(r * stride + p));
                            for (x, &vv) in a.iter_mut().zip(&v) {
                                *x = _mm256_fmadd_ps(wv, vv, *x);
                            }
                        }
                    } else {
                        let v = _mm256_loadu_ps(vp);
                        for (r, a) in acc.iter_mut().enumerate() {
                            let wv = _mm256_broadcast_ss(&*w.add(r * stride + p));
                            a[0] = _mm256_fmadd_ps(wv, v, a[0]);
                        }
                    }
                }
            }
            let width = if wide { 4 } else { 1 };
            for (r, a) in acc.iter().enumerate() {
                for (j, x) in a.iter().enumerate().take(width) {
                    _mm256_storeu_ps(out.add(r * hd + c0 + 8 * j), *x);
                }
            }
            c0 += 8 * width;
        }
    }
}
