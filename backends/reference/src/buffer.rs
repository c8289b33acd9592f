//! Host buffers, their memory accounting, and the size checks every op shares.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use pipit_engine::backend::{round_bf16, DType, MemoryMeter, MeterClaim};

#[derive(Debug)]
enum Data {
    /// F32, or BF16 held as bf16-exact f32 values.
    Float(Vec<f32>, DType),
    U32(Vec<u32>),
}

/// A reference-backend buffer: a host vector of f32 or u32, counted by its backend's meter
/// from creation until drop.
///
/// A bf16 buffer holds its values as f32 numbers that are exactly representable in bf16:
/// ops read them as plain f32 and every write rounds them (see `FloatMut`). The meter counts
/// the two bytes per element a device would hold.
#[derive(Debug)]
pub struct RefBuffer {
    data: Data,
    pub(crate) claim: MeterClaim,
}

/// Write access to a float buffer's elements. A bf16 buffer's values are rounded to bf16 when
/// the access ends, so every op stores into bf16 by computing in f32 and rounding once.
pub struct FloatMut<'a> {
    values: &'a mut [f32],
    bf16: bool,
}

impl Deref for FloatMut<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.values
    }
}

impl DerefMut for FloatMut<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.values
    }
}

impl Drop for FloatMut<'_> {
    fn drop(&mut self) {
        if self.bf16 {
            for x in self.values.iter_mut() {
                *x = round_bf16(*x);
            }
        }
    }
}

/// A zero-filled vector, or an error (not an abort) when the host cannot hold it.
fn zeroed_vec<T: Clone + Default>(len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .with_context(|| format!("host allocation of {len} elements failed"))?;
    v.resize(len, T::default());
    Ok(v)
}

impl RefBuffer {
    pub(crate) fn zeroed(meter: &Arc<MemoryMeter>, len: usize, dtype: DType) -> Result<Self> {
        let data = match dtype {
            DType::F32 | DType::BF16 => Data::Float(zeroed_vec(len)?, dtype),
            DType::U32 => Data::U32(zeroed_vec(len)?),
        };
        Ok(Self {
            data,
            claim: MeterClaim::new(meter, Self::bytes_of(len, dtype)),
        })
    }

    fn bytes_of(len: usize, dtype: DType) -> u64 {
        len as u64 * dtype.size() as u64
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            Data::Float(v, _) => v.len(),
            Data::U32(v) => v.len(),
        }
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match &self.data {
            Data::Float(_, dtype) => *dtype,
            Data::U32(_) => DType::U32,
        }
    }

    /// The elements of a float (f32 or bf16) buffer; `what` names the operand in the error
    /// otherwise.
    pub fn f32(&self, what: &str) -> Result<&[f32]> {
        match &self.data {
            Data::Float(v, _) => Ok(v),
            Data::U32(_) => bail!("{what}: expected a float buffer, got u32"),
        }
    }

    /// The elements of a u32 buffer; `what` names the operand in the error otherwise.
    pub fn u32(&self, what: &str) -> Result<&[u32]> {
        match &self.data {
            Data::U32(v) => Ok(v),
            Data::Float(_, dtype) => bail!("{what}: expected a u32 buffer, got {dtype:?}"),
        }
    }

    /// Write access to a float buffer; bf16 values are rounded when it ends.
    pub fn f32_mut(&mut self, what: &str) -> Result<FloatMut<'_>> {
        match &mut self.data {
            Data::Float(v, dtype) => Ok(FloatMut {
                bf16: *dtype == DType::BF16,
                values: v,
            }),
            Data::U32(_) => bail!("{what}: expected a float buffer, got u32"),
        }
    }

    /// Write access to a u32 buffer; `what` names the operand in the error otherwise.
    pub fn u32_mut(&mut self, what: &str) -> Result<&mut [u32]> {
        match &mut self.data {
            Data::U32(v) => Ok(v),
            Data::Float(_, dtype) => bail!("{what}: expected a u32 buffer, got {dtype:?}"),
        }
    }

    /// `self = src`, for buffers of the same length: u32 to u32, or between float types
    /// (rounding into bf16).
    pub(crate) fn copy_from(&mut self, src: &RefBuffer) -> Result<()> {
        expect_len("copy source", src.len(), self.len())?;
        match &src.data {
            Data::Float(s, _) if self.dtype().is_float() => {
                self.f32_mut("copy destination")?.copy_from_slice(s)
            }
            Data::U32(s) if self.dtype() == DType::U32 => self.u32_mut("copy")?.copy_from_slice(s),
            _ => bail!(
                "copy: destination is {:?} but source is {:?}",
                self.dtype(),
                src.dtype()
            ),
        }
        Ok(())
    }
}

/// Fail unless an operand has the length its dimensions imply.
pub fn expect_len(what: &str, actual: usize, expected: usize) -> Result<()> {
    if actual != expected {
        bail!("{what}: buffer has {actual} elements, the dimensions need {expected}");
    }
    Ok(())
}

pub(crate) use pipit_engine::backend::check::elems;
