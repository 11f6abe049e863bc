//! AVX-512 kernels (F, BW, and VNNI for the integer dot products).

use crate::packed::{ActRow, Compact, Layout, LevelWidth, PackedGroup, GROUP};
use std::arch::x86_64::*;

/// Activation rows one pass of the packed tile takes: eight share each unpacked weight vector,
/// with their 16 accumulators still in registers.
pub const MAX_ROWS: usize = 8;

/// Packed-group × activation tile: `out[t * GROUP + r] = row r · acts[t]` for the group's
/// 16 rows and any number of activation rows (passes of up to [`MAX_ROWS`]), for the wide and
/// compact forms of 32-element formats.
///
/// How the weights reach the cache depends on the row count. Up to [`STREAMING_ROWS`] the tile
/// is bound by memory and prefetches some blocks ahead (past the group's end, into the next).
/// With more, its arithmetic takes about as long as the loads, and the group's lines arrive only
/// while it asks for them: the loads and the products take turns (and the other passes compute
/// with the memory idle). So each pass prefetches its share of the *next* group into L2, spread
/// over its blocks (the following bytes: groups of a matrix lie end to end), which lets the next
/// call's loads overlap this one's products.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI. Shapes are asserted.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn dot_group_packed(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
    let n = acts.len();
    assert!(n > 0 && out.len() >= GROUP * n, "packed tile: {n} rows, {} outputs", out.len());
    let form = match w.layout {
        Layout::Wide => None,
        Layout::Compact(c) => Some(c),
        Layout::K(_) => panic!("K-quant groups have their own kernel"),
    };
    let passes = n.div_ceil(MAX_ROWS);
    for pass in 0..passes {
        let t0 = pass * MAX_ROWS;
        let nt = (n - t0).min(MAX_ROWS);
        let prefetch = if n <= STREAMING_ROWS { Prefetch::Ahead } else { Prefetch::NextGroup { pass, passes } };
        let (acts, out) = (&acts[t0..t0 + nt], &mut out[t0 * GROUP..(t0 + nt) * GROUP]);
        macro_rules! tile {
            ($t:literal) => {
                match (w.width, form) {
                    (LevelWidth::Nibble, None) => group_tile::<$t, true, false, false>(w, WIDE, acts, out, prefetch),
                    (LevelWidth::Byte, None) => group_tile::<$t, false, false, false>(w, WIDE, acts, out, prefetch),
                    (LevelWidth::Nibble, Some(c)) if c.plane => {
                        group_tile::<$t, true, true, true>(w, c, acts, out, prefetch)
                    }
                    (LevelWidth::Nibble, Some(c)) => group_tile::<$t, true, true, false>(w, c, acts, out, prefetch),
                    (LevelWidth::Byte, Some(c)) => group_tile::<$t, false, true, false>(w, c, acts, out, prefetch),
                }
            };
        }
        // SAFETY: forwarded contract; the match only picks a monomorphized size.
        unsafe {
            match nt {
                1 => tile!(1),
                2 => tile!(2),
                3 => tile!(3),
                4 => tile!(4),
                5 => tile!(5),
                6 => tile!(6),
                7 => tile!(7),
                _ => tile!(8),
            }
        }
    }
}

/// Row counts up to which a packed tile streams its weights, prefetching within the group.
/// (From three rows on, prefetching the next group measured faster: 4,096 × 1,024 Q8_0 from
/// DRAM, two threads, four rows 227 → 183 µs; a MoE step's experts 20.0 → 18.7 ms.)
pub(crate) const STREAMING_ROWS: usize = 2;

/// What a pass of the packed tile prefetches (see [`dot_group_packed`]).
#[derive(Clone, Copy, PartialEq)]
enum Prefetch {
    /// [`PREFETCH_BLOCKS`] blocks ahead, into L2.
    Ahead,
    /// This pass's share of the next group, into L2, spread evenly over its blocks.
    NextGroup { pass: usize, passes: usize },
}

/// Stands in for the compact description in the wide form, where scales and offsets are f32.
const WIDE: Compact = Compact { plane: false, stored_m: true, bias: 0 };

/// How many blocks ahead the streaming kernels prefetch: 16 blocks of 16 rows, 5–9 KiB.
const PREFETCH_BLOCKS: usize = 16;

