//! The 256-element "K" super-block formats: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
//!
//! Q4_K and Q5_K hold eight 32-element sub-blocks with 6-bit scales and mins; Q2_K, Q3_K and Q6_K
//! hold sixteen 16-element sub-blocks. Every one of them reads as integers with two per-super-block
//! floats, `x = d·sc·level − dmin·mn` per 16-element sub-block ([`KSuper`]), which is the form
//! the packed kernels compute with (`crate::kpacked`).

use super::f16_at;
use super::legacy::Levels32;
use half::f16;

/// `x = d·(sc & 15)·q − dmin·(sc >> 4)`, 2-bit q, sixteen 16-element sub-blocks.
#[repr(C)]
pub struct BlockQ2K {
    pub scales: [u8; 16],
    pub qs: [u8; 64],
    pub d: f16,
    pub dmin: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);

/// `x = d·(sc − 32)·(q − 4·(1 − h))`, 2-bit q plus a high bit `h`, 6-bit scales.
#[repr(C)]
pub struct BlockQ3K {
    pub hmask: [u8; 32],
    pub qs: [u8; 64],
    pub scales: [u8; 12],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);

#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

#[repr(C)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);

#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    pub d: f16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

/// Unpacks the `j`-th (0..8) 6-bit scale and min of a Q4_K/Q5_K `scales` array.
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// The eight 32-element sub-blocks of one Q4_K super-block.
pub fn levels_q4_k(b: &[u8]) -> [Levels32; 8] {
    let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
    let scales = &b[4..16];
    let qs = &b[16..144];
    std::array::from_fn(|sub| {
        let (sc, mn) = scale_min(sub, scales);
        let chunk = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let mut level = [0u8; 32];
        for (l, &q) in level.iter_mut().zip(chunk) {
            *l = if sub % 2 == 0 { q & 0x0F } else { q >> 4 };
        }
        Levels32 { level, d: d * sc as f32, m: -(dmin * mn as f32) }
    })
}

/// The eight 32-element sub-blocks of one Q5_K super-block.
pub fn levels_q5_k(b: &[u8]) -> [Levels32; 8] {
    let (d, dmin) = (f16_at(b), f16_at(&b[2..]));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    std::array::from_fn(|sub| {
        let (sc, mn) = scale_min(sub, scales);
        let chunk = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let mut level = [0u8; 32];
        for (l, (&q, &h)) in level.iter_mut().zip(chunk.iter().zip(qh)) {
            let low = if sub % 2 == 0 { q & 0x0F } else { q >> 4 };
            *l = low | (((h >> sub) & 1) << 4);
        }
        Levels32 { level, d: d * sc as f32, m: -(dmin * mn as f32) }
    })
}

pub fn dequantize_q4_k(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        for (sub, l) in levels_q4_k(b).iter().enumerate() {
            for j in 0..32 {
                o[32 * sub + j] = l.d * l.level[j] as f32 + l.m;
            }
        }
    }
}

pub fn dequantize_q5_k(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(176).zip(out.chunks_exact_mut(256)) {
        for (sub, l) in levels_q5_k(b).iter().enumerate() {
            for j in 0..32 {
                o[32 * sub + j] = l.d * l.level[j] as f32 + l.m;
            }
        }
    }
}

pub fn dequantize_q6_k(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = f16_at(&b[208..]);
        for half in 0..2 {
            let ql = &b[64 * half..];
            let qh = &b[128 + 32 * half..];
            let sc = &b[192 + 8 * half..];
            let y = &mut o[128 * half..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}

/// Element `e` (0..256) of a Q2_K or Q3_K super-block keeps its two low bits in byte
/// `32·(e / 128) + e % 32` of `qs`, at bit `2·((e % 128) / 32)`.
fn crumb(qs: &[u8], e: usize) -> u8 {
    (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3
}

/// The sixteen signed 6-bit scales of a Q3_K super-block (stored biased by 32).
fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        ((low | (high << 4)) as i8) - 32
    })
}

pub fn dequantize_q2_k(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(84).zip(out.chunks_exact_mut(256)) {
        let (scales, qs) = (&b[..16], &b[16..80]);
        let (d, dmin) = (f16_at(&b[80..]), f16_at(&b[82..]));
        for (e, y) in o.iter_mut().enumerate() {
            let sc = scales[e / 16];
            *y = d * (sc & 15) as f32 * crumb(qs, e) as f32 - dmin * (sc >> 4) as f32;
        }
    }
}

