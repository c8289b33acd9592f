//! `pipit generate`: sample text from a checkpoint through the pipeline's stages, in one
//! process or in one process per rank (`pipit launch`, or RANK/WORLD_SIZE set), where rank 0
//! samples and prints.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pipit_engine::checkpoint;
use pipit_engine::dist::{watch_launcher, LaunchEnv, RankTrainer};
use pipit_engine::rng::Rng;
use pipit_engine::sample::Sampling;
use pipit_engine::schedule::ScheduleKind;
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
    /// Checkpoint directory (pipit's, or a Hugging Face GPT-2 or Llama one; sharded or not).
    #[arg(long, value_name = "DIR", default_value = super::train::DEFAULT_CHECKPOINT)]
    checkpoint: PathBuf,
    /// Text the sample continues.
    #[arg(long, default_value = "ROMEO:\n", conflicts_with = "prompts")]
    prompt: String,
    /// Continue every prompt of FILE instead: JSON Lines, one JSON string a line (`"ROMEO:\n"`),
    /// each prompt getting --samples samples (sample j of prompt p draws from seed +
    /// p·samples + j). Prompts of one length in tokens share passes.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
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
    /// Samples that go through a stage together, as one batch. Samples are generated
    /// B × --stages at a time, in passes of samples of one length, so that they fill the
    /// pipeline and the caches held stay bounded. [default: the samples over --stages, at
    /// most 16]
    #[arg(long, value_name = "B")]
    batch_size: Option<usize>,
    /// Also write each sample to FILE as soon as its wave (see --batch-size) is done: JSON
    /// Lines, one object a sample as in --format json's `samples`, with its `index` among them,
    /// so a long run over a prompt file keeps what it has made.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Output format: the text (and a line on stderr with the rate), or one JSON object
    /// `{"samples": [{"prompt", "seed", "text", "ids", "end"}], "tokens", "seconds",
    /// "tokens_per_sec"}` where `ids` are the generated tokens, `text` is the prompt and
    /// them (without a final `<|endoftext|>`, invalid UTF-8 replaced) and `end` is
    /// "end_of_text" or "max_tokens" (with --prompt, also `"prompt"` at the top). `tokens`
    /// counts the samples' tokens; a sample that has ended still runs, unseen, while others
    /// go on, and its work is not counted.
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
    /// Generate nothing: run the first wave of samples (prompts, then --max-tokens decode
    /// steps, caches growing to the model's window) on the meta backend and print each
    /// rank's weights, caches and activations at their peak, as --backend would allocate
    /// them. Reads the checkpoint's config, tokenizer and tensor table, not its tensors.
    #[arg(long)]
    dry_run: bool,
}

impl GenerateArgs {
    /// How each next token is picked.
    fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// The most samples a pass takes unless `--batch-size` says otherwise.
const DEFAULT_MAX_BATCH: usize = 16;

/// Run `pipit generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    run_to(args, &mut std::io::stdout().lock())
}

/// Run `pipit generate`, writing what it prints to `out`.
pub fn run_to(args: GenerateArgs, out: &mut dyn Write) -> Result<()> {
    // A rank started by `pipit launch` stops by itself once the launcher is gone.
    watch_launcher()?;
    args.sampling().check(("--temperature", "--top-p"))?;
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
    let prompts = prompts(&args, &tokenizer, vocab)?;
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
        schedule: ScheduleKind::GPipe.into(),
        ..TrainConfig::default()
    };
    if args.dry_run {
        let samples = prompts.len() * args.samples;
        let batch = pass_size(&args, samples, config.stages);
        let wave: Vec<&[u32]> = (0..samples.min(batch * config.stages))
            .map(|i| prompts[i / args.samples].ids.as_slice())
            .collect();
        return super::dry_run::generation(
            config,
            args.backend,
            &wave,
            batch,
            args.max_tokens,
            args.format,
        );
    }
    // Under a launcher with more than one process, this process runs only its own rank.
    let launch = LaunchEnv::from_env()?.filter(|env| env.world_size > 1);
    let ckpt = load_checkpoint(&args.checkpoint, &config, launch.as_ref())?;
    with_backend(
        args.backend,
        GenerateJob {
            args: &args,
            tokenizer: &tokenizer,
            prompts: &prompts,
            config,
            ckpt: &ckpt,
            launch,
            out,
        },
    )
}

