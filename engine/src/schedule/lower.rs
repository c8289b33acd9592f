//! Lowering: insert the point-to-point transfers a compute-only schedule needs.
//!
//! Stage `s`'s forward needs the activation of stage `s - 1` and its backward the gradient of
//! stage `s + 1`; when that neighbour sits on another rank, the producer's rank gets a send and
//! the consumer's rank a receive. Neighbours on the same rank hand off locally, and the last
//! stage's activation and stage 0's gradient go nowhere.
//!
//! Where the transfers go decides whether blocking, in-order, per-peer sends deadlock (1F1B's
//! steady state has rank `r` sending an activation to `r + 1` while `r + 1` sends a gradient
//! back). Lowering therefore orders everything by one global clock: it replays the compute
//! schedule with reference costs (buffered transfers), gives each transfer a time `T` between
//! its producer's end and its consumer's start, and inserts it on both ranks at `T`, ties
//! broken by one global transfer number. Every rank's list is then a projection of one global
//! order in which each transfer comes after its producer and before its consumer, so running
//! the earliest unfinished event always makes progress: the lowered schedule cannot deadlock.
//! `T` is the earliest time in that window at which neither rank is inside a compute action,
//! so with free transfers neither side ever waits for the other and the lowered schedule keeps
//! the compute schedule's timing.

use anyhow::Result;

use super::replay::{replay, Mode, Span};
use super::validate::{check_structure, deadlock};
use super::{Action, Schedule};
use crate::invalid;
use crate::sim::Costs;

/// Lower `schedule` with the reference costs (forward 1, backward 2 on every stage).
pub fn lower(schedule: &Schedule) -> Result<Schedule> {
    lower_for(schedule, &Costs::uniform(schedule.num_stages()))
}

/// Lower `schedule`, placing transfers to suit the compute costs in `costs` (transfer costs
/// are not used: the order is proven deadlock-free whatever they are).
pub fn lower_for(schedule: &Schedule, costs: &Costs) -> Result<Schedule> {
    let positions = check_structure(schedule)?;
    if positions.lowered {
        invalid!("lowering takes a compute-only schedule, but this one already has transfers");
    }
    costs.check(schedule.num_stages())?;
    let spans =
        replay(schedule, Mode::Buffered, |a| costs.duration(a), |_| 0.0).map_err(deadlock)?;

    let m = schedule.microbatches;
    let stages = schedule.num_stages();
    let placement = &schedule.placement;
    // End times of forwards and of input-gradient producers, by stage * m + microbatch.
    let mut forward_end = vec![0.0; stages * m];
    let mut gradient_end = vec![0.0; stages * m];
    for (actions, spans) in schedule.ranks.iter().zip(&spans) {
        for (action, span) in actions.iter().zip(spans) {
            let slot = action.stage() * m + action.microbatch();
            match action {
                Action::Forward { .. } => forward_end[slot] = span.end,
                Action::Backward { .. } | Action::BackwardInput { .. } => {
                    gradient_end[slot] = span.end
                }
                _ => {}
            }
        }
    }

    // (time, global number, action) of every transfer, per rank.
    let mut transfers: Vec<Vec<(f64, u32, Action)>> = vec![Vec::new(); schedule.num_ranks()];
    let mut number = 0u32;
    for (b, actions) in schedule.ranks.iter().enumerate() {
        for (action, consumer) in actions.iter().zip(&spans[b]) {
            let (stage, microbatch) = (action.stage(), action.microbatch());
            let (send, recv, produced) = match action {
                Action::Forward { .. } if stage > 0 && placement[stage - 1] != b => (
                    Action::SendActivation {
                        stage: stage - 1,
                        microbatch,
                    },
                    Action::RecvActivation {
                        stage: stage - 1,
                        microbatch,
                    },
                    forward_end[(stage - 1) * m + microbatch],
                ),
                Action::Backward { .. } | Action::BackwardInput { .. }
                    if stage + 1 < stages && placement[stage + 1] != b =>
                {
                    (
                        Action::SendGradient {
                            stage: stage + 1,
                            microbatch,
                        },
                        Action::RecvGradient {
                            stage: stage + 1,
                            microbatch,
                        },
                        gradient_end[(stage + 1) * m + microbatch],
                    )
                }
                _ => continue,
            };
            let a = placement[send.stage()];
            let t = meeting_time(&spans[a], &spans[b], produced, consumer.start);
            transfers[a].push((t, number, send));
            transfers[b].push((t, number, recv));
            number += 1;
        }
    }

    let mut ranks = Vec::with_capacity(schedule.num_ranks());
    for ((computes, spans), mut moves) in schedule.ranks.iter().zip(&spans).zip(transfers) {
        // A rank's transfers arrive as a few runs already in time order (one per peer and
        // direction), which the stable sort merges in about linear time.
        moves.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
        let mut list = Vec::with_capacity(computes.len() + moves.len());
        let mut moves = moves.into_iter().peekable();
        for (&action, span) in computes.iter().zip(spans) {
            // A transfer at the instant a compute starts goes first: it may be its input.
            while let Some(t) = moves.next_if(|t| t.0 <= span.start) {
                list.push(t.2);
            }
            list.push(action);
        }
        list.extend(moves.map(|t| t.2));
        ranks.push(list);
    }
    let lowered = Schedule {
        name: schedule.name.clone(),
        microbatches: schedule.microbatches,
        placement: schedule.placement.clone(),
        ranks,
    };
    Ok(lowered)
}

/// The earliest time in `[produced, needed]` at which neither rank is inside a compute action;
/// `produced` if there is none (one side will then wait for the other).
fn meeting_time(sender: &[Span], receiver: &[Span], produced: f64, needed: f64) -> f64 {
    let mut t = produced;
    // Each round moves `t` to the end of an action, so this ends; the bound only caps cost.
    for _ in 0..64 {
        let moved = leave(receiver, leave(sender, t));
        if moved == t {
            return t;
        }
        if moved > needed {
            break;
        }
        t = moved;
    }
    produced
}

/// `t`, or the end of the compute action on this rank that `t` falls strictly inside.
fn leave(spans: &[Span], t: f64) -> f64 {
    let after = spans.partition_point(|s| s.start < t);
    match after.checked_sub(1).map(|i| spans[i]) {
        Some(span) if span.end > t => span.end,
        _ => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{gpipe, one_f_one_b, validate};

    fn text(actions: &[Action]) -> String {
        actions
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn one_f_one_b_pairs_steady_state_transfers() {
        let lowered = lower(&one_f_one_b(2, 3, 1).unwrap()).unwrap();
        validate(&lowered).unwrap();
        assert_eq!(
            text(&lowered.ranks[0]),
            "S0F0 S0F0> S0F1 S0F1> >S1B0 S0B0 S0F2 >S1B1 S0F2> S0B1 >S1B2 S0B2"
        );
        assert_eq!(
            text(&lowered.ranks[1]),
            ">S0F0 S1F0 >S0F1 S1B0 S1B0> S1F1 S1B1 S1B1> >S0F2 S1F2 S1B2 S1B2>"
        );
    }

    #[test]
    fn same_rank_neighbours_hand_off_locally() {
        let lowered = lower(&gpipe(1, 2, 3).unwrap()).unwrap();
        assert!(lowered.ranks[0].iter().all(Action::is_compute));
    }

    #[test]
    fn lowering_twice_is_refused() {
        let lowered = lower(&gpipe(2, 2, 1).unwrap()).unwrap();
        assert!(lower(&lowered).is_err());
    }
}
