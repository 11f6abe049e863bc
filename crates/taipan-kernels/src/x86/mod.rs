//! x86-64 SIMD kernels. Each function here has a scalar twin in the portable modules that the
//! tests compare it against; callers reach them only through `crate::dispatch`.

pub mod amx;
pub mod avx2;
pub mod avx2_attention;
pub mod avx2_kquant;
pub mod avx512;
pub mod avx512_attention;
pub mod avx512_kquant;

/// Prefetches `count` lines from `at` into L2. The address may lie anywhere (past a matrix or a
/// state): a prefetch never faults.
#[inline(always)]
pub(crate) fn prefetch_lines_l2(at: *const u8, count: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    for line in 0..count {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<{ _MM_HINT_T1 }>(at.wrapping_add(line * 64) as *const i8) };
    }
}

/// Prefetches `floats` recurrent-state values from `at` into L2: the selective scans' next
/// channel blocks (for a prompt's first token only; its later tokens find them in L1).
#[inline(always)]
pub(crate) fn prefetch_state(at: *const f32, floats: usize) {
    prefetch_lines_l2(at as *const u8, (floats * 4).div_ceil(64));
}
