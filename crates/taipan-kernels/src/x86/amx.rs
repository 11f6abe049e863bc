//! Intel AMX int8 tiles: packed groups against 16 activation rows at a time.
//!
//! One tile product multiplies a block's 32 columns of 16 activation rows by the same columns of
//! a group's 16 weight rows: the work of 128 VNNI instructions. Its integer sums are exact, and
//! each block's sums are then scaled and accumulated by the same AVX-512 instructions, in the same
//! order, as the VNNI kernels (`crate::x86::avx512`, `crate::x86::avx512_kquant`). So the two give
//! bit-identical results: which of them computes a row (that depends on how many rows share a
//! call) never changes an answer, and a sequence batched with others still equals itself alone.
//!
//! Operands (`TDPBSUD`: signed left, unsigned right): the activation rows' i8 values as they lie
//! (16 rows × 32 bytes of one block), against the group's unsigned levels in the packed layout,
//! whose 64-byte vector `k` holds 4 columns of each of the 16 rows — exactly the right operand's
//! row `k`. The output tile's row `t` is activation row `t` against the 16 weight rows, one per
//! i32 lane, as the VNNI kernels' accumulators are.
//!
//! Rust's AMX intrinsics are not stable, so the tile instructions are inline assembly. Linux
//! hands out the tile-data register state only on request ([`usable`] asks once per process).

use super::avx512_kquant::shift16;
use crate::kpacked::{KLayout, BLOCKS_PER_SUPER};
use crate::packed::{ActRow, Compact, Layout, LevelWidth, PackedGroup, GROUP};
use crate::quant::QBLOCK;
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Activation rows per tile.
pub const TILE_ROWS: usize = 16;

/// Whether this CPU has AMX int8 tiles (with AVX-512 F/BW/VNNI for the rest of the work) and
/// this process may use them. Asks Linux for the tile-data state on the first call.
pub fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| cpu_has_amx_int8() && request_tile_state())
}

fn cpu_has_amx_int8() -> bool {
    let leaf7 = __cpuid_count(7, 0);
    let (amx_tile, amx_int8) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 25 & 1 == 1);
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && amx_tile
        && amx_int8
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

macro_rules! tile {
    (load $tmm:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $tmm, ", [{p} + {s}*1]"), p = in(reg) $ptr, s = in(reg) $stride,
             options(nostack, readonly))
    };
    (store $tmm:literal, $ptr:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $tmm), p = in(reg) $ptr, s = in(reg) 64usize,
             options(nostack))
    };
    (dot $c:literal, $a:literal, $b:literal) => {
        asm!(concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack, nomem))
    };
    (zero $c:literal) => {
        asm!(concat!("tilezero tmm", $c), options(nostack, nomem))
    };
}

/// Tile shapes: tmm0–3 hold sums (16 rows × 16 i32), tmm4–5 activation rows (16 rows of
/// `a_bytes`), tmm6–7 levels (`a_bytes / 4` rows of 64 bytes). Two of each operand let the next
/// product's loads go ahead while the last product still reads its own.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(a_bytes: u16) -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            let (bytes, rows) = match t {
                0..=3 => (64, 16),
                4 | 5 => (a_bytes, 16),
                _ => (64, (a_bytes / 4) as u8),
            };
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&bytes.to_le_bytes());
            c[48 + t] = rows;
        }
        TileConfig(c)
    }

    /// Configures this thread's tiles, unless they already are (the configuration stays
    /// between calls: loading it again, and releasing the tiles after each call, cost more than
    /// a small product).
    ///
    /// # Safety
    /// Tile use must have been granted ([`usable`]).
    unsafe fn load(&self) {
        let a_bytes = u16::from_le_bytes([self.0[16 + 8], self.0[17 + 8]]);
        if CONFIGURED.get() != a_bytes {
            // SAFETY: a valid palette-1 configuration; forwarded contract.
            unsafe { asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly)) };
            CONFIGURED.set(a_bytes);
        }
    }
}

