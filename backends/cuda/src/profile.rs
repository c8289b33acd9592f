//! GPU time per op, on request (`PIPIT_CUDA_PROFILE=1`): a pair of CUDA events around every op
//! a backend enqueues, summed by op whenever the backend waits for its stream, and printed as
//! one table when the backend is dropped.
//!
//! The events time the stream, so an op's figure includes any time the GPU sat waiting for
//! the host to enqueue its kernels: ops whose total is far above their arithmetic are limited
//! by launches, not by the GPU. With the variable unset nothing is recorded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream, DriverError};

/// Events of ops not yet summed, and the sums so far.
pub(crate) struct Profile {
    label: String,
    pending: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>,
    /// Calls and milliseconds per op.
    totals: Mutex<BTreeMap<&'static str, (u64, f64)>>,
}

/// One op being enqueued: its end event is recorded when the span is dropped.
pub(crate) struct Span<'a> {
    profile: &'a Profile,
    stream: &'a Arc<CudaStream>,
    name: &'static str,
    start: Option<CudaEvent>,
}

/// An event recorded on `stream` now, made so that it can time (cudarc's default cannot).
pub(crate) fn timing_event(stream: &CudaStream) -> Result<CudaEvent, DriverError> {
    stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
}

impl Profile {
    /// A profile when `PIPIT_CUDA_PROFILE` asks for one (`1`), none when it is unset or `0`.
    pub(crate) fn from_env(label: &str) -> Result<Option<Self>> {
        match std::env::var("PIPIT_CUDA_PROFILE").as_deref() {
            Err(_) | Ok("0") => Ok(None),
            Ok("1") => Ok(Some(Self {
                label: label.to_string(),
                pending: Mutex::default(),
                totals: Mutex::default(),
            })),
            Ok(other) => bail!("PIPIT_CUDA_PROFILE must be 0 or 1, got {other:?}"),
        }
    }

    /// Start timing op `name` on `stream`.
    pub(crate) fn span<'a>(&'a self, stream: &'a Arc<CudaStream>, name: &'static str) -> Span<'a> {
        Span {
            profile: self,
            stream,
            name,
            start: timing_event(stream).ok(),
        }
    }

    /// Add the finished ops to the sums. Called after the stream was synchronized, so every
    /// event has completed and reading them does not wait.
    pub(crate) fn collect(&self, ctx: &Arc<CudaContext>) -> Result<()> {
        ctx.bind_to_thread()
            .context("making the CUDA context current")?;
        let pending = std::mem::take(&mut *lock(&self.pending));
        let mut totals = lock(&self.totals);
        for (name, start, end) in pending {
            let ms = start
                .elapsed_ms(&end)
                .with_context(|| format!("reading the profile events of {name}"))?;
            let entry = totals.entry(name).or_default();
            entry.0 += 1;
            entry.1 += ms as f64;
        }
        Ok(())
    }

    /// The sums as a table, largest first.
    pub(crate) fn table(&self) -> String {
        let totals = lock(&self.totals);
        let mut rows: Vec<_> = totals.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let all: f64 = rows.iter().map(|(_, (_, ms))| ms).sum();
        let mut out = format!(
            "cuda profile ({}): stream time by op\n{:<22} {:>8} {:>12} {:>7}\n",
            self.label, "op", "calls", "total ms", "share"
        );
        for (name, (calls, ms)) in rows {
            let share = 100.0 * ms / all.max(f64::MIN_POSITIVE);
            let _ = writeln!(out, "{name:<22} {calls:>8} {ms:>12.2} {share:>6.1}%");
        }
        let _ = write!(out, "{:<22} {:>8} {all:>12.2}", "total", "");
        out
    }
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if let (Some(start), Ok(end)) = (self.start.take(), timing_event(self.stream)) {
            lock(&self.profile.pending).push((self.name, start, end));
        }
    }
}

/// The lock's contents, also after a panic elsewhere (the sums stay usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_ops_by_time_with_their_shares_and_the_total() {
        let profile = Profile {
            label: "test".into(),
            pending: Mutex::default(),
            totals: Mutex::new(BTreeMap::from([
                ("adamw", (2, 1.0)),
                ("matmul", (10, 6.0)),
                ("layernorm_forward", (4, 3.0)),
            ])),
        };
        let table = profile.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "cuda profile (test): stream time by op");
        let ops: Vec<&str> = lines[2..5]
            .iter()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(ops, ["matmul", "layernorm_forward", "adamw"]);
        assert!(lines[2].ends_with("60.0%"), "{}", lines[2]);
        assert!(
            lines[4].contains(" 2 ") && lines[4].ends_with("10.0%"),
            "{}",
            lines[4]
        );
        assert!(
            lines[5].starts_with("total") && lines[5].ends_with("10.00"),
            "{}",
            lines[5]
        );
    }
}
