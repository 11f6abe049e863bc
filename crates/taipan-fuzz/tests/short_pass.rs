//! The fuzz targets' short pass, on stable: every seed, every committed regression input
//! (`corpus/<target>/`), and a fixed number of deterministic mutations of them. A panic here is
//! a crash the long runs would also find; the input that caused it is printed so that it can be
//! committed to `corpus/` with its fix.

use std::path::Path;
use taipan_fuzz::{mutate, seeds, TARGETS};

/// Mutations per target: enough to reach past the seeds' happy paths, few enough for CI.
fn budget(target: &str) -> usize {
    match target {
        "gguf_model" => 6000,
        "hf_model" => 3000,
        "tokenizer" => 6000,
        "chat_template" => 3000,
        _ => 60000,
    }
}

fn committed(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    files.iter().map(|p| std::fs::read(p).expect("corpus file reads")).collect()
}

fn run(name: &str, target: fn(&[u8]), input: &[u8]) {
    let outcome = std::panic::catch_unwind(|| target(input));
    if outcome.is_err() {
        let shown: String = input.iter().take(512).map(|b| format!("{b:02x}")).collect();
        panic!("{name}: crash on an input of {} bytes (hex, first 512): {shown}", input.len());
    }
}

fn pass(name: &str) {
    let target = TARGETS.iter().find(|(n, _)| *n == name).expect("target exists").1;
    let mut inputs = seeds::small(name);
    inputs.extend(committed(name));
    assert!(!inputs.is_empty(), "{name} has seeds");
    for input in inputs.iter().chain(&seeds::large(name)) {
        run(name, target, input);
    }
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ name.len() as u64;
    for k in 0..budget(name) {
        let base = &inputs[k % inputs.len()];
        let other = &inputs[(k / inputs.len()) % inputs.len()];
        let input = mutate(base, other, &mut rng, 1 << 16);
        run(name, target, &input);
    }
    // The large fixtures: a few mutations each (they load slowly).
    for large in seeds::large(name) {
        for _ in 0..20 {
            let input = mutate(&large, &inputs[0], &mut rng, usize::MAX);
            run(name, target, &input);
        }
    }
}

#[test]
fn gguf_model() {
    pass("gguf_model");
}

#[test]
fn hf_model() {
    pass("hf_model");
}

#[test]
fn chat_request() {
    pass("chat_request");
}

#[test]
fn completion_request() {
    pass("completion_request");
}

#[test]
fn chat_template() {
    pass("chat_template");
}

#[test]
fn tokenizer() {
    pass("tokenizer");
}

#[test]
fn tool_stream() {
    pass("tool_stream");
}

#[test]
fn the_tiny_llama_seed_loads_and_generates() {
    let dir = std::env::temp_dir().join(format!("taipan-fuzz-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("tiny.gguf");
    std::fs::write(&p, seeds::tiny_llama_gguf()).unwrap();
    let m = taipan_model::Model::load(&p, Default::default()).expect("the seed is a valid model");
    assert_eq!(m.tokenizer.encode("Hello", false).unwrap(), vec![11]);
    assert!(m.template.is_some());
}
