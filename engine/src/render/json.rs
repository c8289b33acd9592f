//! The plan's figures as one JSON object.

use anyhow::{Context, Result};
use serde_json::json;

use crate::analysis::Plan;

/// Keys: `schedule`, `stages` (ranks `p`), `microbatches`, `chunks`, `makespan` (ms),
/// `efficiency`, `bubble_fraction`, `ranks` (`rank`, `busy`, `idle`, `recv_wait`,
/// `peak_activations`, `peak_activation_bytes`), `closed_form_efficiency` (null where none
/// holds), `target_efficiency`, `microbatches_for_target`, `recommendations` and `costs`.
pub fn write(plan: &Plan) -> Result<String> {
    let sim = &plan.simulation;
    let value = json!({
        "schedule": plan.schedule.name,
        "stages": plan.ranks,
        "microbatches": plan.schedule.microbatches,
        "chunks": plan.chunks,
        "makespan": sim.makespan,
        "efficiency": sim.efficiency,
        "bubble_fraction": sim.bubble_fraction,
        "ranks": sim.ranks,
        "closed_form_efficiency": plan.closed_form_efficiency,
        "target_efficiency": plan.target_efficiency,
        "microbatches_for_target": plan.microbatches_for_target,
        "recommendations": plan.recommendations,
        "costs": {
            "fwd": plan.costs.fwd,
            "bwd": plan.costs.bwd,
            "weight_share": plan.costs.weight_share,
            "latency": plan.costs.latency,
            "bandwidth": if plan.costs.bandwidth.is_finite() { json!(plan.costs.bandwidth) } else { json!(null) },
            "activation_bytes": plan.costs.activation_bytes,
        },
    });
    serde_json::to_string_pretty(&value).context("writing the plan as JSON")
}
