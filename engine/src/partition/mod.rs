//! Layer -> stage assignment.
//!
//! A *layer* is anything the partitioner may place: the embedding (layer 0), each transformer
//! block, the head + loss (the last layer). Each gets its own cost, so a heavy head or a light
//! embedding is balanced like any block. A partition is one contiguous, non-empty range of
//! layers per stage; with interleaving, stage `k` runs on rank `k mod p`, and under zero
//! bubble's V, stages `r` and `2p - 1 - r` share rank `r` ([`chunks`], [`balanced_v`]).

use std::ops::Range;

use std::fmt;
use std::str::FromStr;

use anyhow::Result;
use serde::Serialize;

use crate::invalid;

/// How to cut the layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Equal layer counts, the first `n mod k` stages one layer longer.
    Uniform,
    /// Minimise the slowest stage's cost (exact).
    Balanced,
    /// Minimise the slowest stage's cost with every stage's memory within a budget (exact).
    MemoryCapped,
}

impl Method {
    /// The name users write (`--partition`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Uniform => "uniform",
            Method::Balanced => "balanced",
            Method::MemoryCapped => "memory-capped",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        match [Method::Uniform, Method::Balanced, Method::MemoryCapped]
            .into_iter()
            .find(|m| m.name() == name)
        {
            Some(method) => Ok(method),
            None => invalid!(
                "unknown partition method `{name}` (expected uniform, balanced or memory-capped)"
            ),
        }
    }
}

serde_as_name!(Method);

/// A computed partition with its per-stage totals.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Partition {
    /// The method that produced it.
    pub method: Method,
    /// Layers of each stage.
    pub stages: Vec<Range<usize>>,
    /// Sum of the layer costs of each stage.
    pub stage_cost: Vec<f64>,
    /// Sum of the layer memory of each stage (bytes).
    pub stage_memory: Vec<f64>,
}

impl Partition {
    /// Total the given per-layer costs and memory over `stages`.
    pub fn new(method: Method, stages: Vec<Range<usize>>, cost: &[f64], memory: &[f64]) -> Self {
        let total = |list: &[f64], r: &Range<usize>| {
            if list.is_empty() {
                0.0
            } else {
                list[r.clone()].iter().sum()
            }
        };
        Partition {
            method,
            stage_cost: stages.iter().map(|r| total(cost, r)).collect(),
            stage_memory: stages.iter().map(|r| total(memory, r)).collect(),
            stages,
        }
    }

    /// Cost of the slowest stage.
    pub fn max_cost(&self) -> f64 {
        self.stage_cost.iter().copied().fold(0.0, f64::max)
    }
}

fn check_counts(n_layers: usize, stages: usize) -> Result<()> {
    if stages == 0 {
        invalid!("stages must be at least 1 (got 0)");
    }
    if stages > n_layers {
        invalid!("cannot cut {n_layers} layers into {stages} stages: every stage needs at least one layer");
    }
    Ok(())
}

fn check_values(name: &str, list: &[f64]) -> Result<()> {
    if let Some((i, v)) = list
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        invalid!("{name}: layer {i} must be a non-negative number (got {v})");
    }
    Ok(())
}

/// Cut `n_layers` layers (embedding and head included) into `stages` contiguous stages of
/// equal size, the first `n_layers mod stages` one layer longer; no stage is empty. This is
/// the trainer's default: pass `p · v` stages for an interleaved schedule.
pub fn uniform(n_layers: usize, stages: usize) -> Result<Vec<Range<usize>>> {
    check_counts(n_layers, stages)?;
    let (base, extra) = (n_layers / stages, n_layers % stages);
    let mut start = 0;
    Ok((0..stages)
        .map(|s| {
            let len = base + usize::from(s < extra);
            start += len;
            start - len..start
        })
        .collect())
}

/// Cut layers with per-layer `cost` into `stages` stages minimising the slowest stage's total.
///
/// Exact: dynamic programming over (stage, layer), `O(stages · layers²)`.
pub fn balanced(cost: &[f64], stages: usize) -> Result<Vec<Range<usize>>> {
    check_values("cost", cost)?;
    memory_capped(cost, &[], stages, f64::INFINITY)
}

