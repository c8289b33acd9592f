//! `pipit generate`: sample text from a checkpoint through the pipeline's stages, in one
//! process or in one process per rank (`pipit launch`, or RANK/WORLD_SIZE set), where rank 0
//! samples and prints.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pipit_engine::checkpoint;
use pipit_engine::dist::{watch_launcher, LaunchEnv, RankTrainer};
use pipit_engine::rng::Rng;
use pipit_engine::tokenizer::Tokenizer;
use pipit_engine::train::{Init, TrainConfig, Trainer};
use pipit_engine::{invalid_input, Backend};
use serde_json::json;

use super::device::{with_backend, BackendChoice, BackendJob};
use super::train::load_checkpoint;
use super::OutputFormat;

/// The settings of `pipit generate` (its help is on the subcommand in `cli/mod.rs`).
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (pipit's or a Hugging Face GPT-2 one).
    #[arg(long, value_name = "DIR", default_value = super::train::DEFAULT_CHECKPOINT)]
    checkpoint: PathBuf,
    /// Text the sample continues.
    #[arg(long, default_value = "ROMEO:\n")]
    prompt: String,
    /// Tokens to generate (beyond the model's n_positions, the context restarts from
    /// its last half each time it fills up).
    #[arg(long, default_value_t = 400)]
    max_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample only among the K most likely tokens (0: all).
    #[arg(long, value_name = "K", default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: of those, only the most likely whose probabilities first add up to
    /// at least P (1: all of them).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler (sample i draws from seed + i).
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Keep going past `<|endoftext|>`. Without it, a sample of a model with GPT-2's
    /// tokenizer ends when it draws that token (as Hugging Face's `generate` stops at
    /// `eos_token_id`), which is not printed; byte-level models have no such token.
    #[arg(long)]
    ignore_eos: bool,
    /// Samples to generate side by side, in passes of --batch-size samples, each pass with
    /// its own caches; they fill the pipeline (rank r + 1 runs one pass while rank r runs the
    /// next), in one process or across processes.
    /// One streams as it goes; several are printed at the end, each under a header line.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Samples that go through a stage together, as one batch. [default: the samples split
    /// into at most --stages passes, so that they fill the pipeline]
    #[arg(long, value_name = "B")]
    batch_size: Option<usize>,
    /// Output format: the text (and a line on stderr with the rate), or one JSON object
    /// `{"prompt", "samples": [{"seed", "text", "ids", "end"}], "tokens", "seconds",
    /// "tokens_per_sec"}` where `ids` are the generated tokens, `text` is the prompt and
    /// them (without a final `<|endoftext|>`, invalid UTF-8 replaced) and `end` is
    /// "end_of_text" or "max_tokens". `tokens` counts the samples' tokens; a sample that has
    /// ended still runs, unseen, while others go on, and its work is not counted.
    #[arg(long, value_enum, default_value = "text")]
    format: OutputFormat,
    /// Pipeline ranks to cut the model into.
    #[arg(long, default_value_t = 4)]
    stages: usize,
    /// Device for every rank.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    /// Multi-process runs: seconds a rank may stay silent before every other rank stops with
    /// an error naming it; also how long the rendezvous waits for missing ranks.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    peer_timeout: f64,
}

