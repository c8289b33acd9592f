//! A thread that watches the transfers a rank has issued and stops the run when one of them
//! makes no progress: NCCL waits on the GPU, where no host timeout reaches, so a peer that died
//! or hangs would otherwise keep this rank waiting forever.
//!
//! Transfers complete in the order they were issued (one stream), so only the oldest one is
//! timed: from when it became the oldest. When it has not completed within the timeout, when
//! a check reports a failure elsewhere (a peer gone over TCP, an NCCL error), or when a
//! transfer itself fails, the watchdog records one line saying which peer and what this rank
//! was waiting for, calls `on_failure` once (which aborts the communicator) and stops.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Something in flight whose completion can be asked without waiting.
pub(crate) trait Completion: Send + 'static {
    /// `Ok(true)` once done, `Ok(false)` while in flight, `Err` (one line) when it failed.
    fn poll(&self) -> std::result::Result<bool, String>;
}

/// A check run on every round: a failure seen elsewhere, if any.
pub(crate) type Check = Box<dyn Fn() -> Option<String> + Send>;

/// Called once with the failure line.
pub(crate) type OnFailure = Box<dyn FnOnce(&str) + Send>;

struct Entry<P> {
    item: P,
    peer: usize,
    what: String,
}

struct State<P> {
    queue: VecDeque<Entry<P>>,
    /// When the oldest entry became the oldest.
    head_since: Instant,
    failure: Option<String>,
    stop: bool,
}

struct Shared<P> {
    state: Mutex<State<P>>,
    changed: Condvar,
}

