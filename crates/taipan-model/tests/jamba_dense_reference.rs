//! jamba-tiny-dense — Jamba Reasoning 3B's form (no experts, one KV head, a ChatML template that
//! opens a `<think>` block, Hermes tool calls) — against transformers' float32 outputs, for the
//! Hugging Face directory and the GGUF llama.cpp's converter made of it
//! (`scripts/fixtures/jamba_tiny_dense.py`).

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

fn exact() -> LoadOptions {
    LoadOptions { mode: MatmulMode::Exact, quantize: None }
}

fn hf() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(&fixtures().join("jamba-tiny-dense"), exact()).expect("HF dir loads"))
}

fn gguf() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load(&fixtures().join("jamba-tiny-dense.gguf"), exact()).expect("GGUF loads"))
}

fn reference() -> &'static serde_json::Value {
    static R: OnceLock<serde_json::Value> = OnceLock::new();
    R.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures().join("jamba-tiny-dense/reference/reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

fn tensor(file: &str, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixtures().join("jamba-tiny-dense/reference").join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{file}: no {name}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn prompts() -> Vec<(String, String, Vec<u32>)> {
    reference()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["text"].as_str().unwrap().to_string(), ids(&p["ids"])))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn argmax(x: &[f32]) -> u32 {
    (0..x.len()).fold(0, |best, i| if x[i] > x[best] { i } else { best }) as u32
}

#[test]
fn both_forms_read_as_a_dense_jamba_with_one_kv_head() {
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        let taipan_model::Arch::Jamba(j) = &m.arch else { panic!("{label}: not a Jamba") };
        let c = &j.config;
        assert!(!c.moe.contains(&true), "{label}: no layer has experts");
        assert_eq!((c.heads, c.kv_heads), (4, 1), "{label}");
        assert_eq!(c.attention.iter().filter(|&&a| a).count(), 2, "{label}");
        assert_eq!(m.vocab_size(), 4100, "{label}");
        // The GGUF lists only `<|endoftext|>`; ChatML's `<|im_end|>` ends a turn in both forms.
        for stop in [2, 5] {
            assert!(m.tokenizer.specials.stop_ids.contains(&stop), "{label}: {stop} stops");
        }
    }
}

#[test]
fn logits_match_transformers_within_1e4() {
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        for (name, _, prompt) in prompts() {
            let want = tensor("forward.safetensors", &format!("{name}.logits"));
            let mut st = m.new_state();
            let mut sc = Scratch::default();
            m.forward(compute(), &prompt, &mut st, &mut sc, true).unwrap();
            let d = max_diff(sc.logits(), &want);
            eprintln!("{label} {name}: max |Δ logit| = {d:.2e}");
            assert!(d <= 1e-4, "{label} {name}: logits differ by {d}");
        }
    }
}

#[test]
fn greedy_generation_is_identical() {
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        for g in reference()["generation"].as_array().unwrap() {
            let name = g["prompt"].as_str().unwrap();
            let want = ids(&g["new_ids"]);
            let steps = tensor("generate.safetensors", &format!("{name}.step_logits"));
            let prompt = prompts().into_iter().find(|p| p.0 == name).unwrap().2;
            let vocab = m.vocab_size();
            let mut st = m.new_state();
            let mut sc = Scratch::default();
            m.forward(compute(), &prompt, &mut st, &mut sc, false).unwrap();
            let mut got = Vec::new();
            for t in 0..want.len() {
                let d = max_diff(sc.logits(), &steps[t * vocab..(t + 1) * vocab]);
                assert!(d <= 1e-4, "{label} {name} step {t}: logits differ by {d}");
                let next = argmax(sc.logits());
                got.push(next);
                m.forward(compute(), &[next], &mut st, &mut sc, false).unwrap();
            }
            assert_eq!(got, want, "{label} {name}");
        }
    }
}

/// The prompts tokenize as transformers tokenized them, the added `<think>`/`<tool_call>` tokens
/// included (the chat prompt's user text holds a literal `<think>`, which transformers matches as
/// the added token too).
#[test]
fn prompts_tokenize_as_transformers_did() {
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        for (name, text, want) in prompts() {
            let mut got = m.tokenizer.encode(&text, true).unwrap();
            if name != "chat" {
                got.insert(0, m.tokenizer.specials.bos.expect("bos"));
            }
            assert_eq!(got, want, "{label} {name}");
        }
        for (tag, id) in reference()["added_tokens"].as_object().unwrap() {
            assert_eq!(m.tokenizer.token_id(tag), Some(id.as_u64().unwrap() as u32), "{label} {tag}");
            assert!(!m.tokenizer.is_special(id.as_u64().unwrap() as u32), "{label} {tag} is an ordinary added token");
        }
    }
}

/// The chat template renders every recorded conversation exactly as transformers did: tools as
/// JSON lines, Hermes tool calls, tool results as user turns, thinking dropped from past turns,
/// the generation prompt opening `<think>`.
#[test]
fn chat_template_renders_as_transformers() {
    let text = std::fs::read_to_string(fixtures().join("jamba-tiny-dense/reference/chat_renderings.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    for (label, m) in [("hf", hf()), ("gguf", gguf())] {
        let t = m.template.as_ref().expect("a chat template");
        for case in &cases {
            let messages: Vec<ChatMessage> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|msg| {
                    let mut extra = msg.as_object().unwrap().clone();
                    let role = extra.remove("role").unwrap();
                    let content = extra.remove("content").unwrap();
                    ChatMessage { role: role.as_str().unwrap().into(), content, extra }
                })
                .collect();
            let opts = RenderOptions {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                tools: case.get("tools").cloned(),
                ..Default::default()
            };
            let got = t.render(&messages, &opts).unwrap();
            assert_eq!(got, case["text"].as_str().unwrap(), "{label} {}", case["name"]);
        }
    }
}

/// Every way a config says "dense" loads the same model: one expert (the fixture's own form),
/// or many experts with an expert period that reaches past the last layer.
#[test]
fn dense_config_forms_load_the_same_model() {
    let src = fixtures().join("jamba-tiny-dense");
    let dir = std::env::temp_dir().join(format!("taipan-dense-forms-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["num_experts"] = 16.into();
    config["expert_layer_period"] = 64.into();
    config["expert_layer_offset"] = 40.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let m = Model::load(&dir, exact()).expect("a period past the last layer is dense");
    let _ = std::fs::remove_dir_all(&dir);
    let (_, _, prompt) = prompts().into_iter().find(|p| p.0 == "p40").unwrap();
    let logits = |m: &Model| {
        let mut st = m.new_state();
        let mut sc = Scratch::default();
        m.forward(compute(), &prompt, &mut st, &mut sc, true).unwrap();
        sc.logits().to_vec()
    };
    assert_eq!(logits(&m), logits(hf()));
}
