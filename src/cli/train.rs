//! `pipit train`: train a GPT-2 or Llama model cut into pipeline stages.

use std::borrow::Cow;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pipit_cuda::{CudaBackend, NcclSetup};
use pipit_engine::checkpoint::{self, Checkpoint};
use pipit_engine::data::Corpus;
use pipit_engine::dist::{LaunchEnv, RankTrainer, TensorSetup};
use pipit_engine::model::Family;
use pipit_engine::schedule::{ScheduleChoice, ScheduleKind};
use pipit_engine::tokenizer::Tokenizer;
use pipit_engine::train::{Init, StepLog, TrainConfig, TrainLoop, Trainer};
use pipit_engine::{invalid_input, Backend};
use serde_json::{json, Value};

use super::device::{with_backend, BackendChoice, BackendJob};
use super::{interrupt, say, trace};

/// Where `pipit train` saves and `pipit generate`/`pipit eval` look by default.
pub const DEFAULT_CHECKPOINT: &str = "runs/latest";

/// `pipit train`'s flags with the default of each setting in their help, taken from
/// `TrainConfig::default()` so the help cannot drift from what a run uses, unless the help gives
/// its own. (The flags themselves
/// have no clap default: an absent flag leaves the `--config` file's value alone.)
pub fn with_defaults_in_help(cmd: clap::Command) -> clap::Command {
    let Ok(serde_json::Value::Object(defaults)) = serde_json::to_value(TrainConfig::default())
    else {
        return cmd;
    };
    defaults.into_iter().fold(cmd, |cmd, (field, value)| {
        let shown = match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        let has_flag = cmd.get_arguments().any(|a| a.get_id() == field.as_str());
        if !has_flag {
            return cmd;
        }
        cmd.mut_arg(field, |arg| {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            // A flag whose default depends on others says so itself.
            if help.contains("[default:") {
                return arg;
            }
            let long = arg.get_long_help().map(|h| h.to_string());
            let arg = arg.help(format!("{help} [default: {shown}]"));
            match long {
                Some(long) => arg.long_help(format!("{long}\n\n[default: {shown}]")),
                None => arg,
            }
        })
    })
}

/// The corpus a fresh clone trains on: twelve Shakespeare plays (public domain), 1.5 MB.
pub const EMBEDDED_CORPUS: &[u8] = include_bytes!("../../data/shakespeare.txt");

