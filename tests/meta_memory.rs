//! The meta backend (sizes, no contents, no compute) counts a training step's memory as the
//! reference backend does, rank by rank, to the byte: for every schedule, with and without
//! activation checkpointing, in f32 and bf16, and with stages handing buffers over as on one
//! GPU. That is what makes `pipit train --dry-run`'s figures the ones a run would measure.

use std::time::Duration;

use pipit::engine::backend::{Backend, Transport};
use pipit::engine::data::Corpus;
use pipit::engine::exec::in_process_mesh_over;
use pipit::engine::model::ModelConfig;
use pipit::engine::train::{Init, TrainConfig, Trainer};
use pipit::meta::MetaBackend;
use pipit::reference::ReferenceBackend;

/// Per rank: bytes held after building the stages, then the peak of one training step.
fn memory<B: Backend>(config: &TrainConfig, make: impl Fn() -> B) -> (Vec<u64>, Vec<u64>) {
    let mut trainer = Trainer::new(config.clone(), |_| Ok(make()), Init::Fresh).unwrap();
    let held = trainer
        .ranks
        .iter()
        .map(|r| r.backend.memory().in_use)
        .collect();
    let text: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 251) as u8).collect();
    let corpus = Corpus::split(&text, 0.1).unwrap();
    let log = trainer.train_step(&corpus).unwrap();
    let peaks = log.report.ranks.iter().map(|r| r.peak_bytes).collect();
    (held, peaks)
}

#[test]
fn meta_memory_is_the_reference_backends_to_the_byte() {
    let model = ModelConfig {
        vocab_size: 256,
        n_positions: 32,
        n_embd: 32,
        n_layer: 6,
        n_head: 2,
        ..ModelConfig::default()
    };
    for (schedule, chunks) in [
        ("naive", 1),
        ("gpipe", 1),
        ("1f1b", 1),
        ("interleaved", 2),
        ("zb-h1", 1),
        ("zb-v", 2),
    ] {
        for (checkpoint_activations, dtype, clip) in [
            (false, "f32", 0.0),
            (true, "f32", 1.0),
            (false, "bf16", 0.0),
        ] {
            let config = TrainConfig {
                model: model.clone(),
                schedule: schedule.parse().unwrap(),
                stages: 2,
                chunks,
                microbatches: 4,
                batch_size: 8,
                seq_len: 32,
                checkpoint_activations,
                dtype: dtype.parse().unwrap(),
                grad_clip: clip,
                ..TrainConfig::default()
            };
            let what = format!("{schedule}, checkpointing {checkpoint_activations}, {dtype}");
            let want = memory(&config, ReferenceBackend::new);
            let got = memory(&config, MetaBackend::new);
            assert_eq!(
                got, want,
                "{what}: (held after building, step peak) per rank"
            );
            assert!(want.1.iter().zip(&want.0).all(|(p, h)| p > h), "{what}");
        }
    }
}

/// Like the CUDA backend, bf16 attention on tensor cores keeps a log-sum-exp per query row
/// (head size 16 here) instead of the probabilities: less memory at the peak than the
/// reference backend's; through cuBLAS it needs scratch beside them: more.
#[test]
fn meta_like_cuda_keeps_less_for_bf16_attention() {
    let config = TrainConfig {
        model: ModelConfig {
            vocab_size: 256,
            n_positions: 256,
            n_embd: 32,
            n_layer: 2,
            n_head: 2,
            ..ModelConfig::default()
        },
        stages: 1,
        microbatches: 1,
        batch_size: 2,
        seq_len: 256,
        schedule: "gpipe".parse().unwrap(),
        dtype: "bf16".parse().unwrap(),
        ..TrainConfig::default()
    };
    let (held, reference) = memory(&config, MetaBackend::new);
    let (_, cuda) = memory(&config, || MetaBackend::like_cuda(true));
    // Per block: [2 sequences, 2 heads, 256, 256] bf16 probabilities against 2·2·256 f32
    // rows.
    let probabilities = 2 * 2 * 256 * 256 * 2;
    let rows = 2 * 2 * 256 * 4;
    assert!(reference[0] > held[0]);
    assert_eq!(reference[0] - cuda[0], 2 * (probabilities - rows) as u64);
    // Through cuBLAS the probabilities stay, and the f32 scores and per-head copies of the
    // op's scratch come on top at its peak.
    let (_, cublas) = memory(&config, || MetaBackend::like_cuda(false));
    assert!(cublas[0] > reference[0], "{cublas:?} {reference:?}");
}

