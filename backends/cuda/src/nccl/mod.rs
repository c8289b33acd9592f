//! Tensors between CUDA ranks through NCCL: [`NcclSetup`] opens a communicator once the ranks
//! have met, [`NcclTransport`] moves f32 device buffers without host staging.
//!
//! Transfers run on a stream of their own, so compute on the backend's stream goes on while a
//! transfer waits for its peer. A send first copies the tensor on the compute stream, which the
//! transfer stream then waits for (an event), so the caller may drop or overwrite it at once;
//! a receive makes the compute stream wait (an event, on the GPU) for its data. Each message is
//! a length header and the payload in one NCCL group, so a receiver that expected another
//! length finds out instead of reading a truncated tensor.
//!
//! NCCL waits happen on the GPU, beyond any host timeout: a [`Watchdog`] aborts the
//! communicator when a transfer makes no progress for the peer timeout, or when the TCP mesh
//! reports a peer gone, and the next call says which peer and what this rank was waiting for.

mod comm;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;
use pipit_engine::backend::{DType, Transport};
use pipit_engine::dist::{PeerProbe, TensorSetup, TensorTransport};
use pipit_engine::exec::check_len;

use self::comm::{
    abort_for_watchdog, init_comm, lock, nccl_error, recv_raw, send_raw, unique_id, Comm,
};
use crate::buffer::{CudaBuffer, Data};
use crate::context::CudaBackend;
use crate::probe::guarded;
use crate::watchdog::{Check, Completion, OnFailure, Watchdog};

pub use self::comm::nccl_probe;

/// Opens [`NcclTransport`]s: rank 0 makes NCCL's unique id, which the rendezvous hands to
/// every rank.
#[derive(Clone, Copy, Debug, Default)]
pub struct NcclSetup;

impl TensorSetup<CudaBackend> for NcclSetup {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn prepare(&self, leader: bool) -> Result<Vec<u8>> {
        nccl_probe()?;
        if !leader {
            return Ok(Vec::new());
        }
        let id = guarded("creating NCCL's unique id", nccl::get_uniqueid)?
            .map_err(|e| nccl_error(e).context("creating NCCL's unique id"))?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    fn open(
        &self,
        backend: &CudaBackend,
        rank: usize,
        world: usize,
        blob: &[u8],
        timeout: Duration,
        peers: PeerProbe,
    ) -> Result<Box<dyn TensorTransport<CudaBackend>>> {
        Ok(Box::new(NcclTransport::open(
            backend, rank, world, blob, timeout, peers,
        )?))
    }
}

/// A message a rank sent itself: the received buffer and the event of its transfer.
struct ToSelf {
    buf: CudaBuffer,
    done: Arc<CudaEvent>,
}

/// One issued transfer, as the watchdog follows it.
struct InFlight {
    /// Recorded on the transfer stream after the transfer.
    done: Arc<CudaEvent>,
    /// Buffers the transfer reads or writes, freed once it has completed.
    _keep: (Option<CudaBuffer>, Vec<Header>),
    /// For a receive: the header that arrives, the length expected, and the sender.
    expect: Option<(Header, usize, usize)>,
}

impl Completion for InFlight {
    fn poll(&self) -> std::result::Result<bool, String> {
        let ctx = self.done.context();
        ctx.bind_to_thread()
            .map_err(|e| format!("CUDA failed: {e}"))?;
        if !self
            .done
            .try_is_complete()
            .map_err(|e| format!("CUDA failed: {e}"))?
        {
            return Ok(false);
        }
        if let Some((header, want, from)) = &self.expect {
            let mut words = [0u32; HEADER_WORDS];
            let (ptr, _read) = header.device_ptr(header.stream());
            // SAFETY: the transfer that wrote the header has completed and `header` is alive;
            // two words into a two-word array.
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut words, ptr) }
                .map_err(|e| format!("CUDA failed reading a message header: {e}"))?;
            let got = u64::from(words[0]) | (u64::from(words[1]) << 32);
            if got != *want as u64 {
                return Err(format!(
                    "rank {from} sent {got} values where {want} were expected (the ranks are out of step)"
                ));
            }
        }
        Ok(true)
    }
}

/// One rank's end of an NCCL communicator: implements [`Transport`] for [`CudaBackend`] (f32
/// buffers, device to device) and [`TensorTransport`] (flush, abort). See the module
/// documentation for the streams, events and the watchdog.
pub struct NcclTransport {
    rank: usize,
    world: usize,
    ordinal: usize,
    /// The transfer stream, on the backend's device.
    stream: Arc<CudaStream>,
    comm: Arc<Mutex<Comm>>,
    watchdog: Watchdog<InFlight>,
    to_self: VecDeque<ToSelf>,
}

