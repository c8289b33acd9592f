//! One training step of a lowered schedule: every rank walks its action list on its own
//! thread, then tied embeddings are reconciled and each stage's optimizer steps once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::collective::Group;
use crate::backend::{Backend, Transport};
use crate::data::Batch;
use crate::model::{AdamWConfig, Keep, Saved, StageInput, StageModel, StageOutput, WeightGrads};
use crate::schedule::{Action, Schedule};
use crate::sim::Timed;

/// One pipeline rank: its device, its link to the other ranks, and the stages it runs.
pub struct Rank<B: Backend, T: Transport<B>> {
    /// This rank's index in the schedule.
    pub rank: usize,
    /// The device this rank computes on.
    pub backend: B,
    /// This rank's end of the peer-transfer mesh.
    pub transport: T,
    /// `(stage index, model)` for every stage placed on this rank, in increasing stage order.
    pub stages: Vec<(usize, StageModel<B>)>,
}

/// The model of `stage` among a rank's stages.
fn stage_mut<B: Backend>(
    stages: &mut [(usize, StageModel<B>)],
    stage: usize,
) -> Result<&mut StageModel<B>> {
    stages
        .iter_mut()
        .find(|(s, _)| *s == stage)
        .map(|(_, m)| m)
        .ok_or_else(|| anyhow!("this rank does not hold stage {stage}"))
}

/// Settings of one optimizer step.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    /// Keep only each stage's input in forward and recompute the rest in backward.
    pub checkpoint_activations: bool,
    /// Learning rate of this step.
    pub lr: f32,
    /// 1-based optimizer step number (AdamW bias correction).
    pub step: u32,
    /// AdamW hyper-parameters other than the learning rate.
    pub adamw: AdamWConfig,
}

/// What one rank measured during a step.
#[derive(Clone, Debug, Default)]
pub struct RankReport {
    /// Every action in the order run, including transfers (a receive's span includes its
    /// wait); milliseconds since the step began, as the simulator's timelines are.
    pub timeline: Vec<Timed>,
    /// Milliseconds spent in compute actions.
    pub busy: f64,
    /// Peak bytes of device memory during the step (parameters, gradients, optimizer state
    /// and activations).
    pub peak_bytes: u64,
    /// Peak bytes held for backward at once: saved activations, and the operands of weight
    /// gradients a split backward left for later.
    pub peak_activation_bytes: u64,
    /// Peak number of micro-batches held at once, from forward until their weight gradients.
    pub peak_inflight: usize,
    /// The global gradient norm before clipping (every rank computes the same), when
    /// gradients are clipped.
    pub grad_norm: Option<f64>,
}

/// What a training step measured.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Mean cross-entropy over every target token of the batch (nats per token).
    pub loss: f32,
    /// Wall time of the whole step, optimizer included.
    pub elapsed: Duration,
    /// Milliseconds from the step's start to the last rank's last action (the makespan).
    pub makespan: f64,
    /// Per-rank measurements, indexed by rank.
    pub ranks: Vec<RankReport>,
    /// The global gradient norm before clipping, when gradients are clipped.
    pub grad_norm: Option<f64>,
}

impl StepReport {
    /// The report of a step from its loss, wall time and per-rank figures; the makespan is the
    /// end of the last action on any rank.
    pub fn new(loss: f32, elapsed: Duration, ranks: Vec<RankReport>) -> Self {
        let makespan = ranks
            .iter()
            .filter_map(|r| r.timeline.last().map(|a| a.end))
            .fold(0.0, f64::max);
        let grad_norm = ranks.iter().find_map(|r| r.grad_norm);
        Self {
            loss,
            elapsed,
            makespan,
            ranks,
            grad_norm,
        }
    }

    /// Measured bubble fraction: idle / (ranks × makespan), idle being time not in compute.
    pub fn bubble_fraction(&self) -> f64 {
        if self.makespan <= 0.0 || self.ranks.is_empty() {
            return 0.0;
        }
        let busy: f64 = self.ranks.iter().map(|r| r.busy).sum();
        (1.0 - busy / (self.ranks.len() as f64 * self.makespan)).max(0.0)
    }
}

