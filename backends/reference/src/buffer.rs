//! Host buffers, their memory accounting, and the size checks every op shares.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use pipit_engine::backend::{DType, MemoryMeter};

#[derive(Debug)]
enum Data {
    F32(Vec<f32>),
    U32(Vec<u32>),
}

/// A reference-backend buffer: a host vector of f32 or u32, counted by its backend's meter
/// from creation until drop.
#[derive(Debug)]
pub struct RefBuffer {
    data: Data,
    meter: Arc<MemoryMeter>,
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
            DType::F32 => Data::F32(zeroed_vec(len)?),
            DType::U32 => Data::U32(zeroed_vec(len)?),
        };
        meter.acquire(Self::bytes_of(len, dtype));
        Ok(Self {
            data,
            meter: Arc::clone(meter),
        })
    }

    fn bytes_of(len: usize, dtype: DType) -> u64 {
        len as u64 * dtype.size() as u64
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
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
            Data::F32(_) => DType::F32,
            Data::U32(_) => DType::U32,
        }
    }

    /// The elements of an f32 buffer; `what` names the operand in the error otherwise.
    pub fn f32(&self, what: &str) -> Result<&[f32]> {
        match &self.data {
            Data::F32(v) => Ok(v),
            Data::U32(_) => bail!("{what}: expected an f32 buffer, got u32"),
        }
    }

    /// The elements of a u32 buffer; `what` names the operand in the error otherwise.
    pub fn u32(&self, what: &str) -> Result<&[u32]> {
        match &self.data {
            Data::U32(v) => Ok(v),
            Data::F32(_) => bail!("{what}: expected a u32 buffer, got f32"),
        }
    }

    pub(crate) fn f32_mut(&mut self, what: &str) -> Result<&mut [f32]> {
        match &mut self.data {
            Data::F32(v) => Ok(v),
            Data::U32(_) => bail!("{what}: expected an f32 buffer, got u32"),
        }
    }

    pub(crate) fn u32_mut(&mut self, what: &str) -> Result<&mut [u32]> {
        match &mut self.data {
            Data::U32(v) => Ok(v),
            Data::F32(_) => bail!("{what}: expected a u32 buffer, got f32"),
        }
    }

    /// `self = src`, for buffers of the same dtype and length.
    pub(crate) fn copy_from(&mut self, src: &RefBuffer) -> Result<()> {
        expect_len("copy source", src.len(), self.len())?;
        match (&mut self.data, &src.data) {
            (Data::F32(d), Data::F32(s)) => d.copy_from_slice(s),
            (Data::U32(d), Data::U32(s)) => d.copy_from_slice(s),
            _ => bail!(
                "copy: destination is {:?} but source is {:?}",
                self.dtype(),
                src.dtype()
            ),
        }
        Ok(())
    }
}

impl Drop for RefBuffer {
    fn drop(&mut self) {
        self.meter.release(Self::bytes_of(self.len(), self.dtype()));
    }
}

/// Fail unless an operand has the length its dimensions imply.
pub(crate) fn expect_len(what: &str, actual: usize, expected: usize) -> Result<()> {
    if actual != expected {
        bail!("{what}: buffer has {actual} elements, the dimensions need {expected}");
    }
    Ok(())
}

pub(crate) use pipit_engine::backend::check::elems;
