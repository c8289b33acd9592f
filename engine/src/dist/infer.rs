//! Forward-only work across the processes of a run, for evaluation and text generation: each
//! rank runs its own part ([`crate::exec::forward_rank`] and the loops over it), activations
//! cross between ranks through the run's links, and rank 0 gathers the results.

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use super::trainer::{first_difference, LEADER};
use super::RankTrainer;
use crate::backend::Backend;
use crate::exec::decode_rank;
use crate::invalid_input;

impl<B: Backend> RankTrainer<B> {
    /// The next token after each of `contexts` (sequences generated side by side, the same on
    /// every rank), pipelined: each rank runs its stages on passes of up to `batch` sequences
    /// in turn and hands each on at once, so rank `r + 1` works on one pass while rank `r`
    /// works on the next ([`decode_rank`]). The last stage's rank then sends every sequence's
    /// last-position logits to rank 0, where `pick(i, logits)` chooses sequence `i`'s token
    /// (`pick` runs on rank 0 only), and rank 0 sends the choices to every rank. Collective.
    pub fn next_tokens(
        &mut self,
        contexts: &[&[u32]],
        batch: usize,
        mut pick: impl FnMut(usize, &[f32]) -> usize,
    ) -> Result<Vec<usize>> {
        let me = self.rank.rank;
        let world = self.schedule.num_ranks();
        let vocab = self.config.model.vocab_size;
        let placement = &self.schedule.placement;
        let holder = placement[placement.len() - 1];
        let capacity = self.config.model.n_positions;
        // Every sample's logits go to rank 0 in one message after the round, so they never
        // sit in a queue where rank 0 expects an activation of a later sample.
        let rows = decode_rank(
            placement,
            &mut self.rank,
            &mut self.decoders,
            contexts,
            batch,
            capacity,
            vocab,
        );
        // After a failure this rank's caches are not to be trusted.
        let rows = rows.inspect_err(|_| self.decoders.clear())?;
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
        let rows = if me == holder {
            rows
        } else {
            transport.recv_f32(holder, "the next tokens' logits")?
        };
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
