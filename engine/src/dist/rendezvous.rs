//! How the ranks of a run find each other: rank 0 serves a small TCP store; every other rank
//! joins it, and once all have joined the store hands each the run id, what rank 0 shares
//! (the run's settings) and every rank's data address. Then the ranks connect pairwise.
//! Under torchrun's agent, which serves a TCPStore of its own on the same port, the ranks
//! meet in that instead ([`meet_in_store`]).
//!
//! Store protocol: one JSON line each way. A joining rank sends
//! `{"rank", "world_size", "token", "data_port"}`; the store answers, once everybody is in,
//! `{"run_id", "shared", "peers"}`, or `{"error", "refused"}` to a wrong token, a world size
//! that differs, a rank out of range or already taken, or when the run never filled up.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::frame::Fnv64;
use crate::invalid_input;

/// Longest request line the store reads.
const MAX_LINE: u64 = 64 * 1024;
/// Longest the store waits for one joining process to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts to reach a listener that is not up yet.
const RETRY: Duration = Duration::from_millis(50);
/// First bytes of the handshake on a data connection.
const HANDSHAKE_MAGIC: [u8; 8] = *b"PIPITMSH";
/// Bytes of a data-connection handshake: magic, run id, rank, checksum.
const HANDSHAKE_LEN: usize = 8 + 16 + 4 + 8;

/// What a rank knows once everybody has joined.
#[derive(Debug)]
pub struct Meeting {
    /// This rank.
    pub rank: usize,
    /// Identifies the run; data connections from any other run are refused.
    pub run_id: u128,
    /// What rank 0 shared (the run's settings).
    pub shared: Value,
    /// Every rank's data address, indexed by rank.
    pub peers: Vec<SocketAddr>,
    /// This rank's data listener (its address is `peers[rank]`).
    pub listener: TcpListener,
}

impl Meeting {
    /// The run id as text.
    pub fn run_id_hex(&self) -> String {
        format!("{:032x}", self.run_id)
    }
}

/// A hard-to-guess 128-bit id (std's per-process random hash keys, the time and the pid).
fn random_id() -> u128 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut id = 0u128;
    for half in 0..2u8 {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.write_u8(half);
        id = (id << 64) | h.finish() as u128;
    }
    id
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn send_line(stream: &mut TcpStream, value: &Value) -> io::Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn read_line(stream: &TcpStream) -> io::Result<String> {
    let mut line = String::new();
    BufReader::new(stream.take(MAX_LINE)).read_line(&mut line)?;
    Ok(line)
}

/// A joining rank, as the store has accepted it.
struct Joined {
    stream: TcpStream,
    data: SocketAddr,
}

/// Serve the store as rank 0 on `bind` until all `world` ranks have joined, then return this
/// rank's meeting. Each joiner must present `token` (both absent, or equal). A background
/// thread keeps refusing latecomers (a second process for a taken rank) for the life of the
/// process. Fails after `timeout` naming the ranks that never joined.
pub fn serve(
    bind: SocketAddr,
    world: usize,
    token: Option<&str>,
    shared: Value,
    timeout: Duration,
) -> Result<Meeting> {
    let listener = TcpListener::bind(bind).map_err(|e| {
        anyhow!("rank 0 cannot serve the rendezvous on {bind}: {e} (is MASTER_PORT in use, or MASTER_ADDR not this host?)")
    })?;
    serve_on(listener, world, token, shared, timeout)
}

