//! Fuzz targets: every input a client or a model file hands taipan, with the properties that must
//! hold for any bytes at all. A target returns normally for every input it refuses with an
//! error; a panic, a hang or a broken property is a finding.
//!
//! The same functions are driven two ways: coverage-guided by libFuzzer (`fuzz/`, nightly
//! `cargo fuzz`, for long runs; figures in RELIABILITY.md) and, on stable in the test suite, by
//! [`mutate`] over the [`seeds`] and the committed regression inputs (`corpus/`), a short pass
//! that CI runs every time.

pub mod seeds;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use taipan_api::tools::{parse_answer, reassemble, ToolStream, ToolSyntax};
use taipan_api::{parse_chat, parse_completion, Dialect};
use taipan_model::chat::{ChatMessage, ChatTemplate, RenderOptions};
use taipan_model::tokenizer::Tokenizer;
use taipan_model::{LoadOptions, Model};

/// A fuzz target: any bytes in, a panic only for a finding.
pub type Target = fn(&[u8]);

/// Every target, by name (the names of `fuzz/fuzz_targets/*.rs` and `corpus/*`).
pub const TARGETS: [(&str, Target); 7] = [
    ("gguf_model", gguf_model),
    ("hf_model", hf_model),
    ("chat_request", chat_request),
    ("completion_request", completion_request),
    ("chat_template", chat_template),
    ("tokenizer", tokenizer),
    ("tool_stream", tool_stream),
];

/// The repository's test fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fresh scratch path for this process (inputs that must be files).
fn scratch(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("taipan-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{}-{name}", N.fetch_add(1, Ordering::Relaxed)))
}

/// What a loaded model must survive: its template rendered, text tokenized and decoded.
fn exercise(model: &Model) {
    if let Some(t) = &model.template {
        let _ = t.render(&[ChatMessage::new("user", "hi")], &RenderOptions::default());
    }
    if let Ok(ids) = model.tokenizer.encode("Hello, world 123!", false) {
        assert!(ids.iter().all(|&id| (id as usize) < model.tokenizer.vocab_size()));
        let _ = model.tokenizer.decode(&ids, false);
    }
    let _ = model.cache_spec();
}

/// A GGUF file, loaded as a model: reader, hyper-parameters, tensors, tokenizer, template.
pub fn gguf_model(data: &[u8]) {
    let path = scratch("model.gguf");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(model) = Model::load(&path, LoadOptions::default()) {
        exercise(&model);
    }
    let _ = std::fs::remove_file(&path);
}

