//! Jamba's batched forward pass: many sequences in one pass over a shared cache (paged attention
//! blocks, one recurrent-state slot each) give every row the logits that sequence gets alone.

use std::path::PathBuf;
use taipan_kernels::{Compute, MatmulMode};
use taipan_model::{BatchItem, Cache, LoadOptions, Logits, Model, Scratch};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Sixteen sequences of mixed lengths, each split into a first part and a rest; the rest is one
/// token (a decode step) for some, a chunk for others.
fn workload(vocab: u32) -> Vec<(Vec<u32>, usize)> {
    (0..16u32)
        .map(|i| {
            let len = 2 + (i as usize * 7) % 37;
            let tokens: Vec<u32> = (0..len as u32).map(|t| 5 + (t * 131 + i * 977) % (vocab - 5)).collect();
            let split = if i % 3 == 0 { len - 1 } else { 1 + (i as usize * 5) % (len - 1) };
            (tokens, split)
        })
        .collect()
}

/// Per sequence, the logits of every token of its rest, computed alone.
fn alone(m: &Model, compute: &Compute, work: &[(Vec<u32>, usize)]) -> Vec<Vec<f32>> {
    work.iter()
        .map(|(tokens, split)| {
            let mut st = m.new_state();
            let mut sc = Scratch::default();
            m.forward(compute, &tokens[..*split], &mut st, &mut sc, false).unwrap();
            m.forward(compute, &tokens[*split..], &mut st, &mut sc, true).unwrap();
            sc.logits().to_vec()
        })
        .collect()
}

/// The same, every sequence in one batch per part over a shared cache. Slots and blocks are
/// handed out in a scrambled order so that nothing depends on a sequence's index.
fn batched(m: &Model, compute: &Compute, work: &[(Vec<u32>, usize)]) -> Vec<Vec<f32>> {
    let bs = 16;
    let per_seq = 3;
    let mut cache = Cache::new(&m.cache_spec(), bs, per_seq * work.len(), work.len());
    let tables: Vec<Vec<u32>> = (0..work.len())
        .map(|i| (0..per_seq).map(|k| (k * work.len() + (i * 7) % work.len()) as u32).collect())
        .collect();
    let slots: Vec<u32> = (0..work.len()).map(|i| ((i * 5 + 3) % work.len()) as u32).collect();
    let mut sc = Scratch::default();
    let first: Vec<BatchItem<'_>> = work
        .iter()
        .enumerate()
        .map(|(i, (tokens, split))| BatchItem {
            tokens: &tokens[..*split],
            start: 0,
            blocks: &tables[i],
            state_slot: Some(slots[i]),
            logits: Logits::None,
            prompt: *split > 1,
        })
        .collect();
    m.forward_batch(compute, &first, &mut cache, &mut sc).unwrap();
    let rest: Vec<BatchItem<'_>> = work
        .iter()
        .enumerate()
        .map(|(i, (tokens, split))| BatchItem {
            tokens: &tokens[*split..],
            start: *split,
            blocks: &tables[i],
            state_slot: Some(slots[i]),
            logits: Logits::All,
            prompt: tokens.len() - split > 1,
        })
        .collect();
    m.forward_batch(compute, &rest, &mut cache, &mut sc).unwrap();
    let vocab = m.vocab_size();
    let mut out = Vec::new();
    let mut row = 0;
    for (tokens, split) in work {
        let n = tokens.len() - split;
        out.push(sc.logits()[row * vocab..(row + n) * vocab].to_vec());
        row += n;
    }
    out
}

fn check(m: &Model, label: &str) {
    let compute = Compute::new(2);
    let work = workload(m.vocab_size() as u32);
    let (want, got) = (alone(m, &compute, &work), batched(m, &compute, &work));
    let mut worst = 0f32;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.len(), g.len(), "{label}: sequence {i}");
        let d = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
        assert!(d <= 1e-5, "{label}: sequence {i}: max |Δ logit| {d:e} between batched and alone");
    }
    eprintln!("{label}: 16 sequences batched vs alone: max |Δ logit| = {worst:e}");
}

