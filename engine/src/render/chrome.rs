//! Chrome trace event JSON (opens in Perfetto and chrome://tracing).
//!
//! The writer takes a generic timeline, so a measured run and a simulated one produce the same
//! kind of file: one complete event (`"ph": "X"`) per action on the thread of its rank, and
//! one flow arrow (`"ph": "s"` then `"f"`) per transfer, from the send to the receive.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::schedule::Action;
use crate::sim::{Simulation, Timed};

/// One slice of a timeline: an action on a rank. Times in microseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceEvent {
    /// Rank, shown as one thread.
    pub rank: usize,
    /// Slice label, e.g. `S0F3`.
    pub name: String,
    /// Category, e.g. `forward`, `backward`, `send`, `recv`.
    pub category: String,
    /// Start (µs).
    pub start: f64,
    /// End (µs).
    pub end: f64,
}

/// One arrow from a point on one rank to a point on another (a transfer). Times in µs.
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    /// Unique id of the arrow.
    pub id: u64,
    /// Label, e.g. `S0F3`.
    pub name: String,
    /// Sending rank.
    pub from_rank: usize,
    /// When the data leaves (µs).
    pub from: f64,
    /// Receiving rank.
    pub to_rank: usize,
    /// When the data arrives (µs).
    pub to: f64,
}

/// The category pipit uses for an action.
pub fn category(action: Action) -> &'static str {
    match action {
        Action::Forward { .. } => "forward",
        Action::Backward { .. } => "backward",
        Action::BackwardInput { .. } => "backward-input",
        Action::BackwardWeight { .. } => "backward-weight",
        Action::SendActivation { .. } | Action::SendGradient { .. } => "send",
        Action::RecvActivation { .. } | Action::RecvGradient { .. } => "recv",
    }
}

/// The timeline a Chrome trace of pipit's (a measured `--trace`, or `pipit plan --format
/// chrome`) holds: each rank's actions in time order, in milliseconds.
pub fn read_timeline(text: &str) -> anyhow::Result<Vec<Vec<Timed>>> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| crate::invalid_input!("not a Chrome trace (JSON): {e}"))?;
    let events = value["traceEvents"]
        .as_array()
        .ok_or_else(|| crate::invalid_input!("not a Chrome trace: no traceEvents list"))?;
    let mut ranks: Vec<Vec<Timed>> = Vec::new();
    for e in events.iter().filter(|e| e["ph"] == "X") {
        let (Some(rank), Some(name), Some(ts), Some(dur)) = (
            e["tid"].as_u64(),
            e["name"].as_str(),
            e["ts"].as_f64(),
            e["dur"].as_f64(),
        ) else {
            return Err(crate::invalid_input!(
                "a trace event lacks tid, name, ts or dur: {e}"
            ));
        };
        let action: Action = name.parse()?;
        let rank = rank as usize;
        if ranks.len() <= rank {
            ranks.resize_with(rank + 1, Vec::new);
        }
        ranks[rank].push(Timed {
            action,
            start: ts / 1000.0,
            end: (ts + dur) / 1000.0,
        });
    }
    if ranks.is_empty() {
        return Err(crate::invalid_input!("the trace holds no actions"));
    }
    for actions in &mut ranks {
        actions.sort_by(|a, b| a.start.total_cmp(&b.start));
    }
    Ok(ranks)
}

