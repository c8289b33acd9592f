//! Peer transfer between processes over TCP: one connection per pair of ranks.
//!
//! Sends write a whole frame on the calling thread (blocking, with a write timeout). Each
//! connection has a reader thread that reads frames as they arrive and queues them per peer,
//! and a heartbeat thread tells every peer this process is alive while it computes or waits.
//! A receive waits on one condition for its message and for a failure of *any* peer: a
//! connection closed without a goodbye, an abort (which carries the root cause), a corrupt
//! frame, or silence (not even a heartbeat) for the peer timeout. So every rank stops within
//! the timeout, naming the rank that failed, whichever peer it happened to be waiting for.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::frame::{read_frame, write_frame, Frame, FrameError};
use crate::backend::{Backend, Transport};

/// How long the last words (an abort) may take to write.
const ABORT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a failed send waits for the peer's last words (an abort) to be read.
const LAST_WORDS_WAIT: Duration = Duration::from_secs(1);
/// A receive from a peer that is alive (it sends heartbeats) but never sends the awaited
/// message gives up after this many peer timeouts: a stuck run, not a slow one.
const ALIVE_BUT_SILENT_FACTOR: u32 = 10;

/// What the reader threads have delivered, shared with the receiving side.
struct InboxState {
    queues: Vec<VecDeque<Frame>>,
    /// Peers that said goodbye.
    finished: Vec<bool>,
    /// Peers whose connection has ended (after a goodbye, or not).
    closed: Vec<bool>,
    /// When each peer was last heard from (any bytes).
    last_heard: Vec<Instant>,
    /// Why the run cannot go on: the first peer failure seen, naming the rank to blame.
    failure: Option<String>,
}

struct Inbox {
    state: Mutex<InboxState>,
    changed: Condvar,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        // No thread panics while holding the lock; recover the data if one did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The write side of one peer connection; frames are numbered per connection.
struct Link {
    stream: TcpStream,
    next_seq: u64,
}

impl Link {
    fn write(&mut self, frame: &Frame) -> io::Result<()> {
        write_frame(&mut self.stream, self.next_seq, frame)?;
        self.next_seq += 1;
        Ok(())
    }
}

type Links = Arc<Vec<Option<Mutex<Link>>>>;

fn lock_link(link: &Mutex<Link>) -> MutexGuard<'_, Link> {
    link.lock().unwrap_or_else(|e| e.into_inner())
}

/// One rank's end of a TCP mesh. Implements [`Transport`] for any backend (tensors are staged
/// through host memory), and carries JSON control messages between ranks as well.
pub struct TcpTransport {
    rank: usize,
    links: Links,
    inbox: Arc<Inbox>,
    timeout: Duration,
    /// Cleared to stop the heartbeat thread.
    beating: Arc<AtomicBool>,
    done: bool,
}

/// How often a process tells its peers it is alive: often enough that a peer timeout spans
/// several heartbeats.
fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 5).clamp(Duration::from_millis(10), Duration::from_secs(5))
}

impl TcpTransport {
    /// A transport for `rank` of `world` over `streams`, one connected stream per peer
    /// (`(peer rank, stream)`; a rank may leave out peers it never talks to). A peer silent
    /// for `timeout` (no message, no heartbeat) is declared stopped.
    pub fn new(
        rank: usize,
        world: usize,
        streams: Vec<(usize, TcpStream)>,
        timeout: Duration,
    ) -> Result<Self> {
        let now = Instant::now();
        let inbox = Arc::new(Inbox {
            state: Mutex::new(InboxState {
                queues: vec![VecDeque::new(); world],
                finished: vec![false; world],
                closed: vec![false; world],
                last_heard: vec![now; world],
                failure: None,
            }),
            changed: Condvar::new(),
        });
        let mut links: Vec<Option<Mutex<Link>>> = (0..world).map(|_| None).collect();
        for (peer, stream) in streams {
            if peer >= world || peer == rank || links[peer].is_some() {
                bail!("rank {rank}: unexpected connection for rank {peer} (world of {world})");
            }
            stream.set_nodelay(true)?;
            stream.set_write_timeout(Some(timeout))?;
            stream.set_read_timeout(None)?;
            let reader = stream.try_clone().context("cloning a peer connection")?;
            let inbox = Arc::clone(&inbox);
            thread::Builder::new()
                .name(format!("pipit-recv-{peer}"))
                .spawn(move || read_loop(peer, reader, &inbox))
                .context("starting a receive thread")?;
            links[peer] = Some(Mutex::new(Link {
                stream,
                next_seq: 0,
            }));
        }
        let links: Links = Arc::new(links);
        let beating = Arc::new(AtomicBool::new(true));
        let (l, b) = (Arc::clone(&links), Arc::clone(&beating));
        thread::Builder::new()
            .name("pipit-heartbeat".into())
            .spawn(move || heartbeat_loop(&l, &b, heartbeat_interval(timeout)))
            .context("starting the heartbeat thread")?;
        Ok(Self {
            rank,
            links,
            inbox,
            timeout,
            beating,
            done: false,
        })
    }

