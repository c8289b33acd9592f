//! A stage: a contiguous run of the model's layers, with its parameters, gradients and
//! AdamW moments on one backend, run forward and backward one micro-batch at a time.

use std::ops::Range;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::config::{AdamWConfig, Layer, ModelConfig};
use super::host::HostTensors;
use super::params::Params;
use super::parts::attention::{Past, Tokens};
use super::parts::block::BlockActs;
use super::parts::head::HeadActs;
use super::parts::LayerParts;
use super::weight_grads::WeightGrads;
use crate::backend::{AdamW, Backend, CachedAttention, DType};
use crate::invalid;

/// The input of a stage's forward.
pub enum StageInput<'a, B: Backend> {
    /// Token ids, u32 `[batch·seq]`: the input of the stage that holds the embedding.
    Tokens(&'a B::Buffer),
    /// The previous stage's output `[batch·seq, n_embd]`; the stage takes ownership.
    Hidden(B::Buffer),
}

/// The output of a stage's forward.
pub enum StageOutput<B: Backend> {
    /// Hidden states `[batch·seq, n_embd]` for the next stage.
    Hidden(B::Buffer),
    /// Per-token losses `[batch·seq]` (the head, given targets).
    Loss {
        /// `losses[r] = −log softmax(logits[r])[targets[r]]`.
        losses: B::Buffer,
    },
    /// Logits `[batch·seq, vocab_size]` (the head, without targets).
    Logits(B::Buffer),
}

/// What a forward keeps for its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// Every activation backward needs.
    All,
    /// Only the stage input (activation checkpointing): backward recomputes the forward.
    Input,
    /// Nothing: inference and evaluation; backward is impossible.
    Nothing,
}

/// Sizes of one micro-batch on this model.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub(super) batch: usize,
    pub(super) seq: usize,
    pub(super) channels: usize,
    /// Element type of the activations inside blocks and the head (the residual stream
    /// between layers stays f32).
    pub(super) act: DType,
}

impl Dims {
    /// Token positions in the micro-batch (`batch·seq`).
    pub(super) fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// The micro-batch as the parts see it, its first token at position `start`.
    fn tokens(&self, start: usize) -> Tokens {
        Tokens {
            batch: self.batch,
            seq: self.seq,
            start,
            act: self.act,
        }
    }
}

/// One layer's activations, in forward order.
enum Acts<B: Backend> {
    Embedding,
    Block(BlockActs<B>),
    Head(HeadActs<B>),
}

/// Every activation of one forward: each layer's, and each inner layer boundary.
struct Trace<B: Backend> {
    /// Inputs of layers `1..` (outputs of the layers before them); the stage input is apart.
    hiddens: Vec<B::Buffer>,
    acts: Vec<Acts<B>>,
}

/// What one forward kept for its backward. Dropping it frees the buffers.
pub struct Saved<B: Backend> {
    dims: Dims,
    bytes: u64,
    /// The stage input (a copy of the tokens on the first stage); `None` under [`Keep::Nothing`].
    input: Option<B::Buffer>,
    /// A copy of the targets on the head stage.
    targets: Option<B::Buffer>,
    /// `None` under [`Keep::Input`]: backward recomputes it.
    trace: Option<Trace<B>>,
}

impl<B: Backend> Saved<B> {
    /// Bytes of device memory held by the kept buffers.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The keys and values of every token a stage has decoded so far, one buffer per block
/// (`[batch, capacity, 2, n_embd]`), so the next token runs without the ones before it.
pub struct KvCache<B: Backend> {
    blocks: Vec<B::Buffer>,
    batch: usize,
    capacity: usize,
    /// Tokens per sequence held.
    past: usize,
}

impl<B: Backend> KvCache<B> {
    /// Tokens per sequence the cache holds.
    pub fn len(&self) -> usize {
        self.past
    }

    /// Whether it holds no token yet.
    pub fn is_empty(&self) -> bool {
        self.past == 0
    }