/// Train a GPT-2 or Llama (`--model`) cut into pipeline stages: byte-level, or in a starting checkpoint's BPE tokens.
///
/// With no arguments: 4 stages, 1F1B with 8 micro-batches, on the embedded Shakespeare corpus
/// (the last 10% held out for validation), on the best device found. Every flag overrides the
/// same field of `--config FILE` (TOML, keys named like the flags with `_`).
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML file with any of the fields below (e.g. `n_layer = 6`, `schedule = "gpipe"`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Device for every rank.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    /// Text file to train on instead of the embedded corpus (bytes are tokens, unless
    /// --init or --resume names a checkpoint with GPT-2's tokenizer: then its tokens).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,

    /// Model family: gpt2 (learned positions, LayerNorm, GELU, head tied to the embedding),
    /// llama (rotary positions, RMSNorm, SwiGLU, grouped-query attention, untied head), or
    /// Llama's relatives mistral (the same, saved as MistralForCausalLM, no sliding window)
    /// and qwen2 (biases on the query, key and value projections).
    #[arg(long, value_name = "FAMILY")]
    model: Option<Family>,
    /// Transformer blocks.
    #[arg(long)]
    n_layer: Option<usize>,
    /// Attention heads per block (must divide --n-embd).
    #[arg(long)]
    n_head: Option<usize>,
    /// Model width.
    #[arg(long)]
    n_embd: Option<usize>,
    /// Longest sequence the model accepts (rows of the position embedding).
    #[arg(long)]
    n_positions: Option<usize>,
    /// Vocabulary size (tokens are bytes, so 256 covers any text; a larger vocabulary gives a
    /// model GPT-2's shape, e.g. 50304, whose extra rows are never targets).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Key/value heads per block, dividing --n-head (llama's grouped-query attention)
    /// [default: --n-head].
    #[arg(long)]
    n_kv_head: Option<usize>,
    /// Width of the MLP's hidden layer [default: 4·n_embd for gpt2; 8/3·n_embd rounded up to
    /// a multiple of 32 for llama].
    #[arg(long)]
    ffn_dim: Option<usize>,
    /// Base θ of llama's rotary position frequencies [default: 10000].
    #[arg(long)]
    rope_theta: Option<f32>,
    /// Epsilon of the norms [default: 1e-5 for gpt2, its only value; 1e-6 for llama].
    #[arg(long)]
    norm_eps: Option<f32>,
    /// Tie llama's LM head to its token embedding (gpt2's always is) [default: false for
    /// llama].
    #[arg(long, value_name = "BOOL")]
    tie_embeddings: Option<bool>,

    /// Pipeline schedule: naive, gpipe, 1f1b, interleaved, zb-h1, zb-v or dualpipev (two
    /// stages per rank in a V: rank r runs stages r and 2p-1-r; dualpipev needs m >= 2p), or
    /// auto: the one whose step simulates fastest under the layers' estimated FLOPs (within
    /// --memory-limit, by a dry run).
    #[arg(long, value_name = "NAME")]
    schedule: Option<String>,
    /// With --schedule auto: only schedules whose dry run (see --dry-run) peaks at most this
    /// much on every rank, e.g. 80GB, 1.5e9 or 512MiB. With --dry-run: say whether every rank
    /// fits it.
    #[arg(long, value_name = "BYTES")]
    memory_limit: Option<String>,
    /// Pipeline ranks p (one device each).
    #[arg(long)]
    stages: Option<usize>,
    /// Micro-batches per step m (must divide --batch-size).
    #[arg(long)]
    microbatches: Option<usize>,
    /// Stages per rank v (interleaved and zb-h1 schedules; zb-v runs 2). [default: 1; 2 for
    /// zb-v]
    #[arg(long)]
    chunks: Option<usize>,
    /// How layers are cut into stages: uniform or balanced (by estimated FLOPs; under zb-v
    /// it balances each rank's two stages together, as the V pairs the model's ends).
    #[arg(long, value_name = "uniform|balanced")]
    partition: Option<String>,

    /// Optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence (at most --n-positions).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate (linear warm-up, then cosine decay to --min-lr).
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps.
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Final learning rate of the cosine decay.
    #[arg(long)]
    min_lr: Option<f64>,
    /// AdamW's decoupled weight decay, on matrices and embeddings (not on biases and layer
    /// norms), as GPT-2 recipes do.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW's first-moment decay β₁.
    #[arg(long, value_name = "BETA")]
    adam_beta1: Option<f64>,
    /// AdamW's second-moment decay β₂.
    #[arg(long, value_name = "BETA")]
    adam_beta2: Option<f64>,
    /// AdamW's denominator epsilon.
    #[arg(long, value_name = "EPS")]
    adam_eps: Option<f64>,
    /// Clip the gradient's global norm (over every stage) to this before each update, as
    /// PyTorch's clip_grad_norm_; 0 turns clipping off. The norm is logged per step.
    #[arg(long, value_name = "NORM")]
    grad_clip: Option<f64>,
    /// Seed of the initial weights and of the batch order.
    #[arg(long)]
    seed: Option<u64>,
    /// Measure the validation loss every N steps (and always at the end).
    #[arg(long, value_name = "N")]
    eval_every: Option<u64>,
    /// Validation tokens per evaluation.
    #[arg(long, value_name = "N")]
    eval_tokens: Option<usize>,
    /// Keep only each stage's input in forward; recompute the rest during backward.
    #[arg(long)]
    checkpoint_activations: bool,
    /// Compute dtype: f32, or bf16 mixed precision (bf16 matmuls and activations, f32 master
    /// weights, gradients and optimizer state). bf16 runs on the CUDA, CPU and reference backends
    /// (on the host as bf16-exact f32 values).
    #[arg(long, value_name = "f32|bf16")]
    dtype: Option<String>,

    /// Save a checkpoint (Hugging Face layout: GPT2LMHeadModel or LlamaForCausalLM) to DIR at the end and every --save-every
    /// steps; `pipit generate` and `pipit eval` read the same default.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CHECKPOINT)]
    save: PathBuf,
    /// Do not write a checkpoint.
    #[arg(long, conflicts_with = "save")]
    no_save: bool,
    /// Steps between checkpoints (0: only at the end).
    #[arg(long, value_name = "N", default_value_t = 0)]
    save_every: u64,
    /// Continue a run from its checkpoint: weights, optimizer state, step and data position.
    #[arg(long, value_name = "DIR", conflicts_with = "init")]
    resume: Option<PathBuf>,
    /// Start from a checkpoint's weights (pipit's or Hugging Face's) with a fresh optimizer.
    /// With --init or --resume the checkpoint fixes the model's sizes (over a --config file's;
    /// size flags that differ are refused) and, when it has GPT-2's tokenizer, the tokens.
    #[arg(long, value_name = "DIR")]
    init: Option<PathBuf>,
    /// Run one training step of these settings on no device and print the memory each rank
    /// would hold (parameters and optimizer state, saved activations, the step's peak), as the
    /// chosen --backend allocates its buffers; then exit (with --log-json, the figures in bytes
    /// there). Nothing is allocated or computed: it takes as long as walking the schedule.
    #[arg(long)]
    dry_run: bool,
    /// Print the settings this command would train with (defaults, config file and flags
    /// merged) as a TOML config file, and exit.
    #[arg(long)]
    show_config: bool,
    /// Write one JSON object per step to PATH.
    #[arg(long, value_name = "PATH")]
    log_json: Option<PathBuf>,
    /// Write the last step's measured timeline to PATH as a Chrome trace (open in Perfetto).
    #[arg(long, value_name = "PATH")]
    trace: Option<PathBuf>,
    /// Multi-process runs (`pipit launch`, or RANK/WORLD_SIZE set): seconds a rank may stay
    /// silent (no message, no heartbeat) before every other rank stops with an error naming
    /// it; also how long the rendezvous waits for missing ranks, and an NCCL transfer for its
    /// peer.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    peer_timeout: f64,
    /// Multi-process runs: how activations and gradients travel between ranks (control
    /// messages always use TCP).
    #[arg(long, value_enum, default_value = "auto")]
    transport: TransportChoice,
}

