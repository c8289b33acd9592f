//! Forward-only passes across the processes of a run, for evaluation and text generation:
//! each rank runs its own stages in stage order, activations cross between ranks over TCP.

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

use super::trainer::{first_difference, LEADER};
use super::{RankLinks, RankTrainer};
use crate::backend::Backend;
use crate::exec::{Decoder, Pass, Rank};
use crate::invalid_input;
use crate::model::{StageInput, StageOutput};

/// This rank's part of a forward pass of `tokens` through the stages placed by `placement`:
/// what the last stage produces (as [`crate::exec::forward`] says) on the rank that holds
/// it, `None` on the others. Every rank of the run calls it together.
pub(super) fn forward<B: Backend>(
    placement: &[usize],
    rank: &mut Rank<B, RankLinks<B>>,
    tokens: &[u32],
    mut pass: Pass<'_, B>,
) -> Result<Option<Vec<f32>>> {
    let last = placement.len() - 1;
    let Rank {
        rank: me,
        backend,
        transport,
        stages,
    } = rank;
    let me = *me;
    let mut local: Option<B::Buffer> = None;
    for (stage, &owner) in placement.iter().enumerate() {
        if owner != me {
            continue;
        }
        let what = || format!("rank {me}, forward of stage {stage}");
        let token_buf;
        let input = if stage == 0 {
            token_buf = backend.upload_u32(tokens)?;
            StageInput::Tokens(&token_buf)
        } else if placement[stage - 1] == me {
            StageInput::Hidden(
                local
                    .take()
                    .ok_or_else(|| anyhow!("stage {stage} has no input"))?,
            )
        } else {
            let h = transport
                .recv_f32(placement[stage - 1], "an activation")
                .with_context(what)?;
            StageInput::Hidden(backend.upload(&h)?)
        };
        let model = &stages
            .iter()
            .find(|(s, _)| *s == stage)
            .ok_or_else(|| anyhow!("rank {me} does not hold stage {stage}"))?
            .1;
        match pass.run(backend, model, stage, stage == last, input, tokens.len())? {
            StageOutput::Hidden(h) if placement[stage + 1] == me => local = Some(h),
            StageOutput::Hidden(h) => {
                let values = backend.download(&h)?;
                transport
                    .send_f32(placement[stage + 1], &values)
                    .with_context(what)?;
            }
            StageOutput::Loss { losses } => return Ok(Some(backend.download(&losses)?)),
            StageOutput::Logits(logits) => return Ok(Some(backend.download(&logits)?)),
        }
    }
    Ok(None)
}

impl<B: Backend> RankTrainer<B> {
    /// The next token after each of `contexts` (sequences generated side by side, the same on
    /// every rank), pipelined: each rank runs its stages on every sequence in turn and hands
    /// each on at once, so rank `r + 1` works on one sequence while rank `r` works on the
    /// next. The last stage's rank then sends every sequence's last-position logits to rank 0,
    /// where `pick(i, logits)` chooses sequence `i`'s token (`pick` runs on rank 0 only), and
    /// rank 0 sends the choices to every rank. Collective.
    pub fn next_tokens(
        &mut self,
        contexts: &[&[u32]],
        mut pick: impl FnMut(usize, &[f32]) -> usize,
    ) -> Result<Vec<usize>> {
        let me = self.rank.rank;
        let world = self.schedule.num_ranks();
        let vocab = self.config.model.vocab_size;
        let placement = &self.schedule.placement;
        let holder = placement[placement.len() - 1];
        let capacity = self.config.model.n_positions;
        // The last positions' logits, on the last stage's rank: every sample's, one after
        // the other. They go to rank 0 in one message after the loop, so they never sit in a
        // queue where rank 0 expects an activation of a later sample.
        let mut rows = Vec::new();
        for (i, context) in contexts.iter().enumerate() {
            let ranks = std::slice::from_ref(&self.rank);
            let decoder = Decoder::nth(&mut self.decoders, i, ranks, capacity)?;
            let rank = &mut self.rank;
            let logits =
                decoder.extend(context, |new, pass| forward(placement, rank, new, pass))?;
            if let Some(l) = logits {
                rows.extend_from_slice(&l[l.len() - vocab..]);
            }
        }
        let transport = &mut self.rank.transport;
        if me == holder && me != LEADER {
            transport.send_f32(LEADER, &rows)?;
        }
        if me != LEADER {
            let v = transport.recv_json(LEADER, "the next tokens")?;
            let tokens: Option<Vec<usize>> = v["tokens"]
                .as_array()
                .and_then(|t| t.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
            return match tokens {
                Some(t) if t.len() == contexts.len() => Ok(t),
                _ => Err(anyhow!("rank 0 sent no {} tokens: {v}", contexts.len())),
            };
        }
        if me != holder {
            rows = transport.recv_f32(holder, "the next tokens' logits")?;
        }
        if rows.len() != contexts.len() * vocab {
            return Err(anyhow!(
                "rank {holder} sent {} logits for {} samples of a vocabulary of {vocab}",
                rows.len(),
                contexts.len()
            ));
        }
        let tokens: Vec<usize> = rows
            .chunks_exact(vocab)
            .enumerate()
            .map(|(i, row)| pick(i, row))
            .collect();
        for r in 1..world {
            transport.send_json(r, &json!({ "tokens": tokens }))?;
        }
        Ok(tokens)
    }

    /// Check that every rank was given the same `settings` as rank 0 (`what` names them in the
    /// error): rank 0 sends its own, the others compare. Collective.
    pub fn same_settings(&mut self, what: &str, settings: &Value) -> Result<()> {
        let me = self.rank.rank;
        let transport = &mut self.rank.transport;
        if me == LEADER {
            for r in 1..self.schedule.num_ranks() {
                transport.send_json(r, settings)?;
            }
            return Ok(());
        }
        let leader = transport.recv_json(LEADER, &format!("rank 0's {what}"))?;
        if &leader != settings {
            return Err(invalid_input!(
                "rank {me} was given other {what} than rank 0 ({}): start every rank with the same arguments",
                first_difference(settings, &leader)
            ));
        }
        Ok(())
    }

    /// End a collective command with `result`: after success, finish cleanly with every peer;
    /// after a failure, tell the peers why, so they stop at once naming this rank.
    pub fn conclude<T>(&mut self, result: Result<T>) -> Result<T> {
        match result {
            Ok(v) => {
                self.rank.transport.finish()?;
                Ok(v)
            }
            Err(e) => {
                self.rank.transport.abort(&format!("{e:#}"));
                Err(e)
            }
        }
    }
}
