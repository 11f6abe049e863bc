//! Intel AMX tile kernels: bf16 products and attention for the rows of prompt tokens, and int8
//! products for runs of sampled rows.
//!
//! Why bf16 tiles for prompt rows: an int8 tile sums 32 columns under one block scale, so every
//! 32 columns each output tile has to be stored and rescaled with AVX-512 — the per-block work
//! that also bounds the VNNI kernels. A bf16 tile accumulates in f32 across a whole row. A
//! group's 16 weight rows are dequantized once per product into a bf16 *panel*, which then
//! serves every activation row. Both operands round to bf16 (8 significant bits, relative error
//! ≤ 2⁻⁹), finer than the 8-bit activations of the VNNI kernels but different: which rows take
//! tiles is decided by their role (see `crate::dispatch::TileKernels`).
//!
//! Sampled rows keep the VNNI kernels' 8-bit maths; where a step has five or more of them
//! against one group (a batch's dense and Mamba projections), int8 tiles compute their integer
//! sums and the VNNI kernel's scaling follows, so the results are the VNNI kernel's bit for bit
//! ([`dot_group_bytes`]).
//!
//! Rust's AMX intrinsics are not stable, so the tile instructions are inline assembly. Linux
//! hands out the tile-data register state only on request ([`usable`] asks once per process).
//!
//! The layouts and the scalar twins are in `crate::tiles`.

use crate::kpacked::{KLayout, BLOCKS_PER_SUPER};
use crate::packed::{ActRow, Compact, Layout, LevelWidth, PackedGroup, GROUP};
use crate::quant::QBLOCK;
use crate::tiles::{panel_len, K_STEP, TILE_TOKENS};
use crate::x86::avx512;
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this CPU has AMX tiles with bf16 products (and the AVX-512 BF16 the panels are built
/// with), and this process may use them. Asks Linux for the tile-data state on the first call.
pub fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| cpu_has_amx_bf16() && request_tile_state())
}

