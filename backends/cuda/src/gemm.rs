//! Row-major products through column-major cuBLAS.
//!
//! cuBLAS reads a row-major `r × c` matrix as its column-major transpose (`c × r`, leading
//! dimension `c`). So pipit's row-major `out[m×n] = op(a)·op(b)` is cuBLAS's column-major
//! `outᵀ[n×m] = op(b)ᵀ · op(a)ᵀ`: the operands swap places, and each keeps its own
//! transposition flag.

use std::ffi::c_void;

use anyhow::{bail, Result};
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
use cudarc::cublas::{CudaBlas, GemmConfig};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use pipit_engine::backend::Matmul;

use crate::buffer::{CudaBuffer, Data};

/// The cuBLAS call for `shape`, with `beta` as given: the first cuBLAS operand is pipit's `b`,
/// the second pipit's `a`. All sizes must be non-zero.
pub(crate) fn config(shape: &Matmul, beta: f32) -> Result<GemmConfig<f32>> {
    let int = |x: usize, what: &str| -> Result<i32> {
        match i32::try_from(x) {
            Ok(v) => Ok(v),
            Err(_) => bail!("matmul: {what} = {x} exceeds cuBLAS's 32-bit sizes"),
        }
    };
    let (m, n, k) = (int(shape.m, "m")?, int(shape.n, "n")?, int(shape.k, "k")?);
    Ok(GemmConfig {
        // b stored k×n row-major is op(b)ᵀ column-major as it stands; stored n×k it needs a
        // transposition.
        transa: if shape.trans_b {
            CUBLAS_OP_T
        } else {
            CUBLAS_OP_N
        },
        // a stored m×k row-major is op(a)ᵀ column-major as it stands; stored k×m likewise
        // needs a transposition.
        transb: if shape.trans_a {
            CUBLAS_OP_T
        } else {
            CUBLAS_OP_N
        },
        m: n,
        n: m,
        k,
        alpha: 1.0,
        lda: if shape.trans_b { k } else { n },
        ldb: if shape.trans_a { m } else { k },
        beta,
        ldc: n,
    })
}

/// `cfg`'s product with bf16 operands (`first` and `second` in cuBLAS's order) into `out`, f32
/// or bf16, accumulating in f32 (`CUBLAS_COMPUTE_32F`): mixed precision's matmul, and its
/// weight gradients straight into f32.
pub(crate) fn bf16(
    blas: &CudaBlas,
    stream: &CudaStream,
    cfg: &GemmConfig<f32>,
    first: &CudaBuffer,
    second: &CudaBuffer,
    out: &mut CudaBuffer,
) -> Result<()> {
    let (Data::BF16(x), Data::BF16(y)) = (&first.data, &second.data) else {
        bail!("a bf16 product needs bf16 operands");
    };
    let (px, _x_used) = x.device_ptr(stream);
    let (py, _y_used) = y.device_ptr(stream);
    let (pc, c_type, _c_used) = match &mut out.data {
        Data::F32(c) => {
            let (p, used) = c.device_ptr_mut(stream);
            (p, cudaDataType::CUDA_R_32F, used)
        }
        Data::BF16(c) => {
            let (p, used) = c.device_ptr_mut(stream);
            (p, cudaDataType::CUDA_R_16BF, used)
        }
        Data::U32 { .. } => bail!("a product's output must be f32 or bf16"),
    };
    // SAFETY: the pointers are live device buffers of the lengths `cfg` was built from (the
    // caller checked them); alpha and beta are host f32 scalars, as COMPUTE_32F requires.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cfg.transa,
            cfg.transb,
            cfg.m,
            cfg.n,
            cfg.k,
            (&cfg.alpha) as *const f32 as *const c_void,
            px as *const c_void,
            cudaDataType::CUDA_R_16BF,
            cfg.lda,
            py as *const c_void,
            cudaDataType::CUDA_R_16BF,
            cfg.ldb,
            (&cfg.beta) as *const f32 as *const c_void,
            pc as *mut c_void,
            c_type,
            cfg.ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| anyhow::anyhow!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's sgemm semantics on host memory: column-major
    /// `C[m×n] = alpha·op(A)·op(B) + beta·C`, element (i, j) of a matrix at `i + j·ld`.
    fn column_major_gemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
        let op_a = |i: usize, p: usize| {
            if cfg.transa == CUBLAS_OP_N {
                a[i + p * lda]
            } else {
                a[p + i * lda]
            }
        };
        let op_b = |p: usize, j: usize| {
            if cfg.transb == CUBLAS_OP_N {
                b[p + j * ldb]
            } else {
                b[j + p * ldb]
            }
        };
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k).map(|p| op_a(i, p) * op_b(p, j)).sum();
                let old = c[i + j * ldc];
                c[i + j * ldc] = cfg.alpha * dot + cfg.beta * old;
            }
        }
    }

    /// The row-major product with the layouts of the Backend trait, directly.
    fn row_major(s: &Matmul, a: &[f32], b: &[f32], out: &mut [f32]) {
        for i in 0..s.m {
            for j in 0..s.n {
                let dot: f32 = (0..s.k)
                    .map(|p| {
                        let x = if s.trans_a {
                            a[p * s.m + i]
                        } else {
                            a[i * s.k + p]
                        };
                        let y = if s.trans_b {
                            b[j * s.k + p]
                        } else {
                            b[p * s.n + j]
                        };
                        x * y
                    })
                    .sum();
                out[i * s.n + j] = if s.accumulate {
                    out[i * s.n + j] + dot
                } else {
                    dot
                };
            }
        }
    }

    #[test]
    fn the_swapped_call_computes_the_row_major_product_in_every_layout() {
        let (m, n, k) = (3, 5, 4);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.71).cos()).collect();
        let init: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.1).collect();
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for accumulate in [false, true] {
                    let s = Matmul {
                        trans_a,
                        trans_b,
                        accumulate,
                        ..Matmul::new(m, n, k)
                    };
                    let cfg = config(&s, if accumulate { 1.0 } else { 0.0 }).unwrap();
                    let mut got = init.clone();
                    // pipit's b is cuBLAS's first operand, pipit's a the second.
                    column_major_gemm(&cfg, &b, &a, &mut got);
                    let mut want = init.clone();
                    row_major(&s, &a, &b, &mut want);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() < 1e-5, "{s:?}: {got:?} vs {want:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn sizes_beyond_32_bits_are_errors() {
        let err = config(&Matmul::new(1 << 31, 1, 1), 0.0).unwrap_err();
        assert!(err.to_string().contains("m = 2147483648"), "{err}");
    }
}
