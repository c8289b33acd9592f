//! `pipit train --dry-run`: one training step of the run the flags describe, on the meta
//! backend (sizes only), and the memory each rank would hold.

use std::path::Path;

use anyhow::{Context, Result};
use pipit_engine::data::Corpus;
use pipit_engine::train::{Init, StepLog, TrainConfig, Trainer};
use pipit_engine::Backend;
use pipit_meta::MetaBackend;
use serde_json::json;

use super::device::BackendChoice;

/// Run one step of `config` on meta backends that count as `backend` would, and print each
/// rank's stages, parameters and memory; with `log_json`, write the figures there too, as one
/// JSON object.
pub fn run(config: TrainConfig, backend: BackendChoice, log_json: Option<&Path>) -> Result<()> {
    let like_cuda = counts_like_cuda(backend);
    let c = config.clone();
    let DryStep {
        trainer,
        at_rest,
        step,
    } = dry_step(config, like_cuda)?;
    println!(
        "dry run of one step: {} layers, width {}, {} parameters | {} schedule, p={} m={} v={}, batch {}×{} tokens, {}{}",
        c.model.n_layer,
        c.model.n_embd,
        c.model.num_parameters(),
        c.schedule,
        c.stages,
        c.microbatches,
        c.chunks,
        c.batch_size,
        c.seq_len,
        c.dtype,
        if c.checkpoint_activations {
            ", activations checkpointed"
        } else {
            ""
        }
    );
    println!(
        "bytes as the {} backend allocates them (nothing was allocated or computed)",
        if like_cuda {
            "CUDA"
        } else {
            "reference or wgpu"
        }
    );
    println!("rank  parameters     at rest  held for backward  step peak  stages");
    let mut rows = Vec::new();
    for (r, (rank, line)) in step.report.ranks.iter().zip(trainer.describe()).enumerate() {
        let params: usize = c
            .rank_param_shapes(r)?
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        // "rank r: <device> | stage ..., stage ...": the stages.
        let stages = line.rsplit_once(" | ").map_or("", |(_, s)| s);
        let held = format!(
            "{} ({})",
            bytes(rank.peak_activation_bytes),
            rank.peak_inflight
        );
        println!(
            "{r:>4}  {params:>10}  {:>10}  {held:>17}  {:>9}  {stages}",
            bytes(at_rest[r]),
            bytes(rank.peak_bytes)
        );
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
    println!(
        "at rest: weights, gradients and optimizer state; held for backward: saved activations \
         at their peak (micro-batches); step peak: the most held at once, transient buffers \
         included (all ranks: {}). A GPU adds its libraries' workspaces and its allocator's \
         rounding.",
        bytes(total)
    );
    if let Some(path) = log_json {
        let line = json!({ "dry_run": true, "config": c, "ranks": rows });
        std::fs::write(path, format!("{line}\n"))
            .with_context(|| format!("writing --log-json {}", path.display()))?;
    }
    Ok(())
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

/// Whether `backend` allocates as the CUDA backend does (`auto` on a machine with a GPU).
pub fn counts_like_cuda(backend: BackendChoice) -> bool {
    match backend {
        BackendChoice::Cuda => true,
        BackendChoice::Auto => pipit_cuda::probe().is_ok(),
        BackendChoice::Reference | BackendChoice::Wgpu => false,
    }
}

/// One step on meta backends: the trainer, each rank's bytes before it, and its report.
pub struct DryStep {
    pub trainer: Trainer<MetaBackend>,
    pub at_rest: Vec<u64>,
    pub step: StepLog,
}

/// Run one training step of `config` on meta backends (counting as CUDA's when `like_cuda`).
pub fn dry_step(config: TrainConfig, like_cuda: bool) -> Result<DryStep> {
    let make = |_| {
        Ok(if like_cuda {
            MetaBackend::like_cuda()
        } else {
            MetaBackend::new()
        })
    };
    let seq = config.seq_len;
    let mut trainer = Trainer::new(config, make, Init::Fresh)?;
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
