//! Hugging Face tensor names mapped to the GGUF names the loader reads.

/// Hugging Face tensor name → GGUF name for Jamba checkpoints.
pub fn hf_name(name: &str) -> Option<String> {
    let direct = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.final_layernorm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.into());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let mapped = match rest {
        "input_layernorm.weight" => "attn_norm.weight".to_string(),
        "pre_ff_layernorm.weight" => "ffn_norm.weight".to_string(),
        "self_attn.q_proj.weight" => "attn_q.weight".to_string(),
        "self_attn.k_proj.weight" => "attn_k.weight".to_string(),
        "self_attn.v_proj.weight" => "attn_v.weight".to_string(),
        "self_attn.o_proj.weight" => "attn_output.weight".to_string(),
        "mamba.in_proj.weight" => "ssm_in.weight".to_string(),
        "mamba.in_proj.bias" => "ssm_in.bias".to_string(),
        "mamba.conv1d.weight" => "ssm_conv1d.weight".to_string(),
        "mamba.conv1d.bias" => "ssm_conv1d.bias".to_string(),
        "mamba.x_proj.weight" => "ssm_x.weight".to_string(),
        "mamba.dt_layernorm.weight" => "ssm_dt_norm.weight".to_string(),
        "mamba.b_layernorm.weight" => "ssm_b_norm.weight".to_string(),
        "mamba.c_layernorm.weight" => "ssm_c_norm.weight".to_string(),
        "mamba.dt_proj.weight" => "ssm_dt.weight".to_string(),
        "mamba.dt_proj.bias" => "ssm_dt.bias".to_string(),
        "mamba.A_log" => "ssm_a".to_string(),
        "mamba.D" => "ssm_d".to_string(),
        "mamba.out_proj.weight" => "ssm_out.weight".to_string(),
        "mamba.out_proj.bias" => "ssm_out.bias".to_string(),
        "feed_forward.gate_proj.weight" => "ffn_gate.weight".to_string(),
        "feed_forward.up_proj.weight" => "ffn_up.weight".to_string(),
        "feed_forward.down_proj.weight" => "ffn_down.weight".to_string(),
        "feed_forward.router.weight" => "ffn_gate_inp.weight".to_string(),
        other => {
            let e = other.strip_prefix("feed_forward.experts.")?;
            let (idx, part) = e.split_once('.')?;
            let kind = match part {
                "gate_proj.weight" => "ffn_gate",
                "up_proj.weight" => "ffn_up",
                "down_proj.weight" => "ffn_down",
                _ => return None,
            };
            format!("{kind}.{idx}.weight")
        }
    };
    Some(format!("blk.{layer}.{mapped}"))
}
