//! Timed, memory-aware simulation of a schedule.
//!
//! Time is in milliseconds. Each compute action takes its stage's cost; a transfer takes
//! `latency + bytes / bandwidth`, with the bytes of the producing stage's activation (the
//! gradient has the same shape). In a lowered schedule a send is posted without waiting (as on
//! a communication stream) and its data reaches the peer a transfer time later, where the
//! receive waits for it; the validator separately proves the schedule also completes when
//! every send blocks until it is received. A compute-only schedule runs the same way without
//! the explicit transfers: an input from another rank is ready a transfer time after its
//! producer ends.
//!
//! Memory: a forward keeps its micro-batch's activation (the stage's `activation_bytes`) until
//! that micro-batch's backward (or, for a split backward, its weight half) has run; the peak of
//! what a rank holds is its peak in-flight activations.

use anyhow::Result;
use serde::Serialize;

use crate::invalid;
use crate::schedule::replay::{replay, Mode};
use crate::schedule::validate::{check_structure, deadlock};
use crate::schedule::{Action, Schedule};

/// Costs of one step's pieces, per stage; time in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Costs {
    /// Forward time of one micro-batch, per stage (default 1).
    pub fwd: Vec<f64>,
    /// Backward time of one micro-batch, per stage (default 2).
    pub bwd: Vec<f64>,
    /// The share of `bwd` a split backward spends on the weight gradient (`W`), per stage; the
    /// input gradient (`I`) takes the rest. Default 0.5.
    pub weight_share: Vec<f64>,
    /// Fixed time of one transfer (default 0).
    pub latency: f64,
    /// Transfer bandwidth in bytes per millisecond (default infinite: transfers cost only
    /// their latency).
    pub bandwidth: f64,
    /// Bytes of one micro-batch's output activation, per stage (default 0: unknown).
    pub activation_bytes: Vec<f64>,
}

impl Costs {
    /// Forward 1, backward 2, free transfers, unknown activation sizes, for `stages` stages.
    pub fn uniform(stages: usize) -> Costs {
        Costs {
            fwd: vec![1.0; stages],
            bwd: vec![2.0; stages],
            weight_share: vec![0.5; stages],
            latency: 0.0,
            bandwidth: f64::INFINITY,
            activation_bytes: vec![0.0; stages],
        }
    }

