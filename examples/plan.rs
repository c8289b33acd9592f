//! Plan a pipeline without running it, through the library API: generate each schedule for
//! p = 4 ranks and m = 8 micro-batches, lower it to sends and receives, validate it, simulate
//! it, and print its efficiency, its peak activation memory and the first one's timeline.
//!
//! Run: `cargo run --example plan`

use anyhow::Result;
use pipit::engine::analysis::Plan;
use pipit::engine::render::{render, Format};
use pipit::engine::schedule::{generate, lower, validate, ScheduleKind};
use pipit::engine::sim::Costs;

fn main() -> Result<()> {
    let (p, m) = (4, 8);
    for (kind, v) in [
        (ScheduleKind::Naive, 1),
        (ScheduleKind::GPipe, 1),
        (ScheduleKind::OneFOneB, 1),
        (ScheduleKind::Interleaved, 2),
        (ScheduleKind::ZeroBubble, 1),
        (ScheduleKind::ZeroBubble, 2),
        (ScheduleKind::ZeroBubbleV, 2),
        (ScheduleKind::DualPipeV, 2),
    ] {
        let lowered = lower(&generate(kind, p, m, v)?)?;
        validate(&lowered)?;
        let plan = Plan::new(lowered, Costs::uniform(p * v), 0.9)?;
        let peaks: Vec<usize> = plan
            .simulation
            .ranks
            .iter()
            .map(|r| r.peak_activations)
            .collect();
        println!(
            "{:>12} v={v}: efficiency {:5.1}%, peak in-flight micro-batch chunks per rank {peaks:?}",
            kind.name(),
            100.0 * plan.simulation.efficiency
        );
    }
    let one_f_one_b = Plan::new(
        lower(&generate(ScheduleKind::OneFOneB, p, m, 1)?)?,
        Costs::uniform(p),
        0.9,
    )?;
    println!("\n{}", render(&one_f_one_b, Format::Text)?);
    Ok(())
}
