//! `pipit plan`: generate (or load) a schedule, lower, validate and simulate it, and report.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use pipit_engine::analysis::Plan;
use pipit_engine::render::{chrome, render, Format};
use pipit_engine::schedule::{
    generate, generate_for, lower_for, validate, Action, Schedule, ScheduleKind,
};
use pipit_engine::sim::Costs;
use pipit_engine::{invalid, invalid_input};

/// Schedules `pipit plan` can generate.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScheduleArg {
    /// One micro-batch at a time through the whole pipe (efficiency 1/p).
    Naive,
    /// Fill-drain: all forwards, then all backwards; holds m activations per rank.
    Gpipe,
    /// PipeDream-Flush: same bubble as GPipe, at most p - r activations on rank r.
    #[value(name = "1f1b")]
    OneFOneB,
    /// Megatron's virtual pipeline: --chunks stages per rank, bubble (p-1)/(v m).
    Interleaved,
    /// Zero bubble (ZB-H1): backward split into input and weight gradients, the weight halves
    /// fill the drain; bubble (p-1)/(3 v m), memory as the first rank of 1F1B (or, with
    /// --chunks, of interleaved).
    #[value(name = "zb-h1")]
    ZeroBubble,
    /// Zero bubble on a V (ZB-V): two stages per rank, rank r running stages r and 2p-1-r,
    /// backward split; half of zb-h1's bubble, at most 2p chunks held per rank. --chunks is 2.
    #[value(name = "zb-v")]
    ZeroBubbleV,
    /// DualPipeV (DeepSeek's DualPipe cut into a V): zb-v's placement, each rank pairing one
    /// chunk's forward with the other's full backward of another micro-batch, so the two can
    /// overlap; split backwards only at the ends. Needs m >= 2p. --chunks is 2.
    #[value(name = "dualpipev")]
    DualPipeV,
}

impl From<ScheduleArg> for ScheduleKind {
    fn from(arg: ScheduleArg) -> Self {
        match arg {
            ScheduleArg::Naive => ScheduleKind::Naive,
            ScheduleArg::Gpipe => ScheduleKind::GPipe,
            ScheduleArg::OneFOneB => ScheduleKind::OneFOneB,
            ScheduleArg::Interleaved => ScheduleKind::Interleaved,
            ScheduleArg::ZeroBubble => ScheduleKind::ZeroBubble,
            ScheduleArg::ZeroBubbleV => ScheduleKind::ZeroBubbleV,
            ScheduleArg::DualPipeV => ScheduleKind::DualPipeV,
        }
    }
}

/// Output formats of `pipit plan`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    /// Timeline in rows of time slots (`T 0: [S0F0] [    ] ...`), then figures and advice.
    Text,
    /// Figures as JSON (schedule, stages, microbatches, chunks, makespan, efficiency, ...).
    Json,
    /// Chrome trace event JSON for Perfetto or chrome://tracing, with send -> receive arrows.
    Chrome,
    /// SVG picture of the timeline, one row per rank.
    Svg,
    /// The lowered schedule as text, to edit and load back with --schedule-file.
    Schedule,
}

/// Plan a pipeline step before it runs: makespan, bubble, memory, advice.
///
/// Generates the schedule (or loads one), inserts the transfers, proves it cannot deadlock
/// under blocking sends, and simulates it. Times are in milliseconds.
///
/// Example: pipit plan --schedule 1f1b --stages 4 --microbatches 8
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Schedule to generate.
    #[arg(long, value_enum, required_unless_present_any = ["schedule_file", "compare"])]
    pub schedule: Option<ScheduleArg>,
    /// Plan every schedule for these --stages, --microbatches and --chunks under the same
    /// costs and print one line each: makespan, efficiency and what each rank holds at its
    /// peak (text or json).
    #[arg(long, conflicts_with_all = ["schedule", "schedule_file"])]
    pub compare: bool,
    /// Load a hand-written schedule (text form, as `--format schedule` writes) instead of
    /// generating one; it may omit the transfers, which are then inserted.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["schedule", "stages", "microbatches", "chunks"])]
    pub schedule_file: Option<PathBuf>,
    /// Pipeline ranks p (devices); each runs --chunks stages.
    #[arg(
        long,
        short = 'p',
        value_name = "P",
        required_unless_present = "schedule_file"
    )]
    pub stages: Option<usize>,
    /// Micro-batches m per step.
    #[arg(
        long,
        short = 'm',
        value_name = "M",
        required_unless_present = "schedule_file"
    )]
    pub microbatches: Option<usize>,
    /// Chunks v: stages per rank (interleaved, zb-h1; naive and gpipe accept them too).
    /// [default: 1; 2 for zb-v and dualpipev, which run only 2]
    #[arg(long, short = 'v', value_name = "V")]
    pub chunks: Option<usize>,
    /// Forward time of one micro-batch on one stage, in ms: one value for every stage, or a
    /// comma-separated list with one value per stage (p x v values).
    #[arg(long, value_name = "MS", default_value = "1")]
    pub fwd: String,
    /// Backward time of one micro-batch on one stage, in ms: one value or one per stage.
    #[arg(long, value_name = "MS", default_value = "2")]
    pub bwd: String,
    /// The share of backward a split backward (zb-h1, zb-v) spends on weight gradients, the rest
    /// going to input gradients: one value or one per stage, between 0 and 1.
    #[arg(long, value_name = "SHARE", default_value = "0.5")]
    pub weight_share: String,
    /// Take the stage costs from a measured step: a `pipit train --trace` file (each stage's
    /// mean forward and backward, the weight share where the run split its backwards, the
    /// mean send as the transfer cost), in place of --fwd, --bwd and --comm. Ask what another
    /// schedule would make of the run you measured: add --compare.
    #[arg(long, value_name = "TRACE")]
    pub costs_from: Option<PathBuf>,
    /// Fixed cost of one transfer between ranks, in ms.
    #[arg(long, value_name = "MS", default_value_t = 0.0)]
    pub comm: f64,
    /// Link bandwidth in GB/s; a transfer then also takes activation bytes / bandwidth.
    /// [default: infinite]
    #[arg(long, value_name = "GB/S")]
    pub bandwidth: Option<f64>,
    /// Bytes of one micro-batch's activation, per stage (one value or one per stage); used for
    /// peak memory and transfer time.
    #[arg(long, value_name = "BYTES", default_value = "0")]
    pub activation_bytes: String,
    /// Efficiency to aim for (between 0 and 1): sets the micro-batch advice.
    #[arg(long, value_name = "E", default_value_t = 0.9)]
    pub target_efficiency: f64,
    /// What to print.
    #[arg(long, value_enum, default_value_t = FormatArg::Text)]
    pub format: FormatArg,
    /// Write to this file instead of standard output.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Option<PathBuf>,
}