    /// Check the lists cover `stages` stages and every value makes sense.
    pub fn check(&self, stages: usize) -> Result<()> {
        for (name, list) in [
            ("fwd", &self.fwd),
            ("bwd", &self.bwd),
            ("weight-share", &self.weight_share),
            ("activation-bytes", &self.activation_bytes),
        ] {
            if list.len() != stages {
                invalid!(
                    "{name}: got {} values but the pipeline has {stages} stages (give one value, or one per stage)",
                    list.len()
                );
            }
        }
        for (name, list) in [("fwd", &self.fwd), ("bwd", &self.bwd)] {
            if let Some((stage, v)) = list
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v > 0.0))
            {
                invalid!("{name}: the cost of stage {stage} must be a positive number of milliseconds (got {v})");
            }
        }
        if let Some((stage, v)) = self
            .weight_share
            .iter()
            .enumerate()
            .find(|(_, v)| !(**v > 0.0 && **v < 1.0))
        {
            invalid!("weight-share: stage {stage}'s weight-gradient share of backward must be between 0 and 1, exclusive (got {v})");
        }
        if let Some((stage, v)) = self
            .activation_bytes
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            invalid!(
                "activation-bytes: stage {stage} must be a non-negative number of bytes (got {v})"
            );
        }
        if !(self.latency.is_finite() && self.latency >= 0.0) {
            invalid!(
                "comm: the transfer latency must be a non-negative number of milliseconds (got {})",
                self.latency
            );
        }
        if self.bandwidth.is_nan() || self.bandwidth <= 0.0 {
            invalid!("bandwidth must be positive (got {})", self.bandwidth);
        }
        Ok(())
    }

    /// Costs measured in a run: each stage's mean forward and backward time over the compute
    /// actions of `timeline` (a split backward's halves summed, their ratio as the stage's
    /// weight share, which is otherwise `weight_share`), and the mean send time as every
    /// transfer's latency. Every stage of `0..stages` must appear, and nothing beyond.
    pub fn measured<'a>(
        timeline: impl IntoIterator<Item = &'a Timed>,
        stages: usize,
        weight_share: f64,
    ) -> Result<Costs> {
        // (total ms, count) per stage: forward, backward, input half, weight half.
        let mut sums = vec![[(0.0f64, 0usize); 4]; stages];
        let (mut send_ms, mut sends) = (0.0, 0usize);
        for t in timeline {
            let kind = match t.action {
                Action::Forward { .. } => 0,
                Action::Backward { .. } => 1,
                Action::BackwardInput { .. } => 2,
                Action::BackwardWeight { .. } => 3,
                Action::SendActivation { .. } | Action::SendGradient { .. } => {
                    send_ms += t.end - t.start;
                    sends += 1;
                    continue;
                }
                _ => continue,
            };
            let stage = t.action.stage();
            let Some(row) = sums.get_mut(stage) else {
                invalid!(
                    "the measured run has stage {stage}, but this pipeline has {stages} stages"
                );
            };
            row[kind].0 += t.end - t.start;
            row[kind].1 += 1;
        }
        let mean = |(ms, n): (f64, usize)| if n == 0 { 0.0 } else { ms / n as f64 };
        let mut costs = Costs::uniform(stages);
        for (s, row) in sums.iter().enumerate() {
            if row[0].1 == 0 || (row[1].1 == 0 && row[2].1 == 0) {
                invalid!("the measured run has no forward and backward of stage {s} (this pipeline has {stages} stages)");
            }
            let (input, weight) = (mean(row[2]), mean(row[3]));
            costs.fwd[s] = mean(row[0]);
            costs.bwd[s] = if row[1].1 > 0 {
                mean(row[1])
            } else {
                input + weight
            };
            costs.weight_share[s] = if input > 0.0 && weight > 0.0 {
                weight / (input + weight)
            } else {
                weight_share
            };
        }
        costs.latency = mean((send_ms, sends));
        Ok(costs)
    }

    /// These costs for the same layers cut `k` times finer: each stage becomes `k`
    /// consecutive chunks sharing its forward and backward time equally, each with the
    /// stage's weight share and activation size (a chunk's output is as wide as the stage's).
    pub fn split(&self, k: usize) -> Costs {
        let fine = |list: &[f64], scale: f64| -> Vec<f64> {
            list.iter()
                .flat_map(|&x| std::iter::repeat_n(x * scale, k))
                .collect()
        };
        let share = 1.0 / k as f64;
        Costs {
            fwd: fine(&self.fwd, share),
            bwd: fine(&self.bwd, share),
            weight_share: fine(&self.weight_share, 1.0),
            activation_bytes: fine(&self.activation_bytes, 1.0),
            ..self.clone()
        }
    }

    /// The time one action takes.
    pub fn duration(&self, action: Action) -> f64 {
        let s = action.stage();
        match action {
            Action::Forward { .. } => self.fwd[s],
            Action::Backward { .. } => self.bwd[s],
            Action::BackwardInput { .. } => self.bwd[s] * (1.0 - self.weight_share[s]),
            Action::BackwardWeight { .. } => self.bwd[s] * self.weight_share[s],
            _ => self.transfer(s),
        }
    }

    /// The time to move stage `stage`'s activation (or input gradient) to another rank.
    pub fn transfer(&self, stage: usize) -> f64 {
        if self.bandwidth.is_infinite() {
            self.latency
        } else {
            self.latency + self.activation_bytes[stage] / self.bandwidth
        }
    }
}

/// One action placed in time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Timed {
    /// The action.
    #[serde(serialize_with = "as_text")]
    pub action: Action,
    /// Start, in milliseconds from the step's start.
    pub start: f64,
    /// End, in milliseconds.
    pub end: f64,
}

