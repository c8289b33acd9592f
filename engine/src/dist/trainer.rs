//! One rank of a multi-process training run: it builds only its own stages, runs its part of
//! every step over TCP, and reports to rank 0, which logs and checkpoints for the whole run.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

use super::links::{RankLinks, TensorSetup};
use super::{connect_sharing, LaunchEnv};
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::data::{eval_batches, sample_batch, Corpus};
use crate::exec::{evaluate_rank, train_step_rank, Decoder, Rank, RankReport, StepReport};
use crate::invalid_input;
use crate::model::{init_tensor, HostTensors, OptimizerState, StageModel};
use crate::schedule::{Action, Schedule};
use crate::sim::Timed;
use crate::train::{
    blank_parameters, checkpoint_params, resumed_step, training_stage, Init, StepLog, TrainConfig,
    TrainLoop,
};

/// Environment variable for fault tests: `RANK:STEP` makes rank `RANK` abort (no goodbye, as a
/// crash) after computing step `STEP` and before reporting it.
pub const FAULT_ENV: &str = "PIPIT_FAULT_ABORT_AFTER_STEP";

/// The rank that writes logs and checkpoints.
pub(super) const LEADER: usize = 0;

/// One rank of a multi-process run: the plan, this rank's stages, and its links to the others.
pub struct RankTrainer<B: Backend> {
    /// The run's settings (the same on every rank; checked at the rendezvous).
    pub config: TrainConfig,
    /// The lowered schedule every step runs.
    pub schedule: Schedule,
    /// This rank: its device, its links (TCP, and NCCL for tensors where opened) and its stages.
    pub rank: Rank<B, RankLinks<B>>,
    /// Steps completed so far.
    pub step: u64,
    /// This rank's device and stages, in one line.
    description: String,
    /// Step after which this rank aborts ([`FAULT_ENV`]).
    abort_after: Option<u64>,
    /// Key/value caches of this rank's stages for [`RankTrainer::next_tokens`], one per
    /// sequence, made on first use.
    pub(super) decoders: Vec<Decoder<B>>,
}

impl<B: Backend> RankTrainer<B> {
    /// Meet the other ranks of `env`'s run, check they all run the same settings, and build
    /// this rank's stages on `backend`; tensors and control messages travel over TCP. Every
    /// wait on a peer lasts at most `timeout`.
    pub fn new(
        config: TrainConfig,
        backend: B,
        init: Init<'_>,
        env: &LaunchEnv,
        timeout: Duration,
    ) -> Result<Self> {
        Self::open(config, backend, init, env, timeout, None)
    }

    /// [`Self::new`], with tensors moving over the transport `tensors` opens (NCCL between
    /// CUDA ranks) while control messages stay on TCP. Every rank of the run must use the same.
    pub fn with_tensor_transport(
        config: TrainConfig,
        backend: B,
        init: Init<'_>,
        env: &LaunchEnv,
        timeout: Duration,
        tensors: &dyn TensorSetup<B>,
    ) -> Result<Self> {
        Self::open(config, backend, init, env, timeout, Some(tensors))
    }

