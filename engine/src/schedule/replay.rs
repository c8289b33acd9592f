//! Replaying a schedule action by action, with a duration for each: the one engine behind the
//! validator's dry run, the lowering's reference timing and the simulator.
//!
//! Each rank walks its list in order. A compute action starts once the rank is free and its
//! inputs are ready. How data crosses ranks depends on the [`Mode`]. The replay is
//! event-driven and linear in the number of actions; it expects a schedule that passed the
//! structural checks of `validate`.

use std::collections::VecDeque;

use super::{Action, Schedule};

/// How cross-rank data moves during a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Compute-only schedule: an input from another rank is ready a transfer time after its
    /// producer ends, without explicit transfers.
    Buffered,
    /// Lowered schedule, sends posted without waiting (a communication stream, an eager or
    /// asynchronous send): the send takes no time on its rank and the data reaches the peer a
    /// transfer time later; the receive waits for it. This is how the simulator times a step.
    Eager,
    /// Lowered schedule, blocking sends: a send and its receive complete together once both
    /// ranks have reached them, as NCCL's may. The strictest semantics, so the validator's dry
    /// run uses it: a schedule that completes here completes under the others.
    Rendezvous,
}

/// When one action ran.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Span {
    pub start: f64,
    pub end: f64,
}

/// A rank that could not finish, and why.
#[derive(Clone, Debug)]
pub(crate) struct Stuck {
    pub rank: usize,
    pub position: usize,
    pub action: Action,
    pub reason: String,
}

const NOT_YET: f64 = -1.0;

/// Data-readiness times of one replay, indexed by `stage * m + microbatch`.
struct Ready {
    m: usize,
    /// End of the forward.
    forward: Vec<f64>,
    /// End of the input-gradient producer (backward, or its input half).
    gradient: Vec<f64>,
    /// Arrival of the stage's output activation on the next stage's rank.
    activation_in: Vec<f64>,
    /// Arrival of the stage's input gradient on the previous stage's rank.
    gradient_in: Vec<f64>,
}

impl Ready {
    fn at(&self, list: &[f64], stage: usize, mb: usize) -> Option<f64> {
        let t = list[stage * self.m + mb];
        (t >= 0.0).then_some(t)
    }
}

/// Replay `schedule`; `duration` gives each action's time and `transfer(stage)` the time to
/// move stage `stage`'s activation (or gradient) between ranks in buffered mode. Returns the
/// span of every action, per rank and position, or the ranks that got stuck.
pub(crate) fn replay(
    schedule: &Schedule,
    mode: Mode,
    duration: impl Fn(Action) -> f64,
    transfer: impl Fn(usize) -> f64,
) -> Result<Vec<Vec<Span>>, Vec<Stuck>> {
    let p = schedule.num_ranks();
    let stages = schedule.num_stages();
    let m = schedule.microbatches;
    let placement = &schedule.placement;
    let lists = &schedule.ranks;
    let n = stages * m;
    let mut ready = Ready {
        m,
        forward: vec![NOT_YET; n],
        gradient: vec![NOT_YET; n],
        activation_in: vec![NOT_YET; n],
        gradient_in: vec![NOT_YET; n],
    };
    let mut spans: Vec<Vec<Span>> = lists.iter().map(|l| Vec::with_capacity(l.len())).collect();
    let mut clock = vec![0.0f64; p];
    let mut queue: VecDeque<usize> = (0..p).collect();
    let mut queued = vec![true; p];
    let push = |queue: &mut VecDeque<usize>, queued: &mut Vec<bool>, rank: usize| {
        if !queued[rank] {
            queued[rank] = true;
            queue.push_back(rank);
        }
    };

    while let Some(r) = queue.pop_front() {
        queued[r] = false;
        while let Some(&action) = lists[r].get(spans[r].len()) {
            if action.is_compute() {
                let Some(inputs) = compute_inputs(schedule, mode, &ready, r, action, &transfer)
                else {
                    break;
                };
                let start = clock[r].max(inputs);
                let end = start + duration(action);
                spans[r].push(Span { start, end });
                clock[r] = end;
                let (s, mb) = (action.stage(), action.microbatch());
                match action {
                    Action::Forward { .. } => {
                        ready.forward[s * m + mb] = end;
                        if mode == Mode::Buffered && s + 1 < stages && placement[s + 1] != r {
                            push(&mut queue, &mut queued, placement[s + 1]);
                        }
                    }
                    Action::Backward { .. } | Action::BackwardInput { .. } => {
                        ready.gradient[s * m + mb] = end;
                        if mode == Mode::Buffered && s > 0 && placement[s - 1] != r {
                            push(&mut queue, &mut queued, placement[s - 1]);
                        }
                    }
                    _ => {}
                }
                continue;
            }
            let (peer, counterpart, produced) = transfer_ends(schedule, action, &ready);
            let (s, mb) = (action.stage(), action.microbatch());
            let is_activation = matches!(
                action,
                Action::SendActivation { .. } | Action::RecvActivation { .. }
            );
            if mode == Mode::Eager {
                let arrival = if is_activation {
                    &mut ready.activation_in
                } else {
                    &mut ready.gradient_in
                };
                if matches!(
                    action,
                    Action::SendActivation { .. } | Action::SendGradient { .. }
                ) {
                    if !produced {
                        break;
                    }
                    spans[r].push(Span {
                        start: clock[r],
                        end: clock[r],
                    });
                    arrival[s * m + mb] = clock[r] + duration(action);
                    push(&mut queue, &mut queued, peer);
                } else {
                    let t = arrival[s * m + mb];
                    if t < 0.0 {
                        break;
                    }
                    let end = clock[r].max(t);
                    spans[r].push(Span {
                        start: clock[r],
                        end,
                    });
                    clock[r] = end;
                }
                continue;
            }
            // Rendezvous: complete the transfer if the peer waits at the counterpart.
            if !produced || lists[peer].get(spans[peer].len()) != Some(&counterpart) {
                break;
            }
            let start = clock[r].max(clock[peer]);
            let end = start + duration(action);
            spans[r].push(Span { start, end });
            spans[peer].push(Span { start, end });
            clock[r] = end;
            clock[peer] = end;
            if is_activation {
                ready.activation_in[s * m + mb] = end;
            } else {
                ready.gradient_in[s * m + mb] = end;
            }
            push(&mut queue, &mut queued, peer);
        }
    }

    let stuck: Vec<Stuck> = (0..p)
        .filter(|&r| spans[r].len() < lists[r].len())
        .map(|r| {
            let position = spans[r].len();
            let action = lists[r][position];
            let reason = stuck_reason(schedule, mode, &ready, r, action, &spans);
            Stuck {
                rank: r,
                position,
                action,
                reason,
            }
        })
        .collect();
    if stuck.is_empty() {
        Ok(spans)
    } else {
        Err(stuck)
    }
}

