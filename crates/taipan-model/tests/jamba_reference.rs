//! jamba-tiny-a (HF directory and GGUF) against transformers' float32 reference outputs
//! (`tests/fixtures/jamba-tiny-a`, see its README).

use std::path::PathBuf;
use std::sync::OnceLock;
use taipan_kernels::{Compute, MatmulMode};
use taipan_model::{ChatMessage, LoadOptions, Model, RenderOptions, Scratch};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn compute() -> &'static Compute {
    static C: OnceLock<Compute> = OnceLock::new();
    C.get_or_init(|| Compute::new(2))
}

fn hf() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        Model::load(&fixtures().join("jamba-tiny-a"), LoadOptions { mode: MatmulMode::Exact, quantize: None })
            .expect("HF dir loads")
    })
}

fn gguf() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        Model::load(&fixtures().join("jamba-tiny-a.gguf"), LoadOptions { mode: MatmulMode::Exact, quantize: None })
            .expect("GGUF loads")
    })
}

fn json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(rel)).unwrap()).unwrap()
}

/// A float32 tensor from a reference safetensors file.
fn tensor(file: &str, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixtures().join("jamba-tiny-a/reference").join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{file}: no {name}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn prompt(name: &str) -> Vec<u32> {
    let r = json("jamba-tiny-a/reference/reference.json");
    let p = r["prompts"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap();
    p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn logits_all(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut st = m.new_state();
    let mut sc = Scratch::default();
    m.forward(compute(), ids, &mut st, &mut sc, true).unwrap();
    sc.logits().to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn full_sequence_logits_match_within_1e4_for_hf_and_gguf() {
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        for p in ["p1", "p7", "p40"] {
            let (_, want) = tensor("forward.safetensors", &format!("{p}.logits"));
            let got = logits_all(m, &prompt(p));
            let d = max_diff(&got, &want);
            eprintln!("{label} {p}: max |Δ logit| = {d:.2e}");
            assert!(d <= 1e-4, "{label} {p}: logits differ by {d}");
        }
    }
}

#[test]
fn greedy_generation_matches_with_step_logits() {
    let r = json("jamba-tiny-a/reference/reference.json");
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        for g in r["generation"].as_array().unwrap() {
            let p = g["prompt"].as_str().unwrap();
            let want_ids: Vec<u32> =
                g["new_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let (_, steps) = tensor("generate.safetensors", &format!("{p}.step_logits"));
            let vocab = m.vocab_size();
            let mut st = m.new_state();
            let mut sc = Scratch::default();
            m.forward(compute(), &prompt(p), &mut st, &mut sc, false).unwrap();
            let mut got = Vec::new();
            for t in 0..want_ids.len() {
                let d = max_diff(sc.logits(), &steps[t * vocab..(t + 1) * vocab]);
                assert!(d <= 1e-4, "{label} {p} step {t}: logits differ by {d}");
                let next = taipan_kernels_argmax(sc.logits());
                got.push(next);
                m.forward(compute(), &[next], &mut st, &mut sc, false).unwrap();
            }
            assert_eq!(got, want_ids, "{label} {p}");
        }
    }
}

fn taipan_kernels_argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn any_chunked_prefill_equals_one_shot() {
    let ids = prompt("p40");
    let (_, want) = tensor("forward.safetensors", "p40.logits");
    let vocab = hf().vocab_size();
    for split in [vec![13, 27], vec![1, 39], vec![5, 5, 30], vec![39, 1], (0..40).map(|_| 1).collect::<Vec<_>>()] {
        let mut st = hf().new_state();
        let mut sc = Scratch::default();
        let mut at = 0;
        for len in &split {
            hf().forward(compute(), &ids[at..at + len], &mut st, &mut sc, true).unwrap();
            let d = max_diff(sc.logits(), &want[at * vocab..(at + len) * vocab]);
            assert!(d <= 1e-4, "split {split:?} at {at}: {d}");
            at += len;
        }
    }
}

/// Every token's raw bytes (what constrained decoding matches grammars against) spell exactly the
/// text the tokens encode: SentencePiece `▁` as a space, `<0xNN>` pieces as single bytes.
#[test]
fn token_bytes_spell_the_encoded_text() {
    let cases = json("jamba-tiny-a/reference/tokenizer_cases.json");
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        let bytes = m.tokenizer.token_bytes();
        assert_eq!(bytes.len(), m.tokenizer.vocab_size(), "{label}");
        let bos = m.tokenizer.specials.bos.expect("bos") as usize;
        assert_eq!(bytes[bos][0], 0xFF, "{label}: special tokens are marked");
        for c in cases["cases"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let ids = m.tokenizer.encode(text, false).unwrap();
            let spelled: Vec<u8> = ids.iter().flat_map(|&i| bytes[i as usize].clone()).collect();
            // The SentencePiece normaliser prepends one space to any non-empty text.
            let want = if text.is_empty() { String::new() } else { format!(" {text}") };
            assert_eq!(spelled, want.into_bytes(), "{label} {}", c["name"]);
        }
    }
}

/// The GGUF vocabulary runs on our own SentencePiece code, the HF checkpoint on `tokenizers`
/// with the checkpoint's own `tokenizer.json`: the two must agree on every text in both modes,
/// and on decoding any id sequence (byte tokens, specials, with and without skipping them).
#[test]
fn gguf_sentencepiece_agrees_with_the_hf_tokenizer_json() {
    let cases = json("jamba-tiny-a/reference/tokenizer_cases.json");
    let (hf, gguf) = (&hf().tokenizer, &gguf().tokenizer);
    assert_eq!(hf.vocab_size(), gguf.vocab_size());
    let mut texts: Vec<String> =
        cases["cases"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    texts.push("<|startoftext|>plain <|endoftext|> text".into());
    texts.push("  two leading spaces, trailing ones  ".into());
    for text in &texts {
        for special in [true, false] {
            let ids = gguf.encode(text, special).unwrap();
            assert_eq!(ids, hf.encode(text, special).unwrap(), "{text:?} special={special}");
            for skip in [false, true] {
                assert_eq!(gguf.decode(&ids, skip).unwrap(), hf.decode(&ids, skip).unwrap(), "{text:?} {ids:?}");
            }
        }
    }
    // Pseudo-random id runs over the whole vocabulary, low ids (specials, bytes) weighted up.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let vocab = gguf.vocab_size() as u64;
    for _ in 0..2000 {
        let len = 1 + next(12) as usize;
        let ids: Vec<u32> =
            (0..len).map(|_| if next(3) == 0 { next(300) as u32 } else { next(vocab) as u32 }).collect();
        for skip in [false, true] {
            assert_eq!(gguf.decode(&ids, skip).unwrap(), hf.decode(&ids, skip).unwrap(), "{ids:?} skip={skip}");
        }
    }
}

#[test]
fn tokenizer_cases_match() {
    let cases = json("jamba-tiny-a/reference/tokenizer_cases.json");
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        for c in cases["cases"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            let want: Vec<u32> =
                c["ids_no_special"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let got = m.tokenizer.encode(text, true).unwrap();
            assert_eq!(got, want, "{label} {}", c["name"]);
            let with_bos: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(
                with_bos.first().copied(),
                m.tokenizer.specials.bos.filter(|_| m.tokenizer.specials.add_bos),
                "{label}"
            );
        }
        let chat = &cases["chat"];
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let text = m.render_chat(&messages, &RenderOptions::default()).unwrap();
        assert_eq!(text, chat["text"].as_str().unwrap(), "{label} chat");
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
        };
        assert_eq!(m.tokenizer.encode(&text, true).unwrap(), ids(&chat["ids"]), "{label} chat ids");
        let gen = &cases["chat_generation_prompt"];
        let messages: Vec<ChatMessage> = gen["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let text =
            m.render_chat(&messages, &RenderOptions { add_generation_prompt: true, ..Default::default() }).unwrap();
        assert_eq!(text, gen["text"].as_str().unwrap(), "{label} generation prompt");
        assert_eq!(m.tokenizer.encode(&text, true).unwrap(), ids(&gen["ids"]), "{label} generation prompt ids");
    }
}

#[test]
fn q8_0_gguf_matches_its_dequantized_reference() {
    let (_, want) = tensor("forward_q8_0_dequant.safetensors", "p40.logits");
    let path = fixtures().join("jamba-tiny-a-q8_0.gguf");
    // Exact maths on the dequantized weights: the reference is exactly that computation.
    let exact = Model::load(&path, LoadOptions { mode: MatmulMode::Exact, quantize: None }).unwrap();
    let d = max_diff(&logits_all(&exact, &prompt("p40")), &want);
    eprintln!("q8_0 exact: max |Δ logit| = {d:.2e}");
    assert!(d <= 1e-4, "{d}");
    // 8-bit activations: a loose check, as the fixture's README says (logit correlation, argmax).
    let fast = Model::load(&path, LoadOptions { mode: MatmulMode::Fast, quantize: None }).unwrap();
    let got = logits_all(&fast, &prompt("p40"));
    let vocab = fast.vocab_size();
    let (mut agree, mut corr_sum) = (0, 0.0);
    for (g, w) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)) {
        agree += (taipan_kernels_argmax(g) == taipan_kernels_argmax(w)) as usize;
        let (mg, mw) = (g.iter().sum::<f32>() / vocab as f32, w.iter().sum::<f32>() / vocab as f32);
        let cov: f32 = g.iter().zip(w).map(|(a, b)| (a - mg) * (b - mw)).sum();
        let (vg, vw): (f32, f32) = (g.iter().map(|a| (a - mg).powi(2)).sum(), w.iter().map(|b| (b - mw).powi(2)).sum());
        corr_sum += cov / (vg.sqrt() * vw.sqrt());
    }
    let corr = corr_sum / 40.0;
    eprintln!("q8_0 fast: argmax agreement {agree}/40, mean logit correlation {corr:.4}");
    assert!(corr > 0.99 && agree >= 30, "correlation {corr}, argmax agreement {agree}/40");
}

#[test]
fn recurrent_state_is_constant_in_context_length() {
    let m = hf();
    let mut st = m.new_state();
    let mut sc = Scratch::default();
    let s0 = &st;
    let before = s0.recurrent_bytes();
    let ids: Vec<u32> = (0..300).map(|i| 10 + (i * 7) % 4000).collect();
    m.forward(compute(), &ids, &mut st, &mut sc, false).unwrap();
    let s1 = &st;
    assert_eq!(s1.recurrent_bytes(), before);
    // 6 Mamba layers × (3·128 conv + 128·8 ssm) floats.
    assert_eq!(before, 6 * (3 * 128 + 128 * 8) * 4);
    assert!(s1.kv_bytes() >= 2 * 2 * 300 * 32 * 4, "the two attention layers hold keys and values");
}

#[test]
fn per_layer_activations_match_and_report_the_first_divergence() {
    let bytes = std::fs::read(fixtures().join("jamba-tiny-a/reference/activations_p7.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        let mut state = m.new_state();
        let mut sc = Scratch::default();
        sc.set_trace(true);
        m.forward(compute(), &prompt("p7"), &mut state, &mut sc, true).unwrap();
        let mut checked = 0;
        for (name, got) in sc.trace() {
            let Ok(t) = st.tensor(name) else { continue };
            let want: Vec<f32> =
                t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let d = max_diff(got, &want);
            // The trace is in forward order, so the first failure is the first diverging layer.
            assert!(d <= 1e-4, "{label}: first divergence at {name}: max |Δ| = {d}");
            checked += 1;
        }
        assert_eq!(checked, 8 * 5, "{label}: every layer's five activations were compared");
    }
}

#[test]
fn hf_checkpoint_quantized_to_q8_0_at_load_matches_the_q8_0_reference() {
    use taipan_kernels::DType;
    let (_, q8_ref) = tensor("forward_q8_0_dequant.safetensors", "p40.logits");
    let (_, exact_ref) = tensor("forward.safetensors", "p40.logits");
    let m = Model::load(
        &fixtures().join("jamba-tiny-a"),
        LoadOptions { mode: MatmulMode::Exact, quantize: Some(DType::Q8_0) },
    )
    .unwrap();
    let got = logits_all(&m, &prompt("p40"));
    let (to_q8, to_exact) = (max_diff(&got, &q8_ref), max_diff(&got, &exact_ref));
    eprintln!("HF + Q8_0 at load: max |Δ| to the q8_0 reference {to_q8:.3e}, to the exact one {to_exact:.3e}");
    // llama.cpp's converter kept a few small tensors in f16 where we keep f32; otherwise the
    // quantized weights are the same, so the result sits with the q8_0 reference.
    assert!(to_q8 < 0.05 && to_q8 * 10.0 < to_exact, "{to_q8} vs {to_exact}");
}
