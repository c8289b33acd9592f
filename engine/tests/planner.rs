//! Planner properties over many (p, m, v): every generated schedule lowers and validates, the
//! simulator reproduces the closed forms, and corrupted schedules are rejected precisely.

use pipit_engine::analysis::{efficiency, interleaved_efficiency};
use pipit_engine::schedule::{generate, lower, validate, Action, Schedule, ScheduleKind};
use pipit_engine::sim::{simulate, Costs};
use proptest::prelude::*;

fn sizes() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..=16, 1usize..=64, 1usize..=4)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every generator's output (where it accepts p, m, v) validates before and after lowering,
    /// and lowering with free transfers keeps the compute schedule's makespan.
    #[test]
    fn every_schedule_lowers_and_validates((p, m, v) in sizes()) {
        for kind in ScheduleKind::ALL {
            let Ok(schedule) = generate(kind, p, m, v) else {
                prop_assert!(
                    (kind == ScheduleKind::OneFOneB && v > 1)
                        || (kind == ScheduleKind::ZeroBubbleV && v != 2)
                        || (kind == ScheduleKind::DualPipeV && (v != 2 || m < 2 * p))
                );
                continue;
            };
            validate(&schedule).unwrap();
            let lowered = lower(&schedule).unwrap();
            validate(&lowered).unwrap();
            let costs = Costs::uniform(p * v);
            let compute = simulate(&schedule, &costs).unwrap().makespan;
            prop_assert_eq!(simulate(&lowered, &costs).unwrap().makespan, compute);
        }
    }

    /// GPipe and 1F1B: efficiency exactly m / (m + p - 1); peak in-flight activations m on
    /// every GPipe rank and min(p - s, m) on 1F1B stage s.
    #[test]
    fn closed_forms_are_exact((p, m, _v) in sizes()) {
        for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
            let lowered = lower(&generate(kind, p, m, 1).unwrap()).unwrap();
            let sim = simulate(&lowered, &Costs::uniform(p)).unwrap();
            prop_assert!((sim.efficiency - efficiency(p, m)).abs() < 1e-12);
            prop_assert_eq!(sim.makespan, 3.0 * (m + p - 1) as f64);
            for (s, rank) in sim.ranks.iter().enumerate() {
                let expected = if kind == ScheduleKind::GPipe { m } else { (p - s).min(m) };
                prop_assert_eq!(rank.peak_activations, expected);
            }
        }
    }

    /// Zero bubble: never slower than the order it splits (1F1B for `v = 1`, interleaved
    /// otherwise) and never holding more micro-batches at its peak than that order's first
    /// rank; with `p` dividing `m`, one step takes exactly `3 m v + p - 1`, the least possible
    /// (for `v = 1` and `m >= p` too); for `v = 1` every rank holds at most `min(p, m)`.
    #[test]
    fn zero_bubble_cuts_the_bubble_to_a_third((p, m, v) in sizes()) {
        let lowered = lower(&generate(ScheduleKind::ZeroBubble, p, m, v).unwrap()).unwrap();
        let sim = simulate(&lowered, &Costs::uniform(p * v)).unwrap();
        let base = lower(&generate(ScheduleKind::Interleaved, p, m, v).unwrap()).unwrap();
        let base = simulate(&base, &Costs::uniform(p * v)).unwrap();
        prop_assert!(sim.makespan <= base.makespan + 1e-9);
        let most = |s: &pipit_engine::sim::Simulation| {
            s.ranks.iter().map(|r| r.peak_activations).max().unwrap()
        };
        prop_assert!(most(&sim) <= most(&base));
        if m % p == 0 || (v == 1 && m >= p) {
            prop_assert_eq!(sim.makespan, (3 * m * v + p - 1) as f64);
            prop_assert!((sim.efficiency - interleaved_efficiency(p, m, 3 * v)).abs() < 1e-12);
        }
        if v == 1 {
            prop_assert!(sim.ranks.iter().all(|r| r.peak_activations <= p.min(m)));
        }
    }

    /// Zero bubble on a V, in units of one chunk's F, I or W: `6m` of work per rank, and the
    /// last rank cannot start before `p - 1`; the greedy order reaches that bound for every
    /// `m >= 2p`. It never takes longer than zb-h1 over the same layers in `p` whole stages,
    /// nor than zb-h1's looped placement of the same chunks; no rank holds more than
    /// `2 min(p, m)` chunk activations (1F1B's first rank holds `min(p, m)` whole ones); stages `r` and `2p - 1 - r` share
    /// rank `r`.
    #[test]
    fn zero_bubble_v_reaches_the_bound((p, m, _v) in sizes()) {
        let schedule = generate(ScheduleKind::ZeroBubbleV, p, m, 2).unwrap();
        for r in 0..p {
            prop_assert_eq!(schedule.stages_of(r), vec![r, 2 * p - 1 - r]);
        }
        let sim = simulate(&lower(&schedule).unwrap(), &Costs::uniform(2 * p)).unwrap();
        let bound = (6 * m + p - 1) as f64;
        prop_assert!(sim.makespan >= bound);
        if m >= 2 * p {
            prop_assert_eq!(sim.makespan, bound);
        }
        let whole = generate(ScheduleKind::ZeroBubble, p, m, 1).unwrap();
        let doubled = Costs { fwd: vec![2.0; p], bwd: vec![4.0; p], ..Costs::uniform(p) };
        let whole = simulate(&lower(&whole).unwrap(), &doubled).unwrap();
        prop_assert!(sim.makespan <= whole.makespan + 1e-9);
        let looped = generate(ScheduleKind::ZeroBubble, p, m, 2).unwrap();
        let looped = simulate(&lower(&looped).unwrap(), &Costs::uniform(2 * p)).unwrap();
        prop_assert!(sim.makespan <= looped.makespan + 1e-9);
        prop_assert!(sim.ranks.iter().all(|r| r.peak_activations <= 2 * p.min(m)));
    }

    /// Interleaved: with ideal time 3 v m per rank, the bubble is exactly (p - 1) / (v m) of
    /// it when p divides m; otherwise at most (p - 1) / (v m) + (m' - m) / m, with m' = m
    /// rounded up to a multiple of p, and never more than 1F1B's (p - 1) / m.
    #[test]
    fn interleaved_bubble_bound((p, m, v) in sizes()) {
        let lowered = lower(&generate(ScheduleKind::Interleaved, p, m, v).unwrap()).unwrap();
        let sim = simulate(&lowered, &Costs::uniform(p * v)).unwrap();
        let ideal = 3.0 * (v * m) as f64;
        let bubble = (sim.makespan - ideal) / ideal;
        let megatron = (p - 1) as f64 / (v * m) as f64;
        let padded = m.div_ceil(p) * p;
        if m % p == 0 {
            prop_assert!((bubble - megatron).abs() < 1e-12, "{} vs {}", bubble, megatron);
        }
        prop_assert!(bubble <= megatron + (padded - m) as f64 / m as f64 + 1e-12);
        prop_assert!(bubble <= (p - 1) as f64 / m as f64 + 1e-12);
    }
}