/// A Hugging Face directory: the input is a little-endian u16 length, that many bytes of
/// `config.json`, then `model.safetensors`; the tokenizer files are the fixture's.
pub fn hf_model(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize;
    let Some(config) = data.get(2..2 + n) else { return };
    let weights = &data[2 + n..];
    let dir = scratch("hf");
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let src = fixtures().join("jamba-tiny-a");
    let ok = std::fs::write(dir.join("config.json"), config).is_ok()
        && std::fs::write(dir.join("model.safetensors"), weights).is_ok()
        && std::fs::copy(src.join("tokenizer_config.json"), dir.join("tokenizer_config.json")).is_ok()
        && std::os::unix::fs::symlink(
            src.join("tokenizer.json").canonicalize().unwrap_or_default(),
            dir.join("tokenizer.json"),
        )
        .is_ok();
    if ok {
        if let Ok(model) = Model::load(&dir, LoadOptions::default()) {
            exercise(&model);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A chat request body in both dialects: accepted or refused with an error naming a field, and
/// an accepted one keeps what it was given within the documented ranges.
pub fn chat_request(data: &[u8]) {
    for dialect in [Dialect::Ai21, Dialect::OpenAi] {
        match parse_chat(data, dialect) {
            Ok(r) => {
                assert!(!r.messages.is_empty(), "a chat request without messages was accepted");
                assert!(r.n >= 1, "n = {}", r.n);
                assert!((0.0..=2.0).contains(&r.temperature), "temperature {}", r.temperature);
                assert!(r.top_p > 0.0 && r.top_p <= 1.0, "top_p {}", r.top_p);
            }
            Err(e) => assert!(!e.message.is_empty(), "an error without a message"),
        }
    }
}

/// A legacy completions body.
pub fn completion_request(data: &[u8]) {
    match parse_completion(data) {
        Ok(r) => assert!(!r.prompts.is_empty(), "a completion without a prompt was accepted"),
        Err(e) => assert!(!e.message.is_empty(), "an error without a message"),
    }
}

/// A chat template from a model file, rendered over a conversation with tools and documents:
/// refused or rendered, within the fuel limit (a hostile loop ends as an error, not a hang).
pub fn chat_template(data: &[u8]) {
    let source = String::from_utf8_lossy(data);
    let Ok(template) = ChatTemplate::new(&source, "<s>", "</s>") else { return };
    let mut tool_message = ChatMessage::new("assistant", "");
    tool_message.extra.insert(
        "tool_calls".into(),
        json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]),
    );
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi {{ x }} {% raw %}"),
        tool_message,
        ChatMessage::new("tool", "42"),
    ];
    let opts = RenderOptions {
        add_generation_prompt: true,
        tools: Some(json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])),
        documents: Some(json!([{"content": "doc", "metadata": {"k": "v"}}])),
        extra: Default::default(),
    };
    let _ = template.render(&messages, &opts);
}

fn fixture_tokenizers() -> &'static (Tokenizer, Tokenizer) {
    static T: OnceLock<(Tokenizer, Tokenizer)> = OnceLock::new();
    T.get_or_init(|| {
        let gguf = Model::load(&fixtures().join("jamba-tiny-a-q8_0.gguf"), LoadOptions::default())
            .expect("the fixture GGUF loads")
            .tokenizer;
        let json = Tokenizer::from_tokenizer_json(
            &fixtures().join("jamba-tiny-a/tokenizer.json"),
            taipan_model::tokenizer::SpecialTokens::default(),
        )
        .expect("the fixture tokenizer.json loads");
        (gguf, json)
    })
}

/// Text through the tokenizer built from GGUF metadata and through `tokenizer.json` of the same
/// model: the same ids, every id in the vocabulary, and the ids' bytes spell the text again.
pub fn tokenizer(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (gguf, json) = fixture_tokenizers();
    for parse_special in [false, true] {
        let a = gguf.encode(&text, parse_special).expect("any text encodes");
        let b = json.encode(&text, parse_special).expect("any text encodes");
        assert_eq!(a, b, "GGUF and tokenizer.json tokenizers disagree on {text:?}");
        assert!(a.iter().all(|&id| (id as usize) < gguf.vocab_size()));
        let decoded = gguf.decode(&a, false).expect("ids just encoded decode");
        // SentencePiece writes spaces as U+2581, so that character in the text itself comes back
        // as a space (as in every implementation of this vocabulary).
        if !parse_special && !text.contains('\u{2581}') {
            assert_eq!(decoded, text, "decode(encode(text)) differs");
            // This SentencePiece vocabulary marks the start with a space that decoding drops.
            let spelled: Vec<u8> = a.iter().flat_map(|&id| gguf.bytes_of(id)).collect();
            let want = if text.is_empty() { String::new() } else { format!(" {text}") };
            assert_eq!(String::from_utf8_lossy(&spelled), want, "the ids' bytes do not spell the text");
        }
    }
}

