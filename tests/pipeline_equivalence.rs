//! The test that defines pipit's correctness: pipelined training under every schedule, for
//! p ∈ {1, 2, 4}, with and without activation checkpointing, gives the same losses and
//! parameters as single-device training of the same batches (f32: loss within 1e-5 relative,
//! parameters within 1e-4), for GPT-2 and for Llama with grouped-query attention and an untied
//! head.

use pipit::engine::data::{sample_batch, Batch};
use pipit::engine::exec::{self, in_process_mesh_over, Rank, StepOptions, DEFAULT_RECV_TIMEOUT};
use pipit::engine::model::{
    init_parameters, AdamWConfig, Family, HostTensors, Keep, ModelConfig, StageInput, StageModel,
    StageOutput,
};
use pipit::engine::train::TrainConfig;
use pipit::engine::Backend;
use pipit::reference::ReferenceBackend;

const STEPS: u32 = 3;
const LR: f32 = 1e-3;

fn model() -> ModelConfig {
    // Eight layers (embedding, six blocks, head), so p = 4 with v = 2 chunks fits.
    ModelConfig {
        vocab_size: 61,
        n_positions: 12,
        n_embd: 16,
        n_layer: 6,
        n_head: 2,
        ..ModelConfig::default()
    }
}

/// Llama of the same depth: four query heads sharing two key/value heads, rotary positions at
/// θ = 500,000 (Llama 3's), a SwiGLU of width 40, an untied head.
fn llama() -> ModelConfig {
    ModelConfig {
        family: Family::Llama,
        n_head: 4,
        n_kv_head: Some(2),
        ffn_dim: Some(40),
        rope_theta: Some(500_000.0),
        ..model()
    }
}

fn batches() -> Vec<Batch> {
    let text: Vec<u8> =
        b"To be, or not to be, that is the question: whether 'tis nobler in the mind"
            .iter()
            .map(|b| b % 61)
            .collect();
    (1..=STEPS as u64)
        .map(|s| sample_batch(&text, 8, 10, 5, s).unwrap())
        .collect()
}

/// AdamW with decay, clipping the global gradient norm to `grad_clip` (0: no clipping).
fn adamw(grad_clip: f32) -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.1,
        grad_clip,
        ..AdamWConfig::default()
    }
}

/// Losses, final parameters and (when clipping) gradient norms of a training run.
type Run = (Vec<f32>, HostTensors, Vec<Option<f64>>);

/// Plain training on one device: the whole model as one stage, each batch as one micro-batch;
/// with `clip` > 0 the gradient norm is taken on the host and the update scaled down to it.
fn single_device<B: Backend>(backend: &B, cfg: &ModelConfig, host: &HostTensors, clip: f32) -> Run {
    let mut stage = StageModel::new(backend, cfg, 0..cfg.n_layer + 2, host).unwrap();
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for (i, b) in batches().iter().enumerate() {
        let tokens = backend.upload_u32(&b.inputs).unwrap();
        let targets = backend.upload_u32(&b.targets).unwrap();
        let (out, saved) = stage
            .forward(
                backend,
                StageInput::Tokens(&tokens),
                Some(&targets),
                b.batch,
                b.seq,
                Keep::All,
            )
            .unwrap();
        let StageOutput::Loss { losses: l } = out else {
            panic!("the head returns losses")
        };
        let l = backend.download(&l).unwrap();
        losses.push((l.iter().map(|&x| x as f64).sum::<f64>() / l.len() as f64) as f32);
        let scale = 1.0 / (b.batch * b.seq) as f32;
        assert!(stage
            .backward(backend, saved, None, scale)
            .unwrap()
            .is_none());
        let mut grad_scale = 1.0;
        if clip > 0.0 {
            let grads = stage.download_grads(backend).unwrap();
            let squares: f64 = grads
                .iter()
                .flat_map(|(_, t)| &t.data)
                .map(|&g| f64::from(g) * f64::from(g))
                .sum();
            norms.push(Some(squares.sqrt()));
            grad_scale = exec::clip_scale(squares.sqrt(), clip);
        } else {
            norms.push(None);
        }
        stage
            .optimizer_step_scaled(backend, LR, i as u32 + 1, &adamw(clip), grad_scale)
            .unwrap();
        stage.zero_grads(backend).unwrap();
    }
    (losses, stage.download_params(backend).unwrap(), norms)
}