    fn open(
        config: TrainConfig,
        backend: B,
        init: Init<'_>,
        env: &LaunchEnv,
        timeout: Duration,
        tensors: Option<&dyn TensorSetup<B>>,
    ) -> Result<Self> {
        config.validate()?;
        let schedule = config.plan()?;
        if schedule.num_ranks() != env.world_size {
            return Err(invalid_input!(
                "WORLD_SIZE is {} but the pipeline has {} ranks (--stages {}): start one process per pipeline rank",
                env.world_size,
                schedule.num_ranks(),
                config.stages
            ));
        }
        let step = match &init {
            Init::Resume(c) => resumed_step(c, &config)?,
            _ => 0,
        };
        let start = match &init {
            Init::Fresh => "fresh",
            Init::Blank | Init::BlankFrozen => "blank",
            Init::Weights(_) => "weights",
            Init::Frozen(_) => "frozen",
            Init::Resume(_) => "resume",
        };
        let abort_after = fault_step(env.rank)?;
        let mut shared = json!({ "config": config, "start": start, "step": step });
        let me = env.rank;
        let blob = match tensors {
            Some(t) => {
                // Part of the settings, so ranks that would move tensors differently never meet.
                shared["tensors"] = t.name().into();
                t.prepare(me == LEADER)?
            }
            None => Vec::new(),
        };
        let (mut tcp, leader_shared, blob) = connect_sharing(env, shared.clone(), &blob, timeout)?;
        let built = if leader_shared != shared {
            Err(invalid_input!(
                "rank {me}'s settings differ from rank 0's ({}): start every rank with the same arguments",
                first_difference(&shared, &leader_shared)
            ))
        } else {
            build_stages(&config, &schedule, me, &backend, &init)
        };
        let opened = built.and_then(|stages| {
            let Some(t) = tensors else {
                return Ok((stages, None));
            };
            let world = env.world_size;
            let link = t
                .open(&backend, me, world, &blob, timeout, tcp.failure_probe())
                .with_context(|| {
                    format!(
                        "rank {me} opening its {} transport (--transport tcp moves tensors over TCP instead)",
                        t.name()
                    )
                })?;
            Ok((stages, Some(link)))
        });
        let (stages, tensor_link) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                // Tell the peers why, so they stop at once with this rank's reason.
                tcp.abort(&format!("{e:#}"));
                return Err(e);
            }
        };
        let transport = RankLinks::new(tcp, tensor_link);
        let names = config.stage_names(&schedule.stages_of(me))?;
        let mut line = format!("rank {me}: {} | {names}", backend.describe());
        if let Some(t) = tensors {
            line.push_str(&format!(" | tensors over {}", t.name()));
        }
        Ok(Self {
            config,
            schedule,
            rank: Rank {
                rank: me,
                backend,
                transport,
                stages,
            },
            step,
            description: line,
            abort_after,
            decoders: Vec::new(),
        })
    }

    fn me(&self) -> usize {
        self.rank.rank
    }

    fn world(&self) -> usize {
        self.schedule.num_ranks()
    }

    fn transport(&mut self) -> &mut RankLinks<B> {
        &mut self.rank.transport
    }

    /// Train one step: this rank's part of the schedule, then the figures go to rank 0, which
    /// sends every rank the step's loss.
    pub fn train_step(&mut self, corpus: &Corpus) -> Result<StepLog> {
        // Keys and values cached under the old weights would no longer be the model's.
        self.decoders.clear();
        let t0 = Instant::now();
        let step = self.step + 1;
        let me = self.me();
        let c = &self.config;
        let batch = sample_batch(&corpus.train, c.batch_size, c.seq_len, c.seed, step)?;
        let opts = c.step_options(step);
        let lr = opts.lr;
        let (report, loss_sum) = train_step_rank(&self.schedule, &mut self.rank, &batch, &opts)
            .with_context(|| format!("rank {me}, step {step}"))?;
        // A transfer that failed after its buffer was handed over surfaces in this step.
        self.rank
            .transport
            .flush()
            .with_context(|| format!("rank {me}, step {step}"))?;
        if self.abort_after == Some(step) {
            eprintln!("rank {me}: aborting after step {step} as {FAULT_ENV} asks");
            std::process::abort();
        }
        let figures = |report: &RankReport, loss_sum: f64| {
            json!({
                "loss_sum": loss_sum.to_bits(),
                "busy": report.busy,
                "peak_bytes": report.peak_bytes,
                "peak_activation_bytes": report.peak_activation_bytes,
                "peak_inflight": report.peak_inflight,
                "timeline": report.timeline.iter().map(|t| json!([t.action, t.start, t.end])).collect::<Vec<_>>(),
            })
        };
        let loss_scale = 1.0 / (batch.batch * batch.seq) as f32;
        let (loss, ranks) = if me == LEADER {
            let mut ranks = vec![report];
            let mut total = loss_sum;
            for r in 1..self.world() {
                let v = self
                    .transport()
                    .recv_json(r, &format!("the figures of step {step}"))
                    .with_context(|| format!("rank {me}, step {step}"))?;
                let (report, sum) =
                    parse_figures(&v).with_context(|| format!("rank {r}'s figures"))?;
                total += sum;
                ranks.push(report);
            }
            // As the in-process executor: the sum over ranks in rank order, then the scale.
            let loss = (total * loss_scale as f64) as f32;
            for r in 1..self.world() {
                self.transport()
                    .send_json(r, &json!({ "loss": loss.to_bits() }))?;
            }
            (loss, ranks)
        } else {
            let v = figures(&report, loss_sum);
            self.transport()
                .send_json(LEADER, &v)
                .with_context(|| format!("rank {me}, step {step}"))?;
            let v = self
                .transport()
                .recv_json(LEADER, &format!("the loss of step {step}"))
                .with_context(|| format!("rank {me}, step {step}"))?;
            let bits = v["loss"]
                .as_u64()
                .ok_or_else(|| anyhow!("rank 0 sent no loss"))?;
            (f32::from_bits(bits as u32), vec![report])
        };
        let log = StepLog::new(step, lr, &batch, StepReport::new(loss, t0.elapsed(), ranks))?;
        self.step = step;
        Ok(log)
    }

    /// Mean cross-entropy over windows of `data` (as [`crate::train::Trainer::evaluate`]):
    /// activations flow through the ranks' stages in order; the rank holding the last stage
    /// sends every rank the result.
    pub fn evaluate<T: Copy + Into<u32>>(
        &mut self,
        data: &[T],
        seq: usize,
        max_tokens: usize,
    ) -> Result<(f64, usize)> {
        let batches = eval_batches(data, seq, max_tokens, self.config.batch_size)?;
        let placement = &self.schedule.placement;
        let (mut sum, mut count) = evaluate_rank(placement, &mut self.rank, &batches)?;
        let last = self.schedule.placement[self.schedule.num_stages() - 1];
        let me = self.me();
        if me == last {
            let result = json!({ "sum": sum.to_bits(), "count": count });
            for r in (0..self.world()).filter(|&r| r != me) {
                self.transport().send_json(r, &result)?;
            }
        } else {
            let v = self.transport().recv_json(last, "the validation loss")?;
            let (Some(bits), Some(n)) = (v["sum"].as_u64(), v["count"].as_u64()) else {
                return Err(anyhow!(
                    "rank {last} sent a validation loss without sum or count: {v}"
                ));
            };
            sum = f64::from_bits(bits);
            count = n as usize;
        }
        Ok((sum / count.max(1) as f64, count))
    }

    /// Gather the whole model to rank 0: every other rank sends its stages' parameters and
    /// optimizer moments there. `Some` on rank 0.
    pub fn checkpoint(&mut self) -> Result<Option<Checkpoint>> {
        let me = self.me();
        let mut params = HostTensors::new();
        let mut optimizer = OptimizerState::default();
        let Rank {
            backend, stages, ..
        } = &self.rank;
        for (_, model) in stages {
            params.extend(model.download_params(backend)?);
            let state = model.optimizer_state(backend)?;
            optimizer.m.extend(state.m);
            optimizer.v.extend(state.v);
        }
        if me != LEADER {
            let groups = [("param", &params), ("m", &optimizer.m), ("v", &optimizer.v)];
            let manifest: Vec<Value> = groups
                .iter()
                .flat_map(|(g, t)| t.iter().map(move |(name, t)| json!([g, name, t.shape])))
                .collect();
            let transport = &mut self.rank.transport;
            transport.send_json(LEADER, &json!({ "tensors": manifest }))?;
            for (_, t) in groups {
                for (_, tensor) in t.iter() {
                    transport.send_f32(LEADER, &tensor.data)?;
                }
            }
            return Ok(None);
        }
        for r in 1..self.world() {
            let what = format!("rank {r}'s checkpoint manifest");
            let manifest = self.transport().recv_json(r, &what)?;
            let entries = manifest["tensors"]
                .as_array()
                .cloned()
                .ok_or_else(|| anyhow!("{what} lists no tensors"))?;
            for entry in entries {
                let (Some(group), Some(name)) = (entry[0].as_str(), entry[1].as_str()) else {
                    return Err(anyhow!("{what}: a malformed entry {entry}"));
                };
                let shape: Vec<usize> = serde_json::from_value(entry[2].clone())
                    .with_context(|| format!("{what}: the shape of {name}"))?;
                let data = self
                    .transport()
                    .recv_f32(r, &format!("tensor {name} of the checkpoint"))?;
                let into = match group {
                    "param" => &mut params,
                    "m" => &mut optimizer.m,
                    "v" => &mut optimizer.v,
                    other => return Err(anyhow!("{what}: unknown tensor group {other:?}")),
                };
                into.insert(name, shape, data)?;
            }
        }
        let state = json!({
            "step": self.step,
            "seed": self.config.seed,
            "data_position": { "kind": "sampled", "seed": self.config.seed, "next_step": self.step + 1 },
            "config": self.config,
        });
        Ok(Some(Checkpoint {
            config: self.config.model.clone(),
            params,
            optimizer: Some(optimizer),
            trainer_state: Some(state),
        }))
    }
}