/// Zeroes sum tile `c`, loads activation rows and levels into operand pair `c % 2`, and adds
/// their product to the sums.
///
/// # Safety
/// Tiles configured; 16 rows of the configured width at `a` (stride `a_stride`) and the levels
/// at `b` (64-byte rows).
#[inline(always)]
unsafe fn product(c: usize, a: *const i8, a_stride: usize, b: *const u8) {
    // SAFETY: forwarded contract.
    unsafe {
        match c {
            0 => {
                tile!(zero 0);
                tile!(load 4, a, a_stride);
                tile!(load 6, b, 64usize);
                tile!(dot 0, 4, 6);
            }
            1 => {
                tile!(zero 1);
                tile!(load 5, a, a_stride);
                tile!(load 7, b, 64usize);
                tile!(dot 1, 5, 7);
            }
            2 => {
                tile!(zero 2);
                tile!(load 4, a, a_stride);
                tile!(load 6, b, 64usize);
                tile!(dot 2, 4, 6);
            }
            _ => {
                tile!(zero 3);
                tile!(load 5, a, a_stride);
                tile!(load 7, b, 64usize);
                tile!(dot 3, 5, 7);
            }
        }
    }
}

/// Stores sum tiles `0..count` to `sums`.
///
/// # Safety
/// Tiles configured and holding sums.
#[inline(always)]
unsafe fn store_sums(count: usize, sums: &mut [Sums; 4]) {
    // SAFETY: each store writes 16 rows of 64 bytes into its own 1 KiB buffer.
    unsafe {
        tile!(store 0, sums[0].0.as_mut_ptr());
        if count > 1 {
            tile!(store 1, sums[1].0.as_mut_ptr());
        }
        if count > 2 {
            tile!(store 2, sums[2].0.as_mut_ptr());
        }
        if count > 3 {
            tile!(store 3, sums[3].0.as_mut_ptr());
        }
    }
}

/// One output tile as stored: 16 rows of 16 i32.
#[repr(C, align(64))]
struct Sums([i32; TILE_ROWS * GROUP]);

thread_local! {
    /// The activation tile width this thread's tiles are configured for (0: not configured).
    static CONFIGURED: std::cell::Cell<u16> = const { std::cell::Cell::new(0) };
    /// A thread's unpacked levels of one group (512 bytes per block) and, for activation rows
    /// that do not lie at one stride, their values gathered.
    static SCRATCH: RefCell<(Vec<u8>, Vec<i8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Packed group × a multiple of 16 activation rows: `out[t * GROUP + r] = row r · acts[t]`,
/// bit-identical to the AVX-512 VNNI kernels.
///
/// # Safety
/// [`usable`] must have returned true. Shapes are asserted.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn dot_group_packed(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
    let nb = w.blocks;
    assert!(!acts.is_empty() && acts.len().is_multiple_of(TILE_ROWS), "whole tiles of activation rows");
    assert!(out.len() >= GROUP * acts.len());
    for a in acts {
        assert!(a.qs.len() >= QBLOCK * nb && a.d.len() >= nb && a.s.len() >= nb, "activation row too short");
    }
    SCRATCH.with_borrow_mut(|(levels, gathered)| {
        levels.resize(nb * 512, 0);
        // SAFETY: lengths asserted here and in the layout readers; tile use was granted.
        unsafe {
            match w.layout {
                Layout::K(k) => {
                    assert!(nb.is_multiple_of(BLOCKS_PER_SUPER), "K rows are whole super-blocks");
                    assert!(w.data.len() >= nb / BLOCKS_PER_SUPER * k.super_bytes(), "packed group too short");
                    for a in acts {
                        assert!(a.hs.len() >= nb, "K-quant products need the activations' half sums");
                    }
                    match (k.high_planes, k.has_mins()) {
                        (0, true) => unpack_k::<0>(w, &k, levels),
                        (0, false) => unpack_k::<0>(w, &k, levels),
                        (1, true) => unpack_k::<1>(w, &k, levels),
                        (2, false) => unpack_k::<2>(w, &k, levels),
                        other => panic!("no AMX kernel for K layout {other:?}"),
                    }
                    TileConfig::new(16).load();
                    for (i, tile) in acts.chunks_exact(TILE_ROWS).enumerate() {
                        let (rows, stride) = tile_rows(tile, nb, gathered);
                        let out = &mut out[i * TILE_ROWS * GROUP..(i + 1) * TILE_ROWS * GROUP];
                        if k.has_mins() {
                            k_tile::<true>(w, &k, tile, rows, stride, levels, out);
                        } else {
                            k_tile::<false>(w, &k, tile, rows, stride, levels, out);
                        }
                    }
                }
                Layout::Wide | Layout::Compact(_) => {
                    assert!(w.data.len() >= nb * w.block_stride(), "packed group too short");
                    unpack_legacy(w, levels);
                    TileConfig::new(32).load();
                    for (i, tile) in acts.chunks_exact(TILE_ROWS).enumerate() {
                        let (rows, stride) = tile_rows(tile, nb, gathered);
                        let out = &mut out[i * TILE_ROWS * GROUP..(i + 1) * TILE_ROWS * GROUP];
                        legacy_tile(w, tile, rows, stride, levels, out);
                    }
                }
            }
        }
    });
}

/// Prefetches bytes `at..at + len` of each of the 16 activation rows: a tile load of rows that
/// lie in L2 waits for each of its 16 lines in turn, so the next products' lines are asked for
/// ahead. Addresses past the rows are harmless to a prefetch.
#[inline(always)]
fn prefetch_rows(rows: *const i8, stride: usize, at: usize, len: usize) {
    for r in 0..TILE_ROWS {
        let mut off = 0;
        while off < len {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(rows.wrapping_add(r * stride + at + off)) };
            off += 64;
        }
    }
}

