//! In-process peer transfer: one channel per ordered pair of ranks, staged through host memory.

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
    to: Vec<Sender<Vec<f32>>>,
    from: Vec<Receiver<Vec<f32>>>,
    timeout: Duration,
}

/// A fully connected in-process mesh of `ranks` transports; element `r` belongs to rank `r`.
pub fn in_process_mesh(ranks: usize, timeout: Duration) -> Vec<InProcessTransport> {
    // senders[src][dst] and receivers[dst][src] are the two ends of the src -> dst channel.
    let mut senders: Vec<Vec<Sender<Vec<f32>>>> = (0..ranks).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<Option<Receiver<Vec<f32>>>>> = (0..ranks)
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
            timeout,
        })
        .collect()
}

impl<B: Backend> Transport<B> for InProcessTransport {
    fn send(&mut self, backend: &B, to: usize, buf: &B::Buffer) -> Result<()> {
        let data = backend.download(buf)?;
        self.to[to].send(data).map_err(|_| {
            anyhow!(
                "rank {} cannot send to rank {to}: it has stopped",
                self.rank
            )
        })
    }

    fn recv(&mut self, backend: &B, from: usize, len: usize) -> Result<B::Buffer> {
        match self.from[from].recv_timeout(self.timeout) {
            Ok(data) => {
                check_len(self.rank, from, len, data.len())?;
                backend.upload(&data)
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
