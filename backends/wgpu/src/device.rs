//! Choosing a wgpu adapter the way wgpu users expect, and describing it.
//!
//! `WGPU_BACKEND` (e.g. `vulkan`, `metal`, `dx12`, `gl`) limits the backends the instance
//! opens, and `WGPU_ADAPTER_NAME` picks the first adapter whose name contains it
//! (case-insensitive). Otherwise a discrete GPU is preferred, then an integrated one, then
//! anything else, and a software adapter (lavapipe, llvmpipe: device type `Cpu`) last.

use anyhow::{anyhow, bail, Result};

/// Kernel tuning for a kind of device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelProfile {
    /// Many invocations per row, combined with workgroup reductions (GPUs).
    Gpu,
    /// One invocation per row and no barriers in row kernels: CPU drivers such as lavapipe
    /// run each barrier as a coroutine switch per SIMD group, which costs more than the work.
    Cpu,
}

impl KernelProfile {
    /// The profile that suits an adapter: `Cpu` for software adapters, else `Gpu`.
    pub fn for_device(device_type: wgpu::DeviceType) -> Self {
        if device_type == wgpu::DeviceType::Cpu {
            KernelProfile::Cpu
        } else {
            KernelProfile::Gpu
        }
    }

    /// Invocations that share one row in the row kernels (layernorm, cross-entropy, attention).
    pub fn lanes_per_row(self) -> u32 {
        match self {
            KernelProfile::Gpu => 64,
            KernelProfile::Cpu => 1,
        }
    }
}

/// Options for opening a [`crate::WgpuBackend`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Cap on the bytes one storage binding may cover, below the device's own limit. Work on
    /// larger buffers is cut into windows, so a small cap exercises that path on small data.
    pub max_binding_bytes: Option<u64>,
    /// Kernel tuning; `None` picks it from the adapter's device type.
    pub profile: Option<KernelProfile>,
}

/// Every adapter the environment allows, in wgpu's order.
pub fn adapters() -> Vec<wgpu::Adapter> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

/// Rank of a device type: lower is preferred.
fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Rank of a graphics API: the native compute APIs before OpenGL.
fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    }
}

/// The adapter pipit uses: `name_filter` (from `WGPU_ADAPTER_NAME`) first, else the best
/// device type. An error says what was available when nothing matches.
pub fn choose_adapter(
    adapters: Vec<wgpu::Adapter>,
    name_filter: Option<&str>,
) -> Result<wgpu::Adapter> {
    if adapters.is_empty() {
        bail!("no wgpu adapter found: install mesa-vulkan-drivers for a software Vulkan device");
    }
    let names: Vec<String> = adapters.iter().map(|a| describe(&a.get_info())).collect();
    let wanted = name_filter.map(str::to_lowercase).filter(|w| !w.is_empty());
    let candidates: Vec<wgpu::Adapter> = match &wanted {
        Some(w) => adapters
            .into_iter()
            .filter(|a| a.get_info().name.to_lowercase().contains(w.as_str()))
            .collect(),
        None => adapters,
    };
    let best = candidates.into_iter().min_by_key(|a| {
        let info = a.get_info();
        (type_rank(info.device_type), backend_rank(info.backend))
    });
    // Without a filter the list is non-empty, so only a filter can leave nothing.
    best.ok_or_else(|| {
        anyhow!(
            "no wgpu adapter name contains WGPU_ADAPTER_NAME={:?}; available: {}",
            wanted.unwrap_or_default(),
            names.join("; ")
        )
    })
}

/// `wgpu: <name> (<backend>, <device type>)`, e.g. `wgpu: llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, cpu)`.
pub fn describe(info: &wgpu::AdapterInfo) -> String {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => "discrete gpu",
        wgpu::DeviceType::IntegratedGpu => "integrated gpu",
        wgpu::DeviceType::VirtualGpu => "virtual gpu",
        wgpu::DeviceType::Other => "other",
        wgpu::DeviceType::Cpu => "cpu",
    };
    format!("wgpu: {} ({:?}, {kind})", info.name, info.backend)
}
