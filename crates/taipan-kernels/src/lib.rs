//! CPU compute kernels for taipan.
//!
//! This crate owns the numeric side of inference and knows nothing about models: GGML block
//! formats and their dequantizers ([`formats`]), weights repacked once at load for integer dot
//! products ([`packed`]) against 8-bit activations ([`quant`]), the matrix products built on them
//! ([`matmul`]), norms, RoPE and attention ([`ops`]), and the compute thread pool ([`pool`]).
//!
//! The shaping decision: every SIMD kernel has a plain scalar twin that is its specification, and
//! one table ([`dispatch::Kernels`]) picks the variant at run time from CPU features, so one
//! portable binary is fast on AVX-512 and AVX2 machines alike and tests compare every variant the
//! CPU has against the scalar one.

pub mod dispatch;
pub mod formats;
pub mod huge;
pub mod kpacked;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod pool;
pub mod quant;
pub mod ssm;
pub mod tiles;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use dispatch::{Isa, Kernels};
pub use formats::DType;
pub use matmul::{Compute, DenseMatrix, MatmulMode, MatmulScratch, Matrix, RowsProduct};
pub use pool::ThreadPool;
