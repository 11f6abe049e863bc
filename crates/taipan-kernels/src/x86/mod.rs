//! x86-64 SIMD kernels. Each function here has a scalar twin in the portable modules that the
//! tests compare it against; callers reach them only through `crate::dispatch`.

pub mod amx;
pub mod avx2;
pub mod avx2_attention;
pub mod avx2_kquant;
pub mod avx512;
pub mod avx512_attention;
pub mod avx512_kquant;
