//! Loading a Hugging Face model directory: `config.json`, safetensors weights, `tokenizer.json`,
//! `tokenizer_config.json` (chat template, special tokens) and `generation_config.json` (end ids).

use crate::arch::jamba::{hf_name, Jamba, JambaConfig};
use crate::tokenizer::{SpecialTokens, Tokenizer, TokenizerError};
use crate::weights::SafetensorsDir;
use crate::{Arch, ChatTemplate, LoadOptions, Model, ModelError};
use serde_json::Value;
use std::path::Path;

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Config {
        path: path.into(),
        field: "(file)".into(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.into(),
        field: "(json)".into(),
        message: e.to_string(),
    })
}

fn optional_json(path: &Path) -> Result<Value, ModelError> {
    if path.exists() {
        read_json(path)
    } else {
        Ok(Value::Null)
    }
}

/// `eos_token_id` as an int or a list.
fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

/// A special token given as a string or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

pub(crate) fn load_dir(dir: &Path, opts: LoadOptions) -> Result<Model, ModelError> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "jamba" {
        return Err(ModelError::UnsupportedArch { path: config_path, arch: model_type.to_string() });
    }
    let jc = JambaConfig::from_hf(&config_path, &config)?;
    let weights = SafetensorsDir::open(dir, &hf_name)?;
    let jamba = Jamba::load(&weights, jc, opts)?;

    let tk_config = optional_json(&dir.join("tokenizer_config.json"))?;
    let gen_config = optional_json(&dir.join("generation_config.json"))?;
    let mut specials = SpecialTokens {
        add_bos: tk_config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(true),
        ..Default::default()
    };
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.exists() {
        return Err(ModelError::Tokenizer(TokenizerError::Invalid {
            path: tokenizer_path.display().to_string(),
            message: "tokenizer.json is missing".into(),
        }));
    }
    let probe = Tokenizer::from_tokenizer_json(&tokenizer_path, SpecialTokens::default())?;
    let by_text = |key: &str| token_text(tk_config.get(key)).and_then(|t| probe.token_id(&t));
    specials.bos = by_text("bos_token").or_else(|| ids(config.get("bos_token_id")).first().copied());
    specials.eos = by_text("eos_token").or_else(|| ids(config.get("eos_token_id")).first().copied());
    let mut stops = ids(gen_config.get("eos_token_id"));
    stops.extend(ids(config.get("eos_token_id")));
    stops.extend(specials.eos);
    if let Some(eom) = probe.token_id("<|eom|>") {
        stops.push(eom);
    }
    stops.sort_unstable();
    stops.dedup();
    specials.stop_ids = stops;
    let tokenizer = Tokenizer::from_tokenizer_json(&tokenizer_path, specials)?;
    let template_src = match tk_config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template").and_then(Value::as_str).map(String::from)),
        _ => None,
    };
    // Recent transformers versions save the template beside the config, and when loading they
    // let that file win over `tokenizer_config.json`'s entry: so do we.
    let template_file = dir.join("chat_template.jinja");
    let template_src = match std::fs::read_to_string(&template_file) {
        Ok(src) => Some(src),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => template_src,
        Err(e) => {
            return Err(ModelError::Config { path: template_file, field: "(file)".into(), message: e.to_string() })
        }
    };
    let text = |id: Option<u32>| id.and_then(|i| tokenizer.piece(i)).unwrap_or_default().to_string();
    let template = match template_src {
        Some(src) => Some(ChatTemplate::new(&src, &text(tokenizer.specials.bos), &text(tokenizer.specials.eos))?),
        None => None,
    };
    let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    Ok(Model { name, path: dir.into(), arch: Arch::Jamba(jamba), tokenizer, template, mode: opts.mode })
}
