//! Schedule generators: small pure functions from `(p, m, v)` to per-rank compute actions.
//!
//! `p` is the number of pipeline ranks (`--stages`), `m` the micro-batches per step and `v`
//! the chunks (stages) per rank. Every generator but one places stage `k` on rank `k mod p`,
//! which is stage `r` on rank `r` when `v = 1`; [`zero_bubble_v`] places its two chunks per
//! rank in a V. Generators emit compute actions only; [`super::lower`] adds the transfers.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;

use super::{Action, Schedule};
use crate::invalid;
use crate::sim::{simulate, Costs};

/// The schedules pipit can generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// One micro-batch at a time through the whole pipe.
    Naive,
    /// Fill-drain: every forward, then every backward.
    GPipe,
    /// PipeDream-Flush: warm-up forwards, then one forward / one backward, then drain.
    OneFOneB,
    /// Megatron's virtual pipeline: `v` chunks per rank, 1F1B over the chunks.
    Interleaved,
    /// Zero bubble (ZB-H1, and interleaved with `v > 1`): 1F1B's order with each backward
    /// split into its input-gradient and weight-gradient halves, the weight halves delayed
    /// into the bubbles.
    ZeroBubble,
    /// Zero bubble on a V (ZB-V): two chunks per rank, rank `r` running stages `r` and
    /// `2p - 1 - r`, with split backwards; half of ZB-H1's bubble, holding what 1F1B's first
    /// rank holds when every rank's layers cost alike.
    ZeroBubbleV,
    /// DualPipeV (DeepSeek's DualPipe cut into a V, as PyTorch ships it): zb-v's placement,
    /// each rank's steady state pairing the forward of one chunk with the full backward of
    /// the other (different micro-batches, so the two can overlap), split backwards only at
    /// the ends. Needs `m >= 2p`.
    DualPipeV,
}

impl ScheduleKind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [ScheduleKind; 7] = [
        ScheduleKind::Naive,
        ScheduleKind::GPipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved,
        ScheduleKind::ZeroBubble,
        ScheduleKind::ZeroBubbleV,
        ScheduleKind::DualPipeV,
    ];

    /// The name used on the command line and in schedule files.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Naive => "naive",
            ScheduleKind::GPipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Interleaved => "interleaved",
            ScheduleKind::ZeroBubble => "zb-h1",
            ScheduleKind::ZeroBubbleV => "zb-v",
            ScheduleKind::DualPipeV => "dualpipev",
        }
    }

    /// Whether this kind places its stages in a V (rank `r` runs stages `r` and `2p - 1 - r`).
    pub fn is_v(self) -> bool {
        matches!(self, ScheduleKind::ZeroBubbleV | ScheduleKind::DualPipeV)
    }

    /// The chunks per rank this kind runs when none are asked for: two for the V, one for
    /// the rest.
    pub fn default_chunks(self) -> usize {
        if self.is_v() {
            2
        } else {
            1
        }
    }

    /// Whether a configured chunk count carries over to this kind when it is named without
    /// one: yes for the chunked schedules (interleaved, zb-h1); 1f1b and zb-v run one count
    /// only, and naive and gpipe take one chunk unless asked for more.
    pub fn varies_chunks(self) -> bool {
        matches!(self, ScheduleKind::Interleaved | ScheduleKind::ZeroBubble)
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScheduleKind {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        match ScheduleKind::ALL.into_iter().find(|k| k.name() == name) {
            Some(kind) => Ok(kind),
            None => {
                invalid!(
                    "unknown schedule `{name}` (expected naive, gpipe, 1f1b, interleaved, zb-h1, zb-v or dualpipev)"
                )
            }
        }
    }
}

/// What `--schedule` names: one schedule, or `auto` (the one whose step simulates fastest,
/// chosen by the trainer before anything runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleChoice {
    /// The fastest simulated schedule for the run's model and sizes.
    Auto,
    /// This schedule.
    Kind(ScheduleKind),
}

impl ScheduleChoice {
    /// The schedule named, or an error for `auto` (which the trainer resolves first).
    pub fn kind(self) -> Result<ScheduleKind> {
        match self {
            ScheduleChoice::Kind(kind) => Ok(kind),
            ScheduleChoice::Auto => {
                invalid!("--schedule auto is chosen before the run; here a schedule must be named")
            }
        }
    }
}

impl From<ScheduleKind> for ScheduleChoice {
    fn from(kind: ScheduleKind) -> Self {
        ScheduleChoice::Kind(kind)
    }
}

impl fmt::Display for ScheduleChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleChoice::Auto => f.write_str("auto"),
            ScheduleChoice::Kind(kind) => kind.fmt(f),
        }
    }
}

impl FromStr for ScheduleChoice {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        if name == "auto" {
            return Ok(ScheduleChoice::Auto);
        }
        match ScheduleKind::ALL.into_iter().find(|k| k.name() == name) {
            Some(kind) => Ok(ScheduleChoice::Kind(kind)),
            None => invalid!(
                "unknown schedule `{name}` (expected naive, gpipe, 1f1b, interleaved, zb-h1, zb-v, dualpipev or auto)"
            ),
        }
    }
}

serde_as_name!(ScheduleChoice);

/// Generate the schedule `kind` for `p` ranks, `m` micro-batches and `v` chunks per rank.
pub fn generate(kind: ScheduleKind, p: usize, m: usize, v: usize) -> Result<Schedule> {
    match kind {
        ScheduleKind::Naive => naive(p, m, v),
        ScheduleKind::GPipe => gpipe(p, m, v),
        ScheduleKind::OneFOneB => one_f_one_b(p, m, v),
        ScheduleKind::Interleaved => interleaved(p, m, v),
        ScheduleKind::ZeroBubble => zero_bubble(p, m, v),
        ScheduleKind::ZeroBubbleV => zero_bubble_v(p, m, v),
        ScheduleKind::DualPipeV => dualpipe_v(p, m, v),
    }
}

/// [`generate`] for the stage costs the schedule will run under: zb-h1's and zb-v's orders
/// are chosen by simulating them ([`zero_bubble_for`], [`zero_bubble_v_for`]); the other
/// orders do not depend on costs.
pub fn generate_for(
    kind: ScheduleKind,
    p: usize,
    m: usize,
    v: usize,
    costs: &Costs,
) -> Result<Schedule> {
    match kind {
        ScheduleKind::ZeroBubble => zero_bubble_for(p, m, v, costs),
        ScheduleKind::ZeroBubbleV => zero_bubble_v_for(p, m, v, costs),
        _ => generate(kind, p, m, v),
    }
}

