//! Shared helpers of the integration tests: where the fixtures and the default model are.

#![allow(dead_code)]

use std::path::PathBuf;

/// The repository's test fixtures (`tests/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn smollm_fixtures() -> PathBuf {
    fixtures_dir().join("smollm2-llamacpp")
}

/// The default model, as `scripts/get-model.sh` places it.
pub fn default_model() -> PathBuf {
    if let Some(p) = std::env::var_os("TAIPAN_MODEL") {
        return PathBuf::from(p);
    }
    let dir = std::env::var_os("TAIPAN_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/taipan/models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "default model missing at {}: run scripts/get-model.sh", path.display());
    path
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reads a little-endian float32 vector from a `.npy` file.
pub fn read_npy_f32(path: PathBuf) -> Vec<f32> {
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not npy", path.display());
    let header_len = match bytes[6] {
        1 => u16::from_le_bytes([bytes[8], bytes[9]]) as usize + 10,
        _ => u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize + 12,
    };
    let header = String::from_utf8_lossy(&bytes[..header_len]);
    assert!(header.contains("'<f4'"), "{}: expected float32, header {header}", path.display());
    bytes[header_len..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The chat-templated prompt ids of one user message.
pub fn chat_ids(m: &taipan_model::Model, text: &str) -> Vec<u32> {
    let opts = taipan_model::RenderOptions { add_generation_prompt: true, ..Default::default() };
    let prompt = m.render_chat(&[taipan_model::ChatMessage::new("user", text)], &opts).unwrap();
    m.tokenizer.encode(&prompt, true).unwrap()
}