/// The 16 activation rows of a tile as one base pointer and byte stride: where they lie, when
/// they are evenly spaced (consecutive rows of one quantization); else gathered into `buf`.
fn tile_rows(tile: &[ActRow<'_>], nb: usize, buf: &mut Vec<i8>) -> (*const i8, usize) {
    let first = tile[0].qs.as_ptr();
    let stride = (tile[1].qs.as_ptr() as usize).wrapping_sub(first as usize);
    let even = (stride as isize) > 0
        && tile.iter().enumerate().all(|(t, a)| a.qs.as_ptr() as usize == (first as usize).wrapping_add(t * stride));
    if even {
        return (first, stride);
    }
    let len = QBLOCK * nb;
    buf.clear();
    for a in tile {
        buf.extend_from_slice(&a.qs[..len]);
    }
    (buf.as_ptr(), len)
}

/// Stores the 8 level vectors of every block (the tiles' right operands) at 512 bytes a block.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_legacy(w: &PackedGroup<'_>, levels: &mut [u8]) {
    let lvl = w.width.block_level_bytes();
    let stride = w.block_stride();
    let plane = matches!(w.layout, Layout::Compact(Compact { plane: true, .. }));
    let low4 = _mm512_set1_epi8(0x0F);
    let bit4 = _mm512_set1_epi8(0x10);
    for b in 0..w.blocks {
        // SAFETY: the caller asserted the group holds `blocks` blocks and `levels` 512 bytes each.
        unsafe {
            let blk = w.data.as_ptr().add(b * stride);
            let dst = levels.as_mut_ptr().add(b * 512);
            match w.width {
                LevelWidth::Byte => std::ptr::copy_nonoverlapping(blk, dst, 512),
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
                        _mm512_storeu_si512(dst.add(64 * k) as *mut _, lo);
                        _mm512_storeu_si512(dst.add(64 * (4 + k)) as *mut _, hi);
                    }
                }
            }
        }
    }
}

