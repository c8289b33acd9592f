//! `--backend`: which device the ranks run on, chosen at run time.

use anyhow::Result;
use clap::ValueEnum;
use pipit_engine::Backend;
use pipit_reference::ReferenceBackend;
use pipit_wgpu::WgpuBackend;

use pipit_engine::invalid_input;

/// The device family every rank uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CUDA if a GPU is there, else wgpu on a hardware GPU, else the reference backend.
    Auto,
    /// Plain host code: slow, exact, the numerical oracle.
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
}

/// Pick the backend for `choice`, say which on stderr, and run `job` on it.
pub fn with_backend<J: BackendJob>(choice: BackendChoice, job: J) -> Result<J::Output> {
    match choice {
        BackendChoice::Reference => {
            eprintln!("backend: reference (host code)");
            job.run(&mut |_| Ok(ReferenceBackend::new()))
        }
        BackendChoice::Wgpu => {
            let probe = WgpuBackend::new()?;
            eprintln!("backend: {}", probe.describe());
            let mut first = Some(probe);
            job.run(&mut |_| match first.take() {
                Some(b) => Ok(b),
                None => WgpuBackend::new(),
            })
        }
        BackendChoice::Cuda => Err(invalid_input!(
            "--backend cuda: this build of pipit has no CUDA backend yet; use auto, wgpu or reference"
        )),
        BackendChoice::Auto => match WgpuBackend::new() {
            Ok(b) if b.adapter_info().device_type != wgpu::DeviceType::Cpu => {
                eprintln!("backend: {} (auto: a hardware GPU through wgpu)", b.describe());
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
                eprintln!("backend: reference (auto: no GPU found, {why})");
                job.run(&mut |_| Ok(ReferenceBackend::new()))
            }
        },
    }
}