fn cpu_has_amx_bf16() -> bool {
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
        && amx_bf16
        && amx_tile
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it the first tile instruction
/// of the process faults. Returns whether the kernel granted it.
fn request_tile_state() -> bool {
    #[cfg(target_os = "linux")]
    {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a plain system call; it reads no user memory and clobbers rcx and r11.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
                 in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Dequantizes a packed group into its bf16 panel (`panel_len(w.blocks * 32)` values).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/BF16. Lengths are asserted.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn panel_from_group(w: &PackedGroup<'_>, panel: &mut [u16]) {
    let nb = w.blocks;
    assert!(panel.len() >= panel_len(nb * QBLOCK), "panel too short");
    let dst = panel.as_mut_ptr();
    match w.layout {
        Layout::K(k) => {
            assert!(nb.is_multiple_of(BLOCKS_PER_SUPER), "K rows are whole super-blocks");
            assert!(w.data.len() >= nb / BLOCKS_PER_SUPER * k.super_bytes(), "packed group too short");
            // SAFETY: lengths asserted above; the layout picks a monomorphized reader.
            unsafe {
                match (k.high_planes, k.has_mins(), k.paired) {
                    (0, true, true) => k_panel::<0, true, true>(w, &k, dst),
                    (0, true, false) => k_panel::<0, true, false>(w, &k, dst),
                    (0, false, true) => k_panel::<0, false, true>(w, &k, dst),
                    (1, true, false) => k_panel::<1, true, false>(w, &k, dst),
                    (2, false, true) => k_panel::<2, false, true>(w, &k, dst),
                    other => panic!("no AMX panel for K layout {other:?}"),
                }
            }
        }
        Layout::Wide | Layout::Compact(_) => {
            assert!(w.data.len() >= nb * w.block_stride(), "packed group too short");
            // SAFETY: as above.
            unsafe { legacy_panel(w, dst) }
        }
    }
}

/// Writes one block's 16 pair rows (1024 bytes at `dst`) from its eight level vectors — vector
/// `k`'s 4-byte lane `i` holding row `i`'s columns `4k..4k + 4` as unsigned bytes — and the
/// rows' `value = scale·level + offset` for the block's first and last 16 columns.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn emit_block(levels: &[__m512i; 8], scale: [__m512; 2], offset: [__m512; 2], dst: *mut u16) {
    // Interleaves the two bf16 halves of a `cvtne2ps` result into per-row pairs.
    let pairs = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    let byte = _mm512_set1_epi32(0xFF);
    for (k, &lv) in levels.iter().enumerate() {
        let h = k / 4;
        let value = |j: i32| {
            let level = _mm512_and_si512(_mm512_srl_epi32(lv, _mm_cvtsi32_si128(8 * j)), byte);
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(level), scale[h], offset[h])
        };
        for p in 0..2 {
            let both = _mm512_cvtne2ps_pbh(value(2 * p + 1), value(2 * p));
            let row = _mm512_permutexvar_epi16(pairs, std::mem::transmute::<__m512bh, __m512i>(both));
            // SAFETY: the caller gives 16 rows of 32 values at `dst`.
            unsafe { _mm512_storeu_si512(dst.add((2 * k + p as usize) * 32) as *mut _, row) };
        }
    }
}

/// Panels of the 32-element formats, wide or compact.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn legacy_panel(w: &PackedGroup<'_>, dst: *mut u16) {
    let lvl = w.width.block_level_bytes();
    let stride = w.block_stride();
    let (compact, plane) = match w.layout {
        Layout::Compact(c) => (Some(c), c.plane),
        _ => (None, false),
    };
    let low4 = _mm512_set1_epi8(0x0F);
    let bit4 = _mm512_set1_epi8(0x10);
    for b in 0..w.blocks {
        // SAFETY: `panel_from_group` asserted the group and panel lengths.
        unsafe {
            let blk = w.data.as_ptr().add(b * stride);
            let mut levels = [_mm512_setzero_si512(); 8];
            match w.width {
                LevelWidth::Byte => {
                    for (k, l) in levels.iter_mut().enumerate() {
                        *l = _mm512_loadu_si512(blk.add(64 * k) as *const _);
                    }
                }
                LevelWidth::Nibble => {
                    let bits =
                        if plane { _mm512_loadu_si512(blk.add(lvl) as *const _) } else { _mm512_setzero_si512() };
                    for k in 0..4 {
                        let raw = _mm512_loadu_si512(blk.add(64 * k) as *const _);
                        let mut lo = _mm512_and_si512(raw, low4);
                        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4);
                        if plane {
                            let up = _mm512_sll_epi16(bits, _mm_cvtsi32_si128(4 - k as i32));
                            let down = _mm512_srl_epi16(bits, _mm_cvtsi32_si128(k as i32));
                            lo = _mm512_or_si512(lo, _mm512_and_si512(up, bit4));
                            hi = _mm512_or_si512(hi, _mm512_and_si512(down, bit4));
                        }
                        levels[k] = lo;
                        levels[4 + k] = hi;
                    }
                }
            }
            let (d, m) = match compact {
                None => (_mm512_loadu_ps(blk.add(lvl) as *const f32), _mm512_loadu_ps(blk.add(lvl + 64) as *const f32)),
                Some(c @ Compact { stored_m, bias, .. }) => {
                    let at = c.scales_at(w.width);
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(at) as *const __m256i));
                    let m = if stored_m {
                        _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(at + 2 * GROUP) as *const __m256i))
                    } else {
                        _mm512_mul_ps(d, _mm512_set1_ps(-(bias as f32)))
                    };
                    (d, m)
                }
            };
            emit_block(&levels, [d, d], [m, m], dst.add(b * 16 * 32));
        }
    }
}