    /// Positions it can hold per sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sequences it holds.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Forget every token (the buffers stay, to be overwritten).
    pub fn clear(&mut self) {
        self.past = 0;
    }
}

/// AdamW moments of a stage's parameters, on the host (for checkpoints).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    /// First moments, by parameter name.
    pub m: HostTensors,
    /// Second moments, by parameter name.
    pub v: HostTensors,
}

/// The layers `layers` of a model on one backend: parameters, gradients, AdamW moments.
///
/// In a model whose head is tied to the token embedding ([`ModelConfig::shared_params`]), a
/// stage holding the embedding or the head holds the table; one holding both shares one
/// table between them. When the embedding and the head sit on different stages each holds
/// its own copy, and the caller keeps them tied: sum the two gradients before the optimizer
/// step, so both copies take the same update.
pub struct StageModel<B: Backend> {
    cfg: ModelConfig,
    layers: Range<usize>,
    kinds: Vec<Layer>,
    /// Each layer's parts, as the family assembles them.
    parts: Vec<LayerParts>,
    params: Params<B>,
    /// The compute dtype: f32, or bf16 for mixed precision.
    dtype: DType,
}

impl<B: Backend> StageModel<B> {
    /// Upload the tensors of `layers` (indices into [`ModelConfig::layers`]) from `host`.
    pub fn new(b: &B, cfg: &ModelConfig, layers: Range<usize>, host: &HostTensors) -> Result<Self> {
        Self::build(b, cfg, layers, host, true)
    }

    /// [`StageModel::new`] for inference: the weights alone, without gradients or AdamW
    /// moments (a quarter of a training stage's parameter memory). Backward and optimizer
    /// steps are errors.
    pub fn for_inference(
        b: &B,
        cfg: &ModelConfig,
        layers: Range<usize>,
        host: &HostTensors,
    ) -> Result<Self> {
        Self::build(b, cfg, layers, host, false)
    }

    fn build(
        b: &B,
        cfg: &ModelConfig,
        layers: Range<usize>,
        host: &HostTensors,
        train: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let all = cfg.layers();
        if layers.start >= layers.end || layers.end > all.len() {
            invalid!(
                "stage layers {}..{} must be a non-empty range within the model's {} layers",
                layers.start,
                layers.end,
                all.len()
            );
        }
        let kinds = all[layers.clone()].to_vec();
        let specs = cfg.specs_of(&kinds);
        let mut data = Vec::with_capacity(specs.len());
        for spec in &specs {
            let (name, shape) = (&spec.name, &spec.shape);
            let Some(t) = host.get(name) else {
                invalid!("the model parameters lack tensor {name}");
            };
            if &t.shape != shape {
                invalid!(
                    "tensor {name} has shape {:?}; the model config needs {shape:?}",
                    t.shape
                );
            }
            data.push(t.data.as_slice());
        }
        let params = Params::new(b, specs, data, train)?;
        let parts = kinds.iter().map(|&k| cfg.parts(k)).collect();
        Ok(Self {
            cfg: cfg.clone(),
            layers,
            kinds,
            parts,
            params,
            dtype: DType::F32,
        })
    }

    /// Compute in `dtype` from now on: [`DType::F32`] (the default), or [`DType::BF16`] for
    /// mixed precision — bf16 matmul operands and activations inside each layer, with f32
    /// master weights, gradients, optimizer state, layernorm statistics and residual stream.
    pub fn set_dtype(&mut self, b: &B, dtype: DType) -> Result<()> {
        if !dtype.is_float() {
            invalid!(
                "the compute dtype must be f32 or bf16, got {}",
                dtype.name()
            );
        }
        if !b.supports(dtype) {
            invalid!(
                "--dtype {} is not available on {}; use --dtype f32 or another backend",
                dtype.name(),
                b.describe()
            );
        }
        self.params.set_compute_dtype(b, dtype)?;
        self.dtype = dtype;
        Ok(())
    }

    /// The compute dtype (see [`Self::set_dtype`]).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The layer indices this stage runs.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// The layers this stage runs, in order.
    pub fn layer_kinds(&self) -> &[Layer] {
        &self.kinds
    }

    /// Hugging Face names of this stage's parameters, in a fixed order.
    pub fn param_names(&self) -> Vec<String> {
        self.params.names.clone()
    }

