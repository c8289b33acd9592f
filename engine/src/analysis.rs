//! Closed-form pipeline figures, and advice drawn from a simulated plan.
//!
//! With `p` ranks, `m` micro-batches and uniform stage costs, fill-drain and 1F1B schedules
//! keep every rank busy for `m` of `m + p - 1` slots: efficiency `m / (m + p - 1)`. Megatron's
//! interleaved schedule with `v` chunks shrinks the bubble to `(p - 1) / (v m)` of the ideal
//! time: efficiency `v m / (v m + p - 1)`. Zero bubble splits each backward in two and fills
//! the drain with weight gradients: with `F = I = W` and `p` dividing `m` its bubble is a third
//! of the same order's, the figure interleaving would give with `3 v` chunks.

use anyhow::Result;
use serde::Serialize;

use crate::invalid;
use crate::schedule::{Schedule, ScheduleKind};
use crate::sim::{simulate, Costs, Simulation};

/// Closed-form efficiency of GPipe or 1F1B: `m / (m + p - 1)`.
pub fn efficiency(p: usize, m: usize) -> f64 {
    interleaved_efficiency(p, m, 1)
}

/// Closed-form efficiency of interleaved 1F1B with `v` chunks: `v m / (v m + p - 1)`
/// (`m` a multiple of `p`).
pub fn interleaved_efficiency(p: usize, m: usize, v: usize) -> f64 {
    let work = (v * m) as f64;
    work / (work + p.saturating_sub(1) as f64)
}

/// The chunk count whose interleaved closed form gives `kind`'s bubble: `chunks` for the
/// 1F1B family, three times as many for zero bubble (a third of the same order's bubble; for
/// zb-v, whose two chunks give `6m + p - 1` units against `6m` of work).
pub fn bubble_divisor(kind: Option<ScheduleKind>, chunks: usize) -> usize {
    match kind {
        Some(ScheduleKind::ZeroBubble | ScheduleKind::ZeroBubbleV) => 3 * chunks,
        _ => chunks,
    }
}

/// The fewest micro-batches that reach `target` efficiency (closed form) with `p` ranks and
/// `v` chunks; for `v = 1` and 90 %: p = 2 -> 9, 4 -> 27, 8 -> 63, 16 -> 135.
pub fn microbatches_for(p: usize, v: usize, target: f64) -> Result<usize> {
    if !(target > 0.0 && target < 1.0) {
        invalid!("target efficiency must be between 0 and 1, exclusive (got {target})");
    }
    if p == 0 || v == 0 {
        invalid!("stages and chunks must be at least 1 (got {p} and {v})");
    }
    // Tolerance: 9 / (9 + 1) must count as reaching 0.9 despite rounding.
    let reaches = |m: usize| interleaved_efficiency(p, m, v) >= target - 1e-12;
    let estimate = target * (p - 1) as f64 / ((1.0 - target) * v as f64);
    if estimate > 1e12 {
        invalid!("target efficiency {target} needs more than 10^12 micro-batches");
    }
    let mut m = (estimate.ceil() as usize).max(1);
    while m > 1 && reaches(m - 1) {
        m -= 1;
    }
    while !reaches(m) {
        m += 1;
    }
    Ok(m)
}

/// What a recommendation is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Advice {
    /// More micro-batches shrink the fill and drain bubble.
    RaiseMicrobatches,
    /// Interleaving chunks divides the bubble by the chunk count.
    Interleave,
    /// Splitting backward (zero bubble) cuts 1F1B's bubble to a third.
    ZeroBubble,
    /// Zero bubble on a V halves ZB-H1's bubble again.
    ZeroBubbleV,
    /// 1F1B holds at most `p` micro-batches' activations instead of `m`.
    Use1F1B,
    /// Recomputing activations in backward trades compute for memory.
    CheckpointActivations,
    /// The slowest stage sets the pace: move layers off it.
    Rebalance,
}

/// One piece of advice and the figure that motivates it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recommendation {
    /// What to change.
    pub advice: Advice,
    /// One sentence with the numbers.
    pub message: String,
}