/// How tensors travel between the processes of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransportChoice {
    /// NCCL between CUDA ranks, TCP between the others.
    Auto,
    /// NCCL, GPU to GPU (CUDA only; one GPU per process, as NCCL requires).
    Nccl,
    /// TCP through host memory, on every backend (several processes may share a GPU).
    Tcp,
}

impl TrainArgs {
    /// The run's settings: defaults (or the resumed run's settings), then the config file,
    /// then the flags.
    fn config(&self, resumed: Option<&Checkpoint>) -> Result<TrainConfig> {
        let saved = resumed
            .and_then(|c| c.trainer_state.as_ref())
            .and_then(|s| serde_json::from_value::<TrainConfig>(s["config"].clone()).ok());
        // Whether a file (the config, or the resumed run's settings) sets the chunks.
        let mut chunks_in_file = saved.is_some() && self.config.is_none();
        let mut c = match &self.config {
            Some(path) => {
                let text = fs::read_to_string(path)
                    .map_err(|e| invalid_input!("cannot read --config {}: {e}", path.display()))?;
                let bad = |e: toml::de::Error| {
                    invalid_input!("--config {}: {}", path.display(), one_line(&e.to_string()))
                };
                chunks_in_file = toml::from_str::<toml::Table>(&text)
                    .map_err(bad)?
                    .contains_key("chunks");
                toml::from_str(&text).map_err(bad)?
            }
            None => saved.unwrap_or_default(),
        };
        macro_rules! set {
            ($($field:ident).+ <- $flag:ident) => {
                if let Some(v) = self.$flag.clone() {
                    c.$($field).+ = v;
                }
            };
        }
        set!(model.family <- model);
        set!(model.n_layer <- n_layer);
        set!(model.n_head <- n_head);
        set!(model.n_embd <- n_embd);
        set!(model.n_positions <- n_positions);
        set!(model.vocab_size <- vocab_size);
        for (field, flag) in [
            (&mut c.model.n_kv_head, self.n_kv_head),
            (&mut c.model.ffn_dim, self.ffn_dim),
        ] {
            if flag.is_some() {
                *field = flag;
            }
        }
        if self.rope_theta.is_some() {
            c.model.rope_theta = self.rope_theta;
        }
        if self.norm_eps.is_some() {
            c.model.norm_eps = self.norm_eps;
        }
        if self.tie_embeddings.is_some() {
            c.model.tie_embeddings = self.tie_embeddings;
        }
        // Names parsed here, into the typed settings, so a bad one is pipit's one-line error.
        macro_rules! parse {
            ($field:ident) => {
                if let Some(name) = &self.$field {
                    c.$field = name.parse().map_err(|e: anyhow::Error| {
                        invalid_input!("--{}: {e}", stringify!($field))
                    })?;
                }
            };
        }
        parse!(schedule);
        set!(stages <- stages);
        set!(microbatches <- microbatches);
        set!(chunks <- chunks);
        parse!(partition);
        set!(steps <- steps);
        set!(batch_size <- batch_size);
        set!(seq_len <- seq_len);
        set!(lr <- lr);
        set!(warmup_steps <- warmup_steps);
        set!(min_lr <- min_lr);
        set!(weight_decay <- weight_decay);
        set!(grad_clip <- grad_clip);
        set!(adam_beta1 <- adam_beta1);
        set!(adam_beta2 <- adam_beta2);
        set!(adam_eps <- adam_eps);
        set!(seed <- seed);
        set!(eval_every <- eval_every);
        set!(eval_tokens <- eval_tokens);
        parse!(dtype);
        if self.checkpoint_activations {
            c.checkpoint_activations = true;
        }
        // A schedule that runs one chunk count (1f1b, zb-v, ...) takes it unless --chunks says
        // otherwise: when named by --schedule, or when no file gave the chunks either.
        if let ScheduleChoice::Kind(kind) = c.schedule {
            let named = self.schedule.is_some() || !chunks_in_file;
            if !kind.varies_chunks() && self.chunks.is_none() && named {
                c.chunks = kind.default_chunks();
            }
        }
        if self.n_positions.is_some() && self.seq_len.is_none() {
            c.seq_len = c.seq_len.min(c.model.n_positions);
        }
        Ok(c)
    }
}

