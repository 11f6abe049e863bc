//! The one table of kernel entry points, filled once from runtime CPU-feature detection.
//!
//! A portable binary picks the widest instruction set this CPU has; tests build every table the
//! CPU supports and compare each against the scalar one.

use crate::packed::{dot_group_ref, ActRow, Layout, PackedGroup};
use std::sync::OnceLock;

/// `out[t * GROUP + r] = row r · acts[t]` for a group's 16 rows and any number of activation
/// rows: token-major, so each activation row's 16 results are one contiguous run.
pub type PackedTileFn = fn(&PackedGroup<'_>, &[ActRow<'_>], &mut [f32]);
/// `out[g * GROUP + r] = row r of groups[g] · act` for consecutive groups of one matrix and one
/// activation row (a lone decoding sequence): equal, bit for bit, to [`PackedTileFn`] per group.
pub type PackedGroupsFn = fn(&[PackedGroup<'_>], &ActRow<'_>, &mut [f32]);
/// `out[r * xs.len() + t] = ws[r] · xs[t]`, at most 4 × 4, all slices of one length.
pub type F32TileFn = fn(&[&[f32]], &[&[f32]], &mut [f32]);
/// `out[j] = row j · x` for 16 rows of `x.len()` floats stored one after another in `ws`.
pub type F32Rows16Fn = fn(&[f32], &[f32], &mut [f32]);

/// Several query rows against one KV head, row `i` over positions `spans[i].0..spans[i].1`:
/// `(out, q, spans, kv, scale, scratch)` with `out` and `q` `[rows, head_dim]`.
pub type AttendRowsFn = fn(&mut [f32], &[f32], &[(usize, usize)], &crate::ops::KvView<'_>, f32, &mut Vec<f32>);

/// The gated selective scan over a span of channels; see [`crate::ssm::selective_scan_ref`].
pub type ScanFn = fn(&mut [f32], &crate::ssm::ScanInputs<'_>, &mut [f32], crate::ssm::ScanShape);

/// Instruction-set levels with kernels of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
    /// AVX-512 VNNI plus Intel AMX bf16 tiles for the rows of prompt tokens.
    Amx,
}

impl Isa {
    /// The level's name, as `TAIPAN_ISA` and `TAIPAN_REQUIRE_ISA` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// Every level with kernels of its own, narrowest first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx];
}

/// Kernel entry points for one instruction-set level.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub isa: Isa,
    pub packed_tile: PackedTileFn,
    pub packed_groups: PackedGroupsFn,
    pub f32_tile: F32TileFn,
    /// Short f32 rows (see `Compute::matmul_dense`) sixteen at a time, where the ISA has a
    /// kernel for it.
    pub f32_rows16: Option<F32Rows16Fn>,
    pub attend_rows: AttendRowsFn,
    pub selective_scan: ScanFn,
    /// bf16 tile kernels for prompt rows, where the CPU has them (see [`TileKernels`]).
    pub tiles: Option<TileKernels>,
}

/// Builds a group's bf16 panel (`crate::tiles`).
pub type PanelFn = fn(&PackedGroup<'_>, &mut [u16]);
/// `(acts, kp, tokens, panels, out)`: see `crate::tiles` for the layouts.
pub type TileGemmFn = fn(&[u16], usize, usize, &[&[u16]], &mut [f32]);
/// Attention of several query rows against one KV head's panels:
/// `(out, q, spans, panels, scale, scratch)`, as [`AttendRowsFn`] (see `crate::tiles::KvPanels`).
pub type AttendTilesFn =
    fn(&mut [f32], &[f32], &[(usize, usize)], &crate::tiles::KvPanels, f32, &mut crate::tiles::AttnTileScratch);

/// bf16 tile kernels (Intel AMX) for the rows of prompt tokens.
///
/// Which kernel computes a row depends on the row's role alone: prompt rows always go through
/// tiles (where the CPU has them), sampled rows never, whatever else shares the step. Tiles round
/// to bf16 and the integer kernels quantize to 8 bits, so a row's result depends on its kernel;
/// choosing by role rather than by how many rows a step holds keeps a sequence batched with
/// others equal to itself alone.
#[derive(Clone, Copy)]
pub struct TileKernels {
    pub panel_from_group: PanelFn,
    pub gemm: TileGemmFn,
    pub attend: AttendTilesFn,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({:?})", self.isa)
    }
}

fn f32_tile_ref(ws: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
    for (r, w) in ws.iter().enumerate() {
        for (t, x) in xs.iter().enumerate() {
            assert_eq!(w.len(), x.len());
            out[r * xs.len() + t] = w.iter().zip(x.iter()).map(|(a, b)| a * b).sum();
        }
    }
}

fn packed_tile_ref(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
    dot_group_ref(w, acts, out);
}

fn packed_groups_ref(groups: &[PackedGroup<'_>], act: &ActRow<'_>, out: &mut [f32]) {
    groups_one_by_one(packed_tile_ref, groups, act, out);
}

/// [`PackedGroupsFn`] through a kernel that takes one group at a time.
pub(crate) fn groups_one_by_one(
    tile: impl Fn(&PackedGroup<'_>, &[ActRow<'_>], &mut [f32]),
    groups: &[PackedGroup<'_>],
    act: &ActRow<'_>,
    out: &mut [f32],
) {
    let g = crate::packed::GROUP;
    for (i, w) in groups.iter().enumerate() {
        tile(w, std::slice::from_ref(act), &mut out[i * g..(i + 1) * g]);
    }
}

/// Runs `tile`, which takes at most four activation rows, over any number of them.
pub(crate) fn tile_in_fours(
    tile: impl Fn(&PackedGroup<'_>, &[ActRow<'_>], &mut [f32]),
    w: &PackedGroup<'_>,
    acts: &[ActRow<'_>],
    out: &mut [f32],
) {
    const N: usize = 4;
    let n = acts.len();
    if n <= N {
        return tile(w, acts, out);
    }
    let g = crate::packed::GROUP;
    for t0 in (0..n).step_by(N) {
        let nt = (n - t0).min(N);
        tile(w, &acts[t0..t0 + nt], &mut out[t0 * g..(t0 + nt) * g]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_entry {
    use super::*;
    use crate::x86::{amx, avx2, avx2_kquant, avx512, avx512_kquant};

    pub fn packed_avx512(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
        // SAFETY: only installed in a table after detecting avx512f/bw/vnni.
        unsafe {
            match &w.layout {
                Layout::K(k) => tile_in_fours(|w, a, o| avx512_kquant::dot_group_kpacked(w, k, a, o), w, acts, out),
                _ => avx512::dot_group_packed(w, acts, out),
            }
        }
    }
    pub fn groups_avx512(groups: &[PackedGroup<'_>], act: &ActRow<'_>, out: &mut [f32]) {
        // Only K groups gain from going several at a time: runs of the 32-element formats
        // measured slower (Q5_0 5,120 × 192 from DRAM, two threads: 31 → 38 µs; Q4_1 and
        // Q5_0 8,192 × 2,560 no faster).
        match groups.first().map(|w| w.layout) {
            // SAFETY: only installed in a table after detecting avx512f/bw/vnni.
            Some(Layout::K(k)) if groups.iter().all(|w| w.layout == Layout::K(k)) => unsafe {
                avx512_kquant::dot_groups_kpacked(groups, &k, act, out)
            },
            _ => groups_one_by_one(packed_avx512, groups, act, out),
        }
    }
    /// AVX-512's packed tile, with runs of activation rows through int8 tiles where that
    /// measured faster: byte-level groups, 5–16 rows at a time other than exactly 8 (the VNNI
    /// kernel's one full pass). Same results, bit for bit (see `amx::dot_group_bytes`).
    pub fn packed_amx(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
        let g = crate::packed::GROUP;
        let tiles_take = |rows: usize| rows >= amx::INT8_MIN_ROWS && rows != 8;
        let form = match w.layout {
            Layout::Compact(c) if w.width == crate::packed::LevelWidth::Byte && !c.plane => Some(c),
            _ => None,
        };
        let (Some(form), true) = (form, tiles_take(acts.len().min(g)) && amx::int8_usable()) else {
            return packed_avx512(w, acts, out);
        };
        for t0 in (0..acts.len()).step_by(g) {
            let rows = &acts[t0..(t0 + g).min(acts.len())];
            let out = &mut out[t0 * g..(t0 + rows.len()) * g];
            // Tiles load rows at one stride: rows in increasing order, evenly apart.
            let at = |t: usize| rows[t].qs.as_ptr() as usize;
            let stride = (rows.len() > 1).then(|| at(1).checked_sub(at(0))).flatten().filter(|&s| {
                (0..rows.len()).all(|t| t.checked_mul(s).and_then(|o| o.checked_add(at(0))) == Some(at(t)))
            });
            if let (Some(stride), true) = (stride, tiles_take(rows.len())) {
                // SAFETY: `int8_usable` returned true; the rows lie `stride` bytes apart (checked).
                unsafe { amx::dot_group_bytes(w, form, rows, stride, out) }
            } else {
                packed_avx512(w, rows, out);
            }
        }
    }
    pub fn panel_amx(w: &PackedGroup<'_>, panel: &mut [u16]) {
        // SAFETY: only installed after `amx::usable`, which checks AVX-512 F/BW/BF16.
        unsafe { amx::panel_from_group(w, panel) }
    }
    pub fn gemm_amx(acts: &[u16], kp: usize, tokens: usize, panels: &[&[u16]], out: &mut [f32]) {
        // SAFETY: only installed after `amx::usable` granted the tile state.
        unsafe { amx::gemm(acts, kp, tokens, panels, out) }
    }
    pub fn attend_amx(
        out: &mut [f32],
        q: &[f32],
        spans: &[(usize, usize)],
        kv: &crate::tiles::KvPanels,
        scale: f32,
        scratch: &mut crate::tiles::AttnTileScratch,
    ) {
        // SAFETY: only installed after `amx::usable` granted the tile state.
        unsafe { amx::attend_tiles(out, q, spans, kv, scale, scratch) }
    }
    pub fn scan_avx512(y: &mut [f32], i: &crate::ssm::ScanInputs<'_>, h: &mut [f32], s: crate::ssm::ScanShape) {
        // SAFETY: only installed after detecting avx512f.
        unsafe { avx512::selective_scan(y, i, h, s) }
    }
    pub fn f32_avx512(ws: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
        // SAFETY: only installed after detecting avx512f.
        unsafe { avx512::dot_tile_f32(ws, xs, out) }
    }
    pub fn f32_rows16_avx512(ws: &[f32], x: &[f32], out: &mut [f32]) {
        // SAFETY: only installed after detecting avx512f.
        unsafe { avx512::dot_rows16_f32(ws, x, out) }
    }
    pub fn groups_avx2(groups: &[PackedGroup<'_>], act: &ActRow<'_>, out: &mut [f32]) {
        groups_one_by_one(packed_avx2, groups, act, out);
    }
    pub fn packed_avx2(w: &PackedGroup<'_>, acts: &[ActRow<'_>], out: &mut [f32]) {
        // SAFETY: only installed after detecting avx2, fma and f16c.
        unsafe {
            match &w.layout {
                Layout::K(k) => avx2_kquant::dot_group_kpacked(w, k, acts, out),
                _ => avx2::dot_group_packed(w, acts, out),
            }
        }
    }
    pub fn attend_rows_avx2(
        out: &mut [f32],
        q: &[f32],
        spans: &[(usize, usize)],
        kv: &crate::ops::KvView<'_>,
        scale: f32,
        scratch: &mut Vec<f32>,
    ) {
        // SAFETY: only installed after detecting avx2 and fma.
        unsafe { crate::x86::avx2_attention::attend_rows(out, q, spans, kv, scale, scratch) }
    }
    pub fn attend_rows_avx512(
        out: &mut [f32],
        q: &[f32],
        spans: &[(usize, usize)],
        kv: &crate::ops::KvView<'_>,
        scale: f32,
        scratch: &mut Vec<f32>,
    ) {
        // SAFETY: only installed after detecting avx512f/vl, avx2 and fma.
        unsafe { crate::x86::avx512_attention::attend_rows(out, q, spans, kv, scale, scratch) }
    }
    pub fn scan_avx2(y: &mut [f32], i: &crate::ssm::ScanInputs<'_>, h: &mut [f32], s: crate::ssm::ScanShape) {
        // SAFETY: only installed after detecting avx2 and fma.
        unsafe { avx2::selective_scan(y, i, h, s) }
    }
    pub fn f32_avx2(ws: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
        // SAFETY: only installed after detecting avx2 and fma.
        unsafe { avx2::dot_tile_f32(ws, xs, out) }
    }
}

impl Kernels {
    /// The portable reference kernels.
    pub fn scalar() -> Kernels {
        Kernels {
            isa: Isa::Scalar,
            packed_tile: packed_tile_ref,
            packed_groups: packed_groups_ref,
            f32_tile: f32_tile_ref,
            f32_rows16: None,
            attend_rows: crate::ops::attend_rows_ref,
            selective_scan: crate::ssm::selective_scan_ref,
            tiles: None,
        }
    }

    /// The table for `isa`, if this CPU supports it.
    pub fn for_isa(isa: Isa) -> Option<Kernels> {
        match isa {
            Isa::Scalar => Some(Self::scalar()),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"))
            .then_some(Kernels {
                isa,
                packed_tile: x86_entry::packed_avx2,
                packed_groups: x86_entry::groups_avx2,
                f32_tile: x86_entry::f32_avx2,
                f32_rows16: None,
                attend_rows: x86_entry::attend_rows_avx2,
                selective_scan: x86_entry::scan_avx2,
                tiles: None,
            }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => (is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"))
            .then_some(Kernels {
                isa,
                packed_tile: x86_entry::packed_avx512,
                packed_groups: x86_entry::groups_avx512,
                f32_tile: x86_entry::f32_avx512,
                f32_rows16: Some(x86_entry::f32_rows16_avx512),
                attend_rows: x86_entry::attend_rows_avx512,
                selective_scan: x86_entry::scan_avx512,
                tiles: None,
            }),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Self::for_isa(Isa::Avx512Vnni).filter(|_| crate::x86::amx::usable()).map(|k| Kernels {
                isa,
                packed_tile: x86_entry::packed_amx,
                tiles: Some(TileKernels {
                    panel_from_group: x86_entry::panel_amx,
                    gemm: x86_entry::gemm_amx,
                    attend: x86_entry::attend_amx,
                }),
                ..k
            }),
            #[cfg(not(target_arch = "x86_64"))]
            _ => None,
        }
    }

    /// Every table this CPU can run, scalar first.
    pub fn available() -> Vec<Kernels> {
        Isa::ALL.into_iter().filter_map(Self::for_isa).collect()
    }

    /// Whether tests of `isa`'s kernels can run on this CPU. A test that cannot run says so on
    /// stderr rather than passing as if it had; and when `TAIPAN_REQUIRE_ISA` names the level
    /// (`avx2`, `avx512`, `amx`, comma-separated, or `all`), its absence fails the test, so a run that
    /// must cover an instruction set cannot pass without it.
    #[doc(hidden)]
    pub fn testable(isa: Isa) -> bool {
        if Self::for_isa(isa).is_some() {
            return true;
        }
        let name = isa.name();
        let required = std::env::var("TAIPAN_REQUIRE_ISA").unwrap_or_default();
        if required.split(',').map(str::trim).any(|r| r == name || r == "all") {
            panic!("TAIPAN_REQUIRE_ISA names {name}, which this CPU lacks: its kernels are not tested");
        }
        eprintln!("SKIPPED: {name} kernels not tested, this CPU lacks the instruction set");
        false
    }

    /// The fastest table for this CPU (detected once). `TAIPAN_ISA=scalar|avx2|avx512|amx`
    /// overrides.
    pub fn best() -> Kernels {
        static BEST: OnceLock<Kernels> = OnceLock::new();
        *BEST.get_or_init(|| {
            let wanted = match std::env::var("TAIPAN_ISA").as_deref() {
                Ok("scalar") => Some(Isa::Scalar),
                Ok("avx2") => Some(Isa::Avx2),
                Ok("avx512") => Some(Isa::Avx512Vnni),
                Ok("amx") => Some(Isa::Amx),
                _ => None,
            };
            if let Some(k) = wanted.and_then(Self::for_isa) {
                return k;
            }
            Self::available().pop().unwrap_or_else(Self::scalar)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::DType;
    use crate::huge::WeightArena;
    use crate::packed::{PackedMatrix, GROUP};
    use crate::quant::QuantizedActs;

    /// A kernel limited to four activation rows, run in fours, equals one call over all rows.
    #[test]
    fn tiles_in_fours_equal_one_call_over_all_rows() {
        let (rows, cols, tokens) = (GROUP, 64, 11);
        let data: Vec<u8> = (0..rows * cols / 32 * 34).map(|i| (i * 37 % 251) as u8).collect();
        let mut data = data;
        for b in data.chunks_exact_mut(34) {
            b[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        }
        let m = PackedMatrix::from_blocks(&WeightArena::new(), DType::Q8_0, &data, rows, cols).unwrap().unwrap();
        let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
        let mut acts = QuantizedActs::new();
        acts.quantize(&x, tokens, cols);
        let xs: Vec<ActRow<'_>> = (0..tokens).map(|t| ActRow::of(&acts, t)).collect();
        let mut want = vec![0f32; GROUP * tokens];
        dot_group_ref(&m.group(0), &xs, &mut want);
        let mut got = vec![0f32; GROUP * tokens];
        let limited = |w: &PackedGroup<'_>, a: &[ActRow<'_>], o: &mut [f32]| {
            assert!(a.len() <= 4);
            dot_group_ref(w, a, o)
        };
        tile_in_fours(limited, &m.group(0), &xs, &mut got);
        assert_eq!(got, want);
    }
}
