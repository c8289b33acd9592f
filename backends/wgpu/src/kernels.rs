//! The WGSL kernels: which file and entry point each one is, compiled once per device.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{anyhow, Result};

/// One WGSL file of `shaders/`: a layer family, forward and backward together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Shader {
    Elementwise,
    Gelu,
    Matmul,
    Layernorm,
    Attention,
    Embedding,
    CrossEntropy,
    AdamW,
    RmsNorm,
    Rope,
    SwiGlu,
    GroupedQuery,
}

impl Shader {
    fn source(self) -> &'static str {
        match self {
            Shader::Elementwise => include_str!("../../../shaders/elementwise.wgsl"),
            Shader::Gelu => include_str!("../../../shaders/gelu.wgsl"),
            Shader::Matmul => include_str!("../../../shaders/matmul.wgsl"),
            Shader::Layernorm => include_str!("../../../shaders/layernorm.wgsl"),
            Shader::Attention => include_str!("../../../shaders/attention.wgsl"),
            Shader::Embedding => include_str!("../../../shaders/embedding.wgsl"),
            Shader::CrossEntropy => include_str!("../../../shaders/crossentropy.wgsl"),
            Shader::AdamW => include_str!("../../../shaders/adamw.wgsl"),
            Shader::RmsNorm => include_str!("../../../shaders/rmsnorm.wgsl"),
            Shader::Rope => include_str!("../../../shaders/rope.wgsl"),
            Shader::SwiGlu => include_str!("../../../shaders/swiglu.wgsl"),
            Shader::GroupedQuery => include_str!("../../../shaders/grouped_query.wgsl"),
        }
    }

    fn file(self) -> &'static str {
        match self {
            Shader::Elementwise => "elementwise.wgsl",
            Shader::Gelu => "gelu.wgsl",
            Shader::Matmul => "matmul.wgsl",
            Shader::Layernorm => "layernorm.wgsl",
            Shader::Attention => "attention.wgsl",
            Shader::Embedding => "embedding.wgsl",
            Shader::CrossEntropy => "crossentropy.wgsl",
            Shader::AdamW => "adamw.wgsl",
            Shader::RmsNorm => "rmsnorm.wgsl",
            Shader::Rope => "rope.wgsl",
            Shader::SwiGlu => "swiglu.wgsl",
            Shader::GroupedQuery => "grouped_query.wgsl",
        }
    }
}

/// One compute pipeline: an entry point of a shader, with its pipeline constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Fill,
    Add,
    AddAssign,
    ChunkSums,
    GeluForward,
    GeluBackward,
    Matmul { trans_a: bool, trans_b: bool },
    MatmulRows { trans_a: bool, trans_b: bool },
    BiasBackward,
    LayernormForward,
    LayernormBackward,
    LayernormParamBackward,
    AttentionForward,
    AttentionBackwardD,
    AttentionBackwardDq,
    AttentionBackwardDkv,
    KvCacheWrite,
    AttentionDecode,
    EmbeddingForward,
    EmbeddingBackwardWte,
    EmbeddingBackwardWpe,
    CrossEntropyForward,
    CrossEntropyBackward,
    AdamW,
    RmsnormForward,
    RmsnormBackward,
    RmsnormParamBackward,
    Rope,
    SwigluForward,
    SwigluBackwardGate,
    SwigluBackwardUp,
    PackQkv,
    UnpackDq,
    UnpackDkv,
}

impl Kernel {
    fn shader(self) -> Shader {
        match self {
            Kernel::Fill | Kernel::Add | Kernel::AddAssign | Kernel::ChunkSums => {
                Shader::Elementwise
            }
            Kernel::GeluForward | Kernel::GeluBackward => Shader::Gelu,
            Kernel::Matmul { .. } | Kernel::MatmulRows { .. } | Kernel::BiasBackward => {
                Shader::Matmul
            }
            Kernel::LayernormForward
            | Kernel::LayernormBackward
            | Kernel::LayernormParamBackward => Shader::Layernorm,
            Kernel::AttentionForward
            | Kernel::AttentionBackwardD
            | Kernel::AttentionBackwardDq
            | Kernel::AttentionBackwardDkv
            | Kernel::KvCacheWrite
            | Kernel::AttentionDecode => Shader::Attention,
            Kernel::EmbeddingForward
            | Kernel::EmbeddingBackwardWte
            | Kernel::EmbeddingBackwardWpe => Shader::Embedding,
            Kernel::CrossEntropyForward | Kernel::CrossEntropyBackward => Shader::CrossEntropy,
            Kernel::AdamW => Shader::AdamW,
            Kernel::RmsnormForward | Kernel::RmsnormBackward | Kernel::RmsnormParamBackward => {
                Shader::RmsNorm
            }
            Kernel::Rope => Shader::Rope,
            Kernel::SwigluForward | Kernel::SwigluBackwardGate | Kernel::SwigluBackwardUp => {
                Shader::SwiGlu
            }
            Kernel::PackQkv | Kernel::UnpackDq | Kernel::UnpackDkv => Shader::GroupedQuery,
        }
    }