fn lowered_1f1b() -> Schedule {
    lower(&generate(ScheduleKind::OneFOneB, 2, 2, 1).unwrap()).unwrap()
}

fn rejected(schedule: &Schedule) -> String {
    let err = validate(schedule).unwrap_err();
    assert!(pipit_engine::is_invalid_input(&err));
    err.to_string()
}

#[test]
fn missing_backward_is_named() {
    let mut s = lowered_1f1b();
    let at = s.ranks[1]
        .iter()
        .position(|a| {
            *a == Action::Backward {
                stage: 1,
                microbatch: 1,
            }
        })
        .unwrap();
    s.ranks[1].remove(at);
    let msg = rejected(&s);
    // Its gradient send now runs before anything produced it.
    assert!(msg.contains("rank 1") && msg.contains("S1B1"), "{msg}");
    s.ranks[1].retain(|a| {
        *a != Action::SendGradient {
            stage: 1,
            microbatch: 1,
        }
    });
    s.ranks[0].retain(|a| {
        *a != Action::RecvGradient {
            stage: 1,
            microbatch: 1,
        }
    });
    assert!(rejected(&s).contains("rank 1 is missing S1B1"));
}

#[test]
fn reversed_dependency_is_named() {
    let mut s = generate(ScheduleKind::GPipe, 2, 2, 1).unwrap();
    s.ranks[0].swap(0, 2); // S0B0 before S0F0
    let msg = rejected(&s);
    assert!(
        msg.contains("rank 0, position 0 (S0B0): runs before S0F0 at position 2"),
        "{msg}"
    );
    // Across ranks the dry run finds it: rank 1 runs S1B0 first, but it needs S1F0's input.
    let mut s = generate(ScheduleKind::OneFOneB, 2, 2, 1).unwrap();
    s.ranks[0] = "S0F0 S0F1 S0B1 S0B0"
        .split(' ')
        .map(|t| t.parse().unwrap())
        .collect();
    s.ranks[1] = "S1F1 S1B1 S1F0 S1B0"
        .split(' ')
        .map(|t| t.parse().unwrap())
        .collect();
    validate(&s).unwrap();
    let mut s = lower(&s).unwrap();
    s.ranks[1].reverse();
    assert!(rejected(&s).contains("rank 1, position"));
}

