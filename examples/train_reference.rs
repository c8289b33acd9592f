//! Train a tiny GPT-2 in 2 pipeline stages on the reference (host) backend, through the
//! library API: build a `TrainConfig`, a `Trainer`, and step it.
//!
//! Run: `cargo run --release --example train_reference`

use anyhow::Result;
use pipit::engine::data::Corpus;
use pipit::engine::model::ModelConfig;
use pipit::engine::schedule::ScheduleKind;
use pipit::engine::train::{Init, TrainConfig, Trainer};
use pipit::reference::ReferenceBackend;

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
        schedule: ScheduleKind::OneFOneB.into(),
        stages: 2,
        microbatches: 4,
        batch_size: 8,
        seq_len: 64,
        steps: 40,
        warmup_steps: 5,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(config, |_rank| Ok(ReferenceBackend::new()), Init::Fresh)?;
    for line in trainer.describe() {
        println!("{line}");
    }
    while trainer.step < trainer.config.steps {
        let log = trainer.train_step(&corpus)?;
        if log.step % 10 == 0 {
            println!(
                "step {:3}  loss {:.4}  bubble {:.1}%",
                log.step,
                log.loss,
                100.0 * log.bubble_fraction
            );
        }
    }
    let (val, tokens) = trainer.evaluate(&corpus.val, 64, 4096)?;
    println!("validation loss {val:.4} nats/byte over {tokens} tokens");
    Ok(())
}
