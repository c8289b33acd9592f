//! An SVG timeline: one row per rank, forward and backward boxes in different colours, the
//! micro-batch number in each box, time running left to right.

use std::fmt::Write;

use crate::analysis::Plan;
use crate::schedule::Action;

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 64.0;
const TOP: f64 = 40.0;
const ROW: f64 = 28.0;

fn colour(action: Action) -> &'static str {
    match action {
        Action::Forward { .. } => "#4e79a7",
        Action::Backward { .. } => "#59a14f",
        Action::BackwardInput { .. } => "#8cd17d",
        _ => "#b6992d",
    }
}

/// The plan's simulated timeline as an SVG document.
pub fn write(plan: &Plan) -> String {
    let sim = &plan.simulation;
    let ranks = sim.timeline.len();
    let height = TOP + ROW * ranks as f64 + 36.0;
    let scale = if sim.makespan > 0.0 {
        WIDTH / sim.makespan
    } else {
        0.0
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" viewBox="0 0 {w} {height}" font-family="monospace" font-size="10">"#,
        w = LEFT + WIDTH + 16.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="16" font-size="13">{} · {} ranks × {} chunks · {} micro-batches · makespan {:.2} ms · efficiency {:.1} %</text>"#,
        plan.schedule.name,
        plan.ranks,
        plan.chunks,
        plan.schedule.microbatches,
        sim.makespan,
        100.0 * sim.efficiency
    );
    for (rank, actions) in sim.timeline.iter().enumerate() {
        let y = TOP + ROW * rank as f64;
        let _ = writeln!(
            out,
            r#"<text x="4" y="{}">rank {rank}</text>"#,
            y + ROW / 2.0 + 4.0
        );
        for t in actions.iter().filter(|t| t.action.is_compute()) {
            let x = LEFT + t.start * scale;
            let w = (t.end - t.start) * scale;
            let _ = writeln!(
                out,
                r#"<g><title>{a} {s:.3}-{e:.3} ms</title><rect x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="{c}" stroke="white" stroke-width="0.5"/><text x="{tx:.2}" y="{ty:.2}" fill="white" text-anchor="middle">{mb}</text></g>"#,
                a = t.action,
                s = t.start,
                e = t.end,
                h = ROW - 4.0,
                c = colour(t.action),
                tx = x + w / 2.0,
                ty = y + ROW / 2.0 + 2.0,
                mb = t.action.microbatch()
            );
        }
    }
    let legend_y = TOP + ROW * ranks as f64 + 20.0;
    for (i, (label, action)) in [
        (
            "forward",
            Action::Forward {
                stage: 0,
                microbatch: 0,
            },
        ),
        (
            "backward",
            Action::Backward {
                stage: 0,
                microbatch: 0,
            },
        ),
        (
            "backward input",
            Action::BackwardInput {
                stage: 0,
                microbatch: 0,
            },
        ),
        (
            "backward weight",
            Action::BackwardWeight {
                stage: 0,
                microbatch: 0,
            },
        ),
    ]
    .iter()
    .enumerate()
    {
        let x = LEFT + 150.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{legend_y}">{label}</text>"#,
            legend_y - 10.0,
            colour(*action),
            x + 16.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{gpipe, lower};
    use crate::sim::Costs;

    #[test]
    fn one_box_per_compute_with_its_microbatch() {
        let schedule = lower(&gpipe(3, 4, 1).unwrap()).unwrap();
        let plan = Plan::new(schedule, Costs::uniform(3), 0.9).unwrap();
        let svg = write(&plan);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<g><title>").count(), 3 * 4 * 2);
        assert!(svg.contains(r##"fill="#4e79a7""##) && svg.contains(r##"fill="#59a14f""##));
        assert!(svg.contains(r#"text-anchor="middle">3</text>"#));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
