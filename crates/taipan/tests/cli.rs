//! End to end through the `taipan` binary on the default model.

use std::path::PathBuf;
use std::process::Command;

fn default_model() -> PathBuf {
    if let Some(p) = std::env::var_os("TAIPAN_MODEL") {
        return PathBuf::from(p);
    }
    let dir = std::env::var_os("TAIPAN_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/taipan/models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "default model missing at {}: run scripts/get-model.sh", p.display());
    p
}

fn taipan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_taipan")).args(args).output().expect("run taipan");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_answers_from_the_default_model() {
    let model = default_model();
    let m = model.to_str().unwrap();
    let (ok, out, err) = taipan(&[
        "generate",
        "-m",
        m,
        "--exact",
        "-t",
        "2",
        "-p",
        "What is the capital of France?",
        "-n",
        "32",
        "--stats",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "The capital of France is Paris.");
    assert!(err.contains("finish: Stop"), "{err}");
    // Fast kernels, seeded sampling: the same seed gives the same text, another seed may not.
    let args = |seed: &'static str| {
        [
            "generate",
            "-m",
            m,
            "-t",
            "2",
            "-p",
            "Write a short poem.",
            "-n",
            "24",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
        ]
    };
    let a = taipan(&args("7"));
    let b = taipan(&args("7"));
    assert!(a.0 && b.0);
    assert_eq!(a.1, b.1);
    assert!(!a.1.trim().is_empty());
}

#[test]
fn generate_from_a_messages_file_and_raw_prompt() {
    let model = default_model();
    let m = model.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("taipan-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let msgs = dir.join("m.json");
    std::fs::write(&msgs, r#"[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello."}]"#)
        .unwrap();
    let (ok, out, err) = taipan(&["generate", "-m", m, "--messages", msgs.to_str().unwrap(), "-n", "16"]);
    assert!(ok && !out.trim().is_empty(), "{err}");
    let (ok, out, err) = taipan(&["generate", "-m", m, "--raw", "-p", "The quick brown fox", "-n", "8"]);
    assert!(ok && !out.trim().is_empty(), "{err}");
    std::fs::write(&msgs, "not json").unwrap();
    let (ok, _, err) = taipan(&["generate", "-m", m, "--messages", msgs.to_str().unwrap()]);
    assert!(!ok && err.contains("m.json"), "{err}");
}

#[test]
fn inspect_lists_metadata_and_tensor_types() {
    let model = default_model();
    let (ok, out, err) = taipan(&["inspect", model.to_str().unwrap(), "--tensors"]);
    assert!(ok, "{err}");
    assert!(out.contains("general.architecture = \"llama\""));
    assert!(out.contains("Q4_1:  210 tensors"), "{out}");
    assert!(out.contains("Q8_0:    1 tensors"));
    assert!(out.contains("blk.0.attn_q.weight"));
}

/// A reader that stops early (`taipan inspect … | head -1`) ends the listing quietly: no panic
/// about a broken pipe, exit status 0. The read end is closed before taipan has written anything,
/// so its first write meets a pipe without readers.
#[test]
fn inspect_into_a_pipe_closed_early_is_not_a_panic() {
    let model = default_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_taipan"))
        .args(["inspect", model.to_str().unwrap(), "--tensors"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run taipan");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");
}

#[test]
fn bench_and_perplexity_report_numbers() {
    let model = default_model();
    let m = model.to_str().unwrap();
    let (ok, out, err) =
        taipan(&["bench", "-m", m, "--prompt", "32", "--gen", "8", "--reps", "1", "-t", "1,2", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(v[1]["decode_tok_s"].as_f64().unwrap() > 0.0);
    let text = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2-llamacpp/ppl_text.txt");
    let (ok, out, err) = taipan(&["perplexity", m, text.to_str().unwrap(), "--ctx", "256", "-t", "2"]);
    assert!(ok, "{err}");
    assert!(out.contains("PPL = "), "{out}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (ok, _, err) = taipan(&["generate", "-m", "/nonexistent/model.gguf", "-p", "hi"]);
    assert!(!ok && err.contains("not found") && err.contains("get-model"), "{err}");
    let dir = std::env::temp_dir().join(format!("taipan-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00short").unwrap();
    let (ok, _, err) = taipan(&["inspect", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("bad.gguf") && err.contains("truncated"), "{err}");
    assert!(!err.contains("panicked"));
}

/// `--json` and `--regex` constrain what `generate` writes, even sampled and on a tight budget.
#[test]
fn generate_follows_json_and_regex_constraints() {
    let model = default_model();
    let m = model.to_str().unwrap();
    for seed in ["1", "2", "3"] {
        let base = ["generate", "-m", m, "-t", "2", "--temperature", "1.2", "--seed", seed];
        let (ok, out, err) = taipan(&[&base[..], &["-p", "Describe a cat.", "--json", "-n", "40"]].concat());
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert!(v.is_object(), "{out}");
        let args =
            [&base[..], &["-p", "Is water wet?", "--regex", "(Yes|No), because [a-z ]+\\.", "-n", "14"]].concat();
        let (ok, out, err) = taipan(&args);
        assert!(ok, "{err}");
        let answer = out.trim_end_matches('\n');
        let rest = answer
            .strip_prefix("Yes, because ")
            .or_else(|| answer.strip_prefix("No, because "))
            .unwrap_or_else(|| panic!("{answer}"));
        let body = rest.strip_suffix('.').unwrap_or_else(|| panic!("{answer}"));
        assert!(!body.is_empty() && body.chars().all(|c| c.is_ascii_lowercase() || c == ' '), "{answer}");
    }
    let (ok, _, err) = taipan(&["generate", "-m", m, "-p", "x", "--regex", "(", "-n", "4"]);
    assert!(!ok && err.contains("invalid regex"), "{err}");
}

/// `taipan chat` with its input piped: answers each line, `/clear` forgets the conversation, and
/// the entered lines are kept in the history file for the next session.
fn chat(model: &str, history: &std::path::Path, input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_taipan"))
        .args(["chat", "-m", model, "-n", "12", "--temperature", "0", "-t", "2", "--history"])
        .arg(history)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run taipan chat");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write input");
    let out = child.wait_with_output().expect("wait for taipan chat");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn chat_keeps_the_conversation_until_cleared_and_remembers_lines() {
    let model = default_model();
    let m = model.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("taipan-chat-{}", std::process::id()));
    let history = dir.join("nested").join("chat_history");
    let alone = chat(m, &history, "Name a colour.\n");
    let answers: Vec<String> = chat(m, &history, "My name is Ada.\n/clear\nName a colour.\n/exit\nnot read\n")
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    // After /clear the question stands alone, so greedy decoding answers it as before.
    assert_eq!(answers[1], alone.trim_end());
    let kept = std::fs::read_to_string(&history).expect("history file");
    for line in ["Name a colour.", "My name is Ada.", "/clear"] {
        assert!(kept.contains(line), "{kept}");
    }
    assert!(!kept.contains("not read"), "{kept}");
    std::fs::remove_dir_all(dir).unwrap();
}
