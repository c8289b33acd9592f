//! The backend value: a CUDA context, its own stream, a cuBLAS handle on that stream, the
//! kernels, and the launch shapes every op shares.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{result, sys, CudaContext, CudaStream, LaunchConfig};
use pipit_engine::backend::{DType, MemoryMeter};

use crate::buffer::{CudaBuffer, Data};
use crate::kernels::{Kernels, ROW_BLOCK};
use crate::probe::{guarded, probe};
use crate::profile::{Profile, Span};

/// Most blocks an elementwise kernel is launched with; its grid-stride loop covers the rest.
const MAX_ELEMENTWISE_BLOCKS: u64 = 1 << 20;

/// pipit's CUDA backend: one stream on one GPU (one pipeline rank).
///
/// Ops are enqueued on the stream in order and return without waiting; only
/// [`pipit_engine::Backend::download`] and [`pipit_engine::Backend::synchronize`] wait.
pub struct CudaBackend {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    pub(crate) kernels: Kernels,
    pub(crate) meter: Arc<MemoryMeter>,
    /// Whether bf16 attention may take the tensor-core kernels (`PIPIT_CUDA_ATTENTION`).
    pub(crate) flash_attention: bool,
    /// GPU time per op, when `PIPIT_CUDA_PROFILE=1` asks for it.
    profile: Option<Profile>,
    description: String,
}

impl CudaBackend {
    /// A backend with its own stream on GPU `device_ordinal`.
    ///
    /// Fails with one line when CUDA is not usable here (see [`crate::probe`]), when the
    /// device does not exist, or when the kernels do not compile for it.
    pub fn new(device_ordinal: usize) -> Result<Self> {
        let count = probe()?;
        if device_ordinal >= count {
            bail!("CUDA device {device_ordinal} does not exist: this machine has {count}");
        }
        // The libraries are there; a panic now would be a symbol missing from an older
        // library, which is still an error to report, not a crash.
        guarded("opening the CUDA backend", || Self::open(device_ordinal))?
    }

    fn open(ordinal: usize) -> Result<Self> {
        let ctx =
            CudaContext::new(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))?;
        let (major, minor) = ctx
            .compute_capability()
            .context("reading the device's compute capability")?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().context("reading the device name")?;
        let total = ctx.total_mem().context("reading the device memory size")?;
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        if let Err(e) = keep_pool_memory(&ctx) {
            log::warn!("device {ordinal}'s memory pool returns freed memory at every wait: {e:#}");
        }
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| anyhow!("creating a cuBLAS handle: {e:?}"))?;
        let flash_attention = crate::attention::flash_enabled()?;
        let kernels = Kernels::load(&ctx, &arch)?;
        let description = format!(
            "cuda: {name} ({arch}, {:.0} GiB, device {ordinal})",
            total as f64 / (1u64 << 30) as f64
        );
        log::info!("{description}");
        let profile = Profile::from_env(&description)?;
        Ok(Self {
            ctx,
            stream,
            blas,
            kernels,
            meter: Arc::default(),
            flash_attention,
            profile,
            description,
        })
    }

    /// Sum the profiled ops the stream has finished (after a synchronize), when profiling.
    pub(crate) fn collect_profile(&self) -> Result<()> {
        match &self.profile {
            Some(profile) => profile.collect(&self.ctx),
            None => Ok(()),
        }
    }

    /// Times the op being enqueued until the returned span drops, when profiling.
    pub(crate) fn span(&self, op: &'static str) -> Option<Span<'_>> {
        self.profile.as_ref().map(|p| p.span(&self.stream, op))
    }

    /// `cuda: <GPU name> (<architecture>, <memory>, device <ordinal>)`.
    pub(crate) fn description(&self) -> &str {
        &self.description
    }

    /// A zero-filled buffer of `len` elements, counted by this backend's meter.
    pub(crate) fn zeroed(&self, len: usize, dtype: DType) -> Result<CudaBuffer> {
        // CUDA cannot allocate zero bytes: an empty buffer keeps one unused element.
        let cells = len.max(1);
        let data = match dtype {
            DType::F32 => Data::F32(
                self.stream
                    .alloc_zeros::<f32>(cells)
                    .with_context(|| format!("allocating {len} f32 elements on the GPU"))?,
            ),
            DType::U32 => Data::U32 {
                device: self
                    .stream
                    .alloc_zeros::<u32>(cells)
                    .with_context(|| format!("allocating {len} u32 elements on the GPU"))?,
                host: vec![0u32; len].into(),
            },
            DType::BF16 => Data::BF16(
                self.stream
                    .alloc_zeros::<u16>(cells)
                    .with_context(|| format!("allocating {len} bf16 elements on the GPU"))?,
            ),
        };
        Ok(CudaBuffer::new(data, len, &self.meter))
    }

    /// A buffer of `len` elements with undefined contents, for a temporary an op overwrites
    /// whole before reading it (saves the memset of [`Self::zeroed`]: attention's scores
    /// alone are 4·B·NH·T² bytes).
    pub(crate) fn scratch(&self, len: usize, dtype: DType) -> Result<CudaBuffer> {
        let cells = len.max(1);
        let what = || format!("allocating {len} {dtype:?} elements on the GPU");
        // SAFETY: every caller overwrites all `len` elements (a kernel or a beta = 0 product)
        // before anything reads them.
        let data = unsafe {
            match dtype {
                DType::F32 => Data::F32(self.stream.alloc::<f32>(cells).with_context(what)?),
                DType::BF16 => Data::BF16(self.stream.alloc::<u16>(cells).with_context(what)?),
                DType::U32 => return self.zeroed(len, dtype),
            }
        };
        Ok(CudaBuffer::new(data, len, &self.meter))
    }

    /// The first error the CUDA context recorded on its own (from a free or a stream wait in
    /// a destructor), as this call's error.
    pub(crate) fn check(&self) -> Result<()> {
        self.ctx
            .check_err()
            .context("an earlier CUDA operation failed")
    }
}

