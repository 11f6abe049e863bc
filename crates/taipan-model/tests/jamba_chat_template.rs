//! The Jamba 1.5+ chat template (`tests/fixtures/spec/jamba-chat-template.jinja`) reproduces the 10 golden
//! renderings of `tests/fixtures/spec/jamba-chat-template.examples.json` byte for byte.

use std::path::PathBuf;
use taipan_model::ChatTemplate;

fn spec(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join("spec").join(name)
}

#[test]
fn ten_golden_renderings_byte_for_byte() {
    let src = std::fs::read_to_string(spec("jamba-chat-template.jinja")).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(spec("jamba-chat-template.examples.json")).unwrap()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let t = ChatTemplate::new(&src, c["bos_token"].as_str().unwrap(), "<|endoftext|>").unwrap();
        let ctx = c["inputs"].as_object().unwrap().clone();
        let got = t.render_context(&ctx).unwrap_or_else(|e| panic!("{}: {e}", c["name"]));
        assert_eq!(got, c["rendered"].as_str().unwrap(), "{}", c["name"]);
    }
}

/// A template from a model file that loops (almost) forever fails its rendering in bounded
/// time instead of hanging the request; a long real conversation still renders.
#[test]
fn a_runaway_template_runs_out_of_fuel() {
    let hostile = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x";
    let t = ChatTemplate::new(hostile, "<s>", "</s>").unwrap();
    let started = std::time::Instant::now();
    let err = t.render(&[taipan_model::ChatMessage::new("user", "hi")], &Default::default()).expect_err("stopped");
    assert!(err.to_string().contains("fuel"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let src = std::fs::read_to_string(spec("jamba-chat-template.jinja")).unwrap();
    let t = ChatTemplate::new(&src, "<|startoftext|>", "<|endoftext|>").unwrap();
    let messages: Vec<_> = (0..2000)
        .map(|i| taipan_model::ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "Hello there."))
        .collect();
    let rendered = t.render(&messages, &Default::default()).expect("a 2,000-message conversation renders");
    assert!(rendered.matches("Hello there.").count() == 2000);
}
