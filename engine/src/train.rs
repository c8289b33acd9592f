//! The training loop: builds the plan and the ranks, then steps, evaluates and checkpoints.
//!
//! [`TrainConfig`] is the plain description of a run (the CLI and `--config FILE` only fill it);
//! [`Trainer`] turns it into a lowered schedule and one [`Rank`] per pipeline rank on any
//! backend, and runs the steps.

use std::ops::Range;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::backend::{Backend, DType};
use crate::checkpoint::Checkpoint;
use crate::data::{eval_batches, sample_batch, Batch, Corpus};
use crate::exec::{
    self, in_process_mesh_over, Decoder, InProcessTransport, Rank, StepOptions, StepReport,
};
use crate::invalid_input;
use crate::model::{
    init_parameters, AdamWConfig, HostTensors, ModelConfig, OptimizerState, StageModel,
};
use crate::partition::Method;
use crate::schedule::{
    generate, generate_for, lower_for, validate, Schedule, ScheduleChoice, ScheduleKind,
};
use crate::sim::{simulate, Costs, Simulation};

/// Everything that defines a training run. Field names are the CLI's flag names with `_`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model sizes (Hugging Face GPT-2 names).
    #[serde(flatten)]
    pub model: ModelConfig,
    /// Schedule generator: naive, gpipe, 1f1b, interleaved, zb-h1, zb-v or dualpipev (or auto, which
    /// the command line resolves to one of them before the run).
    pub schedule: ScheduleChoice,
    /// Pipeline ranks `p`.
    pub stages: usize,
    /// Micro-batches per step `m`.
    pub microbatches: usize,
    /// Stages per rank `v` (interleaved and zb-h1; zb-v runs 2).
    pub chunks: usize,
    /// Partitioner: uniform or balanced (for zb-v, balanced evens out each rank's two stages
    /// together).
    pub partition: Method,
    /// Optimizer steps to train for.
    pub steps: u64,
    /// Sequences per step (split into `microbatches` equal parts).
    pub batch_size: usize,
    /// Tokens per sequence (at most `n_positions`).
    pub seq_len: usize,
    /// Peak learning rate, reached after `warmup_steps` and decayed by a cosine to `min_lr`.
    pub lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: u64,
    /// Floor of the cosine decay.
    pub min_lr: f64,
    /// AdamW decoupled weight decay (matrices and embeddings only).
    pub weight_decay: f64,
    /// AdamW's first-moment decay β₁.
    pub adam_beta1: f64,
    /// AdamW's second-moment decay β₂.
    pub adam_beta2: f64,
    /// AdamW's denominator epsilon.
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value before each update (0: no clipping).
    pub grad_clip: f64,
    /// Seed of the initial weights and of the batch order.
    pub seed: u64,
    /// Evaluate the validation loss every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation tokens per evaluation (consecutive windows from the split's start).
    pub eval_tokens: usize,
    /// Keep only each stage's input in forward and recompute in backward.
    pub checkpoint_activations: bool,
    /// Compute dtype: `f32`, or `bf16` mixed precision (f32 master weights and optimizer).
    pub dtype: DType,
}

/// The main job (`pipit train` with no flags): a 4-layer GPT-2 of width 128 on 128-byte
/// sequences, 4 stages, 1F1B with 8 micro-batches, 3000 steps — sized so that the CPU backend
/// on two cores ends below 1.65 nats per byte of validation loss within five minutes
/// (BENCHMARKS.md, "The default training run").
impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig {
                n_embd: 128,
                n_positions: 128,
                ..ModelConfig::default()
            },
            schedule: ScheduleKind::OneFOneB.into(),
            stages: 4,
            microbatches: 8,
            chunks: 1,
            partition: Method::Uniform,
            steps: 3000,
            batch_size: 16,
            seq_len: 128,
            lr: 2e-3,
            warmup_steps: 100,
            min_lr: 3e-4,
            weight_decay: 0.1,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-8,
            grad_clip: 0.0,
            seed: 1337,
            eval_every: 500,
            eval_tokens: 8192,
            checkpoint_activations: false,
            dtype: DType::F32,
        }
    }
}