impl NcclTransport {
    /// Open `rank`'s end among `world` ranks on `backend`'s device, from the NCCL unique id
    /// rank 0 made ([`TensorSetup::prepare`] of [`NcclSetup`]). Waits at most `timeout` for
    /// the other ranks, and stops early when `peers` reports a failure; afterwards a transfer
    /// may wait `timeout` for its peer before the communicator is aborted.
    pub fn open(
        backend: &CudaBackend,
        rank: usize,
        world: usize,
        id: &[u8],
        timeout: Duration,
        peers: PeerProbe,
    ) -> Result<Self> {
        nccl_probe()?;
        if rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }
        let id = unique_id(id)?;
        let ctx = &backend.ctx;
        let stream = ctx
            .new_stream()
            .context("creating the NCCL transfer stream")?;
        if !ctx.is_managing_stream_synchronization() {
            // cudarc's per-buffer events keep a buffer alive until the other stream is done
            // with it; without them a freed buffer could be reused under a transfer.
            bail!("the CUDA context does not track buffer use across streams, which NCCL transfers rely on");
        }
        let comm = Arc::new(Mutex::new(init_comm(
            backend, rank, world, id, timeout, &peers,
        )?));
        let c = Arc::clone(&comm);
        let check: Check = Box::new(move || {
            peers().or_else(|| match c.try_lock() {
                Ok(comm) => comm.async_error(),
                Err(_) => None,
            })
        });
        let c = Arc::clone(&comm);
        let on_failure: OnFailure = Box::new(move |why| abort_for_watchdog(&c, why));
        let watchdog = Watchdog::start(rank, timeout, check, on_failure)?;
        log::info!("rank {rank}: NCCL communicator of {world} ranks open");
        Ok(Self {
            rank,
            world,
            ordinal: ctx.ordinal(),
            stream,
            comm,
            watchdog,
            to_self: VecDeque::new(),
        })
    }

    /// Errors unless `peer` is a rank of the run and `backend` is on this transport's device.
    fn check(&self, backend: &CudaBackend, peer: usize) -> Result<()> {
        if peer >= self.world {
            bail!(
                "rank {} has no peer {peer}: the run has {} ranks",
                self.rank,
                self.world
            );
        }
        if backend.ctx.ordinal() != self.ordinal {
            bail!(
                "a backend on CUDA device {} used with an NCCL transport on device {}",
                backend.ctx.ordinal(),
                self.ordinal
            );
        }
        self.watchdog.check()
    }

    /// Enqueue `ops` on the transfer stream as one NCCL group. A failure aborts the
    /// communicator and is recorded, so every later call reports it too.
    fn group(
        &self,
        what: &str,
        ops: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<(), NcclError>,
    ) -> Result<()> {
        let mut comm = lock(&self.comm);
        if !comm.live {
            self.watchdog.check()?;
            bail!("rank {}: the NCCL communicator was aborted", self.rank);
        }
        let (raw, stream) = (comm.raw, self.stream.cu_stream() as sys::cudaStream_t);
        let issued = guarded(what, || {
            nccl::group_start()?;
            let queued = ops(raw, stream);
            // The group must be closed even when an operation in it failed.
            let closed = nccl::group_end();
            queued.and(closed).map(drop)
        })
        .and_then(|r| r.map_err(nccl_error));
        if let Err(e) = issued {
            let line = format!("rank {}: {e:#} while {what}", self.rank);
            comm.abort();
            drop(comm);
            self.watchdog.fail(line.clone());
            bail!(line);
        }
        Ok(())
    }
}

const F32: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
const U32: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint32;

/// A message header on the device: the payload's length as two 32-bit words, low first.
type Header = CudaSlice<u32>;
/// Words of a [`Header`].
const HEADER_WORDS: usize = 2;

/// A header holding `len`, written by the transfer stream itself: copying from host memory
/// could make the host wait for that stream, which may be waiting for a peer.
fn header_of(stream: &Arc<CudaStream>, len: usize) -> Result<Header> {
    // SAFETY: both words are written below, before the send that reads them.
    let mut header =
        unsafe { stream.alloc::<u32>(HEADER_WORDS) }.context("allocating a message header")?;
    {
        let (ptr, _write) = header.device_ptr_mut(stream);
        let words = [len as u32, (len as u64 >> 32) as u32];
        for (i, word) in words.into_iter().enumerate() {
            // SAFETY: `ptr` holds HEADER_WORDS words, and `i` is below that.
            unsafe {
                cudarc::driver::sys::cuMemsetD32Async(
                    ptr + 4 * i as u64,
                    word,
                    1,
                    stream.cu_stream(),
                )
            }
            .result()
            .context("writing a message header")?;
        }
    }
    Ok(header)
}