/// The most compute actions a generated plan may hold unless [`set_max_actions`] says
/// otherwise: generation, lowering, validation and simulation each take memory and time in
/// proportion, so a typo (`--stages 10000 --microbatches 100000`) is refused at once.
pub const DEFAULT_MAX_ACTIONS: usize = 5_000_000;

static MAX_ACTIONS: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_ACTIONS);

/// Raise (or lower) the plan size [`generate`] accepts, for this process (`--max-actions`).
pub fn set_max_actions(limit: usize) {
    MAX_ACTIONS.store(limit, Ordering::Relaxed);
}

/// The plan size accepted now (see [`set_max_actions`]).
pub fn max_actions() -> usize {
    MAX_ACTIONS.load(Ordering::Relaxed)
}

/// Errors unless `p`, `m` and `v` are at least 1 and the plan's `per` actions per stage and
/// micro-batch (forward, backward, and the weight half where it is split) stay within the
/// limit, which the error names with the count.
fn check_sizes(p: usize, m: usize, v: usize, per: usize) -> Result<()> {
    if p == 0 {
        invalid!("stages must be at least 1 (got 0)");
    }
    if m == 0 {
        invalid!("microbatches must be at least 1 (got 0)");
    }
    if v == 0 {
        invalid!("chunks must be at least 1 (got 0)");
    }
    // Stage and micro-batch indices travel as u32 inside the validator and lowering.
    let actions = p.saturating_mul(v).saturating_mul(m).saturating_mul(per);
    let limit = max_actions();
    if actions > limit {
        invalid!(
            "p = {p}, m = {m}, v = {v} make a plan of {actions} actions ({per} per stage and micro-batch), beyond the limit of {limit} (--max-actions raises it)"
        );
    }
    // Stage and micro-batch indices travel as u32 inside the validator and lowering.
    if p.saturating_mul(v).saturating_mul(m) > u32::MAX as usize / 4 {
        invalid!("stages x chunks x microbatches must stay below 2^30 (got {p} x {v} x {m})");
    }
    Ok(())
}

fn new_schedule(kind: ScheduleKind, p: usize, m: usize, v: usize) -> Schedule {
    Schedule {
        name: kind.name().to_string(),
        microbatches: m,
        placement: looped_placement(p * v, p),
        ranks: vec![Vec::with_capacity(2 * m * v); p],
    }
}

fn fwd(stage: usize, microbatch: usize) -> Action {
    Action::Forward { stage, microbatch }
}

fn bwd(stage: usize, microbatch: usize) -> Action {
    Action::Backward { stage, microbatch }
}

/// One micro-batch at a time: its forward through every stage, then its backward, then the
/// next micro-batch. Efficiency is `1/p`. Accepts any `p, m, v >= 1`.
pub fn naive(p: usize, m: usize, v: usize) -> Result<Schedule> {
    check_sizes(p, m, v, 2)?;
    let mut schedule = new_schedule(ScheduleKind::Naive, p, m, v);
    for (rank, actions) in schedule.ranks.iter_mut().enumerate() {
        for mb in 0..m {
            actions.extend((0..v).map(|c| fwd(c * p + rank, mb)));
            actions.extend((0..v).rev().map(|c| bwd(c * p + rank, mb)));
        }
    }
    Ok(schedule)
}

/// Fill-drain (GPipe): each rank runs all its forwards (chunk by chunk, micro-batches in
/// order), then all its backwards (chunks in reverse). Every rank holds all `m` micro-batches'
/// activations at its peak. Accepts any `p, m, v >= 1`; with `v = 1` its efficiency under
/// uniform costs is exactly `m / (m + p - 1)`.
pub fn gpipe(p: usize, m: usize, v: usize) -> Result<Schedule> {
    check_sizes(p, m, v, 2)?;
    let mut schedule = new_schedule(ScheduleKind::GPipe, p, m, v);
    for (rank, actions) in schedule.ranks.iter_mut().enumerate() {
        for c in 0..v {
            actions.extend((0..m).map(|mb| fwd(c * p + rank, mb)));
        }
        for c in (0..v).rev() {
            actions.extend((0..m).map(|mb| bwd(c * p + rank, mb)));
        }
    }
    Ok(schedule)
}

/// 1F1B with a flush (PipeDream-Flush): rank `r` warms up with `min(p - r - 1, m)` forwards,
/// then alternates one forward and one backward, then drains the remaining backwards. Same
/// bubble as GPipe (`m / (m + p - 1)` efficiency under uniform costs) but rank `r` holds at
/// most `min(p - r, m)` micro-batches' activations. One stage per rank: requires `v = 1`
/// (use [`interleaved`] for more chunks); any `p, m >= 1`.
pub fn one_f_one_b(p: usize, m: usize, v: usize) -> Result<Schedule> {
    check_sizes(p, m, v, 2)?;
    if v != 1 {
        invalid!("1f1b runs one stage per rank: chunks must be 1 (got {v}); use the interleaved schedule for more chunks");
    }
    let mut schedule = new_schedule(ScheduleKind::OneFOneB, p, m, 1);
    for (rank, actions) in schedule.ranks.iter_mut().enumerate() {
        let order = RankOrder::new(p, m, 1, rank);
        one_forward_one_backward(actions, &order.forwards, &order.backwards, order.warmup);
    }
    Ok(schedule)
}

/// Megatron's interleaved 1F1B (virtual pipeline): rank `r` runs the `v` stages
/// `r, r + p, ..., r + (v - 1) p`. Micro-batches go in groups of `p`: within a group a rank
/// runs chunk 0's forwards for the whole group, then chunk 1's, and so on; backwards walk the
/// chunks in reverse. Rank `r` warms up with `2 (p - r - 1) + (v - 1) p` forwards (at most
/// `m v`), then alternates forward and backward, then drains.
///
/// Megatron requires `m` to be a multiple of `p`; pipit does not: it plans for `m` rounded up
/// to a multiple of `p` and leaves the extra micro-batches out, so any `p, m, v >= 1` is
/// accepted and the result always validates. With `m` a multiple of `p` and uniform costs the
/// bubble is `(p - 1) / (v m)` of the ideal time, as Megatron states; for other `m` it is at
/// most `(p - 1) / (v m) + (m' - m) / m`, with `m'` the padded count, and never more than
/// 1F1B's `(p - 1) / m` (both checked by the planner's property tests). With `v = 1` this is
/// exactly [`one_f_one_b`].
pub fn interleaved(p: usize, m: usize, v: usize) -> Result<Schedule> {
    check_sizes(p, m, v, 2)?;
    let mut schedule = new_schedule(ScheduleKind::Interleaved, p, m, v);
    for (rank, actions) in schedule.ranks.iter_mut().enumerate() {
        let order = RankOrder::new(p, m, v, rank);
        one_forward_one_backward(actions, &order.forwards, &order.backwards, order.warmup);
        actions.retain(|a| a.microbatch() < m);
    }
    Ok(schedule)
}

