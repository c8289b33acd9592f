//! Llama (Touvron et al., 2023), laid out as Hugging Face's `LlamaForCausalLM`.
//!
//! A token embedding without positions; each block RMSNorm → attention from separate q, k, v
//! projections (k and v with `n_kv_head` heads: grouped-query attention) with rotary
//! positions → `o_proj`, then RMSNorm → SwiGLU (`gate_proj`, `up_proj`) → `down_proj`, both
//! residual; a final RMSNorm and an LM head, untied unless `tie_embeddings`. Linear weights
//! are `nn.Linear`, stored `[out, in]`, without biases. Every weight starts normal(0, 0.02),
//! as transformers' `initializer_range`.
//!
//! Its near relatives through the same parts and names: Mistral (`MistralForCausalLM`, its
//! sliding window off) and Qwen2 (`Qwen2ForCausalLM`: biases on `q_proj`, `k_proj` and
//! `v_proj`, zero at the start).

use anyhow::Result;
use serde_json::{json, Value};

use super::parts::{
    Block, Embedding, Head, LayerParts, Layout, Linear, Mlp, Norm, Qkv, SelfAttention,
};
use super::{Family, Layer, ModelConfig};
use crate::invalid;

const STD: f64 = 0.02;

/// Llama's constraints: an even head size for the rotary pairs.
pub(super) fn validate(c: &ModelConfig) -> Result<()> {
    if c.head_dim() % 2 != 0 {
        invalid!(
            "llama's rotary positions need an even head size; n_embd / n_head = {}",
            c.head_dim()
        );
    }
    if !(c.theta() > 1.0 && c.theta().is_finite()) {
        invalid!("llama rope_theta must be above 1, got {}", c.theta());
    }
    if c.eps().is_nan() || c.eps() <= 0.0 {
        invalid!("llama norm_eps must be positive, got {}", c.eps());
    }
    Ok(())
}

/// The parts of `layer`.
pub(super) fn layer(c: &ModelConfig, layer: Layer) -> LayerParts {
    let (e, f, eps) = (c.n_embd, c.ffn(), c.eps());
    let kv = c.kv_heads() * c.head_dim();
    let linear =
        |name: String, dims| Linear::new(format!("{name}.weight"), None, dims, Layout::OutIn, STD);
    // Qwen2's query, key and value projections carry biases.
    let qkv = |name: String, dims| {
        let bias = (c.family == Family::Qwen2).then(|| format!("{name}.bias"));
        Linear::new(format!("{name}.weight"), bias, dims, Layout::OutIn, STD)
    };
    match layer {
        Layer::Embedding => LayerParts::Embedding(Embedding {
            tokens: "embed_tokens.weight".into(),
            positions: None,
            vocab: c.vocab_size,
            n_positions: c.n_positions,
            channels: e,
            std: STD,
        }),
        Layer::Block(i) => {
            let l = |s: &str| format!("layers.{i}.{s}");
            LayerParts::Block(Box::new(Block {
                norm1: Norm::rms(&l("input_layernorm"), e, eps),
                attn: SelfAttention {
                    qkv: Qkv::Split {
                        q: qkv(l("self_attn.q_proj"), (e, e)),
                        k: qkv(l("self_attn.k_proj"), (e, kv)),
                        v: qkv(l("self_attn.v_proj"), (e, kv)),
                    },
                    heads: c.n_head,
                    kv_heads: c.kv_heads(),
                    head_dim: c.head_dim(),
                    rope: Some(c.theta()),
                },
                attn_out: linear(l("self_attn.o_proj"), (e, e)),
                norm2: Norm::rms(&l("post_attention_layernorm"), e, eps),
                mlp: Mlp::SwiGlu {
                    gate: linear(l("mlp.gate_proj"), (e, f)),
                    up: linear(l("mlp.up_proj"), (e, f)),
                },
                mlp_out: linear(l("mlp.down_proj"), (f, e)),
            }))
        }
        Layer::Head => {
            let weight = if c.tied() { "embed_tokens" } else { "lm_head" };
            LayerParts::Head(Head {
                norm: Norm::rms("norm", e, eps),
                lm: linear(weight.into(), (e, c.vocab_size)),
            })
        }
    }
}

const PREFIX: &str = "model.";

/// The Hugging Face name of a tensor (`norm.weight` -> `model.norm.weight`).
pub(super) fn hf_name(name: &str) -> String {
    match name {
        "lm_head.weight" => name.to_string(),
        _ => format!("{PREFIX}{name}"),
    }
}

