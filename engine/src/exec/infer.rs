//! Forward-only passes through the pipeline's stages, for evaluation and text generation.
//!
//! Stages run one after another on the calling thread; an activation crossing to another
//! rank's device is staged through host memory, as the in-process transport does.

use anyhow::{anyhow, Result};

use crate::backend::{Backend, Transport};
use crate::model::{Keep, StageInput, StageOutput};

use super::step::Rank;

/// What the last stage should produce.
pub enum Want<'a> {
    /// Per-token cross-entropy against these targets (`[batch·seq]`).
    Losses(&'a [u32]),
    /// Logits `[batch·seq, vocab]`.
    Logits,
}

/// Run `tokens` (`[batch·seq]`) forward through every stage in order and return the per-token
/// losses or the logits, as `want` says.
pub fn forward<B: Backend, T: Transport<B>>(
    ranks: &mut [Rank<B, T>],
    tokens: &[u32],
    want: Want<'_>,
    batch: usize,
    seq: usize,
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
        let model = &mut rank
            .stages
            .iter_mut()
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
        let targets = match (&want, i == last) {
            (Want::Losses(t), true) => Some(backend.upload_u32(t)?),
            _ => None,
        };
        let (output, _) =
            model.forward(backend, input, targets.as_ref(), batch, seq, Keep::Nothing)?;
        match output {
            StageOutput::Hidden(h) => hidden = Some(backend.download(&h)?),
            StageOutput::Loss { losses } => return backend.download(&losses),
            StageOutput::Logits(logits) => return backend.download(&logits),
        }
    }
    Err(anyhow!("the pipeline has no head stage"))
}
