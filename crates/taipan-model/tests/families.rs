//! One tiny GGUF per Llama-family architecture (`tests/fixtures/families/`, written with random
//! f32 weights by `bench/family_fixtures.py`), each answered by llama.cpp on the same file: the
//! log-probabilities of 12 greedy steps after a 24-token prompt must match within the tier-2
//! bound of the SmolLM2 reference tests (top-10 |Δ| pooled: median ≤ 0.15, p99 ≤ 0.75,
//! max ≤ 2.0 nats), and a few strings must tokenize to llama.cpp's ids.
//!
//! Between them the files cover Llama 3's `llama-bpe` vocabulary and RoPE frequency factors, GQA,
//! Qwen 2's q/k/v biases and YaRN scaling, Qwen 3's q/k norms, linear scaling and untied output,
//! and Gemma 3's SentencePiece vocabulary, embedding scale, post-norms, GELU, wide heads, sliding
//! window (narrower than the prompt, with its own RoPE base) and logit soft-capping.

use std::path::PathBuf;
use std::sync::OnceLock;
use taipan_kernels::ops::log_softmax;
use taipan_kernels::Compute;
use taipan_model::arch::llama::Family;
use taipan_model::{Arch, LoadOptions, Model, Scratch};

fn compute() -> &'static Compute {
    static C: OnceLock<Compute> = OnceLock::new();
    C.get_or_init(|| Compute::new(2))
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/families")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Teacher-forced |Δ| of llama.cpp's top-10 log-probabilities at every decode step.
fn diffs(name: &str, family: Family) -> Vec<f64> {
    let m = Model::load(&dir().join(format!("{name}.gguf")), LoadOptions::default()).expect("loads");
    let Arch::Llama(inner) = &m.arch else { panic!("{name}: not the Llama family") };
    assert_eq!(inner.config.family, family);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join(format!("{name}.json"))).expect("answers"))
            .expect("json");
    for case in json["tokenize"].as_array().expect("tokenize") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(m.tokenizer.encode(text, false).expect("encode"), ids(&case["ids"]), "{name}: {text:?}");
    }
    let vocab = m.vocab_size();
    let (mut state, mut scratch) = (m.new_state(), Scratch::default());
    let mut lp = vec![0f32; vocab];
    m.forward(compute(), &ids(&json["prompt_ids"]), &mut state, &mut scratch, false).expect("prefill");
    let mut out = Vec::new();
    let mut compared = 0;
    for (step, (want, &next)) in
        json["logprobs"].as_array().expect("steps").iter().zip(&ids(&json["output_ids"])).enumerate()
    {
        // llama-server gives no probabilities for a token that ends in incomplete UTF-8.
        if want.is_null() {
            m.forward(compute(), &[next], &mut state, &mut scratch, false).expect("decode");
            continue;
        }
        compared += 1;
        let want: Vec<f64> = want.as_array().expect("row").iter().map(|v| v.as_f64().expect("lp")).collect();
        assert_eq!(want.len(), vocab);
        log_softmax(&mut lp, &scratch.logits()[..vocab]);
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        for &t in &order[..10] {
            out.push((lp[t] as f64 - want[t]).abs());
        }
        let ours = lp.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32);
        let margin = want[order[0]] - want[order[1]];
        if margin > 0.1 {
            assert_eq!(ours, Some(next), "{name}: step {step} picks another token (llama.cpp's margin {margin:.3})");
        }
        m.forward(compute(), &[next], &mut state, &mut scratch, false).expect("decode");
    }
    assert!(compared >= 6, "{name}: only {compared} steps have llama.cpp's probabilities");
    out
}

fn check(name: &str, family: Family) {
    let mut d = diffs(name, family);
    let (med, p99, max) = (quantile(&mut d, 0.5), quantile(&mut d, 0.99), quantile(&mut d, 1.0));
    println!("{name}: top-10 |Δ logprob| vs llama.cpp: median {med:.2e}, p99 {p99:.2e}, max {max:.2e}");
    assert!(med <= 0.15 && p99 <= 0.75 && max <= 2.0, "{name}: median {med}, p99 {p99}, max {max}");
}

#[test]
fn llama3_with_rope_factors_matches_llama_cpp() {
    check("llama3", Family::Llama);
}

#[test]
fn qwen2_with_biases_and_yarn_matches_llama_cpp() {
    check("qwen2", Family::Qwen2);
}

#[test]
fn qwen3_with_qk_norms_and_linear_scaling_matches_llama_cpp() {
    check("qwen3", Family::Qwen3);
}

#[test]
fn gemma3_with_sliding_window_and_softcap_matches_llama_cpp() {
    check("gemma3", Family::Gemma3);
}
