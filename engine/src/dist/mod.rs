//! Multi-process runs: one process per pipeline rank, on one machine or several.
//!
//! A process finds its place from the launcher's environment ([`LaunchEnv`]), meets the other
//! ranks at rank 0's rendezvous store ([`rendezvous`]), connects to each of them over TCP
//! ([`TcpTransport`], checksummed [`frame`]s), and trains only its own stages
//! ([`RankTrainer`]). A peer that fails makes every rank stop within the peer timeout with
//! one line naming it.

pub mod env;
pub mod frame;
mod infer;
pub mod launcher_watch;
pub mod links;
pub mod rendezvous;
pub mod tcp;
pub mod tcp_store;
mod trainer;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use crate::invalid_input;

pub use env::LaunchEnv;
pub use launcher_watch::watch_launcher;
pub use links::{PeerProbe, RankLinks, TensorSetup, TensorTransport};
pub use tcp::TcpTransport;
pub use trainer::{RankTrainer, FAULT_ENV};

/// How long a rank waits on a peer (and on the rendezvous) before giving up, by default.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// The address of rank 0's store (IPv4 preferred when the host has both).
pub fn master_address(env: &LaunchEnv) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .map_err(|e| invalid_input!("MASTER_ADDR {} does not resolve: {e}", env.master_addr))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| invalid_input!("MASTER_ADDR {} resolves to no address", env.master_addr))
}

/// Meet the other ranks of `env`'s run and connect to each of them; rank 0 shares `shared`.
/// Returns this rank's transport and what rank 0 shared. Every wait lasts at most `timeout`.
///
/// Rank 0 serves the store on MASTER_ADDR: loopback unless MASTER_ADDR names another
/// interface, in which case `PIPIT_TOKEN` must be set so strangers are refused. Under
/// torchrun's agent the ranks meet in the agent's own TCPStore there instead.
pub fn connect(env: &LaunchEnv, shared: Value, timeout: Duration) -> Result<(TcpTransport, Value)> {
    let (transport, shared, _) = connect_sharing(env, shared, &[], timeout)?;
    Ok((transport, shared))
}

/// [`connect`], where rank 0 also hands every rank the opaque bytes `blob` (a tensor
/// transport's key, such as NCCL's unique id; the other ranks' `blob` is ignored). Returns
/// rank 0's settings and bytes.
pub fn connect_sharing(
    env: &LaunchEnv,
    shared: Value,
    blob: &[u8],
    timeout: Duration,
) -> Result<(TcpTransport, Value, Vec<u8>)> {
    let shared = serde_json::json!({ "settings": shared, "blob": links::to_hex(blob) });
    let master = master_address(env)?;
    let token = env.token.as_deref();
    let meeting = if let Some(prefix) = &env.agent_store {
        rendezvous::meet_in_store(master, env.rank, env.world_size, prefix, shared, timeout)?
    } else if env.rank == 0 {
        if !master.ip().is_loopback() && token.is_none() {
            return Err(invalid_input!(
                "MASTER_ADDR {} is not a loopback address: set PIPIT_TOKEN to the same secret on every rank, so the rendezvous admits only this run's processes",
                env.master_addr
            ));
        }
        rendezvous::serve(master, env.world_size, token, shared, timeout)?
    } else {
        rendezvous::join(master, env.rank, env.world_size, token, timeout)?
    };
    log::info!("rank {} joined run {}", env.rank, meeting.run_id_hex());
    let streams = rendezvous::connect_mesh(&meeting, timeout)?;
    let transport = TcpTransport::new(env.rank, env.world_size, streams, timeout)?;
    let mut shared = meeting.shared;
    let blob = shared["blob"]
        .as_str()
        .and_then(links::from_hex)
        .ok_or_else(|| anyhow::anyhow!("rank 0 shared no readable blob at the rendezvous"))?;
    Ok((transport, shared["settings"].take(), blob))
}
