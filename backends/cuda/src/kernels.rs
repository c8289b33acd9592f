//! The CUDA C++ sources of `cuda/`, compiled by NVRTC once per process and architecture and
//! loaded once per device, and the kernel handles a backend launches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// Threads per block of the row kernels (`PIPIT_BLOCK` in `cuda/common.cu`).
pub(crate) const ROW_BLOCK: u32 = 256;

/// Each source file, in the order they are joined into one program: `common.cu` first, since
/// the others use its helpers.
const SOURCES: [(&str, &str); 14] = [
    ("common.cu", include_str!("../../../cuda/common.cu")),
    (
        "elementwise.cu",
        include_str!("../../../cuda/elementwise.cu"),
    ),
    ("matmul.cu", include_str!("../../../cuda/matmul.cu")),
    ("gelu.cu", include_str!("../../../cuda/gelu.cu")),
    ("adamw.cu", include_str!("../../../cuda/adamw.cu")),
    ("embedding.cu", include_str!("../../../cuda/embedding.cu")),
    ("layernorm.cu", include_str!("../../../cuda/layernorm.cu")),
    ("rmsnorm.cu", include_str!("../../../cuda/rmsnorm.cu")),
    ("rope.cu", include_str!("../../../cuda/rope.cu")),
    ("swiglu.cu", include_str!("../../../cuda/swiglu.cu")),
    (
        "grouped_query.cu",
        include_str!("../../../cuda/grouped_query.cu"),
    ),
    (
        "crossentropy.cu",
        include_str!("../../../cuda/crossentropy.cu"),
    ),
    ("attention.cu", include_str!("../../../cuda/attention.cu")),
    (
        "flash_attention.cu",
        include_str!("../../../cuda/flash_attention.cu"),
    ),
];

/// The whole program: every file behind a `#line` marker, so NVRTC's messages name the file
/// and line they refer to.
pub(crate) fn program() -> String {
    let mut src = String::new();
    for (name, text) in SOURCES {
        src.push_str(&format!("#line 1 \"{name}\"\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}

/// NVRTC's output per GPU architecture (e.g. `sm_90`), compiled on first use in this process.
fn compiled() -> &'static Mutex<HashMap<String, Ptx>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Ptx>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// The program compiled for `arch`, from the cache or NVRTC. Holding the lock while compiling
/// makes backends opened at the same time wait for one compilation instead of each running one.
fn ptx_for(arch: &str) -> Result<Ptx> {
    let mut cache = compiled().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ptx) = cache.get(arch) {
        return Ok(ptx.clone());
    }
    // cudarc wants a 'static architecture name; there are a handful per process at most.
    let arch_static: &'static str = Box::leak(arch.to_string().into_boxed_str());
    let started = std::time::Instant::now();
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(
        program(),
        CompileOptions {
            arch: Some(arch_static),
            name: Some("pipit.cu".into()),
            ..Default::default()
        },
    )
    .map_err(|e| anyhow!("{}", describe_compile_error(&e)))
    .with_context(|| format!("compiling pipit's CUDA kernels for {arch} with NVRTC"))?;
    log::info!(
        "NVRTC compiled pipit's kernels for {arch} in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    cache.insert(arch.to_string(), ptx.clone());
    Ok(ptx)
}

/// NVRTC's log for a failed compilation, or the error itself.
fn describe_compile_error(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
            format!("{nvrtc:?}: {}", log.to_string_lossy().trim())
        }
        other => format!("{other:?}"),
    }
}

/// Launch kernel `$kernel` of `$self` with shape `$cfg` and the arguments in order. Every
/// argument is a reference that lives until the launch: a device slice (or [`Floats`]) or a
/// local scalar. `launch!(self, dtype => name | name_bf16, ...)` launches the instantiation
/// for the activations' dtype.
macro_rules! launch {
    (@go $self:expr, $func:expr, $name:expr, $cfg:expr, $($arg:expr),+) => {{
        let mut builder = $self.stream.launch_builder($func);
        $(builder.arg($arg);)+
        // SAFETY: the arguments match the kernel's parameters in cuda/ in type and order
        // (float or bf16 pointers as the dtype picked the instantiation), and the sizes
        // passed were checked against the buffers' lengths, so the kernel reads and writes
        // only inside them.
        unsafe { builder.launch($cfg) }
            .map(drop)
            .with_context(|| format!("launching CUDA kernel {}", $name))
    }};
    ($self:expr, $dtype:expr => $f32:ident | $bf16:ident, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let (func, name) = match $dtype {
            DType::BF16 => (&$self.kernels.$bf16, stringify!($bf16)),
            _ => (&$self.kernels.$f32, stringify!($f32)),
        };
        launch!(@go $self, func, name, $cfg, $($arg),+)
    }};
    ($self:expr, $kernel:ident, $cfg:expr, $($arg:expr),+ $(,)?) => {
        launch!(@go $self, &$self.kernels.$kernel, stringify!($kernel), $cfg, $($arg),+)
    };
}

/// Declares [`Kernels`] with one field per kernel, loaded by the field's name.
macro_rules! kernels {
    ($($name:ident),* $(,)?) => {
        /// Handles of every kernel in `cuda/`, loaded into one CUDA context.
        pub(crate) struct Kernels {
            $(pub(crate) $name: CudaFunction,)*
        }

        impl Kernels {
            /// The entry points, by name.
            #[cfg(test)]
            pub(crate) const NAMES: &'static [&'static str] = &[$(stringify!($name)),*];

            fn from_module(module: &Arc<cudarc::driver::CudaModule>) -> Result<Self> {
                Ok(Self {
                    $($name: module
                        .load_function(stringify!($name))
                        .with_context(|| format!("loading kernel {}", stringify!($name)))?,)*
                })
            }
        }
    };
}

