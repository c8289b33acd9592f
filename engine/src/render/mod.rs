//! Rendering a plan: a text timeline with the figures, JSON, a Chrome trace, an SVG picture.

pub mod chrome;
pub mod json;
pub mod svg;
pub mod text;

use anyhow::Result;

use crate::analysis::Plan;

/// Output formats of `pipit plan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Per-rank timeline in the seed's style, then the figures and advice.
    Text,
    /// The figures as one JSON object.
    Json,
    /// Chrome trace event JSON (Perfetto, chrome://tracing) with send -> receive arrows.
    Chrome,
    /// An SVG timeline: one row per rank.
    Svg,
    /// The lowered schedule in its text form, ready to edit and load again.
    Schedule,
}

/// Render `plan` in `format`.
pub fn render(plan: &Plan, format: Format) -> Result<String> {
    Ok(match format {
        Format::Text => text::write(plan, text::MAX_ROWS),
        Format::Json => json::write(plan)?,
        Format::Chrome => {
            let (events, flows) = chrome::from_simulation(&plan.simulation);
            chrome::write(&events, &flows)
        }
        Format::Svg => svg::write(plan),
        Format::Schedule => plan.schedule.to_string(),
    })
}
