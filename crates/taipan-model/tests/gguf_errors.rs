//! GGUF reader: valid files of every metadata type round-trip, and broken files give errors that
//! name the file and the item, never a panic.

use std::path::PathBuf;
use taipan_model::gguf::writer::{to_bytes, TensorSpec};
use taipan_model::gguf::{GgufError, GgufFile, Value};

fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taipan-gguf-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn sample() -> (Vec<(String, Value)>, Vec<TensorSpec>) {
    let md = vec![
        ("general.architecture".to_string(), Value::String("llama".into())),
        ("a.u8".into(), Value::U8(7)),
        ("a.i8".into(), Value::I8(-7)),
        ("a.u16".into(), Value::U16(700)),
        ("a.i16".into(), Value::I16(-700)),
        ("a.u32".into(), Value::U32(70000)),
        ("a.i32".into(), Value::I32(-70000)),
        ("a.f32".into(), Value::F32(0.5)),
        ("a.bool".into(), Value::Bool(true)),
        ("a.u64".into(), Value::U64(1 << 40)),
        ("a.i64".into(), Value::I64(-(1 << 40))),
        ("a.f64".into(), Value::F64(0.25)),
        ("a.strings".into(), Value::Array(vec![Value::String("x".into()), Value::String("yz".into())])),
        ("a.nested".into(), Value::Array(vec![Value::Array(vec![Value::U32(1), Value::U32(2)])])),
    ];
    let f32_data: Vec<u8> = (0..64u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let q8 = {
        let mut b = vec![0u8; 34 * 2];
        b[..2].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
        b
    };
    let tensors = vec![
        TensorSpec { name: "w.f32".into(), dims: vec![16, 4], type_id: 0, data: f32_data },
        TensorSpec { name: "w.q8".into(), dims: vec![64], type_id: 8, data: q8 },
    ];
    (md, tensors)
}

#[test]
fn every_metadata_type_round_trips() {
    let (md, tensors) = sample();
    let p = tmp("ok.gguf", &to_bytes(&md, &tensors));
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.version, 3);
    for (k, v) in &md {
        assert_eq!(f.get(k), Some(v), "{k}");
    }
    assert_eq!(f.get_u64("a.u32").unwrap(), 70000);
    assert_eq!(f.get_f64("a.f32").unwrap(), 0.5);
    assert_eq!(f.get_strings("a.strings").unwrap(), vec!["x", "yz"]);
    let t = f.tensor("w.f32").unwrap();
    assert_eq!((t.dims.clone(), t.bytes), (vec![16, 4], 256));
    let data = f.tensor_data(t);
    assert_eq!(f32::from_le_bytes(data[252..256].try_into().unwrap()), 63.0);
    assert!(matches!(f.get_str("a.u8"), Err(GgufError::WrongKeyType { .. })));
    assert!(matches!(f.get_u64("missing.key"), Err(GgufError::MissingKey { .. })));
    assert!(matches!(f.tensor("nope"), Err(GgufError::MissingTensor { .. })));
    assert!(matches!(f.tensor_shaped("w.f32", &[4, 16]), Err(GgufError::WrongShape { .. })));
}

#[test]
fn version_2_is_accepted() {
    let (md, tensors) = sample();
    let mut bytes = to_bytes(&md, &tensors);
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(GgufFile::open(tmp("v2.gguf", &bytes)).unwrap().version, 2);
}

fn err_of(name: &str, bytes: &[u8]) -> String {
    let e = GgufFile::open(tmp(name, bytes)).expect_err("must fail");
    let msg = e.to_string();
    assert!(msg.contains(name), "error does not name the file: {msg}");
    msg
}

