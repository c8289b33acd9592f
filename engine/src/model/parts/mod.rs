//! The pieces every family is assembled from. Each part names its parameters (built once, by
//! the family), lists them with their shape and initialisation, counts its FLOPs, and owns
//! its forward, its input gradient and its weight gradient, so the stage, the executor, the
//! cost model and the dry run work for every family without knowing which it is.

pub(super) mod attention;
pub(super) mod block;
pub(super) mod embedding;
pub(super) mod head;
pub(super) mod linear;
pub(super) mod mlp;
pub(super) mod norm;

pub(crate) use attention::{Qkv, SelfAttention};
pub(crate) use block::Block;
pub(crate) use embedding::Embedding;
pub(crate) use head::Head;
pub(crate) use linear::{Layout, Linear};
pub(crate) use mlp::Mlp;
pub(crate) use norm::Norm;

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Init {
    /// All ones (norm weights).
    Ones,
    /// All zeros (biases).
    Zeros,
    /// Normal with mean 0 and this standard deviation, from a stream keyed by seed and name.
    Normal(f64),
}

/// One parameter tensor of a part.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ParamSpec {
    /// The family's name for it (Hugging Face's, without the model prefix).
    pub(crate) name: String,
    /// Dimensions, outermost first.
    pub(crate) shape: Vec<usize>,
    /// Its initial value.
    pub(crate) init: Init,
    /// A matmul reads it: under mixed precision it gets a low-precision compute copy.
    pub(crate) operand: bool,
}

impl ParamSpec {
    pub(crate) fn new(name: &str, shape: Vec<usize>, init: Init, operand: bool) -> Self {
        Self {
            name: name.to_string(),
            shape,
            init,
            operand,
        }
    }
}

/// The parts of one layer the partitioner may place.
pub(crate) enum LayerParts {
    /// Token (and position) embedding.
    Embedding(Embedding),
    /// A pre-norm transformer block.
    Block(Box<Block>),
    /// Final norm, LM head and loss.
    Head(Head),
}

impl LayerParts {
    /// The layer's parameters, in a fixed order.
    pub(crate) fn params(&self) -> Vec<ParamSpec> {
        match self {
            LayerParts::Embedding(e) => e.params(),
            LayerParts::Block(b) => b.params(),
            LayerParts::Head(h) => h.params(),
        }
    }

    /// Forward FLOPs per token over sequences of `seq` tokens.
    pub(crate) fn flops(&self, seq: usize) -> f64 {
        match self {
            // A row gathered (and a position added) per channel.
            LayerParts::Embedding(e) => e.channels as f64,
            LayerParts::Block(b) => b.flops(seq),
            LayerParts::Head(h) => h.flops(),
        }
    }

    /// Forward FLOPs per token of the matmuls whose weight gradients a split backward defers.
    pub(crate) fn weight_flops(&self) -> f64 {
        match self {
            LayerParts::Block(b) => b.weight_flops(),
            _ => 0.0,
        }
    }
}
