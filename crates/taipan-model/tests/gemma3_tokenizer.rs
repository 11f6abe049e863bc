//! Gemma 3's SentencePiece vocabulary (262,144 pieces, byte fallback, no space prefix) tokenizes
//! exactly as llama.cpp does: ids recorded by `bench/gemma3_tokens.py` with llama-tokenize on the
//! same GGUF, with special-token text parsed and as plain text.
//!
//! The model is the optional second one (`scripts/get-gemma3.sh`, which `scripts/test.sh` runs);
//! without it this test fails and says how to fetch it, rather than passing untested.

use std::path::PathBuf;
use taipan_model::gguf::GgufFile;
use taipan_model::tokenizer::Tokenizer;

fn model_path() -> PathBuf {
    let dir = std::env::var_os("TAIPAN_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/taipan/models"));
    dir.join("gemma-3-270m-q4_k_m.gguf")
}

#[test]
fn gemma3_tokenizes_like_llama_cpp() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gemma3-llamacpp/tokenize.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&fixture).expect("fixture")).expect("json");
    let path = model_path();
    assert!(path.exists(), "{} is missing: run scripts/get-gemma3.sh (scripts/test.sh does)", path.display());
    let tk = Tokenizer::from_gguf(&GgufFile::open(&path).expect("open the GGUF")).expect("tokenizer");
    let cases = json["cases"].as_array().expect("cases");
    assert!(cases.len() >= 30);
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
    };
    for case in cases {
        let text = case["text"].as_str().expect("text");
        assert_eq!(tk.encode(text, false).expect("encode"), ids(&case["ids_plain"]), "plain {text:?}");
        assert_eq!(tk.encode(text, true).expect("encode"), ids(&case["ids_parse_special"]), "special {text:?}");
    }
}