fn tools() -> Vec<Value> {
    ["add", "get_weather"]
        .iter()
        .map(|n| json!({"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}))
        .collect()
}

/// A model's answer streamed in pieces of any sizes through the tool-call parser adds up to the
/// answer parsed whole: the same calls, the same arguments, the same text (unless the stream
/// had already sent calls when a later one turned out malformed).
pub fn tool_stream(data: &[u8]) {
    let Some((&choice, rest)) = data.split_first() else { return };
    let syntax = match choice % 6 {
        0 => ToolSyntax::jamba(false),
        1 => ToolSyntax::jamba(true),
        2 => ToolSyntax::generic(false),
        3 => ToolSyntax::generic(true),
        4 => ToolSyntax::hermes(false),
        _ => ToolSyntax::hermes(true),
    };
    let text = String::from_utf8_lossy(rest).into_owned();
    let counter = std::cell::Cell::new(0);
    let mut new_id = || {
        counter.set(counter.get() + 1);
        format!("call-{}", counter.get())
    };
    let whole = parse_answer(&text, &syntax, &tools(), &mut new_id);
    counter.set(0);
    let mut stream = ToolStream::new(syntax, tools());
    let mut pieces = Vec::new();
    // Piece sizes from the text's own bytes, so that the fuzzer steers the split as well.
    let chars: Vec<char> = text.chars().collect();
    let mut at = 0;
    while at < chars.len() {
        let step = 1 + (chars[at] as usize % 7);
        let piece: String = chars[at..(at + step).min(chars.len())].iter().collect();
        pieces.extend(stream.push(&piece, &mut new_id));
        at += step;
    }
    pieces.extend(stream.finish(&mut new_id));
    let (content, calls) = reassemble(pieces).expect("a stream sends its pieces in order");
    if whole.calls.is_empty() && !calls.is_empty() {
        // A later call turned out malformed after earlier ones were streamed: the whole answer
        // is text, while the stream keeps what it sent (ToolStream's documented contract; with
        // tools, the grammar keeps real answers from getting here).
        return;
    }
    assert_eq!(calls, whole.calls, "streamed calls differ from the whole answer's for {text:?}");
    assert_eq!(content, whole.content.unwrap_or_default(), "streamed text differs for {text:?}");
}

/// A small deterministic mutator for the stable short pass: bit flips, byte edits, inserted
/// interesting values, chunk duplication and deletion, splices from another input.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut u64, max_len: usize) -> Vec<u8> {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let mut out = input.to_vec();
    let edits = 1 + next() % 4;
    for _ in 0..edits {
        let len = out.len().max(1);
        let at = (next() % len as u64) as usize;
        match next() % 8 {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << (next() % 8);
            }
            1 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] = next() as u8;
            }
            2 => {
                const INTERESTING: [u64; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0xffff_ffff, u64::MAX];
                let v = INTERESTING[(next() % 8) as usize];
                let width = [1usize, 2, 4, 8][(next() % 4) as usize];
                let at = at.min(out.len());
                let end = (at + width).min(out.len());
                out.splice(at..end, v.to_le_bytes()[..width].iter().copied());
            }
            3 if !out.is_empty() => {
                let end = (at + 1 + (next() % 16) as usize).min(out.len());
                out.drain(at.min(out.len() - 1)..end);
            }
            4 if !out.is_empty() => {
                let start = at.min(out.len() - 1);
                let end = (start + 1 + (next() % 32) as usize).min(out.len());
                let chunk = out[start..end].to_vec();
                let to = (next() % (out.len() as u64 + 1)) as usize;
                out.splice(to..to, chunk);
            }
            5 if !other.is_empty() => {
                let start = (next() % other.len() as u64) as usize;
                let end = (start + 1 + (next() % 64) as usize).min(other.len());
                let to = at.min(out.len());
                out.splice(to..to, other[start..end].iter().copied());
            }
            6 => {
                const BYTES: &[u8] = b"{}[]\":,<>%\\\x00\xff";
                out.insert(at.min(out.len()), BYTES[(next() % BYTES.len() as u64) as usize]);
            }
            _ => out.truncate(at),
        }
    }
    out.truncate(max_len);
    out
}
