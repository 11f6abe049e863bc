//! The 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Every block decodes to integer levels `q` with one scale `d` and one offset `m`: `x = d·q + m`.
//! That common form is what the packed integer kernels consume (see `crate::packed`).

use super::f16_at;
use half::f16;

/// `x = (q − 8)·d`, 4-bit q.
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

/// `x = q·d + m`, 4-bit q.
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// `x = (q − 16)·d`, 5-bit q (high bits packed in `qh`).
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

/// `x = q·d + m`, 5-bit q.
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

/// `x = q·d`, signed 8-bit q.
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// One block's integer levels with its affine map `x = d·level + m`.
#[derive(Clone, Copy, Debug)]
pub struct Levels32 {
    pub level: [u8; 32],
    pub d: f32,
    pub m: f32,
}

fn nibbles(qs: &[u8], level: &mut [u8; 32]) {
    for j in 0..16 {
        level[j] = qs[j] & 0x0F;
        level[j + 16] = qs[j] >> 4;
    }
}

fn fifth_bits(qh: &[u8], level: &mut [u8; 32]) {
    let bits = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    for (j, l) in level.iter_mut().enumerate() {
        *l |= (((bits >> j) & 1) as u8) << 4;
    }
}

pub fn levels_q4_0(b: &[u8]) -> Levels32 {
    let d = f16_at(b);
    let mut level = [0u8; 32];
    nibbles(&b[2..18], &mut level);
    Levels32 { level, d, m: -8.0 * d }
}

pub fn levels_q4_1(b: &[u8]) -> Levels32 {
    let mut level = [0u8; 32];
    nibbles(&b[4..20], &mut level);
    Levels32 { level, d: f16_at(b), m: f16_at(&b[2..]) }
}

pub fn levels_q5_0(b: &[u8]) -> Levels32 {
    let d = f16_at(b);
    let mut level = [0u8; 32];
    nibbles(&b[6..22], &mut level);
    fifth_bits(&b[2..6], &mut level);
    Levels32 { level, d, m: -16.0 * d }
}

pub fn levels_q5_1(b: &[u8]) -> Levels32 {
    let mut level = [0u8; 32];
    nibbles(&b[8..24], &mut level);
    fifth_bits(&b[4..8], &mut level);
    Levels32 { level, d: f16_at(b), m: f16_at(&b[2..]) }
}

/// Q8_0 levels are offset by 128 so that they are unsigned like every other format's.
pub fn levels_q8_0(b: &[u8]) -> Levels32 {
    let d = f16_at(b);
    let mut level = [0u8; 32];
    for (l, &q) in level.iter_mut().zip(&b[2..34]) {
        *l = (q as i8 as i16 + 128) as u8;
    }
    Levels32 { level, d, m: -128.0 * d }
}

pub fn dequantize_q4_0(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b);
        for j in 0..16 {
            o[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
            o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_q4_1(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (f16_at(b), f16_at(&b[2..]));
        for j in 0..16 {
            o[j] = (b[4 + j] & 0x0F) as f32 * d + m;
            o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
        }
    }
}

pub fn dequantize_q5_0(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let l = levels_q5_0(b);
        for (x, &q) in o.iter_mut().zip(&l.level) {
            *x = (q as i32 - 16) as f32 * l.d;
        }
    }
}

pub fn dequantize_q5_1(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(24).zip(out.chunks_exact_mut(32)) {
        let l = levels_q5_1(b);
        for (x, &q) in o.iter_mut().zip(&l.level) {
            *x = q as f32 * l.d + l.m;
        }
    }
}

pub fn dequantize_q8_0(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b);
        for j in 0..32 {
            o[j] = (b[2 + j] as i8) as f32 * d;
        }
    }
}

/// Quantizes f32 values (a whole number of 32-blocks) to Q8_0 the way ggml's reference
/// quantizer does: `d = max|x| / 127`, `q = round(x / d)`, `d` stored as f16.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert!(x.len().is_multiple_of(32), "Q8_0 needs whole blocks of 32");
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}
