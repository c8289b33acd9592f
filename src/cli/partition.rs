//! `pipit partition`: cut a model's layers into pipeline stages.
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use pipit_engine::partition::{self, layer_costs, Method, Partition};
use pipit_engine::schedule::{looped_placement, v_placement};
use pipit_engine::{invalid, invalid_input};
use serde_json::json;

/// Partition methods.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MethodArg {
    /// Equal layer counts; the first stages take one extra layer when it does not divide.
    Uniform,
    /// Minimise the slowest stage's total cost (exact dynamic programming).
    Balanced,
    /// Like balanced, with every stage's memory within --budget.
    MemoryCapped,
}

/// Stage placements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlacementArg {
    /// Stage k on rank k mod P.
    Looped,
    /// Rank r runs stages r and 2P-1-r (zero bubble's V).
    V,
}

/// Cut a model's layers into pipeline stages, balancing cost (and memory).
///
/// Layers are the embedding (layer 0), the transformer blocks, and the head + loss (the last
/// layer), each with its own cost. With --chunks V, stage k runs on rank k mod P; with
/// --placement v (zb-v's), stages r and 2P-1-r run on rank r, and balanced evens out each
/// rank's two stages together.
///
/// Example: pipit partition --stages 4 --blocks 12 --head-cost 3 --method balanced
#[derive(Args, Debug)]
pub struct PartitionArgs {
    /// Pipeline ranks P.
    #[arg(long, short = 'p', value_name = "P")]
    pub stages: usize,
    /// Chunks V: stages per rank (the model is cut into P x V stages). [default: 1; 2 with
    /// --placement v]
    #[arg(long, short = 'v', value_name = "V")]
    pub chunks: Option<usize>,
    /// Transformer blocks; the layers are embedding + blocks + head. Ignored with --costs.
    #[arg(long, value_name = "N", default_value_t = 12)]
    pub blocks: usize,
    /// Cost of the embedding layer (any unit, e.g. ms).
    #[arg(long, value_name = "COST", default_value_t = 1.0)]
    pub embedding_cost: f64,
    /// Cost of one transformer block.
    #[arg(long, value_name = "COST", default_value_t = 1.0)]
    pub block_cost: f64,
    /// Cost of the head + loss layer.
    #[arg(long, value_name = "COST", default_value_t = 1.0)]
    pub head_cost: f64,
    /// Every layer's cost as a comma-separated list (embedding first, head last); overrides
    /// --blocks and the per-kind costs.
    #[arg(long, value_name = "LIST")]
    pub costs: Option<String>,
    /// Every layer's memory in bytes: one value for all layers or a comma-separated list.
    /// [default: 0]
    #[arg(long, value_name = "LIST")]
    pub memory: Option<String>,
    /// How to cut.
    #[arg(long, value_enum, default_value_t = MethodArg::Balanced)]
    pub method: MethodArg,
    /// Which rank runs which stage: looped (stage k on rank k mod P, as interleaving) or v
    /// (zb-v: rank r runs stages r and 2P-1-r; needs --chunks 2, its default there).
    #[arg(long, value_enum, default_value_t = PlacementArg::Looped)]
    pub placement: PlacementArg,
    /// Memory budget per stage in bytes (memory-capped only).
    #[arg(long, value_name = "BYTES")]
    pub budget: Option<f64>,
    /// Output format: text or json.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub format: String,
}

fn list(flag: &str, text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .map_err(|_| invalid_input!("--{flag}: `{}` is not a number", v.trim()))
        })
        .collect()
}

