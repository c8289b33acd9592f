//! Measured timelines as Chrome trace JSON, in the format `pipit plan --format chrome` writes.

use std::path::Path;

use anyhow::{Context, Result};
use pipit_engine::exec::StepReport;

/// Write a step's measured timeline to `path`.
pub fn write_measured(path: &Path, report: &StepReport) -> Result<()> {
    let events: Vec<serde_json::Value> = report
        .ranks
        .iter()
        .flat_map(|r| &r.timeline)
        .map(|a| {
            serde_json::json!({
                "name": format!("{:?}", a.action), "ph": "X", "pid": 0, "tid": a.rank,
                "ts": a.start * 1e6, "dur": (a.end - a.start) * 1e6,
            })
        })
        .collect();
    let json = serde_json::json!({ "traceEvents": events });
    std::fs::write(path, json.to_string()).with_context(|| format!("writing {}", path.display()))
}
