//! `tokenizer.ggml.pre`: every family we accept splits text as llama.cpp's regular expressions
//! do, and every other name is refused with an error that names it.

use taipan_model::gguf::writer::to_bytes;
use taipan_model::gguf::{GgufFile, Value};
use taipan_model::tokenizer::{Tokenizer, TokenizerError};

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the rest are shifted
/// past U+0100 (so a space is "Ġ" and a newline "Ċ").
fn byte_char(b: u8) -> char {
    let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable {
        return b as char;
    }
    let shifted = (0u16..=255)
        .filter(|&c| {
            let c = c as u8;
            !((b'!'..=b'~').contains(&c) || (0xA1..=0xAC).contains(&c) || (0xAE..=0xFF).contains(&c))
        })
        .position(|c| c == b as u16)
        .unwrap_or(0);
    char::from_u32(256 + shifted as u32).unwrap_or('?')
}

fn byte_level(s: &str) -> String {
    s.bytes().map(byte_char).collect()
}

/// A GGUF holding only a byte-level vocabulary: every single byte, plus `whole` pieces, and no
/// merges, so a piece comes out as one id only when the pre-tokenizer cut exactly it and the
/// family takes whole pieces from the vocabulary.
fn vocab_file(dir: &std::path::Path, pre: Option<&str>, whole: &[&str]) -> std::path::PathBuf {
    vocab_file_with_merges(dir, pre, whole, &[])
}

fn vocab_file_with_merges(
    dir: &std::path::Path,
    pre: Option<&str>,
    whole: &[&str],
    merges: &[&str],
) -> std::path::PathBuf {
    let mut tokens: Vec<String> = (0u8..=255).map(|b| byte_char(b).to_string()).collect();
    tokens.extend(whole.iter().map(|w| byte_level(w)));
    let s = |v: &str| Value::String(v.into());
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s("llama")),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.iter().map(|m| s(m)).collect())),
    ];
    if let Some(p) = pre {
        md.push(("tokenizer.ggml.pre".into(), s(p)));
    }
    let path = dir.join(format!("{}.gguf", pre.unwrap_or("none")));
    std::fs::write(&path, to_bytes(&md, &[])).expect("write vocab file");
    path
}

/// A fresh directory for one test's files.
fn scratch_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("taipan-pre-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn pieces(tk: &Tokenizer, text: &str) -> Vec<String> {
    let ids = tk.encode(text, false).expect("encode");
    ids.iter().map(|&i| tk.decode(&[i], false).expect("decode")).collect()
}

#[test]
fn llama3_splits_digits_in_threes_and_keeps_newlines_with_punctuation() {
    let dir = scratch_dir();
    // Single bytes are in the vocabulary already.
    let whole = ["Hello", " world", "123", "45", "!!\n\n"];
    let tk = Tokenizer::from_gguf(&GgufFile::open(vocab_file(&dir, Some("llama-bpe"), &whole)).unwrap()).unwrap();
    assert_eq!(pieces(&tk, "Hello world 12345!!\n\n"), ["Hello", " world", " ", "123", "45", "!!\n\n"]);
    assert!(tk.specials.add_bos, "Llama 3's family adds BOS unless the file says otherwise");
}

#[test]
fn qwen2_splits_every_digit() {
    let dir = scratch_dir();
    let whole = ["Hello", " world", "12", "123"];
    let tk = Tokenizer::from_gguf(&GgufFile::open(vocab_file(&dir, Some("qwen2"), &whole)).unwrap()).unwrap();
    // Without whole-piece lookup the five-letter word falls apart into bytes; digits are single.
    let got = pieces(&tk, "Hello 123");
    assert_eq!(got[got.len() - 3..], ["1", "2", "3"]);
    assert!(!tk.specials.add_bos);
}

#[test]
fn gpt2_and_default_split_as_llama_cpp_does() {
    let dir = scratch_dir();
    // The GPT-2 expression keeps a run of digits whole, so merges can join all five; llama.cpp's
    // "default" (also what a file without the key gets) cuts digit runs into threes first.
    let digits = ["12", "123", "1234", "12345"];
    let merges = ["1 2", "12 3", "123 4", "1234 5"];
    let open = |pre| {
        let path = vocab_file_with_merges(&dir, pre, &digits, &merges);
        Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap()
    };
    assert_eq!(pieces(&open(Some("gpt-2")), "12345"), ["12345"]);
    assert_eq!(pieces(&open(Some("default")), "12345"), ["123", "4", "5"]);
    assert_eq!(pieces(&open(None), "12345"), ["123", "4", "5"]);
    assert_eq!(pieces(&open(Some("smollm")), "12345"), ["1", "2", "3", "4", "5"]);
}

#[test]
fn unknown_pre_tokenizers_are_refused_by_name() {
    let dir = scratch_dir();
    for name in ["deepseek-coder", "tekken", "gpt-4o", "no-such-family"] {
        let file = GgufFile::open(vocab_file(&dir, Some(name), &[])).unwrap();
        match Tokenizer::from_gguf(&file) {
            Err(e @ TokenizerError::UnsupportedPre { .. }) => {
                let message = e.to_string();
                assert!(message.contains(name) && message.contains("llama-bpe"), "{message}");
            }
            Err(other) => panic!("{name}: wrong error {other}"),
            Ok(_) => panic!("{name}: accepted a pre-tokenizer we do not implement"),
        }
    }
}

#[test]
fn a_merge_outside_the_vocabulary_is_refused_naming_the_file_and_the_line() {
    let dir = scratch_dir();
    let path = vocab_file_with_merges(&dir, Some("gpt-2"), &[], &["a q"]);
    let e = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).expect_err("refused").to_string();
    assert!(e.contains(&path.display().to_string()) && e.contains("tokenizer.ggml.merges[0]"), "{e}");
    assert!(!e.contains("tokenizer: "), "{e}");
}
