//! Jamba's Mamba-1 mixer: `in_proj → causal conv → SiLU → x_proj → RMSNorm'd dt/B/C →
//! selective scan → gate → out_proj` (Gu & Dao 2023; Jamba adds the three RMSNorms).
//!
//! The projections run over the rows of the whole batch; the conv and the scan run per sequence
//! on its own state slot, the sequences' scans in parallel.

use super::{resize, JambaConfig};
use crate::cache::SlotMut;
use std::sync::Mutex;
use taipan_kernels::matmul::MatmulScratch;
use taipan_kernels::ops::{self, AttnSeq};
use taipan_kernels::ssm::{self, ScanShape};
use taipan_kernels::{Compute, Matrix};

#[derive(Debug)]
pub(super) struct Mamba {
    /// `[2·Di, H]`: x rows, then gate z rows.
    pub in_proj: Matrix,
    pub in_bias: Option<Vec<f32>>,
    /// `[K, Di]`, tap-major.
    pub conv_w: Vec<f32>,
    /// `[Di]`
    pub conv_b: Option<Vec<f32>>,
    /// `[R + 2N, Di]`: dt, B, C rows.
    pub x_proj: Matrix,
    pub dt_norm: Vec<f32>,
    pub b_norm: Vec<f32>,
    pub c_norm: Vec<f32>,
    /// `[Di, R]`
    pub dt_proj: Matrix,
    /// `[Di]`
    pub dt_bias: Vec<f32>,
    /// `[Di, N]`, `−exp(A_log)`.
    pub a: Vec<f32>,
    /// `[Di]`
    pub d: Vec<f32>,
    /// `[H, Di]`
    pub out_proj: Matrix,
    pub out_bias: Option<Vec<f32>>,
    /// This layer's index among the Mamba layers (its layer in a state slot).
    pub state_layer: usize,
}

#[derive(Debug, Default)]
pub(super) struct MambaScratch {
    /// `[rows, 2·Di]`
    xz: Vec<f32>,
    /// `[rows, Di]` each: the conv input, the gate, the conv output after SiLU, dt, the scan output.
    x: Vec<f32>,
    z: Vec<f32>,
    xc: Vec<f32>,
    dt: Vec<f32>,
    y: Vec<f32>,
    /// `[rows, R + 2N]`
    dbc: Vec<f32>,
    /// `[rows, R]`, `[rows, N]`, `[rows, N]`
    dt_low: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    /// `[rows, Di]`: a prompt's scan outputs by channel block, before they are put back in rows.
    y_parts: Vec<f32>,
}

/// Channels per task of a prompt chunk's selective scan.
const SCAN_CHANNELS: usize = 256;

impl Mamba {
    pub fn weight_bytes(&self) -> usize {
        self.in_proj.memory_bytes()
            + self.x_proj.memory_bytes()
            + self.dt_proj.memory_bytes()
            + self.out_proj.memory_bytes()
            + 4 * (self.conv_w.len() + self.a.len())
    }

