//! GPT-2 as an ordered list of layers — embedding, `n_layer` transformer blocks, head — built
//! from [`Backend`](crate::backend::Backend) operations, so a partitioner may cut between any
//! two layers. Tensor names, shapes and layouts are Hugging Face's (without the
//! `transformer.` prefix; Conv1D weights stored `[in, out]`; the LM head tied to `wte`).

mod block;
mod config;
mod head;
mod host;
mod params;
mod stage;
mod weight_grads;

pub use config::{AdamWConfig, GptConfig, Layer};
pub use host::{init_parameters, init_tensor, HostTensor, HostTensors};
pub use stage::{Keep, KvCache, OptimizerState, Saved, StageInput, StageModel, StageOutput};
pub use weight_grads::WeightGrads;
