//! The model's family and sizes, its layers, and optimizer settings.

use std::fmt;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::parts::{LayerParts, ParamSpec};
use crate::invalid;

/// A model architecture described over shared parts (`model/parts/`), one file each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// GPT-2: learned positions, LayerNorm, packed q|k|v with biases, tanh-GELU MLP, tied head.
    #[default]
    Gpt2,
    /// Llama: rotary positions, RMSNorm, grouped-query attention, SwiGLU MLP, untied head.
    Llama,
    /// Mistral: Llama's parts and names (its sliding window unused: full causal attention).
    Mistral,
    /// Qwen2: Llama with biases on the query, key and value projections.
    Qwen2,
}

impl Family {
    /// The name users write (`--model gpt2|llama`) and Hugging Face's `model_type`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Family {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gpt2" => Ok(Family::Gpt2),
            "llama" => Ok(Family::Llama),
            "mistral" => Ok(Family::Mistral),
            "qwen2" => Ok(Family::Qwen2),
            other => Err(crate::invalid_input!(
                "--model must be gpt2, llama, mistral or qwen2, got {other}"
            )),
        }
    }
}

/// A model's family and sizes. The GPT-2 fields carry Hugging Face GPT-2's `config.json` names
/// (`n_embd`, `n_head`, ...) for every family; the options a family may change are `None`
/// for its own default. Defaults: a tiny byte-level GPT-2 (vocabulary of 256 bytes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// The architecture.
    #[serde(rename = "model")]
    pub family: Family,
    /// Tokens in the vocabulary (rows of the token embedding).
    pub vocab_size: usize,
    /// Longest sequence the model accepts (rows of GPT-2's position embedding).
    pub n_positions: usize,
    /// Model width `C`.
    pub n_embd: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention (query) heads per block; `n_embd` must be a multiple of it.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention); divides `n_head`. Default: `n_head`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<usize>,
    /// Width of the MLP's hidden layer. Default: 4·`n_embd` for GPT-2; for Llama 8/3·`n_embd`
    /// rounded up to a multiple of 32.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ffn_dim: Option<usize>,
    /// Base θ of the rotary position frequencies (Llama). Default: 10,000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f32>,
    /// Epsilon of the norms. Default: 1e-5 for GPT-2 (its only value), 1e-6 for Llama.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f32>,
    /// The LM head is the token embedding. Default: true for GPT-2 (its only value), false
    /// for Llama.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            family: Family::Gpt2,
            vocab_size: 256,
            n_positions: 256,
            n_embd: 64,
            n_layer: 4,
            n_head: 4,
            n_kv_head: None,
            ffn_dim: None,
            rope_theta: None,
            norm_eps: None,
            tie_embeddings: None,
        }
    }
}

/// One unit the partitioner may place: the embedding, a transformer block, or the head
/// (final norm, LM head, and the cross-entropy loss).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Layer {
    /// The token embedding (and GPT-2's position embedding).
    Embedding,
    /// Transformer block `i`.
    Block(usize),
    /// Final norm, logits through the LM head (GPT-2's tied to the embedding), and the loss.
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

impl ModelConfig {
    /// Key/value heads per block.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// Elements per attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Width of the MLP's hidden layer.
    pub fn ffn(&self) -> usize {
        self.ffn_dim.unwrap_or(match self.family {
            Family::Gpt2 => 4 * self.n_embd,
            _ => (8 * self.n_embd).div_ceil(3).div_ceil(32) * 32,
        })
    }

    /// Base θ of the rotary frequencies.
    pub fn theta(&self) -> f32 {
        self.rope_theta.unwrap_or(10_000.0)
    }

    /// Epsilon of the norms.
    pub fn eps(&self) -> f32 {
        self.norm_eps.unwrap_or(match self.family {
            Family::Gpt2 => 1e-5,
            _ => 1e-6,
        })
    }

    /// Whether the LM head is the token embedding.
    pub fn tied(&self) -> bool {
        self.tie_embeddings.unwrap_or(self.family == Family::Gpt2)
    }