/// Zero bubble (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): every backward is
/// split into `I` (the input gradient, which the previous stage waits for) and `W` (the
/// weight gradient, which nobody waits for). Each rank keeps the order of [`one_f_one_b`]
/// (`v = 1`, the paper's ZB-H1) or of [`interleaved`] (`v > 1`) with `I` in place of each
/// backward, and runs the weight half of its `i`-th backward right after its `(i + r)`-th
/// input half on rank `r` (the remaining ones at the end). For `v = 1` rank `r` thus walks
/// `x = 0, 1, ..., m + p - 2` running `F(x)`, `I(x - (p - 1 - r))`, `W(x - (p - 1))`. The
/// input gradients keep 1F1B's rhythm, and the weight halves fill the drain 1F1B leaves idle.
///
/// No rank holds more micro-batches (from forward to weight half) than the same order's first
/// rank did: `min(p, m)` for `v = 1`. With `F = I = W` and `p` dividing `m` a step takes
/// `3 m v + p - 1` units, the least any schedule can (the last rank starts `p - 1` units
/// late), against 1F1B's `3 (m + p - 1)` and interleaving's `3 m v + 3 (p - 1)`: a third of
/// their bubble. Any `p, m, v >= 1`; checked by the planner's property tests.
pub fn zero_bubble(p: usize, m: usize, v: usize) -> Result<Schedule> {
    check_sizes(p, m, v, 3)?;
    let mut schedule = new_schedule(ScheduleKind::ZeroBubble, p, m, v);
    for (rank, actions) in schedule.ranks.iter_mut().enumerate() {
        let order = RankOrder::new(p, m, v, rank);
        let halves = |half: fn(usize, usize) -> Action| -> Vec<Action> {
            let to = |a: &Action| half(a.stage(), a.microbatch());
            order.backwards.iter().map(to).collect()
        };
        let inputs = halves(|stage, microbatch| Action::BackwardInput { stage, microbatch });
        let weights = halves(|stage, microbatch| Action::BackwardWeight { stage, microbatch });
        let (n, warmup) = (order.forwards.len(), order.warmup);
        actions.extend_from_slice(&order.forwards[..warmup]);
        let mut next_weight = 0;
        for (i, input) in inputs.iter().enumerate() {
            if let Some(forward) = order.forwards.get(warmup + i) {
                actions.push(*forward);
            }
            actions.push(*input);
            // The weight halves lag the input halves by `rank`.
            if let Some(upto) = i.checked_sub(rank) {
                actions.extend_from_slice(&weights[next_weight..=upto]);
                next_weight = upto + 1;
            }
        }
        actions.extend_from_slice(&weights[next_weight..n]);
        actions.retain(|a| a.microbatch() < m);
    }
    Ok(schedule)
}

/// [`zero_bubble`] for stages of the given costs: pipit's order or the published ZB-1P order
/// ([`zero_bubble_fixed`]), whichever simulates faster under `costs` while no rank holds more
/// micro-batches than pipit's order holds on its busiest rank; on a tie, the one that holds
/// fewer at its peak (ZB-1P with chunks), else pipit's.
pub fn zero_bubble_for(p: usize, m: usize, v: usize, costs: &Costs) -> Result<Schedule> {
    let ours = zero_bubble(p, m, v)?;
    costs.check(p * v)?;
    let sim = simulate(&ours, costs)?;
    let cap = sim.peak_held();
    let Some(fixed) = zero_bubble_fixed(p, m, v) else {
        return Ok(ours);
    };
    let other = simulate(&fixed, costs)?;
    let held = other.peak_held();
    // Faster, or as fast holding less (with chunks, ZB-1P's shorter warm-up holds 2p chunks
    // where the interleaved order's holds up to 3p - 1, in the same time).
    let better = other.makespan < sim.makespan - 1e-9
        || (other.makespan <= sim.makespan + 1e-9 && held < cap);
    Ok(if held <= cap && better { fixed } else { ours })
}

/// The published zero-bubble order ZB-1P (Qi et al., 2024) as PyTorch's
/// `ScheduleInterleavedZeroBubble` builds it, on [`zero_bubble`]'s looped placement: the `m`
/// micro-batches in rounds of `m / max(1, m / p)` (`None` where that does not divide `m`);
/// rank `r` warms up with `(v - 1)` rounds of forwards plus `p - 1 - r`, then alternates a
/// forward with an input half (chunks taken round by round, backwards in reverse chunk order),
/// the weight halves following the input halves `r` behind, the rest at the end.
pub fn zero_bubble_fixed(p: usize, m: usize, v: usize) -> Option<Schedule> {
    check_sizes(p, m, v, 3).ok()?;
    let rounds = (m / p).max(1);
    if m % rounds != 0 {
        return None;
    }
    let per_round = m / rounds;
    let total = m * v;
    let mut schedule = new_schedule(ScheduleKind::ZeroBubble, p, m, v);
    for (r, actions) in schedule.ranks.iter_mut().enumerate() {
        let warmup = ((v - 1) * per_round + (p - 1 - r)).min(total);
        let forward_stage = |op: usize| ((op / per_round) % v) * p + r;
        let backward_stage = |op: usize| (v - 1 - ((op - warmup) / per_round) % v) * p + r;
        // Per stage, the next micro-batch of its forwards and of its input halves.
        let mut next = vec![[0usize; 2]; p * v];
        let mut take = |stage: usize, kind: usize| {
            next[stage][kind] += 1;
            next[stage][kind] - 1
        };
        // The input halves in order; the weight halves replay them, `r` behind.
        let mut inputs: Vec<(usize, usize)> = Vec::with_capacity(total);
        let mut weights = 0;
        let weight =
            |(stage, microbatch): (usize, usize)| Action::BackwardWeight { stage, microbatch };
        for op in 0..total + warmup {
            if op < total {
                let stage = forward_stage(op);
                actions.push(fwd(stage, take(stage, 0)));
            }
            if op < warmup {
                continue;
            }
            let stage = backward_stage(op);
            let microbatch = take(stage, 1);
            actions.push(Action::BackwardInput { stage, microbatch });
            inputs.push((stage, microbatch));
            if op - warmup >= r {
                actions.push(weight(inputs[weights]));
                weights += 1;
            }
        }
        actions.extend(inputs[weights..].iter().map(|&i| weight(i)));
    }
    Some(schedule)
}

