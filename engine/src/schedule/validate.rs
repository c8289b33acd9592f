//! Validation: proof, before anything runs, that a schedule is complete and cannot deadlock.
//!
//! Checks, in order: the shape (ranks, placement, index ranges); that every action runs on the
//! rank its stage is placed on and every transfer crosses ranks between neighbouring stages;
//! exactly one forward and one backward (or one input and one weight half) per stage and
//! micro-batch; each action after what it depends on, on its own rank; for lowered schedules,
//! every cross-rank input moved by exactly one send and one receive, paired in the same order
//! on both sides; and finally a dry run under blocking semantics that must complete. Errors
//! name the rank, the position and the action at fault.

use anyhow::Result;

use super::replay::{replay, Mode, Stuck};
use super::{Action, Schedule};
use crate::{invalid, invalid_input};

const NONE: u32 = u32::MAX;

/// Action kinds, as rows of the position table.
const F: usize = 0;
const B: usize = 1;
const I: usize = 2;
const W: usize = 3;
const SEND_ACT: usize = 4;
const RECV_ACT: usize = 5;
const SEND_GRAD: usize = 6;
const RECV_GRAD: usize = 7;

fn kind(action: Action) -> usize {
    match action {
        Action::Forward { .. } => F,
        Action::Backward { .. } => B,
        Action::BackwardInput { .. } => I,
        Action::BackwardWeight { .. } => W,
        Action::SendActivation { .. } => SEND_ACT,
        Action::RecvActivation { .. } => RECV_ACT,
        Action::SendGradient { .. } => SEND_GRAD,
        Action::RecvGradient { .. } => RECV_GRAD,
    }
}

/// Where every action sits in its rank's list: `pos[kind][stage * m + microbatch]`.
pub(crate) struct Positions {
    m: usize,
    n: usize,
    pos: Vec<u32>,
    /// True when the schedule carries its transfers (it has been lowered).
    pub lowered: bool,
}

impl Positions {
    fn get(&self, kind: usize, stage: usize, mb: usize) -> Option<usize> {
        let p = self.pos[kind * self.n + stage * self.m + mb];
        (p != NONE).then_some(p as usize)
    }
}

fn at(rank: usize, position: usize, action: Action) -> String {
    format!("rank {rank}, position {position} ({action})")
}

/// Check `schedule` completely: structure, dependencies, pairing and a blocking dry run.
///
/// Works on compute-only schedules (cross-rank inputs then count as buffered) and on lowered
/// ones (every cross-rank input must come through a paired send and receive). Errors are
/// [`crate::InvalidInput`]: a schedule may come from a user's file.
pub fn validate(schedule: &Schedule) -> Result<()> {
    let positions = check_structure(schedule)?;
    let mode = if positions.lowered {
        Mode::Rendezvous
    } else {
        Mode::Buffered
    };
    replay(schedule, mode, |_| 1.0, |_| 0.0).map_err(deadlock)?;
    Ok(())
}

/// Turn the ranks a replay left stuck into one error line.
pub(crate) fn deadlock(stuck: Vec<Stuck>) -> anyhow::Error {
    let parts: Vec<String> = stuck
        .iter()
        .map(|s| format!("{} {}", at(s.rank, s.position, s.action), s.reason))
        .collect();
    invalid_input!(
        "invalid schedule: the dry run deadlocks: {}",
        parts.join("; ")
    )
}

/// Every check except the dry run; the result is what a replay needs to run safely.
pub(crate) fn check_structure(schedule: &Schedule) -> Result<Positions> {
    check_shape(schedule)?;
    let m = schedule.microbatches;
    let n = schedule.num_stages() * m;
    let lowered = schedule.ranks.iter().flatten().any(|a| !a.is_compute());
    let mut positions = Positions {
        m,
        n,
        pos: vec![NONE; 8 * n],
        lowered,
    };
    for (r, actions) in schedule.ranks.iter().enumerate() {
        for (i, &action) in actions.iter().enumerate() {
            check_action(schedule, r, i, action)?;
            let slot = kind(action) * n + action.stage() * m + action.microbatch();
            if positions.pos[slot] != NONE {
                invalid!(
                    "invalid schedule: {}: appears twice (first at position {})",
                    at(r, i, action),
                    positions.pos[slot]
                );
            }
            positions.pos[slot] = i as u32;
        }
    }
    check_complete(schedule, &positions)?;
    check_order(schedule, &positions)?;
    if lowered {
        check_pairing(schedule, &positions)?;
    }
    Ok(positions)
}