/// Write `events` and `flows` as a Chrome trace event file.
pub fn write(events: &[TraceEvent], flows: &[Flow]) -> String {
    let mut out: Vec<Value> = Vec::with_capacity(events.len() + 2 * flows.len() + 8);
    out.push(json!({"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "pipit"}}));
    let mut ranks: Vec<usize> = events.iter().map(|e| e.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    for rank in ranks {
        out.push(json!({"ph": "M", "pid": 0, "tid": rank, "name": "thread_name", "args": {"name": format!("rank {rank}")}}));
        out.push(json!({"ph": "M", "pid": 0, "tid": rank, "name": "thread_sort_index", "args": {"sort_index": rank}}));
    }
    for e in events {
        out.push(json!({
            "ph": "X", "pid": 0, "tid": e.rank, "name": e.name, "cat": e.category,
            "ts": e.start, "dur": (e.end - e.start).max(0.0),
        }));
    }
    for f in flows {
        out.push(json!({"ph": "s", "pid": 0, "tid": f.from_rank, "id": f.id, "name": f.name, "cat": "transfer", "ts": f.from}));
        out.push(json!({"ph": "f", "bp": "e", "pid": 0, "tid": f.to_rank, "id": f.id, "name": f.name, "cat": "transfer", "ts": f.to}));
    }
    json!({"traceEvents": out, "displayTimeUnit": "ms"}).to_string()
}

/// The events and arrows of a simulated step (its milliseconds become microseconds).
pub fn from_simulation(sim: &Simulation) -> (Vec<TraceEvent>, Vec<Flow>) {
    from_timeline(&sim.timeline)
}

/// The events and arrows of per-rank timelines in milliseconds, simulated or measured by the
/// executor (element `r` is rank `r`'s actions).
pub fn from_timeline(timeline: &[Vec<Timed>]) -> (Vec<TraceEvent>, Vec<Flow>) {
    const US: f64 = 1000.0;
    let mut events = Vec::new();
    // Transfer identity (is activation, stage, micro-batch) -> (rank, send start).
    let mut sends: HashMap<(bool, usize, usize), (usize, f64)> = HashMap::new();
    let mut recvs = Vec::new();
    for (rank, actions) in timeline.iter().enumerate() {
        for t in actions {
            events.push(TraceEvent {
                rank,
                name: t.action.to_string(),
                category: category(t.action).to_string(),
                start: t.start * US,
                end: t.end * US,
            });
            let key = (t.action.stage(), t.action.microbatch());
            match t.action {
                Action::SendActivation { .. } => {
                    sends.insert((true, key.0, key.1), (rank, t.start));
                }
                Action::SendGradient { .. } => {
                    sends.insert((false, key.0, key.1), (rank, t.start));
                }
                Action::RecvActivation { .. } => recvs.push(((true, key.0, key.1), rank, t.end)),
                Action::RecvGradient { .. } => recvs.push(((false, key.0, key.1), rank, t.end)),
                _ => {}
            }
        }
    }
    let flows = recvs
        .into_iter()
        .filter_map(|(key, to_rank, to)| {
            let &(from_rank, from) = sends.get(&key)?;
            let kind = if key.0 { 'F' } else { 'B' };
            Some((
                key,
                from_rank,
                from,
                to_rank,
                to,
                format!("S{}{kind}{}", key.1, key.2),
            ))
        })
        .enumerate()
        .map(|(id, (_, from_rank, from, to_rank, to, name))| Flow {
            id: id as u64,
            name,
            from_rank,
            from: from * US,
            to_rank,
            to: to * US,
        })
        .collect();
    (events, flows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{lower, one_f_one_b};
    use crate::sim::{simulate, Costs};

    /// A simulated step written as a trace and read back gives its costs again: the planner
    /// can take what a run measured.
    #[test]
    fn a_trace_read_back_gives_the_costs_it_was_made_with() {
        let schedule = lower(&crate::schedule::zero_bubble(3, 6, 1).unwrap()).unwrap();
        let costs = Costs {
            fwd: vec![1.0, 1.5, 0.75],
            bwd: vec![2.0, 3.0, 2.5],
            weight_share: vec![0.25, 0.5, 0.4],
            ..Costs::uniform(3)
        };
        let sim = simulate(&schedule, &costs).unwrap();
        let (events, flows) = from_simulation(&sim);
        let timeline = read_timeline(&write(&events, &flows)).unwrap();
        assert_eq!(timeline.len(), 3);
        let got = Costs::measured(timeline.iter().flatten(), 3, 0.5).unwrap();
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9);
        assert!(close(&got.fwd, &costs.fwd), "{:?}", got.fwd);
        assert!(close(&got.bwd, &costs.bwd), "{:?}", got.bwd);
        assert!(close(&got.weight_share, &costs.weight_share));
        // (The simulator posts a send in no time, so the latency is not read back here.)
        // A pipeline of another size is refused, naming the stage.
        let err = Costs::measured(timeline.iter().flatten(), 2, 0.5).unwrap_err();
        assert!(err.to_string().contains("stage 2"), "{err}");
        assert!(read_timeline("{}").is_err());
    }

    #[test]
    fn trace_has_slices_and_arrows() {
        let schedule = lower(&one_f_one_b(2, 2, 1).unwrap()).unwrap();
        let sim = simulate(&schedule, &Costs::uniform(2)).unwrap();
        let (events, flows) = from_simulation(&sim);
        assert_eq!(events.len(), 8 + 8);
        assert_eq!(flows.len(), 4);
        let text = write(&events, &flows);
        let value: Value = serde_json::from_str(&text).unwrap();
        let all = value["traceEvents"].as_array().unwrap();
        let count = |ph: &str| all.iter().filter(|e| e["ph"] == ph).count();
        assert_eq!((count("X"), count("s"), count("f")), (16, 4, 4));
        let first = all.iter().find(|e| e["name"] == "S0F1").unwrap();
        assert_eq!(
            (first["ts"].as_f64(), first["dur"].as_f64()),
            (Some(1000.0), Some(1000.0))
        );
        assert!(flows
            .iter()
            .all(|f| f.to >= f.from && f.from_rank != f.to_rank));
    }
}
