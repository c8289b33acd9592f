//! The backend value: one wgpu device and queue, its kernels, and the machinery every op
//! shares (buffer windows, uniforms, batched command recording, error capture).

use std::num::NonZeroU64;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use pipit_engine::backend::{DType, MemoryMeter};
use wgpu::util::DeviceExt;

use crate::buffer::WgpuBuffer;
use crate::device::{self, KernelProfile, Options};
use crate::kernels::{Kernel, Kernels};
use crate::timing::{self, Timestamps};

/// Ops recorded into one command encoder before it is submitted. Submitting in batches keeps
/// the per-submit cost low while letting the device start on earlier work before the host
/// has recorded everything.
const OPS_PER_SUBMIT: usize = 32;

/// Size of every uniform block: the largest kernel parameter struct, rounded up to 16 bytes.
const UNIFORM_BYTES: usize = 64;

/// pipit's wgpu backend: one device and queue (one pipeline rank).
///
/// Ops are recorded into a command encoder and submitted in batches; only
/// [`pipit_engine::Backend::download`] and [`pipit_engine::Backend::synchronize`] wait for
/// the device.
pub struct WgpuBackend {
    pub(crate) device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    pub(crate) kernels: Kernels,
    /// Invocations per row the profile prefers for row kernels.
    pub(crate) lanes: u32,
    pending: Mutex<Pending>,
    pub(crate) memory: Arc<MemoryMeter>,
    errors: Arc<Mutex<Option<String>>>,
    /// Bound where a kernel declares a buffer that an op has nothing for (an empty window).
    placeholder: wgpu::Buffer,
    /// Largest element count a window may span (binding limit minus alignment slack).
    pub(crate) max_binding_elems: usize,
    /// Storage binding offsets must be multiples of this many bytes.
    align: u64,
    /// Workgroups per grid dimension.
    pub(crate) max_groups: u32,
    max_buffer_bytes: u64,
    /// Timestamp queries for marks, where the adapter writes them inside command encoders.
    pub(crate) timestamps: Option<Mutex<Timestamps>>,
}

#[derive(Default)]
struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    ops: usize,
}

/// A window of a buffer to bind: `size` bytes from the aligned byte `offset`; the wanted
/// first element sits `base` elements into the window.
pub(crate) struct View<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
    /// Element offset of the window's first wanted element, passed to the kernel.
    pub base: u32,
}

impl WgpuBackend {
    /// Open the adapter wgpu users expect (see [`crate::device`]) with default options.
    pub fn new() -> Result<Self> {
        Self::with_options(&Options::default())
    }

    /// Open the preferred adapter with `options`.
    pub fn with_options(options: &Options) -> Result<Self> {
        let adapter = Self::pick()?;
        Self::on_adapter(&adapter, options)
    }

    /// One backend per pipeline rank: `ranks` devices (each with its own queue) on the one
    /// preferred adapter.
    pub fn for_ranks(ranks: usize, options: &Options) -> Result<Vec<Self>> {
        let adapter = Self::pick()?;
        (0..ranks)
            .map(|r| {
                Self::on_adapter(&adapter, options).with_context(|| format!("opening rank {r}"))
            })
            .collect()
    }

    fn pick() -> Result<wgpu::Adapter> {
        let filter = std::env::var("WGPU_ADAPTER_NAME").ok();
        device::choose_adapter(device::adapters(), filter.as_deref())
    }