pub fn dequantize_q3_k(src: &[u8], out: &mut [f32]) {
    for (b, o) in src.chunks_exact(110).zip(out.chunks_exact_mut(256)) {
        let (hmask, qs) = (&b[..32], &b[32..96]);
        let scales = q3_k_scales(&b[96..108]);
        let d = f16_at(&b[108..]);
        for (e, y) in o.iter_mut().enumerate() {
            let high = (hmask[e % 32] >> (e / 32)) & 1;
            let q = crumb(qs, e) as i32 - if high == 1 { 0 } else { 4 };
            *y = d * scales[e / 16] as f32 * q as f32;
        }
    }
}

/// One K super-block as integers: `x[e] = d·sc[e/16]·level[e] − dmin·mn[e/16]`.
///
/// Formats without mins (Q3_K, Q6_K) store signed levels; here they are shifted to be unsigned,
/// `level = q + bias`, which makes `mn = bias·sc` and `dmin = d` (see [`KSuper::bias`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KSuper {
    pub level: [u8; 256],
    pub sc: [i8; 16],
    /// The mins as stored (formats with mins); `bias·sc` otherwise.
    pub mn: [i16; 16],
    pub d: f32,
    pub dmin: f32,
    /// For formats without mins, the shift that made the levels unsigned.
    pub bias: Option<u8>,
}

impl KSuper {
    /// The element `e` this form describes (the dequantizers are the specification).
    pub fn value(&self, e: usize) -> f32 {
        let s = e / 16;
        self.d * (self.sc[s] as i32 * self.level[e] as i32) as f32 - self.dmin * self.mn[s] as f32
    }

    fn with_bias(level: [u8; 256], sc: [i8; 16], d: f32, bias: u8) -> KSuper {
        let mn = std::array::from_fn(|s| bias as i16 * sc[s] as i16);
        KSuper { level, sc, mn, d, dmin: d, bias: Some(bias) }
    }
}

pub fn super_q2_k(b: &[u8]) -> KSuper {
    let (scales, qs) = (&b[..16], &b[16..80]);
    KSuper {
        level: std::array::from_fn(|e| crumb(qs, e)),
        sc: std::array::from_fn(|s| (scales[s] & 15) as i8),
        mn: std::array::from_fn(|s| (scales[s] >> 4) as i16),
        d: f16_at(&b[80..]),
        dmin: f16_at(&b[82..]),
        bias: None,
    }
}

pub fn super_q3_k(b: &[u8]) -> KSuper {
    let (hmask, qs) = (&b[..32], &b[32..96]);
    let level = std::array::from_fn(|e| crumb(qs, e) | (((hmask[e % 32] >> (e / 32)) & 1) << 2));
    KSuper::with_bias(level, q3_k_scales(&b[96..108]), f16_at(&b[108..]), 4)
}

fn super_from_32(subs: [Levels32; 8], d: f32, dmin: f32, scales: &[u8]) -> KSuper {
    let mut level = [0u8; 256];
    for (s, l) in subs.iter().enumerate() {
        level[32 * s..32 * s + 32].copy_from_slice(&l.level);
    }
    KSuper {
        level,
        sc: std::array::from_fn(|s| scale_min(s / 2, scales).0 as i8),
        mn: std::array::from_fn(|s| scale_min(s / 2, scales).1 as i16),
        d,
        dmin,
        bias: None,
    }
}

pub fn super_q4_k(b: &[u8]) -> KSuper {
    super_from_32(levels_q4_k(b), f16_at(b), f16_at(&b[2..]), &b[4..16])
}

pub fn super_q5_k(b: &[u8]) -> KSuper {
    super_from_32(levels_q5_k(b), f16_at(b), f16_at(&b[2..]), &b[4..16])
}

pub fn super_q6_k(b: &[u8]) -> KSuper {
    let mut level = [0u8; 256];
    for half in 0..2 {
        let (ql, qh) = (&b[64 * half..64 * half + 64], &b[128 + 32 * half..128 + 32 * half + 32]);
        for l in 0..32 {
            for quarter in 0..4 {
                let low = if quarter < 2 { ql[l + 32 * (quarter % 2)] & 15 } else { ql[l + 32 * (quarter % 2)] >> 4 };
                let high = (qh[l] >> (2 * quarter)) & 3;
                level[128 * half + 32 * quarter + l] = low | (high << 4);
            }
        }
    }
    let sc = std::array::from_fn(|s| b[192 + s] as i8);
    KSuper::with_bias(level, sc, f16_at(&b[208..]), 32)
}
