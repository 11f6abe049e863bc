//! SmolLM2-135M-Instruct (Q4_1 GGUF) against llama.cpp's recorded outputs
//! (`shared/fixtures/smollm2-llamacpp`, whose README defines both tiers of tolerance).
//!
//! Tier 1 runs the exact maths (f32 activations, dequantized weights) against the `f32dq`
//! reference; tier 2 runs the production kernels (8-bit activations) against `q4_1`.

mod common;

use common::*;
use serde_json::Value;
use std::sync::OnceLock;
use taipan_engine::eval::perplexity;
use taipan_engine::sampler::argmax;
use taipan_kernels::ops::log_softmax;
use taipan_kernels::{Compute, MatmulMode};
use taipan_model::{ChatMessage, LoadOptions, Model, RenderOptions, Scratch};

fn compute() -> &'static Compute {
    static C: OnceLock<Compute> = OnceLock::new();
    C.get_or_init(|| Compute::new(2))
}

fn model(mode: MatmulMode) -> &'static Model {
    static EXACT: OnceLock<Model> = OnceLock::new();
    static FAST: OnceLock<Model> = OnceLock::new();
    let cell = if mode == MatmulMode::Exact { &EXACT } else { &FAST };
    cell.get_or_init(|| {
        Model::load(&default_model(), LoadOptions { mode, quantize: None }).expect("default model loads")
    })
}

fn greedy() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| read_json(smollm_fixtures().join("greedy.json")))
}

/// Log-probabilities after every position of `ids` (one prefill).
fn all_logprobs(m: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut state = m.new_state();
    let mut scratch = Scratch::default();
    m.forward(compute(), ids, &mut state, &mut scratch, true).expect("forward");
    let v = m.vocab_size();
    scratch
        .logits()
        .chunks_exact(v)
        .map(|row| {
            let mut lp = vec![0f32; v];
            log_softmax(&mut lp, row);
            lp
        })
        .collect()
}

/// Free-running greedy decode of up to `n` tokens, stopping after `eos`.
fn greedy_ids(m: &Model, prompt: &[u32], n: usize, eos: u32) -> Vec<u32> {
    let mut state = m.new_state();
    let mut scratch = Scratch::default();
    m.forward(compute(), prompt, &mut state, &mut scratch, false).expect("prefill");
    let mut out = Vec::new();
    while out.len() < n {
        let next = argmax(scratch.logits());
        out.push(next);
        if next == eos || out.len() == n {
            break;
        }
        m.forward(compute(), &[next], &mut state, &mut scratch, false).expect("decode");
    }
    out
}

/// Per-step maxima of |ours − reference| over the reference's top-10, teacher-forced.
fn teacher_forced_diffs(m: &Model, prompt: &Value, reference: &str) -> (Vec<f32>, Vec<f32>) {
    let r = &prompt["references"][reference];
    let prompt_ids = ids(&prompt["prompt_ids"]);
    let generated = ids(&r["generated_ids"]);
    let mut seq = prompt_ids.clone();
    seq.extend(&generated[..generated.len() - 1]);
    let lps = all_logprobs(m, &seq);
    let mut step_max = Vec::new();
    let mut pooled = Vec::new();
    for (k, (top_ids, top_lps)) in
        r["top10_ids"].as_array().unwrap().iter().zip(r["top10_logprobs"].as_array().unwrap()).enumerate()
    {
        let row = &lps[prompt_ids.len() - 1 + k];
        let mut worst = 0f32;
        for (id, want) in ids(top_ids).iter().zip(top_lps.as_array().unwrap()) {
            let d = (row[*id as usize] - want.as_f64().unwrap() as f32).abs();
            pooled.push(d);
            worst = worst.max(d);
        }
        step_max.push(worst);
    }
    (step_max, pooled)
}

fn quantile(v: &mut [f32], q: f64) -> f32 {
    v.sort_by(f32::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[test]
fn tokenizer_matches_llama_cpp_on_every_case() {
    let m = model(MatmulMode::Fast);
    let cases = read_json(smollm_fixtures().join("tokenize.json"));
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 25);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let name = c["name"].as_str().unwrap();
        assert_eq!(m.tokenizer.encode(text, true).unwrap(), ids(&c["ids_parse_special"]), "{name}: parse_special");
        assert_eq!(m.tokenizer.encode(text, false).unwrap(), ids(&c["ids_plain"]), "{name}: plain");
        let back = m.tokenizer.decode(&ids(&c["ids_parse_special"]), false).unwrap();
        assert_eq!(back, c["detokenize_parse_special"].as_str().unwrap(), "{name}: detokenize");
        let back = m.tokenizer.decode(&ids(&c["ids_plain"]), false).unwrap();
        assert_eq!(back, c["detokenize_plain"].as_str().unwrap(), "{name}: detokenize plain");
    }
}