    /// The shape of parameter `name`.
    pub fn param_shape(&self, name: &str) -> Option<&[usize]> {
        self.params
            .find(name)
            .map(|i| self.params.shapes[i].as_slice())
    }

    /// The value of parameter `name`.
    pub fn param(&self, name: &str) -> Option<&B::Buffer> {
        self.params.find(name).map(|i| &self.params.values[i])
    }

    /// The accumulated gradient of parameter `name`.
    pub fn grad(&self, name: &str) -> Option<&B::Buffer> {
        self.params
            .find(name)
            .and_then(|i| self.params.grads.get(i))
    }

    /// The accumulated gradient of parameter `name`, mutably (e.g. to sum tied copies).
    pub fn grad_mut(&mut self, name: &str) -> Option<&mut B::Buffer> {
        self.params
            .find(name)
            .and_then(|i| self.params.grads.get_mut(i))
    }

    /// Number of parameters this stage holds.
    pub fn num_parameters(&self) -> usize {
        self.params
            .shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    fn dims(&self, batch: usize, seq: usize) -> Result<Dims> {
        if batch == 0 || seq == 0 {
            invalid!("a micro-batch needs at least one sequence of one token, got batch {batch} and seq {seq}");
        }
        if seq > self.cfg.n_positions {
            invalid!(
                "sequence length {seq} exceeds the model's n_positions ({})",
                self.cfg.n_positions
            );
        }
        Ok(Dims {
            batch,
            seq,
            channels: self.cfg.n_embd,
            act: self.dtype,
        })
    }

    fn has_head(&self) -> bool {
        self.kinds.last() == Some(&Layer::Head)
    }

    /// Run the stage on one micro-batch of `batch` sequences of `seq` tokens.
    ///
    /// `targets` (u32 `[batch·seq]`) matter only on the head stage and are ignored elsewhere;
    /// a head stage that keeps anything for backward needs them.
    pub fn forward(
        &self,
        b: &B,
        input: StageInput<'_, B>,
        targets: Option<&B::Buffer>,
        batch: usize,
        seq: usize,
        keep: Keep,
    ) -> Result<(StageOutput<B>, Saved<B>)> {
        let d = self.dims(batch, seq)?;
        let rows = d.rows();
        let takes_tokens = self.kinds[0] == Layer::Embedding;
        let (owned, borrowed) = match input {
            StageInput::Tokens(_) if !takes_tokens => bail!(
                "stage {:?} starts with {}; it takes hidden states, not tokens",
                self.layers,
                self.kinds[0]
            ),
            StageInput::Hidden(_) if takes_tokens => bail!(
                "stage {:?} starts with the embedding; it takes tokens, not hidden states",
                self.layers
            ),
            StageInput::Tokens(t) => {
                check_len(b, t, rows, "tokens")?;
                if keep == Keep::Nothing {
                    (None, Some(t))
                } else {
                    (Some(copy_of(b, t, DType::U32)?), None)
                }
            }
            StageInput::Hidden(h) => {
                check_len(b, &h, rows * d.channels, "input hidden states")?;
                (Some(h), None)
            }
        };
        let targets = if self.has_head() { targets } else { None };
        if let Some(t) = targets {
            check_len(b, t, rows, "targets")?;
        }
        if self.has_head() && keep != Keep::Nothing && targets.is_none() {
            bail!("the head stage needs targets to keep activations for backward");
        }
        let x0 = owned.as_ref().or(borrowed).context("stage input")?;
        let (output, trace) = self.run(b, x0, targets, d, keep == Keep::All, None)?;
        let saved_targets = match (keep, targets) {
            (Keep::Nothing, _) | (_, None) => None,
            (_, Some(t)) => Some(copy_of(b, t, DType::U32)?),
        };
        let input = if keep == Keep::Nothing { None } else { owned };
        let mut bytes = [&input, &saved_targets]
            .iter()
            .filter_map(|x| x.as_ref())
            .map(|x| b.bytes(x))
            .sum::<u64>();
        if let Some(t) = &trace {
            bytes += t.hiddens.iter().map(|h| b.bytes(h)).sum::<u64>();
            bytes += t
                .acts
                .iter()
                .map(|a| match a {
                    Acts::Embedding => 0,
                    Acts::Block(a) => a.bytes(b),
                    Acts::Head(a) => a.bytes(b),
                })
                .sum::<u64>();
        }
        let saved = Saved {
            dims: d,
            bytes,
            input,
            targets: saved_targets,
            trace,
        };
        Ok((output, saved))
    }

    /// A cache of keys and values for [`StageModel::decode`]: `batch` sequences of up to
    /// `capacity` tokens (at most the model's `n_positions`), empty.
    pub fn kv_cache(&self, b: &B, batch: usize, capacity: usize) -> Result<KvCache<B>> {
        let d = self.dims(batch, capacity)?;
        let blocks = self
            .kinds
            .iter()
            .filter(|k| matches!(k, Layer::Block(_)))
            .map(|_| b.alloc(d.rows() * 2 * d.channels, DType::F32))
            .collect::<Result<_>>()?;
        Ok(KvCache {
            blocks,
            batch,
            capacity,
            past: 0,
        })
    }

    /// Run the stage forward on `new` tokens per sequence that follow the ones `cache` holds,
    /// and add theirs to it: the output for those tokens is the one [`StageModel::forward`]
    /// gives them in the whole sequences, at the cost of the new tokens alone. f32 only.
    pub fn decode(
        &self,
        b: &B,
        input: StageInput<'_, B>,
        cache: &mut KvCache<B>,
        new: usize,
    ) -> Result<StageOutput<B>> {
        if self.dtype != DType::F32 {
            bail!(
                "decoding with a key/value cache runs in f32, not {:?}",
                self.dtype
            );
        }
        if cache.past + new > cache.capacity {
            bail!(
                "{} cached and {new} new tokens exceed the cache's {} positions",
                cache.past,
                cache.capacity
            );
        }
        let d = self.dims(cache.batch, new)?;
        let takes_tokens = self.kinds[0] == Layer::Embedding;
        let x0 = match &input {
            StageInput::Tokens(t) if takes_tokens => *t,
            StageInput::Hidden(h) if !takes_tokens => h,
            _ => bail!(
                "stage {:?} starts with {}; it was given the other kind of input",
                self.layers,
                self.kinds[0]
            ),
        };
        let width = if takes_tokens { 1 } else { d.channels };
        check_len(b, x0, d.rows() * width, "decoder input")?;
        let (output, _) = self.run(b, x0, None, d, false, Some(&mut *cache))?;
        cache.past += new;
        Ok(output)
    }

    /// Run the stage forward on a ragged batch: several sequences, each with its own cache
    /// (of one sequence) and `new` tokens after the ones it holds, their rows one sequence
    /// after the other (`input` is their token ids, or the previous stage's output for
    /// them), and add each sequence's keys and values to its cache. Every row's output is
    /// the one [`StageModel::decode`] gives it in its own sequence; the head stage returns
    /// only each sequence's last row of logits (`[sequences, vocab]`). f32 only.
    ///
    /// This is what continuous batching runs: sequences admitted at different times, at
    /// different lengths, and prompts (many new tokens) beside decoding ones (one each) share
    /// one pass, so every matrix product runs once over all their rows, and only attention
    /// and positions go sequence by sequence.
    pub fn decode_ragged(
        &self,
        b: &B,
        input: StageInput<'_, B>,
        sequences: &mut [(&mut KvCache<B>, usize)],
    ) -> Result<StageOutput<B>> {
        if self.dtype != DType::F32 {
            bail!(
                "decoding with a key/value cache runs in f32, not {:?}",
                self.dtype
            );
        }
        let mut rows = 0usize;
        let mut positions = Vec::new();
        for (cache, new) in sequences.iter() {
            if cache.batch != 1 {
                bail!(
                    "a ragged batch takes caches of one sequence, not {}",
                    cache.batch
                );
            }
            if *new == 0 || cache.past + new > cache.capacity {
                bail!(
                    "{} cached and {new} new tokens do not fit a cache of {} positions",
                    cache.past,
                    cache.capacity
                );
            }
            positions.extend((cache.past..cache.past + new).map(|t| t as u32));
            rows += new;
        }
        if rows == 0 {
            bail!("a ragged batch needs at least one sequence");
        }
        let c = self.cfg.n_embd;
        let takes_tokens = self.kinds[0] == Layer::Embedding;
        let (ids, mut current) = match input {
            StageInput::Tokens(t) if takes_tokens => {
                check_len(b, t, rows, "decoder input")?;
                (Some(t), None)
            }
            StageInput::Hidden(h) if !takes_tokens => {
                check_len(b, &h, rows * c, "decoder input")?;
                (None, Some(h))
            }
            _ => bail!(
                "stage {:?} starts with {}; it was given the other kind of input",
                self.layers,
                self.kinds[0]
            ),
        };
        let t = Tokens {
            batch: rows,
            seq: 1,
            start: 0,
            act: DType::F32,
        };
        let mut block = 0;
        for (layer, parts) in self.kinds.iter().zip(&self.parts) {
            current = Some(match parts {
                LayerParts::Embedding(e) => {
                    let ids = ids.context("the embedding without its tokens")?;
                    let at = b.upload_u32(&positions)?;
                    e.forward_at_positions(b, &self.params, ids, &at, rows)?
                }
                LayerParts::Block(part) => {
                    let x = current.as_ref().context("a block without its input")?;
                    let caches = sequences
                        .iter_mut()
                        .map(|(cache, new)| {
                            let shape = CachedAttention {
                                batch: 1,
                                new: *new,
                                past: cache.past,
                                capacity: cache.capacity,
                                channels: c,
                                heads: self.cfg.n_head,
                            };
                            let buf = cache
                                .blocks
                                .get_mut(block)
                                .context("a block without its cache")?;
                            Ok((buf, shape))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    block += 1;
                    part.forward(b, &self.params, x, t, Past::Ragged(caches))
                        .with_context(|| format!("forward of {layer}"))?
                        .0
                }
                LayerParts::Head(head) => {
                    let x = current.as_ref().context("the head without its input")?;
                    // Only each sequence's last position is sampled from.
                    let mut last = b.alloc(sequences.len() * c, DType::F32)?;
                    let mut row = 0;
                    for (i, (_, new)) in sequences.iter().enumerate() {
                        row += new;
                        b.copy_range(&mut last, i * c, x, (row - 1) * c, c)?;
                    }
                    let acts = head
                        .forward(b, &self.params, &last, sequences.len(), DType::F32)
                        .context("forward of the head")?;
                    for (cache, new) in sequences.iter_mut() {
                        cache.past += *new;
                    }
                    return Ok(StageOutput::Logits(acts.logits));
                }
            });
        }
        for (cache, new) in sequences.iter_mut() {
            cache.past += *new;
        }
        current
            .map(StageOutput::Hidden)
            .with_context(|| format!("stage {:?} produced no output", self.layers))
    }

    /// Run every layer on `x0`; with `keep_acts`, return what backward needs as well. With a
    /// `cache`, `x0` holds the tokens after the cached ones, whose keys and values it adds.
    fn run(
        &self,
        b: &B,
        x0: &B::Buffer,
        targets: Option<&B::Buffer>,
        d: Dims,
        keep_acts: bool,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<(StageOutput<B>, Option<Trace<B>>)> {
        let past = cache.as_ref().map_or(0, |c| c.past);
        let capacity = cache.as_ref().map_or(0, |c| c.capacity);
        let mut cached_blocks = cache.map(|c| c.blocks.iter_mut());
        let mut trace = Trace {
            hiddens: Vec::new(),
            acts: Vec::new(),
        };
        let mut current: Option<B::Buffer> = None;
        let mut head_output = None;
        let t = d.tokens(past);
        for (layer, parts) in self.kinds.iter().zip(&self.parts) {
            let x = current.as_ref().unwrap_or(x0);
            let (next, acts) = match parts {
                LayerParts::Embedding(e) => {
                    let out = e.forward(b, &self.params, x, (d.batch, d.seq, past))?;
                    (Some(out), Some(Acts::Embedding))
                }
                LayerParts::Block(block) => {
                    let past_ctx = match &mut cached_blocks {
                        Some(blocks) => Past::Cached(
                            blocks.next().context("a block without its cache")?,
                            CachedAttention {
                                batch: d.batch,
                                new: d.seq,
                                past,
                                capacity,
                                channels: d.channels,
                                heads: self.cfg.n_head,
                            },
                        ),
                        None => Past::Nothing,
                    };
                    let (out, acts) = block
                        .forward(b, &self.params, x, t, past_ctx)
                        .with_context(|| format!("forward of {layer}"))?;
                    (Some(out), Some(Acts::Block(acts)))
                }
                LayerParts::Head(head) => {
                    let acts = head
                        .forward(b, &self.params, x, d.rows(), d.act)
                        .context("forward of the head")?;
                    match targets {
                        Some(targets) => {
                            head_output = Some(StageOutput::Loss {
                                losses: head.losses(b, &acts, targets, d.rows())?,
                            });
                            (None, Some(Acts::Head(acts)))
                        }
                        // Without targets there is no backward: hand the logits out.
                        None => {
                            head_output = Some(StageOutput::Logits(acts.logits));
                            (None, None)
                        }
                    }
                }
            };
            let previous = std::mem::replace(&mut current, next);
            if keep_acts {
                trace.hiddens.extend(previous);
                trace
                    .acts
                    .push(acts.context("the head keeps activations only with targets")?);
            }
        }
        let output = match (head_output, current) {
            (Some(out), _) => out,
            (None, Some(hidden)) => StageOutput::Hidden(hidden),
            (None, None) => bail!("stage {:?} produced no output", self.layers),
        };
        Ok((output, keep_acts.then_some(trace)))
    }

    /// Backward of one micro-batch from what its forward kept.
    ///
    /// `dout` is the gradient of the stage output (`None` on the head stage, which starts from
    /// `loss_scale · Σ losses`). Parameter gradients accumulate; the returned buffer is the
    /// gradient of the stage input (`None` on the stage holding the embedding). `saved` is
    /// consumed and its buffers freed as backward goes.
    pub fn backward(
        &mut self,
        b: &B,
        saved: Saved<B>,
        dout: Option<B::Buffer>,
        loss_scale: f32,
    ) -> Result<Option<B::Buffer>> {
        self.backward_into(b, saved, dout, loss_scale, &mut WeightGrads::now())
    }

    /// The input-gradient half of a split backward (`I`): as [`StageModel::backward`], except
    /// that the blocks' weight-gradient products are returned, with the operands they read,
    /// for [`StageModel::backward_weight`]. The embedding's and the head's gradients are taken
    /// here: the head's would have to keep the logits' gradient, far larger than its product.
    pub fn backward_input(
        &mut self,
        b: &B,
        saved: Saved<B>,
        dout: Option<B::Buffer>,
        loss_scale: f32,
    ) -> Result<(Option<B::Buffer>, WeightGrads<B>)> {
        let mut later = WeightGrads::later();
        let dinput = self.backward_into(b, saved, dout, loss_scale, &mut later)?;
        Ok((dinput, later))
    }

    /// The weight-gradient half of a split backward (`W`): accumulate what
    /// [`StageModel::backward_input`] left.
    pub fn backward_weight(&mut self, b: &B, work: WeightGrads<B>) -> Result<()> {
        work.run(b, &mut self.params)
    }

    fn backward_into(
        &mut self,
        b: &B,
        saved: Saved<B>,
        dout: Option<B::Buffer>,
        loss_scale: f32,
        wg: &mut WeightGrads<B>,
    ) -> Result<Option<B::Buffer>> {
        let Saved {
            dims: d,
            input,
            targets,
            trace,
            ..
        } = saved;
        if !self.params.trains() {
            bail!("backward of stage {:?}, built for inference", self.layers);
        }
        let input = input.ok_or_else(|| {
            anyhow!(
                "backward of stage {:?}: its forward ran with Keep::Nothing",
                self.layers
            )
        })?;
        let trace = match trace {
            Some(t) => t,
            None => self
                .run(b, &input, targets.as_ref(), d, true, None)
                .context("recomputing the forward for backward")?
                .1
                .context("the recomputed forward kept its activations")?,
        };
        match (self.has_head(), &dout) {
            (true, Some(_)) => {
                bail!("the head stage starts backward from its loss and takes no output gradient")
            }
            (false, None) => bail!(
                "backward of stage {:?} needs the gradient of its output",
                self.layers
            ),
            (false, Some(g)) => check_len(b, g, d.rows() * d.channels, "output gradient")?,
            (true, None) => {}
        }
        let Trace { mut hiddens, acts } = trace;
        let t = d.tokens(0);
        let mut grad = dout;
        for ((acts, parts), layer) in acts.into_iter().zip(&self.parts).zip(&self.kinds).rev() {
            // Layer inputs come off the back: the last hidden belongs to the last inner layer.
            let hidden = hiddens.pop();
            let x = hidden.as_ref().unwrap_or(&input);
            let missing = || anyhow!("no gradient reached a layer of stage {:?}", self.layers);
            let p = &mut self.params;
            grad = match (acts, parts) {
                (Acts::Head(a), LayerParts::Head(head)) => {
                    let targets = targets
                        .as_ref()
                        .context("the head's backward needs its targets")?;
                    Some(
                        head.backward(b, p, a, x, targets, loss_scale, d.rows(), d.act)
                            .context("backward of the head")?,
                    )
                }
                (Acts::Block(a), LayerParts::Block(block)) => {
                    let g = grad.take().ok_or_else(missing)?;
                    Some(
                        block
                            .backward(b, p, a, x, g, t, wg)
                            .with_context(|| format!("backward of {layer}"))?,
                    )
                }
                (Acts::Embedding, LayerParts::Embedding(e)) => {
                    let g = grad.take().ok_or_else(missing)?;
                    e.backward(b, p, &g, x, (d.batch, d.seq))?;
                    None
                }
                _ => bail!("the activations of {layer} do not match its parts"),
            };
        }
        Ok(grad)
    }

    /// `Σ g²` over this stage's gradients (per-tensor f32 sums, added in f64 in parameter
    /// order), for clipping to a global norm. A stage with the head but not the embedding
    /// leaves out its copy of a tied table: once the copies are reconciled both hold the same
    /// gradient, counted on the embedding's stage.
    pub fn grad_sum_squares(&self, b: &B) -> Result<f64> {
        let p = &self.params;
        let holds_embedding = self.kinds.contains(&Layer::Embedding);
        let shared = self.cfg.shared_params();
        let counted: Vec<&B::Buffer> = p
            .names
            .iter()
            .zip(&p.grads)
            .filter(|(name, _)| holds_embedding || !shared.contains(name))
            .map(|(_, g)| g)
            .collect();
        if counted.is_empty() {
            return Ok(0.0);
        }
        let mut sums = b.alloc(counted.len(), DType::F32)?;
        for (slot, g) in counted.into_iter().enumerate() {
            b.sum_squares(&mut sums, slot, g)?;
        }
        Ok(b.download(&sums)?.into_iter().map(f64::from).sum())
    }

    /// Zero every gradient (after the optimizer step, before the next step's micro-batches).
    pub fn zero_grads(&mut self, b: &B) -> Result<()> {
        for g in &mut self.params.grads {
            b.fill(g, 0.0)?;
        }
        Ok(())
    }

    /// One AdamW step (1-based `step`) on every parameter from its accumulated gradient;
    /// weight decay applies only to 2-D tensors (matrices and embeddings).
    pub fn optimizer_step(&mut self, b: &B, lr: f32, step: u32, cfg: &AdamWConfig) -> Result<()> {
        self.optimizer_step_scaled(b, lr, step, cfg, 1.0)
    }

    /// [`StageModel::optimizer_step`] from every gradient times `grad_scale` (clipping).
    pub fn optimizer_step_scaled(
        &mut self,
        b: &B,
        lr: f32,
        step: u32,
        cfg: &AdamWConfig,
        grad_scale: f32,
    ) -> Result<()> {
        if step == 0 {
            invalid!("optimizer steps are numbered from 1, got 0");
        }
        if !self.params.trains() {
            bail!(
                "an optimizer step on stage {:?}, built for inference",
                self.layers
            );
        }
        let p = &mut self.params;
        for i in 0..p.names.len() {
            let hp = AdamW {
                lr,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: if p.shapes[i].len() == 2 {
                    cfg.weight_decay
                } else {
                    0.0
                },
                step,
                grad_scale,
            };
            b.adamw(&mut p.values[i], &p.grads[i], &mut p.m[i], &mut p.v[i], hp)
                .with_context(|| format!("AdamW on {}", p.names[i]))?;
        }
        p.refresh_compute(b)
    }

    fn download_all(&self, b: &B, bufs: &[B::Buffer]) -> Result<HostTensors> {
        let mut out = HostTensors::new();
        for ((name, shape), buf) in self.params.names.iter().zip(&self.params.shapes).zip(bufs) {
            out.insert(name.clone(), shape.clone(), b.download(buf)?)?;
        }
        Ok(out)
    }

    fn load_all(
        b: &B,
        names: &[String],
        shapes: &[Vec<usize>],
        bufs: &mut [B::Buffer],
        host: &HostTensors,
        what: &str,
    ) -> Result<()> {
        for ((name, shape), buf) in names.iter().zip(shapes).zip(bufs) {
            let Some(t) = host.get(name) else {
                invalid!("the {what} lack tensor {name}");
            };
            if &t.shape != shape {
                invalid!(
                    "{what}: tensor {name} has shape {:?}, the model needs {shape:?}",
                    t.shape
                );
            }
            b.write(buf, &t.data)?;
        }
        Ok(())
    }

    /// This stage's parameters on the host.
    pub fn download_params(&self, b: &B) -> Result<HostTensors> {
        self.download_all(b, &self.params.values)
    }

    /// This stage's accumulated gradients on the host.
    pub fn download_grads(&self, b: &B) -> Result<HostTensors> {
        self.download_all(b, &self.params.grads)
    }

    /// Overwrite this stage's parameters from `host` (which may hold other stages' too).
    pub fn load_params(&mut self, b: &B, host: &HostTensors) -> Result<()> {
        let p = &mut self.params;
        Self::load_all(b, &p.names, &p.shapes, &mut p.values, host, "parameters")?;
        p.refresh_compute(b)
    }

    /// The AdamW moments on the host.
    pub fn optimizer_state(&self, b: &B) -> Result<OptimizerState> {
        Ok(OptimizerState {
            m: self.download_all(b, &self.params.m)?,
            v: self.download_all(b, &self.params.v)?,
        })
    }

    /// Overwrite the AdamW moments from `state` (which may hold other stages' too).
    pub fn load_optimizer_state(&mut self, b: &B, state: &OptimizerState) -> Result<()> {
        let p = &mut self.params;
        Self::load_all(
            b,
            &p.names,
            &p.shapes,
            &mut p.m,
            &state.m,
            "optimizer first moments",
        )?;
        Self::load_all(
            b,
            &p.names,
            &p.shapes,
            &mut p.v,
            &state.v,
            "optimizer second moments",
        )
    }
}

/// Fail unless `buf` holds `expected` elements.
fn check_len<B: Backend>(b: &B, buf: &B::Buffer, expected: usize, what: &str) -> Result<()> {
    let len = b.len(buf);
    if len != expected {
        bail!("{what}: buffer has {len} elements, the micro-batch needs {expected}");
    }
    Ok(())
}

/// `src` converted to `dtype`, or `None` when it already is of that type (use `src` itself).
pub(super) fn converted<B: Backend>(
    b: &B,
    src: &B::Buffer,
    dtype: DType,
) -> Result<Option<B::Buffer>> {
    if b.dtype(src) == dtype {
        return Ok(None);
    }
    copy_of(b, src, dtype).map(Some)
}

/// A new buffer of `dtype` holding the same elements as `src`.
fn copy_of<B: Backend>(b: &B, src: &B::Buffer, dtype: DType) -> Result<B::Buffer> {
    let mut dst = b.alloc_output(b.len(src), dtype)?;
    b.copy(&mut dst, src)?;
    Ok(dst)
}
