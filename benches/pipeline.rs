//! Pipeline figures measured on this machine, printed as Markdown tables for BENCHMARKS.md:
//!
//! 1. memory follows the schedule: per-rank peak saved-activation bytes under GPipe, 1F1B and
//!    zero bubble (ZB-H1 and ZB-V; p = 4, m = 8), with and without activation checkpointing,
//!    beside the simulator's figures (the simulator is given each stage's measured bytes per
//!    micro-batch; the count of micro-batches held at once is its own prediction);
//! 2. step makespans at p = 2, the schedules taking turns: GPipe, 1F1B and ZB-H1, then the
//!    two-chunk schedules (interleaved, ZB-H1 looped, ZB-V) under uniform and balanced cuts,
//!    each beside the simulator's;
//! 3. measured vs simulated: one 1F1B (and one zero-bubble) step's measured per-stage
//!    forward/backward times fed to the simulator, and each rank's busy fraction compared with
//!    the measured one.
//!
//! Run: `cargo bench --bench pipeline` (`-- wgpu` to run on wgpu instead of the reference backend).

use anyhow::Result;
use pipit::engine::data::{sample_batch, Corpus};
use pipit::engine::exec::{self, StepOptions, StepReport};
use pipit::engine::model::{AdamWConfig, ModelConfig};
use pipit::engine::sim::{simulate, Costs, Simulation};
use pipit::engine::train::{Init, TrainConfig, Trainer};
use pipit::engine::Backend;
use pipit::reference::ReferenceBackend;
use pipit::wgpu::WgpuBackend;

/// `schedule` on `stages` ranks, with its own default chunks per rank (two for zb-v).
fn config(schedule: &str, stages: usize) -> TrainConfig {
    let kind: pipit::engine::schedule::ScheduleKind = schedule.parse().expect("a schedule");
    config_chunks(schedule, stages, kind.default_chunks(), "uniform")
}

fn config_chunks(schedule: &str, stages: usize, chunks: usize, partition: &str) -> TrainConfig {
    TrainConfig {
        model: ModelConfig {
            vocab_size: 256,
            n_positions: 64,
            n_embd: 64,
            n_layer: 6,
            n_head: 4,
            ..ModelConfig::default()
        },
        schedule: schedule.parse().unwrap(),
        stages,
        chunks,
        partition: partition.parse().unwrap(),
        microbatches: 8,
        batch_size: 16,
        seq_len: 64,
        ..TrainConfig::default()
    }
}

/// Train `steps` steps and return every step's report and the trainer.
fn run<B: Backend>(
    make: &dyn Fn() -> Result<B>,
    schedule: &str,
    stages: usize,
    checkpoint_activations: bool,
    steps: u32,
) -> Result<(Vec<StepReport>, Trainer<B>)> {
    let mut trainer = Trainer::new(config(schedule, stages), |_| make(), Init::Fresh)?;
    let reports = (1..=steps)
        .map(|step| train(&mut trainer, step, checkpoint_activations))
        .collect::<Result<_>>()?;
    Ok((reports, trainer))
}

/// Step `step` (1-based) of `trainer` on its batch of the embedded corpus.
fn train<B: Backend>(
    trainer: &mut Trainer<B>,
    step: u32,
    checkpoint_activations: bool,
) -> Result<StepReport> {
    let corpus = Corpus::split(include_bytes!("../data/shakespeare.txt"), 0.1)?;
    let c = &trainer.config;
    let batch = sample_batch(&corpus.train, c.batch_size, c.seq_len, c.seed, step as u64)?;
    let opts = StepOptions {
        checkpoint_activations,
        lr: 1e-3,
        step,
        adamw: AdamWConfig::default(),
    };
    exec::train_step(&trainer.schedule, &mut trainer.ranks, &batch, &opts)
}

fn memory_table<B: Backend>(make: &dyn Fn() -> Result<B>) -> Result<()> {
    println!("| schedule | checkpointing | rank | micro-batches held at peak: measured | simulated | peak saved-activation bytes: measured | simulated | device peak bytes |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for schedule in ["gpipe", "1f1b", "zb-h1", "zb-v"] {
        for ckpt in [false, true] {
            let (reports, trainer) = run(make, schedule, 4, ckpt, 1)?;
            let report = &reports[0];
            // Each stage's bytes per micro-batch: its rank's mean (exact for one stage per rank).
            let plan = &trainer.schedule;
            let per_mb: Vec<f64> = plan
                .placement
                .iter()
                .map(|&r| &report.ranks[r])
                .map(|r| r.peak_activation_bytes as f64 / r.peak_inflight.max(1) as f64)
                .collect();
            let costs = Costs {
                activation_bytes: per_mb,
                ..Costs::uniform(plan.num_stages())
            };
            let sim = simulate(&trainer.schedule, &costs)?;
            for (r, rank) in report.ranks.iter().enumerate() {
                println!(
                    "| {schedule} | {} | {r} | {} | {} | {} | {:.0} | {} |",
                    if ckpt { "on" } else { "off" },
                    rank.peak_inflight,
                    sim.ranks[r].peak_activations,
                    rank.peak_activation_bytes,
                    sim.ranks[r].peak_activation_bytes,
                    rank.peak_bytes
                );
            }
        }
    }
    Ok(())
}

