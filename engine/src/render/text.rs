//! The text report: a timeline in the seed's style (`T 0: [S0F0] [    ] ...`, one row per
//! time slot, one column per rank), then the figures and the advice.

use std::fmt::Write;

use crate::analysis::Plan;
use crate::sim::Simulation;

/// Rows of timeline printed before the text report elides the rest.
pub const MAX_ROWS: usize = 200;

/// The whole text report, with at most `max_rows` timeline rows.
pub fn write(plan: &Plan, max_rows: usize) -> String {
    let mut out = timeline(&plan.simulation, max_rows);
    out.push('\n');
    out.push_str(&figures(plan));
    out
}

/// One row per time slot (the shortest compute action's length), one cell per rank showing
/// the compute action running in the middle of that slot, `[    ]` when idle.
pub fn timeline(sim: &Simulation, max_rows: usize) -> String {
    let computes = || {
        sim.timeline
            .iter()
            .flatten()
            .filter(|t| t.action.is_compute())
    };
    let slot = computes()
        .map(|t| t.end - t.start)
        .filter(|d| *d > 0.0)
        .fold(f64::INFINITY, f64::min);
    if !slot.is_finite() {
        return String::new();
    }
    let width = computes()
        .map(|t| t.action.to_string().len())
        .max()
        .unwrap_or(4);
    let rows = (sim.makespan / slot - 1e-9).ceil().max(0.0) as usize;
    let label = rows.saturating_sub(1).to_string().len();
    let mut next = vec![0usize; sim.timeline.len()];
    let mut out = String::new();
    for row in 0..rows.min(max_rows) {
        let mid = (row as f64 + 0.5) * slot;
        let _ = write!(out, "T{row:>label$}:");
        for (rank, actions) in sim.timeline.iter().enumerate() {
            let i = &mut next[rank];
            while *i < actions.len() && (actions[*i].end <= mid || !actions[*i].action.is_compute())
            {
                *i += 1;
            }
            match actions.get(*i) {
                Some(t) if t.start <= mid => {
                    let _ = write!(out, " [{:<width$}]", t.action.to_string());
                }
                _ => {
                    let _ = write!(out, " [{:width$}]", "");
                }
            }
        }
        out.push('\n');
    }
    if rows > max_rows {
        let _ = writeln!(
            out,
            "... {} more time slots (--format svg or chrome shows the whole timeline)",
            rows - max_rows
        );
    }
    out
}

/// The figures and advice, without the timeline.
pub fn figures(plan: &Plan) -> String {
    let sim = &plan.simulation;
    let pct = |x: f64| 100.0 * x;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "schedule {}: {} ranks x {} chunk{} = {} stages, {} micro-batches",
        plan.schedule.name,
        plan.ranks,
        plan.chunks,
        if plan.chunks == 1 { "" } else { "s" },
        plan.schedule.num_stages(),
        plan.schedule.microbatches
    );
    let _ = writeln!(
        out,
        "makespan {:.2} ms, efficiency {:.1} %, bubble fraction {:.1} %",
        sim.makespan,
        pct(sim.efficiency),
        pct(sim.bubble_fraction)
    );
    let closed = match plan.closed_form_efficiency {
        Some(e) => format!("efficiency {:.1} %", pct(e)),
        None => format!("none below m = 2p = {} for this schedule", 2 * plan.ranks),
    };
    let _ = writeln!(
        out,
        "closed form (uniform costs, free transfers): {closed}; {} micro-batches reach the {:.1} % target",
        plan.microbatches_for_target,
        pct(plan.target_efficiency)
    );
    let _ = writeln!(out, "rank   busy ms   idle ms   peak activations");
    for r in &sim.ranks {
        let _ = writeln!(
            out,
            "{:>4} {:>9.2} {:>9.2}   {} ({:.0} bytes)",
            r.rank, r.busy, r.idle, r.peak_activations, r.peak_activation_bytes
        );
    }
    if !plan.recommendations.is_empty() {
        let _ = writeln!(out, "recommendations:");
        for rec in &plan.recommendations {
            let _ = writeln!(out, "  - {}", rec.message);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{gpipe, lower};
    use crate::sim::Costs;

    #[test]
    fn timeline_matches_the_seed_layout() {
        let schedule = lower(&gpipe(2, 2, 1).unwrap()).unwrap();
        let plan = Plan::new(schedule, Costs::uniform(2), 0.9).unwrap();
        let text = timeline(&plan.simulation, 100);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 9);
        assert_eq!(rows[0], "T0: [S0F0] [    ]");
        assert_eq!(rows[1], "T1: [S0F1] [S1F0]");
        assert_eq!(rows[8], "T8: [S0B1] [    ]");
        assert!(timeline(&plan.simulation, 3).contains("6 more time slots"));
        let report = write(&plan, 100);
        assert!(report.contains("efficiency 66.7 %"), "{report}");
    }
}
