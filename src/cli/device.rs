//! `--backend`: which device the ranks run on, chosen at run time.

use anyhow::Result;
use clap::ValueEnum;
use pipit_cpu::CpuBackend;
use pipit_cuda::CudaBackend;
use pipit_engine::Backend;
use pipit_reference::ReferenceBackend;
use pipit_wgpu::WgpuBackend;

use pipit_engine::invalid_input;

use super::say;

/// The device family every rank uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CUDA if a GPU is there, else wgpu on a hardware GPU, else the CPU backend.
    Auto,
    /// The fast CPU backend: f32 on the host's cores (gemm, SIMD row kernels).
    Cpu,
    /// Plain host code summing in f64: slow, the numerical oracle the others are tested against.
    Reference,
    /// wgpu: Vulkan/Metal/DX12, or Mesa's lavapipe on CPU-only machines.
    Wgpu,
    /// NVIDIA GPUs through CUDA.
    Cuda,
}

/// Work that runs on whichever backend was chosen: generic code behind a run-time choice.
pub trait BackendJob {
    /// What the job returns.
    type Output;
    /// Run with `make(r)` giving rank `r` its device.
    fn run<B: Backend>(self, make: &mut dyn FnMut(usize) -> Result<B>) -> Result<Self::Output>;
    /// [`Self::run`] on CUDA devices; a job that does something only CUDA can (NCCL between
    /// processes) overrides it.
    fn run_cuda(self, make: &mut dyn FnMut(usize) -> Result<CudaBackend>) -> Result<Self::Output>
    where
        Self: Sized,
    {
        self.run(make)
    }
}

/// Pick the backend for `choice`, say which on stderr, and run `job` on it.
pub fn with_backend<J: BackendJob>(choice: BackendChoice, job: J) -> Result<J::Output> {
    match choice {
        BackendChoice::Cpu => {
            say!("backend: {}", CpuBackend::new().describe());
            job.run(&mut |_| Ok(CpuBackend::new()))
        }
        BackendChoice::Reference => {
            say!("backend: reference (host code)");
            job.run(&mut |_| Ok(ReferenceBackend::new()))
        }
        BackendChoice::Wgpu => {
            let probe = WgpuBackend::new()?;
            say!("backend: {}", probe.describe());
            let mut first = Some(probe);
            job.run(&mut |_| match first.take() {
                Some(b) => Ok(b),
                None => WgpuBackend::new(),
            })
        }
        BackendChoice::Cuda => {
            // A machine without CUDA is an environment the user can change, not a failure.
            let devices = pipit_cuda::probe().map_err(|e| {
                invalid_input!("--backend cuda: {e}; or use auto, cpu, wgpu or reference")
            })?;
            let first = CudaBackend::new(0)?;
            say!("backend: {}", first.describe());
            run_on_cuda(job, first, devices)
        }
        BackendChoice::Auto => {
            let no_cuda = match pipit_cuda::probe().and_then(|n| Ok((CudaBackend::new(0)?, n))) {
                Ok((first, devices)) => {
                    say!("backend: {} (auto: a CUDA GPU)", first.describe());
                    return run_on_cuda(job, first, devices);
                }
                Err(e) => e,
            };
            auto_without_cuda(job, &no_cuda)
        }
    }
}

/// Run `job` on CUDA: rank `r` on device `r mod devices`, so in-process ranks share one GPU
/// (a stream each) or spread over several; `first` (device 0) serves the first rank there.
fn run_on_cuda<J: BackendJob>(job: J, first: CudaBackend, devices: usize) -> Result<J::Output> {
    let mut first = Some(first);
    job.run_cuda(&mut |r| match first.take() {
        Some(b) if r % devices == 0 => Ok(b),
        _ => CudaBackend::new(r % devices),
    })
}

/// `--backend auto` once CUDA is ruled out (`no_cuda` says why): a hardware GPU through wgpu,
/// else the CPU backend.
fn auto_without_cuda<J: BackendJob>(job: J, no_cuda: &anyhow::Error) -> Result<J::Output> {
    // The first clause of the reason is enough here ("no CUDA driver found (libcuda.so)").
    let no_cuda = no_cuda.to_string();
    let no_cuda = no_cuda.split(": ").next().unwrap_or_default();
    match WgpuBackend::new() {
        Ok(b) if b.adapter_info().device_type != wgpu::DeviceType::Cpu => {
            say!(
                "backend: {} (auto: {no_cuda}, a hardware GPU through wgpu)",
                b.describe()
            );
            let mut first = Some(b);
            job.run(&mut |_| match first.take() {
                Some(b) => Ok(b),
                None => WgpuBackend::new(),
            })
        }
        found => {
            let why = match found {
                Ok(b) => format!("only a software adapter ({})", b.describe()),
                Err(e) => format!("no wgpu adapter ({e})"),
            };
            say!("backend: cpu (auto: no GPU found, {no_cuda}, {why})");
            job.run(&mut |_| Ok(CpuBackend::new()))
        }
    }
}