/// Panels of the K formats: `value = d·sc·level − dmin·mn` per 16-column half.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn k_panel<const PLANES: usize, const MINS: bool, const PAIRED: bool>(
    w: &PackedGroup<'_>,
    k: &KLayout,
    dst: *mut u16,
) {
    let (header, block_bytes, super_bytes) = (k.header_bytes(), k.block_bytes(), k.super_bytes());
    let (scales_at, mins_at) = (k.scales_at(), k.mins_at());
    let neg_bias = _mm512_set1_ps(-(k.bias.unwrap_or(0) as f32));
    let low4 = _mm512_set1_epi8(0x0F);
    let plane_mask = _mm512_set1_epi8(if PLANES == 2 { 0x30 } else { 0x10 });
    let shift = |x: __m512i, n: i32| {
        if n >= 0 {
            _mm512_sll_epi16(x, _mm_cvtsi32_si128(n))
        } else {
            _mm512_srl_epi16(x, _mm_cvtsi32_si128(-n))
        }
    };
    for s in 0..w.blocks / BLOCKS_PER_SUPER {
        // SAFETY: `panel_from_group` asserted the group and panel lengths.
        unsafe {
            let sb = w.data.as_ptr().add(s * super_bytes);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(sb as *const __m256i));
            let dmin = if MINS { _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(2 * GROUP) as *const __m256i)) } else { d };
            for bi in 0..BLOCKS_PER_SUPER {
                let blk = sb.add(header + bi * block_bytes);
                // Row r's (scale_lo, scale_hi) i8 pair as the two i16 halves of lane r.
                let pairs = _mm512_cvtepi8_epi16(super::avx512_kquant::half_pairs::<PAIRED>(blk.add(scales_at)));
                let sc_lo = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(pairs));
                let sc_hi = _mm512_srai_epi32::<16>(pairs);
                let scale = [_mm512_mul_ps(d, _mm512_cvtepi32_ps(sc_lo)), _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc_hi))];
                let offset = if MINS {
                    let mins = _mm512_cvtepu8_epi16(super::avx512_kquant::half_pairs::<PAIRED>(blk.add(mins_at)));
                    let mn_lo = _mm512_and_si512(mins, _mm512_set1_epi32(0xFFFF));
                    let mn_hi = _mm512_srli_epi32::<16>(mins);
                    // Negated by its sign bit, as the scalar twin's `-dmin`: `0 − dmin` would
                    // give +0 for a zero dmin where `-dmin` gives −0, and a zero weight's sign
                    // would then differ (a −0 scale times a zero level plus the offset).
                    let neg_dmin =
                        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(dmin), _mm512_set1_epi32(i32::MIN)));
                    [
                        _mm512_mul_ps(neg_dmin, _mm512_cvtepi32_ps(mn_lo)),
                        _mm512_mul_ps(neg_dmin, _mm512_cvtepi32_ps(mn_hi)),
                    ]
                } else {
                    // min = bias·sc with dmin = d.
                    [_mm512_mul_ps(scale[0], neg_bias), _mm512_mul_ps(scale[1], neg_bias)]
                };
                let plane0 = if PLANES > 0 {
                    _mm512_loadu_si512(blk.add(KLayout::PLANES_AT) as *const _)
                } else {
                    _mm512_setzero_si512()
                };
                let plane1 = if PLANES == 2 {
                    _mm512_loadu_si512(blk.add(KLayout::PLANES_AT + 64) as *const _)
                } else {
                    _mm512_setzero_si512()
                };
                let mut levels = [_mm512_setzero_si512(); 8];
                for vk in 0..4 {
                    let raw = _mm512_loadu_si512(blk.add(64 * vk) as *const _);
                    let mut lo = _mm512_and_si512(raw, low4);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4);
                    if PLANES == 1 {
                        lo = _mm512_or_si512(lo, _mm512_and_si512(shift(plane0, 4 - vk as i32), plane_mask));
                        hi = _mm512_or_si512(hi, _mm512_and_si512(shift(plane0, -(vk as i32)), plane_mask));
                    } else if PLANES == 2 {
                        let by = 4 - 2 * vk as i32;
                        lo = _mm512_or_si512(lo, _mm512_and_si512(shift(plane0, by), plane_mask));
                        hi = _mm512_or_si512(hi, _mm512_and_si512(shift(plane1, by), plane_mask));
                    }
                    levels[vk] = lo;
                    levels[4 + vk] = hi;
                }
                let b = s * BLOCKS_PER_SUPER + bi;
                emit_block(&levels, scale, offset, dst.add(b * 16 * 32));
            }
        }
    }
}

/// Rounds 16 values at a time to bf16 (to nearest, ties to even).
///
/// # Safety
/// The CPU must support AVX-512 F/BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn round_to_bf16(src: &[f32], dst: &mut [u16]) {
    for (s, d) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
        // SAFETY: 16 values each side.
        unsafe {
            let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(s.as_ptr()));
            _mm256_storeu_si256(d.as_mut_ptr() as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(v));
        }
    }
}