/// As [`unpack_legacy`] for the K layouts (levels only; scales stay in the group).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_k<const PLANES: usize>(w: &PackedGroup<'_>, k: &KLayout, levels: &mut [u8]) {
    let low4 = _mm512_set1_epi8(0x0F);
    let plane_mask = _mm512_set1_epi8(if PLANES == 2 { 0x30 } else { 0x10 });
    for b in 0..w.blocks {
        // SAFETY: the caller asserted the group's super-blocks and `levels` 512 bytes per block.
        unsafe {
            let blk = w.data.as_ptr().add(
                (b / BLOCKS_PER_SUPER) * k.super_bytes() + k.header_bytes() + (b % BLOCKS_PER_SUPER) * k.block_bytes(),
            );
            let dst = levels.as_mut_ptr().add(b * 512);
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
            for vk in 0..4 {
                let raw = _mm512_loadu_si512(blk.add(64 * vk) as *const _);
                let mut lo = _mm512_and_si512(raw, low4);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4);
                if PLANES == 1 {
                    lo = _mm512_or_si512(lo, _mm512_and_si512(shift16(plane0, 4 - vk as i32), plane_mask));
                    hi = _mm512_or_si512(hi, _mm512_and_si512(shift16(plane0, -(vk as i32)), plane_mask));
                } else if PLANES == 2 {
                    let by = 4 - 2 * vk as i32;
                    lo = _mm512_or_si512(lo, _mm512_and_si512(shift16(plane0, by), plane_mask));
                    hi = _mm512_or_si512(hi, _mm512_and_si512(shift16(plane1, by), plane_mask));
                }
                _mm512_storeu_si512(dst.add(64 * vk) as *mut _, lo);
                _mm512_storeu_si512(dst.add(64 * (4 + vk)) as *mut _, hi);
            }
        }
    }
}

/// One tile of 16 activation rows against a legacy group; the scaling repeats
/// `avx512::group_tile`'s instruction for instruction.
///
/// # Safety
/// Tiles configured; `rows` holds 16 rows at `stride` of `32·blocks` values; `levels` unpacked.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn legacy_tile(
    w: &PackedGroup<'_>,
    acts: &[ActRow<'_>],
    rows: *const i8,
    stride: usize,
    levels: &[u8],
    out: &mut [f32],
) {
    let lvl = w.width.block_level_bytes();
    let block_stride = w.block_stride();
    let compact = match w.layout {
        Layout::Compact(c) => Some(c),
        _ => None,
    };
    let mut sums = [[const { Sums([0; TILE_ROWS * GROUP]) }; 4], [const { Sums([0; TILE_ROWS * GROUP]) }; 4]];
    let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
    let nb = w.blocks;
    // Blocks go in fours, one sum tile each, and the tile unit runs a step ahead: while the
    // vector unit scales the sums of one four (stored a step earlier, so that no load waits on a
    // tile store), the tile unit multiplies the next.
    let issue = |b0: usize| {
        for (c, b) in (b0..(b0 + 4).min(nb)).enumerate() {
            // SAFETY: the caller's contract: rows and levels hold every block.
            unsafe { product(c, rows.add(QBLOCK * b), stride, levels.as_ptr().add(512 * b)) };
        }
        prefetch_rows(rows, stride, QBLOCK * (b0 + 4), 2 * QBLOCK);
    };
    let scale_four = |b0: usize, sums: &[Sums; 4], acc: &mut [__m512; TILE_ROWS]| {
        let count = (nb - b0).min(4);
        // SAFETY: the caller's contract; every read is inside the group or the activation rows.
        unsafe {
            let mut scales = [(_mm512_setzero_ps(), _mm512_setzero_ps()); 4];
            for (j, sc) in scales.iter_mut().enumerate().take(count) {
                let blk = w.data.as_ptr().add((b0 + j) * block_stride);
                *sc = match compact {
                    None => {
                        (_mm512_loadu_ps(blk.add(lvl) as *const f32), _mm512_loadu_ps(blk.add(lvl + 64) as *const f32))
                    }
                    Some(c) => {
                        let at = c.scales_at(w.width);
                        let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(at) as *const __m256i));
                        let m = if c.stored_m {
                            _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(at + 2 * GROUP) as *const __m256i))
                        } else {
                            _mm512_mul_ps(d, _mm512_set1_ps(-(c.bias as f32)))
                        };
                        (d, m)
                    }
                };
            }
            // Block by block, each block's 16 rows side by side: their accumulations are
            // independent, so the FMAs' latency overlaps.
            for (j, &(d, m)) in scales.iter().enumerate().take(count) {
                for (t, a) in acc.iter_mut().enumerate() {
                    let isum = _mm512_load_si512(sums[j].0.as_ptr().add(t * GROUP) as *const _);
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*acts[t].d.get_unchecked(b0 + j)));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *a);
                    *a = _mm512_fmadd_ps(m, _mm512_set1_ps(*acts[t].s.get_unchecked(b0 + j)), *a);
                }
            }
        }
    };
    issue(0);
    let steps = nb.div_ceil(4);
    for step in 0..steps {
        let b0 = 4 * step;
        // SAFETY: the caller's contract (tiles configured and holding this step's sums).
        unsafe { store_sums((nb - b0).min(4), &mut sums[step % 2]) };
        if b0 + 4 < nb {
            issue(b0 + 4);
        }
        if step > 0 {
            scale_four(b0 - 4, &sums[(step - 1) % 2], &mut acc);
        }
    }
    scale_four(4 * (steps - 1), &sums[(steps - 1) % 2], &mut acc);
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: `out` holds GROUP floats per activation row of the tile.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(t * GROUP), *a) };
    }
}

