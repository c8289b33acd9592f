//! Train a tiny GPT-2 in 4 pipeline stages on wgpu, one device per rank, through the library
//! API. Picks a GPU if there is one, else a software Vulkan adapter (Mesa lavapipe).
//!
//! Run: `cargo run --release --example train_wgpu`

use anyhow::Result;
use pipit::engine::data::Corpus;
use pipit::engine::model::ModelConfig;
use pipit::engine::schedule::ScheduleKind;
use pipit::engine::train::{Init, TrainConfig, Trainer};
use pipit::engine::Backend;
use pipit::wgpu::WgpuBackend;

fn main() -> Result<()> {
    let text = include_bytes!("../data/shakespeare.txt");
    let corpus = Corpus::split(text, 0.1)?;
    let config = TrainConfig {
        model: ModelConfig {
            n_layer: 2,
            n_embd: 32,
            n_head: 2,
            n_positions: 64,
            vocab_size: 256,
            ..ModelConfig::default()
        },
        schedule: ScheduleKind::GPipe.into(),
        stages: 4,
        microbatches: 4,
        batch_size: 8,
        seq_len: 64,
        steps: 40,
        warmup_steps: 5,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(config, |_rank| WgpuBackend::new(), Init::Fresh)?;
    println!("device: {}", trainer.ranks[0].backend.describe());
    while trainer.step < trainer.config.steps {
        let log = trainer.train_step(&corpus)?;
        if log.step % 10 == 0 {
            println!(
                "step {:3}  loss {:.4}  {:.0} tokens/s",
                log.step, log.loss, log.tokens_per_sec
            );
        }
    }
    let (val, tokens) = trainer.evaluate(&corpus.val, 64, 4096)?;
    println!("validation loss {val:.4} nats/byte over {tokens} tokens");
    Ok(())
}