/// The same training through the executor with a schedule, `p` ranks and `v` chunks.
#[allow(clippy::too_many_arguments)]
fn pipelined<B: Backend>(
    make: &dyn Fn() -> B,
    cfg: &ModelConfig,
    host: &HostTensors,
    schedule: &str,
    p: usize,
    v: usize,
    checkpoint_activations: bool,
    clip: f32,
) -> Run {
    let config = TrainConfig {
        model: cfg.clone(),
        schedule: schedule.parse().unwrap(),
        stages: p,
        chunks: v,
        microbatches: 4,
        batch_size: 8,
        seq_len: 10,
        ..TrainConfig::default()
    };
    let plan = config.plan().unwrap();
    let ranges = config.stage_layers().unwrap();
    // Tensors go between ranks as the trainer sends them: handed over as buffers where the
    // backends share memory (reference, stages on one GPU), staged through the host otherwise.
    let backends: Vec<_> = (0..p).map(|_| make()).collect();
    let spaces: Vec<_> = backends.iter().map(|b| b.memory_space()).collect();
    let mut ranks: Vec<_> = in_process_mesh_over(&spaces, DEFAULT_RECV_TIMEOUT)
        .into_iter()
        .zip(backends)
        .enumerate()
        .map(|(r, (transport, backend))| {
            let stages = plan
                .stages_of(r)
                .into_iter()
                .map(|s| {
                    (
                        s,
                        StageModel::new(&backend, &config.model, ranges[s].clone(), host).unwrap(),
                    )
                })
                .collect();
            Rank {
                rank: r,
                backend,
                transport,
                stages,
            }
        })
        .collect();
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for (i, b) in batches().iter().enumerate() {
        let opts = StepOptions {
            checkpoint_activations,
            lr: LR,
            step: i as u32 + 1,
            adamw: adamw(clip),
        };
        let report = exec::train_step(&plan, &mut ranks, b, &opts).unwrap();
        losses.push(report.loss);
        norms.push(report.grad_norm);
    }
    let mut params = HostTensors::new();
    for rank in &ranks {
        for (_, stage) in &rank.stages {
            let got = stage.download_params(&rank.backend).unwrap();
            // Both copies of the tied embedding must have stayed identical.
            for (name, t) in got.iter() {
                if let Some(seen) = params.get(name) {
                    assert!(
                        seen == t,
                        "{schedule} p={p} v={v}: the copies of {name} differ"
                    );
                }
            }
            params.extend(got);
        }
    }
    (losses, params, norms)
}

/// The tolerances of pipit's correctness: each step's loss within 1e-5 relative, every
/// parameter within 1e-4.
fn same_training(label: &str, got: (&[f32], &HostTensors), want: (&[f32], &HostTensors)) {
    for (step, (got, want)) in got.0.iter().zip(want.0).enumerate() {
        let rel = ((got - want) / want).abs();
        assert!(
            rel <= 1e-5,
            "{label} step {}: loss {got} vs {want}",
            step + 1
        );
    }
    assert_eq!(got.1.len(), want.1.len(), "{label}: parameter count");
    for (name, want) in want.1.iter() {
        let got = got
            .1
            .get(name)
            .unwrap_or_else(|| panic!("{label}: {name} missing"));
        let worst = got
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-4, "{label}: {name} differs by {worst}");
    }
}

fn check_all<B: Backend>(make: &dyn Fn() -> B, cfg: &ModelConfig) {
    let host = init_parameters(cfg, 42).unwrap();
    let (want_losses, want_params, _) = single_device(&make(), cfg, &host, 0.0);
    assert!(
        want_losses[2] < want_losses[0],
        "training lowers the loss: {want_losses:?}"
    );
    for (name, start) in host.iter() {
        let end = &want_params.get(name).unwrap().data;
        let moved = end
            .iter()
            .zip(&start.data)
            .any(|(a, b)| (a - b).abs() > 1e-4);
        assert!(moved, "three steps move {name} by more than the tolerance");
    }
    let cases = [
        ("naive", 1),
        ("gpipe", 1),
        ("1f1b", 1),
        ("interleaved", 2),
        ("zb-h1", 1),
        ("zb-h1", 2),
        ("zb-v", 2),
        ("dualpipev", 2),
    ];
    for (schedule, v) in cases {
        for p in [1, 2, 4] {
            // DualPipeV needs two micro-batches per rank (m = 4 here).
            if schedule == "dualpipev" && 2 * p > 4 {
                continue;
            }
            for ckpt in [false, true] {
                let label = format!("{} {schedule} p={p} v={v} checkpoint={ckpt}", cfg.family);
                let (losses, params, _) = pipelined(make, cfg, &host, schedule, p, v, ckpt, 0.0);
                same_training(&label, (&losses, &params), (&want_losses, &want_params));
            }
        }
    }
}