/// One tile of 16 activation rows against a K group: each block's two 16-column halves are
/// summed apart (they have scales of their own); the scaling repeats `avx512_kquant::k_tile`'s.
///
/// # Safety
/// As [`legacy_tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn k_tile<const MINS: bool>(
    w: &PackedGroup<'_>,
    k: &KLayout,
    acts: &[ActRow<'_>],
    rows: *const i8,
    stride: usize,
    levels: &[u8],
    out: &mut [f32],
) {
    let (header, block_bytes, super_bytes) = (k.header_bytes(), k.block_bytes(), k.super_bytes());
    let (scales_at, mins_at) = (k.scales_at(), k.mins_at());
    let bias = _mm512_set1_epi16(k.bias.unwrap_or(0) as i16);
    let mut sums = [const { Sums([0; TILE_ROWS * GROUP]) }; 4];
    let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
    let nb = w.blocks;
    // Blocks go in pairs, each half of a block one sum tile: the tile unit multiplies the next
    // pair while the vector unit scales the last.
    let issue = |b0: usize| {
        prefetch_rows(rows, stride, QBLOCK * (b0 + 2), QBLOCK);
        for (j, b) in (b0..(b0 + 2).min(nb)).enumerate() {
            for h in 0..2 {
                let (a, l) = (QBLOCK * b + 16 * h, 512 * b + 256 * h);
                // SAFETY: the caller's contract: rows and levels hold every block.
                unsafe { product(2 * j + h, rows.add(a), stride, levels.as_ptr().add(l)) };
            }
        }
    };
    issue(0);
    for b0 in (0..nb).step_by(2) {
        let count = (nb - b0).min(2);
        // SAFETY: the caller's contract; every read is inside the group, the rows or `levels`.
        unsafe {
            store_sums(2 * count, &mut sums);
            if b0 + 2 < nb {
                issue(b0 + 2);
            }
            for j in 0..count {
                let b = b0 + j;
                let (s, bi) = (b / BLOCKS_PER_SUPER, b % BLOCKS_PER_SUPER);
                let sb = w.data.as_ptr().add(s * super_bytes);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(sb as *const __m256i));
                let dmin =
                    if MINS { _mm512_cvtph_ps(_mm256_loadu_si256(sb.add(2 * GROUP) as *const __m256i)) } else { d };
                let blk = sb.add(header + bi * block_bytes);
                let pairs = _mm512_cvtepi8_epi16(_mm256_loadu_si256(blk.add(scales_at) as *const __m256i));
                let sc_lo = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(pairs));
                let sc_hi = _mm512_srai_epi32::<16>(pairs);
                let mins = if MINS {
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk.add(mins_at) as *const __m256i))
                } else {
                    _mm512_mullo_epi16(pairs, bias)
                };
                let (lo_sums, hi_sums) = (&sums[2 * j], &sums[2 * j + 1]);
                for (t, a) in acc.iter_mut().enumerate() {
                    let lo = _mm512_load_si512(lo_sums.0.as_ptr().add(t * GROUP) as *const _);
                    let hi = _mm512_load_si512(hi_sums.0.as_ptr().add(t * GROUP) as *const _);
                    let scaled = _mm512_add_epi32(_mm512_mullo_epi32(lo, sc_lo), _mm512_mullo_epi32(hi, sc_hi));
                    let min_sum = _mm512_madd_epi16(mins, _mm512_set1_epi32(*acts[t].hs.get_unchecked(b) as i32));
                    let da = _mm512_set1_ps(*acts[t].d.get_unchecked(b));
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
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: `out` holds GROUP floats per activation row of the tile.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(t * GROUP), *a) };
    }
}