    /// This rank's index.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the run.
    pub fn world_size(&self) -> usize {
        self.links.len()
    }

    /// How long a peer may stay silent before it is declared stopped.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A probe other threads may call: the first peer failure the receive threads have seen
    /// (a connection closed without a goodbye, an abort, a corrupt frame), if any.
    pub fn failure_probe(&self) -> super::PeerProbe {
        let inbox = Arc::clone(&self.inbox);
        Arc::new(move || inbox.lock().failure.clone())
    }

    /// Send an f32 tensor to rank `to`.
    pub fn send_f32(&mut self, to: usize, values: &[f32]) -> Result<()> {
        self.send_frame(to, Frame::f32s(values), "a tensor")
    }

    /// Receive the next f32 tensor from rank `from`; `what` names it in errors.
    pub fn recv_f32(&mut self, from: usize, what: &str) -> Result<Vec<f32>> {
        let frame = self.recv_frame(from, what)?;
        let kind = frame.kind_name();
        frame.into_f32s().ok_or_else(|| {
            anyhow!(
                "rank {from} sent {kind} where rank {} expected {what} (f32 tensor): the ranks are out of step",
                self.rank
            )
        })
    }

    /// Send a JSON control message to rank `to`.
    pub fn send_json(&mut self, to: usize, value: &Value) -> Result<()> {
        self.send_frame(to, Frame::Message(serde_json::to_vec(value)?), "a message")
    }

    /// Receive the next JSON control message from rank `from`; `what` names it in errors.
    pub fn recv_json(&mut self, from: usize, what: &str) -> Result<Value> {
        match self.recv_frame(from, what)? {
            Frame::Message(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("rank {from} sent {what} that is not valid JSON")),
            other => Err(anyhow!(
                "rank {from} sent {} where rank {} expected {what}: the ranks are out of step",
                other.kind_name(),
                self.rank
            )),
        }
    }