    /// `out[rows, H] = mamba(normed[rows, H])`; `slots[i]` is the state of `seqs[i]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        compute: &Compute,
        c: &JambaConfig,
        seqs: &[AttnSeq<'_>],
        normed: &[f32],
        out: &mut [f32],
        slots: &mut [SlotMut<'_>],
        s: &mut MambaScratch,
        mm: &mut MatmulScratch,
    ) {
        let rows = normed.len() / c.hidden;
        let (di, r, n) = (c.d_inner, c.dt_rank, c.d_state);
        // 1. x and the gate z from one product.
        let xz = resize(&mut s.xz, rows * 2 * di);
        compute.matmul(xz, normed, rows, &self.in_proj, mm);
        if let Some(b) = &self.in_bias {
            for row in xz.chunks_exact_mut(2 * di) {
                ops::add_in_place(row, b);
            }
        }
        // Element-wise steps below run over the pool: a prompt chunk's are megabytes.
        let (x, z) = (resize(&mut s.x, rows * di), resize(&mut s.z, rows * di));
        let xz = &*xz;
        compute.pool.for_rows_mut(x, di, &|t, xr| xr.copy_from_slice(&xz[t * 2 * di..t * 2 * di + di]));
        compute.pool.for_rows_mut(z, di, &|t, zr| zr.copy_from_slice(&xz[t * 2 * di + di..(t + 1) * 2 * di]));
        // 2. Causal conv per sequence (sequences in parallel), continuing from its saved
        //    inputs; then SiLU.
        let xc = resize(&mut s.xc, rows * di);
        let mut convs = Vec::with_capacity(seqs.len());
        let mut xc_rest = &mut xc[..];
        for (seq, slot) in seqs.iter().zip(slots.iter_mut()) {
            let (xc_seq, tail) = std::mem::take(&mut xc_rest).split_at_mut(seq.tokens * di);
            xc_rest = tail;
            let (conv_state, _) = slot.layer(self.state_layer);
            convs.push(Mutex::new((seq, xc_seq, conv_state)));
        }
        let x = &*x;
        compute.pool.run(convs.len(), &|i| {
            let mut job = convs[i].lock().unwrap_or_else(|p| p.into_inner());
            let (seq, xc_seq, conv_state) = &mut *job;
            let span = seq.first_row * di..(seq.first_row + seq.tokens) * di;
            ssm::causal_conv1d(xc_seq, &x[span], &self.conv_w, self.conv_b.as_deref(), conv_state, di);
        });
        drop(convs);
        compute.pool.for_rows_mut(xc, di, &|_, row| ops::silu_in_place(row));
        // 3. dt, B and C from one product, each RMSNorm'd; dt through its own projection.
        let p_w = r + 2 * n;
        let dbc = resize(&mut s.dbc, rows * p_w);
        compute.matmul(dbc, xc, rows, &self.x_proj, mm);
        let (dt_low, b, cm) = (resize(&mut s.dt_low, rows * r), resize(&mut s.b, rows * n), resize(&mut s.c, rows * n));
        for (t, row) in dbc.chunks_exact(p_w).enumerate() {
            dt_low[t * r..(t + 1) * r].copy_from_slice(&row[..r]);
            b[t * n..(t + 1) * n].copy_from_slice(&row[r..r + n]);
            cm[t * n..(t + 1) * n].copy_from_slice(&row[r + n..]);
        }
        ops::rms_norm(dt_low, &self.dt_norm, c.rms_eps);
        ops::rms_norm(b, &self.b_norm, c.rms_eps);
        ops::rms_norm(cm, &self.c_norm, c.rms_eps);
        let dt = resize(&mut s.dt, rows * di);
        compute.matmul(dt, dt_low, rows, &self.dt_proj, mm);
        compute.pool.for_rows_mut(dt, di, &|_, row| ssm::softplus_bias_in_place(row, &self.dt_bias));
        // 4. The selective scan per sequence on its own state, split by channels (independent,
        //    and the same values whatever the split): a prompt chunk's in blocks whose outputs
        //    are put back in rows after, so that one long prompt's scan runs on every thread;
        //    decode rows only when there are fewer sequences than threads, straight into their
        //    output rows — a token's scan reads its layer's state and `A` cold, hundreds of KiB,
        //    which one thread alone waits for.
        let decode_only = seqs.iter().all(|q| q.tokens <= 1);
        let width = if decode_only {
            let parts = compute.pool.threads().div_ceil(seqs.len().max(1));
            di.div_ceil(parts).next_multiple_of(16).min(di)
        } else {
            SCAN_CHANNELS.min(di)
        };
        let relayout = !decode_only && width < di;
        let y = resize(&mut s.y, rows * di);
        let parts = resize(&mut s.y_parts, if relayout { rows * di } else { 0 });
        let (x, z, dt, b, cm) = (&*xc, &*z, &*dt, &*b, &*cm);
        let mut jobs = Vec::with_capacity(seqs.len() * di.div_ceil(width));
        let (mut y_rest, mut parts_rest) = (&mut y[..], &mut parts[..]);
        for (seq, slot) in seqs.iter().zip(slots.iter_mut()) {
            let (_, mut h_rest) = slot.layer(self.state_layer);
            let (y_seq, tail) = std::mem::take(&mut y_rest).split_at_mut(seq.tokens * di);
            y_rest = tail;
            // The sequence's channel blocks one after another, each `[tokens, count]`: straight
            // into its output rows where a block is a run of them (decode rows, or one block of
            // every channel), else into `parts`.
            let mut dest = if relayout {
                let (p_seq, tail) = std::mem::take(&mut parts_rest).split_at_mut(seq.tokens * di);
                parts_rest = tail;
                p_seq
            } else {
                y_seq
            };
            for first in (0..di).step_by(width) {
                let count = width.min(di - first);
                let (h_part, h_tail) = std::mem::take(&mut h_rest).split_at_mut(count * n);
                let (y_part, dest_tail) = std::mem::take(&mut dest).split_at_mut(seq.tokens * count);
                (h_rest, dest) = (h_tail, dest_tail);
                jobs.push(Mutex::new((seq, first, y_part, h_part)));
            }
        }
        let scan = compute.kernels.selective_scan;
        let run = |i: usize| {
            let mut job = jobs[i].lock().unwrap_or_else(|p| p.into_inner());
            let (seq, first, y_part, h) = &mut *job;
            let (rows_c, rows_n) = (
                seq.first_row * di..(seq.first_row + seq.tokens) * di,
                seq.first_row * n..(seq.first_row + seq.tokens) * n,
            );
            let inputs = ssm::ScanInputs {
                x: &x[rows_c.clone()],
                dt: &dt[rows_c.clone()],
                z: &z[rows_c],
                b: &b[rows_n.clone()],
                c: &cm[rows_n],
                a: &self.a,
                d: &self.d,
            };
            let count = h.len() / n;
            scan(y_part, &inputs, h, ScanShape::whole(seq.tokens, di, n).part(*first, count));
        };
        compute.pool.run(jobs.len(), &run);
        drop(jobs);
        if relayout {
            let parts = &*parts;
            compute.pool.for_rows_mut(y, di, &|row, out| {
                let seq = &seqs[seqs.partition_point(|q| q.first_row + q.tokens <= row)];
                let (base, t) = (seq.first_row * di, row - seq.first_row);
                for first in (0..di).step_by(width) {
                    let count = width.min(di - first);
                    let at = base + first * seq.tokens + t * count;
                    out[first..first + count].copy_from_slice(&parts[at..at + count]);
                }
            });
        }
        // 5. Back to the model width.
        compute.matmul(out, y, rows, &self.out_proj, mm);
        if let Some(bias) = &self.out_bias {
            for row in out.chunks_exact_mut(c.hidden) {
                ops::add_in_place(row, bias);
            }
        }
    }
}
