//! The schedule IR: for each rank, an ordered list of actions.
//!
//! A *stage* is identified by its global index `0..stages`; [`Schedule::placement`] says which
//! rank runs it (stage `k` on rank `k mod p` for interleaved schedules, stage `r` on rank `r`
//! otherwise). Transfers name the *producing* stage, so the send and its matching receive
//! carry the same `(stage, microbatch)` and pair up without a separate id.

use serde::{Deserialize, Serialize};

/// One entry of a rank's action list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Run `stage`'s layers forward on `microbatch`. Prints as `S{stage}F{microbatch}`.
    Forward { stage: usize, microbatch: usize },
    /// Full backward of `stage` on `microbatch` (input and weight gradients). `S{s}B{m}`.
    Backward { stage: usize, microbatch: usize },
    /// Input-gradient half of a split backward (zero-bubble schedules). `S{s}I{m}`.
    BackwardInput { stage: usize, microbatch: usize },
    /// Weight-gradient half of a split backward (zero-bubble schedules). `S{s}W{m}`.
    BackwardWeight { stage: usize, microbatch: usize },
    /// Send the output activation of `stage` for `microbatch` to the rank of `stage + 1`.
    SendActivation { stage: usize, microbatch: usize },
    /// Receive the output activation of `stage` (the input of `stage + 1`).
    RecvActivation { stage: usize, microbatch: usize },
    /// Send the input gradient of `stage` for `microbatch` to the rank of `stage - 1`.
    SendGradient { stage: usize, microbatch: usize },
    /// Receive the input gradient of `stage` (the output gradient of `stage - 1`).
    RecvGradient { stage: usize, microbatch: usize },
}

impl Action {
    /// The stage this action belongs to (the producing stage for transfers).
    pub fn stage(&self) -> usize {
        match *self {
            Action::Forward { stage, .. }
            | Action::Backward { stage, .. }
            | Action::BackwardInput { stage, .. }
            | Action::BackwardWeight { stage, .. }
            | Action::SendActivation { stage, .. }
            | Action::RecvActivation { stage, .. }
            | Action::SendGradient { stage, .. }
            | Action::RecvGradient { stage, .. } => stage,
        }
    }

    /// The micro-batch this action works on.
    pub fn microbatch(&self) -> usize {
        match *self {
            Action::Forward { microbatch, .. }
            | Action::Backward { microbatch, .. }
            | Action::BackwardInput { microbatch, .. }
            | Action::BackwardWeight { microbatch, .. }
            | Action::SendActivation { microbatch, .. }
            | Action::RecvActivation { microbatch, .. }
            | Action::SendGradient { microbatch, .. }
            | Action::RecvGradient { microbatch, .. } => microbatch,
        }
    }

    /// True for compute actions (forward and the backward kinds), false for transfers.
    pub fn is_compute(&self) -> bool {
        matches!(
            self,
            Action::Forward { .. }
                | Action::Backward { .. }
                | Action::BackwardInput { .. }
                | Action::BackwardWeight { .. }
        )
    }
}

/// A whole pipeline schedule: every rank's ordered actions, plus the stage placement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Name of the generator (or `file` for a hand-written one).
    pub name: String,
    /// Micro-batches per step `m`.
    pub microbatches: usize,
    /// `placement[stage]` is the rank that runs `stage`; its length is the stage count.
    pub placement: Vec<usize>,
    /// `ranks[r]` is rank `r`'s ordered action list.
    pub ranks: Vec<Vec<Action>>,
}

impl Schedule {
    /// Number of pipeline ranks `p`.
    pub fn num_ranks(&self) -> usize {
        self.ranks.len()
    }
    /// Total number of stages (`p · v`).
    pub fn num_stages(&self) -> usize {
        self.placement.len()
    }
    /// The stages rank `rank` runs, in increasing order (its chunks).
    pub fn stages_of(&self, rank: usize) -> Vec<usize> {
        (0..self.num_stages())
            .filter(|&s| self.placement[s] == rank)
            .collect()
    }
}
