//! The model's shape (Hugging Face GPT-2 config names), its layers, and optimizer settings.

use std::fmt;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::invalid;

/// GPT-2 hyper-parameters, named as in Hugging Face's `config.json` so such a file loads as is
/// (other keys are ignored). Defaults: a tiny byte-level model (vocabulary of 256 bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GptConfig {
    /// Tokens in the vocabulary (rows of `wte`).
    pub vocab_size: usize,
    /// Longest sequence the model accepts (rows of `wpe`).
    pub n_positions: usize,
    /// Model width `C`.
    pub n_embd: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads per block; `n_embd` must be a multiple of it.
    pub n_head: usize,
}

impl Default for GptConfig {
    fn default() -> Self {
        Self {
            vocab_size: 256,
            n_positions: 256,
            n_embd: 64,
            n_layer: 4,
            n_head: 4,
        }
    }
}

/// One unit the partitioner may place: the embedding, a transformer block, or the head
/// (final layernorm, LM head tied to `wte`, and the cross-entropy loss).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Layer {
    /// Token + position embedding (`wte`, `wpe`).
    Embedding,
    /// Transformer block `h.{i}`.
    Block(usize),
    /// Final layernorm `ln_f`, logits through the tied `wte`, and the loss.
    Head,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::Embedding => f.write_str("embedding"),
            Layer::Block(i) => write!(f, "block {i}"),
            Layer::Head => f.write_str("head"),
        }
    }
}

impl GptConfig {
    /// Check that every size is positive and the width splits evenly into heads.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            if value == 0 {
                invalid!("model {name} must be at least 1, got 0");
            }
        }
        if self.vocab_size > u32::MAX as usize {
            invalid!(
                "model vocab_size must fit token ids in u32, got {}",
                self.vocab_size
            );
        }
        if self.n_embd % self.n_head != 0 {
            invalid!(
                "model n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd,
                self.n_head
            );
        }
        Ok(())
    }

    /// The model's layers in order: embedding, `n_layer` blocks, head (`n_layer + 2` in all).
    pub fn layers(&self) -> Vec<Layer> {
        let blocks = (0..self.n_layer).map(Layer::Block);
        std::iter::once(Layer::Embedding)
            .chain(blocks)
            .chain(std::iter::once(Layer::Head))
            .collect()
    }

    /// Names (Hugging Face's, without the `transformer.` prefix) and shapes of the tensors
    /// `layer` uses, in a fixed order. The head lists `wte` too: it is tied to the embedding.
    pub fn layer_params(&self, layer: Layer) -> Vec<(String, Vec<usize>)> {
        let (v, p, c) = (self.vocab_size, self.n_positions, self.n_embd);
        match layer {
            Layer::Embedding => vec![("wte".into(), vec![v, c]), ("wpe".into(), vec![p, c])],
            Layer::Block(i) => [
                ("ln_1.weight", vec![c]),
                ("ln_1.bias", vec![c]),
                ("attn.c_attn.weight", vec![c, 3 * c]),
                ("attn.c_attn.bias", vec![3 * c]),
                ("attn.c_proj.weight", vec![c, c]),
                ("attn.c_proj.bias", vec![c]),
                ("ln_2.weight", vec![c]),
                ("ln_2.bias", vec![c]),
                ("mlp.c_fc.weight", vec![c, 4 * c]),
                ("mlp.c_fc.bias", vec![4 * c]),
                ("mlp.c_proj.weight", vec![4 * c, c]),
                ("mlp.c_proj.bias", vec![c]),
            ]
            .into_iter()
            .map(|(name, shape)| (format!("h.{i}.{name}"), shape))
            .collect(),
            Layer::Head => vec![
                ("ln_f.weight".into(), vec![c]),
                ("ln_f.bias".into(), vec![c]),
                ("wte".into(), vec![v, c]),
            ],
        }
    }

    /// Names and shapes of the tensors of `layers`, each once (a shared `wte` appears once).
    pub fn params_of(&self, layers: &[Layer]) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        for &layer in layers {
            for (name, shape) in self.layer_params(layer) {
                if !out.iter().any(|(n, _)| *n == name) {
                    out.push((name, shape));
                }
            }
        }
        out
    }

    /// Every tensor of the model, each once, in Hugging Face's order.
    pub fn all_params(&self) -> Vec<(String, Vec<usize>)> {
        self.params_of(&self.layers())
    }

    /// Number of trainable parameters (the tied `wte` counted once).
    pub fn num_parameters(&self) -> usize {
        self.all_params()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

/// AdamW settings other than the learning rate (which a schedule may vary per step).
/// Defaults as nanoGPT: β = (0.9, 0.95), eps = 1e-8, weight decay 0.1 on matrices and
/// embeddings only.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay for 2-D tensors; biases and layernorm parameters get none.
    pub weight_decay: f32,
    /// Clip the global gradient norm (over every stage) to this value; 0 turns clipping off.
    pub grad_clip: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_has_124m_parameters() {
        let cfg = GptConfig {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
        };
        assert_eq!(cfg.num_parameters(), 124_439_808);
        assert_eq!(cfg.layers().len(), 14);
    }

    #[test]
    fn hugging_face_config_json_loads() {
        let json = r#"{"model_type":"gpt2","vocab_size":50257,"n_positions":1024,
            "n_ctx":1024,"n_embd":768,"n_layer":12,"n_head":12,"activation_function":"gelu_new"}"#;
        let cfg: GptConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.n_embd, 768);
        assert_eq!(cfg.n_head, 12);
        cfg.validate().unwrap();
    }

    #[test]
    fn bad_configs_are_invalid_input() {
        let cfg = GptConfig {
            n_embd: 10,
            n_head: 4,
            ..GptConfig::default()
        };
        let err = cfg.validate().unwrap_err();
        assert!(crate::is_invalid_input(&err));
        assert!(err.to_string().contains("n_embd (10)"));
        let zero = GptConfig {
            n_layer: 0,
            ..GptConfig::default()
        };
        assert!(crate::is_invalid_input(&zero.validate().unwrap_err()));
    }

    #[test]
    fn shared_wte_is_listed_once() {
        let cfg = GptConfig::default();
        let names: Vec<String> = cfg.all_params().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.iter().filter(|n| *n == "wte").count(), 1);
        assert_eq!(names.len(), 2 + 12 * cfg.n_layer + 2);
        assert_eq!(names[2], "h.0.ln_1.weight");
        assert_eq!(names.last().unwrap(), "ln_f.bias");
    }
}