/// pipit's name of a Hugging Face tensor: the `model.` prefix stripped; `None` for the
/// rotary frequency buffers some releases saved.
pub(super) fn internal_name(hf: &str) -> Option<String> {
    let name = hf.strip_prefix(PREFIX).unwrap_or(hf);
    (!name.ends_with("rotary_emb.inv_freq")).then(|| name.to_string())
}

/// Hugging Face's `config.json` for a Llama of these sizes, in the layout of current
/// transformers releases (rope parameters nested) with `rope_theta` at the top as well, for
/// the releases before them.
pub(super) fn hf_config(c: &ModelConfig) -> Value {
    let class = match c.family {
        Family::Mistral => "MistralForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let mut v = json!({
        "architectures": [class],
        "model_type": c.family.name(),
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.n_positions,
        "hidden_size": c.n_embd,
        "intermediate_size": c.ffn(),
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads(),
        "head_dim": c.head_dim(),
        "hidden_act": "silu",
        "rms_norm_eps": shortest(c.eps()),
        "rope_theta": shortest(c.theta()),
        "rope_parameters": {"rope_type": "default", "rope_theta": shortest(c.theta())},
        "rope_scaling": null,
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": STD,
        "tie_word_embeddings": c.tied(),
        "torch_dtype": "float32",
        "bos_token_id": null,
        "eos_token_id": null,
    });
    match c.family {
        Family::Mistral => v["sliding_window"] = json!(null),
        Family::Qwen2 => {
            v["use_sliding_window"] = json!(false);
            v["sliding_window"] = json!(null);
        }
        _ => {}
    }
    if c.family != Family::Llama {
        let map = v.as_object_mut().expect("an object");
        map.remove("attention_bias");
        map.remove("mlp_bias");
    }
    v
}

/// `x` as the f64 with the shortest decimal form that rounds to it (1e-6, not 9.99…e-7).
fn shortest(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// The sizes in a Hugging Face `config.json` of `family` (Llama, Mistral or Qwen2), as the
/// transformers releases people use write it (`rope_theta` at the top in older ones, under
/// `rope_parameters` in current ones); what pipit does not implement (scaled rotary
/// positions, Llama's optional biases, another activation, a head size that is not
/// `hidden_size / num_attention_heads`, a sliding window narrower than the context) is
/// rejected by name.
pub(super) fn parse_hf_config(v: &Value, family: Family) -> Result<ModelConfig> {
    let field = |name| super::hf_usize(v, name);
    let rope = v.get("rope_parameters").filter(|r| !r.is_null());
    let rope_type = rope
        .or_else(|| v.get("rope_scaling").filter(|r| !r.is_null()))
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if rope_type != "default" {
        invalid!("config.json: rope_type {rope_type} is not implemented (only default)");
    }
    let theta = rope
        .and_then(|r| r.get("rope_theta"))
        .or_else(|| v.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0);
    let eps = v
        .get("rms_norm_eps")
        .and_then(Value::as_f64)
        .unwrap_or(1e-6);
    let heads = field("num_attention_heads")?;
    let config = ModelConfig {
        family,
        vocab_size: field("vocab_size")?,
        n_positions: field("max_position_embeddings")?,
        n_embd: field("hidden_size")?,
        n_layer: field("num_hidden_layers")?,
        n_head: heads,
        n_kv_head: Some(
            v.get("num_key_value_heads")
                .map_or(Ok(heads), |_| field("num_key_value_heads"))?,
        ),
        ffn_dim: Some(field("intermediate_size")?),
        rope_theta: Some(theta as f32),
        norm_eps: Some(eps as f32),
        tie_embeddings: Some(
            v.get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        ),
    };
    for flag in ["attention_bias", "mlp_bias"] {
        if v.get(flag).and_then(Value::as_bool) == Some(true) {
            invalid!("config.json: {flag} = true is not implemented for {family}");
        }
    }
    // A sliding window narrower than the context changes the attention; pipit's is full.
    let window = v.get("sliding_window").and_then(Value::as_u64);
    let sliding = match family {
        Family::Qwen2 => v.get("use_sliding_window").and_then(Value::as_bool) == Some(true),
        _ => true,
    };
    if let Some(w) = window.filter(|&w| sliding && (w as usize) < config.n_positions) {
        invalid!(
            "config.json: sliding_window {w} below max_position_embeddings {} is not implemented (attention is full)",
            config.n_positions
        );
    }
    if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            invalid!("config.json: hidden_act must be silu (SwiGLU), got {act}");
        }
    }
    if let Some(d) = v.get("head_dim").and_then(Value::as_u64) {
        if d as usize * heads != config.n_embd {
            invalid!(
                "config.json: head_dim {d} × num_attention_heads {heads} must equal hidden_size {}",
                config.n_embd
            );
        }
    }
    Ok(config)
}
