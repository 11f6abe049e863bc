//! x86-64 SIMD kernels. Each function here has a scalar twin in the portable modules that the
//! tests compare it against; callers reach them only through `crate::dispatch`.

pub mod amx;
pub mod avx2;
pub mod avx2_attention;
pub mod avx2_kquant;
pub mod avx512;
pub mod avx512_attention;
pub mod avx512_kquant;

/// Prefetches `floats` recurrent-state values from `at` into L2: the selective scans' next
/// channel blocks (for a prompt's first token only; its later tokens find them in L1). The
/// address may lie past the state.
#[inline(always)]
pub(crate) fn prefetch_state(at: *const f32, floats: usize) {
    for line in 0..(floats * 4).div_ceil(64) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                (at as *const i8).wrapping_add(64 * line),
            )
        };
    }
}
