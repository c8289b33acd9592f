//! A client of PyTorch's `TCPStore`, the key-value store torchrun's agent serves on
//! `MASTER_ADDR:MASTER_PORT` for its workers: what a rank started by torchrun meets the others
//! through, instead of serving pipit's own store on a port torchrun already holds.
//!
//! Wire format (c10d's, little-endian): every request starts with a one-byte query type;
//! strings and values travel as a `u64` length and the bytes. A connection opens with
//! `VALIDATE` and a `u32` magic number (no answer), then `PING` with a `u32` nonce that comes
//! back. `SET key value` has no answer; `CHECK n keys...` answers one byte (0: all present);
//! `GET key` answers the value. pipit waits for keys by polling `CHECK`, so a missing rank is
//! noticed at pipit's own deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The query types pipit sends (c10d's `QueryType`).
#[repr(u8)]
#[derive(Clone, Copy)]
enum Query {
    Validate = 0,
    Set = 1,
    Get = 3,
    Check = 5,
    Ping = 13,
}

/// c10d's validation magic number.
const MAGIC: u32 = 0x3C85_F7CE;
/// `CHECK`'s answer when every key is present.
const READY: u8 = 0;
/// The longest value pipit reads back (a roster of addresses and the run's settings).
const MAX_VALUE: u64 = 16 << 20;
/// Pause between polls of a key not yet set, and between connection attempts.
const POLL: Duration = Duration::from_millis(20);

/// One connection to a TCPStore.
pub struct TcpStoreClient {
    stream: TcpStream,
    addr: SocketAddr,
}

impl TcpStoreClient {
    /// Connect to the store at `addr`, retrying until `deadline` (the agent may still be
    /// starting it), and check that it answers as a TCPStore.
    pub fn connect(addr: SocketAddr, deadline: Instant) -> Result<Self> {
        let stream = loop {
            match TcpStream::connect_timeout(&addr, POLL.max(Duration::from_millis(200))) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    bail!("could not reach torchrun's store at {addr}: {e}")
                }
                Err(_) => thread::sleep(POLL),
            }
        };
        stream.set_nodelay(true)?;
        let mut client = TcpStoreClient { stream, addr };
        client.set_timeout(deadline)?;
        let mut hello = vec![Query::Validate as u8];
        hello.extend(MAGIC.to_le_bytes());
        let nonce = std::process::id();
        hello.push(Query::Ping as u8);
        hello.extend(nonce.to_le_bytes());
        client.send(&hello)?;
        let mut back = [0u8; 4];
        client.read(&mut back, "the ping")?;
        if u32::from_le_bytes(back) != nonce {
            bail!("{addr} does not answer as torchrun's TCPStore (its ping came back wrong)");
        }
        Ok(client)
    }

    /// This end's address: the interface that reaches the store.
    pub fn local_ip(&self) -> Result<std::net::IpAddr> {
        Ok(self.stream.local_addr()?.ip())
    }

    fn set_timeout(&mut self, deadline: Instant) -> Result<()> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        self.stream.set_read_timeout(Some(left))?;
        self.stream.set_write_timeout(Some(left))?;
        Ok(())
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream
            .write_all(bytes)
            .with_context(|| format!("writing to torchrun's store at {}", self.addr))
    }

    fn read(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.stream
            .read_exact(buf)
            .with_context(|| format!("reading {what} from torchrun's store at {}", self.addr))
    }

    /// Set `key` to `value`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let mut msg = vec![Query::Set as u8];
        put(&mut msg, key.as_bytes());
        put(&mut msg, value);
        self.send(&msg)
    }

    /// Whether every one of `keys` is set.
    pub fn check(&mut self, keys: &[String]) -> Result<bool> {
        let mut msg = vec![Query::Check as u8];
        msg.extend((keys.len() as u64).to_le_bytes());
        for key in keys {
            put(&mut msg, key.as_bytes());
        }
        self.send(&msg)?;
        let mut answer = [0u8; 1];
        self.read(&mut answer, "a check")?;
        Ok(answer[0] == READY)
    }

    /// Wait until every one of `keys` is set; past `deadline`, an error naming the first
    /// missing ones.
    pub fn wait(&mut self, keys: &[String], deadline: Instant) -> Result<()> {
        while !self.check(keys)? {
            if Instant::now() >= deadline {
                let mut missing = Vec::new();
                for key in keys {
                    if !self.check(std::slice::from_ref(key))? {
                        missing.push(key.as_str());
                    }
                }
                return Err(anyhow!("still unset: {}", missing.join(", ")));
            }
            thread::sleep(POLL);
        }
        Ok(())
    }

    /// The value of `key`, which must be set ([`TcpStoreClient::wait`] first).
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        let mut msg = vec![Query::Get as u8];
        put(&mut msg, key.as_bytes());
        self.send(&msg)?;
        let mut len = [0u8; 8];
        self.read(&mut len, "a value's length")?;
        let len = u64::from_le_bytes(len);
        if len > MAX_VALUE {
            bail!("torchrun's store holds {len} bytes under {key}, more than the {MAX_VALUE} pipit reads");
        }
        let mut value = vec![0u8; len as usize];
        self.read(&mut value, key)?;
        Ok(value)
    }
}

