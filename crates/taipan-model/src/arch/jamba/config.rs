//! Jamba's hyper-parameters, read from a Hugging Face `config.json` or a llama.cpp GGUF and
//! validated once, so the forward pass can trust them.

use crate::cache::CacheSpec;
use crate::gguf::GgufFile;
use crate::ModelError;
use serde_json::Value;

/// Validated hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct JambaConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub context: usize,
    /// Per layer: attention (true) or Mamba.
    pub attention: Vec<bool>,
    /// Per layer: a mixture of experts (true) or one dense MLP. A dense Jamba (Reasoning 3B's
    /// form) has none.
    pub moe: Vec<bool>,
    pub experts: usize,
    pub experts_per_token: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub d_inner: usize,
    pub dt_rank: usize,
    pub conv_bias: bool,
    pub proj_bias: bool,
    pub tied_embeddings: bool,
}

fn cfg_err(path: &std::path::Path, field: &str, message: &str) -> ModelError {
    ModelError::Config { path: path.into(), field: field.into(), message: message.into() }
}

impl JambaConfig {
    /// Reads `config.json` in any form transformers accepts for Jamba.
    pub fn from_hf(path: &std::path::Path, v: &Value) -> Result<Self, ModelError> {
        let int = |k: &str| -> Result<Option<usize>, ModelError> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| cfg_err(path, k, "must be a non-negative integer")),
            }
        };
        let req = |k: &str| int(k)?.ok_or_else(|| cfg_err(path, k, "required field is missing"));
        let boolean = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let hidden = req("hidden_size")?;
        let layers = req("num_hidden_layers")?;
        // Checked before anything is sized by it.
        if !(1..=crate::arch::MAX_LAYERS).contains(&layers) {
            return Err(cfg_err(path, "num_hidden_layers", &format!("must be 1..={}", crate::arch::MAX_LAYERS)));
        }
        let heads = req("num_attention_heads")?;
        let kv_heads = int("num_key_value_heads")?.unwrap_or(heads);
        let period = int("attn_layer_period")?.unwrap_or(8);
        let offset = int("attn_layer_offset")?.unwrap_or(4);
        if period == 0 || offset >= period {
            return Err(cfg_err(path, "attn_layer_offset", "must be smaller than attn_layer_period"));
        }
        let e_period = int("expert_layer_period")?.unwrap_or(2);
        let e_offset = int("expert_layer_offset")?.unwrap_or(1);
        if e_period == 0 || e_offset >= e_period {
            return Err(cfg_err(path, "expert_layer_offset", "must be smaller than expert_layer_period"));
        }
        let dt_rank = match v.get("mamba_dt_rank") {
            None | Some(Value::Null) => hidden.div_ceil(16),
            Some(Value::String(s)) if s == "auto" => hidden.div_ceil(16),
            Some(x) => {
                x.as_u64().ok_or_else(|| cfg_err(path, "mamba_dt_rank", "must be an integer or \"auto\""))? as usize
            }
        };
        let experts = int("num_experts")?.or(int("num_local_experts")?).unwrap_or(16);
        // As transformers builds it: a layer at an expert position with more than one expert is a
        // mixture; every other layer (all of them when `num_experts` is 1, or when the period
        // reaches past the last layer) is a dense MLP.
        let moe = (0..layers).map(|i| experts > 1 && i % e_period == e_offset).collect();
        let c = JambaConfig {
            vocab: int("vocab_size")?.unwrap_or(65536),
            hidden,
            intermediate: req("intermediate_size")?,
            layers,
            heads,
            kv_heads,
            head_dim: int("head_dim")?.unwrap_or(hidden / heads.max(1)),
            rms_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            context: int("max_position_embeddings")?.or(int("n_ctx")?).unwrap_or(262144),
            attention: (0..layers).map(|i| i % period == offset).collect(),
            moe,
            experts,
            // Only a mixture routes: a dense model's count (often 2 by default) means nothing.
            experts_per_token: if experts > 1 { int("num_experts_per_tok")?.unwrap_or(2) } else { 1 },
            d_state: int("mamba_d_state")?.unwrap_or(16),
            d_conv: int("mamba_d_conv")?.unwrap_or(4),
            d_inner: int("mamba_expand")?
                .unwrap_or(2)
                .checked_mul(hidden)
                .ok_or_else(|| cfg_err(path, "mamba_expand", "mamba_expand × hidden_size overflows"))?,
            dt_rank,
            conv_bias: boolean("mamba_conv_bias", true),
            proj_bias: boolean("mamba_proj_bias", false),
            tied_embeddings: boolean("tie_word_embeddings", false),
        };
        c.validate(path)?;
        Ok(c)
    }

    /// Reads `jamba.*` GGUF keys; the per-layer KV-head array marks attention layers.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let k = |s: &str| format!("jamba.{s}");
        let hidden = f.get_u64(&k("embedding_length"))? as usize;
        let heads = f.get_u64(&k("attention.head_count"))? as usize;
        let kv: Vec<usize> = match f.get(&k("attention.head_count_kv")) {
            Some(crate::gguf::Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(0) as usize).collect(),
            Some(v) => vec![v.as_u64().unwrap_or(0) as usize],
            None => return Err(cfg_err(&f.path, "jamba.attention.head_count_kv", "required key is missing")),
        };
        let layers = f.get_u64(&k("block_count"))? as usize;
        if !(1..=crate::arch::MAX_LAYERS).contains(&layers) {
            return Err(cfg_err(&f.path, "jamba.block_count", &format!("must be 1..={}", crate::arch::MAX_LAYERS)));
        }
        if kv.len() != layers {
            return Err(cfg_err(&f.path, "jamba.attention.head_count_kv", "needs one entry per layer"));
        }
        let kv_heads = kv.iter().copied().find(|&n| n > 0).unwrap_or(heads);
        if kv.iter().any(|&n| n > 0 && n != kv_heads) {
            return Err(cfg_err(
                &f.path,
                "jamba.attention.head_count_kv",
                "attention layers with different KV-head counts are not supported",
            ));
        }
        // As llama.cpp loads it: a layer is a mixture of experts where its router is stored.
        let moe: Vec<bool> = (0..layers).map(|i| f.has_tensor(&format!("blk.{i}.ffn_gate_inp.weight"))).collect();
        // A dense file may say 0 or 1 experts (and any used count): they mean nothing there.
        let dense = !moe.contains(&true);
        let experts = f.get_opt_u64(&k("expert_count"))?.unwrap_or(1) as usize;
        let experts_per_token = f.get_opt_u64(&k("expert_used_count"))?.unwrap_or(1) as usize;
        let c = JambaConfig {
            vocab: f.get_array("tokenizer.ggml.tokens").map(|a| a.len())?,
            hidden,
            intermediate: f.get_u64(&k("feed_forward_length"))? as usize,
            layers,
            heads,
            kv_heads,
            head_dim: hidden / heads.max(1),
            rms_eps: f.get_opt_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6) as f32,
            context: f.get_opt_u64(&k("context_length"))?.unwrap_or(262144) as usize,
            attention: kv.iter().map(|&n| n > 0).collect(),
            moe,
            experts: if dense { experts.max(1) } else { experts },
            experts_per_token: if dense { 1 } else { experts_per_token },
            d_state: f.get_u64(&k("ssm.state_size"))? as usize,
            d_conv: f.get_u64(&k("ssm.conv_kernel"))? as usize,
            d_inner: f.get_u64(&k("ssm.inner_size"))? as usize,
            dt_rank: f.get_u64(&k("ssm.time_step_rank"))? as usize,
            conv_bias: true,
            proj_bias: false,
            tied_embeddings: !f.has_tensor("output.weight"),
        };
        c.validate(&f.path)?;
        Ok(c)
    }

    fn validate(&self, path: &std::path::Path) -> Result<(), ModelError> {
        use crate::arch::{MAX_CONTEXT, MAX_EXPERTS, MAX_HEADS, MAX_HEAD_DIM, MAX_VOCAB, MAX_WIDTH};
        let checks = [
            (self.hidden > 0 && self.hidden <= MAX_WIDTH, "hidden_size", "must be between 1 and 2^20"),
            (
                self.intermediate > 0 && self.intermediate <= MAX_WIDTH,
                "intermediate_size",
                "must be between 1 and 2^20",
            ),
            (self.heads <= MAX_HEADS, "num_attention_heads", "must be at most 4096"),
            (self.head_dim > 0 && self.head_dim <= MAX_HEAD_DIM, "head_dim", "must be between 1 and 4096"),
            (self.d_inner > 0 && self.d_inner <= MAX_WIDTH, "mamba_expand", "d_inner must be between 1 and 2^20"),
            (self.d_state <= 4096 && self.d_conv <= 1024, "mamba_d_state", "Mamba state sizes are implausibly large"),
            (self.dt_rank <= self.d_inner, "mamba_dt_rank", "must not exceed the inner size"),
            (self.experts >= 1 && self.experts <= MAX_EXPERTS, "num_experts", "must be between 1 and 4096"),
            (self.vocab <= MAX_VOCAB, "vocab_size", "must be at most 2^24"),
            (self.context >= 1 && self.context <= MAX_CONTEXT, "max_position_embeddings", "must be between 1 and 2^30"),
            (
                self.heads > 0 && self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
                "num_key_value_heads",
                "must divide num_attention_heads",
            ),
            (
                self.d_conv >= 1 && self.d_state >= 1 && self.dt_rank >= 1,
                "mamba_d_conv",
                "Mamba sizes must be positive",
            ),
            (
                self.experts_per_token >= 1 && self.experts_per_token <= self.experts.max(1),
                "num_experts_per_tok",
                "must be between 1 and num_experts",
            ),
            (
                !self.moe.contains(&true) || self.experts >= 2,
                "num_experts",
                "a mixture-of-experts layer needs at least 2 experts",
            ),
            (self.vocab > 0, "vocab_size", "must be positive"),
        ];
        for (ok, field, msg) in checks {
            if !ok {
                return Err(cfg_err(path, field, msg));
            }
        }
        Ok(())
    }
}

impl JambaConfig {
    /// What one sequence keeps: keys and values of the attention layers, conv and SSM states of
    /// the Mamba layers.
    pub fn cache_spec(&self) -> CacheSpec {
        let attention_layers = self.attention.iter().filter(|&&a| a).count();
        CacheSpec {
            attention_layers,
            kv_dim: self.kv_heads * self.head_dim,
            recurrent_layers: self.layers - attention_layers,
            conv_floats: (self.d_conv - 1) * self.d_inner,
            ssm_floats: self.d_inner * self.d_state,
            context: self.context,
        }
    }
}