#[test]
fn unpaired_send_is_named() {
    let mut s = lowered_1f1b();
    s.ranks[1].retain(|a| {
        *a != Action::RecvActivation {
            stage: 0,
            microbatch: 1,
        }
    });
    let msg = rejected(&s);
    assert!(
        msg.contains("rank 0, position 3 (S0F1>): unpaired send, rank 1 never receives it"),
        "{msg}"
    );
}

#[test]
fn misordered_pairs_and_deadlocks_are_named() {
    let mut s = lowered_1f1b();
    // Rank 1 receives micro-batch 1 before micro-batch 0: pairing order broken.
    let a = s.ranks[1]
        .iter()
        .position(|a| {
            *a == Action::RecvActivation {
                stage: 0,
                microbatch: 0,
            }
        })
        .unwrap();
    let b = s.ranks[1]
        .iter()
        .position(|a| {
            *a == Action::RecvActivation {
                stage: 0,
                microbatch: 1,
            }
        })
        .unwrap();
    s.ranks[1].swap(a, b);
    let msg = rejected(&s);
    assert!(
        msg.contains("must pair in the same order") || msg.contains("runs before"),
        "{msg}"
    );

    // Both ranks send first, then receive: the classic blocking-send deadlock.
    let text = "microbatches: 1\nplacement: 0 1\nrank 0: S0F0 S0F0> >S1B0 S0B0\nrank 1: >S0F0 S1F0 S1B0 S1B0>\n";
    let mut s: Schedule = text.parse().unwrap();
    validate(&s).unwrap();
    s.microbatches = 2;
    s.ranks[0] = "S0F0 S0F1 S0F0> S0F1> >S1B0 S0B0 >S1B1 S0B1"
        .split(' ')
        .map(|t| t.parse().unwrap())
        .collect();
    s.ranks[1] = ">S0F0 S1F0 S1B0 S1B0> >S0F1 S1F1 S1B1 S1B1>"
        .split(' ')
        .map(|t| t.parse().unwrap())
        .collect();
    let msg = rejected(&s);
    assert!(
        msg.contains("deadlocks") && msg.contains("rank 0, position 3 (S0F1>)"),
        "{msg}"
    );
}