    /// The WGSL entry point.
    pub(crate) fn entry(self) -> &'static str {
        match self {
            Kernel::Fill => "fill",
            Kernel::Add => "add",
            Kernel::AddAssign => "add_assign",
            Kernel::ChunkSums => "chunk_sums",
            Kernel::GeluForward => "gelu_forward",
            Kernel::GeluBackward => "gelu_backward",
            Kernel::Matmul { .. } => "matmul",
            Kernel::MatmulRows { .. } => "matmul_rows",
            Kernel::BiasBackward => "bias_backward",
            Kernel::LayernormForward => "layernorm_forward",
            Kernel::LayernormBackward => "layernorm_backward",
            Kernel::LayernormParamBackward => "layernorm_param_backward",
            Kernel::AttentionForward => "attention_forward",
            Kernel::AttentionBackwardD => "attention_backward_d",
            Kernel::AttentionBackwardDq => "attention_backward_dq",
            Kernel::AttentionBackwardDkv => "attention_backward_dkv",
            Kernel::KvCacheWrite => "kv_cache_write",
            Kernel::AttentionDecode => "attention_decode",
            Kernel::EmbeddingForward => "embedding_forward",
            Kernel::EmbeddingBackwardWte => "embedding_backward_wte",
            Kernel::EmbeddingBackwardWpe => "embedding_backward_wpe",
            Kernel::CrossEntropyForward => "cross_entropy_forward",
            Kernel::CrossEntropyBackward => "cross_entropy_backward",
            Kernel::AdamW => "adamw",
            Kernel::RmsnormForward => "rmsnorm_forward",
            Kernel::RmsnormBackward => "rmsnorm_backward",
            Kernel::RmsnormParamBackward => "rmsnorm_param_backward",
            Kernel::Rope => "rope",
            Kernel::SwigluForward => "swiglu_forward",
            Kernel::SwigluBackwardGate => "swiglu_backward_gate",
            Kernel::SwigluBackwardUp => "swiglu_backward_up",
            Kernel::PackQkv => "pack_qkv",
            Kernel::UnpackDq => "unpack_dq",
            Kernel::UnpackDkv => "unpack_dkv",
        }
    }

    /// Kernels that take the `LANES` constant: invocations per row.
    pub(crate) fn is_row_kernel(self) -> bool {
        matches!(
            self,
            Kernel::LayernormForward
                | Kernel::LayernormBackward
                | Kernel::RmsnormForward
                | Kernel::RmsnormBackward
                | Kernel::CrossEntropyForward
                | Kernel::CrossEntropyBackward
                | Kernel::AttentionForward
                | Kernel::AttentionBackwardD
                | Kernel::AttentionBackwardDq
                | Kernel::AttentionBackwardDkv
                | Kernel::AttentionDecode
        )
    }

    fn constants(self, lanes: u32) -> Vec<(&'static str, f64)> {
        match self {
            Kernel::Matmul { trans_a, trans_b } | Kernel::MatmulRows { trans_a, trans_b } => vec![
                ("TRANS_A", f64::from(u8::from(trans_a))),
                ("TRANS_B", f64::from(u8::from(trans_b))),
            ],
            _ if self.is_row_kernel() => vec![("LANES", f64::from(lanes))],
            _ => Vec::new(),
        }
    }
}

/// A compiled kernel and the layout its bind groups follow.
#[derive(Clone)]
pub(crate) struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// Shader modules and pipelines of one device, built on first use and kept; row kernels
/// once per number of lanes per row they are used with.
#[derive(Default)]
pub(crate) struct Kernels {
    modules: Mutex<HashMap<Shader, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<(Kernel, u32), Pipeline>>,
}

impl Kernels {
    /// The pipeline of `kernel` on `device` (a row kernel with `lanes` invocations per row),
    /// compiling it the first time.
    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        kernel: Kernel,
        lanes: u32,
    ) -> Result<Pipeline> {
        // Only row kernels depend on the lanes.
        let lanes = if kernel.is_row_kernel() { lanes } else { 0 };
        let mut pipelines = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pipelines.get(&(kernel, lanes)) {
            return Ok(p.clone());
        }
        // Compilation errors would otherwise reach the device's uncaptured-error handler
        // later; a scope turns them into this call's error.
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            let shader = kernel.shader();
            modules
                .entry(shader)
                .or_insert_with(|| {
                    device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(shader.file()),
                        source: wgpu::ShaderSource::Wgsl(shader.source().into()),
                    })
                })
                .clone()
        };
        let constants = kernel.constants(lanes);
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(kernel.entry()),
            layout: None,
            module: &module,
            entry_point: Some(kernel.entry()),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Every kernel writes workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(anyhow!(
                "compiling {} ({}): {err}",
                kernel.entry(),
                kernel.shader().file()
            ));
        }
        let p = Pipeline {
            layout: pipeline.get_bind_group_layout(0),
            pipeline,
        };
        pipelines.insert((kernel, lanes), p.clone());
        Ok(p)
    }
}