    /// Send one frame to `to` (to itself: straight into its own queue).
    pub fn send_frame(&mut self, to: usize, frame: Frame, what: &str) -> Result<()> {
        let me = self.rank;
        if to >= self.links.len() {
            bail!(
                "rank {me} cannot send to rank {to}: the run has {} ranks",
                self.links.len()
            );
        }
        {
            let mut state = self.inbox.lock();
            if let Some(f) = &state.failure {
                bail!("{f}; rank {me} stopped before sending {what} to rank {to}");
            }
            if to == me {
                state.queues[me].push_back(frame);
                return Ok(());
            }
            if state.finished[to] {
                bail!("rank {me} cannot send {what} to rank {to}: it has finished its run");
            }
        }
        let link = self.links[to]
            .as_ref()
            .ok_or_else(|| anyhow!("rank {me} has no connection to rank {to}"))?;
        let written = lock_link(link).write(&frame);
        if let Err(e) = written {
            // A peer that failed usually said why just before it closed: let the reader
            // deliver that (or the end of the stream) before blaming the broken pipe.
            let mut state = self.inbox.lock();
            let until = Instant::now() + LAST_WORDS_WAIT;
            while !state.closed[to] && Instant::now() < until {
                state = self.wait(state, until.saturating_duration_since(Instant::now()));
            }
            if let Some(f) = &state.failure {
                bail!("{f}; rank {me} could not send {what} to rank {to}");
            }
            let root = match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                    "rank {to} stopped answering (it read nothing for {})",
                    seconds(self.timeout)
                ),
                _ => format!(
                    "rank {to} stopped without finishing ({e}: the process crashed or was killed)"
                ),
            };
            record(&mut state, root.clone());
            bail!("{root}; rank {me} could not send {what} to it");
        }
        Ok(())
    }

    /// Receive the next frame from `from`; fails as soon as any peer has failed or gone silent.
    pub fn recv_frame(&mut self, from: usize, what: &str) -> Result<Frame> {
        let me = self.rank;
        if from >= self.links.len() {
            bail!(
                "rank {me} cannot receive from rank {from}: the run has {} ranks",
                self.links.len()
            );
        }
        if from != me && self.links[from].is_none() {
            bail!("rank {me} has no connection to rank {from}");
        }
        let cap = self.timeout * ALIVE_BUT_SILENT_FACTOR;
        let deadline = Instant::now() + cap;
        let mut state = self.inbox.lock();
        loop {
            self.check_silence(&mut state);
            if let Some(f) = &state.failure {
                bail!("{f}; rank {me} stopped while waiting for {what} from rank {from}");
            }
            if let Some(frame) = state.queues[from].pop_front() {
                return Ok(frame);
            }
            if from == me {
                bail!("rank {me} waited for {what} from itself, but sent itself nothing");
            }
            if state.finished[from] {
                bail!(
                    "rank {from} has finished its run while rank {me} was waiting for {what} from it"
                );
            }
            let now = Instant::now();
            if now >= deadline {
                let root = format!(
                    "rank {from} is alive but sent rank {me} no {what} for {}: the run is stuck",
                    seconds(cap)
                );
                record(&mut state, root.clone());
                bail!(root);
            }
            state = self.wait(state, deadline - now);
        }
    }

    /// Wait for news from the reader threads, or at most until the next silence check.
    fn wait<'a>(
        &self,
        state: MutexGuard<'a, InboxState>,
        left: Duration,
    ) -> MutexGuard<'a, InboxState> {
        let step = left.min(heartbeat_interval(self.timeout));
        self.inbox
            .changed
            .wait_timeout(state, step)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Record a failure for the first live peer that has been silent for the timeout.
    fn check_silence(&self, state: &mut InboxState) {
        let now = Instant::now();
        let silent = (0..self.links.len()).find(|&p| {
            self.links[p].is_some()
                && !state.finished[p]
                && !state.closed[p]
                && now.duration_since(state.last_heard[p]) > self.timeout
        });
        if let Some(p) = silent {
            let root = format!(
                "rank {p} stopped answering (rank {} heard nothing from it, not even a heartbeat, for {}; raise --peer-timeout if it is only slow)",
                self.rank,
                seconds(self.timeout)
            );
            record(state, root);
        }
    }

    /// End the run cleanly: say goodbye to every peer, then wait until every peer has said
    /// goodbye and closed, so no message is cut off in flight.
    pub fn finish(&mut self) -> Result<()> {
        self.done = true;
        self.beating.store(false, Ordering::SeqCst);
        let me = self.rank;
        for (peer, link) in self.links.iter().enumerate() {
            if let Some(link) = link {
                let mut link = lock_link(link);
                link.write(&Frame::Goodbye)
                    .with_context(|| format!("rank {me} saying goodbye to rank {peer}"))?;
                let _ = link.stream.shutdown(Shutdown::Write);
            }
        }
        let cap = self.timeout * ALIVE_BUT_SILENT_FACTOR;
        let deadline = Instant::now() + cap;
        let mut state = self.inbox.lock();
        loop {
            self.check_silence(&mut state);
            if let Some(f) = &state.failure {
                bail!("{f}; rank {me} stopped while finishing its run");
            }
            let waiting: Vec<usize> = (0..self.links.len())
                .filter(|&p| self.links[p].is_some() && !state.closed[p])
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "rank {me} finished, but ranks {waiting:?} did not within {}",
                    seconds(cap)
                );
            }
            state = self.wait(state, deadline - now);
        }
    }

    /// Stop after a failure: tell every peer why (best effort, briefly) and close. When this
    /// rank stopped because of a peer's failure, the peers are told that one (it names the rank
    /// to blame); otherwise they are told `reason`, as this rank's own failure.
    pub fn abort(&mut self, reason: &str) {
        if self.done {
            return;
        }
        self.done = true;
        self.beating.store(false, Ordering::SeqCst);
        let seen = self.inbox.lock().failure.clone();
        let root = seen.unwrap_or_else(|| format!("rank {} failed: {reason}", self.rank));
        let frame = Frame::Abort(root);
        for link in self.links.iter().flatten() {
            let mut link = lock_link(link);
            let _ = link.stream.set_write_timeout(Some(ABORT_WRITE_TIMEOUT));
            let _ = link.write(&frame);
            let _ = link.stream.shutdown(Shutdown::Write);
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.abort("it stopped before the end of the run");
    }
}

