//! `pipit train --dry-run` and `pipit generate --dry-run`: one training step, or one wave of
//! generation, of the run the flags describe, on the meta backend (sizes only), and the
//! memory each rank would hold.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use pipit_engine::backend::DType;
use pipit_engine::data::Corpus;
use pipit_engine::exec::RankReport;
use pipit_engine::sim::simulate;
use pipit_engine::train::{Init, StepLog, TrainConfig, Trainer};
use pipit_engine::{invalid_input, Backend};
use pipit_meta::MetaBackend;
use serde_json::json;

use super::device::BackendChoice;
use super::OutputFormat;

/// Run one step of `config` on meta backends that count as `backend` would, and print each
/// rank's stages, parameters and memory, and whether every rank fits `limit` bytes; with
/// `log_json`, write the figures there too, as one JSON object.
pub fn run(
    config: TrainConfig,
    backend: BackendChoice,
    limit: Option<u64>,
    log_json: Option<&Path>,
) -> Result<()> {
    let counting = Counting::of(backend, &config)?;
    let mut out = String::new();
    let c = config.clone();
    let DryStep {
        trainer,
        at_rest,
        step,
    } = dry_step(config, counting)?;
    writeln!(out, "dry run of one step: {}", c.summary())?;
    writeln!(
        out,
        "bytes as {} (nothing was allocated or computed)",
        match counting {
            Counting::Plain => "the reference and wgpu backends allocate them".to_string(),
            Counting::Cpu => "the CPU backend allocates them".to_string(),
            Counting::Cuda {
                tensor_cores,
                devices,
            } => format!(
                "the CUDA backend allocates them, bf16 attention {}, the ranks on {devices} GPU{}",
                if tensor_cores {
                    "on tensor cores"
                } else {
                    "through cuBLAS"
                },
                if devices == 1 { "" } else { "s" }
            ),
        }
    )?;
    writeln!(
        out,
        "rank  parameters     at rest  held for backward  step peak  stages"
    )?;
    let mut rows = Vec::new();
    for (r, rank) in step.report.ranks.iter().enumerate() {
        let (params, stages) = rank_share(&c, &trainer, r)?;
        let held = format!(
            "{} ({})",
            bytes(rank.peak_activation_bytes),
            rank.peak_inflight
        );
        writeln!(
            out,
            "{r:>4}  {params:>10}  {:>10}  {held:>17}  {:>9}  {stages}",
            bytes(at_rest[r]),
            bytes(rank.peak_bytes)
        )?;
        rows.push(json!({
            "rank": r,
            "parameters": params,
            "at_rest_bytes": at_rest[r],
            "activation_bytes": rank.peak_activation_bytes,
            "microbatches_held": rank.peak_inflight,
            "peak_bytes": rank.peak_bytes,
            "stages": stages,
        }));
    }
    let total: u64 = step.report.ranks.iter().map(|r| r.peak_bytes).sum();
    writeln!(
        out,
        "at rest: weights, gradients and optimizer state; held for backward: saved activations \
         at their peak (micro-batches); step peak: the most held at once, transient buffers \
         included (all ranks: {}). A GPU adds its libraries' workspaces and its allocator's \
         rounding.",
        bytes(total)
    )?;
    let balance = imbalance(&step.report.ranks, &at_rest);
    if let Some(b) = &balance {
        writeln!(out, "{}", b.line())?;
    }
    let mut verdict = json!(null);
    if let Some(limit) = limit {
        let over: Vec<String> = step
            .report
            .ranks
            .iter()
            .enumerate()
            .filter(|(_, r)| r.peak_bytes > limit)
            .map(|(i, r)| format!("rank {i} ({})", bytes(r.peak_bytes)))
            .collect();
        verdict = json!(over.is_empty());
        match over.is_empty() {
            true => writeln!(out, "fits --memory-limit {} on every rank", bytes(limit))?,
            false => writeln!(
                out,
                "does not fit --memory-limit {}: {} over it",
                bytes(limit),
                over.join(", ")
            )?,
        }
    }
    // The step's time, as the planner sees it under the trainer's cost model.
    let simulated = simulate(&c.plan()?, &c.stage_costs()?)?;
    writeln!(
        out,
        "the step simulates {:.1} % busy under the layers' estimated FLOPs (transfers free; \
         `pipit plan --costs-from` takes a measured --trace instead)",
        100.0 * simulated.efficiency
    )?;
    super::print_out(&out)?;
    if let Some(path) = log_json {
        let mut line = json!({
            "dry_run": true,
            "config": c,
            "ranks": rows,
            "simulated_efficiency": simulated.efficiency,
        });
        if let Some(b) = &balance {
            line["imbalance"] = json!({
                "heaviest_rank": b.heaviest,
                "lightest_rank": b.lightest,
                "ratio": b.ratio,
                "advice": b.advice(),
            });
        }
        if limit.is_some() {
            line["fits"] = verdict;
        }
        std::fs::write(path, format!("{line}\n"))
            .with_context(|| format!("writing --log-json {}", path.display()))?;
    }
    Ok(())
}

