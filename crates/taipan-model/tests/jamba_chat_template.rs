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
