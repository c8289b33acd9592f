//! Backend benchmarks (not tests): matrix-product throughput and one transformer block
//! forward + backward, on the wgpu backend and on the reference backend.
//!
//! `XDG_RUNTIME_DIR=/tmp cargo bench --bench backends` (add `WGPU_ADAPTER_NAME=llvmpipe` to
//! pick lavapipe). Each figure is the mean over repetitions after one warm-up run, timed
//! around a device synchronisation. Pass `--quick` for fewer and smaller cases, `reference`
//! for the reference backend alone.

use std::time::Instant;

use anyhow::{Context, Result};
use pipit_engine::backend::{Backend, DType, Matmul};
use pipit_engine::model::{init_parameters, Keep, ModelConfig, StageInput, StageModel};
use pipit_engine::rng::Rng;
use pipit_reference::ReferenceBackend;
use pipit_wgpu::WgpuBackend;

/// Minimum seconds of timed repetitions per figure.
const MIN_SECONDS: f64 = 1.0;

/// Mean seconds per call of `f`: one warm-up call, then repetitions until `MIN_SECONDS`
/// have passed (at least `min_reps`).
fn time<B: Backend>(b: &B, min_reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    b.synchronize()?;
    let start = Instant::now();
    let mut reps = 0;
    while reps < min_reps || start.elapsed().as_secs_f64() < MIN_SECONDS {
        f()?;
        reps += 1;
        // Bound the queue so the device never runs far behind the clock.
        b.synchronize()?;
    }
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

fn random<B: Backend>(b: &B, rng: &mut Rng, len: usize) -> Result<B::Buffer> {
    b.upload(&rng.uniform_vec(len, -1.0, 1.0))
}

/// GFLOP/s of `out[m×n] = a[m×k]·b[n×k]ᵀ + bias` (the layout of GPT-2's linear layers and
/// of the LM head).
fn matmul_gflops<B: Backend>(b: &B, m: usize, n: usize, k: usize) -> Result<f64> {
    let mut rng = Rng::new(1);
    let a = random(b, &mut rng, m * k)?;
    let w = random(b, &mut rng, n * k)?;
    let bias = random(b, &mut rng, n)?;
    let mut out = b.alloc(m * n, DType::F32)?;
    let shape = Matmul::new(m, n, k).trans_b();
    let secs = time(b, 2, || b.matmul(&mut out, &a, &w, Some(&bias), shape))?;
    Ok(shape.flops() / secs / 1e9)
}

/// Milliseconds of one transformer block's forward (keeping activations) and backward on a
/// micro-batch of `batch × seq` tokens.
fn block_ms<B: Backend>(b: &B, cfg: &ModelConfig, batch: usize, seq: usize) -> Result<f64> {
    let host = init_parameters(cfg, 7)?;
    // Layer 0 is the embedding; layer 1 is the first block.
    let mut model = StageModel::new(b, cfg, 1..2, &host)?;
    let mut rng = Rng::new(2);
    let rows = batch * seq * cfg.n_embd;
    let x = random(b, &mut rng, rows)?;
    let g = random(b, &mut rng, rows)?;
    let secs = time(b, 2, || {
        let mut input = b.alloc(rows, DType::F32)?;
        b.copy(&mut input, &x)?;
        let (_, saved) =
            model.forward(b, StageInput::Hidden(input), None, batch, seq, Keep::All)?;
        let mut dout = b.alloc(rows, DType::F32)?;
        b.copy(&mut dout, &g)?;
        model.backward(b, saved, Some(dout), 1.0)?;
        Ok(())
    })?;
    Ok(secs * 1e3)
}

/// A block configuration: name, model, micro-batch sequences and tokens per sequence.
struct BlockCase {
    name: &'static str,
    cfg: ModelConfig,
    batch: usize,
    seq: usize,
}

fn block_cases(quick: bool) -> Vec<BlockCase> {
    let mut cases = vec![BlockCase {
        name: "pipit train default (C=64, 4 heads, 2×128 tokens)",
        cfg: ModelConfig {
            vocab_size: 256,
            n_positions: 128,
            n_embd: 64,
            n_layer: 1,
            n_head: 4,
            ..ModelConfig::default()
        },
        batch: 2,
        seq: 128,
    }];
    if !quick {
        cases.push(BlockCase {
            name: "GPT-2 small block (C=768, 12 heads, 1×256 tokens)",
            cfg: ModelConfig {
                vocab_size: 256,
                n_positions: 256,
                n_embd: 768,
                n_layer: 1,
                n_head: 12,
                ..ModelConfig::default()
            },
            batch: 1,
            seq: 256,
        });
    }
    cases
}

fn run<B: Backend>(b: &B, quick: bool) -> Result<()> {
    println!("== {}", b.describe());
    let sizes: &[(usize, usize, usize)] = if quick {
        &[(256, 256, 256)]
    } else {
        &[
            (256, 256, 256),
            (512, 512, 512),
            (1024, 1024, 1024),
            (4096, 768, 3072),
        ]
    };
    for &(m, n, k) in sizes {
        let g = matmul_gflops(b, m, n, k).with_context(|| format!("matmul {m}x{n}x{k}"))?;
        println!("matmul m={m} n={n} k={k}: {g:.2} GFLOP/s");
    }
    for case in block_cases(quick) {
        let ms = block_ms(b, &case.cfg, case.batch, case.seq)
            .with_context(|| format!("block {}", case.name))?;
        println!("block fwd+bwd, {}: {ms:.1} ms", case.name);
    }
    Ok(())
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    if !std::env::args().any(|a| a == "reference") {
        run(&WgpuBackend::new()?, quick)?;
    }
    run(&ReferenceBackend::new(), quick)?;
    Ok(())
}