/// Generate `max_tokens` tokens after each of `prompts` (one wave, in passes of `batch`) on
/// meta backends that count as `backend` would, and print each rank's weights and its peak:
/// weights, key/value caches and activations (no gradients, no optimizer state).
pub fn generation(
    config: TrainConfig,
    backend: BackendChoice,
    prompts: &[&[u32]],
    batch: usize,
    max_tokens: usize,
    format: OutputFormat,
) -> Result<()> {
    let counting = Counting::of(backend, &config)?;
    let c = config.clone();
    let make = |rank| Ok(counting.backend(rank));
    let mut trainer = Trainer::new(config, make, Init::BlankFrozen)?;
    let at_rest: Vec<u64> = trainer
        .ranks
        .iter()
        .map(|r| r.backend.memory().in_use)
        .collect();
    for rank in &trainer.ranks {
        rank.backend.reset_peak_memory();
    }
    // The tokens do not matter (nothing is computed); the lengths do. Contexts grow to the
    // window; past it, generation restarts from the last half of each, as `generate` does.
    let window = c.model.n_positions;
    let mut contexts: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| p[p.len().saturating_sub(window)..].to_vec())
        .collect();
    for _ in 0..max_tokens {
        let refs: Vec<&[u32]> = contexts.iter().map(Vec::as_slice).collect();
        trainer.next_tokens_logits(&refs, batch)?;
        for ctx in &mut contexts {
            if ctx.len() == window {
                ctx.drain(..window - window / 2);
            }
            ctx.push(0);
        }
    }
    let peaks: Vec<u64> = trainer
        .ranks
        .iter()
        .map(|r| r.backend.memory().peak)
        .collect();
    let mut rows = Vec::new();
    let mut out = String::new();
    writeln!(
        out,
        "dry run of generation: {} samples of up to {} tokens in passes of {batch}, {} layers, width {}, {} stages (window {window})",
        prompts.len(),
        max_tokens,
        c.model.n_layer,
        c.model.n_embd,
        c.stages,
    )?;
    writeln!(
        out,
        "rank  parameters     weights  caches+activations       peak  stages"
    )?;
    for (r, (&rest, &peak)) in at_rest.iter().zip(&peaks).enumerate() {
        let (params, stages) = rank_share(&c, &trainer, r)?;
        let transient = peak.max(rest) - rest;
        writeln!(
            out,
            "{r:>4}  {params:>10}  {:>10}  {:>18}  {:>9}  {stages}",
            bytes(rest),
            bytes(transient),
            bytes(peak.max(rest)),
        )?;
        rows.push(json!({
            "rank": r,
            "parameters": params,
            "weight_bytes": rest,
            "cache_and_activation_bytes": transient,
            "peak_bytes": peak.max(rest),
            "stages": stages,
        }));
    }
    writeln!(
        out,
        "weights: the stage's parameters alone (inference holds no gradients or optimizer \
         state); caches+activations: the most held at once beyond them, keys and values of \
         every pass in flight included; peak: both (all ranks: {}).",
        bytes(peaks.iter().zip(&at_rest).map(|(p, r)| *p.max(r)).sum())
    )?;
    match format {
        OutputFormat::Text => super::print_out(&out),
        OutputFormat::Json => super::print_out(&format!(
            "{}\n",
            json!({ "dry_run": true, "samples": prompts.len(), "max_tokens": max_tokens,
                    "batch_size": batch, "ranks": rows })
        )),
    }
}

/// Rank `r`'s parameter count and the names of its stages' layers.
fn rank_share(
    c: &TrainConfig,
    trainer: &Trainer<MetaBackend>,
    r: usize,
) -> Result<(usize, String)> {
    let params = c
        .rank_param_shapes(r)?
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();
    let own: Vec<usize> = trainer.ranks[r].stages.iter().map(|(s, _)| *s).collect();
    Ok((params, c.stage_names(&own)?))
}

/// How unevenly the ranks' step peaks spread, as the troubleshooting of a pipeline starts:
/// the heaviest and the lightest rank, and what would even them out.
struct Imbalance {
    heaviest: usize,
    lightest: usize,
    /// Heaviest peak over the lightest.
    ratio: f64,
    /// The heaviest rank's peak is mostly saved activations (else weights and optimizer state).
    activations: bool,
    peaks: (u64, u64),
}

/// The imbalance of a step over two or more ranks.
fn imbalance(ranks: &[RankReport], at_rest: &[u64]) -> Option<Imbalance> {
    if ranks.len() < 2 {
        return None;
    }
    let by_peak = |(_, r): &(usize, &RankReport)| r.peak_bytes;
    let (heaviest, h) = ranks.iter().enumerate().max_by_key(by_peak)?;
    let (lightest, l) = ranks.iter().enumerate().min_by_key(by_peak)?;
    Some(Imbalance {
        heaviest,
        lightest,
        ratio: h.peak_bytes as f64 / l.peak_bytes.max(1) as f64,
        activations: h.peak_activation_bytes > at_rest[heaviest],
        peaks: (h.peak_bytes, l.peak_bytes),
    })
}