    /// Open a new device on `adapter`, asking for the adapter's own limits.
    pub fn on_adapter(adapter: &wgpu::Adapter, options: &Options) -> Result<Self> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let timed = adapter.features().contains(timing::features())
            && std::env::var_os("PIPIT_WGPU_HOST_TIMING").is_none();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("pipit"),
            required_limits: limits.clone(),
            required_features: if timed {
                timing::features()
            } else {
                wgpu::Features::empty()
            },
            ..Default::default()
        }))
        .with_context(|| format!("opening a device on {}", device::describe(&info)))?;

        let errors: Arc<Mutex<Option<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| e.to_string());
        }));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, message| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert_with(|| format!("device lost ({reason:?}): {message}"));
            }
        });

        let align = u64::from(limits.min_storage_buffer_offset_alignment);
        let mut binding = limits.max_storage_buffer_binding_size;
        if let Some(cap) = options.max_binding_bytes {
            binding = binding.min(cap);
        }
        if binding < 2 * align {
            bail!(
                "storage binding limit of {binding} bytes is below twice the offset alignment ({align})"
            );
        }
        let placeholder = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("placeholder"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let profile = options
            .profile
            .unwrap_or_else(|| KernelProfile::for_device(info.device_type));
        log::info!("{} ({profile:?} kernels)", device::describe(&info));
        Ok(Self {
            device,
            info,
            kernels: Kernels::default(),
            lanes: profile.lanes_per_row(),
            pending: Mutex::default(),
            memory: Arc::default(),
            errors,
            placeholder,
            max_binding_elems: ((binding - align) / 4) as usize,
            align,
            max_groups: limits.max_compute_workgroups_per_dimension,
            max_buffer_bytes: limits.max_buffer_size,
            timestamps: timed.then(|| Timestamps::new(&queue)),
            queue,
        })
    }

    /// The chosen adapter.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// `wgpu: <adapter> (<backend>, <type>)`.
    pub(crate) fn description(&self) -> String {
        device::describe(&self.info)
    }

    /// The first device error since the last check, as this call's error.
    pub(crate) fn check(&self) -> Result<()> {
        let err = self.errors.lock().unwrap_or_else(|p| p.into_inner()).take();
        match err {
            Some(e) => Err(anyhow!("wgpu device error: {e}")),
            None => Ok(()),
        }
    }

    /// A new device buffer of `len` elements: zero-filled, or holding `init`.
    pub(crate) fn create(
        &self,
        len: usize,
        dtype: DType,
        init: Option<&[u8]>,
    ) -> Result<WgpuBuffer> {
        let bytes = (len as u64)
            .checked_mul(dtype.size() as u64)
            .context("buffer size overflows")?;
        if bytes > self.max_buffer_bytes {
            bail!(
                "buffer of {len} elements ({bytes} bytes) exceeds the device's maximum buffer size of {} bytes",
                self.max_buffer_bytes
            );
        }
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        // wgpu cannot bind an empty buffer; a zero-length buffer still gets one element.
        let buffer = match init {
            Some(data) if !data.is_empty() => {
                self.device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: None,
                        contents: data,
                        usage,
                    })
            }
            _ => self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes.max(4),
                usage,
                mapped_at_creation: false,
            }),
        };
        if let Some(err) = pollster::block_on(scope.pop()) {
            bail!("allocating {bytes} bytes: {err}");
        }
        self.check()?;
        Ok(WgpuBuffer::new(buffer, len, dtype, self.memory.clone()))
    }

    /// Elements `range` of `buf` as a binding window.
    pub(crate) fn view<'a>(&'a self, buf: &'a WgpuBuffer, range: Range<usize>) -> View<'a> {
        if range.is_empty() {
            return View {
                buffer: &self.placeholder,
                offset: 0,
                size: 16,
                base: 0,
            };
        }
        let elem = buf.dtype.size() as u64;
        let start = range.start as u64 * elem;
        let offset = start / self.align * self.align;
        View {
            buffer: &buf.buffer,
            offset,
            size: range.end as u64 * elem - offset,
            base: ((start - offset) / elem) as u32,
        }
    }

    /// A grid of at least `groups` workgroups within the per-dimension limit; kernels rebuild
    /// the flat index and skip the surplus.
    pub(crate) fn grid(&self, groups: usize) -> Result<(u32, u32)> {
        let max = self.max_groups as usize;
        if groups <= max {
            return Ok((groups as u32, 1));
        }
        let y = groups.div_ceil(max);
        if y > max {
            bail!("{groups} workgroups exceed the device's dispatch limit");
        }
        Ok((max as u32, y as u32))
    }

    /// Record one dispatch of `kernel` with the uniform `params` at binding 0 and `bindings`.
    pub(crate) fn dispatch(
        &self,
        kernel: Kernel,
        params: &[u32],
        bindings: &[(u32, &View<'_>)],
        grid: (u32, u32),
    ) -> Result<()> {
        self.dispatch_rows(kernel, 0, params, bindings, grid)
    }

    /// [`Self::dispatch`] for a row kernel with `lanes` invocations per row.
    pub(crate) fn dispatch_rows(
        &self,
        kernel: Kernel,
        lanes: u32,
        params: &[u32],
        bindings: &[(u32, &View<'_>)],
        grid: (u32, u32),
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        let pipeline = self.kernels.get(&self.device, kernel, lanes)?;
        let mut bytes: Vec<u8> = bytemuck::cast_slice(params).to_vec();
        // At least as large as every kernel's parameter struct; unused words stay zero.
        bytes.resize(bytes.len().next_multiple_of(16).max(UNIFORM_BYTES), 0);
        let uniform = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(kernel.entry()),
                contents: &bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries = Vec::with_capacity(bindings.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        });
        for (slot, v) in bindings {
            entries.push(wgpu::BindGroupEntry {
                binding: *slot,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: v.buffer,
                    offset: v.offset,
                    size: NonZeroU64::new(v.size),
                }),
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry()),
            layout: &pipeline.layout,
            entries: &entries,
        });
        self.record(|enc| {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel.entry()),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(grid.0, grid.1, 1);
        })
    }

    /// Record commands into the pending encoder, submitting it every few ops.
    pub(crate) fn record(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        f(encoder);
        pending.ops += 1;
        if pending.ops >= OPS_PER_SUBMIT {
            self.submit(&mut pending);
        }
        drop(pending);
        self.check()
    }

    fn submit(&self, pending: &mut Pending) {
        if let Some(encoder) = pending.encoder.take() {
            self.queue.submit([encoder.finish()]);
        }
        pending.ops = 0;
    }

    /// Submit everything recorded so far.
    pub(crate) fn flush(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        self.submit(&mut pending);
    }

    /// Submit and wait until the device has finished all of it.
    pub(crate) fn wait(&self) -> Result<()> {
        self.flush();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .context("waiting for the device")?;
        self.check()
    }

    /// The contents of `buf` after all recorded work, as 32-bit words.
    pub(crate) fn read_words(&self, buf: &WgpuBuffer) -> Result<Vec<f32>> {
        let mut out = vec![0f32; buf.len];
        if out.is_empty() {
            return Ok(out);
        }
        let size = (buf.len * buf.dtype.size()) as u64;
        let data = self.read_bytes(&buf.buffer, size)?;
        bytemuck::cast_slice_mut::<f32, u8>(&mut out).copy_from_slice(&data);
        Ok(out)
    }

    /// The first `size` bytes of `buffer` (a `COPY_SRC` buffer) after all recorded work.
    pub(crate) fn read_bytes(&self, buffer: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("download"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.record(|enc| enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, size))?;
        // The copy must be submitted before the staging buffer is marked for mapping.
        self.flush();
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            // The receiver waits below and outlives the device poll that runs this.
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .context("the device dropped a buffer mapping")?
            .context("mapping a download buffer")?;
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| anyhow!("reading a mapped buffer: {e:?}"))?
            .to_vec();
        staging.unmap();
        Ok(data)
    }
}