/// The text to train on: `--data FILE`, or the embedded corpus.
pub fn text(data: Option<&Path>) -> Result<Cow<'static, [u8]>> {
    match data {
        Some(path) => fs::read(path)
            .map(Cow::Owned)
            .map_err(|e| invalid_input!("cannot read --data {}: {e}", path.display())),
        None => Ok(Cow::Borrowed(EMBEDDED_CORPUS)),
    }
}

/// The share of the text held out for validation (its tail).
pub const VAL_FRACTION: f64 = 0.1;

/// The checkpoint in `dir` with the tensors this process needs: all of them, or under a
/// launcher only those of its own rank in `config`'s plan (read alone from the files).
pub fn load_checkpoint(
    dir: &Path,
    config: &TrainConfig,
    launch: Option<&LaunchEnv>,
) -> Result<Checkpoint> {
    match launch {
        Some(env) => {
            let own = config.rank_params(env.rank)?;
            checkpoint::load_some(dir, &|name| own.contains(name))
        }
        None => checkpoint::load(dir),
    }
}

/// Run `pipit train`.
pub fn run(args: TrainArgs) -> Result<()> {
    // A rank started by `pipit launch` stops by itself once the launcher is gone.
    pipit_engine::dist::watch_launcher()?;
    // Where a launcher started this process: its rank and the run's size.
    let env = LaunchEnv::from_env()?;
    let leader = env.as_ref().is_none_or(|env| env.rank == 0);
    let config = args.settle(leader)?;
    if args.show_config {
        print!(
            "{}",
            toml::to_string(&config).context("writing the settings as TOML")?
        );
        return Ok(());
    }
    if args.dry_run {
        // Under a launcher, rank 0 runs the whole pipeline's dry run alone.
        if !leader {
            return Ok(());
        }
        let limit = args.memory_limit.as_deref().map(parse_bytes).transpose()?;
        return super::dry_run::run(config, args.backend, limit, args.log_json.as_deref());
    }
    if !(args.peer_timeout > 0.0 && args.peer_timeout.is_finite()) {
        return Err(invalid_input!(
            "--peer-timeout must be a positive number of seconds, got {}",
            args.peer_timeout
        ));
    }
    // Under a launcher with more than one process, this process runs only its own rank.
    let launch = env.filter(|env| env.world_size > 1);
    let inputs = Inputs::read(&args, &config, launch.as_ref(), leader)?;
    let job = TrainJob {
        args: &args,
        config,
        corpus: inputs.corpus,
        tokenizer: &inputs.tokenizer,
        resume: inputs.resume.as_ref(),
        init: inputs.init.as_ref(),
        launch,
    };
    with_backend(args.backend, job)
}