    /// Check that every size is positive, the width splits evenly into heads, and the
    /// family's constraints hold.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_kv_head", self.kv_heads()),
            ("ffn_dim", self.ffn()),
        ] {
            if value == 0 {
                invalid!("model {name} must be at least 1, got 0");
            }
        }
        // Far beyond any model trained (Llama 3.1 405B: 126 layers, width 16,384, 128,256
        // tokens), and small enough that every count and size computed from them fits.
        for (name, value, limit) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("n_positions", self.n_positions, 1 << 24),
            ("n_embd", self.n_embd, 1 << 20),
            ("n_layer", self.n_layer, 1 << 14),
            ("ffn_dim", self.ffn(), 1 << 22),
        ] {
            if value > limit {
                invalid!("model {name} must be at most {limit}, got {value}");
            }
        }
        if self.n_embd % self.n_head != 0 {
            invalid!(
                "model n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd,
                self.n_head
            );
        }
        if self.n_head % self.kv_heads() != 0 {
            invalid!(
                "model n_kv_head ({}) must divide n_head ({})",
                self.kv_heads(),
                self.n_head
            );
        }
        match self.family {
            Family::Gpt2 => super::gpt2::validate(self),
            _ => super::llama::validate(self),
        }
    }

    /// The model's layers in order: embedding, `n_layer` blocks, head (`n_layer + 2` in all).
    pub fn layers(&self) -> Vec<Layer> {
        let blocks = (0..self.n_layer).map(Layer::Block);
        std::iter::once(Layer::Embedding)
            .chain(blocks)
            .chain(std::iter::once(Layer::Head))
            .collect()
    }

    /// The parts `layer` is made of, as the family assembles them.
    pub(crate) fn parts(&self, layer: Layer) -> LayerParts {
        match self.family {
            Family::Gpt2 => super::gpt2::layer(self, layer),
            _ => super::llama::layer(self, layer),
        }
    }

    /// The tensors `layer` uses, in a fixed order, with their initialisation and role.
    pub(crate) fn layer_specs(&self, layer: Layer) -> Vec<ParamSpec> {
        self.parts(layer).params()
    }

    /// Names and shapes of the tensors `layer` uses, in a fixed order. The head of a tied
    /// model lists the token embedding too.
    pub fn layer_params(&self, layer: Layer) -> Vec<(String, Vec<usize>)> {
        self.layer_specs(layer)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect()
    }

    /// The tensors of `layers`, each once (a tied embedding appears once, a matmul operand).
    pub(crate) fn specs_of(&self, layers: &[Layer]) -> Vec<ParamSpec> {
        let mut out: Vec<ParamSpec> = Vec::new();
        // Where each name already stands in `out` (a model of many layers lists many names).
        let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for &layer in layers {
            for spec in self.layer_specs(layer) {
                match at.get(&spec.name) {
                    Some(&i) => out[i].operand |= spec.operand,
                    None => {
                        at.insert(spec.name.clone(), out.len());
                        out.push(spec);
                    }
                }
            }
        }
        out
    }

    /// Names and shapes of the tensors of `layers`, each once.
    pub fn params_of(&self, layers: &[Layer]) -> Vec<(String, Vec<usize>)> {
        self.specs_of(layers)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect()
    }

    /// Every tensor of the model, each once, in Hugging Face's order.
    pub fn all_params(&self) -> Vec<(String, Vec<usize>)> {
        self.params_of(&self.layers())
    }

    /// The tensors both the first layer and the last use (the tied embedding): when they sit
    /// on different stages each holds a copy, whose gradients the executor sums.
    pub fn shared_params(&self) -> Vec<String> {
        let last = self.layer_params(Layer::Head);
        self.layer_params(Layer::Embedding)
            .into_iter()
            .filter(|(name, _)| last.iter().any(|(n, _)| n == name))
            .map(|(name, _)| name)
            .collect()
    }

    /// Number of trainable parameters (a tied embedding counted once).
    pub fn num_parameters(&self) -> usize {
        self.all_params()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// Forward FLOPs per token of `layer` over sequences of `seq` tokens: two per
    /// multiply-add of its matmuls and attention, plus the softmax over the vocabulary.
    pub fn layer_flops(&self, layer: Layer, seq: usize) -> f64 {
        self.parts(layer).flops(seq)
    }

    /// Forward FLOPs per token of `layer`'s weight matmuls alone (a split backward's weight
    /// half costs as many).
    pub fn layer_weight_flops(&self, layer: Layer) -> f64 {
        self.parts(layer).weight_flops()
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
        let cfg = ModelConfig {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            ..ModelConfig::default()
        };
        assert_eq!(cfg.num_parameters(), 124_439_808);
        assert_eq!(cfg.layers().len(), 14);
    }

    #[test]
    fn hugging_face_config_json_loads() {
        let json = r#"{"model_type":"gpt2","vocab_size":50257,"n_positions":1024,
            "n_ctx":1024,"n_embd":768,"n_layer":12,"n_head":12,"activation_function":"gelu_new"}"#;
        let cfg: ModelConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.n_embd, 768);
        assert_eq!(cfg.n_head, 12);
        cfg.validate().unwrap();
    }

    #[test]
    fn bad_configs_are_invalid_input() {
        let cfg = ModelConfig {
            n_embd: 10,
            n_head: 4,
            ..ModelConfig::default()
        };
        let err = cfg.validate().unwrap_err();
        assert!(crate::is_invalid_input(&err));
        assert!(err.to_string().contains("n_embd (10)"));
        let zero = ModelConfig {
            n_layer: 0,
            ..ModelConfig::default()
        };
        assert!(crate::is_invalid_input(&zero.validate().unwrap_err()));
    }

    #[test]
    fn shared_wte_is_listed_once() {
        let cfg = ModelConfig::default();
        let names: Vec<String> = cfg.all_params().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.iter().filter(|n| *n == "wte").count(), 1);
        assert_eq!(names.len(), 2 + 12 * cfg.n_layer + 2);
        assert_eq!(names[2], "h.0.ln_1.weight");
        assert_eq!(names.last().unwrap(), "ln_f.bias");
    }

    #[test]
    fn llamas_relatives_round_trip_through_config_json_with_their_own_parameters() {
        let sizes = |family| ModelConfig {
            family,
            vocab_size: 300,
            n_positions: 64,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            n_kv_head: Some(2),
            ..ModelConfig::default()
        };
        let llama = sizes(Family::Llama);
        for family in [Family::Llama, Family::Mistral, Family::Qwen2] {
            let cfg = sizes(family);
            let json = cfg.hf_config();
            assert_eq!(json["model_type"], family.name());
            let back = ModelConfig::from_hf_config(&json).unwrap();
            assert_eq!(back.family, family);
            assert_eq!(
                (back.kv_heads(), back.ffn(), back.tied()),
                (2, cfg.ffn(), false)
            );
            let names: Vec<String> = cfg.all_params().into_iter().map(|(n, _)| n).collect();
            let biases = names.iter().filter(|n| n.ends_with("_proj.bias")).count();
            // Qwen2 adds q, k and v biases (32 + 16 + 16 per block); the others none.
            let extra = cfg.num_parameters() - llama.num_parameters();
            match family {
                Family::Qwen2 => assert_eq!((biases, extra), (6, 2 * (32 + 16 + 16))),
                _ => assert_eq!((biases, extra), (0, 0)),
            }
        }
        // A sliding window narrower than the context is refused by name; a wide one is full
        // attention.
        let mut json = sizes(Family::Mistral).hf_config();
        json["sliding_window"] = serde_json::json!(16);
        let err = ModelConfig::from_hf_config(&json).unwrap_err().to_string();
        assert!(err.contains("sliding_window 16"), "{err}");
        json["sliding_window"] = serde_json::json!(4096);
        ModelConfig::from_hf_config(&json).unwrap();
        let mut qwen = sizes(Family::Qwen2).hf_config();
        qwen["sliding_window"] = serde_json::json!(16);
        ModelConfig::from_hf_config(&qwen).unwrap();
        qwen["use_sliding_window"] = serde_json::json!(true);
        assert!(ModelConfig::from_hf_config(&qwen).is_err());
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_built() {
        // Found by the config_json fuzz target: 13 billion layers listed their parameters
        // until memory ran out.
        let json = serde_json::json!({"model_type": "gpt2", "vocab_size": 256, "n_positions": 8,
            "n_embd": 10, "n_head": 2, "n_layer": 13_145_224_191u64});
        let err = ModelConfig::from_hf_config(&json).unwrap_err();
        assert!(crate::is_invalid_input(&err));
        assert!(
            err.to_string().contains("n_layer must be at most 16384"),
            "{err}"
        );
    }

    #[test]
    fn a_deep_models_parameters_are_listed_each_once() {
        // Found by the config_json fuzz target: 13,148 layers took over 10 s to list their
        // parameters (each name looked up among all before it).
        let cfg = ModelConfig {
            n_layer: 16384,
            ..ModelConfig::default()
        };
        assert_eq!(cfg.all_params().len(), 2 + 12 * 16384 + 2);
    }
}
