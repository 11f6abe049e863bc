//! GGML block formats: the tensor element types GGUF files store, with a scalar dequantizer each.
//!
//! Each format lives in its own module with its `#[repr(C)]` block and a compile-time size check.
//! These dequantizers are the specification every faster path is tested against.

pub mod kquants;
pub mod legacy;

use half::{bf16, f16};

/// Tensor element type, numbered as in ggml (`ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl DType {
    /// Maps a ggml type id to a supported type; `None` for ids we cannot compute with.
    pub fn from_ggml_id(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            6 => DType::Q5_0,
            7 => DType::Q5_1,
            8 => DType::Q8_0,
            10 => DType::Q2K,
            11 => DType::Q3K,
            12 => DType::Q4K,
            13 => DType::Q5K,
            14 => DType::Q6K,
            30 => DType::BF16,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q2K => 10,
            DType::Q3K => 11,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::BF16 => 30,
        }
    }

    /// Number of elements in one block.
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => 256,
        }
    }

    /// Number of bytes in one block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => std::mem::size_of::<legacy::BlockQ4_0>(),
            DType::Q4_1 => std::mem::size_of::<legacy::BlockQ4_1>(),
            DType::Q5_0 => std::mem::size_of::<legacy::BlockQ5_0>(),
            DType::Q5_1 => std::mem::size_of::<legacy::BlockQ5_1>(),
            DType::Q8_0 => std::mem::size_of::<legacy::BlockQ8_0>(),
            DType::Q2K => std::mem::size_of::<kquants::BlockQ2K>(),
            DType::Q3K => std::mem::size_of::<kquants::BlockQ3K>(),
            DType::Q4K => std::mem::size_of::<kquants::BlockQ4K>(),
            DType::Q5K => std::mem::size_of::<kquants::BlockQ5K>(),
            DType::Q6K => std::mem::size_of::<kquants::BlockQ6K>(),
        }
    }

    /// Bytes taken by `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Whether the format is one of the 256-element K super-block formats.
    pub fn is_k_quant(self) -> bool {
        matches!(self, DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K)
    }

    /// Name as llama.cpp prints it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q2K => "Q2_K",
            DType::Q3K => "Q3_K",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for a byte slice that does not hold whole blocks of the expected size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{dtype}: {bytes} bytes cannot hold {elems} elements")]
pub struct SizeMismatch {
    pub dtype: DType,
    pub bytes: usize,
    pub elems: usize,
}

/// Dequantizes `out.len()` elements stored as `dtype` in `src` into f32.
pub fn dequantize(dtype: DType, src: &[u8], out: &mut [f32]) -> Result<(), SizeMismatch> {
    let mismatch = SizeMismatch { dtype, bytes: src.len(), elems: out.len() };
    match dtype.row_bytes(out.len()) {
        Some(n) if n == src.len() => {}
        _ => return Err(mismatch),
    }
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q4_0 => legacy::dequantize_q4_0(src, out),
        DType::Q4_1 => legacy::dequantize_q4_1(src, out),
        DType::Q5_0 => legacy::dequantize_q5_0(src, out),
        DType::Q5_1 => legacy::dequantize_q5_1(src, out),
        DType::Q8_0 => legacy::dequantize_q8_0(src, out),
        DType::Q2K => kquants::dequantize_q2_k(src, out),
        DType::Q3K => kquants::dequantize_q3_k(src, out),
        DType::Q4K => kquants::dequantize_q4_k(src, out),
        DType::Q5K => kquants::dequantize_q5_k(src, out),
        DType::Q6K => kquants::dequantize_q6_k(src, out),
    }
    Ok(())
}

/// Reference dot product of one stored row with f32 activations (dequantize, then multiply).
pub fn dot_ref(dtype: DType, row: &[u8], x: &[f32]) -> Result<f32, SizeMismatch> {
    let mut tmp = vec![0f32; x.len()];
    dequantize(dtype, row, &mut tmp)?;
    Ok(tmp.iter().zip(x).map(|(a, b)| a * b).sum())
}

/// Reads a little-endian f16 at `bytes[0..2]` as f32.
#[inline]
pub(crate) fn f16_at(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}