impl<P> Shared<P> {
    fn lock(&self) -> MutexGuard<'_, State<P>> {
        // No code panics while holding the lock; recover the data if it ever did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Watches one rank's transfers; see the module documentation.
pub(crate) struct Watchdog<P: Completion> {
    shared: Arc<Shared<P>>,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

/// How often the watchdog looks: often enough that a timeout is noticed within a twentieth
/// of itself, never more than every millisecond.
fn poll_interval(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(1), Duration::from_millis(100))
}

/// A duration as people write it: `60 s`, `0.5 s`.
pub(crate) fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

impl<P: Completion> Watchdog<P> {
    /// Start watching for `rank`: a transfer may take `timeout` from when it is the oldest.
    pub(crate) fn start(
        rank: usize,
        timeout: Duration,
        check: Check,
        on_failure: OnFailure,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                head_since: Instant::now(),
                failure: None,
                stop: false,
            }),
            changed: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("pipit-nccl-watchdog".into())
            .spawn(move || watch(rank, timeout, &s, &check, on_failure))
            .context("starting the transfer watchdog")?;
        Ok(Self {
            shared,
            thread: Some(thread),
            timeout,
        })
    }

    /// The recorded failure as an error, if there is one.
    pub(crate) fn check(&self) -> Result<()> {
        match &self.shared.lock().failure {
            Some(f) => Err(anyhow!("{f}")),
            None => Ok(()),
        }
    }

    /// Watch `item`, a transfer with `peer` described by `what` ("receiving 12 values from
    /// rank 1").
    pub(crate) fn track(&self, item: P, peer: usize, what: String) {
        let mut state = self.shared.lock();
        if state.queue.is_empty() {
            state.head_since = Instant::now();
        }
        state.queue.push_back(Entry { item, peer, what });
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Record `why` as the failure (unless one is already recorded) and stop watching.
    pub(crate) fn fail(&self, why: String) {
        let mut state = self.shared.lock();
        state.failure.get_or_insert(why);
        state.stop = true;
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Wait until every tracked transfer has completed, or fail with the recorded failure.
    /// The watchdog itself bounds the wait; the extra bound here only guards against a
    /// watchdog that is gone.
    pub(crate) fn flush(&self) -> Result<()> {
        let bound = self.timeout * 2 + Duration::from_secs(10);
        let deadline = Instant::now() + bound;
        let mut state = self.shared.lock();
        loop {
            if let Some(f) = &state.failure {
                bail!("{f}");
            }
            if state.queue.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let e = &state.queue[0];
                bail!(
                    "{} (rank {}) did not complete within {}",
                    e.what,
                    e.peer,
                    seconds(bound)
                );
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Number of transfers not yet seen complete.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.shared.lock().queue.len()
    }
}

impl<P: Completion> Drop for Watchdog<P> {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The watchdog's loop: retire completed transfers, time the oldest, run `check`.
fn watch<P: Completion>(
    rank: usize,
    timeout: Duration,
    shared: &Shared<P>,
    check: &Check,
    on_failure: OnFailure,
) {
    let interval = poll_interval(timeout);
    let mut state = shared.lock();
    let failure = loop {
        if state.stop {
            return;
        }
        let mut failure = None;
        let mut retired = false;
        while let Some(front) = state.queue.front() {
            match front.item.poll() {
                Ok(true) => {
                    state.queue.pop_front();
                    state.head_since = Instant::now();
                    retired = true;
                }
                Ok(false) => break,
                Err(e) => {
                    failure = Some(format!("rank {rank}: {e} while {}", front.what));
                    break;
                }
            }
        }
        if retired {
            shared.changed.notify_all();
        }
        if failure.is_none() {
            if let Some(front) = state.queue.front() {
                let waited = state.head_since.elapsed();
                if waited > timeout {
                    failure = Some(format!(
                        "rank {} did not take part in a transfer for {} (it stopped or hangs; raise --peer-timeout if it is only slow): rank {rank} was {}",
                        front.peer,
                        seconds(timeout),
                        front.what
                    ));
                }
            }
        }
        if failure.is_none() {
            // The check may take locks of its own: run it without holding the state.
            drop(state);
            failure = check();
            state = shared.lock();
        }
        if let Some(f) = failure {
            state.failure.get_or_insert(f);
            break state.failure.clone().unwrap_or_default();
        }
        state = shared
            .changed
            .wait_timeout(state, interval)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    };
    drop(state);
    on_failure(&failure);
    // What was in flight was abandoned with the communicator: free it now.
    let abandoned = std::mem::take(&mut shared.lock().queue);
    drop(abandoned);
    shared.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A transfer the test completes or fails by hand.
    #[derive(Clone, Default)]
    struct Fake {
        done: Arc<AtomicBool>,
        broken: Arc<AtomicBool>,
    }

    impl Completion for Fake {
        fn poll(&self) -> std::result::Result<bool, String> {
            if self.broken.load(Ordering::SeqCst) {
                return Err("the transfer failed".into());
            }
            Ok(self.done.load(Ordering::SeqCst))
        }
    }

    fn counting() -> (Arc<AtomicUsize>, OnFailure) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        (
            calls,
            Box::new(move |_| {
                c.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    const LONG: Duration = Duration::from_secs(30);

    #[test]
    fn completed_transfers_are_retired_and_flush_returns() {
        let (aborts, on_failure) = counting();
        let w = Watchdog::start(0, LONG, Box::new(|| None), on_failure).unwrap();
        let (a, b) = (Fake::default(), Fake::default());
        w.track(a.clone(), 1, "sending 4 values to rank 1".into());
        w.track(b.clone(), 2, "receiving 4 values from rank 2".into());
        assert_eq!(w.in_flight(), 2);
        b.done.store(true, Ordering::SeqCst);
        a.done.store(true, Ordering::SeqCst);
        w.flush().unwrap();
        assert_eq!(w.in_flight(), 0);
        w.check().unwrap();
        drop(w);
        assert_eq!(aborts.load(Ordering::SeqCst), 0, "nothing was aborted");
    }

    #[test]
    fn a_transfer_without_progress_aborts_once_naming_the_peer() {
        let (aborts, on_failure) = counting();
        let t = Duration::from_millis(200);
        let w = Watchdog::start(3, t, Box::new(|| None), on_failure).unwrap();
        let done = Fake::default();
        done.done.store(true, Ordering::SeqCst);
        w.track(done, 2, "sending 8 values to rank 2".into());
        w.track(Fake::default(), 1, "receiving 8 values from rank 1".into());
        let err = w.flush().unwrap_err().to_string();
        assert_eq!(
            err,
            "rank 1 did not take part in a transfer for 0.2 s (it stopped or hangs; raise --peer-timeout if it is only slow): rank 3 was receiving 8 values from rank 1"
        );
        assert_eq!(w.check().unwrap_err().to_string(), err, "the failure stays");
        drop(w);
        assert_eq!(aborts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failure_seen_elsewhere_aborts_at_once() {
        let (aborts, on_failure) = counting();
        let peer_gone = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&peer_gone);
        let check: Check = Box::new(move || {
            flag.load(Ordering::SeqCst)
                .then(|| "rank 2 stopped without finishing".to_string())
        });
        let w = Watchdog::start(0, LONG, check, on_failure).unwrap();
        w.track(Fake::default(), 2, "receiving 1 values from rank 2".into());
        peer_gone.store(true, Ordering::SeqCst);
        let err = w.flush().unwrap_err().to_string();
        assert_eq!(err, "rank 2 stopped without finishing");
        drop(w);
        assert_eq!(aborts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failed_transfer_is_reported_with_what_it_was() {
        let (aborts, on_failure) = counting();
        let w = Watchdog::start(1, LONG, Box::new(|| None), on_failure).unwrap();
        let f = Fake::default();
        w.track(f.clone(), 0, "receiving 5 values from rank 0".into());
        f.broken.store(true, Ordering::SeqCst);
        let err = w.flush().unwrap_err().to_string();
        assert_eq!(
            err,
            "rank 1: the transfer failed while receiving 5 values from rank 0"
        );
        drop(w);
        assert_eq!(aborts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failure_recorded_by_the_host_stops_the_watch() {
        let (aborts, on_failure) = counting();
        let w = Watchdog::<Fake>::start(0, LONG, Box::new(|| None), on_failure).unwrap();
        w.fail("ncclSend failed".into());
        w.fail("a later failure".into());
        assert_eq!(w.check().unwrap_err().to_string(), "ncclSend failed");
        drop(w);
        assert_eq!(
            aborts.load(Ordering::SeqCst),
            0,
            "the host aborts by itself when it records a failure"
        );
    }
}
