//! GPT-2 (Radford et al., 2019), laid out as Hugging Face's `GPT2LMHeadModel`.
//!
//! Learned token and position embeddings (`wte`, `wpe`); each block LayerNorm → attention
//! from one packed `c_attn` projection (with biases) → `c_proj`, then LayerNorm → `c_fc` →
//! tanh GELU → `c_proj`, both residual; a final LayerNorm `ln_f` and an LM head tied to `wte`.
//! Linear weights are Conv1D, stored `[in, out]`. Weights start normal(0, 0.02), the residual
//! projections normal(0, 0.02/√(2·n_layer)).

use anyhow::Result;
use serde_json::{json, Value};

use super::parts::{
    Block, Embedding, Head, LayerParts, Layout, Linear, Mlp, Norm, Qkv, SelfAttention,
};
use super::{Layer, ModelConfig};
use crate::invalid;

const STD: f64 = 0.02;

/// GPT-2's fixed choices: as many key/value heads as queries, a 4·C MLP, LayerNorm at 1e-5,
/// the tied head, no rotary positions.
pub(super) fn validate(c: &ModelConfig) -> Result<()> {
    if c.kv_heads() != c.n_head {
        invalid!(
            "gpt2 has n_kv_head = n_head ({}), got {}",
            c.n_head,
            c.kv_heads()
        );
    }
    if c.ffn() != 4 * c.n_embd {
        invalid!(
            "gpt2 has ffn_dim = 4·n_embd ({}), got {}",
            4 * c.n_embd,
            c.ffn()
        );
    }
    if c.eps() != 1e-5 {
        invalid!("gpt2 has norm_eps 1e-5, got {}", c.eps());
    }
    if !c.tied() {
        invalid!("gpt2 ties the LM head to the token embedding: tie_embeddings must be true");
    }
    if c.rope_theta.is_some() {
        invalid!("gpt2 has learned positions, not rotary ones: rope_theta does not apply");
    }
    Ok(())
}

/// The parts of `layer`.
pub(super) fn layer(c: &ModelConfig, layer: Layer) -> LayerParts {
    let (e, f) = (c.n_embd, c.ffn());
    let conv = |name: &str, dims, std| {
        Linear::new(
            format!("{name}.weight"),
            Some(format!("{name}.bias")),
            dims,
            Layout::InOut,
            std,
        )
    };
    let residual = STD / (2.0 * c.n_layer as f64).sqrt();
    match layer {
        Layer::Embedding => LayerParts::Embedding(Embedding {
            tokens: "wte".into(),
            positions: Some("wpe".into()),
            vocab: c.vocab_size,
            n_positions: c.n_positions,
            channels: e,
            std: STD,
        }),
        Layer::Block(i) => {
            let h = |s: &str| format!("h.{i}.{s}");
            LayerParts::Block(Box::new(Block {
                norm1: Norm::layer(&h("ln_1"), e),
                attn: SelfAttention {
                    qkv: Qkv::Packed(conv(&h("attn.c_attn"), (e, 3 * e), STD)),
                    heads: c.n_head,
                    kv_heads: c.n_head,
                    head_dim: c.head_dim(),
                    rope: None,
                },
                attn_out: conv(&h("attn.c_proj"), (e, e), residual),
                norm2: Norm::layer(&h("ln_2"), e),
                mlp: Mlp::Gelu {
                    fc: conv(&h("mlp.c_fc"), (e, f), STD),
                },
                mlp_out: conv(&h("mlp.c_proj"), (f, e), residual),
            }))
        }
        Layer::Head => LayerParts::Head(Head {
            norm: Norm::layer("ln_f", e),
            lm: Linear::new("wte".into(), None, (e, c.vocab_size), Layout::OutIn, STD),
        }),
    }
}

const PREFIX: &str = "transformer.";

/// The Hugging Face name of a tensor (`wte` -> `transformer.wte.weight`).
pub(super) fn hf_name(name: &str) -> String {
    match name {
        "wte" | "wpe" => format!("{PREFIX}{name}.weight"),
        _ => format!("{PREFIX}{name}"),
    }
}

/// pipit's name of a Hugging Face tensor: the `transformer.` prefix stripped, `wte` and `wpe`
/// without `.weight`; `None` for what GPT-2 checkpoints carry besides weights (the causal-mask
/// buffers `attn.bias`, `attn.masked_bias` and the tied `lm_head.weight`).
pub(super) fn internal_name(hf: &str) -> Option<String> {
    let name = hf.strip_prefix(PREFIX).unwrap_or(hf);
    let name = match name {
        "wte.weight" | "wpe.weight" => name.trim_end_matches(".weight"),
        _ => name,
    };
    let skip = name == "lm_head.weight"
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias");
    (!skip).then(|| name.to_string())
}

/// Hugging Face's `config.json` for a GPT-2 of these sizes.
pub(super) fn hf_config(c: &ModelConfig) -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_ctx": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "bos_token_id": c.vocab_size - 1,
        "eos_token_id": c.vocab_size - 1,
    })
}

/// The sizes in a Hugging Face GPT-2 `config.json`; variants pipit does not implement
/// (another activation, an unusual MLP width, untied embeddings) are rejected by name.
pub(super) fn parse_hf_config(v: &Value) -> Result<ModelConfig> {
    let field = |name| super::hf_usize(v, name);
    let config = ModelConfig {
        vocab_size: field("vocab_size")?,
        n_positions: field("n_positions")?,
        n_embd: field("n_embd")?,
        n_layer: field("n_layer")?,
        n_head: field("n_head")?,
        ..ModelConfig::default()
    };
    if let Some(act) = v.get("activation_function").and_then(Value::as_str) {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            invalid!(
                "config.json: activation_function must be gelu_new (GPT-2's tanh GELU), got {act}"
            );
        }
    }
    if let Some(inner) = v.get("n_inner").and_then(Value::as_u64) {
        if inner as usize != 4 * config.n_embd {
            invalid!(
                "config.json: n_inner must be 4·n_embd = {}, got {inner}",
                4 * config.n_embd
            );
        }
    }
    if v.get("tie_word_embeddings").and_then(Value::as_bool) == Some(false) {
        invalid!("config.json: tie_word_embeddings must be true (GPT-2 ties the LM head to wte)");
    }
    Ok(config)
}
