//! Measured timelines as Chrome trace JSON, in the format `pipit plan --format chrome` writes.

use std::path::Path;

use anyhow::{Context, Result};
use pipit_engine::exec::StepReport;
use pipit_engine::render::chrome;

/// Write a step's measured timeline to `path`.
pub fn write_measured(path: &Path, report: &StepReport) -> Result<()> {
    let timeline: Vec<_> = report.ranks.iter().map(|r| r.timeline.clone()).collect();
    let (events, flows) = chrome::from_timeline(&timeline);
    std::fs::write(path, chrome::write(&events, &flows))
        .with_context(|| format!("writing --trace {}", path.display()))
}