/// Run one training step of `schedule` (lowered: transfers included) over `batch`, split into
/// `schedule.microbatches` equal micro-batches, on `ranks` (element `r` is rank `r`).
///
/// Gradients accumulate over the micro-batches (each scaled so the sum is the gradient of the
/// batch's mean loss); after the flush the two copies of the tied embedding gradient are summed,
/// every stage takes one AdamW step, and gradients are zeroed.
pub fn train_step<B: Backend, T: Transport<B>>(
    schedule: &Schedule,
    ranks: &mut [Rank<B, T>],
    batch: &Batch,
    opts: &StepOptions,
) -> Result<StepReport> {
    let m = schedule.microbatches;
    if batch.batch % m != 0 {
        return Err(crate::invalid_input!(
            "batch size {} must be a multiple of the micro-batch count {m}",
            batch.batch
        ));
    }
    if ranks.len() != schedule.num_ranks() {
        return Err(anyhow!(
            "{} ranks for a schedule of {}",
            ranks.len(),
            schedule.num_ranks()
        ));
    }
    let micro: Vec<Batch> = (0..m).map(|i| batch.microbatch(i, m)).collect();
    let loss_scale = 1.0 / (batch.batch * batch.seq) as f32;
    let start = Instant::now();
    let mut none = vec![(); ranks.len()];
    let results = super::on_every_rank(ranks, &mut none, |rank, _| {
        run_rank(schedule, rank, &micro, loss_scale, opts, start)
    })?;
    let mut reports = Vec::with_capacity(results.len());
    let mut loss_sum = 0.0f64;
    for (report, loss) in results {
        loss_sum += loss;
        reports.push(report);
    }
    Ok(StepReport::new(
        (loss_sum * loss_scale as f64) as f32,
        start.elapsed(),
        reports,
    ))
}

/// Run one rank's part of a training step, for a process that holds only that rank (the
/// other ranks run theirs in other processes, reached through `rank.transport`).
///
/// Returns the rank's measurements and the sum of the per-token losses it computed: nonzero
/// only on the rank holding the last stage. The step's loss is the sum over every rank, in
/// rank order, times `1 / (batch · seq)`, as [`train_step`] computes it.
pub fn train_step_rank<B: Backend, T: Transport<B>>(
    schedule: &Schedule,
    rank: &mut Rank<B, T>,
    batch: &Batch,
    opts: &StepOptions,
) -> Result<(RankReport, f64)> {
    let m = schedule.microbatches;
    if batch.batch % m != 0 {
        return Err(crate::invalid_input!(
            "batch size {} must be a multiple of the micro-batch count {m}",
            batch.batch
        ));
    }
    let micro: Vec<Batch> = (0..m).map(|i| batch.microbatch(i, m)).collect();
    let loss_scale = 1.0 / (batch.batch * batch.seq) as f32;
    run_rank(schedule, rank, &micro, loss_scale, opts, Instant::now())
}

/// Tensors a rank holds between actions, keyed by (producing stage, micro-batch).
struct Mailbox<Buf> {
    activations: HashMap<(usize, usize), Buf>,
    gradients: HashMap<(usize, usize), Buf>,
}

impl<Buf> Mailbox<Buf> {
    fn new() -> Self {
        Self {
            activations: HashMap::new(),
            gradients: HashMap::new(),
        }
    }
}

fn take<Buf>(
    map: &mut HashMap<(usize, usize), Buf>,
    key: (usize, usize),
    what: &str,
) -> Result<Buf> {
    map.remove(&key).ok_or_else(|| {
        anyhow!(
            "{what} of stage {} micro-batch {} is not here",
            key.0,
            key.1
        )
    })
}

