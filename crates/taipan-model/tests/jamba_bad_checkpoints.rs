//! Broken Jamba checkpoints give errors that name the file and the tensor or field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use taipan_model::{LoadOptions, Model};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join("jamba-tiny-a")
}

/// A copy of the fixture directory with its config and tensors edited.
fn variant(
    name: &str,
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit: impl FnOnce(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taipan-bad-jamba-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture_dir();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    let e = Model::load(dir, LoadOptions::default()).expect_err("must fail");
    e.to_string()
}

#[test]
fn missing_tensor_is_named() {
    let dir = variant(
        "missing",
        |_| {},
        |t| {
            t.remove("model.layers.3.mamba.x_proj.weight");
        },
    );
    let msg = load_err(&dir);
    assert!(
        msg.contains("blk.3.ssm_x.weight") && msg.contains("missing") && msg.contains(dir.to_str().unwrap()),
        "{msg}"
    );
}

/// A config and its tensors that disagree on which layers are mixtures of experts: the router
/// that does not belong (or is missing) is named, never silently used or skipped.
#[test]
fn expert_layers_must_match_the_config() {
    let dir = variant("dense-config", |c| c["num_experts"] = serde_json::json!(1), |_| {});
    let msg = load_err(&dir);
    assert!(msg.contains("blk.1.ffn_gate_inp.weight") && msg.contains("dense MLP"), "{msg}");
    let dir = variant(
        "no-router",
        |_| {},
        |t| {
            t.remove("model.layers.3.feed_forward.router.weight");
        },
    );
    let msg = load_err(&dir);
    assert!(msg.contains("blk.3.ffn_gate_inp.weight") && msg.contains("missing"), "{msg}");
}

#[test]
fn wrong_shape_is_named() {
    let dir = variant(
        "shape",
        |_| {},
        |t| {
            let e = t.get_mut("model.layers.2.self_attn.q_proj.weight").unwrap();
            e.1 = vec![32, 128];
        },
    );
    let msg = load_err(&dir);
    assert!(msg.contains("blk.2.attn_q.weight") && msg.contains("shape"), "{msg}");
}

#[test]
fn config_without_a_required_field_is_named() {
    let dir = variant(
        "config",
        |c| {
            c.as_object_mut().unwrap().remove("hidden_size");
        },
        |_| {},
    );
    let msg = load_err(&dir);
    assert!(msg.contains("config.json") && msg.contains("hidden_size"), "{msg}");
    let dir = variant(
        "config2",
        |c| {
            c["attn_layer_offset"] = serde_json::json!(9);
        },
        |_| {},
    );
    assert!(load_err(&dir).contains("attn_layer_offset"));
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = variant(
        "dtype",
        |_| {},
        |t| {
            let e = t.get_mut("model.layers.0.mamba.D").unwrap();
            e.0 = safetensors::Dtype::I32;
        },
    );
    let msg = load_err(&dir);
    assert!(
        msg.contains("model.layers.0.mamba.D") && msg.contains("I32") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

/// The fixture re-saved as bf16 in two shards with an index, as large checkpoints ship.
#[test]
fn sharded_bf16_checkpoints_load_and_agree_with_f32() {
    let dir = std::env::temp_dir().join(format!("taipan-jamba-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture_dir();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            let bf: Vec<u8> = t
                .data()
                .chunks_exact(4)
                .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                .collect();
            (n.clone(), t.shape().to_vec(), bf)
        })
        .collect();
    let half_at = converted.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&converted[..half_at], &converted[half_at..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = part
            .iter()
            .map(|(n, s, b)| {
                (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for (n, _, _) in part.iter() {
            weight_map.insert(n.clone(), serde_json::Value::from(file.clone()));
        }
    }
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"weight_map": weight_map}).to_string())
        .unwrap();
    let bf = Model::load(&dir, LoadOptions::default()).expect("sharded bf16 loads");
    let f32m = Model::load(&src, LoadOptions::default()).unwrap();
    let compute = taipan_kernels::Compute::new(2);
    let ids = [1u32, 1979, 351, 4027, 2543, 595, 298];
    let run = |m: &Model| {
        let mut s = m.new_state();
        let mut sc = taipan_model::Scratch::default();
        m.forward(&compute, &ids, &mut s, &mut sc, false).unwrap();
        sc.logits().to_vec()
    };
    let (a, b) = (run(&bf), run(&f32m));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let argmax = |v: &[f32]| v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best });
    assert!(d < 0.5 && argmax(&a) == argmax(&b), "bf16 vs f32: max |Δ| {d}");
}

/// A synthetic Jamba of larger proportions keeps a constant recurrent state per sequence.
#[test]
fn synthetic_jamba_state_is_constant_in_context_length() {
    let out = std::env::temp_dir().join(format!("taipan-synth-{}.gguf", std::process::id()));
    let spec = taipan_model::synth::SynthJamba::hidden_256();
    let donor = fixture_dir().parent().unwrap().join("jamba-tiny-a.gguf");
    taipan_model::synth::write_synthetic_jamba(&out, &donor, &spec).unwrap();
    let m = Model::load(&out, LoadOptions::default()).unwrap();
    let compute = taipan_kernels::Compute::new(2);
    let mut sizes = Vec::new();
    for len in [16usize, 256, 1024] {
        let mut st = m.new_state();
        let mut sc = taipan_model::Scratch::default();
        let ids: Vec<u32> = (0..len as u32).map(|i| 10 + i % 4000).collect();
        m.forward(&compute, &ids, &mut st, &mut sc, false).unwrap();
        let s = &st;
        assert!(sc.logits().iter().all(|v| v.is_finite()));
        sizes.push((s.recurrent_bytes(), s.kv_bytes()));
    }
    // 7 Mamba layers × (3·512 conv + 512·16 SSM) floats, whatever the length; KV grows.
    assert!(sizes.iter().all(|s| s.0 == 7 * (3 * 512 + 512 * 16) * 4), "{sizes:?}");
    assert!(sizes[2].1 > sizes[0].1);
    let _ = std::fs::remove_file(out);
}

/// Sizes from a config are bounded before anything is allocated from them: a hostile value is an
/// error naming its field, never a panic, an overflow or a huge allocation.
#[test]
fn hostile_sizes_in_config_are_named_errors() {
    let cases: [(&str, serde_json::Value, &str); 6] = [
        ("num_experts", serde_json::json!(0), "num_experts"),
        // More heads than hidden units: a head size of 0.
        ("num_attention_heads", serde_json::json!(128), "head_dim"),
        ("num_hidden_layers", serde_json::json!(1u64 << 40), "num_hidden_layers"),
        ("mamba_expand", serde_json::json!(u64::MAX / 2), "mamba_expand"),
        ("intermediate_size", serde_json::json!(1u64 << 40), "intermediate_size"),
        ("max_position_embeddings", serde_json::json!(1u64 << 50), "max_position_embeddings"),
    ];
    for (field, value, named) in cases {
        let dir = variant(&format!("hostile-{field}"), |c| c[field] = value.clone(), |_| {});
        let msg = load_err(&dir);
        assert!(msg.contains(named), "{field} = {value}: {msg}");
    }
}

#[test]
fn a_chat_template_jinja_file_wins_over_the_tokenizer_config_as_in_transformers() {
    let dir = variant("template-file", |_| {}, |_| {});
    let messages = [taipan_model::ChatMessage::new("user", "Hi")];
    let render = |dir: &Path| {
        let m = Model::load(dir, LoadOptions::default()).expect("loads");
        m.render_chat(&messages, &taipan_model::RenderOptions::default()).expect("renders")
    };
    let from_config = render(&dir);
    std::fs::write(dir.join("chat_template.jinja"), "[file]{% for m in messages %}{{ m.content }}{% endfor %}")
        .unwrap();
    assert_eq!(render(&dir), "[file]Hi");
    // Only the file (as transformers >= 4.47 saves it): still a template.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    assert_eq!(render(&dir), "[file]Hi");
    assert_ne!(from_config, "[file]Hi");
    std::fs::remove_dir_all(dir).unwrap();
}
