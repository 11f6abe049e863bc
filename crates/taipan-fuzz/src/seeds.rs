//! Starting inputs for each target: small valid examples (a fuzzer mutates from working inputs
//! much better than from noise) and the repository's real fixtures.

use crate::fixtures;
use taipan_model::gguf::writer::{to_bytes, TensorSpec};
use taipan_model::gguf::Value;

fn f32s(name: &str, dims: &[u64], seed: u32) -> TensorSpec {
    let n: u64 = dims.iter().product();
    let data = (0..n as u32).flat_map(|i| (((i * 7 + seed) % 13) as f32 * 0.01 - 0.06).to_le_bytes()).collect();
    TensorSpec { name: name.into(), dims: dims.to_vec(), type_id: 0, data }
}

/// A complete Llama GGUF that loads: hidden 32, one layer, a 12-token byte-level BPE vocabulary
/// with merges, and a ChatML template.
pub fn tiny_llama_gguf() -> Vec<u8> {
    let (d, ff) = (32u64, 64u64);
    let tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "H", "e", "l", "o", "Ġ", "He", "ll", "llo", "Hello"];
    let vocab = tokens.len() as u64;
    let s = |v: &str| Value::String(v.into());
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s("tiny")),
        ("llama.embedding_length".into(), Value::U32(d as u32)),
        ("llama.attention.head_count".into(), Value::U32(2)),
        ("llama.attention.head_count_kv".into(), Value::U32(1)),
        ("llama.block_count".into(), Value::U32(1)),
        ("llama.feed_forward_length".into(), Value::U32(ff as u32)),
        ("llama.context_length".into(), Value::U32(64)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect())),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array((0..vocab).map(|i| Value::I32(if i < 3 { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(["H e", "l l", "ll o", "He llo"].iter().map(|m| s(m)).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        (
            "tokenizer.chat_template".into(),
            s("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
               {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
        ),
    ];
    let mut tensors = vec![f32s("token_embd.weight", &[d, vocab], 1), f32s("output_norm.weight", &[d], 2)];
    for (k, (name, dims)) in [
        ("attn_norm", vec![d]),
        ("attn_q", vec![d, d]),
        ("attn_k", vec![d, d / 2]),
        ("attn_v", vec![d, d / 2]),
        ("attn_output", vec![d, d]),
        ("ffn_norm", vec![d]),
        ("ffn_gate", vec![d, ff]),
        ("ffn_up", vec![d, ff]),
        ("ffn_down", vec![ff, d]),
    ]
    .into_iter()
    .enumerate()
    {
        tensors.push(f32s(&format!("blk.0.{name}.weight"), &dims, k as u32));
    }
    to_bytes(&md, &tensors)
}

/// A safetensors file holding one small f32 tensor.
fn tiny_safetensors() -> Vec<u8> {
    let header = br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend((0..8).flat_map(|i| (i as f32).to_le_bytes()));
    out
}

fn hf_input(config: &[u8], weights: &[u8]) -> Vec<u8> {
    let mut out = (config.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(config);
    out.extend_from_slice(weights);
    out
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(path)).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

/// Small seeds for `target` (mutated many times in the short pass).
pub fn small(target: &str) -> Vec<Vec<u8>> {
    let texts = |list: &[&str]| list.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
    match target {
        "gguf_model" => vec![tiny_llama_gguf()],
        "hf_model" => vec![hf_input(&read("jamba-tiny-a/config.json"), &tiny_safetensors())],
        "chat_request" => texts(&[
            r#"{"model":"jamba-1.5-large","messages":[{"role":"system","content":"You are an assistant"},{"role":"user","content":"allo"},{"role":"assistant","content":"Hello!"},{"role":"user","content":"what is Coca Cola"}],"documents":[],"tools":[],"n":1,"max_tokens":2048,"temperature":0.4,"top_p":1,"stop":[],"stream":false}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true},"n":2,"seed":7,"logprobs":true,"top_logprobs":3}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"w?"}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}],"tool_choice":"required"}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]},{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c","content":"1"}],"response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"type":"object"}}}}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"documents":[{"content":"d","metadata":{"a":"b"}}],"response_format":{"type":"json_object"},"stop":["\n","END"],"max_tokens":5,"temperature":0,"top_p":0.5}"#,
        ]),
        "completion_request" => texts(&[
            r#"{"model":"m","prompt":"Once upon","max_tokens":8,"temperature":0,"logprobs":2,"echo":true,"stream":true}"#,
            r#"{"model":"m","prompt":[[1,2,3],[4,5]],"n":2,"stop":"x","top_k":5,"seed":1,"guided_json":{"type":"object"}}"#,
            r#"{"model":"m","prompt":["a","b"],"min_tokens":2,"ignore_eos":true,"response_format":{"type":"json_object"}}"#,
        ]),
        "chat_template" => vec![
            read("spec/jamba-chat-template.jinja"),
            b"{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".to_vec(),
            b"{% for t in tools %}{{ t | tojson }}{% endfor %}{{ documents[0].metadata.k }}{{ raise_exception('x') if false }}".to_vec(),
            b"{% set ns = namespace(n=0) %}{% for i in range(100000) %}{% for j in range(100000) %}{% set ns.n = ns.n + 1 %}{% endfor %}{% endfor %}".to_vec(),
        ],
        "tokenizer" => texts(&[
            "Hello, world! 1234567890",
            "  leading and trailing spaces \t\n\n",
            "Zürich, 東京, emoji 🐍🦀, combining e\u{301}, RTL עברית",
            "<|startoftext|><|im_start|>user\nhi<|im_end|>",
            "\u{0}\u{1f}\u{7f}\u{feff}\u{200b}",
        ]),
        "tool_stream" => texts(&[
            "\u{0}Sure.<tool_calls>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"a}\\\"b\"}}, {\"name\": \"add\", \"arguments\": {\"a\": 1}}]</tool_calls>",
            "\u{2}<tool_call>[{\"name\": \"add\", \"arguments\": {\"a\": \"1}}]</tool_call> 2\"}}]</tool_call>",
            "\u{2}{\"name\": \"add\", \"arguments\": \"{\\\"a\\\":1}\"}",
            "\u{0}a <tool box> b <tool_calls>[]</tool_calls>",
            "\u{1} plain answer with no call",
            "\u{4}Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"a}</tool_call>\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n</tool_call>",
            "\u{5}<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1}}</tool_call> trailing <tool_call>{",
        ]),
        _ => vec![],
    }
}

/// Large real inputs, run as they are and mutated a few times.
pub fn large(target: &str) -> Vec<Vec<u8>> {
    match target {
        "gguf_model" => vec![read("jamba-tiny-a-q8_0.gguf")],
        "hf_model" => vec![hf_input(&read("jamba-tiny-a/config.json"), &read("jamba-tiny-a/model.safetensors"))],
        _ => vec![],
    }
}