/// Append `bytes` as c10d does: a `u64` length, then the bytes.
fn put(msg: &mut Vec<u8>, bytes: &[u8]) {
    msg.extend((bytes.len() as u64).to_le_bytes());
    msg.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::TcpListener;

    /// A store that speaks the subset above, the way c10d's does, for one client.
    fn fake_store() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut map: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
            let mut byte = [0u8; 1];
            let read_u32 = |s: &mut TcpStream| {
                let mut b = [0u8; 4];
                s.read_exact(&mut b).map(|_| u32::from_le_bytes(b))
            };
            let read_bytes = |s: &mut TcpStream| -> std::io::Result<Vec<u8>> {
                let mut n = [0u8; 8];
                s.read_exact(&mut n)?;
                let mut v = vec![0u8; u64::from_le_bytes(n) as usize];
                s.read_exact(&mut v)?;
                Ok(v)
            };
            while s.read_exact(&mut byte).is_ok() {
                match byte[0] {
                    0 => assert_eq!(read_u32(&mut s).unwrap(), MAGIC),
                    13 => {
                        let n = read_u32(&mut s).unwrap();
                        s.write_all(&n.to_le_bytes()).unwrap();
                    }
                    1 => {
                        let k = read_bytes(&mut s).unwrap();
                        let v = read_bytes(&mut s).unwrap();
                        map.insert(k, v);
                    }
                    3 => {
                        let v = map[&read_bytes(&mut s).unwrap()].clone();
                        s.write_all(&(v.len() as u64).to_le_bytes()).unwrap();
                        s.write_all(&v).unwrap();
                    }
                    5 => {
                        let mut n = [0u8; 8];
                        s.read_exact(&mut n).unwrap();
                        // Every key is read off the stream before any is looked up.
                        let keys: Vec<Vec<u8>> = (0..u64::from_le_bytes(n))
                            .map(|_| read_bytes(&mut s).unwrap())
                            .collect();
                        let all = keys.iter().all(|k| map.contains_key(k));
                        s.write_all(&[if all { 0 } else { 1 }]).unwrap();
                    }
                    other => panic!("query {other}"),
                }
            }
        });
        addr
    }

    #[test]
    fn sets_checks_waits_and_gets() {
        let addr = fake_store();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut c = TcpStoreClient::connect(addr, deadline).unwrap();
        let keys = vec!["a".to_string(), "b".to_string()];
        assert!(!c.check(&keys).unwrap());
        c.set("a", b"1").unwrap();
        c.set("b", b"twenty").unwrap();
        c.wait(&keys, deadline).unwrap();
        assert_eq!(c.get("b").unwrap(), b"twenty");
        let soon = Instant::now() + Duration::from_millis(60);
        let err = c
            .wait(&["c".to_string(), "a".to_string()], soon)
            .unwrap_err();
        assert_eq!(err.to_string(), "still unset: c");
    }
}