/// Walk one rank's action list; returns its report and the sum of its per-token losses.
fn run_rank<B: Backend, T: Transport<B>>(
    schedule: &Schedule,
    rank: &mut Rank<B, T>,
    micro: &[Batch],
    loss_scale: f32,
    opts: &StepOptions,
    t0: Instant,
) -> Result<(RankReport, f64)> {
    let last_stage = schedule.num_stages() - 1;
    let keep = if opts.checkpoint_activations {
        Keep::Input
    } else {
        Keep::All
    };
    let mut mail: Mailbox<B::Buffer> = Mailbox::new();
    let mut saved: HashMap<(usize, usize), Saved<B>> = HashMap::new();
    // Weight-gradient work an input-gradient action left for its weight action.
    let mut weights: HashMap<(usize, usize), WeightGrads<B>> = HashMap::new();
    let mut report = RankReport::default();
    let mut activation_bytes = 0u64;
    let mut loss_sum = 0.0f64;
    let Rank {
        rank: me,
        backend,
        transport,
        stages,
    } = rank;
    let me = *me;
    let channels = stages
        .first()
        .map(|(_, model)| model.config().n_embd)
        .ok_or_else(|| anyhow!("rank {me} holds no stage"))?;
    // Activations and their gradients cross stage boundaries as `[batch·seq, n_embd]`.
    let hidden_len = |mb: &Batch| mb.batch * mb.seq * channels;
    backend.reset_peak_memory();

    // Actions are timed with backend marks, read once the step's work has finished: a GPU
    // rank then never waits for its stream inside the step. `offset` puts the rank's first
    // mark on the clock the ranks share.
    let offset = t0.elapsed().as_secs_f64() * 1e3;
    let first = backend.mark()?;
    let mut marks: Vec<(Action, B::Mark, B::Mark)> = Vec::new();
    let mut losses: Vec<B::Buffer> = Vec::new();
    for (position, &action) in schedule.ranks[me].iter().enumerate() {
        let begin = backend.mark()?;
        let key = (action.stage(), action.microbatch());
        let mb = &micro[action.microbatch()];
        let result: Result<()> = (|| {
            match action {
                Action::Forward { stage, microbatch } => {
                    let tokens;
                    let input = if stage == 0 {
                        tokens = backend.upload_u32(&mb.inputs)?;
                        StageInput::Tokens(&tokens)
                    } else {
                        StageInput::Hidden(take(
                            &mut mail.activations,
                            (stage - 1, microbatch),
                            "activation",
                        )?)
                    };
                    let targets = if stage == last_stage {
                        Some(backend.upload_u32(&mb.targets)?)
                    } else {
                        None
                    };
                    let model = stage_mut(stages, stage)?;
                    let (output, kept) =
                        model.forward(backend, input, targets.as_ref(), mb.batch, mb.seq, keep)?;
                    activation_bytes += kept.bytes();
                    saved.insert(key, kept);
                    report.peak_inflight = report.peak_inflight.max(saved.len() + weights.len());
                    report.peak_activation_bytes =
                        report.peak_activation_bytes.max(activation_bytes);
                    match output {
                        StageOutput::Hidden(h) => {
                            mail.activations.insert(key, h);
                        }
                        StageOutput::Loss { losses: l } => losses.push(l),
                        StageOutput::Logits(_) => {
                            return Err(anyhow!("the last stage returned logits during training"))
                        }
                    }
                }
                Action::Backward { stage, microbatch }
                | Action::BackwardInput { stage, microbatch } => {
                    let kept = saved.remove(&key).ok_or_else(|| {
                        anyhow!(
                            "backward of stage {stage} micro-batch {microbatch} before its forward"
                        )
                    })?;
                    activation_bytes -= kept.bytes();
                    let dout = if stage == last_stage {
                        None
                    } else {
                        Some(take(
                            &mut mail.gradients,
                            (stage + 1, microbatch),
                            "gradient",
                        )?)
                    };
                    let model = stage_mut(stages, stage)?;
                    let dinput = if matches!(action, Action::Backward { .. }) {
                        model.backward(backend, kept, dout, loss_scale)?
                    } else {
                        let (dinput, later) =
                            model.backward_input(backend, kept, dout, loss_scale)?;
                        activation_bytes += later.bytes();
                        report.peak_activation_bytes =
                            report.peak_activation_bytes.max(activation_bytes);
                        weights.insert(key, later);
                        dinput
                    };
                    if let (Some(dinput), true) = (dinput, stage > 0) {
                        mail.gradients.insert(key, dinput);
                    }
                }
                Action::BackwardWeight { stage, microbatch } => {
                    let later = weights.remove(&key).ok_or_else(|| {
                        anyhow!(
                            "weight gradient of stage {stage} micro-batch {microbatch} before its input gradient"
                        )
                    })?;
                    activation_bytes -= later.bytes();
                    stage_mut(stages, stage)?.backward_weight(backend, later)?;
                }
                Action::SendActivation { stage, .. } => {
                    let buf = take(&mut mail.activations, key, "activation")?;
                    let to = schedule.placement[stage + 1];
                    transport.send(backend, to, &buf)?;
                }
                Action::RecvActivation { stage, .. } => {
                    let from = schedule.placement[stage];
                    let buf = transport.recv(backend, from, hidden_len(mb))?;
                    mail.activations.insert(key, buf);
                }
                Action::SendGradient { stage, .. } => {
                    let buf = take(&mut mail.gradients, key, "gradient")?;
                    let to = schedule.placement[stage - 1];
                    transport.send(backend, to, &buf)?;
                }
                Action::RecvGradient { stage, .. } => {
                    let from = schedule.placement[stage];
                    let buf = transport.recv(backend, from, hidden_len(mb))?;
                    mail.gradients.insert(key, buf);
                }
            }
            Ok(())
        })();
        result.with_context(|| format!("at position {position} ({action:?})"))?;
        marks.push((action, begin, backend.mark()?));
    }
    if !saved.is_empty()
        || !weights.is_empty()
        || !mail.activations.is_empty()
        || !mail.gradients.is_empty()
    {
        return Err(anyhow!(
            "the schedule ended with tensors left over on rank {me}"
        ));
    }

    reconcile_tied_embedding(schedule, me, backend, transport, stages)
        .context("summing the tied embedding's gradients")?;
    let clip = opts.adamw.grad_clip;
    let grad_scale = if clip > 0.0 {
        let norm = global_grad_norm(schedule, me, backend, transport, stages)
            .context("the global gradient norm")?;
        report.grad_norm = Some(norm);
        clip_scale(norm, clip)
    } else {
        1.0
    };
    for (_, model) in stages.iter_mut() {
        model.optimizer_step_scaled(backend, opts.lr, opts.step, &opts.adamw, grad_scale)?;
        model.zero_grads(backend)?;
    }
    backend.synchronize()?;
    report.peak_bytes = backend.memory().peak;
    for l in &losses {
        loss_sum += backend.download(l)?.iter().map(|&x| x as f64).sum::<f64>();
    }
    for (action, begin, end) in &marks {
        let start = offset + backend.elapsed_ms(&first, begin)?;
        let end = offset + backend.elapsed_ms(&first, end)?;
        if action.is_compute() {
            report.busy += end - start;
        }
        report.timeline.push(Timed {
            action: *action,
            start,
            end,
        });
    }
    Ok((report, loss_sum))
}