impl<B: Backend> Transport<B> for TcpTransport {
    fn send(&mut self, backend: &B, to: usize, buf: &B::Buffer) -> Result<()> {
        let values = backend.download(buf)?;
        self.send_f32(to, &values)
    }

    fn recv(&mut self, backend: &B, from: usize, len: usize) -> Result<B::Buffer> {
        let values = self.recv_f32(from, "a tensor")?;
        crate::exec::check_len(self.rank, from, len, values.len())?;
        backend.upload(&values)
    }
}

/// Tell every peer this process is alive, until `beating` is cleared. A link busy with a
/// send is skipped: that peer is hearing from this process anyway, or not reading at all.
fn heartbeat_loop(links: &Links, beating: &AtomicBool, interval: Duration) {
    while beating.load(Ordering::SeqCst) {
        thread::sleep(interval);
        for link in links.iter().flatten() {
            if !beating.load(Ordering::SeqCst) {
                return;
            }
            match link.try_lock() {
                Ok(mut link) => drop(link.write(&Frame::Heartbeat)),
                Err(TryLockError::Poisoned(e)) => drop(e.into_inner().write(&Frame::Heartbeat)),
                Err(TryLockError::WouldBlock) => {}
            }
        }
    }
}

/// A peer's stream that notes, on every read, that the peer was heard from: a large frame
/// still arriving counts as life.
struct Heard<'a> {
    peer: usize,
    stream: TcpStream,
    inbox: &'a Inbox,
}

impl Read for Heard<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        if n > 0 {
            self.inbox.lock().last_heard[self.peer] = Instant::now();
        }
        Ok(n)
    }
}

/// Read frames from `peer` until its connection ends, queueing them and recording failures.
fn read_loop(peer: usize, stream: TcpStream, inbox: &Inbox) {
    let mut stream = Heard {
        peer,
        stream,
        inbox,
    };
    let mut expected = 0u64;
    loop {
        let result = read_frame(&mut stream);
        let mut state = inbox.lock();
        let finished = state.finished[peer];
        let (failure, ended) = match result {
            Ok(Some((seq, _))) if seq != expected => (
                Some(format!(
                    "rank {peer} sent a corrupt stream: frame {seq} arrived where frame {expected} was due"
                )),
                true,
            ),
            Ok(Some((_, frame))) => {
                expected += 1;
                match frame {
                    Frame::Heartbeat => (None, false),
                    Frame::Goodbye => {
                        state.finished[peer] = true;
                        (None, false)
                    }
                    // An abort carries the root cause, which names the rank that failed first.
                    Frame::Abort(reason) => (Some(reason), false),
                    other => {
                        state.queues[peer].push_back(other);
                        (None, false)
                    }
                }
            }
            Ok(None) | Err(_) if finished => (None, true),
            Ok(None) => (
                Some(format!(
                    "rank {peer} stopped without finishing (its connection closed: the process crashed or was killed)"
                )),
                true,
            ),
            Err(FrameError::Corrupt(why)) => {
                (Some(format!("rank {peer} sent a corrupt frame: {why}")), true)
            }
            Err(e @ FrameError::Io(_)) => (
                Some(format!(
                    "rank {peer} stopped without finishing ({e}: the process crashed or was killed)"
                )),
                true,
            ),
        };
        if let Some(reason) = failure {
            record(&mut state, reason);
        }
        if ended {
            state.closed[peer] = true;
        }
        drop(state);
        inbox.changed.notify_all();
        if ended {
            return;
        }
    }
}

