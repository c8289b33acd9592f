//! Timing a wgpu backend's work without waiting for it: device timestamps written between
//! ops where the adapter can write them inside command encoders (Vulkan, Metal and DX12 GPUs,
//! and lavapipe, usually can), else the host clock once the queue is idle.
//!
//! Marks are read back in one go, the first time two of them are compared; that closes their
//! *generation*, and the next mark starts a new one, reusing the query slots. A training step
//! makes its marks and reads them once it has synchronized, so each step is one generation.

use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Result};
use pipit_engine::backend::host_elapsed_ms;

use crate::WgpuBackend;

/// Query slots per query set (wgpu's most).
const PER_SET: u32 = wgpu::QUERY_SET_MAX_QUERIES;

/// A point in a wgpu backend's stream of work ([`pipit_engine::Backend::mark`]).
#[derive(Clone, Copy, Debug)]
pub enum WgpuMark {
    /// Timestamp query `index` of timing generation `generation`.
    Device { generation: u64, index: u32 },
    /// The host clock, read after the queue went idle.
    Host(Instant),
}

/// The features device timestamps need.
pub(crate) fn features() -> wgpu::Features {
    wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
}

/// The timestamp queries of one backend.
pub(crate) struct Timestamps {
    sets: Vec<wgpu::QuerySet>,
    /// Marks made in this generation.
    next: u32,
    generation: u64,
    /// Ticks of marks `0..next`, once read back (which closes the generation).
    ticks: Option<Vec<u64>>,
    /// Nanoseconds per tick.
    period_ns: f64,
}

impl Timestamps {
    /// Timestamps on a device opened with [`features`].
    pub(crate) fn new(queue: &wgpu::Queue) -> Mutex<Self> {
        Mutex::new(Timestamps {
            sets: Vec::new(),
            next: 0,
            generation: 0,
            ticks: None,
            period_ns: f64::from(queue.get_timestamp_period()),
        })
    }
}

impl WgpuBackend {
    /// A mark after all work recorded so far: a timestamp written into the command stream and
    /// submitted with it, or (without timestamp support) the host clock once the queue is
    /// idle.
    pub(crate) fn timing_mark(&self) -> Result<WgpuMark> {
        let Some(timestamps) = &self.timestamps else {
            self.wait()?;
            return Ok(WgpuMark::Host(Instant::now()));
        };
        let mut ts = timestamps.lock().unwrap_or_else(|p| p.into_inner());
        if ts.ticks.is_some() {
            ts.generation += 1;
            ts.next = 0;
            ts.ticks = None;
        }
        let index = ts.next;
        let (set, slot) = ((index / PER_SET) as usize, index % PER_SET);
        if set == ts.sets.len() {
            let query_set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("marks"),
                ty: wgpu::QueryType::Timestamp,
                count: PER_SET,
            });
            ts.sets.push(query_set);
        }
        self.record(|enc| enc.write_timestamp(&ts.sets[set], slot))?;
        // Submit what came before, without waiting: an action that blocks on the host next (a
        // receive) must not leave the device idle with work recorded, nor have the wait
        // counted inside the action before it.
        self.flush();
        ts.next += 1;
        Ok(WgpuMark::Device {
            generation: ts.generation,
            index,
        })
    }

    /// Milliseconds from `start` to `end`; reads the generation's timestamps back (waiting
    /// for the device) the first time.
    pub(crate) fn timing_elapsed_ms(&self, start: &WgpuMark, end: &WgpuMark) -> Result<f64> {
        let (a, b, generation) = match (start, end) {
            (WgpuMark::Host(a), WgpuMark::Host(b)) => return Ok(host_elapsed_ms(a, b)),
            (
                WgpuMark::Device {
                    generation: ga,
                    index: a,
                },
                WgpuMark::Device {
                    generation: gb,
                    index: b,
                },
            ) if ga == gb => (*a, *b, *ga),
            (WgpuMark::Device { .. }, WgpuMark::Device { .. }) => {
                bail!("two marks of different timing generations cannot be compared")
            }
            _ => bail!("a host-clock mark cannot be compared with a device timestamp"),
        };
        let Some(timestamps) = &self.timestamps else {
            bail!("a device timing mark on a backend without timestamps");
        };
        let mut ts = timestamps.lock().unwrap_or_else(|p| p.into_inner());
        if generation != ts.generation {
            bail!("a timing mark outlived its generation: compare marks before making newer ones");
        }
        if ts.ticks.is_none() {
            let ticks = self.read_timestamps(&ts)?;
            ts.ticks = Some(ticks);
        }
        let ticks = ts.ticks.as_deref().unwrap_or_default();
        let (t0, t1) = (ticks[a as usize], ticks[b as usize]);
        Ok(t1.saturating_sub(t0) as f64 * ts.period_ns / 1e6)
    }

    /// Every timestamp of the open generation, in mark order.
    fn read_timestamps(&self, ts: &Timestamps) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(ts.next as usize);
        for (k, set) in ts.sets.iter().enumerate() {
            let used = ts.next.saturating_sub(k as u32 * PER_SET).min(PER_SET);
            if used == 0 {
                break;
            }
            let bytes = u64::from(used) * u64::from(wgpu::QUERY_SIZE);
            let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("marks resolved"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            self.record(|enc| enc.resolve_query_set(set, 0..used, &resolved, 0))?;
            let data = self.read_bytes(&resolved, bytes)?;
            out.extend(
                data.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
            );
        }
        Ok(out)
    }
}
