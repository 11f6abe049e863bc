//! Our byte-level BPE against Hugging Face `tokenizers` running the same vocabulary, merges and
//! pre-tokenizer (the SmolLM2 GGUF translated into `tokenizer.json` form, as taipan itself did
//! before it had its own BPE): the same ids for thousands of generated strings (words, digit runs,
//! whitespace runs, punctuation, code, accents, CJK, emoji, special-token text), with special
//! tokens parsed and as plain text, and the same text back from decoding.

use serde_json::{json, Map, Value};
use std::path::PathBuf;
use taipan_model::gguf::{GgufFile, Value as GgufValue};
use taipan_model::tokenizer::Tokenizer;

fn default_model() -> PathBuf {
    let dir = std::env::var_os("TAIPAN_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/taipan/models"));
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// SmolLM2's pre-tokenizer (`smollm`): single digits, then GPT-2's expression.
const SMOLLM_SPLITS: [&str; 2] = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"];

fn hugging_face(file: &GgufFile) -> tokenizers::Tokenizer {
    assert_eq!(file.get("tokenizer.ggml.pre").and_then(GgufValue::as_str), Some("smollm"));
    let tokens = file.get_strings("tokenizer.ggml.tokens").expect("tokens");
    let types: Vec<u64> = match file.get("tokenizer.ggml.token_type") {
        Some(GgufValue::Array(items)) => items.iter().map(|v| v.as_u64().expect("type")).collect(),
        _ => vec![1; tokens.len()],
    };
    let added: Vec<Value> = (0..tokens.len())
        .filter(|&i| types[i] == 3 || types[i] == 4)
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), json!(i));
    }
    let mut steps: Vec<Value> = SMOLLM_SPLITS
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    steps.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": file.get_strings("tokenizer.ggml.merges").expect("merges")}
    });
    spec.to_string().parse().expect("tokenizers builds the same vocabulary")
}

/// Strings built from pieces that stress the splitting and the merges.
fn cases() -> Vec<String> {
    const PARTS: [&str; 40] = [
        "the",
        " The",
        "quick",
        " brown",
        "fox's",
        " they'll",
        "I'M",
        "don't",
        "12",
        "2026",
        "3.14159",
        "1,000,000",
        " ",
        "  ",
        "    ",
        "\t",
        "\n",
        "\n\n",
        " \n ",
        "\r\n",
        "!",
        "?!",
        "...",
        "\"quoted\"",
        "(a, b)",
        "{\"k\": [1, 2]}",
        "fn main() {",
        "    return x;",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "é",
        "naïve",
        "Ünïcödé",
        "日本語",
        "中文字",
        "🙂",
        "👍🏽",
        "e\u{301}",
        "ſ",
    ];
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut out: Vec<String> = PARTS.iter().map(|s| s.to_string()).collect();
    for _ in 0..3000 {
        let n = 1 + (next() % 12) as usize;
        out.push((0..n).map(|_| PARTS[(next() % PARTS.len() as u64) as usize]).collect());
    }
    out.push("a".repeat(3000));
    out.push(" ".repeat(257) + "x");
    out.push("9".repeat(100));
    out
}

#[test]
fn our_bpe_encodes_and_decodes_as_tokenizers_does() {
    let path = default_model();
    assert!(path.exists(), "{} is missing: run scripts/get-model.sh", path.display());
    let file = GgufFile::open(&path).expect("open the GGUF");
    let ours = Tokenizer::from_gguf(&file).expect("our tokenizer");
    let mut theirs = hugging_face(&file);
    for text in cases() {
        let special = theirs.encode(text.as_str(), false).expect("encode").get_ids().to_vec();
        assert_eq!(ours.encode(&text, true).expect("encode"), special, "special {text:?}");
        theirs.set_encode_special_tokens(true);
        let plain = theirs.encode(text.as_str(), false).expect("encode").get_ids().to_vec();
        theirs.set_encode_special_tokens(false);
        assert_eq!(ours.encode(&text, false).expect("encode"), plain, "plain {text:?}");
        for ids in [&special, &plain] {
            for skip in [false, true] {
                assert_eq!(ours.decode(ids, skip).expect("decode"), theirs.decode(ids, skip).expect("decode"));
            }
        }
    }
}