impl<B: Backend> TrainLoop for RankTrainer<B> {
    fn config(&self) -> &TrainConfig {
        &self.config
    }
    fn step(&self) -> u64 {
        self.step
    }
    fn is_leader(&self) -> bool {
        self.me() == LEADER
    }
    fn describe(&self) -> Vec<String> {
        vec![self.description.clone()]
    }
    fn train_step(&mut self, corpus: &Corpus) -> Result<StepLog> {
        RankTrainer::train_step(self, corpus)
    }
    fn evaluate(&mut self, data: &[u32], seq: usize, max_tokens: usize) -> Result<(f64, usize)> {
        RankTrainer::evaluate(self, data, seq, max_tokens)
    }
    fn gather_checkpoint(&mut self) -> Result<Option<Checkpoint>> {
        RankTrainer::checkpoint(self)
    }
    fn finish(&mut self) -> Result<()> {
        self.rank.transport.finish()
    }
    fn abort(&mut self, reason: &str) {
        self.rank.transport.abort(reason)
    }
}

/// The stages `rank` runs, on `backend`, with weights (and optimizer state) as `init` says.
fn build_stages<B: Backend>(
    config: &TrainConfig,
    schedule: &Schedule,
    rank: usize,
    backend: &B,
    init: &Init<'_>,
) -> Result<Vec<(usize, StageModel<B>)>> {
    let ranges = config.stage_layers()?;
    let own = schedule.stages_of(rank);
    let fresh;
    let host: &HostTensors = match init {
        Init::Fresh => {
            // Only this rank's tensors: each starts the same whichever rank creates it.
            let mut t = HostTensors::new();
            for (name, shape) in config.rank_param_shapes(rank)? {
                let data = init_tensor(&config.model, config.seed, &name, &shape);
                t.insert(name, shape, data)?;
            }
            fresh = t;
            &fresh
        }
        Init::Blank | Init::BlankFrozen => {
            fresh = blank_parameters(config.rank_param_shapes(rank)?)?;
            &fresh
        }
        Init::Weights(c) | Init::Resume(c) | Init::Frozen(c) => checkpoint_params(c, config)?,
    };
    let mut stages = Vec::with_capacity(own.len());
    for &s in &own {
        let model = training_stage(backend, config, ranges[s].clone(), host, init)?;
        stages.push((s, model));
    }
    Ok(stages)
}