/// Zero bubble on a V (ZB-V; Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024):
/// two chunks per rank placed in a V, rank `r` running stage `r` on the way down and stage
/// `2p - 1 - r` on the way back ([`v_placement`]), every backward split into `I` and `W` as
/// in [`zero_bubble`]. Rank 0 then holds both the first and the last stage, and the turn
/// (stages `p - 1` and `p`) stays on rank `p - 1`.
///
/// The order comes from a greedy list schedule: whenever a rank is idle it runs the first of
/// these that is ready, the earliest micro-batch of each stage first:
/// 1. a forward, the way-back chunk's first, unless the rank already holds `2p` chunk
///    activations (from forward to weight gradient): chunks are half a rank's layers, so that
///    is `p` micro-batches of the rank's layers, what 1F1B's first rank holds of its own;
/// 2. an input gradient (`I`), the way-down chunk's first;
/// 3. a weight gradient (`W`), of the chunk with fewer done (the way-down chunk's on a tie):
///    nobody waits for it, so it fills the gaps.
///
/// Here the actions take unit time (`F = I = W`); [`zero_bubble_v_for`] times them with given
/// costs. The last rank cannot start before `p - 1`, and every rank has `6m` units of work,
/// so no step takes less than `6m + p - 1` units; this order takes exactly that for every
/// `m >= 2p` (a unit test checks every `p <= 16`, `m <= 64`): half of ZB-H1's `p - 1`
/// whole-stage bubble. Requires `v = 2`; any `p, m >= 1`.
pub fn zero_bubble_v(p: usize, m: usize, v: usize) -> Result<Schedule> {
    check_sizes(p, m, v, 3)?;
    if v != 2 {
        invalid!("zb-v runs two stages per rank, in a V: chunks must be 2 (got {v})");
    }
    // The cap never stalls the unit-time order in the planner's tests; should it, a larger one
    // is tried (with no cap every ready forward runs, so the schedule completes).
    let ranks = (2 * p..)
        .find_map(|cap| greedy_v(p, m, cap, Greedy::default(), &|_| 1.0))
        .expect("an uncapped greedy schedule always completes");
    Ok(v_schedule(p, m, ranks))
}

/// [`zero_bubble_v`] for stages of unequal cost: the greedy order is also built under `costs`
/// (forward, and backward split by the weight share), in each `Greedy` variant, and the
/// published fixed V orders ([`fixed_zb_v`], the zero-bubble paper's ZB-V as PyTorch builds
/// it, and DualPipeV's) are weighed beside them; the order that simulates fastest under them
/// is kept, the unit-time one included (first on ties). Orders that would stall under the
/// `2p` cap, or hold more than `2p` chunks' activations at once on a rank, are not
/// candidates, so no rank holds more than the unit-time order allows. The greedy orders are
/// built without transfer times; the simulation that picks among them includes `costs`'
/// latency and bandwidth. Under uniform costs the unit-time order is returned.
pub fn zero_bubble_v_for(p: usize, m: usize, v: usize, costs: &Costs) -> Result<Schedule> {
    let unit = zero_bubble_v(p, m, v)?;
    costs.check(2 * p)?;
    let fits = |s: &Schedule| -> Result<Option<f64>> {
        let sim = simulate(s, costs)?;
        Ok((sim.peak_held() <= 2 * p).then_some(sim.makespan))
    };
    let unit_time = fits(&unit)?.unwrap_or(f64::INFINITY);
    let mut best = (unit_time, unit);
    let mut consider = |ranks: Vec<Vec<Action>>| -> Result<()> {
        let timed = v_schedule(p, m, ranks);
        if let Some(time) = fits(&timed)? {
            if time < best.0 {
                best = (time, timed);
            }
        }
        Ok(())
    };
    for inputs_first in [false, true] {
        for reserve in [false, true] {
            let order = Greedy {
                inputs_first,
                reserve,
            };
            if let Some(ranks) = greedy_v(p, m, 2 * p, order, &|a| costs.duration(a)) {
                consider(ranks)?;
            }
        }
    }
    consider(fixed_zb_v(p, m))?;
    if m >= 2 * p {
        consider(dualpipe_v_order(p, m))?;
    }
    Ok(best.1)
}

/// One rank's list in a fixed V order, built phase by phase: each call adds the next
/// micro-batch of a chunk (0 the way down, stage `r`; 1 the way back, stage `2p - 1 - r`),
/// and input gradients queue their weight halves (first in, first out) for [`VOrder::weight`].
struct VOrder {
    stages: [usize; 2],
    forwards: [usize; 2],
    backwards: [usize; 2],
    queued: std::collections::VecDeque<(usize, usize)>,
    actions: Vec<Action>,
}

impl VOrder {
    fn new(p: usize, rank: usize, m: usize) -> Self {
        VOrder {
            stages: [rank, 2 * p - 1 - rank],
            forwards: [0; 2],
            backwards: [0; 2],
            queued: Default::default(),
            actions: Vec::with_capacity(6 * m),
        }
    }

    fn forward(&mut self, chunk: usize) {
        self.actions
            .push(fwd(self.stages[chunk], self.forwards[chunk]));
        self.forwards[chunk] += 1;
    }

    /// The next backward of `chunk`: whole, or its input half with the weight half queued.
    fn backward(&mut self, chunk: usize, split: bool) {
        let (stage, microbatch) = (self.stages[chunk], self.backwards[chunk]);
        self.backwards[chunk] += 1;
        if split {
            self.actions
                .push(Action::BackwardInput { stage, microbatch });
            self.queued.push_back((stage, microbatch));
        } else {
            self.actions.push(bwd(stage, microbatch));
        }
    }