/// The costs `reports` measured ([`Costs::measured`] over every rank's timeline).
fn measured_costs(reports: &[StepReport], stages: usize) -> Result<Costs> {
    let actions = reports
        .iter()
        .flat_map(|s| &s.ranks)
        .flat_map(|r| &r.timeline);
    Costs::measured(actions, stages, 0.5)
}

fn busy_table<B: Backend>(
    make: &dyn Fn() -> Result<B>,
    schedule: &str,
    stages: usize,
) -> Result<()> {
    let (reports, trainer) = run(make, schedule, stages, false, 3)?;
    let report = &reports[2];
    println!("{schedule}, p = {stages}, m = 8, third step:");
    let costs = measured_costs(&reports[2..], trainer.schedule.num_stages())?;
    let sim: Simulation = simulate(&trainer.schedule, &costs)?;
    println!(
        "measured makespan {:.1} ms, simulated {:.1} ms; transfer {:.3} ms; per-stage fwd ms {:?}, bwd ms {:?}",
        report.makespan,
        sim.makespan,
        costs.latency,
        costs.fwd.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
        costs.bwd.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>()
    );
    println!("| rank | measured busy fraction | simulated busy fraction | difference (points) |");
    println!("| --- | --- | --- | --- |");
    for (r, rank) in report.ranks.iter().enumerate() {
        let measured = rank.busy / report.makespan;
        let simulated = sim.ranks[r].busy / sim.makespan;
        println!(
            "| {r} | {:.1}% | {:.1}% | {:+.1} |",
            100.0 * measured,
            100.0 * simulated,
            100.0 * (measured - simulated)
        );
    }
    Ok(())
}

/// Median step makespan of each `(schedule, chunks, partition)` over steps 3 to 12, p = 2 (one rank per
/// core here); the schedules take turns step by step, so a change in the machine's load falls
/// on all of them. Beside it, the simulator's makespan for the same plan under that run's mean
/// measured costs, and under costs common to all (the first run's, with the first split
/// backward's weight share), which leaves only the schedule to differ.
fn makespan_table<B: Backend>(
    make: &dyn Fn() -> Result<B>,
    schedules: &[(&str, usize, &str)],
) -> Result<()> {
    let mut trainers = schedules
        .iter()
        .map(|&(s, v, cut)| Trainer::new(config_chunks(s, 2, v, cut), |_| make(), Init::Fresh))
        .collect::<Result<Vec<_>>>()?;
    let mut reports: Vec<Vec<StepReport>> = vec![Vec::new(); schedules.len()];
    for step in 1..=12 {
        for (trainer, out) in trainers.iter_mut().zip(&mut reports) {
            let report = train(trainer, step, false)?;
            if step > 2 {
                out.push(report);
            }
        }
    }
    let costs = reports
        .iter()
        .zip(&trainers)
        .map(|(r, t)| measured_costs(r, t.schedule.num_stages()))
        .collect::<Result<Vec<Costs>>>()?;
    let mut common = costs[0].clone();
    if let Some(split) = schedules.iter().position(|(s, _, _)| s.starts_with("zb")) {
        common.weight_share = costs[split].weight_share.clone();
    }
    let round = |v: &[f64]| {
        v.iter()
            .map(|x| (x * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    };
    println!(
        "common costs: fwd ms {:?}, bwd ms {:?}, weight share {:?}",
        round(&common.fwd),
        round(&common.bwd),
        round(&common.weight_share)
    );
    println!("| schedule | p | v | partition | median measured makespan (steps 3-12) | simulated, own costs | simulated, common costs |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (i, (schedule, v, cut)) in schedules.iter().enumerate() {
        let mut times: Vec<f64> = reports[i].iter().map(|r| r.makespan).collect();
        times.sort_by(f64::total_cmp);
        let median = (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0;
        let plan = &trainers[i].schedule;
        println!(
            "| {schedule} | 2 | {v} | {cut} | {median:.1} ms | {:.1} ms | {:.1} ms |",
            simulate(plan, &costs[i])?.makespan,
            simulate(plan, &common)?.makespan
        );
    }
    Ok(())
}

/// Every table, on the backend `make` opens.
fn tables<B: Backend>(make: &dyn Fn() -> Result<B>) -> Result<()> {
    memory_table(make)?;
    println!();
    makespan_table(
        make,
        &[
            ("gpipe", 1, "uniform"),
            ("1f1b", 1, "uniform"),
            ("zb-h1", 1, "uniform"),
        ],
    )?;
    // Two chunks per rank; the V pairs the model's ends on rank 0, so the cut matters more.
    for cut in ["uniform", "balanced"] {
        println!();
        makespan_table(
            make,
            &[("interleaved", 2, cut), ("zb-h1", 2, cut), ("zb-v", 2, cut)],
        )?;
    }
    for p in [2, 4] {
        for schedule in ["1f1b", "zb-h1"] {
            println!();
            busy_table(make, schedule, p)?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    println!("model: 6 layers, width 64, 4 heads, vocab 256; batch 16 x 64 tokens; m = 8\n");
    if std::env::args().any(|a| a == "wgpu") {
        let make = || WgpuBackend::new();
        println!("backend: {}\n", make()?.describe());
        tables(&make)
    } else {
        println!("backend: reference\n");
        tables(&|| Ok(ReferenceBackend::new()))
    }
}