/// A rank's step figures, as rank 0 receives them.
fn parse_figures(v: &Value) -> Result<(RankReport, f64)> {
    let f = |key: &str| v[key].as_f64().ok_or_else(|| anyhow!("no {key}"));
    let u = |key: &str| v[key].as_u64().ok_or_else(|| anyhow!("no {key}"));
    let timeline = v["timeline"]
        .as_array()
        .ok_or_else(|| anyhow!("no timeline"))?
        .iter()
        .map(|t| {
            let action: Action = serde_json::from_value(t[0].clone())?;
            let (start, end) = (t[1].as_f64().unwrap_or(0.0), t[2].as_f64().unwrap_or(0.0));
            Ok(Timed { action, start, end })
        })
        .collect::<Result<Vec<_>>>()?;
    let report = RankReport {
        timeline,
        busy: f("busy")?,
        peak_bytes: u("peak_bytes")?,
        peak_activation_bytes: u("peak_activation_bytes")?,
        peak_inflight: u("peak_inflight")? as usize,
        // Every rank computes the same norm; the leader's own report carries it.
        grad_norm: None,
    };
    Ok((report, f64::from_bits(u("loss_sum")?)))
}

/// The first top-level setting where `a` and `b` differ, as `key: a vs b`.
pub(super) fn first_difference(a: &Value, b: &Value) -> String {
    let flat = |v: &Value| -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for (k, x) in v.as_object().into_iter().flatten() {
            match x.as_object() {
                Some(inner) => out.extend(inner.iter().map(|(k2, y)| (k2.clone(), y.clone()))),
                None => out.push((k.clone(), x.clone())),
            }
        }
        out
    };
    let (fa, fb) = (flat(a), flat(b));
    fa.iter()
        .find_map(|(k, x)| {
            let y = fb
                .iter()
                .find(|(k2, _)| k2 == k)
                .map(|(_, y)| y.clone())
                .unwrap_or(Value::Null);
            (x != &y).then(|| format!("{k}: {x} here, {y} on rank 0"))
        })
        .unwrap_or_else(|| "the settings".into())
}

/// The step after which `rank` aborts, from [`FAULT_ENV`].
fn fault_step(rank: usize) -> Result<Option<u64>> {
    let Ok(spec) = std::env::var(FAULT_ENV) else {
        return Ok(None);
    };
    let parsed = spec.split_once(':').and_then(|(r, s)| {
        Some((
            r.trim().parse::<usize>().ok()?,
            s.trim().parse::<u64>().ok()?,
        ))
    });
    match parsed {
        Some((r, step)) => Ok((r == rank).then_some(step)),
        None => Err(invalid_input!(
            "{FAULT_ENV} must be RANK:STEP, got {spec:?}"
        )),
    }
}