/// Parse `text` as one number or a comma-separated list of `stages` numbers.
pub fn per_stage(flag: &str, text: &str, stages: usize) -> Result<Vec<f64>> {
    let values = text
        .split(',')
        .map(|v| {
            v.trim().parse::<f64>().map_err(|_| {
                invalid_input!(
                    "--{flag}: `{}` is not a number (give one value, or one per stage separated by commas)",
                    v.trim()
                )
            })
        })
        .collect::<Result<Vec<f64>>>()?;
    match values.len() {
        1 => Ok(vec![values[0]; stages]),
        n if n == stages => Ok(values),
        n => invalid!("--{flag}: got {n} values but the pipeline has {stages} stages (give one value, or one per stage)"),
    }
}

/// Build the lowered schedule, simulate it and write the chosen report.
pub fn run(args: PlanArgs) -> Result<()> {
    write(&args, report(&args)?)
}

/// The report `pipit plan` prints for `args`.
pub fn report(args: &PlanArgs) -> Result<String> {
    if args.compare {
        return compare(args);
    }
    let (schedule, costs) = match &args.schedule_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading schedule file {}", path.display()))?;
            let schedule = Schedule::parse(&text)
                .with_context(|| format!("schedule file {}", path.display()))?;
            let costs = costs(args, schedule.num_stages())?;
            (schedule, costs)
        }
        None => {
            let kind = args
                .schedule
                .map(ScheduleKind::from)
                .unwrap_or(ScheduleKind::OneFOneB);
            let p = args.stages.unwrap_or(0);
            let m = args.microbatches.unwrap_or(0);
            let v = args.chunks.unwrap_or(kind.default_chunks());
            // The sizes first (their errors name them), then the order for these costs.
            let stages = generate(kind, p, m, v)?.num_stages();
            let costs = costs(args, stages)?;
            (generate_for(kind, p, m, v, &costs)?, costs)
        }
    };
    let plan = plan_for(schedule, costs, args)?;
    let format = match args.format {
        FormatArg::Text => Format::Text,
        FormatArg::Json => Format::Json,
        FormatArg::Chrome => Format::Chrome,
        FormatArg::Svg => Format::Svg,
        FormatArg::Schedule => Format::Schedule,
    };
    render(&plan, format)
}

/// The costs the flags give, for a pipeline of `stages` stages.
fn costs(args: &PlanArgs, stages: usize) -> Result<Costs> {
    let bandwidth = match args.bandwidth {
        None => f64::INFINITY,
        Some(gbps) if gbps.is_finite() && gbps > 0.0 => gbps * 1e6,
        Some(gbps) => invalid!("--bandwidth must be a positive number of GB/s (got {gbps})"),
    };
    let weight_share = per_stage("weight-share", &args.weight_share, stages)?;
    let measured = match &args.costs_from {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid_input!("cannot read --costs-from {}: {e}", path.display()))?;
            let timeline = chrome::read_timeline(&text)
                .with_context(|| format!("--costs-from {}", path.display()))?;
            let mut costs = Costs::measured(timeline.iter().flatten(), stages, weight_share[0])
                .with_context(|| format!("--costs-from {}", path.display()))?;
            // A run without split backwards says nothing of the share: keep the flag's.
            let split = timeline
                .iter()
                .flatten()
                .any(|t| matches!(t.action, Action::BackwardInput { .. }));
            if !split {
                costs.weight_share = weight_share.clone();
            }
            Some(costs)
        }
        None => None,
    };
    let costs = Costs {
        bandwidth,
        activation_bytes: per_stage("activation-bytes", &args.activation_bytes, stages)?,
        ..match measured {
            Some(costs) => costs,
            None => Costs {
                fwd: per_stage("fwd", &args.fwd, stages)?,
                bwd: per_stage("bwd", &args.bwd, stages)?,
                weight_share,
                latency: args.comm,
                ..Costs::uniform(stages)
            },
        }
    };
    costs.check(stages)?;
    Ok(costs)
}