/// [`serve`] on a listener already bound (tests bind port 0 and read the port back).
pub fn serve_on(
    listener: TcpListener,
    world: usize,
    token: Option<&str>,
    shared: Value,
    timeout: Duration,
) -> Result<Meeting> {
    let bind = listener.local_addr()?;
    let data = TcpListener::bind((bind.ip(), 0)).context("rank 0 opening its data listener")?;
    let run_id = random_id();
    let deadline = Instant::now() + timeout;
    let mut joined: Vec<Option<Joined>> = (0..world).map(|_| None).collect();
    listener.set_nonblocking(true)?;
    while joined.iter().skip(1).any(Option::is_none) {
        if Instant::now() >= deadline {
            let missing: Vec<String> = (1..world)
                .filter(|&r| joined[r].is_none())
                .map(|r| r.to_string())
                .collect();
            let msg = format!(
                "rendezvous on {bind} timed out after {:.0} s: rank(s) {} of {world} never joined",
                timeout.as_secs_f64(),
                missing.join(", ")
            );
            for j in joined.iter_mut().flatten() {
                let _ = send_line(&mut j.stream, &json!({ "error": msg, "refused": false }));
            }
            bail!(msg);
        }
        match listener.accept() {
            Ok((stream, addr)) => {
                if let Some((rank, j)) = admit(stream, addr, world, token, &joined, deadline) {
                    joined[rank] = Some(j);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(RETRY / 2),
            Err(e) => return Err(e).context("accepting rendezvous connections"),
        }
    }
    let mut peers = vec![data.local_addr()?];
    peers.extend(joined.iter().skip(1).flatten().map(|j| j.data));
    let roster = json!({
        "run_id": format!("{run_id:032x}"),
        "shared": shared.clone(),
        "peers": peers.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
    });
    for (rank, j) in joined.iter_mut().enumerate().skip(1) {
        if let Some(j) = j {
            send_line(&mut j.stream, &roster)
                .with_context(|| format!("sending the roster to rank {rank}"))?;
        }
    }
    listener.set_nonblocking(false)?;
    thread::Builder::new()
        .name("pipit-rendezvous".into())
        .spawn(move || refuse_latecomers(listener, world))
        .context("starting the rendezvous thread")?;
    Ok(Meeting {
        rank: 0,
        run_id,
        shared,
        peers,
        listener: data,
    })
}

/// Read a joiner's request and accept it, or answer why not and drop it.
fn admit(
    mut stream: TcpStream,
    addr: SocketAddr,
    world: usize,
    token: Option<&str>,
    joined: &[Option<Joined>],
    deadline: Instant,
) -> Option<(usize, Joined)> {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT.min(remaining(deadline)).max(RETRY)));
    let request: Value = match read_line(&stream).map(|l| serde_json::from_str(&l)) {
        Ok(Ok(v)) => v,
        _ => {
            log::warn!("rendezvous: ignored {addr}: not a pipit rendezvous request");
            return None;
        }
    };
    let taken = |r: usize| {
        joined[r].as_ref().map(|j| {
            j.stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        })
    };
    match read_hello(&request, world, token, &taken) {
        Ok((r, port)) => Some((
            r,
            Joined {
                stream,
                data: SocketAddr::new(addr.ip(), port),
            },
        )),
        Err(why) => {
            log::warn!("rendezvous: refused {addr}: {why}");
            let _ = send_line(&mut stream, &json!({ "error": why, "refused": true }));
            None
        }
    }
}

/// A joining rank's request, as rank 0's store reads it: its rank and data port, or why it is
/// refused (a wrong token or world size, a rank out of range or already `taken` by the
/// process at the address returned, no data port).
pub fn read_hello(
    request: &Value,
    world: usize,
    token: Option<&str>,
    taken: &dyn Fn(usize) -> Option<String>,
) -> Result<(usize, u16), String> {
    let rank = request["rank"].as_u64().map(|r| r as usize);
    if request["token"].as_str() != token {
        return Err("wrong PIPIT_TOKEN (every rank must present rank 0's)".to_string());
    }
    if request["world_size"].as_u64() != Some(world as u64) {
        return Err(format!(
            "WORLD_SIZE {} differs from rank 0's {world}",
            request["world_size"]
        ));
    }
    let rank = match rank {
        Some(r) if r >= 1 && r < world => r,
        _ => return Err(format!("RANK {} is not in 1..{world}", request["rank"])),
    };
    if let Some(by) = taken(rank) {
        return Err(format!(
            "rank {rank} is already taken (by the process at {by})"
        ));
    }
    request["data_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .map(|port| (rank, port))
        .ok_or_else(|| "the request has no data_port".into())
}

/// What rank 0's store answers a joining rank once everybody has joined.
#[derive(Debug)]
pub struct Roster {
    /// The run's id, shared by every rank.
    pub run_id: u128,
    /// Every rank's data address, in rank order.
    pub peers: Vec<SocketAddr>,
    /// Rank 0's settings for the run.
    pub shared: Value,
}

/// The store's answer `line` to `rank` of `world`, joining at `master`: the roster, or the
/// refusal it carries (an [`crate::InvalidInput`]) or why it is not one.
pub fn read_roster(line: &str, world: usize, master: SocketAddr, rank: usize) -> Result<Roster> {
    let reply: Value = serde_json::from_str(line).with_context(|| {
        format!("the rendezvous at {master} answered with something that is not JSON")
    })?;
    if let Some(why) = reply["error"].as_str() {
        if reply["refused"].as_bool() == Some(true) {
            return Err(invalid_input!(
                "the rendezvous at {master} refused rank {rank}: {why}"
            ));
        }
        bail!("the rendezvous at {master} failed: {why}");
    }
    let run_id = reply["run_id"]
        .as_str()
        .and_then(|s| u128::from_str_radix(s, 16).ok())
        .ok_or_else(|| anyhow!("the rendezvous roster has no run id"))?;
    let peers: Vec<SocketAddr> = reply["peers"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str()?.parse().ok()).collect())
        .unwrap_or_default();
    if peers.len() != world {
        bail!(
            "the rendezvous roster lists {} ranks, not {world}",
            peers.len()
        );
    }
    Ok(Roster {
        run_id,
        peers,
        shared: reply["shared"].clone(),
    })
}