/// Stages on one GPU hand tensors over as device buffers. The copy leaves the sender's meter
/// when sent and joins the receiver's when received, so each meter moves only in its own
/// rank's order: a rank's peak is the same on every run, and the meta backend's.
#[test]
fn handed_over_buffers_count_for_their_holder_alone() {
    let (a, b) = (
        ReferenceBackend::sharing_memory("gpu"),
        ReferenceBackend::sharing_memory("gpu"),
    );
    let space = Some("gpu".to_string());
    let mut mesh = in_process_mesh_over(&[space.clone(), space], Duration::from_secs(5));
    let x = a.upload(&[1.5; 1000]).unwrap();
    let (a0, b0) = (a.memory().in_use, b.memory().in_use);
    mesh[0].send(&a, 1, &x).unwrap();
    assert_eq!(a.memory().in_use, a0, "sent: no longer the sender's");
    assert_eq!(
        a.memory().peak,
        a0 + 4000,
        "the sender counted the copy it made"
    );
    assert_eq!(b.memory().in_use, b0, "in flight: nobody's");
    let y = mesh[1].recv(&b, 0, 1000).unwrap();
    assert_eq!(b.memory().in_use, b0 + 4000, "received: the receiver's");
    assert_eq!(b.download(&y).unwrap(), vec![1.5; 1000]);
    drop(y);
    assert_eq!((a.memory().in_use, b.memory().in_use), (a0, b0));

    let config = TrainConfig {
        model: ModelConfig {
            vocab_size: 256,
            n_positions: 32,
            n_embd: 32,
            n_layer: 4,
            n_head: 2,
            ..ModelConfig::default()
        },
        stages: 4,
        microbatches: 8,
        batch_size: 8,
        seq_len: 32,
        ..TrainConfig::default()
    };
    let want = memory(&config, || ReferenceBackend::sharing_memory("gpu"));
    for _ in 0..4 {
        assert_eq!(
            memory(&config, || MetaBackend::new().sharing_memory("gpu")),
            want
        );
    }
}

/// `generate` and `eval` build stages holding the weights alone: a quarter of what a training
/// stage holds at rest (weights, gradients, two AdamW moments), for GPT-2 124M's shape and a
/// Llama of the same width. Decoding then adds the cache and one step's activations.
#[test]
fn inference_holds_no_training_state() {
    use pipit::engine::model::{Family, HostTensors, StageInput, StageModel};
    let gpt2 = ModelConfig {
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
        ..ModelConfig::default()
    };
    let llama = ModelConfig {
        family: Family::Llama,
        vocab_size: 32000,
        n_kv_head: Some(4),
        ffn_dim: Some(2048),
        ..gpt2.clone()
    };
    for model in [gpt2, llama] {
        let mut host = HostTensors::new();
        for (name, shape) in model.all_params() {
            let len = shape.iter().product();
            host.insert(name, shape, vec![0.0; len]).unwrap();
        }
        let layers = 0..model.n_layer + 2;
        let weights = 4 * model.num_parameters() as u64;
        let b = MetaBackend::new();
        let trained = StageModel::new(&b, &model, layers.clone(), &host).unwrap();
        assert_eq!(
            b.memory().in_use,
            4 * weights,
            "{}: a training stage",
            model.family
        );
        drop(trained);
        let b = MetaBackend::new();
        let stage = StageModel::for_inference(&b, &model, layers, &host).unwrap();
        assert_eq!(
            b.memory().in_use,
            weights,
            "{}: an inference stage",
            model.family
        );
        let mut cache = stage.kv_cache(&b, 4, 1024).unwrap();
        let cache_bytes = b.memory().in_use - weights;
        assert_eq!(cache_bytes, (4 * 1024 * 2 * 768 * 4 * 12) as u64);
        b.reset_peak_memory();
        let prompt = b.upload_u32(&[0; 4 * 16]).unwrap();
        stage
            .decode(&b, StageInput::Tokens(&prompt), &mut cache, 16)
            .unwrap();
        let peak = b.memory().peak;
        eprintln!(
            "{}: weights {:.1} MB; a training stage holds {:.1} MB at rest; decoding 4 × 16 \
             prompt tokens through a 1024-position cache peaks at {:.1} MB",
            model.family,
            weights as f64 / 1e6,
            4.0 * weights as f64 / 1e6,
            peak as f64 / 1e6
        );
        assert!(peak < weights + cache_bytes + weights / 4);
    }
}
