//! Every SIMD kernel against its scalar reference, and every format's decoders against each other.

use half::f16;
use proptest::prelude::*;
use taipan_kernels::formats::{dequantize, dot_ref, kquants, legacy, DType};
use taipan_kernels::huge::WeightArena;
use taipan_kernels::packed::{dot_packed_ref, ActRow, LegacyForm, PackedMatrix, GROUP};
use taipan_kernels::quant::QuantizedActs;
use taipan_kernels::{tiles, Compute, Isa, Kernels, MatmulMode, MatmulScratch, Matrix, RowsProduct};

const ALL: [DType; 13] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q2K,
    DType::Q3K,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
];

const FORMS: [LegacyForm; 2] = [LegacyForm::Wide, LegacyForm::Compact];

const K_QUANTS: [DType; 5] = [DType::Q2K, DType::Q3K, DType::Q4K, DType::Q5K, DType::Q6K];

/// A small deterministic generator so that failures reproduce from the proptest seed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
}

fn put_f16(b: &mut [u8], v: f32) {
    b[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Random blocks of `dtype` for `n` elements, with finite, moderate scales.
fn random_stored(dtype: DType, n: usize, rng: &mut Lcg) -> Vec<u8> {
    let bytes = dtype.row_bytes(n).expect("whole blocks");
    let mut data: Vec<u8> = (0..bytes).map(|_| rng.byte()).collect();
    let bb = dtype.block_bytes();
    for block in data.chunks_exact_mut(bb) {
        match dtype {
            DType::F32 => block.copy_from_slice(&rng.unit().to_le_bytes()),
            DType::F16 => put_f16(block, rng.unit()),
            DType::BF16 => block.copy_from_slice(&half::bf16::from_f32(rng.unit()).to_le_bytes()),
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => put_f16(block, rng.unit() * 0.1),
            DType::Q4_1 | DType::Q5_1 => {
                put_f16(block, rng.unit() * 0.1);
                put_f16(&mut block[2..], rng.unit());
            }
            DType::Q4K | DType::Q5K => {
                put_f16(block, rng.unit() * 0.01);
                put_f16(&mut block[2..], rng.unit() * 0.01);
            }
            DType::Q6K => put_f16(&mut block[208..], rng.unit() * 0.01),
            DType::Q2K => {
                put_f16(&mut block[80..], rng.unit() * 0.01);
                put_f16(&mut block[82..], rng.unit() * 0.01);
            }
            DType::Q3K => put_f16(&mut block[108..], rng.unit() * 0.01),
        }
    }
    data
}

#[test]
fn q4_0_known_values() {
    let mut b = vec![0u8; 18];
    put_f16(&mut b, 0.5);
    b[2] = 0x9F; // element 0: 15 → 3.5; element 16: 9 → 0.5
    let mut out = vec![0f32; 32];
    dequantize(DType::Q4_0, &b, &mut out).unwrap();
    assert_eq!(out[0], 3.5);
    assert_eq!(out[16], 0.5);
    assert_eq!(out[1], -4.0);
}

#[test]
fn q8_0_and_q5_1_known_values() {
    let mut b = vec![0u8; 34];
    put_f16(&mut b, 0.25);
    b[2] = (-128i8) as u8;
    b[33] = 127;
    let mut out = vec![0f32; 32];
    dequantize(DType::Q8_0, &b, &mut out).unwrap();
    assert_eq!((out[0], out[31], out[5]), (-32.0, 31.75, 0.0));

    let mut b = vec![0u8; 24];
    put_f16(&mut b, 2.0);
    put_f16(&mut b[2..], -1.0);
    b[4..8].copy_from_slice(&(1u32 | 1 << 17).to_le_bytes()); // fifth bit of elements 0 and 17
    b[8] = 0x03; // element 0 low nibble 3 → 19; element 16 high nibble 0
    b[9] = 0x20; // element 17 high nibble 2 → 18
    dequantize(DType::Q5_1, &b, &mut out).unwrap();
    assert_eq!((out[0], out[16], out[17], out[1]), (37.0, -1.0, 35.0, -1.0));
}

/// An independent element-by-element reading of the Q6_K layout (jamba-arch.md §7.4).
fn q6k_element(b: &[u8], i: usize) -> f32 {
    let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
    let (half, r) = (i / 128, i % 128);
    let (quarter, l) = (r / 32, r % 32);
    let ql = b[64 * half + l + if quarter % 2 == 1 { 32 } else { 0 }];
    let low = if quarter < 2 { ql & 15 } else { ql >> 4 };
    let high = (b[128 + 32 * half + l] >> (2 * quarter)) & 3;
    let q = (low | (high << 4)) as i32 - 32;
    let sc = b[192 + 8 * half + l / 16 + 2 * quarter] as i8;
    d * sc as f32 * q as f32
}

/// An independent reading of Q4_K: per 64-element chunk, low nibbles then high nibbles.
fn q4k_element(b: &[u8], i: usize) -> f32 {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
    let s = &b[4..16];
    let sub = i / 32;
    let (sc, m) = if sub < 4 {
        (s[sub] & 63, s[sub + 4] & 63)
    } else {
        ((s[sub + 4] & 15) | ((s[sub - 4] >> 6) << 4), (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4))
    };
    let byte = b[16 + 32 * (i / 64) + i % 32];
    let q = if sub.is_multiple_of(2) { byte & 15 } else { byte >> 4 };
    d * sc as f32 * q as f32 - dmin * m as f32
}

/// Q3_K read the way ggml's reference decoder does it: the twelve scale bytes as three
/// little-endian words, rearranged into sixteen 6-bit values; then per 128 elements, four
/// shifts of the 2-bit plane, each 32 elements long, with one mask bit per shift.
fn q3k_element(b: &[u8], i: usize) -> f32 {
    let word = |j: usize| u32::from_le_bytes([b[96 + 4 * j], b[97 + 4 * j], b[98 + 4 * j], b[99 + 4 * j]]);
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let (m2, m1) = (0x0f0f_0f0fu32, 0x0303_0303u32);
    let words = [
        (a0 & m2) | ((tmp & m1) << 4),
        (a1 & m2) | (((tmp >> 2) & m1) << 4),
        ((a0 >> 4) & m2) | (((tmp >> 4) & m1) << 4),
        ((a1 >> 4) & m2) | (((tmp >> 6) & m1) << 4),
    ];
    let scale = |j: usize| words[j / 4].to_le_bytes()[j % 4] as i32 - 32;
    let d = f16::from_le_bytes([b[108], b[109]]).to_f32();
    let (n, within) = (i / 128, i % 128);
    let (shift, l) = (within / 32, within % 32);
    let q = ((b[32 + 32 * n + l] >> (2 * shift)) & 3) as i32;
    let mask_bit = 4 * n + shift;
    let high = if b[l] & (1 << mask_bit) != 0 { 0 } else { 4 };
    d * scale(i / 16) as f32 * (q - high) as f32
}

#[test]
fn q2_k_and_q3_k_known_values() {
    // Q2_K: scale byte 0x35 → scale 5, min 3; element 0 has crumb 2 (bits 0-1 of qs[0]),
    // element 32 crumb 1 (bits 2-3 of qs[0]); d = 0.5, dmin = 0.25.
    let mut b = vec![0u8; 84];
    b[0] = 0x35;
    b[2] = 0x07; // sub-block 2 (elements 32..48): scale 7, min 0
    b[16] = 0b0110;
    put_f16(&mut b[80..], 0.5);
    put_f16(&mut b[82..], 0.25);
    let mut out = vec![0f32; 256];
    dequantize(DType::Q2K, &b, &mut out).unwrap();
    assert_eq!((out[0], out[1], out[32]), (0.5 * 5.0 * 2.0 - 0.25 * 3.0, -0.75, 0.5 * 7.0));

    // Q3_K: scale 0 = (low nibble 0xA | high bits 0b01 << 4) − 32 = 26 − 32 = −6; element 0 has
    // crumb 3 and its hmask bit set (no −4); element 1 crumb 3, bit clear → 3 − 4 = −1.
    let mut b = vec![0u8; 110];
    b[0] = 0x01; // hmask bit 0 of element 0
    b[32] = 0x03;
    b[33] = 0x03;
    b[96] = 0x0A;
    b[104] = 0x01;
    put_f16(&mut b[108..], 2.0);
    dequantize(DType::Q3K, &b, &mut out).unwrap();
    assert_eq!((out[0], out[1]), (-36.0, 12.0));
    for (i, &v) in out.iter().enumerate() {
        assert_eq!(v, q3k_element(&b, i), "element {i}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn q3_k_dequantizer_matches_the_reference_reading(seed in any::<u64>()) {
        let mut rng = Lcg(seed);
        let b = random_stored(DType::Q3K, 256, &mut rng);
        let mut out = vec![0f32; 256];
        dequantize(DType::Q3K, &b, &mut out).unwrap();
        for (i, &v) in out.iter().enumerate() {
            prop_assert_eq!(v, q3k_element(&b, i), "element {}", i);
        }
    }

    /// The integer form the K kernels compute with describes exactly the dequantized values.
    #[test]
    fn k_super_blocks_equal_dequantization(seed in any::<u64>()) {
        let mut rng = Lcg(seed);
        for dtype in K_QUANTS {
            let b = random_stored(dtype, 256, &mut rng);
            let mut want = vec![0f32; 256];
            dequantize(dtype, &b, &mut want).unwrap();
            let k = taipan_kernels::kpacked::KLayout::of(dtype).unwrap().decode(&b);
            for (e, &w) in want.iter().enumerate() {
                let got = k.value(e);
                prop_assert!((got - w).abs() <= 1e-6 * (w.abs() + 1.0), "{} {}: {} vs {}", dtype, e, got, w);
            }
        }
    }

    #[test]
    fn k_quant_dequantizers_match_elementwise_readings(seed in any::<u64>()) {
        let mut rng = Lcg(seed);
        let b6 = random_stored(DType::Q6K, 256, &mut rng);
        let mut out = vec![0f32; 256];
        dequantize(DType::Q6K, &b6, &mut out).unwrap();
        for (i, &v) in out.iter().enumerate() {
            prop_assert_eq!(v, q6k_element(&b6, i));
        }
        let b4 = random_stored(DType::Q4K, 256, &mut rng);
        dequantize(DType::Q4K, &b4, &mut out).unwrap();
        for (i, &v) in out.iter().enumerate() {
            prop_assert!((v - q4k_element(&b4, i)).abs() <= 1e-6 * v.abs().max(1.0));
        }
    }

    #[test]
    fn level_decoding_equals_dequantization(seed in any::<u64>()) {
        let mut rng = Lcg(seed);
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::Q4K, DType::Q5K] {
            let n = 256;
            let data = random_stored(dtype, n, &mut rng);
            let mut want = vec![0f32; n];
            dequantize(dtype, &data, &mut want).unwrap();
            let levels: Vec<legacy::Levels32> = match dtype {
                DType::Q4_0 => data.chunks_exact(18).map(legacy::levels_q4_0).collect(),
                DType::Q4_1 => data.chunks_exact(20).map(legacy::levels_q4_1).collect(),
                DType::Q5_0 => data.chunks_exact(22).map(legacy::levels_q5_0).collect(),
                DType::Q5_1 => data.chunks_exact(24).map(legacy::levels_q5_1).collect(),
                DType::Q8_0 => data.chunks_exact(34).map(legacy::levels_q8_0).collect(),
                DType::Q4K => data.chunks_exact(144).flat_map(kquants::levels_q4_k).collect(),
                _ => data.chunks_exact(176).flat_map(kquants::levels_q5_k).collect(),
            };
            for (b, l) in levels.iter().enumerate() {
                for j in 0..32 {
                    let got = l.d * l.level[j] as f32 + l.m;
                    let w = want[32 * b + j];
                    prop_assert!((got - w).abs() <= 1e-6 * w.abs().max(1.0), "{dtype} {b} {j}: {got} vs {w}");
                }
            }
        }
    }

    #[test]
    fn simd_packed_tiles_equal_scalar(seed in any::<u64>(), rows in 1usize..7, tokens in 1usize..12, kblocks in 1usize..12) {
        let mut rng = Lcg(seed);
        for (dtype, form) in ALL.into_iter().filter(|d| d.block_elems() > 1).flat_map(|d| FORMS.map(|f| (d, f))) {
            let cols = if dtype.block_elems() == 256 { 256 * kblocks.div_ceil(4) } else { 32 * kblocks };
            let data = random_stored(dtype, rows * cols, &mut rng);
            let m = PackedMatrix::from_blocks_as(&WeightArena::new(), dtype, &data, rows, cols, form).unwrap().unwrap();
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.unit() * 3.0).collect();
            let mut acts = QuantizedActs::new();
            acts.quantize(&x, tokens, cols);
            acts.compute_half_sums();
            let mut want = vec![0f32; rows * tokens];
            for r in 0..rows {
                for t in 0..tokens {
                    want[r * tokens + t] = dot_packed_ref(&m.group(r / GROUP), r % GROUP, &ActRow::of(&acts, t));
                }
            }
            // The packed maths equals the f32 maths of the stored weights and quantized inputs.
            let mut deq_x = vec![0f32; cols];
            for t in 0..tokens {
                for (j, v) in deq_x.iter_mut().enumerate() {
                    *v = acts.row_qs(t)[j] as f32 * acts.row_d(t)[j / 32];
                }
                for r in 0..rows {
                    let row = &data[r * data.len() / rows..(r + 1) * data.len() / rows];
                    let exact = dot_ref(dtype, row, &deq_x).unwrap();
                    // Summation order differs, so bound by the magnitude of the terms, not the sum.
                    let mut w32 = vec![0f32; cols];
                    dequantize(dtype, row, &mut w32).unwrap();
                    let terms: f32 = w32.iter().zip(&deq_x).map(|(a, b)| (a * b).abs()).sum();
                    let got = want[r * tokens + t];
                    prop_assert!((got - exact).abs() <= 1e-5 * terms + 1e-6, "{dtype}: {got} vs {exact}");
                }
            }
            for k in Kernels::available() {
                let nt = tokens;
                let ts: Vec<_> = (0..nt).map(|t| ActRow::of(&acts, t)).collect();
                for g in 0..m.groups() {
                    let mut got = vec![0f32; GROUP * nt];
                    (k.packed_tile)(&m.group(g), &ts, &mut got);
                    for r in 0..GROUP.min(rows - g * GROUP) {
                        for t in 0..nt {
                            let w = want[(g * GROUP + r) * tokens + t];
                            let v = got[t * GROUP + r];
                            prop_assert!((v - w).abs() <= 1e-4 * (1.0 + w.abs()), "{:?} {dtype}: {v} vs {w}", k.isa);
                        }
                    }
                }
            }
        }
    }

    /// Runs of consecutive groups against one activation row (a lone sequence's decode) give
    /// every group exactly what the tile gives it alone, whatever the run's length and start.
    #[test]
    fn group_runs_equal_the_tile_bit_for_bit(seed in any::<u64>(), rows in 1usize..120, kblocks in 1usize..9) {
        let mut rng = Lcg(seed);
        for (dtype, form) in ALL.into_iter().filter(|d| d.block_elems() > 1).flat_map(|d| FORMS.map(|f| (d, f))) {
            let cols = if dtype.block_elems() == 256 { 256 * kblocks.div_ceil(4) } else { 32 * kblocks };
            let data = random_stored(dtype, rows * cols, &mut rng);
            let m = PackedMatrix::from_blocks_as(&WeightArena::new(), dtype, &data, rows, cols, form).unwrap().unwrap();
            let x: Vec<f32> = (0..cols).map(|_| rng.unit() * 3.0).collect();
            let mut acts = QuantizedActs::new();
            acts.quantize(&x, 1, cols);
            acts.compute_half_sums();
            let act = ActRow::of(&acts, 0);
            let groups: Vec<_> = (0..m.groups()).map(|g| m.group(g)).collect();
            for k in Kernels::available() {
                let alone: Vec<Vec<f32>> = groups.iter().map(|w| {
                    let mut out = vec![0f32; GROUP];
                    (k.packed_tile)(w, std::slice::from_ref(&act), &mut out);
                    out
                }).collect();
                for start in 0..groups.len() {
                    for len in 1..=(groups.len() - start).min(9) {
                        let mut got = vec![f32::NAN; GROUP * len];
                        (k.packed_groups)(&groups[start..start + len], &act, &mut got);
                        for (i, want) in alone[start..start + len].iter().enumerate() {
                            for r in 0..GROUP.min(rows - (start + i) * GROUP) {
                                let (v, w) = (got[i * GROUP + r], want[r]);
                                prop_assert!(v.to_bits() == w.to_bits(), "{:?} {dtype} {form:?}: groups {start}+{len}, group {i} row {r}: {v} vs {w}", k.isa);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The AMX table's int8 tiles give every activation row exactly what the VNNI kernel gives
    /// it alone, whatever the row count, and rows that do not lie evenly apart (which the tiles
    /// cannot load) take the VNNI kernel: a sequence's logits do not depend on its batch.
    #[test]
    fn amx_int8_tiles_equal_vnni_bit_for_bit(seed in any::<u64>(), rows in 1usize..40, tokens in 1usize..40, kblocks in 1usize..12) {
        if !Kernels::testable(Isa::Amx) {
            return Ok(());
        }
        let amx = Kernels::for_isa(Isa::Amx).expect("the AMX table");
        let vnni = Kernels::for_isa(Isa::Avx512Vnni).expect("AMX machines have VNNI");
        let mut rng = Lcg(seed);
        let cols = 32 * kblocks;
        let data = random_stored(DType::Q8_0, rows * cols, &mut rng);
        let m = PackedMatrix::from_blocks_as(&WeightArena::new(), DType::Q8_0, &data, rows, cols, LegacyForm::Compact).unwrap().unwrap();
        let x: Vec<f32> = (0..tokens * cols).map(|_| rng.unit() * 3.0).collect();
        let mut acts = QuantizedActs::new();
        acts.quantize(&x, tokens, cols);
        let in_order: Vec<_> = (0..tokens).map(|t| ActRow::of(&acts, t)).collect();
        let shuffled: Vec<_> = (0..tokens).map(|t| ActRow::of(&acts, (t * 7 + 3) % tokens)).collect();
        for g in 0..m.groups() {
            let group = m.group(g);
            for ts in [&in_order, &shuffled] {
                let mut all = vec![0f32; GROUP * tokens];
                (amx.packed_tile)(&group, ts, &mut all);
                for (t, row) in ts.iter().enumerate() {
                    let mut alone = vec![0f32; GROUP];
                    (vnni.packed_tile)(&group, std::slice::from_ref(row), &mut alone);
                    for r in 0..GROUP.min(rows - g * GROUP) {
                        let (v, w) = (all[t * GROUP + r], alone[r]);
                        prop_assert!(v.to_bits() == w.to_bits(), "{tokens} rows, row {t}, column {r}: {v} vs {w} alone");
                    }
                }
            }
        }
    }

    /// AMX panels are bit-identical to their scalar twin for every packed format, and the tile
    /// product equals the scalar one over the same bf16 values.
    #[test]
    fn amx_tiles_equal_their_scalar_twins(seed in any::<u64>(), rows in 1usize..40, kblocks in 1usize..12, tiles in 1usize..4) {
        if !Kernels::testable(Isa::Amx) {
            return Ok(());
        }
        let amx = Kernels::for_isa(Isa::Amx).and_then(|k| k.tiles).expect("the AMX table has tile kernels");
        let mut rng = Lcg(seed);
        for (dtype, form) in ALL.into_iter().filter(|d| d.block_elems() > 1).flat_map(|d| FORMS.map(|f| (d, f))) {
            let cols = if dtype.block_elems() == 256 { 256 * kblocks.div_ceil(4) } else { 32 * kblocks };
            let data = random_stored(dtype, rows * cols, &mut rng);
            let m = PackedMatrix::from_blocks_as(&WeightArena::new(), dtype, &data, rows, cols, form).unwrap().unwrap();
            let kp = m.stride;
            let plen = tiles::panel_len(kp);
            let mut panels = vec![0u16; 3 * plen];
            for g in 0..m.groups() {
                let mut want = vec![0u16; plen];
                tiles::panel_from_group_ref(&m.group(g), &mut want);
                (amx.panel_from_group)(&m.group(g), &mut panels[..plen]);
                prop_assert!(panels[..plen] == want[..], "{dtype} {form:?}: AMX panel differs from the scalar one");
            }
            let tokens = tiles * tiles::TILE_TOKENS - (seed % 7) as usize;
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.unit() * 3.0).collect();
            let mut acts = tiles::TileBuf::new();
            let padded = tiles::acts_to_bf16(&taipan_kernels::ThreadPool::new(2), &x, tokens, cols, kp, &mut acts);
            prop_assert_eq!(padded, tiles * tiles::TILE_TOKENS);
            (amx.panel_from_group)(&m.group(m.groups() - 1), &mut panels[plen..2 * plen]);
            (amx.panel_from_group)(&m.group(m.groups() / 2), &mut panels[2 * plen..]);
            for np in 1..=3 {
                let ps: Vec<&[u16]> = (0..np).map(|i| &panels[i * plen..(i + 1) * plen]).collect();
                let mut want = vec![0f32; padded * np * GROUP];
                tiles::gemm_ref(&acts, kp, padded, &ps, &mut want);
                let abs: Vec<u16> = acts.iter().map(|a| a & 0x7FFF).collect();
                let abs_panels: Vec<Vec<u16>> = ps.iter().map(|p| p.iter().map(|v| v & 0x7FFF).collect()).collect();
                let abs_refs: Vec<&[u16]> = abs_panels.iter().map(|p| &p[..]).collect();
                let mut terms = vec![0f32; padded * np * GROUP];
                tiles::gemm_ref(&abs, kp, padded, &abs_refs, &mut terms);
                let mut got = vec![f32::NAN; padded * np * GROUP];
                (amx.gemm)(&acts, kp, padded, &ps, &mut got);
                for i in 0..got.len() {
                    prop_assert!((got[i] - want[i]).abs() <= 1e-5 * terms[i] + 1e-6, "{dtype} np={np} [{i}]: {} vs {}", got[i], want[i]);
                }
            }
        }
    }

    /// Prompt rows go through tiles where the CPU has them, sampled rows through the integer
    /// kernels (the f32 ones for dense weights), in one product or in steps that mix them:
    /// prompt rows give the stored weights' f32 product within bf16 rounding (2⁻⁹ per operand),
    /// and every row gives to the bit what it gives in a product of its role alone.
    #[test]
    fn tile_matmul_by_role(seed in any::<u64>(), n in 1usize..50, tokens in 1usize..40, mixed in any::<bool>()) {
        let Some(kern) = Kernels::available().into_iter().find(|k| k.tiles.is_some()) else {
            Kernels::testable(Isa::Amx);
            return Ok(());
        };
        let mut rng = Lcg(seed);
        for dtype in ALL {
            let cols = if dtype.block_elems() == 256 { 512 } else { 160 };
            let data = random_stored(dtype, n * cols, &mut rng);
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.unit()).collect();
            let mut w32 = vec![0f32; n * cols];
            dequantize(dtype, &data, &mut w32).unwrap();
            let m = Matrix::from_stored(&WeightArena::new(), dtype, &data, n, cols, MatmulMode::Fast).unwrap();
            let c = Compute::with_kernels(2, kern);
            let roles: Vec<bool> = (0..tokens).map(|t| !mixed || !(t * 7 + seed as usize).is_multiple_of(3)).collect();
            let mut scratch = MatmulScratch::default();
            scratch.prompt_rows = roles.clone();
            let mut out = vec![f32::NAN; tokens * n];
            c.matmul(&mut out, &x, tokens, &m, &mut scratch);
            for t in 0..tokens {
                // The same row alone, in a product of its own role.
                let mut alone = vec![f32::NAN; n];
                let mut one = MatmulScratch::default();
                one.prompt_rows = vec![roles[t]];
                c.matmul(&mut alone, &x[t * cols..(t + 1) * cols], 1, &m, &mut one);
                prop_assert!(alone.iter().zip(&out[t * n..(t + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype} row {t} (prompt {}) differs from itself alone", roles[t]);
                for r in 0..n {
                    let exact: f32 = (0..cols).map(|j| w32[r * cols + j] * x[t * cols + j]).sum();
                    let scale: f32 = (0..cols).map(|j| (w32[r * cols + j] * x[t * cols + j]).abs()).sum();
                    let got = out[t * n + r];
                    // Weights a file keeps in f32 stay f32, prompt rows too: no bf16 rounding.
                    let tol = match (dtype, roles[t]) {
                        (DType::F32, _) => 1e-5,
                        (_, true) => 0.005,
                        _ => 0.01,
                    };
                    prop_assert!((got - exact).abs() <= tol * scale + 1e-5, "{dtype} t={t} r={r}: {got} vs {exact}");
                }
            }
        }
    }

    /// Several products over one input (a MoE layer's experts), some with enough rows for tiles,
    /// some with few and some with one (whose groups go to the kernel in runs), equal each
    /// matrix's own product of its rows, for every kernel table.
    #[test]
    fn matmul_rows_equals_naive_for_every_kernel_table(seed in any::<u64>(), dtype_at in 0usize..13, counts in proptest::collection::vec(prop_oneof![Just(1usize), 0usize..70], 1..4)) {
        let mut rng = Lcg(seed);
        let dtype = ALL[dtype_at];
        let (n, cols, x_rows) = (100, if dtype.block_elems() == 256 { 256 } else { 96 }, 80);
        let x: Vec<f32> = (0..x_rows * cols).map(|_| rng.unit()).collect();
        let mut mats = Vec::new();
        let mut w32s = Vec::new();
        let mut row_sets = Vec::new();
        for &count in &counts {
            let data = random_stored(dtype, n * cols, &mut rng);
            let mut w32 = vec![0f32; n * cols];
            dequantize(dtype, &data, &mut w32).unwrap();
            mats.push(Matrix::from_stored(&WeightArena::new(), dtype, &data, n, cols, MatmulMode::Fast).unwrap());
            w32s.push(w32);
            row_sets.push((0..count).map(|_| (rng.next() % x_rows as u64) as usize).collect::<Vec<_>>());
        }
        let mut out_first = Vec::new();
        let mut total = 0;
        for rows in &row_sets {
            out_first.push(total);
            total += rows.len();
        }
        let products: Vec<RowsProduct<'_>> = (0..counts.len())
            .map(|i| RowsProduct { w: &mats[i], rows: &row_sets[i], out_first: out_first[i] })
            .collect();
        // Without prompt rows, and with half the activation rows prompt rows (tiles where the CPU
        // has them).
        let halves: Vec<bool> = (0..x_rows).map(|r| (r + seed as usize).is_multiple_of(2)).collect();
        for (kern, roles) in Kernels::available().into_iter().flat_map(|k| [(k, Vec::new()), (k, halves.clone())]) {
            let c = Compute::with_kernels(2, kern);
            let mut out = vec![f32::NAN; total * n];
            let mut scratch = MatmulScratch::default();
            scratch.prompt_rows = roles;
            let roles = scratch.prompt_rows.clone();
            c.matmul_rows(&mut out, &x, x_rows, &products, &mut scratch);
            for (i, rows) in row_sets.iter().enumerate() {
                for (j, &xr) in rows.iter().enumerate() {
                    // The same row alone, in a product of its own role: a step mixing prompt and
                    // sampled rows computes each as it would be computed by itself.
                    let mut alone = vec![f32::NAN; n];
                    let mut one = MatmulScratch::default();
                    one.prompt_rows = vec![roles.get(xr).copied().unwrap_or(false)];
                    c.matmul(&mut alone, &x[xr * cols..(xr + 1) * cols], 1, &mats[i], &mut one);
                    let row = &out[(out_first[i] + j) * n..(out_first[i] + j + 1) * n];
                    prop_assert!(alone.iter().zip(row).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype} {:?} product {i} row {j} differs from itself alone", kern.isa);
                    for r in 0..n {
                        let w = &w32s[i][r * cols..(r + 1) * cols];
                        let xv = &x[xr * cols..(xr + 1) * cols];
                        let exact: f32 = w.iter().zip(xv).map(|(a, b)| a * b).sum();
                        let scale: f32 = w.iter().zip(xv).map(|(a, b)| (a * b).abs()).sum();
                        let got = out[(out_first[i] + j) * n + r];
                        prop_assert!((got - exact).abs() <= 0.01 * scale + 1e-4, "{dtype} {:?} product {i} row {j}: {got} vs {exact}", kern.isa);
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_equals_naive_for_every_kernel_table(seed in any::<u64>(), n in 1usize..40, tokens in 1usize..11) {
        let mut rng = Lcg(seed);
        let k = 96;
        for dtype in ALL {
            let cols = if dtype.block_elems() == 256 { 256 } else { k };
            let data = random_stored(dtype, n * cols, &mut rng);
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.unit()).collect();
            let mut w32 = vec![0f32; n * cols];
            dequantize(dtype, &data, &mut w32).unwrap();
            for mode in [MatmulMode::Exact, MatmulMode::Fast] {
                let m = Matrix::from_stored(&WeightArena::new(), dtype, &data, n, cols, mode).unwrap();
                for kern in Kernels::available() {
                    let c = Compute::with_kernels(2, kern);
                    let mut out = vec![0f32; tokens * n];
                    c.matmul(&mut out, &x, tokens, &m, &mut MatmulScratch::default());
                    for t in 0..tokens {
                        for r in 0..n {
                            let exact: f32 = (0..cols).map(|j| w32[r * cols + j] * x[t * cols + j]).sum();
                            let scale: f32 = (0..cols).map(|j| (w32[r * cols + j] * x[t * cols + j]).abs()).sum();
                            let got = out[t * n + r];
                            // 8-bit activations carry ~1/254 relative error per product.
                            let tol = if matches!(m, Matrix::Packed(_)) { 0.01 * scale + 1e-4 } else { 1e-5 * scale + 1e-6 };
                            prop_assert!((got - exact).abs() <= tol, "{dtype} {mode:?} {:?}: {got} vs {exact}", kern.isa);
                        }
                    }
                }
            }
        }
    }
}

/// A fused projection whose parts are stored in different formats keeps each part packed in
/// its own form, and the product equals the parts' products side by side.
#[test]
fn stacked_parts_of_different_formats_multiply_like_their_parts() {
    let mut rng = Lcg(5);
    let cols = 512;
    // K parts of several groups: one token's product takes them in runs (`PackedGroupsFn`).
    let spec = [(DType::Q5_0, 40), (DType::Q8_0, 16), (DType::Q6K, 71), (DType::F16, 8), (DType::Q4K, 97)];
    for (with_dense, tokens) in [(false, 5), (true, 5), (false, 1), (true, 1)] {
        let chosen: Vec<_> = spec.iter().filter(|(d, _)| with_dense || *d != DType::F16).collect();
        let stored: Vec<(DType, usize, Vec<u8>)> =
            chosen.iter().map(|&&(d, r)| (d, r, random_stored(d, r * cols, &mut rng))).collect();
        let parts: Vec<Matrix> = stored
            .iter()
            .map(|(d, r, data)| Matrix::from_stored(&WeightArena::new(), *d, data, *r, cols, MatmulMode::Fast).unwrap())
            .collect();
        let stacked = Matrix::stack(parts.clone());
        assert!(matches!(stacked, Matrix::Stacked(_)));
        let n: usize = stored.iter().map(|(_, r, _)| r).sum();
        let x: Vec<f32> = (0..tokens * cols).map(|_| rng.unit()).collect();
        for kern in Kernels::available() {
            let c = Compute::with_kernels(2, kern);
            let mut out = vec![0f32; tokens * n];
            c.matmul(&mut out, &x, tokens, &stacked, &mut MatmulScratch::default());
            let mut first = 0;
            for p in &parts {
                let pn = p.rows();
                let mut want = vec![0f32; tokens * pn];
                c.matmul(&mut want, &x, tokens, p, &mut MatmulScratch::default());
                for t in 0..tokens {
                    assert_eq!(&out[t * n + first..t * n + first + pn], &want[t * pn..(t + 1) * pn], "{:?}", kern.isa);
                }
                first += pn;
            }
        }
    }
}

/// A wide stacked projection's prompt rows through tiles, where a task takes up to eight row
/// groups and parts end inside a group: every output is within bf16 rounding of the f32
/// product, and equals to the bit that of its part alone and of its row alone.
#[test]
fn tile_products_in_wide_blocks_match_their_parts_and_rows() {
    let Some(kern) = Kernels::available().into_iter().find(|k| k.tiles.is_some()) else {
        Kernels::testable(Isa::Amx);
        return;
    };
    let mut rng = Lcg(11);
    let cols = 256;
    for dtype in [DType::Q4_1, DType::Q4K] {
        let stored: Vec<(usize, Vec<u8>)> =
            [37, 1100, 20].iter().map(|&r| (r, random_stored(dtype, r * cols, &mut rng))).collect();
        let parts: Vec<Matrix> = stored
            .iter()
            .map(|(r, data)| Matrix::from_stored(&WeightArena::new(), dtype, data, *r, cols, MatmulMode::Fast).unwrap())
            .collect();
        let stacked = Matrix::stack(parts.clone());
        let n: usize = stored.iter().map(|(r, _)| r).sum();
        let tokens = 45;
        let x: Vec<f32> = (0..tokens * cols).map(|_| rng.unit()).collect();
        let prompt = |rows: usize| {
            let mut s = MatmulScratch::default();
            s.prompt_rows = vec![true; rows];
            s
        };
        let c = Compute::with_kernels(2, kern);
        let mut out = vec![f32::NAN; tokens * n];
        c.matmul(&mut out, &x, tokens, &stacked, &mut prompt(tokens));
        let mut first = 0;
        for ((pn, data), p) in stored.iter().zip(&parts) {
            let mut w32 = vec![0f32; pn * cols];
            dequantize(dtype, data, &mut w32).unwrap();
            let mut alone = vec![f32::NAN; tokens * pn];
            c.matmul(&mut alone, &x, tokens, p, &mut prompt(tokens));
            for t in 0..tokens {
                let got = &out[t * n + first..t * n + first + pn];
                assert!(
                    got.iter().zip(&alone[t * pn..(t + 1) * pn]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype} token {t}: stacked differs from its part alone"
                );
                for (r, &g) in got.iter().enumerate() {
                    let terms = (0..cols).map(|j| (w32[r * cols + j] as f64) * x[t * cols + j] as f64);
                    let (exact, scale) = terms.fold((0f64, 0f64), |(e, s), v| (e + v, s + v.abs()));
                    assert!((g as f64 - exact).abs() <= 0.005 * scale + 1e-5, "{dtype} t={t} r={r}: {g} vs {exact}");
                }
            }
            first += pn;
        }
        for t in [0, 31, 32, 44] {
            let mut row = vec![f32::NAN; n];
            c.matmul(&mut row, &x[t * cols..(t + 1) * cols], 1, &stacked, &mut prompt(1));
            assert!(
                row.iter().zip(&out[t * n..(t + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype} row {t} differs from itself alone"
            );
        }
    }
}

/// Packed rows read back as the stored values (embedding lookups use this), in every form.
#[test]
fn packed_rows_dequantize_to_the_stored_values() {
    let mut rng = Lcg(11);
    for dtype in ALL.into_iter().filter(|d| d.block_elems() > 1) {
        let (rows, cols) = (19, 512);
        let data = random_stored(dtype, rows * cols, &mut rng);
        let mut want = vec![0f32; rows * cols];
        dequantize(dtype, &data, &mut want).unwrap();
        for form in FORMS {
            let m = PackedMatrix::from_blocks_as(&WeightArena::new(), dtype, &data, rows, cols, form).unwrap().unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                for (j, (&got, &w)) in row.iter().zip(&want[r * cols..(r + 1) * cols]).enumerate() {
                    assert!(
                        (got - w).abs() <= 1e-6 * (w.abs() + 1.0),
                        "{dtype} {form:?} row {r} col {j}: {got} vs {w}"
                    );
                }
            }
        }
    }
}

/// The compact forms carry the file's bytes: exactly for the 32-element formats, within the
/// stated overheads for the K formats (scales kept per 16 elements, d and dmin as f16).
#[test]
fn compact_forms_hold_about_the_files_bytes() {
    let (rows, cols) = (64, 1024);
    for dtype in ALL.into_iter().filter(|d| d.block_elems() > 1) {
        let file = dtype.row_bytes(cols).unwrap() * rows;
        let data = vec![0u8; file];
        let m = PackedMatrix::from_blocks_as(&WeightArena::new(), dtype, &data, rows, cols, LegacyForm::Compact)
            .unwrap()
            .unwrap();
        let ratio = m.memory_bytes() as f64 / file as f64;
        let bound = match dtype {
            DType::Q2K => 1.96,
            DType::Q3K => 1.35,
            DType::Q4K => 1.14,
            DType::Q5K => 1.12,
            DType::Q6K => 1.01,
            _ => 1.0,
        };
        assert!(ratio <= bound, "{dtype}: {ratio:.3} of the file's bytes, expected at most {bound}");
    }
}

#[test]
fn wrong_sizes_are_errors_not_panics() {
    let mut out = vec![0f32; 32];
    assert!(dequantize(DType::Q4_0, &[0u8; 17], &mut out).is_err());
    assert!(dequantize(DType::Q4K, &[0u8; 144], &mut out).is_err());
    assert!(PackedMatrix::from_blocks(&WeightArena::new(), DType::Q4_1, &[0u8; 20], 2, 32).unwrap().is_err());
    assert!(PackedMatrix::from_blocks(&WeightArena::new(), DType::Q6K, &[0u8; 209], 1, 256).unwrap().is_err());
    assert!(PackedMatrix::from_blocks(&WeightArena::new(), DType::Q6K, &[0u8; 210], 1, 256).unwrap().is_ok());
    assert!(PackedMatrix::from_blocks(&WeightArena::new(), DType::F16, &[0u8; 64], 1, 32).is_none());
    assert_eq!(DType::from_ggml_id(99), None);
    for d in ALL {
        assert_eq!(DType::from_ggml_id(d.ggml_id()), Some(d));
    }
}

/// The comparisons here loop over `Kernels::available()`; this names every level they leave out
/// (and fails when `TAIPAN_REQUIRE_ISA` requires one of them).
#[test]
fn every_instruction_set_is_tested_or_reported_skipped() {
    let tested: Vec<Isa> = Isa::ALL.into_iter().filter(|&isa| Kernels::testable(isa)).collect();
    assert_eq!(tested, Kernels::available().iter().map(|k| k.isa).collect::<Vec<_>>());
    assert!(tested.contains(&Kernels::best().isa), "the level in use must be among those tested");
    eprintln!("kernel levels tested on this CPU: {:?}", tested.iter().map(|i| i.name()).collect::<Vec<_>>());
}

#[test]
fn activation_quantization_error_is_bounded() {
    let mut rng = Lcg(7);
    let x: Vec<f32> = (0..3 * 100).map(|_| rng.unit() * 5.0).collect();
    let mut a = QuantizedActs::new();
    a.quantize(&x, 3, 100);
    assert_eq!(a.stride, 128);
    for t in 0..3 {
        for j in 0..100 {
            let d = a.row_d(t)[j / 32];
            let back = a.row_qs(t)[j] as f32 * d;
            assert!((back - x[t * 100 + j]).abs() <= d * 0.5 + 1e-6);
        }
        assert!(a.row_qs(t)[100..].iter().all(|&q| q == 0));
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_activation_quantization_is_bit_identical() {
    if !Kernels::testable(Isa::Avx512Vnni) {
        return;
    }
    let mut rng = Lcg(99);
    let mut x: Vec<f32> = (0..32 * 50).map(|_| rng.unit() * 7.0).collect();
    // Ties and extremes: exact halves of the scale, zeros, one all-zero block.
    x[5] = 7.0;
    x[6] = 7.0 * 0.5 / 127.0;
    x[32..64].fill(0.0);
    let n = x.len() / 32;
    let (mut qs, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; n], vec![0f32; n]);
    // SAFETY: features detected above.
    unsafe { taipan_kernels::quant::quantize_blocks_avx512(&x, &mut qs, &mut d, &mut s) };
    for b in 0..n {
        let mut want = [0i8; 32];
        let (scale, sum) = taipan_kernels::quant::quantize_block(&x[32 * b..32 * b + 32], &mut want);
        assert_eq!(&qs[32 * b..32 * b + 32], &want, "block {b}");
        assert_eq!((d[b], s[b]), (scale, scale * sum as f32));
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_activation_quantization_is_bit_identical() {
    if !Kernels::testable(Isa::Avx2) {
        return;
    }
    let mut rng = Lcg(98);
    let mut x: Vec<f32> = (0..32 * 60).map(|_| rng.unit() * 7.0).collect();
    // Ties and extremes: exact halves of the scale, zeros, one all-zero block, a negative max.
    x[5] = 7.0;
    x[6] = 7.0 * 0.5 / 127.0;
    x[32..64].fill(0.0);
    x[70] = -9.0;
    let n = x.len() / 32;
    let (mut qs, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; n], vec![0f32; n]);
    // SAFETY: the feature was detected above.
    unsafe { taipan_kernels::quant::quantize_blocks_avx2(&x, &mut qs, &mut d, &mut s) };
    for b in 0..n {
        let mut want = [0i8; 32];
        let (scale, sum) = taipan_kernels::quant::quantize_block(&x[32 * b..32 * b + 32], &mut want);
        assert_eq!(&qs[32 * b..32 * b + 32], &want, "block {b}");
        assert_eq!((d[b], s[b]), (scale, scale * sum as f32));
    }
}

#[test]
fn q8_0_quantizer_round_trips_within_half_a_step() {
    let mut rng = Lcg(3);
    let x: Vec<f32> = (0..32 * 20).map(|_| rng.unit() * 2.5).collect();
    let q = legacy::quantize_q8_0(&x);
    let mut back = vec![0f32; x.len()];
    dequantize(DType::Q8_0, &q, &mut back).unwrap();
    // Each block's step is at most 2.5/127; rounding errs by at most half a step.
    for (a, y) in x.iter().zip(&back) {
        assert!((a - y).abs() <= 2.5 / 127.0 * 0.51 + 1e-3, "{a} vs {y}");
    }
}

/// Short f32 rows (Mamba's `dt_proj`) go sixteen rows at a time where the ISA has a kernel for
/// it, the rest through the tiles: each row's sums equal the naive product and do not depend on
/// how many tokens share the call (a batched step equals its sequences alone, bit for bit).
#[test]
fn short_dense_rows_equal_naive_and_each_token_alone() {
    let mut rng = Lcg(11);
    for (n, k) in [(37usize, 70usize), (48, 64), (5, 256), (33, 17)] {
        let w: Vec<f32> = (0..n * k).map(|_| rng.unit() * 2.0 - 1.0).collect();
        let m = Matrix::from_f32(w.clone(), n, k);
        let tokens = 6;
        let x: Vec<f32> = (0..tokens * k).map(|_| rng.unit() * 2.0 - 1.0).collect();
        for kern in Kernels::available() {
            let c = Compute::with_kernels(2, kern);
            let mut all = vec![0f32; tokens * n];
            c.matmul(&mut all, &x, tokens, &m, &mut MatmulScratch::default());
            for t in 0..tokens {
                let mut one = vec![0f32; n];
                c.matmul(&mut one, &x[t * k..(t + 1) * k], 1, &m, &mut MatmulScratch::default());
                for r in 0..n {
                    let got = all[t * n + r];
                    assert_eq!(got.to_bits(), one[r].to_bits(), "{:?} n {n} k {k} row {r} token {t}", kern.isa);
                    let exact: f32 = (0..k).map(|j| w[r * k + j] * x[t * k + j]).sum();
                    let scale: f32 = (0..k).map(|j| (w[r * k + j] * x[t * k + j]).abs()).sum();
                    assert!((got - exact).abs() <= 1e-5 * scale + 1e-6, "{:?}: {got} vs {exact}", kern.isa);
                }
            }
        }
    }
}
