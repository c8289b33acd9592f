//! pipit's zero-bubble orders against the published ones under real costs: for forward :
//! input : weight ratios from 1 : 1 : 1 to 1 : 1.6 : 0.4, p up to 16 and m up to 64, the
//! simulated efficiency of
//! - on the looped placement (zb-h1, `v` chunks a rank): pipit's order as `pipit train
//!   --schedule zb-h1` runs it (`zero_bubble_for`) and the published ZB-1P order as PyTorch's
//!   `ScheduleInterleavedZeroBubble` builds it;
//! - on the V (zb-v): pipit's order (`zero_bubble_v_for`), the zero-bubble paper's fixed ZB-V
//!   as PyTorch's `ScheduleZBVZeroBubble` builds it, and DualPipeV;
//!
//! each with the most activations any rank holds (chunks' worth), to compare against the cap.
//!
//! Run: `cargo run --release --example published_orders` (prints Markdown tables).

use anyhow::Result;
use pipit::engine::schedule::{
    dualpipe_v, zero_bubble_fixed, zero_bubble_for, zero_bubble_v_fixed, zero_bubble_v_for,
};
use pipit::engine::sim::{simulate, Costs, Simulation};

/// Forward : input : weight per stage, a stage's forward costing 1.
const RATIOS: [(f64, f64); 4] = [(1.0, 1.0), (1.2, 0.8), (1.4, 0.6), (1.6, 0.4)];

fn costs(stages: usize, input: f64, weight: f64) -> Costs {
    Costs {
        fwd: vec![1.0; stages],
        bwd: vec![input + weight; stages],
        weight_share: vec![weight / (input + weight); stages],
        ..Costs::uniform(stages)
    }
}

/// `2p`, `4p` and 64 micro-batches, those up to 64.
fn sizes(p: usize) -> Vec<usize> {
    let mut m = vec![2 * p, 4 * p, 64];
    m.retain(|&m| m <= 64);
    m.dedup();
    m
}

fn cell(s: &Simulation) -> String {
    format!("{:.1} % ({})", 100.0 * s.efficiency, s.peak_held())
}

fn main() -> Result<()> {
    // The smallest margin of pipit's order over a published one that fits its cap.
    let mut worst = f64::INFINITY;
    let mut margin = |ours: &Simulation, other: &Simulation| {
        if other.peak_held() <= ours.peak_held() {
            let d = ours.efficiency - other.efficiency;
            worst = worst.min(if d.abs() < 1e-12 { 0.0 } else { d });
        }
    };
    println!("| F : I : W | p | m | v | pipit zb-h1 | ZB-1P |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (input, weight) in RATIOS {
        for p in [2usize, 4, 8, 16] {
            for m in sizes(p) {
                for v in [1, 2] {
                    let c = costs(p * v, input, weight);
                    let Some(fixed) = zero_bubble_fixed(p, m, v) else {
                        continue;
                    };
                    let ours = simulate(&zero_bubble_for(p, m, v, &c)?, &c)?;
                    let fixed = simulate(&fixed, &c)?;
                    margin(&ours, &fixed);
                    println!(
                        "| 1 : {input} : {weight} | {p} | {m} | {v} | {} | {} |",
                        cell(&ours),
                        cell(&fixed)
                    );
                }
            }
        }
    }
    println!();
    println!("| F : I : W | p | m | pipit zb-v | fixed ZB-V | DualPipeV |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (input, weight) in RATIOS {
        for p in [2usize, 4, 8, 16] {
            for m in sizes(p) {
                let c = costs(2 * p, input, weight);
                let ours = simulate(&zero_bubble_v_for(p, m, 2, &c)?, &c)?;
                let fixed = simulate(&zero_bubble_v_fixed(p, m, 2)?, &c)?;
                let dual = simulate(&dualpipe_v(p, m, 2)?, &c)?;
                margin(&ours, &fixed);
                margin(&ours, &dual);
                println!(
                    "| 1 : {input} : {weight} | {p} | {m} | {} | {} | {} |",
                    cell(&ours),
                    cell(&fixed),
                    cell(&dual)
                );
            }
        }
    }
    println!(
        "\nsmallest margin of pipit's order over a published one within its cap: {:.2} points",
        100.0 * worst
    );
    Ok(())
}