impl TrainArgs {
    /// The run's settings, checked: defaults, the resumed run's, the config file and the
    /// flags (see [`TrainArgs::config`]), the model of a starting checkpoint, and the schedule
    /// `--schedule auto` picks (the `leader` says which and why).
    fn settle(&self, leader: bool) -> Result<TrainConfig> {
        let args = self;
        // The settings first (from the checkpoints' headers); the tensors once it is known
        // which of them this process needs.
        let resume_header = args
            .resume
            .as_deref()
            .map(checkpoint::load_header)
            .transpose()?;
        let init_header = args
            .init
            .as_deref()
            .map(checkpoint::load_header)
            .transpose()?;
        let mut config = args.config(resume_header.as_ref())?;
        if let Some(c) = resume_header.as_ref().or(init_header.as_ref()) {
            // The checkpoint fixes the model's sizes; flags may not contradict them.
            let m = &c.config;
            let contradicted: Vec<String> = [
                ("n-layer", args.n_layer, m.n_layer),
                ("n-head", args.n_head, m.n_head),
                ("n-embd", args.n_embd, m.n_embd),
                ("n-positions", args.n_positions, m.n_positions),
                ("vocab-size", args.vocab_size, m.vocab_size),
                ("n-kv-head", args.n_kv_head, m.kv_heads()),
                ("ffn-dim", args.ffn_dim, m.ffn()),
            ]
            .iter()
            .filter_map(|&(flag, given, has)| {
                given
                    .filter(|&g| g != has)
                    .map(|g| format!("--{flag} {g} (it has {has})"))
            })
            .collect();
            if let Some(family) = args.model.filter(|&f| f != m.family) {
                return Err(invalid_input!(
                    "the checkpoint holds a {} model; --model asks for {family}",
                    m.family
                ));
            }
            if !contradicted.is_empty() {
                return Err(invalid_input!(
                    "the checkpoint fixes the model's sizes; the flags ask for another: {}",
                    contradicted.join(", ")
                ));
            }
            config.model = c.config.clone();
            config.seq_len = config.seq_len.min(config.model.n_positions);
        }
        let limit = args.memory_limit.as_deref().map(parse_bytes).transpose()?;
        if config.schedule == ScheduleChoice::Auto {
            config = auto_schedule(&config, limit, args.backend, leader)?;
        } else if limit.is_some() && !args.dry_run {
            return Err(invalid_input!(
                "--memory-limit chooses among schedules or checks a dry run: use it with --schedule auto or --dry-run (got --schedule {})",
                config.schedule
            ));
        }
        config.validate()?;
        Ok(config)
    }
}

/// What a run reads besides its settings: the text in its tokens, and the checkpoints it
/// starts from (under a launcher, only this rank's tensors of them).
struct Inputs {
    corpus: Corpus,
    tokenizer: Tokenizer,
    resume: Option<Checkpoint>,
    init: Option<Checkpoint>,
}

impl Inputs {
    fn read(
        args: &TrainArgs,
        config: &TrainConfig,
        launch: Option<&LaunchEnv>,
        leader: bool,
    ) -> Result<Self> {
        // A model that came with GPT-2's tokenizer trains on its tokens, and saves it beside it.
        let tokenizer = match args.resume.as_deref().or(args.init.as_deref()) {
            Some(dir) => Tokenizer::for_checkpoint(dir, config.model.vocab_size)?,
            None => Tokenizer::Bytes,
        };
        let text = text(args.data.as_deref())?;
        let corpus = Corpus::tokenized(&text, VAL_FRACTION, &tokenizer)?;
        let largest = corpus
            .train
            .iter()
            .chain(&corpus.val)
            .max()
            .copied()
            .unwrap_or(0);
        if largest as usize >= config.model.vocab_size {
            return Err(invalid_input!(
                "--vocab-size must exceed every byte of the text (the tokens are bytes; the largest is {largest}), got {}",
                config.model.vocab_size
            ));
        }
        if let (Tokenizer::Bpe(_), true) = (&tokenizer, leader) {
            say!(
                "tokens: GPT-2's BPE from the checkpoint, {} to train on and {} held out",
                corpus.train.len(),
                corpus.val.len()
            );
        }
        let load = |dir: Option<&Path>| dir.map(|d| load_checkpoint(d, config, launch)).transpose();
        Ok(Inputs {
            resume: load(args.resume.as_deref())?,
            init: load(args.init.as_deref())?,
            corpus,
            tokenizer,
        })
    }

    /// How the run starts: from the checkpoint it resumes, the weights it starts from, or fresh.
    fn start(&self) -> Init<'_> {
        match (&self.resume, &self.init) {
            (Some(c), _) => Init::Resume(c),
            (None, Some(c)) => Init::Weights(c),
            (None, None) => Init::Fresh,
        }
    }
}

/// A run in this process (no launcher), as `pipit train`'s flags set it up: the pipeline, and
/// the text in its tokens. The library ([`crate::api::Training`]) drives it a step at a time.
pub(crate) struct Run {
    pub trainer: Box<dyn TrainLoop + Send>,
    corpus: Corpus,
    tokenizer: Tokenizer,
}

impl Run {
    pub fn new(args: &TrainArgs) -> Result<Self> {
        let config = args.settle(true)?;
        let inputs = Inputs::read(args, &config, None, true)?;
        let trainer = with_backend(
            args.backend,
            BuildTrainer {
                config,
                start: inputs.start(),
            },
        )?;
        for line in trainer.describe() {
            say!("  {line}");
        }
        Ok(Run {
            trainer,
            corpus: inputs.corpus,
            tokenizer: inputs.tokenizer,
        })
    }