/// The factor that brings a gradient of global norm `norm` down to `clip` (PyTorch's
/// `clip_grad_norm_`: `clip / (norm + 1e-6)` when the norm exceeds `clip`, else 1).
pub fn clip_scale(norm: f64, clip: f32) -> f32 {
    if norm > f64::from(clip) {
        (f64::from(clip) / (norm + 1e-6)) as f32
    } else {
        1.0
    }
}

/// The norm of every stage's gradient together, the same on every rank: an all-reduce of the
/// ranks' sums of squares over every rank ([`Group::all_reduce_sum_scalar`]: added in
/// rank order in f64 at rank 0, each rounded to f32 as it travels), so every rank scales by
/// the same factor.
fn global_grad_norm<B: Backend, T: Transport<B>>(
    schedule: &Schedule,
    me: usize,
    backend: &B,
    transport: &mut T,
    stages: &[(usize, StageModel<B>)],
) -> Result<f64> {
    let mut local = 0.0f64;
    for (_, model) in stages {
        local += model.grad_sum_squares(backend)?;
    }
    let everyone: Vec<usize> = (0..schedule.num_ranks()).collect();
    let total =
        Group::new(&everyone, me, backend, transport)?.all_reduce_sum_scalar(local as f32)?;
    Ok(f64::from(total).sqrt())
}

/// Sum the two gradient contributions of each parameter the family shares between the first
/// layer and the last ([`ModelConfig::shared_params`]: a tied embedding, used by the token
/// embedding on the first stage and the LM head on the last) so both copies take the same
/// optimizer step, as Megatron's embedding group does. Nothing to do when one stage holds
/// both, or the model shares nothing.
fn reconcile_tied_embedding<B: Backend, T: Transport<B>>(
    schedule: &Schedule,
    me: usize,
    backend: &B,
    transport: &mut T,
    stages: &mut [(usize, StageModel<B>)],
) -> Result<()> {
    let last = schedule.num_stages() - 1;
    let Some((_, any)) = stages.first() else {
        return Ok(());
    };
    let shared = any.config().shared_params();
    if last == 0 || shared.is_empty() {
        return Ok(());
    }
    let (first_rank, last_rank) = (schedule.placement[0], schedule.placement[last]);
    for name in &shared {
        let missing = |stage: usize| anyhow!("stage {stage} holds no {name} gradient");
        if me == first_rank && me == last_rank {
            // Both stages live here: stages are sorted, so stage 0 is first and the last is last.
            let (head, tail) = stages.split_at_mut(stages.len() - 1);
            let g0 = head[0].1.grad_mut(name).ok_or_else(|| missing(0))?;
            let gl = tail[0].1.grad_mut(name).ok_or_else(|| missing(last))?;
            backend.add_assign(g0, gl)?;
            backend.copy(gl, g0)?;
        } else if me == first_rank || me == last_rank {
            // An all-reduce over the two ranks, the first stage's rank its root: the first
            // stage's gradient plus the last's, on both.
            let stage = if me == first_rank { 0 } else { last };
            let grad = stage_mut(stages, stage)?
                .grad_mut(name)
                .ok_or_else(|| missing(stage))?;
            Group::new(&[first_rank, last_rank], me, backend, transport)?.all_reduce_sum(grad)?;
        }
    }
    Ok(())
}