/// A planned step: the lowered schedule, its costs, its simulation and the advice it earns.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The lowered schedule.
    pub schedule: Schedule,
    /// Number of pipeline ranks `p`.
    pub ranks: usize,
    /// Chunks per rank `v`.
    pub chunks: usize,
    /// The costs it was simulated with.
    pub costs: Costs,
    /// The simulation.
    pub simulation: Simulation,
    /// Efficiency the user aims for (default 0.9).
    pub target_efficiency: f64,
    /// Closed-form efficiency for this `p, m, v` (uniform costs, free transfers); `None` where
    /// no closed form holds (zb-v below `m = 2p`; dualpipev).
    pub closed_form_efficiency: Option<f64>,
    /// Fewest micro-batches reaching the target, closed form.
    pub microbatches_for_target: usize,
    /// Advice, most important first.
    pub recommendations: Vec<Recommendation>,
}

impl Plan {
    /// Simulate a lowered, validated `schedule` and derive the figures and advice.
    pub fn new(schedule: Schedule, costs: Costs, target_efficiency: f64) -> Result<Plan> {
        let simulation = simulate(&schedule, &costs)?;
        let ranks = schedule.num_ranks();
        let chunks = schedule.num_stages().div_ceil(ranks);
        let m = schedule.microbatches;
        let kind = schedule.name.parse().ok();
        let divisor = bubble_divisor(kind, chunks);
        let mut microbatches_for_target = microbatches_for(ranks, divisor, target_efficiency)?;
        if kind == Some(ScheduleKind::ZeroBubbleV) {
            // The V's closed form holds from m = 2p on; fewer cannot fill its round trip.
            microbatches_for_target = microbatches_for_target.max(2 * ranks);
        }
        if kind == Some(ScheduleKind::DualPipeV) {
            // No closed form here for DualPipeV: no advice beyond the 2p it needs.
            microbatches_for_target = m.max(2 * ranks);
        }
        let closed_form = match kind {
            Some(ScheduleKind::DualPipeV) => false,
            Some(ScheduleKind::ZeroBubbleV) => m >= 2 * ranks,
            _ => true,
        };
        let mut plan = Plan {
            closed_form_efficiency: closed_form.then(|| interleaved_efficiency(ranks, m, divisor)),
            schedule,
            ranks,
            chunks,
            costs,
            simulation,
            target_efficiency,
            microbatches_for_target,
            recommendations: Vec::new(),
        };
        plan.recommendations = recommend(&plan);
        Ok(plan)
    }
}