fn record(state: &mut InboxState, reason: String) {
    if state.failure.is_none() {
        state.failure = Some(reason);
    }
}

/// A duration as people write it: `60 s`, `0.5 s`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::encode;
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// Two connected ends of a loopback connection.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    const T: Duration = Duration::from_secs(20);

    /// Rank 0's transport of a world of two, and a raw socket standing in for rank 1.
    fn with_raw_peer(timeout: Duration) -> (TcpTransport, TcpStream) {
        let (a, b) = pair();
        (TcpTransport::new(0, 2, vec![(1, a)], timeout).unwrap(), b)
    }

    #[test]
    fn tensors_and_messages_arrive_in_order_and_exactly() {
        let (a, b) = pair();
        let mut t0 = TcpTransport::new(0, 2, vec![(1, a)], T).unwrap();
        let mut t1 = TcpTransport::new(1, 2, vec![(0, b)], T).unwrap();
        let values: Vec<f32> = (0..1000).map(|i| (i as f32).sin() * 1e-3).collect();
        for i in 0..5 {
            t0.send_f32(1, &values[i..]).unwrap();
        }
        t0.send_json(1, &serde_json::json!({"step": 3})).unwrap();
        for i in 0..5 {
            let got = t1.recv_f32(0, "a tensor").unwrap();
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                values[i..].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        assert_eq!(t1.recv_json(0, "a message").unwrap()["step"], 3);
        t1.send_f32(1, &[7.0]).unwrap();
        assert_eq!(
            t1.recv_f32(1, "a tensor sent to itself").unwrap(),
            vec![7.0]
        );
        t0.send_f32(1, &[1.0]).unwrap();
        let err = t1.recv_json(0, "the step's loss").unwrap_err().to_string();
        assert!(err.contains("out of step"), "{err}");

        let finisher = std::thread::spawn(move || t0.finish());
        t1.finish().unwrap();
        finisher.join().unwrap().unwrap();
    }

    #[test]
    fn a_corrupt_frame_is_an_error_naming_the_peer() {
        let (mut t, mut raw) = with_raw_peer(T);
        let mut bytes = encode(0, &Frame::f32s(&[1.0, 2.0, 3.0, 4.0]));
        let n = bytes.len();
        bytes[n - 10] ^= 0x40;
        raw.write_all(&bytes).unwrap();
        let err = t.recv_f32(1, "an activation").unwrap_err().to_string();
        assert!(err.contains("rank 1 sent a corrupt frame"), "{err}");
        assert!(err.contains("payload checksum mismatch"), "{err}");
        assert!(
            err.contains("rank 0 stopped while waiting for an activation from rank 1"),
            "{err}"
        );
    }

    #[test]
    fn a_frame_out_of_sequence_is_an_error() {
        let (mut t, mut raw) = with_raw_peer(T);
        raw.write_all(&encode(1, &Frame::f32s(&[1.0]))).unwrap();
        let err = t.recv_f32(1, "a tensor").unwrap_err().to_string();
        assert!(
            err.contains("frame 1 arrived where frame 0 was due"),
            "{err}"
        );
    }

    #[test]
    fn a_torn_frame_then_a_close_is_an_error() {
        let (mut t, mut raw) = with_raw_peer(T);
        let bytes = encode(0, &Frame::f32s(&[1.0; 64]));
        raw.write_all(&bytes[..bytes.len() / 2]).unwrap();
        drop(raw);
        let err = t.recv_f32(1, "a tensor").unwrap_err().to_string();
        assert!(err.contains("rank 1") && err.contains("torn"), "{err}");
    }

    #[test]
    fn a_closed_connection_fails_every_wait_at_once() {
        // Rank 0 waits on rank 2 while rank 1 dies: the wait ends with rank 1 named.
        let (a, b) = pair();
        let (c, _d) = pair();
        let mut t = TcpTransport::new(0, 3, vec![(1, a), (2, c)], T).unwrap();
        drop(b);
        let start = Instant::now();
        let err = t.recv_f32(2, "a gradient").unwrap_err().to_string();
        assert!(
            start.elapsed() < T,
            "the failure ended the wait before its timeout"
        );
        assert!(err.starts_with("rank 1 stopped without finishing"), "{err}");
        assert!(
            err.contains("rank 0 stopped while waiting for a gradient from rank 2"),
            "{err}"
        );
        let err = t.send_f32(2, &[1.0]).unwrap_err().to_string();
        assert!(
            err.starts_with("rank 1 stopped without finishing"),
            "sends stop too: {err}"
        );
    }

    #[test]
    fn the_failure_probe_sees_a_crash_from_another_thread() {
        let (t, raw) = with_raw_peer(T);
        let probe = t.failure_probe();
        assert_eq!(probe(), None, "a live peer is no failure");
        drop(raw);
        let seen = thread::spawn(move || {
            let until = Instant::now() + T;
            while Instant::now() < until {
                if let Some(f) = probe() {
                    return f;
                }
                thread::sleep(Duration::from_millis(5));
            }
            panic!("the crash was not seen within {T:?}");
        })
        .join()
        .unwrap();
        assert!(
            seen.starts_with("rank 1 stopped without finishing"),
            "{seen}"
        );
    }

    #[test]
    fn a_silent_peer_times_out_naming_it() {
        let (mut t, _raw) = with_raw_peer(Duration::from_millis(300));
        let err = t.recv_f32(1, "an activation").unwrap_err().to_string();
        assert!(
            err.starts_with("rank 1 stopped answering (rank 0 heard nothing from it, not even a heartbeat, for 0.3 s"),
            "{err}"
        );
    }

    #[test]
    fn the_silent_rank_is_blamed_not_the_live_one_waited_on() {
        // Rank 0 waits on rank 1, which is alive (heartbeats) while rank 2 has gone quiet.
        let t = Duration::from_millis(500);
        let (a, b) = pair();
        let (c, _silent) = pair();
        let mut t0 = TcpTransport::new(0, 3, vec![(1, a), (2, c)], t).unwrap();
        let _t1 = TcpTransport::new(1, 2, vec![(0, b)], t).unwrap();
        let err = t0.recv_f32(1, "a gradient").unwrap_err().to_string();
        assert!(err.starts_with("rank 2 stopped answering"), "{err}");
        assert!(
            err.contains("rank 0 stopped while waiting for a gradient from rank 1"),
            "{err}"
        );
    }

    #[test]
    fn an_abort_carries_the_reason() {
        let (a, b) = pair();
        let mut t0 = TcpTransport::new(0, 2, vec![(1, a)], T).unwrap();
        let mut t1 = TcpTransport::new(1, 2, vec![(0, b)], T).unwrap();
        t1.abort("rank 1 ran out of device memory");
        let err = t0
            .recv_json(1, "the figures of step 2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rank 1 failed: rank 1 ran out of device memory"),
            "{err}"
        );
    }

    #[test]
    fn a_goodbye_is_not_a_failure_but_ends_receiving() {
        let (a, b) = pair();
        let mut t0 = TcpTransport::new(0, 2, vec![(1, a)], T).unwrap();
        let t1 = std::thread::spawn(move || {
            let mut t1 = TcpTransport::new(1, 2, vec![(0, b)], T).unwrap();
            t1.send_f32(0, &[5.0]).unwrap();
            t1.finish()
        });
        assert_eq!(
            t0.recv_f32(1, "a tensor").unwrap(),
            vec![5.0],
            "sent before the goodbye"
        );
        let err = t0.recv_f32(1, "a tensor").unwrap_err().to_string();
        assert!(err.contains("rank 1 has finished its run"), "{err}");
        t0.finish().unwrap();
        t1.join().unwrap().unwrap();
    }
}