struct GenerateJob<'a> {
    /// Where the samples go.
    out: &'a mut dyn Write,
    args: &'a GenerateArgs,
    tokenizer: &'a Tokenizer,
    prompts: &'a [Prompt],
    config: TrainConfig,
    ckpt: &'a checkpoint::Checkpoint,
    launch: Option<LaunchEnv>,
}

impl BackendJob for GenerateJob<'_> {
    type Output = ();

    fn run<B: Backend>(self, make: &mut dyn FnMut(usize) -> Result<B>) -> Result<()> {
        let GenerateJob {
            out,
            args,
            tokenizer,
            prompts,
            config,
            ckpt,
            launch,
        } = self;
        let window = config.model.n_positions;
        let batch = pass_size(args, prompts.len() * args.samples, config.stages);
        // Enough samples at once to fill the pipeline with passes of `batch`, and no more, so
        // the caches held stay bounded however many samples there are.
        let wave = batch * config.stages;
        let Some(env) = launch else {
            let mut trainer = Trainer::new(config, make, Init::Frozen(ckpt))?;
            return write_samples(
                out,
                args,
                tokenizer,
                prompts,
                window,
                wave,
                true,
                ckpt,
                |contexts, pick| {
                    let rows = trainer.next_tokens_logits(contexts, batch)?;
                    Ok(rows
                        .iter()
                        .enumerate()
                        .map(|(i, row)| pick(i, row))
                        .collect())
                },
            );
        };
        let backend = make(env.local_rank)?;
        let timeout = Duration::from_secs_f64(args.peer_timeout);
        let mut rank = RankTrainer::new(config, backend, Init::Frozen(ckpt), &env, timeout)?;
        // Every rank runs as many forward passes as rank 0 samples tokens.
        // The prompt's tokens and the end-of-text token come from each rank's own copy of
        // the checkpoint's tokenizer.
        let settings = json!({
            "prompts": prompts.iter().map(|p| &p.text).collect::<Vec<_>>(),
            "prompt_ids": prompts.iter().map(|p| &p.ids).collect::<Vec<_>>(),
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
                    out,
                    args,
                    tokenizer,
                    prompts,
                    window,
                    wave,
                    env.rank == 0,
                    ckpt,
                    |contexts, pick| rank.next_tokens(contexts, batch, pick),
                )
            });
        rank.conclude(result)
    }
}

/// Samples per pass through a stage: `--batch-size`, or the samples over the stages, at most
/// [`DEFAULT_MAX_BATCH`].
fn pass_size(args: &GenerateArgs, samples: usize, stages: usize) -> usize {
    args.batch_size
        .unwrap_or(samples.div_ceil(stages).min(DEFAULT_MAX_BATCH))
}

/// A prompt as given and its tokens.
struct Prompt {
    text: String,
    ids: Vec<u32>,
}