    /// One step and, where `pipit train` makes one, an evaluation: the step's `--log-json` line.
    pub fn step(&mut self) -> Result<Value> {
        let (done, steps) = (self.trainer.step(), self.trainer.config().steps);
        if done >= steps {
            return Err(invalid_input!(
                "the run has done its {steps} steps (`steps`); start another with more"
            ));
        }
        let entry = self.trainer.train_step(&self.corpus)?;
        let val = match evaluates_after(self.trainer.config(), entry.step) {
            true => Some(self.evaluate()?),
            false => None,
        };
        Ok(log_line(&entry, val))
    }

    /// The validation loss over the run's `eval_tokens`.
    pub fn evaluate(&mut self) -> Result<f64> {
        let c = self.trainer.config();
        let (seq, tokens) = (c.seq_len, c.eval_tokens);
        Ok(self.trainer.evaluate(&self.corpus.val, seq, tokens)?.0)
    }

    /// Save a checkpoint to `dir`, with the tokenizer's files beside it.
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        let ckpt = self
            .trainer
            .gather_checkpoint()?
            .context("the run in this process holds every stage")?;
        checkpoint::save_with(dir, &ckpt, &self.tokenizer.files())
    }
}

/// Builds the trainer on the chosen backend.
struct BuildTrainer<'a> {
    config: TrainConfig,
    start: Init<'a>,
}

impl BackendJob for BuildTrainer<'_> {
    type Output = Box<dyn TrainLoop + Send>;

    fn run<B: Backend>(self, make: &mut dyn FnMut(usize) -> Result<B>) -> Result<Self::Output> {
        Ok(Box::new(Trainer::new(self.config, make, self.start)?))
    }
}

/// Whether `pipit train` evaluates after `step`: every `eval_every` steps, and after the last.
fn evaluates_after(c: &TrainConfig, step: u64) -> bool {
    step == c.steps || (c.eval_every > 0 && step % c.eval_every == 0)
}

/// A step's line in `--log-json`, with the validation loss `val` when it evaluated.
fn log_line(entry: &StepLog, val: Option<f64>) -> Value {
    let mut line = json!({
        "step": entry.step,
        "loss": entry.loss,
        "lr": entry.lr,
        "tokens_per_sec": entry.tokens_per_sec,
        "bubble_fraction": entry.bubble_fraction,
        "peak_bytes": entry.report.ranks.iter().map(|r| r.peak_bytes).collect::<Vec<_>>(),
    });
    if let Some(v) = val {
        line["val_loss"] = json!(v);
    }
    if let Some(norm) = entry.report.grad_norm {
        line["grad_norm"] = json!(norm);
    }
    line
}

struct TrainJob<'a> {
    args: &'a TrainArgs,
    config: TrainConfig,
    corpus: Corpus,
    tokenizer: &'a Tokenizer,
    resume: Option<&'a Checkpoint>,
    init: Option<&'a Checkpoint>,
    launch: Option<LaunchEnv>,
}

impl BackendJob for TrainJob<'_> {
    type Output = ();

    fn run<B: Backend>(self, make: &mut dyn FnMut(usize) -> Result<B>) -> Result<()> {
        if self.launch.is_some() && self.args.transport == TransportChoice::Nccl {
            return Err(invalid_input!(
                "--transport nccl moves tensors between CUDA ranks: use it with --backend cuda"
            ));
        }
        self.train(make, None)
    }

    fn run_cuda(self, make: &mut dyn FnMut(usize) -> Result<CudaBackend>) -> Result<()> {
        let nccl = (self.args.transport != TransportChoice::Tcp).then_some(&NcclSetup);
        self.train(make, nccl.map(|s| s as &dyn TensorSetup<CudaBackend>))
    }
}