/// Splitting backward moves work in time, not arithmetic: zero bubble's deferred weight
/// gradients accumulate in the same order as the backwards of the order it splits (1F1B, or
/// interleaved with chunks), so the two agree to the bit. So does the V, which moves stages
/// between ranks as well: each stage still sums its micro-batches in order.
#[test]
fn zero_bubble_is_1f1b_to_the_bit() {
    for cfg in [model(), llama()] {
        let host = init_parameters(&cfg, 42).unwrap();
        for (zb, base, p, v) in [
            ("zb-h1", "1f1b", 4, 1),
            ("zb-h1", "interleaved", 2, 2),
            ("zb-v", "interleaved", 2, 2),
            ("zb-v", "interleaved", 4, 2),
        ] {
            for ckpt in [false, true] {
                let make = ReferenceBackend::new;
                let (zb_losses, zb_params, _) = pipelined(&make, &cfg, &host, zb, p, v, ckpt, 0.0);
                let (losses, params, _) = pipelined(&make, &cfg, &host, base, p, v, ckpt, 0.0);
                assert_eq!(zb_losses, losses, "{zb} against {base} checkpoint={ckpt}");
                for (name, want) in params.iter() {
                    assert_eq!(zb_params.get(name).unwrap().data, want.data, "{name}");
                }
            }
        }
    }
}

/// Clipping to a global norm: every schedule finds the norm one device finds on the host (the
/// tied embedding's two copies counted once) and takes the same clipped steps; a threshold
/// above the norm changes nothing, to the bit.
#[test]
fn clipping_uses_the_global_norm_on_every_schedule() {
    let cfg = model();
    let host = init_parameters(&cfg, 42).unwrap();
    let make = ReferenceBackend::new;
    let (want_losses, want_params, want_norms) = single_device(&make(), &cfg, &host, 0.05);
    let norms: Vec<f64> = want_norms.iter().map(|n| n.unwrap()).collect();
    assert!(
        norms.iter().all(|&n| n > 0.2),
        "the threshold clips every step: {norms:?}"
    );
    let (unclipped, _, _) = single_device(&make(), &cfg, &host, 0.0);
    assert!(unclipped[2] != want_losses[2], "clipping changes the run");
    for (schedule, p, v) in [
        ("1f1b", 4, 1),
        ("interleaved", 2, 2),
        ("zb-h1", 4, 1),
        ("zb-h1", 2, 2),
        ("zb-v", 2, 2),
    ] {
        let label = format!("{schedule} p={p} v={v}");
        let (losses, params, got_norms) =
            pipelined(&make, &cfg, &host, schedule, p, v, false, 0.05);
        for (got, want) in got_norms.iter().zip(&norms) {
            let got = got.expect("the report carries the norm");
            assert!(
                (got / want - 1.0).abs() < 1e-5,
                "{label}: norm {got} vs {want}"
            );
        }
        same_training(&label, (&losses, &params), (&want_losses, &want_params));
    }
    let (loose, loose_params, _) = pipelined(&make, &cfg, &host, "1f1b", 4, 1, false, 1e9);
    let (plain, plain_params, plain_norms) =
        pipelined(&make, &cfg, &host, "1f1b", 4, 1, false, 0.0);
    assert_eq!(loose, plain);
    assert_eq!(loose_params, plain_params);
    assert!(plain_norms.iter().all(Option::is_none));
}

#[test]
fn every_schedule_trains_like_one_device_on_reference() {
    check_all(&ReferenceBackend::new, &model());
}

#[test]
fn every_schedule_trains_llama_like_one_device_on_reference() {
    check_all(&ReferenceBackend::new, &llama());
}

#[test]
fn every_schedule_trains_like_one_device_on_cpu() {
    check_all(&pipit::cpu::CpuBackend::new, &model());
}

#[test]
fn every_schedule_trains_llama_like_one_device_on_cpu() {
    check_all(&pipit::cpu::CpuBackend::new, &llama());
}

/// Ranks sharing one memory space, as stages on one GPU: tensors are handed over as buffers.
#[test]
fn every_schedule_trains_like_one_device_with_buffers_handed_over() {
    check_all(&|| ReferenceBackend::sharing_memory("host"), &model());
    check_all(&|| ReferenceBackend::sharing_memory("host"), &llama());
}

/// Skipped, with the reason on stderr, where CUDA is not usable (a failure instead with
/// `PIPIT_REQUIRE_CUDA` set, as on GPU machines).
#[test]
fn every_schedule_trains_like_one_device_on_cuda() {
    if let Err(why) = pipit::cuda::probe() {
        assert!(
            std::env::var_os("PIPIT_REQUIRE_CUDA").is_none(),
            "PIPIT_REQUIRE_CUDA is set, but CUDA is not usable: {why}"
        );
        eprintln!("skipped: CUDA is not usable here: {why}");
        return;
    }
    let make = || pipit::cuda::CudaBackend::new(0).expect("CUDA is usable, so its backend opens");
    check_all(&make, &model());
    check_all(&make, &llama());
}

#[test]
fn every_schedule_trains_like_one_device_on_wgpu() {
    check_all(
        &|| pipit::wgpu::WgpuBackend::new().expect("a wgpu adapter (lavapipe in CI)"),
        &model(),
    );
}

#[test]
fn every_schedule_trains_llama_like_one_device_on_wgpu() {
    check_all(
        &|| pipit::wgpu::WgpuBackend::new().expect("a wgpu adapter (lavapipe in CI)"),
        &llama(),
    );
}
