//! Speed of prompt-row products on the best kernels of this CPU, at SmolLM2's shapes (GMAC/s),
//! then the crossover: the same product by row count, prompt rows (tiles where the CPU has them)
//! against sampled rows (the integer kernels).
//! `cargo run --release -p taipan-kernels --example tile_speed -- [threads]`.
use std::time::Instant;
use taipan_kernels::huge::WeightArena;
use taipan_kernels::{Compute, DType, Kernels, MatmulMode, MatmulScratch, Matrix};

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    let Some(kern) = Kernels::available().into_iter().last() else {
        eprintln!("no kernels");
        return;
    };
    println!("kernels {:?}, {threads} threads", kern.isa);
    let c = Compute::with_kernels(threads, kern);
    let mut seed = 12345u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let tokens = 512;
    // The first case runs long to warm the machine up; its first pass is not reported.
    for (pass, (dtype, block_bytes)) in
        [(DType::Q8_0, 34usize), (DType::Q8_0, 34), (DType::Q4_1, 20)].into_iter().enumerate()
    {
        for (n, k) in [(960usize, 576usize), (3072, 576), (576, 1536)] {
            // Blocks with scales near 2⁻⁸ (f16 bits 0x2000 / 0xa000) and random levels.
            let mut data = vec![0u8; n * k / 32 * block_bytes];
            for (i, b) in data.iter_mut().enumerate() {
                *b = match (dtype, i % block_bytes) {
                    (_, 0) | (DType::Q4_1, 2) => 0x00,
                    (_, 1) => 0x20,
                    (DType::Q4_1, 3) => 0xa0,
                    _ => next() as u8,
                };
            }
            let Ok(m) = Matrix::from_stored(&WeightArena::new(), dtype, &data, n, k, MatmulMode::Fast) else {
                eprintln!("{dtype}: not a matrix");
                return;
            };
            let x: Vec<f32> = (0..tokens * k).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
            let mut out = vec![0f32; tokens * n];
            let mut s = MatmulScratch::default();
            s.prompt_rows = vec![true; tokens];
            let reps = if pass == 0 { 100 } else { 20 };
            let start = Instant::now();
            for _ in 0..reps {
                c.matmul(&mut out, &x, tokens, &m, &mut s);
            }
            let secs = start.elapsed().as_secs_f64() / reps as f64;
            if pass > 0 {
                println!("{dtype} n={n} k={k} tokens={tokens}: {:.0} GMAC/s", (n * k * tokens) as f64 / secs / 1e9);
            }
        }
    }
    println!("crossover, Q4_1 n=3072 k=576 (GMAC/s): rows, prompt rows, sampled rows");
    let (n, k) = (3072usize, 576usize);
    let mut data = vec![0u8; n * k / 32 * 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = match i % 20 {
            0 | 2 => 0x00,
            1 => 0x20,
            3 => 0xa0,
            _ => next() as u8,
        };
    }
    let Ok(m) = Matrix::from_stored(&WeightArena::new(), DType::Q4_1, &data, n, k, MatmulMode::Fast) else {
        return;
    };
    for rows in [1usize, 2, 4, 8, 16, 32, 64, 128] {
        let x: Vec<f32> = (0..rows * k).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
        let mut out = vec![0f32; rows * n];
        let mut rates = [0f64; 2];
        for (rate, prompt) in rates.iter_mut().zip([true, false]) {
            let mut s = MatmulScratch::default();
            s.prompt_rows = vec![prompt; rows];
            let reps = 4000 / rows;
            c.matmul(&mut out, &x, rows, &m, &mut s);
            let start = Instant::now();
            for _ in 0..reps {
                c.matmul(&mut out, &x, rows, &m, &mut s);
            }
            *rate = (n * k * rows * reps) as f64 / start.elapsed().as_secs_f64() / 1e9;
        }
        println!("{rows:>4} {:>6.0} {:>6.0}", rates[0], rates[1]);
    }
}