impl TrainJob<'_> {
    /// Train on `make`'s devices; under a launcher, tensors between ranks go over `tensors`
    /// where given, else over TCP.
    fn train<B: Backend>(
        self,
        make: &mut dyn FnMut(usize) -> Result<B>,
        tensors: Option<&dyn TensorSetup<B>>,
    ) -> Result<()> {
        let TrainJob {
            args,
            config,
            corpus,
            tokenizer,
            resume,
            init,
            launch,
        } = self;
        let start = match (resume, init) {
            (Some(c), _) => Init::Resume(c),
            (None, Some(c)) => Init::Weights(c),
            (None, None) => Init::Fresh,
        };
        let mut trainer: Box<dyn TrainLoop> = match &launch {
            Some(env) => {
                let backend = make(env.local_rank)?;
                let timeout = Duration::from_secs_f64(args.peer_timeout);
                let mut rank = match tensors {
                    Some(t) => {
                        RankTrainer::with_tensor_transport(config, backend, start, env, timeout, t)?
                    }
                    None => RankTrainer::new(config, backend, start, env, timeout)?,
                };
                // The first stage reads the inputs and the last the targets: every rank must
                // hold the same tokens (the same text, cut by the same tokenizer).
                let tokens = json!({
                    "tokens": [corpus.train.len(), corpus.val.len()],
                    "checksum": corpus.checksum(),
                });
                if let Err(e) = rank.same_settings("training tokens", &tokens) {
                    TrainLoop::abort(&mut rank, &format!("{e:#}"));
                    return Err(e);
                }
                Box::new(rank)
            }
            None => Box::new(Trainer::new(config, make, start)?),
        };
        if launch.is_none() {
            interrupt::catch();
        }
        let result = Self::drive(args, trainer.as_mut(), &corpus, tokenizer);
        if let Err(e) = &result {
            // The other ranks of a multi-process run stop at once, naming this one and why.
            trainer.abort(&format!("{e:#}"));
        }
        result
    }

    /// Train to the last step. Only the leader (the one process, or rank 0) prints, logs and
    /// saves; the other ranks take part in every step, evaluation and checkpoint gather.
    fn drive(
        args: &TrainArgs,
        trainer: &mut dyn TrainLoop,
        corpus: &Corpus,
        tokenizer: &Tokenizer,
    ) -> Result<()> {
        let save =
            |dir: &Path, ckpt: &Checkpoint| checkpoint::save_with(dir, ckpt, &tokenizer.files());
        let c = trainer.config().clone();
        let leader = trainer.is_leader();
        if leader {
            say!("model: {}", c.summary());
        }
        for line in trainer.describe() {
            say!("  {line}");
        }
        if trainer.step() >= c.steps {
            return Err(invalid_input!(
                "--steps {} is not beyond the checkpoint's step {}; nothing to train",
                c.steps,
                trainer.step()
            ));
        }
        let mut log = match args.log_json.as_ref().filter(|_| leader) {
            Some(path) => Some(
                fs::OpenOptions::new()
                    .create(true)
                    .append(trainer.step() > 0)
                    .write(true)
                    .truncate(trainer.step() == 0)
                    .open(path)
                    .with_context(|| format!("opening --log-json {}", path.display()))?,
            ),
            None => None,
        };
        let save_to = (!args.no_save).then_some(&args.save);
        let bar = if leader {
            ProgressBar::new(c.steps)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_position(trainer.step());
        let mut last: Option<StepLog> = None;
        let mut val_loss = None;
        while trainer.step() < c.steps && !interrupt::requested() {
            let entry = trainer.train_step(corpus)?;
            let step = entry.step;
            let val = if evaluates_after(&c, step) {
                let (loss, _) = trainer.evaluate(&corpus.val, c.seq_len, c.eval_tokens)?;
                val_loss = Some(loss);
                let line = format!(
                    "step {step}: train loss {:.4}, val loss {loss:.4}, {:.0} tokens/s, bubble {:.1}%",
                    entry.loss,
                    entry.tokens_per_sec,
                    100.0 * entry.bubble_fraction
                );
                // A hidden bar (output not a terminal) prints nothing; logs still get the line.
                if bar.is_hidden() && leader {
                    say!("{line}");
                } else {
                    bar.println(line);
                }
                Some(loss)
            } else {
                None
            };
            bar.set_position(step);
            let norm = entry
                .report
                .grad_norm
                .map(|n| format!(" | norm {n:.3}"))
                .unwrap_or_default();
            bar.set_message(format!(
                "loss {:.4}{norm} | {:.0} tok/s | bubble {:.1}%",
                entry.loss,
                entry.tokens_per_sec,
                100.0 * entry.bubble_fraction
            ));
            if let Some(f) = log.as_mut() {
                let line = log_line(&entry, val);
                // One write per line, so a reader following the file never sees half of one.
                f.write_all(format!("{line}\n").as_bytes())
                    .context("writing --log-json")?;
            }
            if save_to.is_some()
                && args.save_every > 0
                && step % args.save_every == 0
                && step != c.steps
            {
                if let Some(ckpt) = trainer.gather_checkpoint()? {
                    save(&args.save, &ckpt)?;
                }
            }
            last = Some(entry);
        }
        bar.finish_and_clear();
        let final_checkpoint = match save_to {
            Some(_) => trainer.gather_checkpoint()?,
            None => None,
        };
        // Nothing more crosses between ranks: all of them finish before rank 0 writes.
        trainer.finish()?;
        if let (Some(dir), Some(ckpt)) = (save_to, final_checkpoint) {
            save(dir, &ckpt)?;
            say!("saved checkpoint to {}", dir.display());
        }
        if !leader {
            return Ok(());
        }
        if let (Some(path), Some(entry)) = (&args.trace, &last) {
            trace::write_measured(path, &entry.report)?;
            say!(
                "wrote the last step's measured timeline to {}",
                path.display()
            );
        }
        if let Some(entry) = &last {
            let val = val_loss
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "-".into());
            println!(
                "step {}: loss {:.4}, val loss {val} nats/{}, {:.0} tokens/s, measured bubble {:.1}%",
                entry.step,
                entry.loss,
                tokenizer.unit(),
                entry.tokens_per_sec,
                100.0 * entry.bubble_fraction
            );
        }
        if trainer.step() < c.steps {
            let step = trainer.step();
            let kept = match save_to {
                Some(dir) => format!(
                    "saved {dir} (continue with: pipit train --resume {dir})",
                    dir = dir.display()
                ),
                None => "nothing saved (--no-save)".into(),
            };
            return Err(interrupt::Interrupted(format!(
                "stopped by Ctrl-C after step {step} of {}; {kept}",
                c.steps
            ))
            .into());
        }
        Ok(())
    }
}