/// Prefetches, into L2, the block [`PREFETCH_BLOCKS`] blocks of `block_bytes` after `blk`.
/// Mat-vec (and the one or two rows an expert gets in a batched step) streams the weights once:
/// this keeps ahead of the hardware prefetcher, which stops at each 4 KiB boundary. The address
/// may lie past the group, which is harmless. Into L2 and far ahead, not into L1 and near: L1
/// prefetches hold the core's few line-fill buffers for the whole trip from DRAM. (Intel Xeon,
/// two threads, from DRAM: a 5,632 × 1,024 Q8_0 mat-vec 26.0 → 27.9 GB/s, 4 blocks ahead into
/// L1 before; Gemma 3 270M decode +16–23%, SmolLM2 Q4_K_M +7–9%, Q6_K +16%. With eight rows the
/// tile is compute-bound, and prefetching within the group measured twice as slow there.)
#[inline(always)]
pub(crate) fn prefetch_ahead(blk: *const u8, block_bytes: usize) {
    super::prefetch_lines_l2(blk.wrapping_add(PREFETCH_BLOCKS * block_bytes), block_bytes.div_ceil(64));
}

/// A compact block's 16 row scales `d` and offsets `m` (stored, or `−bias·d`), from its bytes at
/// `blk` (`scales_at` past the levels). Shared with the int8 tiles, which must scale exactly so.
///
/// # Safety
/// The block's scales (and offsets, where stored) must lie inside the readable bytes at `blk`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn compact_scales(blk: *const u8, form: Compact, scales_at: usize) -> (__m512, __m512) {
    // SAFETY: forwarded contract.
    unsafe {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(scales_at) as *const __m256i));
        let m = if form.stored_m {
            _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(scales_at + 2 * GROUP) as *const __m256i))
        } else {
            _mm512_mul_ps(d, _mm512_set1_ps(-(form.bias as f32)))
        };
        (d, m)
    }
}

/// Adds one block's integer sums for one activation row (16 weight rows, one lane each) to its
/// accumulator: `acc + isum·(d·da) + m·sa`, with `da` the row's block scale and `sa` its block sum.
/// The VNNI kernel and the int8 tiles both scale through here, so their results agree bit for bit.
#[target_feature(enable = "avx512f")]
pub(crate) fn add_block(acc: __m512, isum: __m512i, d: __m512, m: __m512, da: f32, sa: f32) -> __m512 {
    let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(da)), acc);
    _mm512_fmadd_ps(m, _mm512_set1_ps(sa), acc)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn group_tile<const T: usize, const NIBBLE: bool, const COMPACT: bool, const PLANE: bool>(
    w: &PackedGroup<'_>,
    form: Compact,
    acts: &[ActRow<'_>],
    out: &mut [f32],
    prefetch: Prefetch,
) {
    let nb = w.blocks;
    let lvl = w.width.block_level_bytes();
    let stride = w.block_stride();
    let scales_at = if COMPACT { form.scales_at(w.width) } else { lvl };
    assert!(w.data.len() >= nb * stride, "packed group too short");
    assert!(out.len() >= GROUP * T);
    for a in acts.iter().take(T) {
        assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb && a.s.len() >= nb);
    }
    let low4 = _mm512_set1_epi8(0x0F);
    let bit4 = _mm512_set1_epi8(0x10);
    let base = w.data.as_ptr();
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        // SAFETY: every read below stays within the asserted lengths; prefetches may point past
        // them, which is harmless.
        unsafe {
            let blk = base.add(b * stride);
            match prefetch {
                Prefetch::Ahead => prefetch_ahead(blk, stride),
                Prefetch::NextGroup { pass, passes } => {
                    let lines = (nb * stride).div_ceil(64);
                    let per_block = lines.div_ceil(nb * passes);
                    let first = (pass * nb + b) * per_block;
                    super::prefetch_lines_l2(
                        base.wrapping_add(nb * stride + first * 64),
                        per_block.min(lines.saturating_sub(first)),
                    );
                }
            }
            let mut isum = [_mm512_setzero_si512(); T];
            if NIBBLE {
                let plane = if PLANE { _mm512_loadu_si512(blk.add(lvl) as *const _) } else { _mm512_setzero_si512() };
                for k in 0..4 {
                    let raw = _mm512_loadu_si512(blk.add(64 * k) as *const _);
                    let mut lo = _mm512_and_si512(raw, low4);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4);
                    if PLANE {
                        // Bit k → bit 4 for the low nibbles, bit 4 + k → bit 4 for the high ones.
                        let up = _mm512_sll_epi16(plane, _mm_cvtsi32_si128(4 - k as i32));
                        let down = _mm512_srl_epi16(plane, _mm_cvtsi32_si128(k as i32));
                        lo = _mm512_or_si512(lo, _mm512_and_si512(up, bit4));
                        hi = _mm512_or_si512(hi, _mm512_and_si512(down, bit4));
                    }
                    for t in 0..T {
                        let a = acts[t].qs.as_ptr().add(32 * b) as *const i32;
                        isum[t] = _mm512_dpbusd_epi32(isum[t], lo, _mm512_set1_epi32(a.add(k).read_unaligned()));
                        isum[t] = _mm512_dpbusd_epi32(isum[t], hi, _mm512_set1_epi32(a.add(4 + k).read_unaligned()));
                    }
                }
            } else {
                for k in 0..8 {
                    let wv = _mm512_loadu_si512(blk.add(64 * k) as *const _);
                    for t in 0..T {
                        let a = acts[t].qs.as_ptr().add(32 * b) as *const i32;
                        isum[t] = _mm512_dpbusd_epi32(isum[t], wv, _mm512_set1_epi32(a.add(k).read_unaligned()));
                    }
                }
            }
            let (d, m) = if !COMPACT {
                (_mm512_loadu_ps(blk.add(lvl) as *const f32), _mm512_loadu_ps(blk.add(lvl + 64) as *const f32))
            } else {
                compact_scales(blk, form, scales_at)
            };
            for t in 0..T {
                acc[t] = add_block(acc[t], isum[t], d, m, *acts[t].d.get_unchecked(b), *acts[t].s.get_unchecked(b));
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: `out` holds GROUP floats per activation row (asserted on entry).
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(t * GROUP), *a) };
    }
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