/// Like [`balanced`], with every stage's total `memory` at most `budget` bytes (one stage per
/// device; with interleaving cap the per-chunk share). Errors when no cut fits, naming the
/// smallest budget that would.
pub fn memory_capped(
    cost: &[f64],
    memory: &[f64],
    stages: usize,
    budget: f64,
) -> Result<Vec<Range<usize>>> {
    let n = cost.len();
    check_counts(n, stages)?;
    check_values("cost", cost)?;
    check_values("memory", memory)?;
    if !memory.is_empty() && memory.len() != n {
        invalid!("memory: got {} values for {n} layers", memory.len());
    }
    if budget.is_nan() || budget < 0.0 {
        invalid!("memory budget must be a non-negative number of bytes (got {budget})");
    }
    let prefix = |list: &[f64]| {
        let mut out = vec![0.0; n + 1];
        for i in 0..list.len() {
            out[i + 1] = out[i] + list[i];
        }
        out
    };
    let (pc, pm) = (prefix(cost), prefix(memory));
    let fits = |a: usize, b: usize| pm[b] - pm[a] <= budget;
    // best[k][i]: least possible slowest stage when the first i layers form k stages.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
    let mut cut = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for k in 1..=stages {
        // Leave at least one layer for each remaining stage.
        for i in k..=n - (stages - k) {
            for j in (k - 1..i).rev() {
                if !fits(j, i) || best[k - 1][j].is_infinite() {
                    continue;
                }
                let slowest = best[k - 1][j].max(pc[i] - pc[j]);
                if slowest < best[k][i] {
                    best[k][i] = slowest;
                    cut[k][i] = j;
                }
            }
        }
    }
    if best[stages][n].is_infinite() {
        let needed = min_max_memory(memory, stages)?;
        invalid!(
            "no partition of {n} layers into {stages} stages fits a memory budget of {budget} bytes per stage; the smallest budget that fits is {needed} bytes"
        );
    }
    let mut ranges = vec![0..0; stages];
    let mut end = n;
    for k in (1..=stages).rev() {
        let start = cut[k][end];
        ranges[k - 1] = start..end;
        end = start;
    }
    Ok(ranges)
}

/// Cut layers with per-layer `cost` into `2p` stages for the V placement of zero bubble's
/// ZB-V (rank `r` runs stages `r` and `2p - 1 - r`), minimising the busiest rank's total: the
/// two stages of a rank together, not each stage, set its pace. Stage-balanced cuts put the
/// model's two ends on rank 0 whatever they cost; this one gives rank 0 fewer blocks when the
/// embedding and head are heavy, and more when they are light.
///
/// Exact: dynamic programming over ranks from the outside in, the state being how many layers
/// the ranks so far took from the front and from the back; `O(p · layers⁴)`, which is nothing
/// for GPT-2's depths.
pub fn balanced_v(cost: &[f64], p: usize) -> Result<Vec<Range<usize>>> {
    let n = cost.len();
    check_counts(n, 2 * p)?;
    check_values("cost", cost)?;
    let mut prefix = vec![0.0; n + 1];
    for i in 0..n {
        prefix[i + 1] = prefix[i] + cost[i];
    }
    let sum = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[i][j]: least busiest-rank total when the ranks so far took layers [0, i) and [j, n);
    // from[r][i][j]: the state rank r - 1 left, for the way back.
    let mut best = vec![vec![f64::INFINITY; n + 1]; n + 1];
    best[0][n] = 0.0;
    let mut from = vec![vec![vec![(0usize, 0usize); n + 1]; n + 1]; p + 1];
    for r in 0..p {
        let mut next = vec![vec![f64::INFINITY; n + 1]; n + 1];
        // Ranks after this one need two layers each, and this one two of its own.
        let left = 2 * (p - r - 1);
        for (i, row) in best.iter().enumerate() {
            for (j, &so_far) in row.iter().enumerate().skip(i) {
                if so_far.is_infinite() || j - i < left + 2 {
                    continue;
                }
                for a in i + 1..j - left {
                    // The last rank's two stages meet in the middle.
                    let backs = if r + 1 == p { a..a + 1 } else { a + left..j };
                    for b in backs {
                        let busiest = so_far.max(sum(i, a) + sum(b, j));
                        if busiest < next[a][b] {
                            next[a][b] = busiest;
                            from[r + 1][a][b] = (i, j);
                        }
                    }
                }
            }
        }
        best = next;
    }
    let middle = (0..=n)
        .filter(|&i| best[i][i].is_finite())
        .min_by(|&x, &y| best[x][x].total_cmp(&best[y][y]))
        .expect("2p <= layers leaves a cut");
    let mut ranges = vec![0..0; 2 * p];
    let (mut a, mut b) = (middle, middle);
    for r in (0..p).rev() {
        let (i, j) = from[r + 1][a][b];
        ranges[r] = i..a;
        ranges[2 * p - 1 - r] = b..j;
        (a, b) = (i, j);
    }
    Ok(ranges)
}

