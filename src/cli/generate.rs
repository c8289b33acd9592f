//! `pipit generate`: sample text from a checkpoint through the pipeline's stages.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use pipit_engine::checkpoint;
use pipit_engine::rng::Rng;
use pipit_engine::train::{Init, TrainConfig, Trainer};
use pipit_engine::{invalid_input, Backend};

use super::device::{with_backend, BackendChoice, BackendJob};

/// Sample text from a checkpoint, one byte at a time, through the same pipeline stages that
/// trained it.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (pipit's or a Hugging Face GPT-2 one).
    #[arg(long, value_name = "DIR", default_value = super::train::DEFAULT_CHECKPOINT)]
    checkpoint: PathBuf,
    /// Text the sample continues.
    #[arg(long, default_value = "ROMEO:\n")]
    prompt: String,
    /// Tokens (bytes) to generate.
    #[arg(long, default_value_t = 400)]
    max_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample only among the K most likely tokens (0: all).
    #[arg(long, value_name = "K", default_value_t = 40)]
    top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Pipeline ranks to cut the model into.
    #[arg(long, default_value_t = 4)]
    stages: usize,
    /// Device for every rank.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
}

/// Run `pipit generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(invalid_input!(
            "--temperature must be 0 or more, got {}",
            args.temperature
        ));
    }
    if args.prompt.is_empty() {
        return Err(invalid_input!("--prompt must hold at least one byte"));
    }
    let ckpt = checkpoint::load(&args.checkpoint)?;
    let layers = ckpt.config.n_layer + 2;
    if args.stages == 0 || args.stages > layers {
        return Err(invalid_input!(
            "--stages must be between 1 and the model's {layers} layers, got {}",
            args.stages
        ));
    }
    let config = TrainConfig {
        model: ckpt.config.clone(),
        stages: args.stages,
        microbatches: 1,
        batch_size: 1,
        seq_len: ckpt.config.n_positions,
        schedule: "gpipe".into(),
        ..TrainConfig::default()
    };
    with_backend(
        args.backend,
        GenerateJob {
            args: &args,
            config,
            ckpt: &ckpt,
        },
    )
}

struct GenerateJob<'a> {
    args: &'a GenerateArgs,
    config: TrainConfig,
    ckpt: &'a checkpoint::Checkpoint,
}

impl BackendJob for GenerateJob<'_> {
    type Output = ();

    fn run<B: Backend>(self, make: &mut dyn FnMut(usize) -> Result<B>) -> Result<()> {
        let GenerateJob { args, config, ckpt } = self;
        let window = config.model.n_positions;
        let mut trainer = Trainer::new(config, make, Init::Weights(ckpt))?;
        let mut tokens: Vec<u32> = args.prompt.bytes().map(u32::from).collect();
        let mut rng = Rng::new(args.seed);
        let mut out = std::io::stdout().lock();
        out.write_all(args.prompt.as_bytes())?;
        for _ in 0..args.max_tokens {
            let context = &tokens[tokens.len().saturating_sub(window)..];
            let logits = trainer.next_token_logits(context)?;
            let next = sample(&logits, args.temperature, args.top_k, &mut rng);
            tokens.push(next as u32);
            out.write_all(&[next as u8])?;
            out.flush()?;
        }
        writeln!(out)?;
        Ok(())
    }
}

/// Pick a token from `logits`: the arg-max when `temperature` is 0, otherwise a draw from the
/// softmax of `logits / temperature` restricted to the `top_k` largest (0: all).
fn sample(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> usize {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if temperature == 0.0 {
        return order[0];
    }
    if top_k > 0 {
        order.truncate(top_k);
    }
    let top = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / temperature as f64).exp())
        .collect();
    let mut draw = rng.uniform() * weights.iter().sum::<f64>();
    for (&i, w) in order.iter().zip(&weights) {
        draw -= w;
        if draw <= 0.0 {
            return i;
        }
    }
    order[order.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_top_k_excludes_the_rest() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, 0.0, 0, &mut rng), 1);
        for _ in 0..200 {
            let t = sample(&logits, 1.0, 2, &mut rng);
            assert!(t == 1 || t == 2);
        }
    }
}