impl TrainConfig {
    /// Check every constraint between the fields; the error names the field and the value.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let positive = [
            ("stages", self.stages),
            ("microbatches", self.microbatches),
            ("chunks", self.chunks),
            ("batch-size", self.batch_size),
            ("seq-len", self.seq_len),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(invalid_input!("--{name} must be at least 1, got 0"));
        }
        if self.seq_len > self.model.n_positions {
            return Err(invalid_input!(
                "--seq-len must be at most --n-positions = {}, got {}",
                self.model.n_positions,
                self.seq_len
            ));
        }
        if self.batch_size % self.microbatches != 0 {
            return Err(invalid_input!(
                "--batch-size must be a multiple of --microbatches = {}, got {}",
                self.microbatches,
                self.batch_size
            ));
        }
        // The schedule's own constraints (its name, the chunks it runs) come first.
        let kind = self.schedule.kind()?;
        self.compute_dtype()?;
        generate(kind, self.stages, self.microbatches, self.chunks)?;
        let layers = self.model.layers().len();
        let stages = self.stages * self.chunks;
        if stages > layers {
            return Err(invalid_input!(
                "stages × chunks = {stages} exceeds the model's {layers} layers (embedding, {} blocks, head): use fewer --stages or --chunks, or more --n-layer",
                self.model.n_layer
            ));
        }
        for (flag, beta) in [
            ("adam-beta1", self.adam_beta1),
            ("adam-beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return Err(invalid_input!("--{flag} must be in [0, 1), got {beta}"));
            }
        }
        if self.adam_eps.is_nan() || self.adam_eps <= 0.0 {
            return Err(invalid_input!(
                "--adam-eps must be positive, got {}",
                self.adam_eps
            ));
        }
        self.compute_dtype()?;
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(invalid_input!(
                "--lr must be a positive number, got {}",
                self.lr
            ));
        }
        for (name, value) in [("min-lr", self.min_lr), ("weight-decay", self.weight_decay)] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(invalid_input!(
                    "--{name} must be a number of 0 or more, got {value}"
                ));
            }
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return Err(invalid_input!(
                "--grad-clip must be a norm of 0 (no clipping) or more, got {}",
                self.grad_clip
            ));
        }
        Ok(())
    }

    /// Names of the parameters rank `rank` holds under this run's plan (what it loads from a
    /// checkpoint in a multi-process run).
    pub fn rank_params(&self, rank: usize) -> Result<std::collections::BTreeSet<String>> {
        Ok(self
            .rank_param_shapes(rank)?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Names and shapes of the parameters rank `rank` holds under this run's plan.
    pub fn rank_param_shapes(&self, rank: usize) -> Result<Vec<(String, Vec<usize>)>> {
        let schedule = self.plan()?;
        let ranges = self.stage_layers()?;
        let layers = self.model.layers();
        Ok(schedule
            .stages_of(rank)
            .into_iter()
            .flat_map(|s| self.model.params_of(&layers[ranges[s].clone()]))
            .collect())
    }

    /// The compute dtype named by `dtype`.
    pub fn compute_dtype(&self) -> Result<DType> {
        match self.dtype {
            DType::F32 | DType::BF16 => Ok(self.dtype),
            other => Err(invalid_input!("--dtype must be f32 or bf16, got {other}")),
        }
    }

    /// Learning rate of 1-based step `step`: linear warm-up, then cosine decay to `min_lr`.
    pub fn lr_at(&self, step: u64) -> f32 {
        // In f32, as the optimizer takes it.
        let (lr, min_lr) = (self.lr as f32, self.min_lr as f32);
        if step <= self.warmup_steps {
            return lr * step as f32 / self.warmup_steps.max(1) as f32;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f32;
        let progress = ((step - self.warmup_steps) as f32 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
        min_lr + (lr - min_lr) * cosine
    }

    /// The optimizer settings of step `step` (1-based).
    pub fn step_options(&self, step: u64) -> StepOptions {
        StepOptions {
            checkpoint_activations: self.checkpoint_activations,
            lr: self.lr_at(step),
            step: step as u32,
            adamw: AdamWConfig {
                beta1: self.adam_beta1 as f32,
                beta2: self.adam_beta2 as f32,
                eps: self.adam_eps as f32,
                weight_decay: self.weight_decay as f32,
                grad_clip: self.grad_clip as f32,
            },
        }
    }

    /// The lowered, validated schedule this configuration runs, its order (where it depends on
    /// costs, as zb-v's) and its transfers placed for the estimated
    /// [`TrainConfig::stage_costs`].
    pub fn plan(&self) -> Result<Schedule> {
        let kind = self.schedule.kind()?;
        let costs = self.stage_costs()?;
        let compute = generate_for(kind, self.stages, self.microbatches, self.chunks, &costs)?;
        let lowered = lower_for(&compute, &costs)?;
        validate(&lowered)?;
        Ok(lowered)
    }

    /// The layers of `stages`: `stage 0: embedding..=block 0, stage 7: block 11..=head`.
    pub fn stage_names(&self, stages: &[usize]) -> Result<String> {
        let ranges = self.stage_layers()?;
        let layers = self.model.layers();
        Ok(stages
            .iter()
            .map(|&s| {
                let r = &ranges[s];
                format!("stage {s}: {}..={}", layers[r.start], layers[r.end - 1])
            })
            .collect::<Vec<_>>()
            .join(", "))
    }

    /// One line of what this run is: `4 layers, 4 heads, width 64, 220544 parameters | 1f1b
    /// schedule, p=4 m=8 v=1, batch 16×64 tokens, f32` (and `, activations checkpointed`).
    pub fn summary(&self) -> String {
        let m = &self.model;
        format!(
            "{} layers, {} heads, width {}, {} parameters | {} schedule, p={} m={} v={}, batch {}×{} tokens, {}{}",
            m.n_layer,
            m.n_head,
            m.n_embd,
            m.num_parameters(),
            self.schedule,
            self.stages,
            self.microbatches,
            self.chunks,
            self.batch_size,
            self.seq_len,
            self.dtype,
            if self.checkpoint_activations {
                ", activations checkpointed"
            } else {
                ""
            }
        )
    }

    /// The schedules `--schedule auto` weighs for these stages and micro-batches, those the
    /// model's layers allow, each with its step simulated under [`TrainConfig::stage_costs`]
    /// (transfers free): 1f1b, zb-h1 (over `chunks`), interleaved (over `chunks`, at least 2),
    /// zb-v, dualpipev and gpipe, in that order, the order [`TrainConfig::fastest`] keeps on ties (1F1B
    /// holds fewer micro-batches than GPipe for the same time).
    pub fn schedule_choices(&self) -> Vec<(TrainConfig, Simulation)> {
        let chunks = self.chunks.max(1);
        [
            (ScheduleKind::OneFOneB, 1),
            (ScheduleKind::ZeroBubble, chunks),
            (ScheduleKind::Interleaved, chunks.max(2)),
            (ScheduleKind::ZeroBubbleV, 2),
            (ScheduleKind::DualPipeV, 2),
            (ScheduleKind::GPipe, 1),
        ]
        .into_iter()
        .filter_map(|(schedule, chunks)| {
            let config = TrainConfig {
                schedule: schedule.into(),
                chunks,
                ..self.clone()
            };
            config.validate().ok()?;
            let simulation = simulate(&config.plan().ok()?, &config.stage_costs().ok()?).ok()?;
            Some((config, simulation))
        })
        .collect()
    }

    /// Of `choices`, the first with the shortest simulated step (within a part in a million).
    pub fn fastest(choices: &[(TrainConfig, Simulation)]) -> Option<&(TrainConfig, Simulation)> {
        choices.iter().fold(None, |best, c| match best {
            Some(b) if b.1.makespan <= c.1.makespan * (1.0 + 1e-6) => Some(b),
            _ => Some(c),
        })
    }

    /// Estimated compute cost of each stage, in forward FLOPs per token ([`layer_costs`]):
    /// backward twice the forward, and as a split backward's weight share the blocks'
    /// weight-gradient products (as many FLOPs as their forward matmuls). Lowering for these
    /// rather than for equal halves matters under zero bubble: a receive placed where equal
    /// halves would have the data arrive can stall a rank that had a forward to run.
    pub fn stage_costs(&self) -> Result<Costs> {
        let layers = self.model.layers();
        let per_layer = layer_costs(&self.model, self.seq_len);
        let ranges = self.stage_layers()?;
        let fwd: Vec<f64> = ranges
            .iter()
            .map(|r| per_layer[r.clone()].iter().sum())
            .collect();
        let weight_share = ranges
            .iter()
            .zip(&fwd)
            .map(|(r, f)| {
                let weight_flops: f64 = layers[r.clone()]
                    .iter()
                    .map(|&l| self.model.layer_weight_flops(l))
                    .sum();
                (weight_flops / (2.0 * f)).clamp(0.01, 0.99)
            })
            .collect();
        Ok(Costs {
            bwd: fwd.iter().map(|f| 2.0 * f).collect(),
            fwd,
            weight_share,
            ..Costs::uniform(ranges.len())
        })
    }

    /// The layers of each stage, in stage order.
    pub fn stage_layers(&self) -> Result<Vec<Range<usize>>> {
        let layers = self.model.layers().len();
        let stages = self.stages * self.chunks;
        match self.partition {
            Method::Uniform => crate::partition::uniform(layers, stages),
            // The V's ranks each run two stages from opposite ends: balance the ranks.
            Method::Balanced if self.schedule.kind().is_ok_and(ScheduleKind::is_v) => {
                crate::partition::balanced_v(&layer_costs(&self.model, self.seq_len), self.stages)
            }
            Method::Balanced => {
                crate::partition::balanced(&layer_costs(&self.model, self.seq_len), stages)
            }
            Method::MemoryCapped => Err(invalid_input!(
                "--partition must be uniform or balanced to train, got memory-capped (a method of `pipit partition`)"
            )),
        }
    }
}

/// Relative cost of each layer (forward FLOPs per token, as its parts count them), for the
/// balanced partitioner.
pub fn layer_costs(model: &ModelConfig, seq: usize) -> Vec<f64> {
    model
        .layers()
        .into_iter()
        .map(|l| model.layer_flops(l, seq))
        .collect()
}

/// Zero-filled tensors of these names and shapes ([`Init::Blank`]).
pub(crate) fn blank_parameters(shapes: Vec<(String, Vec<usize>)>) -> Result<HostTensors> {
    let mut t = HostTensors::new();
    for (name, shape) in shapes {
        let len = shape.iter().product();
        t.insert(name, shape, vec![0.0; len])?;
    }
    Ok(t)
}

/// How a trainer's weights start.
pub enum Init<'a> {
    /// Fresh GPT-2 initialisation from the config's seed.
    Fresh,
    /// Every weight zero, drawn from nothing: for runs whose values do not matter, such as a
    /// dry run on the meta backend (the host's zeroed pages are never touched).
    Blank,
    /// A checkpoint's weights with a fresh optimizer (`--init`).
    Weights(&'a Checkpoint),
    /// A checkpoint's weights for inference (`generate`, `eval`): no gradients and no
    /// optimizer state are allocated, and training steps are errors.
    Frozen(&'a Checkpoint),
    /// [`Init::Blank`] for inference, as [`Init::Frozen`] holds it: `generate --dry-run`.
    BlankFrozen,
    /// A checkpoint's weights, optimizer state and step (`--resume`).
    Resume(&'a Checkpoint),
}

/// One step's figures, as `--log-json` writes them.
#[derive(Clone, Debug)]
pub struct StepLog {
    /// 1-based step number.
    pub step: u64,
    /// Training loss of the step's batch (nats per token).
    pub loss: f32,
    /// Learning rate used.
    pub lr: f32,
    /// Training tokens per second of wall time.
    pub tokens_per_sec: f64,
    /// Measured bubble fraction of the pipeline.
    pub bubble_fraction: f64,
    /// What the executor measured.
    pub report: StepReport,
}

impl StepLog {
    /// The figures of step `step`, trained at `lr` on `batch`; a loss that is not finite is
    /// an error (the run diverged).
    pub fn new(step: u64, lr: f32, batch: &Batch, report: StepReport) -> Result<Self> {
        if !report.loss.is_finite() {
            return Err(anyhow!(
                "step {step}: the loss is {} (training diverged)",
                report.loss
            ));
        }
        let tokens = (batch.batch * batch.seq) as f64;
        Ok(StepLog {
            step,
            loss: report.loss,
            lr,
            tokens_per_sec: tokens / report.elapsed.as_secs_f64().max(1e-9),
            bubble_fraction: report.bubble_fraction(),
            report,
        })
    }
}

/// A pipeline ready to train: the plan, and one rank per pipeline rank with its stages.
pub struct Trainer<B: Backend> {
    /// The run's settings.
    pub config: TrainConfig,
    /// The lowered schedule every step runs.
    pub schedule: Schedule,
    /// Ranks, indexed by rank.
    pub ranks: Vec<Rank<B, InProcessTransport>>,
    /// Steps completed so far.
    pub step: u64,
    /// Key/value caches for [`Trainer::next_tokens_logits`]: per rank, one per pass, made
    /// on first use and dropped by every training step. (A caller that changes the weights
    /// through `ranks` itself must not reuse them.)
    decoders: Vec<Vec<Decoder<B>>>,
}

impl<B: Backend> Trainer<B> {
    /// Build the plan and the ranks; `make_backend(r)` gives rank `r` its device.
    pub fn new(
        config: TrainConfig,
        mut make_backend: impl FnMut(usize) -> Result<B>,
        init: Init<'_>,
    ) -> Result<Self> {
        config.validate()?;
        let schedule = config.plan()?;
        let layer_ranges = config.stage_layers()?;
        let fresh;
        let host: &HostTensors = match &init {
            Init::Fresh => {
                fresh = init_parameters(&config.model, config.seed)?;
                &fresh
            }
            Init::Blank | Init::BlankFrozen => {
                fresh = blank_parameters(config.model.all_params())?;
                &fresh
            }
            Init::Weights(c) | Init::Resume(c) | Init::Frozen(c) => checkpoint_params(c, &config)?,
        };
        let backends = (0..schedule.num_ranks())
            .map(|r| make_backend(r).with_context(|| format!("creating rank {r}'s device")))
            .collect::<Result<Vec<B>>>()?;
        let spaces: Vec<_> = backends.iter().map(|b| b.memory_space()).collect();
        let transports = in_process_mesh_over(&spaces, exec::DEFAULT_RECV_TIMEOUT);
        let mut ranks = Vec::with_capacity(schedule.num_ranks());
        for ((r, transport), backend) in transports.into_iter().enumerate().zip(backends) {
            let mut stages = Vec::new();
            for stage in schedule.stages_of(r) {
                let layers = layer_ranges[stage].clone();
                let model = training_stage(&backend, &config, layers, host, &init)?;
                stages.push((stage, model));
            }
            ranks.push(Rank {
                rank: r,
                backend,
                transport,
                stages,
            });
        }
        let step = match &init {
            Init::Resume(c) => resumed_step(c, &config)?,
            _ => 0,
        };
        Ok(Self {
            config,
            schedule,
            ranks,
            step,
            decoders: Vec::new(),
        })
    }

    /// One line per rank naming its device and its stages' layers.
    pub fn describe(&self) -> Vec<String> {
        self.ranks
            .iter()
            .map(|r| {
                let stages: Vec<usize> = r.stages.iter().map(|(s, _)| *s).collect();
                let layers = self.config.stage_names(&stages).unwrap_or_default();
                format!("rank {}: {} | {layers}", r.rank, r.backend.describe())
            })
            .collect()
    }

    /// Train one step on the next batch of `corpus.train`.
    pub fn train_step(&mut self, corpus: &Corpus) -> Result<StepLog> {
        // Keys and values cached under the old weights would no longer be the model's.
        self.decoders.clear();
        let step = self.step + 1;
        let c = &self.config;
        let batch = sample_batch(&corpus.train, c.batch_size, c.seq_len, c.seed, step)?;
        let opts = c.step_options(step);
        let lr = opts.lr;
        let report = exec::train_step(&self.schedule, &mut self.ranks, &batch, &opts)?;
        let log = StepLog::new(step, lr, &batch, report)?;
        self.step = step;
        Ok(log)
    }

    /// Mean cross-entropy (nats per token) over consecutive windows of `seq` tokens of `data`,
    /// at most `max_tokens` of them (0: all); returns the loss and the tokens scored. The
    /// batches of windows flow through the ranks as through a pipeline.
    pub fn evaluate<T: Copy + Into<u32>>(
        &mut self,
        data: &[T],
        seq: usize,
        max_tokens: usize,
    ) -> Result<(f64, usize)> {
        let batches = eval_batches(data, seq, max_tokens, self.config.batch_size)?;
        let placement = &self.schedule.placement;
        let mut none = vec![(); self.ranks.len()];
        let sums = exec::on_every_rank(&mut self.ranks, &mut none, |rank, _| {
            exec::evaluate_rank(placement, rank, &batches)
        })?;
        let (sum, count) = sums[placement[placement.len() - 1]];
        Ok((sum / count as f64, count))
    }

    /// Logits of the last position of `tokens` (one sequence, at most `n_positions` long), for
    /// sampling: [`Trainer::next_tokens_logits`] for one sequence.
    pub fn next_token_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        Ok(self.next_tokens_logits(&[tokens], 1)?.remove(0))
    }

    /// The last position's logits after each of `contexts` (sequences generated side by side,
    /// each at most `n_positions` long), run through the stages in passes of up to `batch`
    /// sequences of one length, the ranks working on different passes at once. Each rank
    /// keeps, per pass, the keys and values of the last call's tokens: when those begin the
    /// pass's contexts, only the tokens after them run (in f32; see [`Decoder`]).
    pub fn next_tokens_logits(
        &mut self,
        contexts: &[&[u32]],
        batch: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let (capacity, vocab) = (self.config.model.n_positions, self.config.model.vocab_size);
        if self.decoders.len() != self.ranks.len() {
            self.decoders = self.ranks.iter().map(|_| Vec::new()).collect();
        }
        let placement = &self.schedule.placement;
        let rows = exec::on_every_rank(&mut self.ranks, &mut self.decoders, |rank, decs| {
            exec::decode_rank(placement, rank, decs, contexts, batch, capacity, vocab)
        });
        // After a failure no rank's caches are to be trusted.
        let mut rows = rows.inspect_err(|_| self.decoders.clear())?;
        let rows = std::mem::take(&mut rows[placement[placement.len() - 1]]);
        Ok(rows.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// The whole model, optimizer state and training position as one checkpoint.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let mut params = HostTensors::new();
        let mut optimizer = OptimizerState::default();
        for rank in &self.ranks {
            for (_, model) in &rank.stages {
                // The tied embedding appears on the first and last stage; the copies are equal.
                params.extend(model.download_params(&rank.backend)?);
                let state = model.optimizer_state(&rank.backend)?;
                optimizer.m.extend(state.m);
                optimizer.v.extend(state.v);
            }
        }
        let state = json!({
            "step": self.step,
            "seed": self.config.seed,
            "data_position": { "kind": "sampled", "seed": self.config.seed, "next_step": self.step + 1 },
            "config": self.config,
        });
        Ok(Checkpoint {
            config: self.config.model.clone(),
            params,
            optimizer: Some(optimizer),
            trainer_state: Some(state),
        })
    }
}

/// What `pipit train` drives step by step: the whole pipeline in one process ([`Trainer`]),
/// or one rank of a multi-process run ([`crate::dist::RankTrainer`]). In a multi-process run
/// every method is collective: all ranks call the same ones in the same order.
pub trait TrainLoop {
    /// The run's settings.
    fn config(&self) -> &TrainConfig;
    /// Steps completed so far.
    fn step(&self) -> u64;
    /// True on the process that reports: it prints, writes logs and saves checkpoints.
    fn is_leader(&self) -> bool {
        true
    }
    /// One line per rank naming its device and its stages' layers.
    fn describe(&self) -> Vec<String>;
    /// Train one step on the next batch of `corpus.train`.
    fn train_step(&mut self, corpus: &Corpus) -> Result<StepLog>;
    /// Mean cross-entropy over windows of `data` and the tokens scored ([`Trainer::evaluate`]).
    fn evaluate(&mut self, data: &[u32], seq: usize, max_tokens: usize) -> Result<(f64, usize)>;
    /// The whole model, optimizer state and position as one checkpoint, on the leader
    /// (`None` on the other ranks, which send their stages to it).
    fn gather_checkpoint(&mut self) -> Result<Option<Checkpoint>>;
    /// End the run cleanly (multi-process: once every peer has finished too).
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
    /// Stop after a failure, telling the peers `reason`.
    fn abort(&mut self, _reason: &str) {}
    /// The logits after `tokens` ([`Trainer::next_token_logits`]), where this process holds
    /// every stage.
    fn next_token_logits(&mut self, _tokens: &[u32]) -> Result<Vec<f32>> {
        Err(anyhow!(
            "logits come from a run whose stages are all in this process"
        ))
    }
}

impl<B: Backend> TrainLoop for Trainer<B> {
    fn config(&self) -> &TrainConfig {
        &self.config
    }
    fn step(&self) -> u64 {
        self.step
    }
    fn describe(&self) -> Vec<String> {
        Trainer::describe(self)
    }
    fn train_step(&mut self, corpus: &Corpus) -> Result<StepLog> {
        Trainer::train_step(self, corpus)
    }
    fn evaluate(&mut self, data: &[u32], seq: usize, max_tokens: usize) -> Result<(f64, usize)> {
        Trainer::evaluate(self, data, seq, max_tokens)
    }
    fn gather_checkpoint(&mut self) -> Result<Option<Checkpoint>> {
        self.checkpoint().map(Some)
    }
    fn next_token_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        Trainer::next_token_logits(self, tokens)
    }
}

/// The weights of checkpoint `c`, after checking that they are of `config`'s model.
pub(crate) fn checkpoint_params<'c>(
    c: &'c Checkpoint,
    config: &TrainConfig,
) -> Result<&'c HostTensors> {
    if c.config != config.model {
        return Err(invalid_input!(
            "the checkpoint's model ({:?}) differs from the one asked for ({:?})",
            c.config,
            config.model
        ));
    }
    Ok(&c.params)
}

/// The layers `layers` of `config`'s model on `backend`, ready to train: weights from `host`,
/// the run's compute dtype, and the optimizer state when resuming.
pub(crate) fn training_stage<B: Backend>(
    backend: &B,
    config: &TrainConfig,
    layers: Range<usize>,
    host: &HostTensors,
    init: &Init<'_>,
) -> Result<StageModel<B>> {
    let mut model = match init {
        Init::Frozen(_) | Init::BlankFrozen => {
            StageModel::for_inference(backend, &config.model, layers, host)?
        }
        _ => StageModel::new(backend, &config.model, layers, host)?,
    };
    model.set_dtype(backend, config.compute_dtype()?)?;
    if let Init::Resume(c) = init {
        let opt = c.optimizer.as_ref().ok_or_else(|| {
            invalid_input!("the checkpoint has no optimizer state to resume from")
        })?;
        model.load_optimizer_state(backend, opt)?;
    }
    Ok(model)
}

pub(crate) fn resumed_step(c: &Checkpoint, config: &TrainConfig) -> Result<u64> {
    let state = c
        .trainer_state
        .as_ref()
        .ok_or_else(|| invalid_input!("the checkpoint has no trainer_state.json to resume from"))?;
    let step = state["step"]
        .as_u64()
        .ok_or_else(|| invalid_input!("trainer_state.json has no step"))?;
    let seed = state["seed"].as_u64().unwrap_or(config.seed);
    if seed != config.seed {
        return Err(invalid_input!(
            "--seed must match the checkpoint's seed {seed} to resume its batch order, got {}",
            config.seed
        ));
    }
    Ok(step)
}

#[cfg(test)]
mod tests {

    #[test]
    fn auto_weighs_the_schedules_the_layers_allow_and_keeps_the_first_on_ties() {
        // 6 layers over 4 ranks: no room for 2 chunks a rank.
        let four = TrainConfig::default();
        let names: Vec<String> = four
            .schedule_choices()
            .iter()
            .map(|(c, _)| format!("{} {}", c.schedule, c.chunks))
            .collect();
        assert_eq!(names, ["1f1b 1", "zb-h1 1", "gpipe 1"]);
        let two = TrainConfig {
            stages: 2,
            ..TrainConfig::default()
        };
        let choices = two.schedule_choices();
        let names: Vec<String> = choices
            .iter()
            .map(|(c, _)| c.schedule.to_string())
            .collect();
        assert_eq!(
            names,
            ["1f1b", "zb-h1", "interleaved", "zb-v", "dualpipev", "gpipe"]
        );
        let (best, sim) = TrainConfig::fastest(&choices).unwrap();
        assert!(choices.iter().all(|(_, s)| sim.makespan <= s.makespan));
        // Split backwards fill the drain: zero bubble beats 1F1B's order.
        assert!(
            best.schedule.to_string().starts_with("zb"),
            "{}",
            best.schedule
        );
        // Equal steps: the first listed stays (1f1b before gpipe).
        let tied = [
            choices[0].clone(),
            (choices[5].0.clone(), choices[0].1.clone()),
        ];
        assert_eq!(
            TrainConfig::fastest(&tied).unwrap().0.schedule,
            ScheduleKind::OneFOneB.into()
        );
    }

    use super::*;

    #[test]
    fn learning_rate_warms_up_then_decays_to_the_floor() {
        let c = TrainConfig {
            steps: 100,
            warmup_steps: 10,
            lr: 1.0,
            min_lr: 0.1,
            ..Default::default()
        };
        assert!((c.lr_at(1) - 0.1).abs() < 1e-6);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-6);
        assert!((c.lr_at(55) - 0.55).abs() < 1e-5);
        assert!((c.lr_at(100) - 0.1).abs() < 1e-6);
        assert!(c.lr_at(30) > c.lr_at(60));
    }

    /// The default model (4 blocks, width 64, T = 64) on 4 stages: embedding + block 0 |
    /// blocks 1-2 | block 3 | head. A block's weight products are 12·C² of its 12·C² + 2·T·C
    /// forward multiply-adds, half of that share of a backward twice as long.
    #[test]
    fn stage_costs_follow_the_layers() {
        let c = TrainConfig {
            schedule: ScheduleKind::ZeroBubble.into(),
            ..Default::default()
        };
        let costs = c.stage_costs().unwrap();
        let per_layer = layer_costs(&c.model, c.seq_len);
        assert_eq!(costs.fwd[2], per_layer[4]);
        assert_eq!(costs.fwd[1], per_layer[2] + per_layer[3]);
        assert_eq!(costs.bwd[2], 2.0 * costs.fwd[2]);
        let (w, t) = (64.0 * 64.0 * 12.0, 2.0 * 64.0 * 64.0);
        assert!((costs.weight_share[2] - 0.5 * w / (w + t)).abs() < 1e-12);
        assert_eq!(costs.weight_share[1], costs.weight_share[2]);
        // The head's backward is all input gradient: the least a share may be.
        assert_eq!(costs.weight_share[3], 0.01);
        assert!(costs.weight_share.iter().all(|&s| s > 0.0 && s < 0.5));
        c.plan().unwrap();
    }

    /// Balanced under the V evens out each rank's two stages together: on the default model
    /// the uniform cut leaves rank 1 three blocks against rank 0's one beside the two ends.
    #[test]
    fn a_balanced_v_evens_out_the_ranks() {
        let c = TrainConfig {
            schedule: ScheduleKind::ZeroBubbleV.into(),
            stages: 2,
            chunks: 2,
            partition: Method::Balanced,
            ..Default::default()
        };
        let per_layer = layer_costs(&c.model, c.seq_len);
        let rank_costs = |c: &TrainConfig| {
            let stages = c.stage_layers().unwrap();
            let cost = |s: usize| per_layer[stages[s].clone()].iter().sum::<f64>();
            [cost(0) + cost(3), cost(1) + cost(2)]
        };
        let balanced = rank_costs(&c);
        let uniform = rank_costs(&TrainConfig {
            partition: Method::Uniform,
            ..c.clone()
        });
        let busiest = |r: [f64; 2]| r[0].max(r[1]);
        assert!(busiest(balanced) < busiest(uniform));
        assert_eq!(
            c.stage_layers().unwrap(),
            crate::partition::balanced_v(&per_layer, 2).unwrap()
        );
        c.plan().unwrap();
    }

    #[test]
    fn constraints_name_the_field_and_value() {
        let bad = TrainConfig {
            batch_size: 10,
            microbatches: 4,
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("--batch-size") && err.contains("10"), "{err}");
        let bad = TrainConfig {
            stages: 40,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("exceeds"));
    }
}