/// After the run has started every rank is taken: answer each later request so.
fn refuse_latecomers(listener: TcpListener, world: usize) {
    for mut stream in listener.incoming().flatten() {
        let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
        let rank = read_line(&stream)
            .ok()
            .and_then(|l| serde_json::from_str::<Value>(&l).ok())
            .map(|v| v["rank"].clone())
            .unwrap_or(Value::Null);
        let why =
            format!("rank {rank} is already taken: the run has started with all {world} ranks");
        log::warn!("rendezvous: refused a late process: {why}");
        let _ = send_line(&mut stream, &json!({ "error": why, "refused": true }));
    }
}

/// Connect to `addr`, retrying while nothing listens there yet, until `deadline`.
fn connect_until(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        let left = remaining(deadline);
        match TcpStream::connect_timeout(&addr, left.clamp(RETRY, Duration::from_secs(2))) {
            Ok(s) => return Ok(s),
            Err(e) if remaining(deadline).is_zero() => return Err(e),
            Err(_) => thread::sleep(RETRY),
        }
    }
}

/// Join rank 0's store at `master` as `rank` of `world`, presenting `token`; returns this
/// rank's meeting once everybody has joined. Fails after `timeout`; a refusal is an
/// [`crate::InvalidInput`] that says why.
pub fn join(
    master: SocketAddr,
    rank: usize,
    world: usize,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Meeting> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect_until(master, deadline).map_err(|e| {
        anyhow!(
            "rank {rank} could not reach the rendezvous at {master} within {:.0} s ({e}): is rank 0 running, and are MASTER_ADDR and MASTER_PORT right?",
            timeout.as_secs_f64()
        )
    })?;
    // Listen for data connections on the interface that reaches rank 0.
    let local_ip = stream.local_addr()?.ip();
    let listener = TcpListener::bind((local_ip, 0))
        .with_context(|| format!("rank {rank} opening its data listener on {local_ip}"))?;
    let request = json!({
        "rank": rank,
        "world_size": world,
        "token": token,
        "data_port": listener.local_addr()?.port(),
    });
    send_line(&mut stream, &request)
        .with_context(|| format!("joining the rendezvous at {master}"))?;
    stream.set_read_timeout(Some(remaining(deadline).max(RETRY)))?;
    let line = read_line(&stream).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => anyhow!(
            "rank {rank} joined the rendezvous at {master}, but the other ranks did not all join within {:.0} s",
            timeout.as_secs_f64()
        ),
        _ => anyhow!("the rendezvous at {master} failed: {e}"),
    })?;
    if line.is_empty() {
        bail!("the rendezvous at {master} closed before the run started (rank 0 stopped)");
    }
    let Roster {
        run_id,
        mut peers,
        shared,
    } = read_roster(&line, world, master, rank)?;
    // Rank 0 listens on the address this rank reached it at, whatever it bound.
    peers[0] = SocketAddr::new(master.ip(), peers[0].port());
    Ok(Meeting {
        rank,
        run_id,
        shared,
        peers,
        listener,
    })
}