#[test]
fn bad_magic_and_version() {
    let (md, tensors) = sample();
    let mut bytes = to_bytes(&md, &tensors);
    bytes[0] = b'X';
    assert!(err_of("magic.gguf", &bytes).contains("not a GGUF file"));
    let mut bytes = to_bytes(&md, &tensors);
    bytes[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(err_of("version.gguf", &bytes).contains("version 9"));
    assert!(err_of("empty.gguf", &[]).contains("truncated"));
}

#[test]
fn truncation_anywhere_is_an_error_never_a_panic() {
    let (md, tensors) = sample();
    let bytes = to_bytes(&md, &tensors);
    for cut in (0..bytes.len()).step_by(7) {
        let r = GgufFile::open(tmp("cut.gguf", &bytes[..cut]));
        assert!(r.is_err(), "cut at {cut} of {} was accepted", bytes.len());
    }
    let msg = err_of("truncated.gguf", &bytes[..bytes.len() - 10]);
    assert!(msg.contains("w.q8") && msg.contains("past the end"), "{msg}");
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let (md, mut tensors) = sample();
    tensors[1].type_id = 77;
    let msg = err_of("type.gguf", &to_bytes(&md, &tensors));
    assert!(msg.contains("w.q8") && msg.contains("77"), "{msg}");
}

#[test]
fn tensor_out_of_bounds_is_detected() {
    let (md, mut tensors) = sample();
    // Claims more elements than its data holds.
    tensors[1].dims = vec![64 * 1000];
    let msg = err_of("oob.gguf", &to_bytes(&md, &tensors));
    assert!(msg.contains("w.q8") && msg.contains("past the end"), "{msg}");
}

#[test]
fn corrupt_lengths_do_not_allocate_or_panic() {
    let (md, tensors) = sample();
    let bytes = to_bytes(&md, &tensors);
    // The first key's length field sits right after the 24-byte header.
    let mut huge = bytes.clone();
    huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err_of("keylen.gguf", &huge).contains("truncated"));
    // A tensor count far beyond what the file can hold.
    let mut many = bytes.clone();
    many[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let _ = err_of("count.gguf", &many);
    // Rows that are not whole blocks.
    let (md, mut tensors) = sample();
    tensors[1].dims = vec![33];
    assert!(err_of("blocks.gguf", &to_bytes(&md, &tensors)).contains("whole number"));
}

/// Llama hyper-parameters are bounded before the model sizes anything from them (a declared
/// context of 2^50 positions once built a RoPE table that large).
#[test]
fn hostile_llama_hyper_parameters_are_named_errors() {
    use taipan_model::arch::llama::{Family, LlamaConfig};
    let base = |key: &str, value: Value| {
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.embedding_length".into(), Value::U32(64)),
            ("llama.attention.head_count".into(), Value::U32(4)),
            ("llama.block_count".into(), Value::U32(2)),
            ("llama.feed_forward_length".into(), Value::U32(128)),
            ("llama.vocab_size".into(), Value::U32(32)),
            ("llama.context_length".into(), Value::U32(256)),
        ];
        md.retain(|(k, _)| k != key);
        md.push((key.into(), value));
        md
    };
    let ok = GgufFile::open(tmp("llama-ok.gguf", &to_bytes(&base("llama.block_count", Value::U32(2)), &[]))).unwrap();
    assert!(LlamaConfig::from_gguf(&ok, Family::Llama).is_ok());
    for (key, value) in [
        ("llama.context_length", Value::U64(1 << 50)),
        ("llama.block_count", Value::U64(1 << 40)),
        ("llama.feed_forward_length", Value::U64(1 << 40)),
        ("llama.attention.head_count", Value::U32(128)),
        // Optional keys of the wrong type are refused, not read as their default.
        ("llama.rope.freq_base", Value::String("500000".into())),
        ("llama.attention.head_count_kv", Value::Array(vec![Value::U32(4), Value::U32(4)])),
        ("llama.rope.scaling.type", Value::String("longrope".into())),
        ("llama.rope.scaling.type", Value::U32(2)),
        ("llama.attention.sliding_window", Value::U32(4096)),
    ] {
        let name = format!("llama-{key}.gguf");
        let f = GgufFile::open(tmp(&name, &to_bytes(&base(key, value.clone()), &[]))).unwrap();
        let msg = LlamaConfig::from_gguf(&f, Family::Llama).expect_err("refused").to_string();
        let field = key.trim_start_matches("llama.");
        assert!(msg.contains(field) || msg.contains("zero"), "{key} = {value:?}: {msg}");
    }
}
