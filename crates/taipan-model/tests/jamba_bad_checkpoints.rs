//! Broken Jamba checkpoints give errors that name the file and the tensor or field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use taipan_model::{LoadOptions, Model};

fn fixture_dir() -> PathBuf {
    std::env::var_os("TAIPAN_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
        .join("fixtures/jamba-tiny-a")
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
