//! Measured activation memory follows the schedule: per rank, the executor's peak of saved
//! activations under GPipe and under 1F1B (p = 4, m = 8) stand in the ratio the simulator
//! predicts, zero bubble (ZB-H1 and the V) holds as many micro-batches as the simulator says,
//! and activation checkpointing lowers them.

use pipit::engine::data::sample_batch;
use pipit::engine::exec::{self, StepOptions};
use pipit::engine::model::{AdamWConfig, ModelConfig};
use pipit::engine::sim::{simulate, Costs};
use pipit::engine::train::{Init, TrainConfig, Trainer};
use pipit::reference::ReferenceBackend;

/// Per rank: measured peak activation bytes, the simulator's prediction for the same plan
/// (fed the measured bytes of one micro-batch), and the measured and simulated peak counts of
/// micro-batches held.
struct Measured {
    bytes: Vec<u64>,
    predicted: Vec<f64>,
    held: Vec<usize>,
    held_predicted: Vec<usize>,
}

/// One step of `schedule` (with its own default chunks per rank), measured beside its
/// simulation.
fn measure(schedule: &str, checkpoint_activations: bool) -> Measured {
    let chunks = schedule
        .parse::<pipit::engine::schedule::ScheduleKind>()
        .unwrap()
        .default_chunks();
    let config = TrainConfig {
        model: ModelConfig {
            vocab_size: 64,
            n_positions: 16,
            n_embd: 16,
            n_layer: 6,
            n_head: 2,
            ..ModelConfig::default()
        },
        schedule: schedule.parse().unwrap(),
        stages: 4,
        chunks,
        microbatches: 8,
        batch_size: 16,
        seq_len: 16,
        ..TrainConfig::default()
    };
    let mut trainer =
        Trainer::new(config.clone(), |_| Ok(ReferenceBackend::new()), Init::Fresh).unwrap();
    let text: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 64) as u8).collect();
    let batch = sample_batch(&text, 16, 16, 1, 1).unwrap();
    let opts = StepOptions {
        checkpoint_activations,
        lr: 1e-3,
        step: 1,
        adamw: AdamWConfig::default(),
    };
    let report = exec::train_step(&trainer.schedule, &mut trainer.ranks, &batch, &opts).unwrap();
    let measured: Vec<u64> = report
        .ranks
        .iter()
        .map(|r| r.peak_activation_bytes)
        .collect();
    // What one micro-batch keeps on each rank, as the executor measured it.
    let per_microbatch: Vec<f64> = trainer
        .schedule
        .placement
        .iter()
        .map(|&r| {
            report.ranks[r].peak_activation_bytes as f64 / report.ranks[r].peak_inflight as f64
        })
        .collect();
    let costs = Costs {
        activation_bytes: per_microbatch,
        ..Costs::uniform(4 * chunks)
    };
    let sim = simulate(&trainer.schedule, &costs).unwrap();
    Measured {
        bytes: measured,
        predicted: sim.ranks.iter().map(|r| r.peak_activation_bytes).collect(),
        held: report.ranks.iter().map(|r| r.peak_inflight).collect(),
        held_predicted: sim.ranks.iter().map(|r| r.peak_activations).collect(),
    }
}

#[test]
fn gpipe_and_1f1b_memory_stand_in_the_simulated_ratio() {
    let gpipe_run = measure("gpipe", false);
    let ofob_run = measure("1f1b", false);
    let (gpipe, gpipe_sim) = (gpipe_run.bytes, gpipe_run.predicted);
    let (ofob, ofob_sim) = (ofob_run.bytes, ofob_run.predicted);
    for rank in 0..4 {
        let measured = gpipe[rank] as f64 / ofob[rank] as f64;
        let predicted = gpipe_sim[rank] / ofob_sim[rank];
        assert!(
            (measured / predicted - 1.0).abs() <= 0.10,
            "rank {rank}: measured GPipe/1F1B ratio {measured:.3}, simulated {predicted:.3}"
        );
    }
    // 1F1B keeps min(p - s, m) micro-batches: 4, 3, 2, 1 on p = 4; GPipe keeps all 8.
    let ratios: Vec<f64> = (0..4).map(|r| gpipe[r] as f64 / ofob[r] as f64).collect();
    for (rank, want) in [2.0, 8.0 / 3.0, 4.0, 8.0].iter().enumerate() {
        assert!(
            (ratios[rank] - want).abs() < 1e-9,
            "rank {rank}: ratio {}",
            ratios[rank]
        );
    }
}

/// Zero bubble keeps a micro-batch from its forward until its weight gradient: every rank
/// holds min(p, m) = 4 at its peak, as simulated, where 1F1B's ranks hold 4, 3, 2, 1. Rank 0
/// reaches its peak before any backward, so it holds exactly 1F1B's bytes there.
#[test]
fn zero_bubble_holds_what_the_simulator_says() {
    let zb = measure("zb-h1", false);
    let ofob = measure("1f1b", false);
    assert_eq!(zb.held, vec![4, 4, 4, 4]);
    assert_eq!(zb.held_predicted, zb.held);
    assert_eq!(ofob.held, vec![4, 3, 2, 1]);
    assert_eq!(zb.bytes[0], ofob.bytes[0]);
    for rank in 1..4 {
        assert!(zb.bytes[rank] > ofob.bytes[rank], "rank {rank}");
    }
}

/// The V holds each micro-batch's chunk from forward to weight gradient too: every rank holds
/// at most 2p = 8 chunks (p micro-batches of its whole share of layers), as simulated.
#[test]
fn zero_bubble_v_holds_what_the_simulator_says() {
    let v = measure("zb-v", false);
    assert_eq!(v.held, vec![8, 8, 8, 8]);
    assert_eq!(v.held_predicted, v.held);
}

#[test]
fn activation_checkpointing_lowers_peak_activation_memory() {
    for schedule in ["gpipe", "1f1b"] {
        let full = measure(schedule, false).bytes;
        let kept = measure(schedule, true).bytes;
        for rank in 0..4 {
            assert!(
                kept[rank] * 2 < full[rank],
                "{schedule} rank {rank}: {} bytes with checkpointing vs {} without",
                kept[rank],
                full[rank]
            );
        }
    }
}