/// Make the device's default memory pool (which the stream-ordered allocations come from) keep
/// freed memory for reuse instead of returning it to the driver whenever a stream waits, its
/// default: each step then reuses the last step's memory without asking the driver again.
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    ctx.bind_to_thread()
        .context("making the CUDA context current")?;
    let mut threshold = u64::MAX;
    // SAFETY: the device handle comes from a live context, and the release threshold is a
    // u64 attribute, which `threshold` is.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())
            .context("reading the device's default memory pool")?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .context("setting the memory pool's release threshold")?;
    }
    Ok(())
}

impl Drop for CudaBackend {
    /// Prints the profile's table, when profiling.
    fn drop(&mut self) {
        if let Some(profile) = &self.profile {
            let synchronized = self.stream.synchronize().map_err(anyhow::Error::from);
            match synchronized.and_then(|()| self.collect_profile()) {
                Ok(()) => eprintln!("{}", profile.table()),
                Err(e) => eprintln!("cuda profile ({}): unreadable: {e:#}", self.description),
            }
        }
    }
}

/// `x` as a 32-bit kernel parameter, or an error naming `what`.
pub(crate) fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| anyhow!("{what} = {x} exceeds the kernels' 32-bit sizes"))
}

/// Launch shape of an elementwise kernel over `n` elements (`n` > 0).
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = (n as u64)
        .div_ceil(ROW_BLOCK as u64)
        .min(MAX_ELEMENTWISE_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ROW_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch shape of a row kernel: one block of [`ROW_BLOCK`] threads per row, with `shared`
/// bytes of dynamic shared memory.
pub(crate) fn per_row(rows: usize, shared: u32) -> Result<LaunchConfig> {
    // A grid's first dimension holds at most 2³¹ − 1 blocks.
    if rows > i32::MAX as usize {
        bail!("{rows} rows exceed CUDA's grid size");
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_BLOCK, 1, 1),
        shared_mem_bytes: shared,
    })
}

/// Rows per chunk of the column-sum kernels: at least 256, and at most 1024 chunks so the
/// grid's second dimension stays far below its limit of 65535.
pub(crate) fn chunk_rows(rows: usize) -> usize {
    rows.div_ceil(1024).max(256)
}

/// Launch shape of the stage-1 column-sum kernels: 32 columns × 8 row lanes per block, one
/// block per (column tile, chunk of rows).
pub(crate) fn column_tiles(cols: usize, chunks: usize) -> Result<LaunchConfig> {
    let tiles = u32_of(cols.div_ceil(32), "column tiles")?;
    Ok(LaunchConfig {
        grid_dim: (tiles, u32_of(chunks, "row chunks")?, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_grids_cover_every_element_or_loop_over_it() {
        for n in [1usize, 255, 256, 257, 1 << 30] {
            let cfg = elementwise(n);
            let threads = cfg.grid_dim.0 as u64 * cfg.block_dim.0 as u64;
            assert!(
                threads >= (n as u64).min(MAX_ELEMENTWISE_BLOCKS * 256),
                "{n}"
            );
            assert!(cfg.grid_dim.0 >= 1);
        }
    }

    #[test]
    fn column_chunks_stay_few_and_cover_all_rows() {
        for rows in [1usize, 255, 256, 1030, 16_384, 10_000_000] {
            let per = chunk_rows(rows);
            let chunks = rows.div_ceil(per);
            assert!(chunks <= 1024, "{rows}: {chunks} chunks");
            assert!(chunks * per >= rows);
            assert!(per >= 256);
        }
    }
}