/// Validate `schedule`, insert its transfers for `costs` unless it has them, and simulate it.
fn plan_for(schedule: Schedule, costs: Costs, args: &PlanArgs) -> Result<Plan> {
    validate(&schedule)?;
    let lowered = if schedule.ranks.iter().flatten().all(|a| a.is_compute()) {
        lower_for(&schedule, &costs)?
    } else {
        schedule
    };
    Plan::new(lowered, costs, args.target_efficiency)
}

/// `--compare`: every schedule that accepts these sizes, planned under the same costs.
fn compare(args: &PlanArgs) -> Result<String> {
    let (p, m, v) = (
        args.stages.unwrap_or(0),
        args.microbatches.unwrap_or(0),
        args.chunks.unwrap_or(1),
    );
    // Sizes the naive schedule refuses are the user's mistake; a schedule that wants other
    // chunks is listed with its reason.
    let stages = generate(ScheduleKind::Naive, p, m, v)?.num_stages();
    let costs = costs(args, stages)?;
    // Without --chunks, a schedule that runs its own count (zb-v's two) is planned on the same
    // layers cut that much finer, each chunk costing its share of the stage.
    let mut rows = Vec::new();
    for kind in ScheduleKind::ALL {
        let k = match args.chunks {
            Some(_) => 1,
            None => kind.default_chunks(),
        };
        let fine = costs.split(k);
        let plan = match generate_for(kind, p, m, v * k, &fine) {
            Ok(schedule) => Ok(plan_for(schedule, fine, args)?),
            Err(e) => Err(e.to_string()),
        };
        rows.push((kind, k, plan));
    }
    let out = match args.format {
        FormatArg::Text => {
            let costs = match &args.costs_from {
                Some(path) => format!("stage costs measured in {}", path.display()),
                None => format!(
                    "ms per micro-batch: forward {}, backward {}",
                    args.fwd, args.bwd
                ),
            };
            let mut out = format!("p = {p}, m = {m}, v = {v}; {costs}\n");
            out.push_str("schedule      makespan ms  efficiency  peak held per rank\n");
            for (kind, k, plan) in &rows {
                match plan {
                    Ok(plan) => {
                        let sim = &plan.simulation;
                        let held: Vec<String> = sim
                            .ranks
                            .iter()
                            .map(|r| stages_worth(r.peak_activations, *k))
                            .collect();
                        out.push_str(&format!(
                            "{:<12} {:>12.2} {:>10.1} %  {}\n",
                            kind.name(),
                            sim.makespan,
                            100.0 * sim.efficiency,
                            held.join(" ")
                        ));
                    }
                    Err(why) => out.push_str(&format!("{:<12} -  ({why})\n", kind.name())),
                }
            }
            for (kind, k, _) in rows.iter().filter(|(_, k, _)| *k > 1) {
                out.push_str(&format!(
                    "{} runs {k} chunks per rank here, each 1/{k} of a stage's cost; its held counts are whole stages' worth\n",
                    kind.name()
                ));
            }
            out
        }
        FormatArg::Json => {
            let list: Vec<serde_json::Value> = rows
                .iter()
                .map(|(kind, k, plan)| match plan {
                    Ok(plan) => serde_json::json!({
                        "schedule": kind.name(),
                        "chunks": v * k,
                        "makespan": plan.simulation.makespan,
                        "efficiency": plan.simulation.efficiency,
                        "peak_activations": plan.simulation.ranks.iter().map(|r| r.peak_activations).collect::<Vec<_>>(),
                        "peak_activation_bytes": plan.simulation.ranks.iter().map(|r| r.peak_activation_bytes).collect::<Vec<_>>(),
                    }),
                    Err(why) => serde_json::json!({ "schedule": kind.name(), "error": why }),
                })
                .collect();
            serde_json::to_string_pretty(&list)?
        }
        _ => invalid!("--compare prints text or json (got another --format)"),
    };
    Ok(out)
}

/// `count` chunks of `1/k` of a stage, in stages' worth: `8` chunks of a half are `4`.
fn stages_worth(count: usize, k: usize) -> String {
    if count % k == 0 {
        (count / k).to_string()
    } else {
        format!("{:.1}", count as f64 / k as f64)
    }
}

/// Print `out`, or write it to --output.
fn write(args: &PlanArgs, mut out: String) -> Result<()> {
    if !out.ends_with('\n') {
        out.push('\n');
    }
    match &args.output {
        Some(path) => {
            std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?
        }
        None => super::print_out(&out)?,
    }
    Ok(())
}