impl Transport<CudaBackend> for NcclTransport {
    fn send(&mut self, backend: &CudaBackend, to: usize, buf: &CudaBuffer) -> Result<()> {
        self.check(backend, to)?;
        let me = self.rank;
        let len = buf.len();
        let what = format!("sending {len} values to rank {to}");
        let src = buf.f32("the tensor to send")?;
        let stream = &self.stream;
        // To itself, NCCL needs the matching receive in the same group.
        let mut landing = if to == me {
            Some((
                backend.zeroed(len, DType::F32)?,
                stream.alloc_zeros::<u32>(HEADER_WORDS)?,
            ))
        } else {
            None
        };
        // Copy on the compute stream, in order with every other use of `buf`: the caller may
        // drop or overwrite it at once, however long the peer takes. A copy on the transfer
        // stream would not be: cudarc keeps one read event per buffer, so a later read on the
        // compute stream replaces it, and an overwrite after that one would not wait for the
        // copy.
        // SAFETY: the copy below writes every element before anything reads one.
        let mut staged = unsafe { backend.stream.alloc::<f32>(src.len()) }
            .with_context(|| format!("allocating {len} f32 elements to send"))?;
        backend
            .stream
            .memcpy_dtod(src, &mut staged)
            .context("copying a tensor to send")?;
        let staged = CudaBuffer::new(Data::F32(staged), len, &backend.meter);
        // The transfer starts once the compute stream has staged the tensor.
        stream
            .join(&backend.stream)
            .context("ordering a send after compute")?;
        let header = header_of(stream, len)?;
        {
            // The guards record, once the group is enqueued, that the transfer stream uses
            // these buffers, so none is freed before the transfer has ended.
            let (h, _h) = header.device_ptr(stream);
            let (p, _p) = staged.f32("the staged tensor")?.device_ptr(stream);
            let mut back = None;
            let _landing_guards;
            if let Some((out, out_header)) = &mut landing {
                let (oh, oh_guard) = out_header.device_ptr_mut(stream);
                let (o, o_guard) = out.f32_mut("the received tensor")?.device_ptr_mut(stream);
                back = Some((oh, o));
                _landing_guards = (oh_guard, o_guard);
            }
            // SAFETY: the staged tensor and the header stay alive in the watchdog's entry, the
            // landing buffers in the message queue, until the transfer has ended.
            self.group(&what, |comm, raw_stream| unsafe {
                send_raw(h, HEADER_WORDS, U32, to, comm, raw_stream)?;
                if len > 0 {
                    send_raw(p, len, F32, to, comm, raw_stream)?;
                }
                if let Some((oh, o)) = back {
                    recv_raw(oh, HEADER_WORDS, U32, me, comm, raw_stream)?;
                    if len > 0 {
                        recv_raw(o, len, F32, me, comm, raw_stream)?;
                    }
                }
                Ok(())
            })?;
        }
        let done = Arc::new(
            stream
                .record_event(None)
                .context("recording a send's event")?,
        );
        let mut headers = vec![header];
        if let Some((buf, out_header)) = landing {
            headers.push(out_header);
            self.to_self.push_back(ToSelf {
                buf,
                done: Arc::clone(&done),
            });
        }
        let item = InFlight {
            done,
            _keep: (Some(staged), headers),
            expect: None,
        };
        self.watchdog.track(item, to, what);
        Ok(())
    }

    fn recv(&mut self, backend: &CudaBackend, from: usize, len: usize) -> Result<CudaBuffer> {
        self.check(backend, from)?;
        let me = self.rank;
        if from == me {
            let m = self.to_self.pop_front().ok_or_else(|| {
                anyhow!("rank {me} waited for a tensor from itself, but sent itself nothing")
            })?;
            check_len(me, from, len, m.buf.len())?;
            backend
                .stream
                .wait(&m.done)
                .context("ordering compute after a transfer")?;
            return Ok(m.buf);
        }
        let what = format!("receiving {len} values from rank {from}");
        let mut out = backend.zeroed(len, DType::F32)?;
        let stream = &self.stream;
        let mut header = stream
            .alloc_zeros::<u32>(HEADER_WORDS)
            .context("allocating a message header")?;
        // The receive may land once its buffer exists on the compute stream.
        stream
            .join(&backend.stream)
            .context("ordering a receive after compute")?;
        {
            let (h, _h) = header.device_ptr_mut(stream);
            let (o, _o) = out.f32_mut("the received tensor")?.device_ptr_mut(stream);
            // SAFETY: `header` lives in the watchdog's entry and `out` is returned to the
            // caller; the guards' events keep either from being freed before the transfer ends.
            self.group(&what, |comm, raw_stream| unsafe {
                recv_raw(h, HEADER_WORDS, U32, from, comm, raw_stream)?;
                if len > 0 {
                    recv_raw(o, len, F32, from, comm, raw_stream)?;
                }
                Ok(())
            })?;
        }
        let done = Arc::new(
            stream
                .record_event(None)
                .context("recording a receive's event")?,
        );
        // The compute stream waits for the data on the GPU; the host goes on.
        backend
            .stream
            .wait(&done)
            .context("ordering compute after a receive")?;
        let item = InFlight {
            done,
            _keep: (None, Vec::new()),
            expect: Some((header, len, from)),
        };
        self.watchdog.track(item, from, what);
        Ok(out)
    }
}

impl TensorTransport<CudaBackend> for NcclTransport {
    fn flush(&mut self) -> Result<()> {
        self.watchdog.flush()
    }

    fn abort(&mut self) {
        self.watchdog
            .fail(format!("rank {} stopped its NCCL transfers", self.rank));
        lock(&self.comm).abort();
    }
}

impl Drop for NcclTransport {
    fn drop(&mut self) {
        // After a flush nothing is in flight; otherwise the abort ends what still waits.
        lock(&self.comm).abort();
    }
}
