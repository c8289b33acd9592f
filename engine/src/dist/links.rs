//! A rank's links to its peers: the TCP mesh for control messages (step figures, losses,
//! checkpoints), and for tensors either the same mesh or a transport of the backend's own
//! (NCCL between CUDA ranks), opened once the ranks have met.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use super::TcpTransport;
use crate::backend::{Backend, Transport};

/// Asked from any thread: the first failure of a peer seen so far (a crash, an abort), naming
/// the rank to blame; `None` while every peer is well. Never waits.
pub type PeerProbe = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// A tensor transport a rank uses instead of the TCP mesh (NCCL between CUDA ranks).
pub trait TensorTransport<B: Backend>: Transport<B> {
    /// Wait until every transfer issued so far has completed, or fail naming the peer that
    /// did not take part in time.
    fn flush(&mut self) -> Result<()>;
    /// Stop after a failure: abandon the transfers in flight so no wait on them hangs.
    fn abort(&mut self);
}

/// How a rank opens a [`TensorTransport`] once the ranks have met at the rendezvous.
pub trait TensorSetup<B: Backend> {
    /// The transport's name (`nccl`); every rank of a run must use the same.
    fn name(&self) -> &'static str;
    /// Before the rendezvous: fail with one line when this machine cannot open the transport.
    /// On the `leader` (rank 0) it returns the bytes every rank needs to open it (NCCL's
    /// unique id), which the rendezvous hands to all; elsewhere nothing.
    fn prepare(&self, leader: bool) -> Result<Vec<u8>>;
    /// Open `rank`'s end of the transport among `world` ranks from the leader's `blob`,
    /// waiting at most `timeout` for the others; give up as soon as `peers` reports a failure.
    fn open(
        &self,
        backend: &B,
        rank: usize,
        world: usize,
        blob: &[u8],
        timeout: Duration,
        peers: PeerProbe,
    ) -> Result<Box<dyn TensorTransport<B>>>;
}

/// One rank's links: TCP for control messages, and tensors over TCP too unless the rank opened
/// a [`TensorTransport`].
pub struct RankLinks<B: Backend> {
    tcp: TcpTransport,
    tensors: Option<Box<dyn TensorTransport<B>>>,
}

impl<B: Backend> RankLinks<B> {
    /// Links over `tcp`, with tensors carried by `tensors` when given.
    pub fn new(tcp: TcpTransport, tensors: Option<Box<dyn TensorTransport<B>>>) -> Self {
        Self { tcp, tensors }
    }

    /// Send host values to rank `to` over TCP (sampled logits, checkpoint tensors).
    pub fn send_f32(&mut self, to: usize, values: &[f32]) -> Result<()> {
        self.tcp.send_f32(to, values)
    }

    /// Receive host values from rank `from` over TCP; `what` names them in errors.
    pub fn recv_f32(&mut self, from: usize, what: &str) -> Result<Vec<f32>> {
        self.tcp.recv_f32(from, what)
    }

    /// Send a JSON control message to rank `to`.
    pub fn send_json(&mut self, to: usize, value: &Value) -> Result<()> {
        self.tcp.send_json(to, value)
    }

    /// Receive the next JSON control message from rank `from`; `what` names it in errors.
    pub fn recv_json(&mut self, from: usize, what: &str) -> Result<Value> {
        self.tcp.recv_json(from, what)
    }

    /// Wait until the tensor transfers issued so far have completed (at once over TCP, whose
    /// sends are complete when they return).
    pub fn flush(&mut self) -> Result<()> {
        match &mut self.tensors {
            Some(t) => t.flush(),
            None => Ok(()),
        }
    }

    /// End the run cleanly: let the tensor transfers in flight complete, then finish with
    /// every peer over TCP.
    pub fn finish(&mut self) -> Result<()> {
        if let Err(e) = self.flush() {
            self.abort(&format!("{e:#}"));
            return Err(e);
        }
        self.tcp.finish()
    }

    /// Stop after a failure: abandon tensor transfers, and tell every peer why over TCP.
    pub fn abort(&mut self, reason: &str) {
        if let Some(t) = &mut self.tensors {
            t.abort();
        }
        self.tcp.abort(reason);
    }
}

impl<B: Backend> Transport<B> for RankLinks<B> {
    fn send(&mut self, backend: &B, to: usize, buf: &B::Buffer) -> Result<()> {
        match &mut self.tensors {
            Some(t) => t.send(backend, to, buf),
            None => self.tcp.send(backend, to, buf),
        }
    }

    fn recv(&mut self, backend: &B, from: usize, len: usize) -> Result<B::Buffer> {
        match &mut self.tensors {
            Some(t) => t.recv(backend, from, len),
            None => self.tcp.recv(backend, from, len),
        }
    }
}

/// `bytes` as lowercase hex, for the rendezvous's JSON.
pub(super) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string, or `None` when it is not one.
pub(super) fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_survive_the_hex_round_trip() {
        let blob: Vec<u8> = (0..=255u8).rev().collect();
        let text = to_hex(&blob);
        assert_eq!(text.len(), 512);
        assert_eq!(&text[..4], "fffe");
        assert_eq!(from_hex(&text), Some(blob));
        assert_eq!(from_hex(""), Some(Vec::new()));
        for bad in ["f", "zz", "0g", "é0"] {
            assert_eq!(from_hex(bad), None, "{bad:?}");
        }
    }
}
