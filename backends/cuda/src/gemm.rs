//! Row-major products through column-major cuBLAS.
//!
//! cuBLAS reads a row-major `r × c` matrix as its column-major transpose (`c × r`, leading
//! dimension `c`). So pipit's row-major `out[m×n] = op(a)·op(b)` is cuBLAS's column-major
//! `outᵀ[n×m] = op(b)ᵀ · op(a)ᵀ`: the operands swap places, and each keeps its own
//! transposition flag. Every product goes through `cublasGemmStridedBatchedEx` with f32
//! accumulation, so f32 and bf16 operands, one matrix or a batch of heads, take one path.

use std::ffi::c_void;

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
use cudarc::cublas::{CudaBlas, GemmConfig};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
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

/// Elements between consecutive matrices of a batch, for cuBLAS's first operand (pipit's
/// `b`), its second (pipit's `a`) and the output: each operand's matrices lie one after
/// another.
#[derive(Debug, PartialEq)]
pub(crate) struct BatchStrides {
    pub(crate) first: i64,
    pub(crate) second: i64,
    pub(crate) out: i64,
}

/// [`BatchStrides`] of `shape`'s products.
pub(crate) fn batch_strides(shape: &Matmul) -> BatchStrides {
    BatchStrides {
        first: (shape.k * shape.n) as i64,
        second: (shape.m * shape.k) as i64,
        out: (shape.m * shape.n) as i64,
    }
}

/// A device operand of a product: its address, its cuBLAS element type, and the guard that
/// records its use on the stream when dropped.
struct Operand<'a> {
    ptr: u64,
    dtype: cudaDataType,
    _used: SyncOnDrop<'a>,
}

impl<'a> Operand<'a> {
    fn read(buf: &'a CudaBuffer, stream: &'a CudaStream) -> Result<Self> {
        let (ptr, dtype, used) = match &buf.data {
            Data::F32(s) => {
                let (p, u) = s.device_ptr(stream);
                (p, cudaDataType::CUDA_R_32F, u)
            }
            Data::BF16(s) => {
                let (p, u) = s.device_ptr(stream);
                (p, cudaDataType::CUDA_R_16BF, u)
            }
            Data::U32 { .. } => bail!("a product's operands must be f32 or bf16"),
        };
        Ok(Self {
            ptr,
            dtype,
            _used: used,
        })
    }

    fn write(buf: &'a mut CudaBuffer, stream: &'a CudaStream) -> Result<Self> {
        let (ptr, dtype, used) = match &mut buf.data {
            Data::F32(s) => {
                let (p, u) = s.device_ptr_mut(stream);
                (p, cudaDataType::CUDA_R_32F, u)
            }
            Data::BF16(s) => {
                let (p, u) = s.device_ptr_mut(stream);
                (p, cudaDataType::CUDA_R_16BF, u)
            }
            Data::U32 { .. } => bail!("a product's output must be f32 or bf16"),
        };
        Ok(Self {
            ptr,
            dtype,
            _used: used,
        })
    }
}

/// `batch` row-major products `out_i = op(a_i)·op(b_i)` (+ `beta`·`out_i`), the matrices of
/// each operand stored one after another, accumulating in f32 (`CUBLAS_COMPUTE_32F`, no TF32):
/// `a` and `b` both f32 or both bf16, `out` f32 or bf16. With `batch` = 1 it is one matmul.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    blas: &CudaBlas,
    stream: &CudaStream,
    shape: &Matmul,
    batch: usize,
    beta: f32,
    a: &CudaBuffer,
    b: &CudaBuffer,
    out: &mut CudaBuffer,
) -> Result<()> {
    let cfg = config(shape, beta)?;
    let count = i32::try_from(batch)
        .map_err(|_| anyhow!("a batch of {batch} products exceeds cuBLAS's 32-bit count"))?;
    let strides = batch_strides(shape);
    let (oa, ob, oc) = (
        Operand::read(a, stream)?,
        Operand::read(b, stream)?,
        Operand::write(out, stream)?,
    );
    if oa.dtype != ob.dtype {
        bail!("a product needs operands of one type");
    }
    // SAFETY: the caller checked that a, b and out hold `batch` matrices of the sizes in
    // `shape`, so cuBLAS stays inside them; alpha and beta are host f32 scalars, as
    // COMPUTE_32F requires. pipit's b is cuBLAS's first operand (see the module docs).
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *blas.handle(),
            cfg.transa,
            cfg.transb,
            cfg.m,
            cfg.n,
            cfg.k,
            (&cfg.alpha) as *const f32 as *const c_void,
            ob.ptr as *const c_void,
            ob.dtype,
            cfg.lda,
            strides.first,
            oa.ptr as *const c_void,
            oa.dtype,
            cfg.ldb,
            strides.second,
            (&cfg.beta) as *const f32 as *const c_void,
            oc.ptr as *mut c_void,
            oc.dtype,
            cfg.ldc,
            strides.out,
            count,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| anyhow!("cuBLAS GemmStridedBatchedEx {shape:?} × {batch}: {e:?}"))
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
    fn batched_calls_compute_each_matrix_of_the_batch() {
        let (m, n, k, batch) = (3, 4, 5, 3);
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let s = Matmul {
                trans_a,
                trans_b,
                ..Matmul::new(m, n, k)
            };
            let a: Vec<f32> = (0..batch * m * k).map(|i| (i as f32 * 0.3).sin()).collect();
            let b: Vec<f32> = (0..batch * k * n).map(|i| (i as f32 * 0.7).cos()).collect();
            let cfg = config(&s, 0.0).unwrap();
            let st = batch_strides(&s);
            let mut got = vec![0f32; batch * m * n];
            for z in 0..batch {
                // cuBLAS's strided batch: matrix z of each operand starts z strides in.
                let first = &b[z * st.first as usize..];
                let second = &a[z * st.second as usize..];
                let out = &mut got[z * st.out as usize..(z + 1) * st.out as usize];
                column_major_gemm(&cfg, first, second, out);
            }
            for z in 0..batch {
                let mut want = vec![0f32; m * n];
                row_major(&s, &a[z * m * k..], &b[z * k * n..], &mut want);
                let out = &got[z * m * n..(z + 1) * m * n];
                for (g, w) in out.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "{s:?} matrix {z}: {out:?} vs {want:?}"
                    );
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
