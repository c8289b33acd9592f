//! Planner benchmark: generate, lower, validate and simulate an interleaved schedule with
//! p = 64 ranks, m = 1024 micro-batches and v = 4 chunks (524,288 compute actions).
//!
//! Run with `cargo bench --bench planner`; prints the median of several runs per phase.

use std::time::{Duration, Instant};

use pipit::engine::schedule::{interleaved, lower, validate};
use pipit::engine::sim::{simulate, Costs};

const P: usize = 64;
const M: usize = 1024;
const V: usize = 4;
const RUNS: usize = 7;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut phases: [Vec<Duration>; 5] = Default::default();
    let mut figures = None;
    for _ in 0..RUNS {
        let t0 = Instant::now();
        let schedule = interleaved(P, M, V)?;
        let t1 = Instant::now();
        let lowered = lower(&schedule)?;
        let t2 = Instant::now();
        validate(&lowered)?;
        let t3 = Instant::now();
        let sim = simulate(&lowered, &Costs::uniform(P * V))?;
        let t4 = Instant::now();
        for (phase, time) in phases
            .iter_mut()
            .zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0])
        {
            phase.push(time);
        }
        let actions: usize = lowered.ranks.iter().map(Vec::len).sum();
        figures = Some((actions, sim.makespan, sim.efficiency));
    }
    let (actions, makespan, efficiency) = figures.expect("at least one run");
    println!("planner: interleaved p={P} m={M} v={V}, {actions} actions after lowering");
    println!(
        "simulated makespan {makespan} ms, efficiency {:.2} %",
        100.0 * efficiency
    );
    let names = ["generate", "lower", "validate", "simulate", "total"];
    for (name, times) in names.iter().zip(phases) {
        println!(
            "{name:>9}: {:8.1} ms (median of {RUNS})",
            median(times).as_secs_f64() * 1e3
        );
    }
    Ok(())
}