// A kernel templated over the activation type has an f32 entry point `name` and a bf16 one
// `name_bf16` (see `cuda/common.cu`).
kernels!(
    fill_f32,
    fill_bf16,
    convert_f32_to_bf16,
    convert_bf16_to_f32,
    add_f32,
    add_f32_bf16,
    add_assign_f32,
    bias_rows,
    bias_rows_bf16,
    column_partial_sums,
    column_partial_sums_bf16,
    column_sums_finish,
    gelu_forward,
    gelu_forward_bf16,
    gelu_backward,
    gelu_backward_bf16,
    adamw,
    sum_squares_partial,
    sum_squares_finish,
    embedding_forward,
    embedding_backward_wpe,
    embedding_backward_wte,
    layernorm_forward,
    layernorm_forward_bf16,
    layernorm_backward,
    layernorm_backward_bf16,
    layernorm_param_partials,
    layernorm_param_partials_bf16,
    rmsnorm_forward,
    rmsnorm_forward_bf16,
    rmsnorm_backward,
    rmsnorm_backward_bf16,
    rmsnorm_weight_partials,
    rmsnorm_weight_partials_bf16,
    rope,
    rope_bf16,
    swiglu_forward,
    swiglu_forward_bf16,
    swiglu_backward,
    swiglu_backward_bf16,
    pack_qkv,
    pack_qkv_bf16,
    unpack_qkv_grad,
    unpack_qkv_grad_bf16,
    cross_entropy_forward,
    cross_entropy_forward_bf16,
    cross_entropy_backward,
    cross_entropy_backward_bf16,
    heads_split,
    heads_split_bf16,
    heads_merge,
    heads_merge_bf16,
    causal_softmax,
    causal_softmax_bf16,
    causal_softmax_backward,
    causal_softmax_backward_bf16,
    kv_cache_write,
    attention_decode,
    flash_delta,
    flash_forward_hs16,
    flash_forward_hs32,
    flash_forward_hs64,
    flash_forward_hs128,
    flash_backward_dq_hs16,
    flash_backward_dq_hs32,
    flash_backward_dq_hs64,
    flash_backward_dq_hs128,
    flash_backward_dkdv_hs16,
    flash_backward_dkdv_hs32,
    flash_backward_dkdv_hs64,
    flash_backward_dkdv_hs128,
);

/// The program loaded into each device's primary context, by device ordinal. Every backend on
/// a device shares that context (and so the module), so the driver translates the PTX once.
fn loaded() -> &'static Mutex<HashMap<usize, Arc<CudaModule>>> {
    static MODULES: OnceLock<Mutex<HashMap<usize, Arc<CudaModule>>>> = OnceLock::new();
    MODULES.get_or_init(Mutex::default)
}

impl Kernels {
    /// Every kernel, compiled for `arch` and loaded into `ctx` (a device's primary context)
    /// on first use in this process.
    pub(crate) fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Self> {
        let mut modules = loaded().lock().unwrap_or_else(|p| p.into_inner());
        let module = match modules.get(&ctx.ordinal()) {
            Some(module) => module.clone(),
            None => {
                let module = ctx.load_module(ptx_for(arch)?).with_context(|| {
                    format!("loading pipit's kernels ({arch}) into the CUDA context")
                })?;
                modules.insert(ctx.ordinal(), module.clone());
                module
            }
        };
        Self::from_module(&module)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_once_in_the_sources() {
        let src = program();
        for name in Kernels::NAMES {
            let decl = format!("extern \"C\" __global__ void {name}(");
            assert_eq!(src.matches(&decl).count(), 1, "{name}");
        }
        assert_eq!(
            src.matches("__global__").count(),
            Kernels::NAMES.len(),
            "every kernel in cuda/ is loaded"
        );
    }

    #[test]
    fn sources_include_no_headers() {
        for (name, text) in SOURCES {
            assert!(
                !text.lines().any(|l| l.trim_start().starts_with("#include")),
                "{name} includes a header; NVRTC compiles without the CUDA headers"
            );
        }
    }

    #[test]
    fn the_program_marks_where_each_file_starts() {
        let src = program();
        for (name, _) in SOURCES {
            assert!(src.contains(&format!("#line 1 \"{name}\"\n")), "{name}");
        }
        assert!(src.contains(&format!("#define PIPIT_BLOCK {ROW_BLOCK}\n")));
    }
}