impl Imbalance {
    /// What would even the ranks out, in one sentence.
    fn advice(&self) -> String {
        if self.ratio < 1.1 {
            "the ranks are within 10 % of each other".into()
        } else if self.activations {
            format!(
                "most of rank {}'s peak is saved activations (the early ranks of 1F1B hold the \
                 most micro-batches): --checkpoint-activations keeps only each stage's input, \
                 or a zero-bubble V (--schedule zb-v) spreads them",
                self.heaviest
            )
        } else {
            format!(
                "most of rank {}'s peak is weights, gradients and optimizer state: move layers \
                 off it (`pipit partition --method memory-capped` cuts by memory)",
                self.heaviest
            )
        }
    }

    fn line(&self) -> String {
        format!(
            "imbalance: rank {} peaks at {}, rank {} at {} ({:.2}×); {}",
            self.heaviest,
            bytes(self.peaks.0),
            self.lightest,
            bytes(self.peaks.1),
            self.ratio,
            self.advice()
        )
    }
}

/// `n` bytes in decimal units: `512 B`, `12.3 kB`, `4.56 MB`, `1.23 GB`.
pub fn bytes(n: u64) -> String {
    let x = n as f64;
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", x / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} MB", x / 1e6),
        _ => format!("{:.2} GB", x / 1e9),
    }
}

/// How the meta backends of a dry run count: as the reference and wgpu backends, as the CPU
/// backend (attention keeps a log-sum-exp per row), or as the CUDA backend (its attention on tensor cores or not), in-process ranks sharing `devices`
/// GPUs as `--backend cuda` places them (one when this machine has none).
#[derive(Clone, Copy, Debug)]
pub enum Counting {
    Plain,
    Cpu,
    Cuda { tensor_cores: bool, devices: usize },
}

impl Counting {
    /// How `backend` allocates for `config` (`auto` counts as CUDA on a machine with a GPU);
    /// a dtype the backend refuses is refused here too.
    pub fn of(backend: BackendChoice, config: &TrainConfig) -> Result<Self> {
        if backend == BackendChoice::Wgpu && config.dtype != DType::F32 {
            return Err(invalid_input!(
                "--dtype {} is not available on wgpu; use --dtype f32 or another backend",
                config.dtype
            ));
        }
        let gpus = pipit_cuda::probe().ok();
        // `auto` without CUDA counts as the CPU backend: a hardware GPU through wgpu would
        // hold the probabilities, a little more.
        Ok(match backend {
            BackendChoice::Cuda => Self::cuda(gpus)?,
            BackendChoice::Auto if gpus.is_some() => Self::cuda(gpus)?,
            BackendChoice::Auto | BackendChoice::Cpu => Counting::Cpu,
            BackendChoice::Reference | BackendChoice::Wgpu => Counting::Plain,
        })
    }

    fn cuda(gpus: Option<usize>) -> Result<Self> {
        Ok(Counting::Cuda {
            tensor_cores: pipit_cuda::tensor_core_attention()?,
            devices: gpus.unwrap_or(1).max(1),
        })
    }

    /// Rank `rank`'s meta backend.
    fn backend(self, rank: usize) -> MetaBackend {
        match self {
            Counting::Plain => MetaBackend::new(),
            Counting::Cpu => MetaBackend::like_cpu(),
            Counting::Cuda {
                tensor_cores,
                devices,
            } => MetaBackend::like_cuda(tensor_cores)
                .sharing_memory(&format!("cuda:{}", rank % devices)),
        }
    }
}

/// One step on meta backends: the trainer, each rank's bytes before it, and its report.
pub struct DryStep {
    pub trainer: Trainer<MetaBackend>,
    pub at_rest: Vec<u64>,
    pub step: StepLog,
}

impl DryStep {
    /// The largest rank's peak bytes.
    pub fn largest_peak(&self) -> u64 {
        let ranks = &self.step.report.ranks;
        ranks.iter().map(|r| r.peak_bytes).max().unwrap_or(0)
    }
}

/// Run one training step of `config` on meta backends that count as `counting` says.
pub fn dry_step(config: TrainConfig, counting: Counting) -> Result<DryStep> {
    let make = |rank| Ok(counting.backend(rank));
    let seq = config.seq_len;
    let mut trainer = Trainer::new(config, make, Init::Blank)?;
    let at_rest = trainer
        .ranks
        .iter()
        .map(|r| r.backend.memory().in_use)
        .collect();
    // The tokens do not matter: nothing is computed.
    let corpus = Corpus {
        train: vec![0; seq + 2],
        val: Vec::new(),
    };
    let step = trainer.train_step(&corpus)?;
    Ok(DryStep {
        trainer,
        at_rest,
        step,
    })
}