fn check_shape(schedule: &Schedule) -> Result<()> {
    let p = schedule.num_ranks();
    if p == 0 {
        invalid!("invalid schedule: it has no ranks");
    }
    if schedule.microbatches == 0 {
        invalid!("invalid schedule: microbatches must be at least 1 (got 0)");
    }
    if schedule.placement.is_empty() {
        invalid!("invalid schedule: the placement lists no stages");
    }
    if let Some((stage, rank)) = schedule
        .placement
        .iter()
        .enumerate()
        .find(|&(_, &rank)| rank >= p)
    {
        invalid!("invalid schedule: placement puts stage {stage} on rank {rank}, but there are {p} ranks");
    }
    let n = schedule.num_stages().saturating_mul(schedule.microbatches);
    if n > u32::MAX as usize / 8 || schedule.ranks.iter().any(|l| l.len() >= NONE as usize) {
        invalid!("invalid schedule: too large (stages x microbatches = {n})");
    }
    Ok(())
}

/// Ranges, ownership and transfer legality of one action.
fn check_action(schedule: &Schedule, r: usize, i: usize, action: Action) -> Result<()> {
    let stages = schedule.num_stages();
    let (s, mb) = (action.stage(), action.microbatch());
    let placement = &schedule.placement;
    if s >= stages {
        invalid!(
            "invalid schedule: {}: stage {s} does not exist (the schedule has {stages} stages)",
            at(r, i, action)
        );
    }
    if mb >= schedule.microbatches {
        invalid!(
            "invalid schedule: {}: micro-batch {mb} does not exist (the schedule has {} micro-batches)",
            at(r, i, action),
            schedule.microbatches
        );
    }
    // (rank that must hold the action, the neighbour stage a transfer crosses to)
    let (owner, neighbour) = match action {
        Action::SendActivation { .. } => (placement[s], s.checked_add(1)),
        Action::RecvActivation { .. } => (placement.get(s + 1).copied().unwrap_or(r), Some(s + 1)),
        Action::SendGradient { .. } => (placement[s], s.checked_sub(1)),
        Action::RecvGradient { .. } => (
            s.checked_sub(1).map_or(r, |q| placement[q]),
            s.checked_sub(1),
        ),
        _ => (placement[s], None),
    };
    if !action.is_compute() {
        match neighbour.filter(|&q| q < stages) {
            None => invalid!(
                "invalid schedule: {}: stage {s}'s {} goes to no stage",
                at(r, i, action),
                if kind(action) <= RECV_ACT { "activation" } else { "gradient" }
            ),
            Some(q) if placement[q] == placement[s] => invalid!(
                "invalid schedule: {}: stages {s} and {q} are both on rank {}, so no transfer is needed",
                at(r, i, action),
                placement[s]
            ),
            Some(_) => {}
        }
    }
    if owner != r {
        invalid!(
            "invalid schedule: {}: belongs on rank {owner}, which runs stage {}",
            at(r, i, action),
            match action {
                Action::RecvActivation { .. } => s + 1,
                Action::RecvGradient { .. } => s - 1,
                _ => s,
            }
        );
    }
    Ok(())
}

