//! Forward-only passes through the pipeline's stages, for evaluation and text generation.
//!
//! Stages run one after another on the calling thread; an activation crossing to another
//! rank's device is staged through host memory, as the in-process transport does.
//!
//! A pass runs whole sequences ([`Pass::Whole`]), or the tokens that follow those whose keys
//! and values each stage keeps in a cache ([`Pass::Cached`]): text generation feeds one token
//! at a time that way, through a [`Decoder`], instead of running the whole context again.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};

use crate::backend::{Backend, DType, Transport};
use crate::model::{Keep, KvCache, StageInput, StageModel, StageOutput};

use super::step::Rank;

/// What the last stage should produce.
pub enum Want<'a> {
    /// Per-token cross-entropy against these targets (`[batch·seq]`).
    Losses(&'a [u32]),
    /// Logits `[batch·seq, vocab]`.
    Logits,
}

/// How a forward-only pass runs each stage.
pub enum Pass<'a, B: Backend> {
    /// `batch` whole sequences of `seq` tokens; the last stage produces what `want` says.
    Whole {
        /// Losses or logits.
        want: Want<'a>,
        /// Sequences.
        batch: usize,
        /// Tokens per sequence.
        seq: usize,
    },
    /// One sequence's tokens after those in the caches (by stage index), which take them in;
    /// the last stage produces the new tokens' logits.
    Cached(&'a mut BTreeMap<usize, KvCache<B>>),
}

impl<B: Backend> Pass<'_, B> {
    /// Run `model`, stage `stage` (the pipeline's last when `last`), on `input`, where
    /// `tokens` tokens go through the pass.
    pub(crate) fn run(
        &mut self,
        backend: &B,
        model: &StageModel<B>,
        stage: usize,
        last: bool,
        input: StageInput<'_, B>,
        tokens: usize,
    ) -> Result<StageOutput<B>> {
        match self {
            Pass::Whole { want, batch, seq } => {
                let targets = match want {
                    Want::Losses(t) if last => Some(backend.upload_u32(t)?),
                    _ => None,
                };
                let (out, _) = model.forward(
                    backend,
                    input,
                    targets.as_ref(),
                    *batch,
                    *seq,
                    Keep::Nothing,
                )?;
                Ok(out)
            }
            Pass::Cached(caches) => {
                let cache = caches
                    .get_mut(&stage)
                    .ok_or_else(|| anyhow!("stage {stage} has no key/value cache"))?;
                model.decode(backend, input, cache, tokens)
            }
        }
    }
}

/// Run `tokens` forward through every stage in order and return what the last stage produces:
/// per-token losses or logits for [`Pass::Whole`], the new tokens' logits for
/// [`Pass::Cached`].
pub fn forward<B: Backend, T: Transport<B>>(
    ranks: &mut [Rank<B, T>],
    tokens: &[u32],
    mut pass: Pass<'_, B>,
) -> Result<Vec<f32>> {
    let mut order: Vec<(usize, usize)> = ranks
        .iter()
        .enumerate()
        .flat_map(|(r, rank)| rank.stages.iter().map(move |(s, _)| (*s, r)))
        .collect();
    order.sort_unstable();
    let last = order.len() - 1;
    let mut hidden: Option<Vec<f32>> = None;
    for (i, &(stage, r)) in order.iter().enumerate() {
        let rank = &mut ranks[r];
        let backend = &rank.backend;
        let model = &rank
            .stages
            .iter()
            .find(|(s, _)| *s == stage)
            .ok_or_else(|| anyhow!("stage {stage} missing"))?
            .1;
        let token_buf;
        let input = match hidden.take() {
            None => {
                token_buf = backend.upload_u32(tokens)?;
                StageInput::Tokens(&token_buf)
            }
            Some(h) => StageInput::Hidden(backend.upload(&h)?),
        };
        match pass.run(backend, model, stage, i == last, input, tokens.len())? {
            StageOutput::Hidden(h) => hidden = Some(backend.download(&h)?),
            StageOutput::Loss { losses } => return backend.download(&losses),
            StageOutput::Logits(logits) => return backend.download(&logits),
        }
    }
    Err(anyhow!("the pipeline has no head stage"))
}

/// Key/value caches for the stages of some ranks and the one sequence whose tokens they
/// hold, so each next token of a growing context runs alone through the pipeline.
///
/// The caches are f32: when a stage computes in another dtype (bf16 mixed precision), the
/// decoder holds none and every context runs whole.
pub struct Decoder<B: Backend> {
    /// By stage index; `None` when the contexts run whole.
    caches: Option<BTreeMap<usize, KvCache<B>>>,
    /// The tokens the caches hold (empty after a failed pass).
    held: Vec<u32>,
    capacity: usize,
}

impl<B: Backend> Decoder<B> {
    /// Decoder `i` of `decoders` (one per sequence generated side by side), made with the
    /// missing ones before it on first use, for the stages of `ranks`.
    pub fn nth<'a, T: Transport<B>>(
        decoders: &'a mut Vec<Decoder<B>>,
        i: usize,
        ranks: &[Rank<B, T>],
        capacity: usize,
    ) -> Result<&'a mut Decoder<B>> {
        while decoders.len() <= i {
            decoders.push(Decoder::new(ranks, capacity)?);
        }
        Ok(&mut decoders[i])
    }

    /// Empty caches of `capacity` positions (at most the model's `n_positions`) for every
    /// stage of `ranks`.
    pub fn new<T: Transport<B>>(ranks: &[Rank<B, T>], capacity: usize) -> Result<Self> {
        let stages = || {
            ranks
                .iter()
                .flat_map(|r| r.stages.iter().map(move |s| (r, s)))
        };
        let caches = if stages().all(|(_, (_, model))| model.dtype() == DType::F32) {
            let mut caches = BTreeMap::new();
            for (rank, (stage, model)) in stages() {
                caches.insert(*stage, model.kv_cache(&rank.backend, 1, capacity)?);
            }
            Some(caches)
        } else {
            None
        };
        Ok(Self {
            caches,
            held: Vec::new(),
            capacity,
        })
    }

    /// Run `pass` on what `context` adds to the held tokens: its tokens after them, when they
    /// begin it, else (the caches cleared first) all of it. `pass` gets those tokens and the
    /// [`Pass`] to run them with: [`Pass::Cached`], or [`Pass::Whole`] for logits without
    /// caches.
    pub fn extend<R>(
        &mut self,
        context: &[u32],
        pass: impl FnOnce(&[u32], Pass<'_, B>) -> Result<R>,
    ) -> Result<R> {
        if context.is_empty() || context.len() > self.capacity {
            bail!(
                "a context of {} tokens does not fit a cache of 1..={} positions",
                context.len(),
                self.capacity
            );
        }
        let Some(caches) = self.caches.as_mut() else {
            let whole = Pass::Whole {
                want: Want::Logits,
                batch: 1,
                seq: context.len(),
            };
            return pass(context, whole);
        };
        let held = std::mem::take(&mut self.held);
        let start = if context.len() > held.len() && context.starts_with(&held) {
            held.len()
        } else {
            caches.values_mut().for_each(KvCache::clear);
            0
        };
        let result = pass(&context[start..], Pass::Cached(caches))?;
        self.held = context.to_vec();
        Ok(result)
    }
}
