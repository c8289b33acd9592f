//! Train a tiny GPT-2 in 4 pipeline stages on one NVIDIA GPU (one CUDA stream per rank),
//! through the library API. Without a CUDA driver it stops with one line saying so.
//!
//! Run: `cargo run --release --example train_cuda`

use anyhow::Result;
use pipit::cuda::CudaBackend;
use pipit::engine::data::Corpus;
use pipit::engine::model::ModelConfig;
use pipit::engine::train::{Init, TrainConfig, Trainer};
use pipit::engine::Backend;

fn main() -> Result<()> {
    let corpus = Corpus::split(include_bytes!("../data/shakespeare.txt"), 0.1)?;
    let config = TrainConfig {
        model: ModelConfig {
            n_layer: 4,
            n_embd: 128,
            n_head: 4,
            n_positions: 128,
            vocab_size: 256,
            ..ModelConfig::default()
        },
        seq_len: 128,
        steps: 100,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(config, |_rank| CudaBackend::new(0), Init::Fresh)?;
    println!("device: {}", trainer.ranks[0].backend.describe());
    while trainer.step < trainer.config.steps {
        let log = trainer.train_step(&corpus)?;
        if log.step % 20 == 0 {
            println!(
                "step {:3}  loss {:.4}  {:.0} tokens/s",
                log.step, log.loss, log.tokens_per_sec
            );
        }
    }
    let (val, tokens) = trainer.evaluate(&corpus.val, 128, 16_384)?;
    println!("validation loss {val:.4} nats/byte over {tokens} tokens");
    Ok(())
}