/// `out[j] = row j · x` for 16 rows of `x.len()` floats stored one after another in `ws`: one
/// accumulator per row, then one transposing reduction gives all 16 sums as a vector. For short
/// rows (Mamba's `dt_proj`: 64 columns) the 4 × 4 tile spent more on its sixteen horizontal
/// sums, and its callers on one call per 16 products, than on the products.
///
/// # Safety
/// The CPU must support AVX-512 F. Lengths are asserted.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_rows16_f32(ws: &[f32], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    assert!(ws.len() >= 16 * k && out.len() >= 16, "16 rows of {k}");
    let mut acc = [_mm512_setzero_ps(); 16];
    let mut i = 0;
    while i < k {
        let m: __mmask16 = if k - i >= 16 { 0xFFFF } else { (1u32 << (k - i)) as u16 - 1 };
        // SAFETY: the mask keeps every load inside `x` and row j of `ws`.
        unsafe {
            let xv = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, ws.as_ptr().add(j * k + i)), xv, *a);
            }
        }
        i += 16;
    }
    // SAFETY: `out` holds 16 floats (asserted).
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), sum_lanes_of_16(acc)) };
}

/// `e^x` for 16 lanes (Cephes-style range reduction and polynomial; ~1 ulp for x in [-87, 88]).
#[target_feature(enable = "avx512f")]
pub(crate) fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.3));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(p, n)
}

/// The selective scan for state sizes that are multiples of 16; see `crate::ssm::selective_scan_ref`.
///
/// Channels go sixteen at a time (the last block masked): their sums over the state are reduced
/// together into one vector (one lane per channel), so the output gate and its SiLU are vector
/// work too. Every lane's arithmetic is its own channel's alone, so a channel's values do not
/// depend on the block it falls in, nor on how a caller splits the channels.
///
/// # Safety
/// The CPU must support AVX-512 F. Shapes are asserted.
#[target_feature(enable = "avx512f")]
pub unsafe fn selective_scan(y: &mut [f32], i: &crate::ssm::ScanInputs<'_>, h: &mut [f32], s: crate::ssm::ScanShape) {
    let (t_n, ch, n, m) = (s.tokens, s.channels, s.state, s.count);
    if !n.is_multiple_of(16) {
        crate::ssm::selective_scan_ref(y, i, h, s);
        return;
    }
    i.check(y, h, s);
    let one = _mm512_set1_ps(1.0);
    let h_at = h.as_mut_ptr();
    for t in 0..t_n {
        // Channel `first + j`'s new state and its sum Σ_n h·C (a vector whose lanes still need
        // adding).
        let step = |j: usize| {
            let k = s.first + j;
            // SAFETY: all offsets are inside the checked lengths (n is a multiple of 16).
            unsafe {
                let dtx = _mm512_set1_ps(i.dt[t * ch + k]);
                let xx = _mm512_set1_ps(i.x[t * ch + k]);
                let mut acc = _mm512_setzero_ps();
                for q in (0..n).step_by(16) {
                    let hp = h_at.add(j * n + q);
                    let da = exp16(_mm512_mul_ps(dtx, _mm512_loadu_ps(i.a.as_ptr().add(k * n + q))));
                    let db = _mm512_mul_ps(dtx, _mm512_loadu_ps(i.b.as_ptr().add(t * n + q)));
                    let hv = _mm512_fmadd_ps(da, _mm512_loadu_ps(hp), _mm512_mul_ps(db, xx));
                    _mm512_storeu_ps(hp, hv);
                    acc = _mm512_fmadd_ps(hv, _mm512_loadu_ps(i.c.as_ptr().add(t * n + q)), acc);
                }
                acc
            }
        };
        for j0 in (0..m).step_by(16) {
            if t == 0 {
                super::prefetch_state(h_at.wrapping_add((j0 + 16 * STATE_PREFETCH_BLOCKS) * n), 16 * n);
            }
            let live = (m - j0).min(16);
            let mask: __mmask16 = if live == 16 { 0xFFFF } else { (1u16 << live) - 1 };
            let sums =
                sum_lanes_of_16(std::array::from_fn(|c| if c < live { step(j0 + c) } else { _mm512_setzero_ps() }));
            // SAFETY: the mask keeps every load to channels first + j0 .. + live, inside the
            // [tokens, channels] inputs and `d`, and the store inside y's row t of `count`.
            unsafe {
                let at = t * ch + s.first + j0;
                let xv = _mm512_maskz_loadu_ps(mask, i.x.as_ptr().add(at));
                let zv = _mm512_maskz_loadu_ps(mask, i.z.as_ptr().add(at));
                let out = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, i.d.as_ptr().add(s.first + j0)), xv, sums);
                let gate = _mm512_div_ps(zv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), zv))));
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(t * m + j0), mask, _mm512_mul_ps(out, gate));
            }
        }
    }
}