    /// The oldest queued weight half, if any.
    fn weight(&mut self) {
        if let Some((stage, microbatch)) = self.queued.pop_front() {
            self.actions
                .push(Action::BackwardWeight { stage, microbatch });
        }
    }

    /// The oldest queued weight half of `chunk`.
    fn weight_of(&mut self, chunk: usize) {
        let stage = self.stages[chunk];
        if let Some(i) = self.queued.iter().position(|&(s, _)| s == stage) {
            let (stage, microbatch) = self.queued.remove(i).expect("found");
            self.actions
                .push(Action::BackwardWeight { stage, microbatch });
        }
    }

    /// Every queued weight half of `chunk`, oldest first.
    fn weights_left(&mut self, chunk: usize) {
        while self.queued.iter().any(|&(s, _)| s == self.stages[chunk]) {
            self.weight_of(chunk);
        }
    }
}

/// The zero-bubble paper's fixed ZB-V order ([`fixed_zb_v`]) as a schedule named zb-v: the
/// published order that [`zero_bubble_v_for`] weighs its own against (BENCHMARKS.md).
pub fn zero_bubble_v_fixed(p: usize, m: usize, v: usize) -> Result<Schedule> {
    check_sizes(p, m, v, 3)?;
    if v != 2 {
        invalid!("zb-v runs two stages per rank, in a V: chunks must be 2 (got {v})");
    }
    Ok(v_schedule(p, m, fixed_zb_v(p, m)))
}

/// The zero-bubble paper's fixed ZB-V order, as PyTorch's `ScheduleZBVZeroBubble` builds it:
/// per rank, `2(p - r) - 1` forwards down, `r` pairs of forwards (back, down), `p - r` rounds
/// of forward, input and weight on the way back, then rounds of (forward, input, weight) on
/// each chunk, and a cool-down of input halves with the weight halves after. Built for at
/// least `2p - 1` micro-batches; the actions of those beyond `m` are dropped (which keeps the
/// order free of cycles: a micro-batch's dependencies never leave it).
fn fixed_zb_v(p: usize, m: usize) -> Vec<Vec<Action>> {
    let n = m.max(2 * p - 1);
    (0..p)
        .map(|r| {
            let mut o = VOrder::new(p, r, n);
            let pair = |o: &mut VOrder, chunk: usize| {
                o.forward(chunk);
                o.backward(chunk, true);
                o.weight();
            };
            (0..2 * (p - r) - 1).for_each(|_| o.forward(0));
            for _ in 0..r {
                o.forward(1);
                o.forward(0);
            }
            (0..p - r).for_each(|_| pair(&mut o, 1));
            while o.forwards[1] < o.forwards[0] || o.forwards[0] < n {
                if o.forwards[0] < n {
                    o.forward(0);
                }
                o.backward(0, true);
                o.weight();
                pair(&mut o, 1);
            }
            for _ in 0..r {
                o.backward(0, true);
                o.backward(1, true);
            }
            for _ in 0..p - r {
                o.backward(0, true);
                o.weight_of(0);
            }
            o.weights_left(1);
            o.weights_left(0);
            o.actions.retain(|a| a.microbatch() < m);
            o.actions
        })
        .collect()
}

/// DualPipeV's order (DeepSeek's DualPipe cut into a V; PyTorch's `ScheduleDualPipeV`), per
/// rank `r` in eight phases: `2(p - r - 1)` forwards down; `r + 1` pairs of forwards (down,
/// back); `p - r - 1` rounds of input half, weight half and forward on the way back; then the
/// steady state, `m - 2p + r + 1` rounds of two pairs (forward down with full backward back,
/// forward back with full backward down), each pair two micro-batches that can overlap;
/// `p - r - 1` rounds of a backward back and a pair (forward back with backward down); `r + 1`
/// pairs of backwards (back, down), split from the middle one on (the way-back half first on
/// odd ranks); `p - r - 1` rounds of a weight half and a split backward down; and the weight
/// halves left.
fn dualpipe_v_order(p: usize, m: usize) -> Vec<Vec<Action>> {
    (0..p)
        .map(|r| {
            let mut o = VOrder::new(p, r, m);
            (0..2 * (p - r - 1)).for_each(|_| o.forward(0));
            for _ in 0..r + 1 {
                o.forward(0);
                o.forward(1);
            }
            for _ in 0..p - r - 1 {
                o.backward(1, true);
                o.weight();
                o.forward(1);
            }
            for _ in 0..m + r + 1 - 2 * p {
                o.forward(0);
                o.backward(1, false);
                o.forward(1);
                o.backward(0, false);
            }
            for _ in 0..p - r - 1 {
                o.backward(1, false);
                o.forward(1);
                o.backward(0, false);
            }
            let rounds = r + 1;
            let mut split = false;
            for i in 0..rounds {
                split |= i == rounds / 2 && r % 2 == 1;
                o.backward(1, split);
                split |= i == rounds / 2 && r % 2 == 0;
                o.backward(0, split);
            }
            for _ in 0..p - r - 1 {
                o.weight();
                o.backward(0, true);
            }
            (0..r + 1).for_each(|_| o.weight());
            o.actions
        })
        .collect()
}

/// DualPipeV ([`ScheduleKind::DualPipeV`]) for `p` ranks and `m >= 2p` micro-batches; `v`
/// must be 2. Its orders do not depend on the costs.
pub fn dualpipe_v(p: usize, m: usize, v: usize) -> Result<Schedule> {
    check_sizes(p, m, v, 3)?;
    if v != 2 {
        invalid!("dualpipev runs two stages per rank, in a V: chunks must be 2 (got {v})");
    }
    if m < 2 * p {
        invalid!(
            "dualpipev needs at least two micro-batches per rank: microbatches must be at least 2p = {} (got {m})",
            2 * p
        );
    }
    Ok(Schedule {
        name: ScheduleKind::DualPipeV.name().to_string(),
        ..v_schedule(p, m, dualpipe_v_order(p, m))
    })
}

/// Stage `k` on rank `k mod p`: every generator's placement but zb-v's (`stages` a multiple of
/// `p`, which the generators guarantee).
pub fn looped_placement(stages: usize, p: usize) -> Vec<usize> {
    (0..stages).map(|k| k % p).collect()
}