/// Run `pipit generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    // A rank started by `pipit launch` stops by itself once the launcher is gone.
    watch_launcher()?;
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(invalid_input!(
            "--temperature must be 0 or more, got {}",
            args.temperature
        ));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(invalid_input!(
            "--top-p must be in (0, 1], got {}",
            args.top_p
        ));
    }
    if args.prompt.is_empty() {
        return Err(invalid_input!("--prompt must hold at least one byte"));
    }
    if args.samples == 0 {
        return Err(invalid_input!("--samples must be at least 1, got 0"));
    }
    if args.batch_size == Some(0) {
        return Err(invalid_input!("--batch-size must be at least 1, got 0"));
    }
    if !(args.peer_timeout > 0.0 && args.peer_timeout.is_finite()) {
        return Err(invalid_input!(
            "--peer-timeout must be a positive number of seconds, got {}",
            args.peer_timeout
        ));
    }
    let header = checkpoint::load_header(&args.checkpoint)?;
    let vocab = header.config.vocab_size;
    let tokenizer = Tokenizer::for_checkpoint(&args.checkpoint, vocab)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(invalid_input!(
            "--prompt holds token {bad}, outside the model's vocabulary of {vocab}"
        ));
    }
    let layers = header.config.n_layer + 2;
    if args.stages == 0 || args.stages > layers {
        return Err(invalid_input!(
            "--stages must be between 1 and the model's {layers} layers, got {}",
            args.stages
        ));
    }
    let config = TrainConfig {
        model: header.config.clone(),
        stages: args.stages,
        microbatches: 1,
        batch_size: 1,
        seq_len: header.config.n_positions,
        schedule: "gpipe".into(),
        ..TrainConfig::default()
    };
    // Under a launcher with more than one process, this process runs only its own rank.
    let launch = LaunchEnv::from_env()?.filter(|env| env.world_size > 1);
    let ckpt = load_checkpoint(&args.checkpoint, &config, launch.as_ref())?;
    with_backend(
        args.backend,
        GenerateJob {
            args: &args,
            tokenizer: &tokenizer,
            prompt: &prompt,
            config,
            ckpt: &ckpt,
            launch,
        },
    )
}

struct GenerateJob<'a> {
    args: &'a GenerateArgs,
    tokenizer: &'a Tokenizer,
    /// The prompt's tokens.
    prompt: &'a [u32],
    config: TrainConfig,
    ckpt: &'a checkpoint::Checkpoint,
    launch: Option<LaunchEnv>,
}

impl BackendJob for GenerateJob<'_> {
    type Output = ();

    fn run<B: Backend>(self, make: &mut dyn FnMut(usize) -> Result<B>) -> Result<()> {
        let GenerateJob {
            args,
            tokenizer,
            prompt,
            config,
            ckpt,
            launch,
        } = self;
        let window = config.model.n_positions;
        let batch = args
            .batch_size
            .unwrap_or(args.samples.div_ceil(config.stages));
        let Some(env) = launch else {
            let mut trainer = Trainer::new(config, make, Init::Weights(ckpt))?;
            return write_samples(args, tokenizer, prompt, window, true, |contexts, pick| {
                let rows = trainer.next_tokens_logits(contexts, batch)?;
                Ok(rows
                    .iter()
                    .enumerate()
                    .map(|(i, row)| pick(i, row))
                    .collect())
            });
        };
        let backend = make(env.local_rank)?;
        let timeout = Duration::from_secs_f64(args.peer_timeout);
        let mut rank = RankTrainer::new(config, backend, Init::Weights(ckpt), &env, timeout)?;
        // Every rank runs as many forward passes as rank 0 samples tokens.
        // The prompt's tokens and the end-of-text token come from each rank's own copy of
        // the checkpoint's tokenizer.
        let settings = json!({
            "prompt": args.prompt,
            "prompt_ids": prompt,
            "end_of_text": tokenizer.end_of_text(),
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
            "samples": args.samples,
            "batch_size": batch,
            "ignore_eos": args.ignore_eos,
        });
        let result = rank
            .same_settings("generation settings", &settings)
            .and_then(|()| {
                write_samples(
                    args,
                    tokenizer,
                    prompt,
                    window,
                    env.rank == 0,
                    |contexts, pick| rank.next_tokens(contexts, batch, pick),
                )
            });
        rank.conclude(result)
    }
}

/// One sample being generated: its tokens and where its context starts.
struct Sample {
    tokens: Vec<u32>,
    start: usize,
    /// How many of `tokens` are the sample's: all of them until it draws `<|endoftext|>`.
    /// Its context goes on growing after that (unseen), so that the pipeline keeps running
    /// every sample's next token while any sample is still going and each keeps its cache.
    kept: Option<usize>,
}

