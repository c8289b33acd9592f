//! How far a training recipe's result moves under perturbations that should not matter: the
//! same run three times on the reference backend, side by side, as given (f32), with every
//! initial weight nudged by one part in a million, and in bf16 mixed precision. A recipe whose
//! validation loss moves as much under the nudge as under bf16 cannot tell the two apart:
//! its result is chaotic, and comparing precisions (or backends) on it says nothing.
//!
//! Run: `cargo run --release --example sensitivity [-- CONFIG.toml]`, CONFIG in the format of
//! `pipit train --config` (default: the recipe of BENCHMARKS.md's table, [`recipe`]). Evaluates
//! every `eval_every` steps (200 when 0).

use std::sync::Arc;

use anyhow::{Context, Result};
use pipit::engine::backend::DType;
use pipit::engine::data::Corpus;
use pipit::engine::model::HostTensors;
use pipit::engine::train::{Init, TrainConfig, Trainer};
use pipit::reference::ReferenceBackend;

/// Relative size of the nudge to the initial weights.
const NUDGE: f32 = 1e-6;

/// A number in [-0.5, 0.5) fixed by a parameter's name and element index, so the two copies
/// of the tied embedding get the same nudge.
fn noise(name: &str, i: usize) -> f32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain(i.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// Validation losses of `config` every `every` steps, the initial weights nudged when asked.
fn run(
    name: &str,
    config: TrainConfig,
    nudge: bool,
    every: u64,
    corpus: &Corpus,
) -> Result<Vec<f64>> {
    let mut trainer = Trainer::new(config, |_| Ok(ReferenceBackend::new()), Init::Fresh)?;
    if nudge {
        for rank in &mut trainer.ranks {
            for (_, model) in &mut rank.stages {
                let mut host: HostTensors = model.download_params(&rank.backend)?;
                let names: Vec<String> = host.names().map(str::to_string).collect();
                for name in names {
                    let t = host.get_mut(&name).context("a listed tensor")?;
                    for (i, x) in t.data.iter_mut().enumerate() {
                        *x *= 1.0 + NUDGE * noise(&name, i);
                    }
                }
                model.load_params(&rank.backend, &host)?;
            }
        }
    }
    let (seq, tokens) = (trainer.config.seq_len, trainer.config.eval_tokens);
    let mut losses = Vec::new();
    while trainer.step < trainer.config.steps {
        trainer.train_step(corpus)?;
        if trainer.step % every == 0 || trainer.step == trainer.config.steps {
            let loss = trainer.evaluate(&corpus.val, seq, tokens)?.0;
            eprintln!("{name}: step {}, validation loss {loss:.4}", trainer.step);
            losses.push(loss);
        }
    }
    Ok(losses)
}

/// The run BENCHMARKS.md's sensitivity table measured: `pipit train`'s defaults but a width-64
/// model on 64-byte sequences, 1,200 steps at lr 3e-3 with 60 warm-up steps.
fn recipe() -> TrainConfig {
    let defaults = TrainConfig::default();
    TrainConfig {
        model: pipit::engine::model::ModelConfig {
            n_embd: 64,
            n_positions: 64,
            ..defaults.model.clone()
        },
        seq_len: 64,
        steps: 1200,
        lr: 3e-3,
        warmup_steps: 60,
        eval_every: 200,
        ..defaults
    }
}

fn main() -> Result<()> {
    let config = match std::env::args().nth(1) {
        Some(path) => {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            toml::from_str(&text).with_context(|| format!("parsing {path}"))?
        }
        None => recipe(),
    };
    config.validate()?;
    let every = if config.eval_every == 0 {
        200
    } else {
        config.eval_every
    };
    let corpus = Arc::new(Corpus::split(
        include_bytes!("../data/shakespeare.txt"),
        0.1,
    )?);
    let variants = [
        (
            "f32",
            TrainConfig {
                dtype: DType::F32,
                ..config.clone()
            },
            false,
        ),
        (
            "f32, nudged",
            TrainConfig {
                dtype: DType::F32,
                ..config.clone()
            },
            true,
        ),
        (
            "bf16",
            TrainConfig {
                dtype: DType::BF16,
                ..config.clone()
            },
            false,
        ),
    ];
    println!(
        "lr {} (min {}), {} steps, seed {}, p={} m={}: three runs side by side",
        config.lr, config.min_lr, config.steps, config.seed, config.stages, config.microbatches
    );
    let results: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = variants
            .iter()
            .map(|(name, c, nudge)| {
                let corpus = corpus.clone();
                s.spawn(move || run(name, c.clone(), *nudge, every, &corpus))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a run panicked"))
            .collect::<Result<_>>()
    })?;
    println!(
        "{:>6} {:>10} {:>12} {:>10}",
        "step", "f32", "f32, nudged", "bf16"
    );
    for (i, f32_loss) in results[0].iter().enumerate() {
        let step = ((i as u64 + 1) * every).min(config.steps);
        println!(
            "{step:>6} {f32_loss:>10.4} {:>12.4} {:>10.4}",
            results[1][i], results[2][i]
        );
    }
    let last = |r: &Vec<f64>| *r.last().unwrap_or(&f64::NAN);
    let (base, nudged, bf16) = (last(&results[0]), last(&results[1]), last(&results[2]));
    println!(
        "final validation loss: nudged {:+.2} %, bf16 {:+.2} % against f32 ({base:.4})",
        100.0 * (nudged / base - 1.0),
        100.0 * (bf16 / base - 1.0)
    );
    Ok(())
}