/// The least per-stage memory any cut into `stages` stages can achieve.
fn min_max_memory(memory: &[f64], stages: usize) -> Result<f64> {
    let ranges = memory_capped(memory, &[], stages, f64::INFINITY)?;
    Ok(ranges
        .iter()
        .map(|r| memory[r.clone()].iter().sum::<f64>())
        .fold(0.0, f64::max))
}

/// The layers of each rank's chunks, in stage order, when stage `k` runs on rank
/// `placement[k]`: `result[rank][chunk]`. Interleaving places stage `k` on rank `k mod p`
/// ([`crate::schedule::looped_placement`]), zero bubble's V as
/// [`crate::schedule::v_placement`] says.
pub fn chunks(stages: &[Range<usize>], placement: &[usize]) -> Result<Vec<Vec<Range<usize>>>> {
    if stages.len() != placement.len() {
        invalid!(
            "{} stages but a placement for {}: give every stage a rank",
            stages.len(),
            placement.len()
        );
    }
    let ranks = placement.iter().max().map_or(0, |r| r + 1);
    let mut out = vec![Vec::new(); ranks];
    for (range, &rank) in stages.iter().zip(placement) {
        out[rank].push(range.clone());
    }
    Ok(out)
}

/// Per-layer costs of a model: embedding, `blocks` identical blocks, then head + loss.
pub fn layer_costs(embedding: f64, block: f64, blocks: usize, head: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(blocks + 2);
    out.push(embedding);
    out.extend(std::iter::repeat_n(block, blocks));
    out.push(head);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_spreads_the_remainder() {
        assert_eq!(uniform(14, 4).unwrap(), vec![0..4, 4..8, 8..11, 11..14]);
        assert_eq!(uniform(3, 3).unwrap(), vec![0..1, 1..2, 2..3]);
        let err = uniform(3, 4).unwrap_err().to_string();
        assert!(err.contains("3 layers into 4 stages"), "{err}");
        assert!(uniform(3, 0).is_err());
    }

    #[test]
    fn interleaved_chunks_match_the_seed() {
        let stages = uniform(16, 4).unwrap();
        let ranks = chunks(&stages, &crate::schedule::looped_placement(4, 2)).unwrap();
        assert_eq!(ranks[0], vec![0..4, 8..12]);
        assert_eq!(ranks[1], vec![4..8, 12..16]);
        // The V: rank 0 holds both ends.
        let ranks = chunks(&stages, &crate::schedule::v_placement(2)).unwrap();
        assert_eq!(ranks[0], vec![0..4, 12..16]);
        assert_eq!(ranks[1], vec![4..8, 8..12]);
        assert!(chunks(&stages, &[0, 1]).is_err());
    }

    /// Against every cut into 2p stages: the least busiest-rank total, found by brute force.
    #[test]
    fn balanced_v_is_exact() {
        fn cuts(n: usize, k: usize) -> Vec<Vec<usize>> {
            // Interior boundaries 0 < c1 < ... < c(k-1) < n.
            if k == 1 {
                return vec![vec![]];
            }
            let mut out = Vec::new();
            for first in 1..n {
                for rest in cuts(n - first, k - 1) {
                    let mut c = vec![first];
                    c.extend(rest.iter().map(|x| x + first));
                    out.push(c);
                }
            }
            out
        }
        let costs: [&[f64]; 3] = [
            &[0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0],
            &[3.0, 1.0, 2.0, 7.0, 1.0, 1.0, 4.0, 2.0, 2.0],
            &[1.0; 6],
        ];
        for cost in costs {
            for p in 1..=cost.len() / 2 {
                let ranges = balanced_v(cost, p).unwrap();
                assert_eq!(ranges.len(), 2 * p);
                assert!(ranges.iter().all(|r| !r.is_empty()));
                assert_eq!((ranges[0].start, ranges[2 * p - 1].end), (0, cost.len()));
                let busiest = |ranges: &[Range<usize>]| {
                    (0..p)
                        .map(|r| {
                            let sum = |x: &Range<usize>| cost[x.clone()].iter().sum::<f64>();
                            sum(&ranges[r]) + sum(&ranges[2 * p - 1 - r])
                        })
                        .fold(0.0, f64::max)
                };
                let brute = cuts(cost.len(), 2 * p)
                    .into_iter()
                    .map(|c| {
                        let mut bounds = vec![0];
                        bounds.extend(c);
                        bounds.push(cost.len());
                        let ranges: Vec<Range<usize>> =
                            bounds.windows(2).map(|w| w[0]..w[1]).collect();
                        busiest(&ranges)
                    })
                    .fold(f64::INFINITY, f64::min);
                assert!((busiest(&ranges) - brute).abs() < 1e-9, "p={p} {cost:?}");
            }
        }
        // A head worth five blocks: rank 0 keeps no block beside the two ends (5.1), rank 1
        // takes all six (6.0); uniform layer counts would give rank 0 two blocks (7.1).
        let heavy = [0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0];
        assert_eq!(balanced_v(&heavy, 2).unwrap(), vec![0..1, 1..2, 2..7, 7..8]);
        assert!(balanced_v(&heavy, 5).is_err());
    }

    #[test]
    fn balanced_is_optimal_where_greedy_is_not() {
        // Greedy "fill to the mean" puts 4+1 together and leaves 3+3+3: slowest 9 over 2 stages.
        let cost = [4.0, 1.0, 3.0, 3.0, 3.0];
        let ranges = balanced(&cost, 2).unwrap();
        let p = Partition::new(Method::Balanced, ranges, &cost, &[]);
        assert_eq!(p.max_cost(), 8.0);
        // Brute force over every cut of 8 layers into 3 stages agrees.
        let cost = [1.0, 7.0, 2.0, 2.0, 5.0, 1.0, 1.0, 6.0];
        let best = balanced(&cost, 3).unwrap();
        let got = Partition::new(Method::Balanced, best, &cost, &[]).max_cost();
        let mut brute = f64::INFINITY;
        for a in 1..7 {
            for b in a + 1..8 {
                let s = |r: Range<usize>| cost[r].iter().sum::<f64>();
                brute = brute.min(s(0..a).max(s(a..b)).max(s(b..8)));
            }
        }
        assert_eq!(got, brute);
    }

    #[test]
    fn embedding_and_head_count_with_their_own_costs() {
        let cost = layer_costs(0.5, 1.0, 6, 3.0);
        assert_eq!(cost.len(), 8);
        let ranges = balanced(&cost, 3).unwrap();
        // The heavy head gets a stage to itself; the light embedding shares one.
        assert_eq!(ranges, vec![0..4, 4..7, 7..8]);
    }

    #[test]
    fn memory_cap_is_respected_or_refused() {
        let cost = [1.0; 6];
        let memory = [4.0, 4.0, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(balanced(&cost, 3).unwrap(), vec![0..2, 2..4, 4..6]);
        let ranges = memory_capped(&cost, &memory, 3, 5.0).unwrap();
        let p = Partition::new(Method::MemoryCapped, ranges.clone(), &cost, &memory);
        assert!(p.stage_memory.iter().all(|&m| m <= 5.0), "{ranges:?}");
        assert_eq!(ranges, vec![0..1, 1..3, 3..6]);
        let err = memory_capped(&cost, &memory, 3, 3.9)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("smallest budget that fits is 4 bytes"),
            "{err}"
        );
    }
}