/// The tile shapes: every tile 16 rows of 64 bytes (C: 16 × 16 f32; A: 16 tokens × 32 bf16;
/// B: 16 column pairs × 16 rows × 2 bf16).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn uniform() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }
}

thread_local! {
    /// The int8 tile shapes this thread last configured ([`int8_config`]'s row count), if
    /// nothing configured the tiles since: they can then stay configured between calls.
    static INT8_ROWS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Loads a tile configuration; `int8_rows` names [`int8_config`] shapes, which later calls may
/// then keep (a configuration load costs about a tenth of a group's int8 product).
///
/// # Safety
/// [`usable`] must have returned true.
unsafe fn load_config(cfg: &TileConfig, int8_rows: Option<usize>) {
    INT8_ROWS.set(int8_rows);
    // SAFETY: tile use was granted; the configuration is 64 readable bytes.
    unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
}

macro_rules! tile_load {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $tmm, ", [{p} + {s}*1]"), p = in(reg) $ptr, s = in(reg) $stride,
             options(nostack, readonly))
    };
}
macro_rules! tile_store {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $tmm), p = in(reg) $ptr, s = in(reg) $stride,
             options(nostack))
    };
}
macro_rules! tile_dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem))
    };
}
macro_rules! tile_zero {
    ($c:literal) => {
        asm!(concat!("tilezero tmm", $c), options(nostack, nomem))
    };
}

/// `out[t · 16·P + 16p + r] = panels[p] row r · acts[t]` for `tokens` activation rows of `kp`
/// bf16 values and P = `panels.len()` panels of `kp` columns.
///
/// Two token tiles at a time against two panels at a time (C in tmm0–3, activations in tmm4–5,
/// panels in tmm6–7), the token tiles outermost: a caller that hands several panels gets each
/// pair of activation tiles loaded from L1 for every panel pair after the first.
///
/// # Safety
/// [`usable`] must have returned true. Shapes are asserted.
pub unsafe fn gemm(acts: &[u16], kp: usize, tokens: usize, panels: &[&[u16]], out: &mut [f32]) {
    let np = panels.len();
    assert!(np >= 1, "at least one panel");
    assert!(kp.is_multiple_of(K_STEP) && tokens.is_multiple_of(TILE_TOKENS), "gemm shape");
    assert!(acts.len() >= tokens * kp && out.len() >= tokens * np * GROUP, "gemm lengths");
    assert!(panels.iter().all(|p| p.len() >= panel_len(kp)), "panel too short");
    let cfg = TileConfig::uniform();
    let a_stride = kp * 2;
    let stride = np * GROUP;
    let c_stride = stride * 4;
    let b_stride = 64usize;
    let tiles = tokens / TILE_TOKENS;
    // SAFETY: tile use was granted (`usable`); every load reads 16 rows of 64 bytes inside the
    // asserted `acts` and panel lengths, and every store writes 16 rows of 64 bytes inside `out`.
    unsafe {
        load_config(&cfg, None);
        let mut tt = 0;
        while tt < tiles {
            let two_tokens = tt + 1 < tiles;
            let a0 = acts.as_ptr().add(tt * TILE_TOKENS * kp);
            let a1 = a0.add(TILE_TOKENS * kp);
            let mut pp = 0;
            while pp < np {
                let two_panels = pp + 1 < np;
                let b0 = panels[pp].as_ptr();
                let b1 = panels[if two_panels { pp + 1 } else { pp }].as_ptr();
                let c0 = out.as_mut_ptr().add(tt * TILE_TOKENS * stride + pp * GROUP);
                let c1 = c0.add(TILE_TOKENS * stride);
                tile_zero!(0);
                tile_zero!(1);
                tile_zero!(2);
                tile_zero!(3);
                for kc in 0..kp / K_STEP {
                    let (ka, kb) = (kc * K_STEP, kc * K_STEP * GROUP);
                    tile_load!(4, a0.add(ka), a_stride);
                    tile_load!(6, b0.add(kb), b_stride);
                    tile_dot!(0, 4, 6);
                    if two_panels {
                        tile_load!(7, b1.add(kb), b_stride);
                        tile_dot!(1, 4, 7);
                    }
                    if two_tokens {
                        tile_load!(5, a1.add(ka), a_stride);
                        tile_dot!(2, 5, 6);
                        if two_panels {
                            tile_dot!(3, 5, 7);
                        }
                    }
                }
                tile_store!(0, c0, c_stride);
                if two_panels {
                    tile_store!(1, c0.add(GROUP), c_stride);
                }
                if two_tokens {
                    tile_store!(2, c1, c_stride);
                    if two_panels {
                        tile_store!(3, c1.add(GROUP), c_stride);
                    }
                }
                pp += 2;
            }
            tt += 2;
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// Rounds `x` to bf16 high and low parts (`x ≈ hi + lo`), 16 values at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn split_to_bf16(x: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    let whole = x.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        // SAFETY: 16 values at `i` in each slice (`hi` and `lo` are at least as long as `x`).
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr().add(i));
            let h = _mm512_cvtneps_pbh(v);
            let back = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(std::mem::transmute::<
                __m256bh,
                __m256i,
            >(h))));
            let l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, back));
            _mm256_storeu_si256(hi.as_mut_ptr().add(i) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(h));
            _mm256_storeu_si256(lo.as_mut_ptr().add(i) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(l));
        }
    }
    for i in whole..x.len() {
        (hi[i], lo[i]) = crate::tiles::split_bf16(x[i]);
    }
}