/// Compute the partition and print it.
pub fn run(args: PartitionArgs) -> Result<()> {
    let v_shape = args.placement == PlacementArg::V;
    let chunks = args.chunks.unwrap_or(if v_shape { 2 } else { 1 });
    if args.stages == 0 || chunks == 0 {
        invalid!(
            "stages and chunks must be at least 1 (got {} and {chunks})",
            args.stages
        );
    }
    if v_shape && chunks != 2 {
        invalid!("--placement v runs two stages per rank: chunks must be 2 (got {chunks})");
    }
    let cost = match &args.costs {
        Some(text) => list("costs", text)?,
        None => layer_costs(
            args.embedding_cost,
            args.block_cost,
            args.blocks,
            args.head_cost,
        ),
    };
    let n = cost.len();
    let memory = match &args.memory {
        None => Vec::new(),
        Some(text) => match list("memory", text)? {
            one if one.len() == 1 => vec![one[0]; n],
            all if all.len() == n => all,
            other => invalid!(
                "--memory: got {} values for {n} layers (give one value, or one per layer)",
                other.len()
            ),
        },
    };
    let stages = args.stages * chunks;
    let (method, ranges) = match args.method {
        MethodArg::Uniform => (Method::Uniform, partition::uniform(n, stages)?),
        MethodArg::Balanced if v_shape => {
            (Method::Balanced, partition::balanced_v(&cost, args.stages)?)
        }
        MethodArg::Balanced => (Method::Balanced, partition::balanced(&cost, stages)?),
        MethodArg::MemoryCapped if v_shape => {
            invalid!("--method memory-capped caps each stage, not each rank's pair: with --placement v use balanced or uniform")
        }
        MethodArg::MemoryCapped => {
            let Some(budget) = args.budget else {
                invalid!("--method memory-capped needs --budget BYTES");
            };
            (
                Method::MemoryCapped,
                partition::memory_capped(&cost, &memory, stages, budget)?,
            )
        }
    };
    let result = Partition::new(method, ranges, &cost, &memory);
    let placement = if v_shape {
        v_placement(args.stages)
    } else {
        looped_placement(stages, args.stages)
    };
    let out = if args.format == "json" {
        json_report(&result, &placement)?
    } else {
        text_report(&result, &placement)
    };
    print!("{out}");
    Ok(())
}

/// Each rank's total cost: the sum over the stages it runs.
fn rank_costs(p: &Partition, placement: &[usize]) -> Vec<f64> {
    let mut out = vec![0.0; placement.iter().max().map_or(0, |r| r + 1)];
    for (cost, &rank) in p.stage_cost.iter().zip(placement) {
        out[rank] += cost;
    }
    out
}

fn text_report(p: &Partition, placement: &[usize]) -> String {
    let layers = p.stages.last().map_or(0, |r| r.end);
    let per_rank = rank_costs(p, placement);
    let mut out = format!(
        "partition {:?}: {layers} layers into {} stages on {} ranks\nstage  rank  layers        cost      memory\n",
        p.method,
        p.stages.len(),
        per_rank.len()
    )
    .to_lowercase();
    for (s, r) in p.stages.iter().enumerate() {
        out.push_str(&format!(
            "{s:>5} {:>5}  {:<10} {:>7.2} {:>11.0}\n",
            placement[s],
            format!("{}..{}", r.start, r.end),
            p.stage_cost[s],
            p.stage_memory[s]
        ));
    }
    let mean = p.stage_cost.iter().sum::<f64>() / p.stage_cost.len() as f64;
    out.push_str(&format!(
        "slowest stage {:.2}, mean {mean:.2}, imbalance {:.2}\n",
        p.max_cost(),
        if mean > 0.0 { p.max_cost() / mean } else { 1.0 }
    ));
    if per_rank.len() < p.stages.len() {
        let busiest = per_rank.iter().copied().fold(0.0, f64::max);
        let mean = per_rank.iter().sum::<f64>() / per_rank.len() as f64;
        out.push_str(&format!(
            "busiest rank {busiest:.2}, mean {mean:.2}, imbalance {:.2}\n",
            if mean > 0.0 { busiest / mean } else { 1.0 }
        ));
    }
    out
}

fn json_report(p: &Partition, placement: &[usize]) -> Result<String> {
    let chunks = partition::chunks(&p.stages, placement)?;
    let per_rank = rank_costs(p, placement);
    let stages: Vec<_> = p
        .stages
        .iter()
        .enumerate()
        .map(|(s, r)| {
            json!({"stage": s, "rank": placement[s], "layers": [r.start, r.end],
                   "cost": p.stage_cost[s], "memory": p.stage_memory[s]})
        })
        .collect();
    let ranks: Vec<_> = chunks
        .iter()
        .enumerate()
        .map(|(rank, c)| {
            json!({"rank": rank, "chunks": c.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
                   "cost": per_rank[rank]})
        })
        .collect();
    let value = json!({
        "method": p.method,
        "layers": p.stages.last().map_or(0, |r| r.end),
        "stages": stages,
        "ranks": ranks,
        "max_cost": p.max_cost(),
    });
    let mut text = serde_json::to_string_pretty(&value).context("writing the partition as JSON")?;
    text.push('\n');
    Ok(text)
}