/// The seed's troubleshooting advice, applied to a simulated plan.
pub fn recommend(plan: &Plan) -> Vec<Recommendation> {
    let mut out = Vec::new();
    let sim = &plan.simulation;
    let (p, m, v) = (plan.ranks, plan.schedule.microbatches, plan.chunks);
    let pct = |x: f64| 100.0 * x;
    let kind = plan.schedule.name.parse::<ScheduleKind>().ok();
    if sim.efficiency < plan.target_efficiency && p > 1 {
        if kind == Some(ScheduleKind::Naive) {
            out.push(Recommendation {
                advice: Advice::Use1F1B,
                message: format!(
                    "efficiency is {:.1} %: the naive schedule keeps one rank busy at a time; 1f1b with the same {m} micro-batches reaches {:.1} %",
                    pct(sim.efficiency),
                    pct(efficiency(p, m))
                ),
            });
        }
        if plan.microbatches_for_target > m {
            out.push(Recommendation {
                advice: Advice::RaiseMicrobatches,
                message: format!(
                    "efficiency is {:.1} % (target {:.1} %): raise micro-batches from {m} to {} (closed form {:.1} %)",
                    pct(sim.efficiency),
                    pct(plan.target_efficiency),
                    plan.microbatches_for_target,
                    pct(interleaved_efficiency(
                        p,
                        plan.microbatches_for_target,
                        bubble_divisor(kind, v)
                    ))
                ),
            });
        }
        if v == 1 && matches!(kind, Some(ScheduleKind::GPipe | ScheduleKind::OneFOneB)) {
            out.push(Recommendation {
                advice: Advice::ZeroBubble,
                message: format!(
                    "zb-h1 splits each backward and fills the drain with weight gradients: closed form efficiency {:.1} % with the same {m} micro-batches, at most {} held per rank",
                    pct(interleaved_efficiency(p, m, 3)),
                    p.min(m)
                ),
            });
        }
        if v == 1 && kind == Some(ScheduleKind::ZeroBubble) {
            out.push(Recommendation {
                advice: Advice::ZeroBubbleV,
                message: format!(
                    "zb-v runs two half-size stages per rank in a V and halves the bubble again: closed form efficiency {:.1} % with {} micro-batches, each rank holding at most {} half-size chunks",
                    pct(interleaved_efficiency(p, m.max(2 * p), 6)),
                    m.max(2 * p),
                    2 * p.min(m)
                ),
            });
        }
        if v == 1 && !matches!(kind, Some(ScheduleKind::Naive | ScheduleKind::ZeroBubble)) {
            out.push(Recommendation {
                advice: Advice::Interleave,
                message: format!(
                    "interleaving 2 chunks per rank halves the bubble: (p-1)/(v m) = {:.1} % of ideal time instead of {:.1} % (closed form efficiency {:.1} %)",
                    pct((p - 1) as f64 / (2 * m) as f64),
                    pct((p - 1) as f64 / m as f64),
                    pct(interleaved_efficiency(p, m, 2))
                ),
            });
        }
    }
    if let Some(worst) = sim.ranks.iter().max_by_key(|r| r.peak_activations) {
        // Chunks are 1/v of a rank's layers: compare in whole stages' worth.
        let bound = v * p.min(m);
        if worst.peak_activations > bound && kind != Some(ScheduleKind::Naive) {
            let held = if v == 1 {
                format!("{} micro-batches' activations", worst.peak_activations)
            } else {
                format!(
                    "{} chunk activations ({:.1} micro-batches' worth)",
                    worst.peak_activations,
                    worst.peak_activations as f64 / v as f64
                )
            };
            out.push(Recommendation {
                advice: Advice::Use1F1B,
                message: format!(
                    "rank {} holds {held} at its peak; a 1F1B schedule holds at most {}",
                    worst.rank,
                    p.min(m)
                ),
            });
        }
        if worst.peak_activations > 1 {
            let bytes = if worst.peak_activation_bytes > 0.0 {
                format!(" ({:.0} bytes)", worst.peak_activation_bytes)
            } else {
                String::new()
            };
            out.push(Recommendation {
                advice: Advice::CheckpointActivations,
                message: format!(
                    "if memory is tight: rank {} peaks at {} in-flight activations{bytes}; checkpointing keeps only each stage's input and recomputes the rest in backward (about one extra forward per micro-batch)",
                    worst.rank, worst.peak_activations
                ),
            });
        }
    }
    let stage_cost: Vec<f64> = (0..plan.schedule.num_stages())
        .map(|s| plan.costs.fwd[s] + plan.costs.bwd[s])
        .collect();
    let mean = stage_cost.iter().sum::<f64>() / stage_cost.len() as f64;
    if let Some((slowest, &cost)) = stage_cost
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
    {
        if cost > 1.1 * mean {
            out.push(Recommendation {
                advice: Advice::Rebalance,
                message: format!(
                    "stage {slowest} costs {cost:.2} ms per micro-batch, {:.0} % above the mean {mean:.2} ms; it paces the pipeline: move layers off it (pipit partition --method balanced)",
                    100.0 * (cost / mean - 1.0)
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{generate, lower};

    #[test]
    fn seed_table_for_ninety_percent() {
        let got: Vec<usize> = [2, 4, 8, 16]
            .iter()
            .map(|&p| microbatches_for(p, 1, 0.9).unwrap())
            .collect();
        assert_eq!(got, vec![9, 27, 63, 135]);
        assert_eq!(microbatches_for(1, 1, 0.99).unwrap(), 1);
        assert_eq!(microbatches_for(4, 2, 0.9).unwrap(), 14);
        assert!(microbatches_for(4, 1, 1.0).is_err());
    }

    #[test]
    fn seed_efficiencies() {
        let got: Vec<String> = [1, 2, 4, 8, 16]
            .iter()
            .map(|&m| format!("{:.1}", 100.0 * efficiency(4, m)))
            .collect();
        assert_eq!(got, ["25.0", "40.0", "57.1", "72.7", "84.2"]);
    }

    fn plan(kind: ScheduleKind, p: usize, m: usize, v: usize, costs: Option<Costs>) -> Plan {
        let schedule = lower(&generate(kind, p, m, v).unwrap()).unwrap();
        let costs = costs.unwrap_or_else(|| Costs::uniform(p * v));
        Plan::new(schedule, costs, 0.9).unwrap()
    }

    #[test]
    fn advice_follows_the_figures() {
        let gpipe = plan(ScheduleKind::GPipe, 4, 8, 1, None);
        let kinds: Vec<Advice> = gpipe.recommendations.iter().map(|r| r.advice).collect();
        assert_eq!(
            kinds,
            [
                Advice::RaiseMicrobatches,
                Advice::ZeroBubble,
                Advice::Interleave,
                Advice::Use1F1B,
                Advice::CheckpointActivations
            ]
        );
        assert!(gpipe.recommendations[0].message.contains("from 8 to 27"));
        assert!(gpipe.recommendations[1]
            .message
            .contains("efficiency 88.9 %"));
        assert!(gpipe.recommendations[3].message.contains("holds 8"));

        // Zero bubble's own advice counts its smaller bubble: 9 micro-batches reach 90 %.
        let zb = plan(ScheduleKind::ZeroBubble, 4, 8, 1, None);
        assert!((zb.simulation.efficiency - 24.0 / 27.0).abs() < 1e-12);
        let kinds: Vec<Advice> = zb.recommendations.iter().map(|r| r.advice).collect();
        assert_eq!(
            kinds,
            [
                Advice::RaiseMicrobatches,
                Advice::ZeroBubbleV,
                Advice::CheckpointActivations
            ]
        );
        assert!(zb.recommendations[0].message.contains("from 8 to 9"));
        assert!(zb.recommendations[1].message.contains("efficiency 94.1 %"));

        // The V reaches 48 / 51 and holds 2p half-size chunks, p micro-batches of a rank's layers
        // as on 1F1B's first rank: no memory advice.
        // Interleaving holds 11 chunks on rank 0, more than 1F1B's 4 micro-batches' worth.
        let v = plan(ScheduleKind::ZeroBubbleV, 4, 8, 2, None);
        assert!((v.simulation.efficiency - 48.0 / 51.0).abs() < 1e-12);
        assert!((v.closed_form_efficiency.unwrap() - 48.0 / 51.0).abs() < 1e-12);
        let kinds: Vec<Advice> = v.recommendations.iter().map(|r| r.advice).collect();
        assert_eq!(kinds, [Advice::CheckpointActivations]);
        // Below m = 2p the V cannot fill its round trip: the advice asks for 2p at least.
        let short = plan(ScheduleKind::ZeroBubbleV, 4, 2, 2, None);
        assert_eq!(short.microbatches_for_target, 8);
        assert_eq!(short.closed_form_efficiency, None);
        assert!(short.recommendations[0].message.contains("from 2 to 8"));
        let looped = plan(ScheduleKind::Interleaved, 4, 8, 2, None);
        let memory = looped
            .recommendations
            .iter()
            .find(|r| r.advice == Advice::Use1F1B)
            .expect("interleaving holds more than 1F1B");
        assert!(memory
            .message
            .contains("rank 0 holds 11 chunk activations (5.5 micro-batches' worth)"));

        let good = plan(ScheduleKind::OneFOneB, 2, 32, 1, None);
        assert!(good
            .recommendations
            .iter()
            .all(|r| r.advice == Advice::CheckpointActivations));

        let mut costs = Costs::uniform(4);
        costs.fwd[2] = 3.0;
        costs.bwd[2] = 6.0;
        let skewed = plan(ScheduleKind::OneFOneB, 4, 64, 1, Some(costs));
        let rebalance = skewed
            .recommendations
            .iter()
            .find(|r| r.advice == Advice::Rebalance)
            .unwrap();
        assert!(
            rebalance.message.starts_with("stage 2 costs 9.00"),
            "{}",
            rebalance.message
        );
    }
}