/// The time `action` (a compute action on rank `r`) has all its inputs, if it has them.
fn compute_inputs(
    schedule: &Schedule,
    mode: Mode,
    ready: &Ready,
    r: usize,
    action: Action,
    transfer: &impl Fn(usize) -> f64,
) -> Option<f64> {
    let (s, mb) = (action.stage(), action.microbatch());
    let placement = &schedule.placement;
    // The input from a neighbouring stage `from`: local, buffered, or received.
    let neighbour = |from: usize, produced: &[f64], received: &[f64]| -> Option<f64> {
        if placement[from] == r {
            ready.at(produced, from, mb)
        } else if mode == Mode::Buffered {
            ready.at(produced, from, mb).map(|t| t + transfer(from))
        } else {
            ready.at(received, from, mb)
        }
    };
    match action {
        Action::Forward { .. } if s == 0 => Some(0.0),
        Action::Forward { .. } => neighbour(s - 1, &ready.forward, &ready.activation_in),
        Action::Backward { .. } | Action::BackwardInput { .. } => {
            let own = ready.at(&ready.forward, s, mb)?;
            if s + 1 == schedule.num_stages() {
                Some(own)
            } else {
                neighbour(s + 1, &ready.gradient, &ready.gradient_in).map(|t| t.max(own))
            }
        }
        Action::BackwardWeight { .. } => ready.at(&ready.gradient, s, mb),
        _ => None,
    }
}

/// For a transfer: the peer rank, the peer's matching action, and whether the data to send
/// exists yet (always true for a receive).
fn transfer_ends(schedule: &Schedule, action: Action, ready: &Ready) -> (usize, Action, bool) {
    let (stage, microbatch) = (action.stage(), action.microbatch());
    let placement = &schedule.placement;
    match action {
        Action::SendActivation { .. } => (
            placement[stage + 1],
            Action::RecvActivation { stage, microbatch },
            ready.at(&ready.forward, stage, microbatch).is_some(),
        ),
        Action::RecvActivation { .. } => (
            placement[stage],
            Action::SendActivation { stage, microbatch },
            true,
        ),
        Action::SendGradient { .. } => (
            placement[stage - 1],
            Action::RecvGradient { stage, microbatch },
            ready.at(&ready.gradient, stage, microbatch).is_some(),
        ),
        Action::RecvGradient { .. } => (
            placement[stage],
            Action::SendGradient { stage, microbatch },
            true,
        ),
        _ => unreachable!("transfer_ends is only called for transfers"),
    }
}

fn stuck_reason(
    schedule: &Schedule,
    mode: Mode,
    ready: &Ready,
    r: usize,
    action: Action,
    spans: &[Vec<Span>],
) -> String {
    let (s, mb) = (action.stage(), action.microbatch());
    let placement = &schedule.placement;
    let peer_state = |peer: usize| match schedule.ranks[peer].get(spans[peer].len()) {
        Some(a) => format!(
            "rank {peer} is blocked at position {} ({a})",
            spans[peer].len()
        ),
        None => format!("rank {peer} has finished"),
    };
    match action {
        Action::Forward { .. } | Action::Backward { .. } | Action::BackwardInput { .. } => {
            let needs = match action {
                Action::Forward { .. } => Action::Forward {
                    stage: s - 1,
                    microbatch: mb,
                },
                _ if ready.at(&ready.forward, s, mb).is_none() => Action::Forward {
                    stage: s,
                    microbatch: mb,
                },
                _ => Action::Backward {
                    stage: s + 1,
                    microbatch: mb,
                },
            };
            let from = placement[needs.stage()];
            if from == r || mode == Mode::Buffered {
                format!("waits for {needs} on rank {from}; {}", peer_state(from))
            } else {
                format!("waits for the output of {needs} from rank {from}, never received")
            }
        }
        Action::BackwardWeight { .. } => format!("waits for S{s}I{mb}"),
        _ => {
            let (peer, counterpart, produced) = transfer_ends(schedule, action, ready);
            if !produced {
                "sends data this rank has not produced yet".to_string()
            } else {
                format!(
                    "waits for rank {peer} to reach {counterpart}; {}",
                    peer_state(peer)
                )
            }
        }
    }
}