/// Meet the other ranks in torchrun's own store at `store` (its agent serves a TCPStore on
/// MASTER_ADDR:MASTER_PORT), under the key prefix `prefix`: each rank sets its data address
/// under `{prefix}/peer/{rank}`, rank 0 also the run id and what it shares under
/// `{prefix}/run`, and every rank waits for all of them. Fails after `timeout` naming the
/// ranks that never appeared.
pub fn meet_in_store(
    store: SocketAddr,
    rank: usize,
    world: usize,
    prefix: &str,
    shared: Value,
    timeout: Duration,
) -> Result<Meeting> {
    let deadline = Instant::now() + timeout;
    let mut client = super::tcp_store::TcpStoreClient::connect(store, deadline)
        .with_context(|| format!("rank {rank} joining torchrun's store"))?;
    // Listen for data connections on the interface that reaches the store.
    let local_ip = client.local_ip()?;
    let listener = TcpListener::bind((local_ip, 0))
        .with_context(|| format!("rank {rank} opening its data listener on {local_ip}"))?;
    let peer_key = |r: usize| format!("{prefix}/peer/{r}");
    let run_key = format!("{prefix}/run");
    client.set(
        &peer_key(rank),
        listener.local_addr()?.to_string().as_bytes(),
    )?;
    if rank == 0 {
        let run = json!({
            "run_id": format!("{:032x}", random_id()),
            "world_size": world,
            "shared": shared,
        });
        client.set(&run_key, run.to_string().as_bytes())?;
    }
    let mut keys: Vec<String> = (0..world).map(peer_key).collect();
    keys.push(run_key.clone());
    client.wait(&keys, deadline).map_err(|e| {
        anyhow!(
            "rank {rank}: the ranks did not all reach torchrun's store at {store} within {:.0} s ({e})",
            timeout.as_secs_f64()
        )
    })?;
    let run: Value = serde_json::from_slice(&client.get(&run_key)?)
        .context("reading the run rank 0 set in torchrun's store")?;
    if run["world_size"].as_u64() != Some(world as u64) {
        return Err(invalid_input!(
            "rank 0 runs a world of {} ranks, this rank one of {world} (WORLD_SIZE differs)",
            run["world_size"]
        ));
    }
    let run_id = run["run_id"]
        .as_str()
        .and_then(|h| u128::from_str_radix(h, 16).ok())
        .ok_or_else(|| anyhow!("rank 0 set no readable run id in torchrun's store"))?;
    let peers = (0..world)
        .map(|r| {
            let text = String::from_utf8(client.get(&peer_key(r))?)?;
            text.parse::<SocketAddr>()
                .map_err(|e| anyhow!("rank {r}'s address `{text}` in torchrun's store: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Meeting {
        rank,
        run_id,
        shared: run["shared"].clone(),
        peers,
        listener,
    })
}

fn handshake(run_id: u128, rank: usize) -> [u8; HANDSHAKE_LEN] {
    let mut out = [0u8; HANDSHAKE_LEN];
    out[..8].copy_from_slice(&HANDSHAKE_MAGIC);
    out[8..24].copy_from_slice(&run_id.to_le_bytes());
    out[24..28].copy_from_slice(&(rank as u32).to_le_bytes());
    let sum = Fnv64::of(&out[..28]);
    out[28..].copy_from_slice(&sum.to_le_bytes());
    out
}

/// Read a peer's handshake; the rank it claims, if it is one of `run_id`'s.
fn read_handshake(stream: &mut TcpStream, run_id: u128, deadline: Instant) -> Result<usize> {
    stream.set_read_timeout(Some(remaining(deadline).max(RETRY)))?;
    let mut buf = [0u8; HANDSHAKE_LEN];
    stream
        .read_exact(&mut buf)
        .context("reading a peer's handshake")?;
    if buf[..8] != HANDSHAKE_MAGIC || Fnv64::of(&buf[..28]).to_le_bytes() != buf[28..] {
        bail!("a connection that is not a pipit rank's");
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&buf[8..24]);
    if u128::from_le_bytes(id) != run_id {
        bail!("a rank of another run");
    }
    Ok(u32::from_le_bytes([buf[24], buf[25], buf[26], buf[27]]) as usize)
}

/// Connect this rank to every other rank of `meeting` (the higher rank of each pair dials),
/// checking each peer belongs to the same run. Returns `(peer rank, stream)` pairs.
pub fn connect_mesh(meeting: &Meeting, timeout: Duration) -> Result<Vec<(usize, TcpStream)>> {
    let (me, world, run_id) = (meeting.rank, meeting.peers.len(), meeting.run_id);
    let deadline = Instant::now() + timeout;
    let mut streams = Vec::with_capacity(world.saturating_sub(1));
    for (peer, &addr) in meeting.peers.iter().enumerate().take(me) {
        let what = || format!("rank {me} connecting to rank {peer} at {addr}");
        let mut s = connect_until(addr, deadline).with_context(what)?;
        s.write_all(&handshake(run_id, me)).with_context(what)?;
        let answered = read_handshake(&mut s, run_id, deadline).with_context(what)?;
        if answered != peer {
            bail!("{}: rank {answered} answered", what());
        }
        streams.push((peer, s));
    }
    let listener = &meeting.listener;
    listener.set_nonblocking(true)?;
    let mut accepted = vec![false; world];
    while streams.len() + 1 < world {
        if remaining(deadline).is_zero() {
            let missing: Vec<usize> = (me + 1..world).filter(|&r| !accepted[r]).collect();
            bail!(
                "rank {me}: ranks {missing:?} did not connect within {:.0} s",
                timeout.as_secs_f64()
            );
        }
        let (mut s, addr) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(RETRY / 5);
                continue;
            }
            Err(e) => return Err(e).context("accepting peer connections"),
        };
        s.set_nonblocking(false)?;
        match read_handshake(&mut s, run_id, deadline) {
            Ok(peer) if peer > me && peer < world && !accepted[peer] => {
                s.write_all(&handshake(run_id, me))
                    .with_context(|| format!("rank {me} answering rank {peer}"))?;
                accepted[peer] = true;
                streams.push((peer, s));
            }
            Ok(peer) => log::warn!(
                "rank {me}: refused a second connection claiming rank {peer} from {addr}"
            ),
            Err(e) => log::warn!("rank {me}: refused a connection from {addr}: {e:#}"),
        }
    }
    Ok(streams)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_rosters_are_read_or_refused_with_the_reason() {
        let none = |_: usize| None;
        let hello = json!({"rank": 1, "world_size": 4, "token": "t", "data_port": 40001});
        assert_eq!(read_hello(&hello, 4, Some("t"), &none), Ok((1, 40001)));
        let refused = |v: Value| read_hello(&v, 4, Some("t"), &none).unwrap_err();
        assert!(refused(json!({"rank": 1, "world_size": 4})).contains("PIPIT_TOKEN"));
        assert!(refused(json!({"rank": 9, "world_size": 4, "token": "t"})).contains("not in 1..4"));
        assert!(refused(json!({"rank": 1, "world_size": 3, "token": "t"})).contains("WORLD_SIZE"));
        let big_port = json!({"rank": 1, "world_size": 4, "token": "t", "data_port": 70000});
        assert!(refused(big_port).contains("data_port"));
        let taken = |r: usize| (r == 1).then(|| "10.0.0.2:1".to_string());
        let err = read_hello(&hello, 4, Some("t"), &taken).unwrap_err();
        assert!(
            err.contains("already taken (by the process at 10.0.0.2:1)"),
            "{err}"
        );
        let master: SocketAddr = "127.0.0.1:29500".parse().unwrap();
        let roster = r#"{"run_id": "ff", "peers": ["127.0.0.1:1", "127.0.0.1:2"], "shared": 7}"#;
        let r = read_roster(roster, 2, master, 1).unwrap();
        assert_eq!((r.run_id, r.peers.len(), r.shared), (255, 2, json!(7)));
        assert!(read_roster(roster, 3, master, 1).is_err());
        let no = read_roster(r#"{"error": "full", "refused": true}"#, 2, master, 1).unwrap_err();
        assert!(crate::is_invalid_input(&no), "{no}");
        assert!(read_roster("not json", 2, master, 1).is_err());
    }
    use std::net::{IpAddr, Ipv4Addr};

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn store() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind((LOOPBACK, 0)).unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    /// Connect to the store and send a raw request.
    fn ask(addr: SocketAddr, request: Value) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        send_line(&mut s, &request).unwrap();
        s
    }

    fn answer(s: &TcpStream) -> Value {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        serde_json::from_str(&read_line(s).unwrap()).unwrap()
    }

    #[test]
    fn three_ranks_meet_and_connect_pairwise() {
        let (l, addr) = store();
        let shared = json!({"config": {"stages": 3}});
        let t = Duration::from_secs(20);
        let server = thread::spawn(move || {
            let m = serve_on(l, 3, Some("tok"), shared, t).unwrap();
            let s = connect_mesh(&m, t).unwrap();
            (m.run_id, s.len())
        });
        let joiners: Vec<_> = (1..3)
            .map(|r| {
                thread::spawn(move || {
                    let m = join(addr, r, 3, Some("tok"), t).unwrap();
                    let s = connect_mesh(&m, t).unwrap();
                    let mut peers: Vec<usize> = s.iter().map(|(p, _)| *p).collect();
                    peers.sort();
                    (m.run_id, m.shared, peers)
                })
            })
            .collect();
        let (id0, n0) = server.join().unwrap();
        assert_eq!(n0, 2);
        for (r, j) in (1..3).zip(joiners) {
            let (id, shared, peers) = j.join().unwrap();
            assert_eq!(id, id0, "one run id");
            assert_eq!(shared["config"]["stages"], 3);
            assert_eq!(peers, (0..3).filter(|&p| p != r).collect::<Vec<_>>());
        }
    }

    #[test]
    fn wrong_token_and_taken_rank_are_refused() {
        let (l, addr) = store();
        let t = Duration::from_secs(20);
        let server = thread::spawn(move || serve_on(l, 3, Some("right"), json!(null), t));
        let request = |rank: usize, token: &str| json!({"rank": rank, "world_size": 3, "token": token, "data_port": 9});
        let bad = ask(addr, request(1, "wrong"));
        let refusal = answer(&bad);
        assert_eq!(refusal["refused"], true);
        assert!(
            refusal["error"]
                .as_str()
                .unwrap()
                .contains("wrong PIPIT_TOKEN"),
            "{refusal}"
        );

        // The store answers requests in the order it accepts them: the first rank 1 is in.
        let first = ask(addr, request(1, "right"));
        let second = ask(addr, request(1, "right"));
        let refusal = answer(&second);
        assert!(
            refusal["error"]
                .as_str()
                .unwrap()
                .contains("rank 1 is already taken"),
            "{refusal}"
        );
        let wrong_world = ask(
            addr,
            json!({"rank": 2, "world_size": 4, "token": "right", "data_port": 9}),
        );
        assert!(answer(&wrong_world)["error"]
            .as_str()
            .unwrap()
            .contains("WORLD_SIZE 4"));

        let last = ask(addr, request(2, "right"));
        let roster = answer(&first);
        assert_eq!(roster["peers"].as_array().unwrap().len(), 3, "{roster}");
        assert_eq!(answer(&last)["run_id"], roster["run_id"]);
        server.join().unwrap().unwrap();

        // After the start the store still answers, refusing every rank.
        let late = ask(addr, request(2, "right"));
        assert!(answer(&late)["error"]
            .as_str()
            .unwrap()
            .contains("already taken"));
    }

    #[test]
    fn join_reports_a_refusal_as_invalid_input() {
        let (l, addr) = store();
        let t = Duration::from_secs(20);
        let server = thread::spawn(move || {
            serve_on(l, 2, Some("right"), json!(null), Duration::from_secs(2))
        });
        let err = join(addr, 1, 2, Some("wrong"), t).unwrap_err();
        assert!(crate::is_invalid_input(&err), "{err:#}");
        assert!(format!("{err:#}").contains("wrong PIPIT_TOKEN"), "{err:#}");
        let err = server.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("rank(s) 1 of 2 never joined"), "{err}");
    }

    #[test]
    fn missing_ranks_time_out_on_both_sides() {
        let (l, addr) = store();
        let server =
            thread::spawn(move || serve_on(l, 3, None, json!(null), Duration::from_millis(1500)));
        let err = join(addr, 2, 3, None, Duration::from_secs(20))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank(s) 1 of 3 never joined"), "{err}");
        assert!(server.join().unwrap().is_err());
    }
}
