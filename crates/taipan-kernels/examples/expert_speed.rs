//! Speed of a mixture-of-experts layer's products in a batched decode step, at the synthetic
//! Jamba's shapes (16 Q8_0 experts, hidden 1,024, intermediate 2,816, top-2): the rows of
//! `tokens` sequences routed at random, each expert's gate/up and down products over its rows
//! (`Compute::matmul_rows`), reported as the weights' read rate (GB/s of expert bytes touched)
//! beside one row through one expert matrix after another (plain mat-vec, the decode bound).
//! `cargo run --release -p taipan-kernels --example expert_speed -- [threads] [tokens]`.
use std::time::Instant;
use taipan_kernels::huge::WeightArena;
use taipan_kernels::{Compute, DType, Kernels, MatmulMode, MatmulScratch, Matrix, RowsProduct};

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let tokens: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let Some(kern) = Kernels::available().into_iter().last() else {
        eprintln!("no kernels");
        return;
    };
    println!("kernels {:?}, {threads} threads, {tokens} tokens", kern.isa);
    let c = Compute::with_kernels(threads, kern);
    let mut seed = 12345u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let (h, f, experts, top_k, layers) = (1024usize, 2816usize, 16usize, 2usize, 4usize);
    // One arena, as a model's loader lays out its matrices.
    let arena = WeightArena::new();
    let mut matrix = |n: usize, k: usize| {
        let mut data = vec![0u8; n * k / 32 * 34];
        for (i, b) in data.iter_mut().enumerate() {
            *b = match i % 34 {
                0 => 0x00,
                1 => 0x20,
                _ => next() as u8,
            };
        }
        Matrix::from_stored(&arena, DType::Q8_0, &data, n, k, MatmulMode::Fast).expect("a Q8_0 matrix")
    };
    // Several layers, so that the weights do not stay in cache between steps.
    let gate_up: Vec<Vec<Matrix>> = (0..layers).map(|_| (0..experts).map(|_| matrix(2 * f, h)).collect()).collect();
    let down: Vec<Vec<Matrix>> = (0..layers).map(|_| (0..experts).map(|_| matrix(h, f)).collect()).collect();
    let x: Vec<f32> = (0..2 * tokens * f).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
    let mut routes: Vec<Vec<Vec<usize>>> = Vec::new();
    for _ in 0..layers {
        let mut r = vec![Vec::new(); experts];
        for t in 0..tokens {
            let a = next() as usize % experts;
            let mut b = next() as usize % experts;
            while b == a {
                b = next() as usize % experts;
            }
            r[a].push(t);
            r[b].push(t);
        }
        routes.push(r);
    }
    let routed = tokens * top_k;
    let mut out = vec![0f32; routed * 2 * f];
    let mut s = MatmulScratch::default();
    let own: Vec<usize> = (0..routed).collect();
    let step = |out: &mut [f32], s: &mut MatmulScratch| {
        let mut bytes = 0usize;
        for l in 0..layers {
            let mut first = 0;
            let mut products = Vec::new();
            let mut downs = Vec::new();
            for e in 0..experts {
                let rows = &routes[l][e];
                if rows.is_empty() {
                    continue;
                }
                bytes += gate_up[l][e].memory_bytes() + down[l][e].memory_bytes();
                products.push(RowsProduct { w: &gate_up[l][e], rows, out_first: first });
                downs.push(RowsProduct { w: &down[l][e], rows: &own[first..first + rows.len()], out_first: first });
                first += rows.len();
            }
            c.matmul_rows(&mut out[..routed * 2 * f], &x[..tokens * h], tokens, &products, s);
            c.matmul_rows(&mut out[..routed * h], &x[..routed * f], routed, &downs, s);
        }
        bytes
    };
    let reps = 30;
    for round in 0..3 {
        step(&mut out, &mut s);
        let start = Instant::now();
        let mut bytes = 0;
        for _ in 0..reps {
            bytes += step(&mut out, &mut s);
        }
        let secs = start.elapsed().as_secs_f64();
        // The same bytes read one row at a time, one matrix after another.
        let start = Instant::now();
        let mut mv_bytes = 0;
        for _ in 0..reps / 3 {
            for l in 0..layers {
                for e in 0..experts {
                    c.matmul(&mut out[..2 * f], &x[..h], 1, &gate_up[l][e], &mut s);
                    c.matmul(&mut out[..h], &x[..f], 1, &down[l][e], &mut s);
                    mv_bytes += gate_up[l][e].memory_bytes() + down[l][e].memory_bytes();
                }
            }
        }
        let mv_secs = start.elapsed().as_secs_f64();
        println!(
            "round {round}: step of {layers} layers {:.2} ms, experts read at {:.1} GB/s; mat-vec one by one {:.1} GB/s",
            secs / reps as f64 * 1e3,
            bytes as f64 / secs / 1e9,
            mv_bytes as f64 / mv_secs / 1e9
        );
    }
}