/// The V placement of `2p` stages on `p` ranks: rank `r` runs stages `r` and `2p - 1 - r`.
pub fn v_placement(p: usize) -> Vec<usize> {
    (0..2 * p).map(|s| s.min(2 * p - 1 - s)).collect()
}

fn v_schedule(p: usize, m: usize, ranks: Vec<Vec<Action>>) -> Schedule {
    Schedule {
        name: ScheduleKind::ZeroBubbleV.name().to_string(),
        microbatches: m,
        placement: v_placement(p),
        ranks,
    }
}

/// Variants of [`zero_bubble_v`]'s greedy choice, tried under uneven costs.
#[derive(Clone, Copy, Default)]
struct Greedy {
    /// A ready input gradient before a ready forward (the unit-time order runs the forward).
    inputs_first: bool,
    /// Keep one place under the cap for the way-back chunk's forwards: when the way-down
    /// chunk's forwards are cheap they would otherwise fill the cap and stall the rank.
    reserve: bool,
}

/// The greedy list schedule of [`zero_bubble_v`] with at most `cap` chunk activations per
/// rank, each action taking `duration`, choosing as `order` says; `None` if it stalls.
fn greedy_v(
    p: usize,
    m: usize,
    cap: usize,
    order: Greedy,
    duration: &dyn Fn(Action) -> f64,
) -> Option<Vec<Vec<Action>>> {
    let stages = 2 * p;
    // Per stage: end times of forwards and input gradients, and how many of each kind began.
    let mut forward_done = vec![vec![f64::INFINITY; m]; stages];
    let mut input_done = vec![vec![f64::INFINITY; m]; stages];
    let (mut forwards, mut inputs, mut weights) =
        (vec![0; stages], vec![0; stages], vec![0; stages]);
    let mut held = vec![0usize; p];
    let mut free_at = vec![0.0f64; p];
    let mut ranks = vec![Vec::with_capacity(6 * m); p];
    let total = 3 * stages * m;
    let (mut ran, mut t) = (0, 0.0f64);
    while ran < total {
        let mut progressed = false;
        for (rank, actions) in ranks.iter_mut().enumerate() {
            if free_at[rank] > t {
                continue;
            }
            let (down, back) = (rank, stages - 1 - rank);
            let input_ready = |s: usize| {
                let x = inputs[s];
                x < m && forward_done[s][x] <= t && (s + 1 == stages || input_done[s + 1][x] <= t)
            };
            let forward_ready =
                |s: usize| forwards[s] < m && (s == 0 || forward_done[s - 1][forwards[s]] <= t);
            let weight_ready = |s: usize| weights[s] < inputs[s] && input_done[s][weights[s]] <= t;
            // Optionally the way-down chunk leaves one place for the way back, whose forwards
            // the rank's own backwards wait for.
            let room = |s: usize| held[rank] + usize::from(order.reserve && s == down) < cap;
            let forward = [back, down]
                .into_iter()
                .find(|&s| room(s) && forward_ready(s));
            let input = [down, back].into_iter().find(|&s| input_ready(s));
            let input_first = input.is_some() && (forward.is_none() || order.inputs_first);
            let action = if let (Some(s), false) = (forward, input_first) {
                forwards[s] += 1;
                held[rank] += 1;
                fwd(s, forwards[s] - 1)
            } else if let (Some(s), true) = (input, input_first) {
                inputs[s] += 1;
                Action::BackwardInput {
                    stage: s,
                    microbatch: inputs[s] - 1,
                }
            } else if let Some(s) = [down, back]
                .into_iter()
                .filter(|&s| weight_ready(s))
                .min_by_key(|&s| weights[s])
            {
                weights[s] += 1;
                held[rank] -= 1;
                Action::BackwardWeight {
                    stage: s,
                    microbatch: weights[s] - 1,
                }
            } else {
                continue;
            };
            let end = t + duration(action);
            match action {
                Action::Forward { stage, microbatch } => forward_done[stage][microbatch] = end,
                Action::BackwardInput { stage, microbatch } => input_done[stage][microbatch] = end,
                _ => {}
            }
            free_at[rank] = end;
            actions.push(action);
            ran += 1;
            progressed = true;
        }
        if !progressed {
            // Nothing could start at `t`: wait for the next action to end, if any is running.
            t = free_at
                .iter()
                .copied()
                .filter(|&f| f > t)
                .reduce(f64::min)?;
        }
    }
    Some(ranks)
}

/// One rank's compute order in the 1F1B family: its forwards and its backwards, each in the
/// order the rank runs them, and how many forwards run before the first backward.
struct RankOrder {
    forwards: Vec<Action>,
    backwards: Vec<Action>,
    warmup: usize,
}

impl RankOrder {
    /// 1F1B's order for `v = 1`; Megatron's interleaved order otherwise, over `m` rounded up
    /// to a multiple of `p` (the caller drops the padding: removing every action of a
    /// micro-batch keeps the order free of cycles, since its data dependencies never leave
    /// that micro-batch).
    fn new(p: usize, m: usize, v: usize, rank: usize) -> RankOrder {
        if v == 1 {
            return RankOrder {
                forwards: (0..m).map(|mb| fwd(rank, mb)).collect(),
                backwards: (0..m).map(|mb| bwd(rank, mb)).collect(),
                warmup: (p - rank - 1).min(m),
            };
        }
        let padded = m.div_ceil(p) * p;
        // (micro-batch, chunk) in the order every rank runs its forwards.
        let mut order = Vec::with_capacity(padded * v);
        for group_start in (0..padded).step_by(p) {
            for c in 0..v {
                order.extend((group_start..group_start + p).map(|mb| (mb, c)));
            }
        }
        RankOrder {
            forwards: order.iter().map(|&(mb, c)| fwd(c * p + rank, mb)).collect(),
            // Backwards visit the chunks of each group in reverse: chunk v-1 first.
            backwards: order
                .iter()
                .map(|&(mb, c)| bwd((v - 1 - c) * p + rank, mb))
                .collect(),
            warmup: (2 * (p - rank - 1) + (v - 1) * p).min(padded * v),
        }
    }
}