/// Channel blocks ahead whose states the decode scan prefetches. A decode step's scan reads and
/// writes each sequence's whole state once (16 channels × 16 states = 1 KiB a block); the
/// hardware prefetchers alone left it waiting on memory (16 sequences × 2,048 channels: ~240
/// → ~160 µs a layer on an Intel Xeon, one or two blocks ahead alike).
const STATE_PREFETCH_BLOCKS: usize = 2;

/// Lane `c` of the result is the sum of the sixteen lanes of `v[c]` (a transposing reduction:
/// pairs of vectors interleaved and added, then pairs of those, four times).
#[target_feature(enable = "avx512f")]
fn sum_lanes_of_16(v: [__m512; 16]) -> __m512 {
    // After this, each 128-bit chunk of w[p] holds [v2p, v2p+1, v2p, v2p+1] partial sums.
    let w: [__m512; 8] = std::array::from_fn(|p| {
        _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]))
    });
    // Each chunk of x[q] holds [v4q, v4q+1, v4q+2, v4q+3], one partial sum per chunk.
    let x: [__m512; 4] = std::array::from_fn(|q| {
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(w[2 * q], w[2 * q + 1]),
            _mm512_shuffle_ps::<0b11_10_11_10>(w[2 * q], w[2 * q + 1]),
        )
    });
    // Chunks of y[r]: channels 8r..8r+4 twice (halves of their chunks), then 8r+4..8r+8 twice.
    let y: [__m512; 2] = std::array::from_fn(|r| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x[2 * r], x[2 * r + 1]),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x[2 * r], x[2 * r + 1]),
        )
    });
    _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(y[0], y[1]), _mm512_shuffle_f32x4::<0b11_01_11_01>(y[0], y[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_of_sixteen_vectors_sum_in_order() {
        if !crate::dispatch::Kernels::testable(crate::dispatch::Isa::Avx512Vnni) {
            return;
        }
        let vals: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let mut got = [0f32; 16];
        // SAFETY: avx512f was detected above; every load reads 16 of the 256 values.
        unsafe {
            let v: [__m512; 16] = std::array::from_fn(|c| _mm512_loadu_ps(vals.as_ptr().add(16 * c)));
            _mm512_storeu_ps(got.as_mut_ptr(), sum_lanes_of_16(v));
        }
        for (c, g) in got.iter().enumerate() {
            assert_eq!(*g, vals[16 * c..16 * c + 16].iter().sum::<f32>(), "channel {c}");
        }
    }

    #[test]
    fn exp16_is_accurate_over_the_softmax_range() {
        if !crate::dispatch::Kernels::testable(crate::dispatch::Isa::Avx512Vnni) {
            return;
        }
        let xs: Vec<f32> = (0..16 * 400).map(|i| -87.0 + i as f32 * 0.0137).collect();
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: avx512f was detected above.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr()))) };
            for (g, &x) in got.iter().zip(c) {
                let want = (x as f64).exp();
                assert!(((*g as f64) - want).abs() <= 3e-7 * want, "exp({x}) = {g}, want {want}");
            }
        }
    }
}
