//! The 256-element "K" super-block formats: Q4_K, Q5_K, Q6_K.
//!
//! Q4_K and Q5_K hold eight 32-element sub-blocks with 6-bit scales and mins, so each sub-block
//! maps onto the same `x = d·level + m` form as the legacy formats. Q6_K has sixteen 16-element
//! sub-blocks and does not.

use super::f16_at;
use super::legacy::Levels32;
use half::f16;

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