/// Append `warmup` forwards, then forward/backward pairs, then the remaining backwards.
fn one_forward_one_backward(
    actions: &mut Vec<Action>,
    forwards: &[Action],
    backwards: &[Action],
    warmup: usize,
) {
    let n = forwards.len();
    actions.extend_from_slice(&forwards[..warmup]);
    for i in 0..n - warmup {
        actions.push(forwards[warmup + i]);
        actions.push(backwards[i]);
    }
    actions.extend_from_slice(&backwards[n - warmup..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(actions: &[Action]) -> String {
        actions
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn one_f_one_b_warms_up_then_alternates() {
        let s = one_f_one_b(4, 8, 1).unwrap();
        assert_eq!(
            text(&s.ranks[0]),
            "S0F0 S0F1 S0F2 S0F3 S0B0 S0F4 S0B1 S0F5 S0B2 S0F6 S0B3 S0F7 S0B4 S0B5 S0B6 S0B7"
        );
        assert_eq!(
            text(&s.ranks[3]),
            "S3F0 S3B0 S3F1 S3B1 S3F2 S3B2 S3F3 S3B3 S3F4 S3B4 S3F5 S3B5 S3F6 S3B6 S3F7 S3B7"
        );
    }

    #[test]
    fn interleaved_places_stage_k_on_rank_k_mod_p() {
        let s = interleaved(2, 4, 2).unwrap();
        assert_eq!(s.placement, vec![0, 1, 0, 1]);
        assert_eq!(s.stages_of(0), vec![0, 2]);
        // Warm-up on rank 0: 2 (p - 1) + (v - 1) p = 4 forwards.
        assert_eq!(
            text(&s.ranks[0]),
            "S0F0 S0F1 S2F0 S2F1 S0F2 S2B0 S0F3 S2B1 S2F2 S0B0 S2F3 S0B1 S2B2 S2B3 S0B2 S0B3"
        );
    }

    #[test]
    fn zero_bubble_splits_backwards_and_delays_the_weight_halves() {
        let s = zero_bubble(4, 8, 1).unwrap();
        assert_eq!(
            text(&s.ranks[0]),
            "S0F0 S0F1 S0F2 S0F3 S0I0 S0W0 S0F4 S0I1 S0W1 S0F5 S0I2 S0W2 S0F6 S0I3 S0W3 \
             S0F7 S0I4 S0W4 S0I5 S0W5 S0I6 S0W6 S0I7 S0W7"
        );
        assert_eq!(
            text(&s.ranks[3]),
            "S3F0 S3I0 S3F1 S3I1 S3F2 S3I2 S3F3 S3I3 S3W0 S3F4 S3I4 S3W1 S3F5 S3I5 S3W2 \
             S3F6 S3I6 S3W3 S3F7 S3I7 S3W4 S3W5 S3W6 S3W7"
        );
        // With chunks, interleaving's order: rank 1 of 2 warms up with 2 (p - r - 1) + p = 2
        // forwards, then its weight halves lag its input halves by one.
        let s = zero_bubble(2, 2, 2).unwrap();
        assert_eq!(s.placement, vec![0, 1, 0, 1]);
        assert_eq!(
            text(&s.ranks[1]),
            "S1F0 S1F1 S3F0 S3I0 S3F1 S3I1 S3W0 S1I0 S3W1 S1I1 S1W0 S1W1"
        );
    }

    #[test]
    fn zero_bubble_v_folds_the_stages_into_a_v() {
        let s = zero_bubble_v(2, 4, 2).unwrap();
        assert_eq!(s.placement, vec![0, 1, 1, 0]);
        assert_eq!(
            text(&s.ranks[0]),
            "S0F0 S0F1 S0F2 S3F0 S3I0 S3W0 S3F1 S0I0 S3I1 S0W0 S0F3 S0I1 S0W1 S3F2 S3I2 S3W1 \
             S3W2 S0I2 S0W2 S3F3 S3I3 S3W3 S0I3 S0W3"
        );
        let err = zero_bubble_v(2, 4, 1).unwrap_err().to_string();
        assert!(err.contains("chunks must be 2 (got 1)"), "{err}");
    }

    /// Every `p <= 16, m <= 64`: the order completes under the `2p` cap (none is raised), and
    /// for `m >= 2p` it takes the least possible `6m + p - 1` units.
    #[test]
    fn zero_bubble_v_reaches_the_bound_everywhere() {
        for p in 1..=16 {
            for m in 1..=64 {
                let ranks = greedy_v(p, m, 2 * p, Greedy::default(), &|_| 1.0)
                    .expect("completes under the 2p cap");
                if m < 2 * p {
                    continue;
                }
                let schedule = Schedule {
                    name: "zb-v".into(),
                    microbatches: m,
                    placement: v_placement(p),
                    ranks,
                };
                let sim = crate::sim::simulate(&schedule, &crate::sim::Costs::uniform(2 * p));
                assert_eq!(sim.unwrap().makespan, (6 * m + p - 1) as f64, "p={p} m={m}");
            }
        }
    }

    /// Costs one run measured under a balanced V (an embedding-only stage 0, the head with
    /// three blocks on stage 3): the unit-time order stalls rank 0 behind its cheap forwards;
    /// the order built for the costs does better, within the same cap.
    #[test]
    fn zero_bubble_v_for_uneven_stages_beats_the_unit_order() {
        let costs = Costs {
            fwd: vec![0.02, 4.12, 8.17, 14.76],
            bwd: vec![0.05, 6.55, 12.96, 21.84],
            weight_share: vec![0.33, 0.33, 0.33, 0.26],
            ..Costs::uniform(4)
        };
        let time = |s: &Schedule| simulate(s, &costs).unwrap();
        let unit = time(&zero_bubble_v(2, 8, 2).unwrap());
        let timed = time(&zero_bubble_v_for(2, 8, 2, &costs).unwrap());
        assert!(
            timed.makespan < 0.8 * unit.makespan,
            "{} against {}",
            timed.makespan,
            unit.makespan
        );
        assert!(timed.ranks.iter().all(|r| r.peak_activations <= 4));
        // Under uniform costs the unit-time order is the one returned.
        let uniform = zero_bubble_v_for(3, 9, 2, &Costs::uniform(6)).unwrap();
        assert_eq!(uniform, zero_bubble_v(3, 9, 2).unwrap());
    }

    #[test]
    fn dualpipe_v_runs_each_action_once_and_completes() {
        for p in 1..=6 {
            for m in [2 * p, 2 * p + 1, 3 * p + 2] {
                let s = dualpipe_v(p, m, 2).unwrap();
                crate::schedule::validate(&s).unwrap();
                let lowered = crate::schedule::lower(&s).unwrap();
                crate::schedule::validate(&lowered).unwrap();
                let sim = simulate(&lowered, &Costs::uniform(2 * p)).unwrap();
                assert!(sim.makespan > 0.0);
            }
        }
        // Rank 0 of p = 2, m = 4: two forwards down, a pair, one round on the way back, the
        // steady pairs, then the split ends.
        let s = dualpipe_v(2, 4, 2).unwrap();
        assert_eq!(
            text(&s.ranks[0]),
            "S0F0 S0F1 S0F2 S3F0 S3I0 S3W0 S3F1 S0F3 S3B1 S3F2 S0B0 S3B2 S3F3 S0B1 S3B3 S0I2 S0W2 S0I3 S0W3"
        );
    }

    #[test]
    fn dualpipe_v_refuses_what_it_cannot_run() {
        let err = dualpipe_v(4, 7, 2).unwrap_err().to_string();
        assert!(
            err.contains("microbatches must be at least 2p = 8 (got 7)"),
            "{err}"
        );
        let err = dualpipe_v(4, 8, 1).unwrap_err().to_string();
        assert!(err.contains("chunks must be 2 (got 1)"), "{err}");
        assert_eq!(
            "dualpipev".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::DualPipeV
        );
    }

    #[test]
    fn the_fixed_zb_v_order_completes_for_any_m() {
        for p in 1..=6 {
            for m in 1..=3 * p {
                let s = v_schedule(p, m, fixed_zb_v(p, m));
                crate::schedule::validate(&s).unwrap();
                let lowered = crate::schedule::lower(&s).unwrap();
                crate::schedule::validate(&lowered).unwrap();
            }
        }
    }

    #[test]
    fn zero_bubble_v_for_is_never_slower_than_the_published_v_orders() {
        // Forward : input : weight from 1 : 1 : 1 to 1 : 1.6 : 0.4, stages alike or not.
        for (p, m) in [(2, 4), (4, 8), (4, 12), (8, 16)] {
            for (bwd, share) in [(2.0, 0.5), (2.0, 0.2), (1.6, 0.3)] {
                for skew in [0.0, 0.5] {
                    let stages = 2 * p;
                    let costs = Costs {
                        fwd: (0..stages)
                            .map(|s| 1.0 + skew * s as f64 / stages as f64)
                            .collect(),
                        bwd: (0..stages)
                            .map(|s| bwd * (1.0 + skew * s as f64 / stages as f64))
                            .collect(),
                        weight_share: vec![share; stages],
                        ..Costs::uniform(stages)
                    };
                    let ours =
                        simulate(&zero_bubble_v_for(p, m, 2, &costs).unwrap(), &costs).unwrap();
                    assert!(ours.ranks.iter().all(|r| r.peak_activations <= 2 * p));
                    let fixed = simulate(&v_schedule(p, m, fixed_zb_v(p, m)), &costs).unwrap();
                    let dual = simulate(&dualpipe_v(p, m, 2).unwrap(), &costs).unwrap();
                    for other in [&fixed, &dual] {
                        let within = other.ranks.iter().all(|r| r.peak_activations <= 2 * p);
                        assert!(
                            !within || ours.makespan <= other.makespan + 1e-9,
                            "p={p} m={m} bwd={bwd} share={share}: {} against {}",
                            ours.makespan,
                            other.makespan
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_fixed_zb_1p_order_completes_where_it_applies() {
        for p in 1..=6 {
            for m in 1..=3 * p {
                for v in 1..=3 {
                    let Some(s) = zero_bubble_fixed(p, m, v) else {
                        assert_ne!(m % (m / p).max(1), 0, "p={p} m={m}");
                        continue;
                    };
                    crate::schedule::validate(&s).unwrap();
                    let lowered = crate::schedule::lower(&s).unwrap();
                    crate::schedule::validate(&lowered).unwrap();
                }
            }
        }
    }

    #[test]
    fn zero_bubble_for_is_never_slower_than_the_fixed_zb_1p_within_its_cap() {
        for (p, m, v) in [(2, 4, 1), (4, 8, 1), (4, 16, 1), (4, 8, 2), (8, 16, 2)] {
            for share in [0.5, 0.4, 0.3, 0.2] {
                let costs = Costs {
                    weight_share: vec![share; p * v],
                    ..Costs::uniform(p * v)
                };
                let ours = zero_bubble(p, m, v).unwrap();
                let cap = simulate(&ours, &costs)
                    .unwrap()
                    .ranks
                    .iter()
                    .map(|r| r.peak_activations)
                    .max()
                    .unwrap();
                let chosen = simulate(&zero_bubble_for(p, m, v, &costs).unwrap(), &costs).unwrap();
                assert!(chosen.ranks.iter().all(|r| r.peak_activations <= cap));
                let fixed = simulate(&zero_bubble_fixed(p, m, v).unwrap(), &costs).unwrap();
                if fixed.ranks.iter().all(|r| r.peak_activations <= cap) {
                    assert!(
                        chosen.makespan <= fixed.makespan + 1e-9,
                        "p={p} m={m} v={v}"
                    );
                }
            }
        }
    }

    #[test]
    fn gpipe_runs_all_forwards_first() {
        let s = gpipe(2, 3, 1).unwrap();
        assert_eq!(text(&s.ranks[1]), "S1F0 S1F1 S1F2 S1B0 S1B1 S1B2");
    }

    #[test]
    fn naive_finishes_one_microbatch_before_the_next() {
        let s = naive(2, 2, 2).unwrap();
        assert_eq!(text(&s.ranks[0]), "S0F0 S2F0 S2B0 S0B0 S0F1 S2F1 S2B1 S0B1");
    }

    #[test]
    fn bad_sizes_name_the_constraint() {
        let err = generate(ScheduleKind::GPipe, 0, 4, 1).unwrap_err();
        assert!(err
            .to_string()
            .contains("stages must be at least 1 (got 0)"));
        let err = generate(ScheduleKind::OneFOneB, 4, 0, 1).unwrap_err();
        assert!(err
            .to_string()
            .contains("microbatches must be at least 1 (got 0)"));
        let err = generate(ScheduleKind::OneFOneB, 4, 8, 2).unwrap_err();
        assert!(err.to_string().contains("chunks must be 1 (got 2)"));
        assert!(crate::is_invalid_input(&err));
        assert!("zb".parse::<ScheduleKind>().is_err());
    }
}