/// Attention of several query rows against one KV head in tiles: `out[i] = softmax(scale ·
/// K q[i]) · V` over positions `spans[i].0..spans[i].1` (see `crate::ops::attend_rows_ref`).
///
/// Scores are three bf16 tile products (`q_hi·k_hi + q_hi·k_lo + q_lo·k_hi`, f32 sums), then each
/// row's softmax in AVX-512, then the weights (bf16) times the values (bf16) in tiles.
///
/// # Safety
/// [`usable`] must have returned true. Shapes are asserted.
pub unsafe fn attend_tiles(
    out: &mut [f32],
    q: &[f32],
    spans: &[(usize, usize)],
    kv: &crate::tiles::KvPanels,
    scale: f32,
    s: &mut crate::tiles::AttnTileScratch,
) {
    let rows = spans.len();
    assert!(rows > 0 && q.len().is_multiple_of(rows) && out.len() == q.len());
    let hd = q.len() / rows;
    assert!(hd == kv.head_dim && hd.is_multiple_of(K_STEP), "tile attention head size");
    assert!(spans.iter().all(|&(first, end)| first < end), "every row attends to at least one position");
    let end = spans.iter().map(|x| x.1).max().unwrap_or(0);
    let base = spans.iter().map(|x| x.0).min().unwrap_or(0) / K_STEP * K_STEP;
    let kend = end.div_ceil(K_STEP) * K_STEP;
    assert!(kend <= kv.len, "positions past the panels");
    let nk = kend - base;
    let padded = rows.div_ceil(TILE_TOKENS) * TILE_TOKENS;
    s.q_hi.zeroed(padded * hd);
    s.q_lo.zeroed(padded * hd);
    s.weights.zeroed(padded * nk);
    s.scores.resize(padded * nk);
    s.out.resize(padded * hd);
    let (steps, dim_tiles) = (hd / K_STEP, hd / 16);
    // SAFETY: tile use was granted; every tile load and store below covers 16 rows of 64 bytes
    // inside the buffers sized above (rows `padded`, keys `base..kend` ⊆ the panels' `0..len`).
    unsafe {
        split_to_bf16(&q[..rows * hd], &mut s.q_hi, &mut s.q_lo);
        let cfg = TileConfig::uniform();
        load_config(&cfg, None);
        let (qh, ql) = (s.q_hi.as_ptr(), s.q_lo.as_ptr());
        let (kh, kl, v) = (kv.k_hi.as_ptr(), kv.k_lo.as_ptr(), kv.v.as_ptr());
        let (q_stride, b_stride, score_stride) = (hd * 2, 64usize, nk * 4);
        for c in base / 16..kend / 16 {
            for qi in 0..padded / TILE_TOKENS {
                tile_zero!(0);
                for st in 0..steps {
                    let a = qi * TILE_TOKENS * hd + st * K_STEP;
                    let b = (c * steps + st) * 16 * 32;
                    tile_load!(1, qh.add(a), q_stride);
                    tile_load!(2, kh.add(b), b_stride);
                    tile_dot!(0, 1, 2);
                    tile_load!(3, kl.add(b), b_stride);
                    tile_dot!(0, 1, 3);
                    tile_load!(4, ql.add(a), q_stride);
                    tile_dot!(0, 4, 2);
                }
                tile_store!(0, s.scores.as_mut_ptr().add(qi * TILE_TOKENS * nk + c * 16 - base), score_stride);
            }
        }
        for (r, &(first, last)) in spans.iter().enumerate() {
            let row = &mut s.scores[r * nk..(r + 1) * nk];
            for x in &mut row[first - base..last - base] {
                *x *= scale;
            }
            super::avx512_attention::softmax_span(row, first - base, last - base);
            round_to_bf16(&row[..nk / 16 * 16], &mut s.weights[r * nk..r * nk + nk / 16 * 16]);
        }
        let w = s.weights.as_ptr();
        let (w_stride, o_stride) = (nk * 2, hd * 4);
        for qi in 0..padded / TILE_TOKENS {
            for c0 in (0..dim_tiles).step_by(4) {
                let count = (dim_tiles - c0).min(4);
                tile_zero!(0);
                tile_zero!(1);
                tile_zero!(2);
                tile_zero!(3);
                for st in base / K_STEP..kend / K_STEP {
                    tile_load!(4, w.add(qi * TILE_TOKENS * nk + st * K_STEP - base), w_stride);
                    for c in 0..count {
                        tile_load!(5, v.add((st * dim_tiles + c0 + c) * 16 * 32), b_stride);
                        match c {
                            0 => tile_dot!(0, 4, 5),
                            1 => tile_dot!(1, 4, 5),
                            2 => tile_dot!(2, 4, 5),
                            _ => tile_dot!(3, 4, 5),
                        }
                    }
                }
                let o = s.out.as_mut_ptr().add(qi * TILE_TOKENS * hd + c0 * 16);
                tile_store!(0, o, o_stride);
                if count > 1 {
                    tile_store!(1, o.add(16), o_stride);
                }
                if count > 2 {
                    tile_store!(2, o.add(32), o_stride);
                }
                if count > 3 {
                    tile_store!(3, o.add(48), o_stride);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
    out.copy_from_slice(&s.out[..rows * hd]);
}

/// Whether this CPU also has int8 tile products (and this process may use tiles).
pub fn int8_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| usable() && __cpuid_count(7, 0).edx >> 25 & 1 == 1)
}

/// Fewest activation rows the int8 tiles take. Below, the VNNI kernel's eight dot products per
/// row and block cost less than a tile product with its store and reload of 16 × 16 sums.
pub const INT8_MIN_ROWS: usize = 5;

/// Tile shapes of [`dot_group_bytes`] for `rows` activation rows: C in tmm0–1 (`rows` × 16 i32),
/// the activations in tmm2–3 (`rows` × one block of 32 i8), the levels in tmm4–5 (8 rows of 16
/// columns × 4 u8: a block's eight level vectors as they are packed).
fn int8_config(rows: usize) -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1; // palette 1
    let shapes = [(64u16, rows), (64, rows), (32, rows), (32, rows), (64, 8), (64, 8)];
    for (t, (colsb, r)) in shapes.into_iter().enumerate() {
        c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
        c[48 + t] = r as u8;
    }
    TileConfig(c)
}

/// The packed tile of byte-level 32-element groups (the compact form of Q8_0 and the like) for
/// 1–16 activation rows whose quantized values lie `qs_stride` bytes apart.
///
/// One `tdpbsud` per block gives every row's 16 integer sums (the VNNI kernel needs eight dot
/// products per row for them); the sums go through memory to the VNNI kernel's per-block
/// scaling, operation for operation, so each row's result is bit for bit what
/// `avx512::dot_group_packed` gives it (tested): a sequence's logits do not depend on how many
/// others share its step. Block `b`'s sums are scaled while block `b + 1`'s product runs, and
/// the next group is prefetched into L2 as the VNNI kernel does for several rows.
///
/// # Safety
/// [`int8_usable`] must have returned true. `acts[t].qs` must start `t · qs_stride` bytes after
/// `acts[0].qs`. Shapes are asserted.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dot_group_bytes(
    w: &PackedGroup<'_>,
    form: Compact,
    acts: &[ActRow<'_>],
    qs_stride: usize,
    out: &mut [f32],
) {
    let n = acts.len();
    assert!((1..=GROUP).contains(&n) && out.len() >= GROUP * n, "int8 tile: {n} rows");
    assert!(w.width == LevelWidth::Byte && !form.plane, "int8 tile: byte levels only");
    // SAFETY: forwarded contract; the match only picks a monomorphized size.
    unsafe {
        match n {
            1..=8 => bytes_tile::<8>(w, form, acts, qs_stride, out),
            9..=12 => bytes_tile::<12>(w, form, acts, qs_stride, out),
            _ => bytes_tile::<16>(w, form, acts, qs_stride, out),
        }
    }
}

/// [`dot_group_bytes`] with room for `T` rows' accumulators.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn bytes_tile<const T: usize>(
    w: &PackedGroup<'_>,
    form: Compact,
    acts: &[ActRow<'_>],
    qs_stride: usize,
    out: &mut [f32],
) {
    let (n, nb, stride) = (acts.len(), w.blocks, w.block_stride());
    assert!(n <= T, "int8 tile: {n} rows for {T}");
    let scales_at = form.scales_at(w.width);
    assert!(w.data.len() >= nb * stride, "packed group too short");
    for (t, a) in acts.iter().enumerate() {
        assert!(a.qs.len() >= 32 * nb && a.d.len() >= nb && a.s.len() >= nb, "int8 tile: activation row short");
        let at = t.checked_mul(qs_stride).and_then(|o| o.checked_add(acts[0].qs.as_ptr() as usize));
        assert_eq!(Some(a.qs.as_ptr() as usize), at, "int8 tile: row stride");
    }
    #[repr(C, align(64))]
    struct Sums([[i32; GROUP * GROUP]; 2]);
    let mut sums = Sums([[0; GROUP * GROUP]; 2]);
    let (s0, s1) = (sums.0[0].as_mut_ptr(), sums.0[1].as_mut_ptr());
    let base = w.data.as_ptr();
    let qs = acts[0].qs.as_ptr();
    // The next group's lines, an equal share per block.
    let next_lines = (nb * stride).div_ceil(64).div_ceil(nb);
    let mut acc = [_mm512_setzero_ps(); T];
    // Adds block `b`'s sums, stored at `sums` by a finished tile, to the accumulators.
    let mut scale = |b: usize, sums: *const i32| {
        // SAFETY: b < nb (lengths asserted above); `sums` holds n rows of 16 sums.
        unsafe {
            let (d, m) = avx512::compact_scales(base.add(b * stride), form, scales_at);
            for t in 0..n {
                let isum = _mm512_load_si512(sums.add(t * GROUP) as *const _);
                acc[t] =
                    avx512::add_block(acc[t], isum, d, m, *acts[t].d.get_unchecked(b), *acts[t].s.get_unchecked(b));
            }
        }
    };
    // SAFETY: tile use was granted; each block's loads read `n` activation rows of 32 bytes
    // `qs_stride` apart and eight 64-byte level vectors inside the asserted lengths; each store
    // writes `n` rows of 64 bytes into `sums`. Prefetches may point past the group: harmless.
    unsafe {
        if INT8_ROWS.get() != Some(n) {
            load_config(&int8_config(n), Some(n));
        }
        macro_rules! product {
            ($c:literal, $a:literal, $w:literal, $b:expr, $dst:expr) => {{
                let b: usize = $b;
                super::prefetch_lines_l2(base.wrapping_add(nb * stride + b * next_lines * 64), next_lines);
                tile_load!($a, qs.add(32 * b), qs_stride);
                tile_load!($w, base.add(b * stride), 64usize);
                tile_zero!($c);
                asm!(concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $w), options(nostack, nomem));
                tile_store!($c, $dst, 64usize);
            }};
        }
        product!(0, 2, 4, 0, s0);
        let mut b = 1;
        while b < nb {
            product!(1, 3, 5, b, s1);
            scale(b - 1, s0);
            if b + 1 < nb {
                product!(0, 2, 4, b + 1, s0);
            }
            scale(b, s1);
            b += 2;
        }
        if nb % 2 == 1 {
            scale(nb - 1, s0);
        }
    }
    for (t, a) in acc.iter().enumerate().take(n) {
        // SAFETY: `out` holds GROUP floats per activation row (asserted on entry).
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(t * GROUP), *a) };
    }
}