#[test]
fn tiny_jamba_batched_rows_equal_single_sequence_rows() {
    let m = Model::load(&fixtures().join("jamba-tiny-a"), LoadOptions { mode: MatmulMode::Exact, quantize: None })
        .expect("jamba-tiny-a loads");
    check(&m, "jamba-tiny-a (f32)");
    let q = Model::load(&fixtures().join("jamba-tiny-a-q8_0.gguf"), LoadOptions::default()).expect("q8_0 loads");
    check(&q, "jamba-tiny-a q8_0 (packed int8 kernels)");
}

#[test]
fn dense_tiny_jamba_batched_rows_equal_single_sequence_rows() {
    let exact = LoadOptions { mode: MatmulMode::Exact, quantize: None };
    let m = Model::load(&fixtures().join("jamba-tiny-dense"), exact).expect("jamba-tiny-dense loads");
    check(&m, "jamba-tiny-dense (f32, one KV head, no experts)");
}

#[test]
fn synthetic_jamba_batched_rows_equal_single_sequence_rows() {
    let out = std::env::temp_dir().join(format!("taipan-synth-batched-{}.gguf", std::process::id()));
    let spec = taipan_model::synth::SynthJamba::hidden_256();
    taipan_model::synth::write_synthetic_jamba(&out, &fixtures().join("jamba-tiny-a.gguf"), &spec).unwrap();
    let m = Model::load(&out, LoadOptions::default()).unwrap();
    let _ = std::fs::remove_file(&out);
    check(&m, "synthetic Jamba, hidden 256 (Q8_0, packed int8 kernels)");
}

#[test]
fn dense_single_kv_head_jamba_batched_rows_equal_single_sequence_rows() {
    let out = std::env::temp_dir().join(format!("taipan-synth-dense-{}.gguf", std::process::id()));
    let spec = taipan_model::synth::SynthJamba::dense_one_kv_head_256();
    taipan_model::synth::write_synthetic_jamba(&out, &fixtures().join("jamba-tiny-a.gguf"), &spec).unwrap();
    // The file says 1 expert and 2 used per token, as a converter writes a dense config.
    let m = Model::load(&out, LoadOptions::default()).expect("a dense Jamba with one KV head loads");
    let _ = std::fs::remove_file(&out);
    check(&m, "dense synthetic Jamba, one KV head, hidden 256 (Q8_0)");
}

#[test]
fn bad_batches_are_refused_not_run() {
    let m = Model::load(&fixtures().join("jamba-tiny-a"), LoadOptions { mode: MatmulMode::Exact, quantize: None })
        .expect("jamba-tiny-a loads");
    let compute = Compute::new(1);
    let mut cache = Cache::new(&m.cache_spec(), 16, 4, 2);
    let mut sc = Scratch::default();
    let table = [0u32, 1];
    let item = |slot: Option<u32>| BatchItem {
        tokens: &[5, 6],
        start: 0,
        blocks: &table,
        state_slot: slot,
        logits: Logits::Last,
        prompt: true,
    };
    let err = |items: &[BatchItem<'_>], cache: &mut Cache| {
        m.forward_batch(&compute, items, cache, &mut Scratch::default()).unwrap_err().to_string()
    };
    assert!(err(&[item(None)], &mut cache).contains("state slot"));
    assert!(err(&[item(Some(7))], &mut cache).contains("outside the pool"));
    assert!(err(&[item(Some(1)), item(Some(1))], &mut cache).contains("share a state slot"));
    let short = BatchItem {
        tokens: &[5; 40],
        start: 0,
        blocks: &table,
        state_slot: Some(0),
        logits: Logits::Last,
        prompt: true,
    };
    assert!(err(&[short], &mut cache).contains("block table"));
    let other = [2u32, 3];
    let second = BatchItem { blocks: &other, ..item(Some(1)) };
    m.forward_batch(&compute, &[item(Some(0)), second], &mut cache, &mut sc).expect("a good batch runs");
}