/// `--schedule auto`: the settings with the schedule whose step simulates fastest, among
/// those whose dry run peaks within `limit` bytes on every rank; the `leader` says which and
/// why on stderr.
fn auto_schedule(
    config: &TrainConfig,
    limit: Option<u64>,
    backend: BackendChoice,
    leader: bool,
) -> Result<TrainConfig> {
    let mut choices = config.schedule_choices();
    if choices.is_empty() {
        // Every schedule refuses these settings: 1f1b's error says why.
        let mut plain = config.clone();
        plain.schedule = ScheduleKind::OneFOneB.into();
        plain.validate()?;
        return Err(invalid_input!(
            "--schedule auto: no schedule accepts these settings"
        ));
    }
    let weighed: Vec<String> = choices
        .iter()
        .map(|(c, sim)| format!("{} {:.1} %", label(c), 100.0 * sim.efficiency))
        .collect();
    let mut fit = String::new();
    if let Some(limit) = limit {
        let counting = super::dry_run::Counting::of(backend, config)?;
        let mut least: Option<(u64, String)> = None;
        let mut kept = Vec::new();
        for (c, sim) in choices {
            let peak = super::dry_run::dry_step(c.clone(), counting)?.largest_peak();
            if least.as_ref().is_none_or(|(b, _)| peak < *b) {
                least = Some((peak, label(&c)));
            }
            if peak <= limit {
                kept.push((c, sim));
            }
        }
        if kept.is_empty() {
            let (bytes, which) = least.unwrap_or_default();
            return Err(invalid_input!(
                "--memory-limit {}: no schedule fits; the smallest largest-rank peak is {which}'s, {}",
                super::dry_run::bytes(limit),
                super::dry_run::bytes(bytes)
            ));
        }
        fit = format!(
            ", of those whose dry run fits {}",
            super::dry_run::bytes(limit)
        );
        choices = kept;
    }
    let (chosen, sim) = TrainConfig::fastest(&choices).expect("at least one choice");
    if leader {
        say!(
            "schedule auto: {}, the fastest simulated step ({:.1} % busy under estimated FLOPs{fit}; weighed {})",
            label(chosen),
            100.0 * sim.efficiency,
            weighed.join(", ")
        );
    }
    Ok(chosen.clone())
}

/// A schedule with its chunks where it has several: `1f1b`, `interleaved v=2`.
fn label(c: &TrainConfig) -> String {
    match c.chunks {
        1 => c.schedule.to_string(),
        v => format!("{} v={v}", c.schedule),
    }
}

/// A byte count as `--memory-limit` takes it: a number (`1.5e9`) with an optional unit, B, kB,
/// MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024).
fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "tb" | "t" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => f64::NAN,
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n * scale >= 1.0 && (n * scale).is_finite() => Ok((n * scale) as u64),
        _ => Err(invalid_input!(
            "--memory-limit must be a positive number of bytes with an optional unit (80GB, 512MiB, 1.5e9), got {text}"
        )),
    }
}

/// The first line of a multi-line message (TOML errors span several).
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