#[test]
fn chat_template_renders_like_jinja2() {
    let m = model(MatmulMode::Fast);
    let fixture = read_json(smollm_fixtures().join("chat_template.json"));
    let convs = fixture["conversations"].as_array().unwrap();
    assert_eq!(convs.len(), 7);
    for c in convs {
        let name = c["name"].as_str().unwrap();
        let messages: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|msg| ChatMessage::new(msg["role"].as_str().unwrap(), msg["content"].as_str().unwrap()))
            .collect();
        let opts = RenderOptions {
            add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap(),
            ..Default::default()
        };
        let text = m.render_chat(&messages, &opts).unwrap();
        assert_eq!(text, c["jinja2_render"].as_str().unwrap(), "{name}");
        assert_eq!(m.tokenizer.encode(&text, true).unwrap(), ids(&c["jinja2_prompt_ids"]), "{name}: ids");
        if c["identical"].as_bool().unwrap() {
            assert_eq!(text, c["llama_cpp_apply_template"].as_str().unwrap(), "{name}: llama.cpp");
        }
    }
}

#[test]
fn greedy_prompts_tokenize_to_the_recorded_ids() {
    let m = model(MatmulMode::Fast);
    for p in greedy()["prompts"].as_array().unwrap() {
        let rendered = p["rendered_prompt"].as_str().unwrap();
        assert_eq!(m.tokenizer.encode(rendered, true).unwrap(), ids(&p["prompt_ids"]), "{}", p["name"]);
    }
}