fn as_text<S: serde::Serializer>(action: &Action, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(action)
}

/// One rank's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankFigures {
    /// The rank.
    pub rank: usize,
    /// Time spent computing (ms).
    pub busy: f64,
    /// Time not computing (ms).
    pub idle: f64,
    /// Time spent waiting inside receives (ms), part of `idle`.
    pub recv_wait: f64,
    /// Most micro-batch activations held at once.
    pub peak_activations: usize,
    /// Most activation bytes held at once.
    pub peak_activation_bytes: f64,
}

/// What a simulated step looks like.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Simulation {
    /// End of the last action (ms).
    pub makespan: f64,
    /// Idle time over ranks x makespan.
    pub bubble_fraction: f64,
    /// 1 - bubble fraction.
    pub efficiency: f64,
    /// Per-rank figures, by rank.
    pub ranks: Vec<RankFigures>,
    /// Every action with its start and end, per rank in list order.
    pub timeline: Vec<Vec<Timed>>,
}

impl Simulation {
    /// The most micro-batches (chunks' worth, with several stages a rank) any rank holds at
    /// once.
    pub fn peak_held(&self) -> usize {
        self.ranks
            .iter()
            .map(|r| r.peak_activations)
            .max()
            .unwrap_or(0)
    }
}

/// Simulate `schedule` (compute-only or lowered) under `costs`.
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<Simulation> {
    let positions = check_structure(schedule)?;
    costs.check(schedule.num_stages())?;
    let mode = if positions.lowered {
        Mode::Eager
    } else {
        Mode::Buffered
    };
    let spans =
        replay(schedule, mode, |a| costs.duration(a), |s| costs.transfer(s)).map_err(deadlock)?;
    let timeline: Vec<Vec<Timed>> = schedule
        .ranks
        .iter()
        .zip(&spans)
        .map(|(actions, spans)| {
            actions
                .iter()
                .zip(spans)
                .map(|(&action, span)| Timed {
                    action,
                    start: span.start,
                    end: span.end,
                })
                .collect()
        })
        .collect();
    let makespan = timeline
        .iter()
        .filter_map(|t| t.last())
        .map(|t| t.end)
        .fold(0.0, f64::max);
    let ranks: Vec<RankFigures> = timeline
        .iter()
        .enumerate()
        .map(|(rank, actions)| rank_figures(rank, actions, makespan, costs))
        .collect();
    let idle: f64 = ranks.iter().map(|r| r.idle).sum();
    let bubble_fraction = if makespan > 0.0 {
        idle / (ranks.len() as f64 * makespan)
    } else {
        0.0
    };
    Ok(Simulation {
        makespan,
        bubble_fraction,
        efficiency: 1.0 - bubble_fraction,
        ranks,
        timeline,
    })
}

fn rank_figures(rank: usize, actions: &[Timed], makespan: f64, costs: &Costs) -> RankFigures {
    let (mut busy, mut recv_wait) = (0.0, 0.0);
    let (mut held, mut bytes) = (0usize, 0.0f64);
    let (mut peak, mut peak_bytes) = (0usize, 0.0f64);
    for t in actions {
        let s = t.action.stage();
        if t.action.is_compute() {
            busy += t.end - t.start;
        } else {
            recv_wait += t.end - t.start;
        }
        match t.action {
            Action::Forward { .. } => {
                held += 1;
                bytes += costs.activation_bytes[s];
                if held > peak {
                    peak = held;
                }
                peak_bytes = peak_bytes.max(bytes);
            }
            Action::Backward { .. } | Action::BackwardWeight { .. } => {
                held -= 1;
                bytes -= costs.activation_bytes[s];
            }
            _ => {}
        }
    }
    RankFigures {
        rank,
        busy,
        idle: makespan - busy,
        recv_wait,
        peak_activations: peak,
        peak_activation_bytes: peak_bytes,
    }
}
