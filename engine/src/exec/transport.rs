//! In-process peer transfer: one channel per ordered pair of ranks. A tensor goes as a device
//! buffer between ranks whose backends share a memory space (stages on one GPU), else staged
//! through host memory.

use std::any::Any;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::backend::{Backend, Transport};

/// How long a receive waits before the run is declared stuck.
pub const DEFAULT_RECV_TIMEOUT: Duration = Duration::from_secs(60);

/// One rank's end of an in-process mesh: it can send to and receive from every other rank
/// (and itself). Messages between a pair arrive in send order. A receive fails fast when
/// the sending rank has gone (its end was dropped) and fails after a timeout otherwise.
pub struct InProcessTransport {
    rank: usize,
    to: Vec<Sender<Message>>,
    from: Vec<Receiver<Message>>,
    /// Per destination: hand device buffers over instead of staging them.
    hand_off: Vec<bool>,
    timeout: Duration,
}

/// One tensor in flight.
enum Message {
    /// Staged through host memory.
    Host(Vec<f32>),
    /// A device buffer (a `B::Buffer` of the sender's backend type) the receiver takes over.
    Device(Box<dyn Any + Send>),
}

/// A fully connected in-process mesh of `ranks` transports, staging every tensor through host
/// memory; element `r` belongs to rank `r`.
pub fn in_process_mesh(ranks: usize, timeout: Duration) -> Vec<InProcessTransport> {
    in_process_mesh_over(&vec![None; ranks], timeout)
}

/// A mesh for ranks whose backends report `spaces` ([`Backend::memory_space`]): tensors
/// between two ranks of one space are handed over as device buffers (a device-to-device copy
/// on the sender's stream; the receiver's work waits for it on the device), the others are
/// staged through host memory. A handed-over copy is counted by neither meter while in flight
/// ([`Backend::hand_over`], [`Backend::take_over`]), so per-rank peaks do not depend on timing.
pub fn in_process_mesh_over(
    spaces: &[Option<String>],
    timeout: Duration,
) -> Vec<InProcessTransport> {
    let ranks = spaces.len();
    // senders[src][dst] and receivers[dst][src] are the two ends of the src -> dst channel.
    let mut senders: Vec<Vec<Sender<Message>>> = (0..ranks).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<Option<Receiver<Message>>>> = (0..ranks)
        .map(|_| (0..ranks).map(|_| None).collect())
        .collect();
    for (src, row) in senders.iter_mut().enumerate() {
        for dst_receivers in receivers.iter_mut() {
            let (tx, rx) = channel();
            row.push(tx);
            dst_receivers[src] = Some(rx);
        }
    }
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(rank, (to, from))| InProcessTransport {
            rank,
            to,
            from: from
                .into_iter()
                .map(|r| r.expect("every pair has a channel"))
                .collect(),
            hand_off: spaces
                .iter()
                .map(|dst| dst.is_some() && *dst == spaces[rank])
                .collect(),
            timeout,
        })
        .collect()
}

impl<B: Backend> Transport<B> for InProcessTransport {
    fn send(&mut self, backend: &B, to: usize, buf: &B::Buffer) -> Result<()> {
        let message = if self.hand_off[to] {
            let mut copy = backend.alloc_output(backend.len(buf), backend.dtype(buf))?;
            backend.copy(&mut copy, buf)?;
            backend.hand_over(&mut copy);
            Message::Device(Box::new(copy))
        } else {
            Message::Host(backend.download(buf)?)
        };
        let sent = self.to.get(to).map(|channel| channel.send(message));
        match sent {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(anyhow!(
                "rank {} cannot send to rank {to}: it has stopped",
                self.rank
            )),
            None => Err(anyhow!("rank {} has stopped and sends nothing", self.rank)),
        }
    }

    fn stop(&mut self) {
        // Dropping the senders disconnects every peer's receiver from this rank.
        self.to.clear();
    }

    fn recv(&mut self, backend: &B, from: usize, len: usize) -> Result<B::Buffer> {
        match self.from[from].recv_timeout(self.timeout) {
            Ok(Message::Host(data)) => {
                check_len(self.rank, from, len, data.len())?;
                backend.upload(&data)
            }
            Ok(Message::Device(buf)) => {
                let buf = buf.downcast::<B::Buffer>().map_err(|_| {
                    anyhow!(
                        "rank {} received a buffer of another backend from rank {from}",
                        self.rank
                    )
                })?;
                check_len(self.rank, from, len, backend.len(&buf))?;
                let mut buf = *buf;
                backend.take_over(&mut buf);
                Ok(buf)
            }
            Err(RecvTimeoutError::Disconnected) => Err(anyhow!(
                "rank {} waited for rank {from}, which has stopped",
                self.rank
            )),
            Err(RecvTimeoutError::Timeout) => Err(anyhow!(
                "rank {} waited {:.0} s for a tensor from rank {from}; giving up",
                self.rank,
                self.timeout.as_secs_f64()
            )),
        }
    }
}

/// The error for a message whose length is not the one its receiver expects.
pub fn check_len(me: usize, from: usize, want: usize, got: usize) -> Result<()> {
    if want != got {
        return Err(anyhow!(
            "rank {me} expected a tensor of {want} values from rank {from} and received {got}"
        ));
    }
    Ok(())
}