#[test]
fn tier1_exact_teacher_forced_top10_within_0_02_nats() {
    let m = model(MatmulMode::Exact);
    let mut overall = 0f32;
    for p in greedy()["prompts"].as_array().unwrap() {
        let near: Vec<usize> = p["references"]["f32dq"]["near_tie_steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let (steps, _) = teacher_forced_diffs(m, p, "f32dq");
        for (k, d) in steps.iter().enumerate() {
            if !near.contains(&k) {
                assert!(*d <= 0.02, "{} step {k}: top-10 differs by {d} nats", p["name"]);
            }
            overall = overall.max(*d);
        }
    }
    eprintln!("tier 1 teacher-forced: max |Δ logprob| = {overall:.2e} nats");
}

#[test]
fn tier1_exact_greedy_identical_in_at_least_7_of_8() {
    let m = model(MatmulMode::Exact);
    let eos = greedy()["eos_id"].as_u64().unwrap() as u32;
    let mut identical = 0;
    for p in greedy()["prompts"].as_array().unwrap() {
        let r = &p["references"]["f32dq"];
        let want = ids(&r["generated_ids"]);
        let got = greedy_ids(m, &ids(&p["prompt_ids"]), 64, eos);
        if got == want {
            identical += 1;
            continue;
        }
        let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        let near: Vec<usize> =
            r["near_tie_steps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert!(near.contains(&first), "{}: diverges at step {first}, which is not a near tie", p["name"]);
    }
    eprintln!("tier 1 greedy: {identical}/8 identical");
    assert!(identical >= 7, "only {identical}/8 greedy continuations identical");
}

fn last_position_check(mode: MatmulMode, reference: &str, bound: f32) {
    let m = model(mode);
    let fixture = read_json(smollm_fixtures().join("logits.json"));
    for name in ["len1", "len16", "len200"] {
        let p = &fixture["prompts"][name];
        let want = read_npy_f32(smollm_fixtures().join(p["files"][reference]["npy"].as_str().unwrap()));
        let lps = all_logprobs(m, &ids(&p["prompt_ids"]));
        let got = lps.last().unwrap();
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        let worst = order[..100].iter().map(|&i| (got[i] - want[i]).abs()).fold(0f32, f32::max);
        eprintln!("{reference} {name}: top-100 max |Δ| = {worst:.3e}");
        assert!(worst <= bound, "{name}: last-position top-100 differs by {worst} nats (bound {bound})");
    }
}

#[test]
fn tier1_exact_last_position_vectors_within_0_02() {
    last_position_check(MatmulMode::Exact, "f32dq", 0.02);
}

fn ppl_check(mode: MatmulMode, reference: &str, rel: f64) {
    let m = model(mode);
    let fixture = read_json(smollm_fixtures().join("perplexity.json"));
    let text = std::fs::read_to_string(smollm_fixtures().join("ppl_text.txt")).unwrap();
    let tokens = m.tokenizer.encode(&text, false).unwrap();
    assert_eq!(tokens, ids(&fixture["token_ids"]), "perplexity text tokenization");
    let p = perplexity(m, compute(), &tokens, 512).unwrap();
    let want = fixture["results"][reference]["final_ppl"].as_f64().unwrap();
    eprintln!("{reference}: PPL {:.4} vs {want} ({:+.3}%)", p.ppl, 100.0 * (p.ppl / want - 1.0));
    assert_eq!(p.scored_tokens, 5 * 255);
    assert!((p.ppl / want - 1.0).abs() <= rel, "PPL {} vs reference {want}", p.ppl);
}

#[test]
fn tier1_exact_perplexity_within_half_a_percent() {
    ppl_check(MatmulMode::Exact, "f32dq", 0.005);
}

#[test]
fn tier2_fast_teacher_forced_within_bounds() {
    let m = model(MatmulMode::Fast);
    let mut pooled_all = Vec::new();
    for p in greedy()["prompts"].as_array().unwrap() {
        let (mut steps, pooled) = teacher_forced_diffs(m, p, "q4_1");
        let med = quantile(&mut steps, 0.5);
        assert!(med <= 0.45, "{}: median of per-step maxima {med} > 0.45", p["name"]);
        pooled_all.extend(pooled);
    }
    let (med, p99, max) =
        (quantile(&mut pooled_all, 0.5), quantile(&mut pooled_all, 0.99), quantile(&mut pooled_all, 1.0));
    eprintln!("tier 2 pooled |Δ|: median {med:.3}, p99 {p99:.3}, max {max:.3}");
    assert!(med <= 0.15 && p99 <= 0.75 && max <= 2.0, "median {med}, p99 {p99}, max {max}");
}

#[test]
fn tier2_fast_greedy_identical_up_to_first_near_tie() {
    let m = model(MatmulMode::Fast);
    let eos = greedy()["eos_id"].as_u64().unwrap() as u32;
    for p in greedy()["prompts"].as_array().unwrap() {
        let r = &p["references"]["q4_1"];
        let want = ids(&r["generated_ids"]);
        let near = r["near_tie_steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .min()
            .unwrap_or(want.len());
        let got = greedy_ids(m, &ids(&p["prompt_ids"]), near.min(want.len()), eos);
        let n = near.min(want.len());
        assert_eq!(
            &got[..n.min(got.len())],
            &want[..n.min(got.len())],
            "{}: before first near tie (step {near})",
            p["name"]
        );
    }
}

#[test]
fn tier2_fast_last_position_vectors_within_1_nat() {
    last_position_check(MatmulMode::Fast, "q4_1", 1.0);
}

#[test]
fn tier2_fast_perplexity_within_one_percent() {
    ppl_check(MatmulMode::Fast, "q4_1", 0.01);
}

#[test]
fn streaming_detokenizer_never_splits_characters() {
    let m = model(MatmulMode::Fast);
    let text = "Emoji 👩‍👩‍👧 and accents: café, naïve; 日本語のテキスト; done.";
    let ids = m.tokenizer.encode(text, false).unwrap();
    let mut dec = taipan_engine::IncrementalDecoder::new(true);
    let mut out = String::new();
    for &id in &ids {
        let piece = dec.push(&m.tokenizer, id);
        assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
        out.push_str(&piece);
    }
    out.push_str(&dec.flush(&m.tokenizer));
    assert_eq!(out, text);
}

#[test]
fn context_overflow_and_bad_ids_are_errors() {
    let m = model(MatmulMode::Fast);
    let mut state = m.new_state();
    let mut scratch = Scratch::default();
    assert!(m.forward(compute(), &[u32::MAX], &mut state, &mut scratch, false).is_err());
    assert!(m.forward(compute(), &[], &mut state, &mut scratch, false).is_err());
    let too_long = vec![1u32; m.context_length() + 1];
    assert!(m.forward(compute(), &too_long, &mut state, &mut scratch, false).is_err());
    assert_eq!(state.len(), 0, "a failed call leaves the state unchanged");
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let m = model(MatmulMode::Exact);
    let ids: Vec<u32> = ids(&greedy()["prompts"][0]["prompt_ids"]);
    let one = all_logprobs(m, &ids);
    let mut state = m.new_state();
    let mut scratch = Scratch::default();
    for chunk in ids.chunks(5) {
        m.forward(compute(), chunk, &mut state, &mut scratch, false).unwrap();
    }
    let mut last = vec![0f32; m.vocab_size()];
    log_softmax(&mut last, scratch.logits());
    let worst = last.iter().zip(one.last().unwrap()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "chunked prefill differs by {worst}");
}