/// Every forward and backward present once; every needed transfer present on both sides.
fn check_complete(schedule: &Schedule, positions: &Positions) -> Result<()> {
    let placement = &schedule.placement;
    let stages = schedule.num_stages();
    for s in 0..stages {
        let r = placement[s];
        for mb in 0..schedule.microbatches {
            let get = |kind| positions.get(kind, s, mb);
            if get(F).is_none() {
                invalid!("invalid schedule: rank {r} is missing S{s}F{mb} (every stage runs every micro-batch forward once)");
            }
            match (get(B), get(I), get(W)) {
                (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                (None, None, None) => invalid!(
                    "invalid schedule: rank {r} is missing S{s}B{mb} (stage {s} never runs micro-batch {mb} backward)"
                ),
                (Some(b), _, _) => invalid!(
                    "invalid schedule: {}: stage {s} micro-batch {mb} also has a split backward",
                    at(r, b, Action::Backward { stage: s, microbatch: mb })
                ),
                (None, Some(_), None) => invalid!(
                    "invalid schedule: rank {r} is missing S{s}W{mb} (S{s}I{mb} needs its weight half)"
                ),
                (None, None, Some(w)) => invalid!(
                    "invalid schedule: {}: has no S{s}I{mb} before it",
                    at(r, w, Action::BackwardWeight { stage: s, microbatch: mb })
                ),
            }
            if !positions.lowered {
                continue;
            }
            let activation = s + 1 < stages && placement[s + 1] != r;
            let gradient = s > 0 && placement[s - 1] != r;
            let pairs = [
                (activation, SEND_ACT, RECV_ACT, s + 1),
                (gradient, SEND_GRAD, RECV_GRAD, s.wrapping_sub(1)),
            ];
            for (needed, send, recv, to_stage) in pairs {
                if !needed {
                    continue;
                }
                let to = placement[to_stage];
                let (send_action, recv_action) = if send == SEND_ACT {
                    (
                        Action::SendActivation {
                            stage: s,
                            microbatch: mb,
                        },
                        Action::RecvActivation {
                            stage: s,
                            microbatch: mb,
                        },
                    )
                } else {
                    (
                        Action::SendGradient {
                            stage: s,
                            microbatch: mb,
                        },
                        Action::RecvGradient {
                            stage: s,
                            microbatch: mb,
                        },
                    )
                };
                match (get(send), get(recv)) {
                    (Some(_), Some(_)) => {}
                    (Some(i), None) => invalid!(
                        "invalid schedule: {}: unpaired send, rank {to} never receives it",
                        at(r, i, send_action)
                    ),
                    (None, Some(j)) => invalid!(
                        "invalid schedule: {}: unpaired receive, rank {r} never sends it",
                        at(to, j, recv_action)
                    ),
                    (None, None) => invalid!(
                        "invalid schedule: rank {r} never sends {send_action} and rank {to} never receives it ({recv_action})"
                    ),
                }
            }
        }
    }
    Ok(())
}

/// Each action after what it depends on, within its own rank.
fn check_order(schedule: &Schedule, positions: &Positions) -> Result<()> {
    let placement = &schedule.placement;
    let stages = schedule.num_stages();
    for (r, actions) in schedule.ranks.iter().enumerate() {
        for (i, &action) in actions.iter().enumerate() {
            let (s, mb) = (action.stage(), action.microbatch());
            let gradient_of = |stage: usize| {
                positions
                    .get(B, stage, mb)
                    .map(|p| {
                        (
                            p,
                            Action::Backward {
                                stage,
                                microbatch: mb,
                            },
                        )
                    })
                    .or_else(|| {
                        positions.get(I, stage, mb).map(|p| {
                            (
                                p,
                                Action::BackwardInput {
                                    stage,
                                    microbatch: mb,
                                },
                            )
                        })
                    })
            };
            let forward_of = |stage: usize| {
                positions.get(F, stage, mb).map(|p| {
                    (
                        p,
                        Action::Forward {
                            stage,
                            microbatch: mb,
                        },
                    )
                })
            };
            // What must come earlier on this rank, and the word for why.
            let mut needs: [Option<(usize, Action, &str)>; 2] = [None, None];
            match action {
                Action::Forward { .. } if s > 0 => {
                    needs[0] = if placement[s - 1] == r {
                        forward_of(s - 1).map(|(p, a)| (p, a, "which produces its input"))
                    } else if positions.lowered {
                        positions.get(RECV_ACT, s - 1, mb).map(|p| {
                            (
                                p,
                                Action::RecvActivation {
                                    stage: s - 1,
                                    microbatch: mb,
                                },
                                "which receives its input",
                            )
                        })
                    } else {
                        None
                    };
                }
                Action::Backward { .. } | Action::BackwardInput { .. } => {
                    needs[0] = forward_of(s).map(|(p, a)| (p, a, "its own forward"));
                    if s + 1 < stages {
                        needs[1] = if placement[s + 1] == r {
                            gradient_of(s + 1)
                                .map(|(p, a)| (p, a, "which produces its output gradient"))
                        } else if positions.lowered {
                            positions.get(RECV_GRAD, s + 1, mb).map(|p| {
                                (
                                    p,
                                    Action::RecvGradient {
                                        stage: s + 1,
                                        microbatch: mb,
                                    },
                                    "which receives its output gradient",
                                )
                            })
                        } else {
                            None
                        };
                    }
                }
                Action::BackwardWeight { .. } => {
                    needs[0] = positions.get(I, s, mb).map(|p| {
                        (
                            p,
                            Action::BackwardInput {
                                stage: s,
                                microbatch: mb,
                            },
                            "its input half",
                        )
                    });
                }
                Action::SendActivation { .. } => {
                    needs[0] = forward_of(s).map(|(p, a)| (p, a, "which produces what it sends"));
                }
                Action::SendGradient { .. } => {
                    needs[0] = gradient_of(s).map(|(p, a)| (p, a, "which produces what it sends"));
                }
                _ => {}
            }
            for (p, dep, why) in needs.into_iter().flatten() {
                if p > i {
                    invalid!(
                        "invalid schedule: {}: runs before {dep} at position {p}, {why}",
                        at(r, i, action)
                    );
                }
            }
        }
    }
    Ok(())
}

/// The k-th send from rank a to rank b must be the k-th receive on b from a: every transfer's
/// send and receive carry the same number within their lane. Linear in the actions.
fn check_pairing(schedule: &Schedule, positions: &Positions) -> Result<()> {
    let (n, m) = (positions.n, positions.m);
    let placement = &schedule.placement;
    // Number of each transfer within its lane, by (kind - SEND_ACT) * n + stage * m + mb.
    let mut number = vec![0u32; 4 * n];
    for actions in &schedule.ranks {
        // (peer, is send, count so far): a rank talks to few peers.
        let mut lanes: Vec<(usize, bool, u32)> = Vec::new();
        for &action in actions.iter().filter(|a| !a.is_compute()) {
            let s = action.stage();
            let (peer, send) = match action {
                Action::SendActivation { .. } => (placement[s + 1], true),
                Action::SendGradient { .. } => (placement[s - 1], true),
                _ => (placement[s], false),
            };
            let lane = match lanes.iter().position(|l| l.0 == peer && l.1 == send) {
                Some(i) => i,
                None => {
                    lanes.push((peer, send, 0));
                    lanes.len() - 1
                }
            };
            number[(kind(action) - SEND_ACT) * n + s * m + action.microbatch()] = lanes[lane].2;
            lanes[lane].2 += 1;
        }
    }
    for stage in 0..schedule.num_stages() {
        for mb in 0..m {
            for (send, recv) in [(SEND_ACT, RECV_ACT), (SEND_GRAD, RECV_GRAD)] {
                let (Some(i), Some(j)) = (
                    positions.get(send, stage, mb),
                    positions.get(recv, stage, mb),
                ) else {
                    continue;
                };
                let slot = stage * m + mb;
                let (k, k2) = (
                    number[(send - SEND_ACT) * n + slot],
                    number[(recv - SEND_ACT) * n + slot],
                );
                if k != k2 {
                    let from = placement[stage];
                    let action = schedule.ranks[from][i];
                    let to = if send == SEND_ACT {
                        placement[stage + 1]
                    } else {
                        placement[stage - 1]
                    };
                    invalid!(
                        "invalid schedule: {}: it is send number {k} from rank {from} to rank {to}, but rank {to} receives it as number {k2} (position {j}): sends and receives must pair in the same order",
                        at(from, i, action)
                    );
                }
            }
        }
    }
    Ok(())
}