/// The prompts to continue: `--prompt`, or each line of `--prompts FILE`, with their tokens.
fn prompts(args: &GenerateArgs, tokenizer: &Tokenizer, vocab: usize) -> Result<Vec<Prompt>> {
    // Each prompt with the name its errors give it.
    let texts: Vec<(String, String)> = match &args.prompts {
        None => vec![(args.prompt.clone(), "--prompt".to_string())],
        Some(path) => {
            let file = std::fs::read_to_string(path)
                .map_err(|e| invalid_input!("cannot read --prompts {}: {e}", path.display()))?;
            let texts = file
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(n, line)| {
                    let name = format!("--prompts {} line {}", path.display(), n + 1);
                    match serde_json::from_str::<String>(line) {
                        Ok(text) => Ok((text, name)),
                        Err(e) => Err(invalid_input!("{name}: not a JSON string ({e})")),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            if texts.is_empty() {
                return Err(invalid_input!(
                    "--prompts {} holds no prompt (one JSON string a line)",
                    path.display()
                ));
            }
            texts
        }
    };
    texts
        .into_iter()
        .map(|(text, name)| {
            if text.is_empty() {
                return Err(invalid_input!(
                    "{name}: a prompt must hold at least one byte"
                ));
            }
            let ids = tokenizer.encode(&text)?;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(invalid_input!(
                    "{name}: token {bad} is outside the model's vocabulary of {vocab}"
                ));
            }
            Ok(Prompt { text, ids })
        })
        .collect()
}

/// One sample being generated: its prompt, its tokens and where its context starts.
struct Sample {
    /// Index into the prompts.
    prompt: usize,
    tokens: Vec<u32>,
    start: usize,
    /// How many of `tokens` are the sample's: all of them until it draws `<|endoftext|>`.
    /// Its context goes on growing after that (unseen), so that the pipeline keeps running
    /// every sample's next token while any sample is still going and each keeps its cache.
    kept: Option<usize>,
}

impl Sample {
    /// Prompt `index` (`prompt`), whole if it fits the window, else its last `window` tokens.
    fn new(index: usize, prompt: &[u32], window: usize) -> Self {
        Self {
            prompt: index,
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

/// Generate up to `args.max_tokens` tokens after each of the `prompts` for `args.samples`
/// samples each (sample `i`, prompt-major, draws from seed + i), `wave` samples at a time
/// (shortest prompts first) and a token of each of them a round, from `next(contexts, pick)`:
/// the pipeline's logits for each context (at most `window` tokens; those of one length side
/// by side, so that they can share passes) handed to `pick(k, logits)`, which samples for
/// context `k`. A sample ends early at
/// `<|endoftext|>` unless `args.ignore_eos`; generation stops when every sample has ended
/// (every rank sees the same tokens, so every rank stops at the same round). Only the
/// `leader` writes: one sample as it goes, several at the end (with a progress bar
/// meanwhile). A non-finite logit is an error naming the first weight of `ckpt` that is not
/// finite.
#[allow(clippy::too_many_arguments)]
fn write_samples(
    out: &mut dyn Write,
    args: &GenerateArgs,
    tokenizer: &Tokenizer,
    prompts: &[Prompt],
    window: usize,
    wave: usize,
    leader: bool,
    ckpt: &checkpoint::Checkpoint,
    mut next: impl FnMut(&[&[u32]], &mut dyn FnMut(usize, &[f32]) -> usize) -> Result<Vec<usize>>,
) -> Result<()> {
    // Only tokens with text are drawn (a padded vocabulary's extra rows are never targets).
    let drawn = tokenizer.len();
    let sampling = args.sampling();
    let mut samples: Vec<Sample> = prompts
        .iter()
        .enumerate()
        .flat_map(|(p, prompt)| (0..args.samples).map(move |_| (p, prompt)))
        .map(|(p, prompt)| Sample::new(p, &prompt.ids, window))
        .collect();
    let count = samples.len();
    let seed = |i: usize| args.seed.wrapping_add(i as u64);
    let mut rngs: Vec<Rng> = (0..count).map(|i| Rng::new(seed(i))).collect();
    // The order the contexts go in: by prompt length (stable), so that equal lengths meet.
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by_key(|&i| prompts[samples[i].prompt].ids.len());
    let streaming = leader && count == 1 && args.format == OutputFormat::Text;
    if streaming {
        out.write_all(prompts[0].text.as_bytes())?;
    }
    let bar = if leader && !streaming && !super::is_quiet() {
        ProgressBar::new((count * args.max_tokens) as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} tokens of {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("{count} samples"));
    let end = tokenizer.end_of_text().filter(|_| !args.ignore_eos);
    // The prompt as given, then the generated tokens' bytes, without `<|endoftext|>`.
    let bytes = |s: &Sample| -> Result<Vec<u8>> {
        let prompt = &prompts[s.prompt];
        let mut all = prompt.text.as_bytes().to_vec();
        for &t in &s.tokens()[prompt.ids.len()..] {
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
    // One sample as JSON: what --format json lists and --output writes.
    let record = |i: usize, s: &Sample| -> Result<serde_json::Value> {
        Ok(json!({
            "prompt": prompts[s.prompt].text,
            "seed": seed(i),
            "text": String::from_utf8_lossy(&bytes(s)?),
            "ids": s.tokens()[prompts[s.prompt].ids.len()..],
            "end": ending(s),
        }))
    };
    let mut output = match (&args.output, leader) {
        (Some(path), true) => Some(
            std::fs::File::create(path)
                .map_err(|e| invalid_input!("cannot create --output {}: {e}", path.display()))?,
        ),
        _ => None,
    };
    let started = Instant::now();
    // A wave of samples at a time, so the caches held stay within `wave` samples' worth.
    for group in order.chunks(wave.max(1)) {
        let mut rounds = 0;
        while rounds < args.max_tokens && group.iter().any(|&i| samples[i].kept.is_none()) {
            let mut by_index: Vec<Option<&mut Sample>> = samples.iter_mut().map(Some).collect();
            let contexts: Vec<&[u32]> = group
                .iter()
                .map(|&i| {
                    by_index[i]
                        .take()
                        .expect("each sample once")
                        .context(window)
                })
                .collect();
            let mut bad = None;
            let tokens = next(&contexts, &mut |k, logits| {
                let logits = &logits[..drawn.min(logits.len())];
                if bad.is_none() {
                    bad = logits.iter().find(|x| !x.is_finite()).copied();
                }
                sampling.pick(logits, &mut rngs[group[k]])
            })?;
            if let Some(x) = bad {
                return Err(ckpt.non_finite("a logit", f64::from(x)));
            }
            for (&i, &token) in group.iter().zip(&tokens) {
                let s = &mut samples[i];
                s.tokens.push(token as u32);
                if s.kept.is_none() && Some(token as u32) == end {
                    s.kept = Some(s.tokens.len());
                }
            }
            if streaming && samples[0].kept.is_none() {
                out.write_all(&tokenizer.decode(*samples[0].tokens.last().expect("a token"))?)?;
                out.flush()?;
            }
            bar.inc(group.len() as u64);
            rounds += 1;
        }
        bar.inc(((args.max_tokens - rounds) * group.len()) as u64);
        if let Some(file) = output.as_mut() {
            let mut lines = String::new();
            for &i in group {
                let mut line = record(i, &samples[i])?;
                line["index"] = json!(i);
                lines.push_str(&format!("{line}\n"));
            }
            file.write_all(lines.as_bytes())
                .and_then(|()| file.flush())
                .context("writing --output")?;
        }
    }
    bar.finish_and_clear();
    if !leader {
        return Ok(());
    }
    let seconds = started.elapsed().as_secs_f64();
    let generated: usize = samples
        .iter()
        .map(|s| s.tokens().len() - prompts[s.prompt].ids.len())
        .sum();
    let rate = generated as f64 / seconds.max(1e-9);
    match args.format {
        OutputFormat::Json => {
            let list: Vec<_> = samples
                .iter()
                .enumerate()
                .map(|(i, s)| record(i, s))
                .collect::<Result<_>>()?;
            let mut report = json!({
                "samples": list,
                "tokens": generated,
                "seconds": seconds,
                "tokens_per_sec": rate,
            });
            if args.prompts.is_none() {
                report["prompt"] = json!(args.prompt);
            }
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
                    let prompt = match prompts.len() {
                        1 => String::new(),
                        _ => format!("prompt {}, ", s.prompt + 1),
                    };
                    writeln!(
                        out,
                        "--- sample {} of {count} ({prompt}seed {}{end}) ---",
                        i + 1,
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
