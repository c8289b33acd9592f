//! Models as an ordered list of layers — embedding, `n_layer` transformer blocks, head — each
//! assembled from shared parts (`parts/`) by a family (`gpt2.rs`, `llama.rs`) and run through
//! [`Backend`](crate::backend::Backend) operations, so a partitioner may cut between any two
//! layers. Tensor names are the family's Hugging Face names without the model prefix; the
//! prefixes and the `config.json` of each family appear only at the checkpoint boundary.

mod config;
mod gpt2;
mod host;
mod llama;
mod params;
mod parts;
mod stage;
mod weight_grads;

use anyhow::Result;
use serde_json::Value;

pub use config::{AdamWConfig, Family, Layer, ModelConfig};
pub use host::{init_parameters, init_tensor, HostTensor, HostTensors};
pub use stage::{Keep, KvCache, OptimizerState, Saved, StageInput, StageModel, StageOutput};
pub use weight_grads::WeightGrads;

impl Family {
    /// The Hugging Face name of one of this family's tensors.
    pub fn hf_name(self, name: &str) -> String {
        match self {
            Family::Gpt2 => gpt2::hf_name(name),
            _ => llama::hf_name(name),
        }
    }

    /// pipit's name of a Hugging Face tensor of this family; `None` for what its checkpoints
    /// carry besides weights.
    pub fn internal_name(self, hf: &str) -> Option<String> {
        match self {
            Family::Gpt2 => gpt2::internal_name(hf),
            _ => llama::internal_name(hf),
        }
    }
}

impl ModelConfig {
    /// Hugging Face's `config.json` for this model.
    pub fn hf_config(&self) -> Value {
        match self.family {
            Family::Gpt2 => gpt2::hf_config(self),
            _ => llama::hf_config(self),
        }
    }

    /// The model a Hugging Face `config.json` describes, its family from `model_type`
    /// (GPT-2 when absent); what pipit does not implement is rejected by name.
    pub fn from_hf_config(v: &Value) -> Result<Self> {
        let config = match v.get("model_type").and_then(Value::as_str) {
            None | Some("gpt2") => gpt2::parse_hf_config(v)?,
            Some(name @ ("llama" | "mistral" | "qwen2")) => {
                llama::parse_hf_config(v, name.parse()?)?
            }
            Some(other) => {
                return Err(crate::invalid_input!(
                    "config.json: model_type must be gpt2, llama, mistral or qwen2, got {other}"
                ))
            }
        };
        config.validate()?;
        Ok(config)
    }
}

/// A positive integer field of a Hugging Face `config.json`.
fn hf_usize(v: &Value, name: &str) -> Result<usize> {
    v.get(name)
        .and_then(Value::as_u64)
        .filter(|&x| x > 0)
        .map(|x| x as usize)
        .ok_or_else(|| crate::invalid_input!("config.json: `{name}` must be a positive integer"))
}