impl Sample {
    /// The prompt, whole if it fits the window, else its last `window` tokens.
    fn new(prompt: &[u32], window: usize) -> Self {
        Self {
            tokens: prompt.to_vec(),
            start: prompt.len().saturating_sub(window),
            kept: None,
        }
    }

    /// The sample's tokens: the prompt, then those generated up to and with `<|endoftext|>`.
    fn tokens(&self) -> &[u32] {
        &self.tokens[..self.kept.unwrap_or(self.tokens.len())]
    }

    /// The context of the next token: the tokens since `start`. Once they outgrow the
    /// `window`, the context restarts from its last half, whose keys and values are computed
    /// again; the tokens after that reuse them.
    fn context(&mut self, window: usize) -> &[u32] {
        if self.tokens.len() - self.start > window {
            self.start = self.tokens.len() - (window / 2).max(1);
        }
        &self.tokens[self.start..]
    }
}

/// Generate up to `args.max_tokens` tokens after the `prompt` (`args.prompt`'s tokens) for
/// each of `args.samples` samples, a token of every sample at a time, from
/// `next(contexts, pick)`: the pipeline's logits for each context (at most `window` tokens)
/// handed to `pick(i, logits)`, which samples for sample `i`. A sample ends early at
/// `<|endoftext|>` unless `args.ignore_eos`; generation stops when every sample has ended
/// (every rank sees the same tokens, so every rank stops at the same round). Only the
/// `leader` writes: one sample as it goes, several at the end (with a progress bar
/// meanwhile).
fn write_samples(
    args: &GenerateArgs,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    window: usize,
    leader: bool,
    mut next: impl FnMut(&[&[u32]], &mut dyn FnMut(usize, &[f32]) -> usize) -> Result<Vec<usize>>,
) -> Result<()> {
    // Only tokens with text are drawn (a padded vocabulary's extra rows are never targets).
    let drawn = tokenizer.len();
    let mut samples: Vec<Sample> = (0..args.samples)
        .map(|_| Sample::new(prompt, window))
        .collect();
    let mut rngs: Vec<Rng> = (0..args.samples as u64)
        .map(|i| Rng::new(args.seed.wrapping_add(i)))
        .collect();
    let streaming = leader && args.samples == 1 && args.format == OutputFormat::Text;
    let mut out = std::io::stdout().lock();
    if streaming {
        out.write_all(args.prompt.as_bytes())?;
    }
    let bar = if leader && !streaming {
        ProgressBar::new(args.max_tokens as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] token {pos}/{len} of {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("{} samples", args.samples));
    let end = tokenizer.end_of_text().filter(|_| !args.ignore_eos);
    let started = Instant::now();
    for _ in 0..args.max_tokens {
        if samples.iter().all(|s| s.kept.is_some()) {
            break;
        }
        let contexts: Vec<&[u32]> = samples.iter_mut().map(|s| s.context(window)).collect();
        let tokens = next(&contexts, &mut |i, logits| {
            let logits = &logits[..drawn.min(logits.len())];
            sample(logits, args, &mut rngs[i])
        })?;
        for (s, &token) in samples.iter_mut().zip(&tokens) {
            s.tokens.push(token as u32);
            if s.kept.is_none() && Some(token as u32) == end {
                s.kept = Some(s.tokens.len());
            }
        }
        if streaming && samples[0].kept.is_none() {
            out.write_all(&tokenizer.decode(tokens[0] as u32)?)?;
            out.flush()?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if !leader {
        return Ok(());
    }
    let seconds = started.elapsed().as_secs_f64();
    let generated: usize = samples
        .iter()
        .map(|s| s.tokens().len() - prompt.len())
        .sum();
    let rate = generated as f64 / seconds.max(1e-9);
    let seed = |i: usize| args.seed.wrapping_add(i as u64);
    // The prompt as given, then the generated tokens' bytes, without `<|endoftext|>`.
    let bytes = |s: &Sample| -> Result<Vec<u8>> {
        let mut all = args.prompt.as_bytes().to_vec();
        for &t in &s.tokens()[prompt.len()..] {
            if Some(t) != end {
                all.extend(tokenizer.decode(t)?);
            }
        }
        Ok(all)
    };
    let ending = |s: &Sample| match s.kept {
        Some(_) => "end_of_text",
        None => "max_tokens",
    };
    match args.format {
        OutputFormat::Json => {
            let samples: Vec<_> = samples
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Ok(json!({
                        "seed": seed(i),
                        "text": String::from_utf8_lossy(&bytes(s)?),
                        "ids": s.tokens()[prompt.len()..],
                        "end": ending(s),
                    }))
                })
                .collect::<Result<_>>()?;
            let report = json!({
                "prompt": args.prompt,
                "samples": samples,
                "tokens": generated,
                "seconds": seconds,
                "tokens_per_sec": rate,
            });
            writeln!(out, "{report}")?;
        }
        OutputFormat::Text => {
            if streaming {
                writeln!(out)?;
                if samples[0].kept.is_some() {
                    eprintln!("the sample ended at <|endoftext|>");
                }
            } else {
                for (i, s) in samples.iter().enumerate() {
                    let end = match s.kept {
                        Some(_) => ", ended at <|endoftext|>",
                        None => "",
                    };
                    writeln!(
                        out,
                        "--- sample {} of {} (seed {}{end}) ---",
                        i + 1,
                        args.samples,
                        seed(i)
                    )?;
                    out.write_all(&bytes(s)?)?;
                    writeln!(out)?;
                }
            }
            eprintln!("generated {generated} tokens in {seconds:.2} s ({rate:.1} tokens/s)");
        }
    }
    Ok(())
}

/// Pick a token from `logits` as `args` say: the arg-max when the temperature is 0, otherwise
/// a draw from the softmax of `logits / temperature` restricted to the `top_k` largest (0:
/// all), and of those to the fewest most likely whose probabilities add up to `top_p`.
fn sample(logits: &[f32], args: &GenerateArgs, rng: &mut Rng) -> usize {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if args.temperature == 0.0 {
        return order[0];
    }
    if args.top_k > 0 {
        order.truncate(args.top_k);
    }
    let top = logits[order[0]] as f64;
    let mut weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / args.temperature as f64).exp())
        .collect();
    if args.top_p < 1.0 {
        let total: f64 = weights.iter().sum();
        let mut sum = 0.0;
        let keep = weights
            .iter()
            .position(|w| {
                sum += w;
                sum >= args.top_p * total
            })
            .map_or(weights.len(), |i| i + 1);
        weights.truncate(keep);
        order.truncate(keep);
    }
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

    /// The settings of `pipit generate` with these sampling flags.
    fn settings(flags: &[&str]) -> GenerateArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: GenerateArgs,
        }
        Cli::parse_from([&["generate"], flags].concat()).args
    }

    #[test]
    fn greedy_takes_the_largest_and_top_k_excludes_the_rest() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(
            sample(&logits, &settings(&["--temperature", "0"]), &mut rng),
            1
        );
        let top2 = settings(&["--temperature", "1", "--top-k", "2"]);
        for _ in 0..200 {
            let t = sample(&logits, &top2, &mut rng);
            assert!(t == 1 || t == 2);
        }
    }

    #[test]
    fn top_p_keeps_the_fewest_likely_tokens_that_reach_it() {
        // Probabilities 0.5, 0.3, 0.2 at temperature 1.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut rng = Rng::new(2);
        let drawn = |p: &str, rng: &mut Rng| -> std::collections::BTreeSet<usize> {
            let args = settings(&["--temperature", "1", "--top-k", "0", "--top-p", p]);
            (0..400).map(|_| sample(&logits, &args, rng)).collect()
        };
        assert_eq!(drawn("0.45", &mut rng), [0].into());
        assert_eq!(drawn("0.7", &mut rng), [0, 1].into());
        assert_eq!(drawn("0.81", &mut rng), [0, 1, 2].into());
        assert_eq!(drawn("1", &mut rng), [0, 1, 2].into());
    }
}
