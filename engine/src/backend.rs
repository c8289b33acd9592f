//! The two seams between the engine and a device: [`Backend`] (device compute) and
//! [`Transport`] (moving a tensor from one rank to another).
//!
//! Conventions every backend follows, so the model code can rely on them:
//! - Buffers are flat and row-major; shapes are passed to each op as plain sizes.
//! - Forward ops overwrite their outputs.
//! - Backward ops **overwrite input gradients** (`dinp`, `dqkv`, `dlogits`) and **accumulate
//!   parameter gradients** (`dweight += ...`), so gradients of a step's micro-batches sum up
//!   until [`Backend::fill`] zeroes them after the optimizer step.
//! - Every op may return an error (lost device, out of memory); none panics on valid sizes.
//!
//! Mixed precision: a backend that [`Backend::supports`] [`DType::BF16`] accepts bf16 for the
//! operands each op's documentation allows. It reads bf16 values as f32, computes in f32 (or
//! wider), and rounds once, to nearest even, when it stores into a bf16 output. The model keeps
//! the residual stream, layernorm statistics, parameters, gradients and optimizer state in f32.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};

pub mod fused;

/// Element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float: parameters, activations, gradients, optimizer state.
    F32,
    /// 32-bit unsigned integer: token ids and targets.
    U32,
    /// bfloat16 (8-bit exponent, 7-bit mantissa): activations and matmul weight copies under
    /// mixed precision.
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        self != DType::U32
    }

    /// The name users write (`--dtype f32|bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::U32 => "u32",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            "u32" => Ok(DType::U32),
            other => Err(crate::invalid_input!(
                "unknown dtype `{other}` (expected f32 or bf16)"
            )),
        }
    }
}

serde_as_name!(DType);

/// `x` rounded to the nearest bfloat16 (ties to even), as an f32. NaN stays NaN.
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return f32::from_bits((bits | 0x0040_0000) & 0xffff_0000);
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xffff_0000)
}

/// Shape and layout of one matrix product `out = op(a) · op(b) (+ bias) (+ out)`.
///
/// `op(a)` is `m × k` and `op(b)` is `k × n`; `trans_a` means `a` is stored `k × m`,
/// `trans_b` means `b` is stored `n × k`. With `accumulate` the product is added to `out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matmul {
    /// Rows of the output.
    pub m: usize,
    /// Columns of the output.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// `a` is stored transposed (`k × m`).
    pub trans_a: bool,
    /// `b` is stored transposed (`n × k`).
    pub trans_b: bool,
    /// Add the product to `out` instead of overwriting it.
    pub accumulate: bool,
}

impl Matmul {
    /// `out[m×n] = a[m×k] · b[k×n]`, nothing transposed, overwriting `out`.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        }
    }
    /// The same product with `a` stored transposed.
    pub fn trans_a(self) -> Self {
        Self {
            trans_a: true,
            ..self
        }
    }
    /// The same product with `b` stored transposed.
    pub fn trans_b(self) -> Self {
        Self {
            trans_b: true,
            ..self
        }
    }
    /// The same product, added to `out`.
    pub fn accumulate(self) -> Self {
        Self {
            accumulate: true,
            ..self
        }
    }
    /// Floating-point operations of this product (2·m·n·k).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// Sizes of a causal multi-head self-attention over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attention {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Model width (`n_embd`); each head has `channels / heads` dimensions.
    pub channels: usize,
    /// Number of heads (`n_head`).
    pub heads: usize,
}

/// Sizes of attention for new tokens against the keys and values of the tokens before them,
/// kept in a cache (decoding, one token at a time after the prompt).
///
/// The cache is f32 `[batch, capacity, 2, channels]`: each position's key, then its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedAttention {
    /// Sequences in the batch.
    pub batch: usize,
    /// New tokens per sequence in this call, at positions `past..past + new`.
    pub new: usize,
    /// Tokens per sequence already in the cache.
    pub past: usize,
    /// Positions the cache holds per sequence; `past + new` may not exceed it.
    pub capacity: usize,
    /// Model width (`n_embd`); each head has `channels / heads` dimensions.
    pub channels: usize,
    /// Number of heads (`n_head`).
    pub heads: usize,
}

impl CachedAttention {
    /// The shape of the attention over the new tokens alone.
    pub fn of_new(&self) -> Attention {
        Attention {
            batch: self.batch,
            seq: self.new,
            channels: self.channels,
            heads: self.heads,
        }
    }

    /// Elements of the cache: `batch · capacity · 2 · channels`.
    pub fn cache_len(&self) -> Result<usize> {
        check::elems(&[self.batch, self.capacity, 2, self.channels])
    }

    /// Check the shape: heads divide the channels, and the new tokens fit in the cache.
    pub fn check(&self) -> Result<()> {
        if self.heads == 0 || self.channels % self.heads != 0 {
            bail!(
                "cached attention: {} channels cannot be split into {} heads of equal width",
                self.channels,
                self.heads
            );
        }
        if self.past + self.new > self.capacity {
            bail!(
                "cached attention: {} cached and {} new tokens exceed the cache's {} positions",
                self.past,
                self.new,
                self.capacity
            );
        }
        Ok(())
    }
}

/// Sizes of the rotary position embedding (RoPE, as Llama) of `x[batch, seq, heads, head_dim]`.
///
/// Within each head, element `i < head_dim/2` pairs with `i + head_dim/2` ("rotate half", as
/// Hugging Face's Llama) and the pair turns by `position · θ^(−2i/head_dim)`, the position of
/// token `t` being `start + t`. Angles are computed in f32 as transformers computes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Heads in `x`.
    pub heads: usize,
    /// Elements per head (even).
    pub head_dim: usize,
    /// Position of each sequence's first token (the tokens already in a cache).
    pub start: usize,
    /// The base θ of the frequencies (10,000 in Llama 2, 500,000 in Llama 3).
    pub theta: f32,
    /// Rotate by minus the angle: the inverse, and the backward, of the forward rotation.
    pub inverse: bool,
}

impl Rope {
    /// `cos` and `sin` of each position's angle at each frequency, interleaved
    /// `[seq, head_dim/2, 2]`, as transformers' Llama computes them: inverse frequencies and
    /// angles in f32, their cosine and sine rounded from f64.
    pub fn cos_sin(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f32 / self.head_dim as f32))
            .collect();
        let mut table = Vec::with_capacity(self.seq * half * 2);
        for t in 0..self.seq {
            let pos = (self.start + t) as f32;
            for &f in &inv_freq {
                let angle = f64::from(pos * f);
                table.push(angle.cos() as f32);
                table.push(angle.sin() as f32);
            }
        }
        table
    }
}

/// Heads of grouped-query attention over `rows` tokens: `heads` query heads share
/// `kv_heads` key/value heads, each `head_dim` wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    /// Tokens (`batch·seq`).
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

/// Hyper-parameters of one AdamW update (decoupled weight decay, bias-corrected moments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate of this step.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (0 for biases and layernorm parameters).
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u32,
    /// Factor applied to the gradient before the update: 1, or less when gradients are
    /// clipped to a global norm.
    pub grad_scale: f32,
}

/// Bytes of device memory a backend holds now, and the most it has held since the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by live buffers.
    pub in_use: u64,
    /// The largest `in_use` seen since [`Backend::reset_peak_memory`].
    pub peak: u64,
}

/// Milliseconds from `start` to `end` on the host clock: [`Backend::elapsed_ms`] for the
/// backends whose marks are host times (0 when `end` is not after `start`).
pub fn host_elapsed_ms(start: &std::time::Instant, end: &std::time::Instant) -> f64 {
    end.saturating_duration_since(*start).as_secs_f64() * 1e3
}

/// Size checks every backend runs before touching a buffer, so a wrong call is the same
/// error on every device.
pub mod check {
    use anyhow::{anyhow, bail, Result};

    use super::DType;

    /// The product of `dims`, or an error when it overflows.
    pub fn elems(dims: &[usize]) -> Result<usize> {
        dims.iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| anyhow!("dimensions {dims:?} overflow the address space"))
    }

    /// Errors unless a buffer of element type `dtype` holds `want`.
    pub fn dtype(what: &str, dtype: DType, want: DType) -> Result<()> {
        if dtype != want {
            bail!("{what} must be a {want:?} buffer, got {dtype:?}");
        }
        Ok(())
    }

    /// Errors unless a buffer of element type `dtype` holds floats (f32 or bf16).
    pub fn float(what: &str, dtype: DType) -> Result<()> {
        if !dtype.is_float() {
            bail!("{what} must be an F32 or BF16 buffer, got {dtype:?}");
        }
        Ok(())
    }

    /// Errors unless a buffer of `len` elements of `dtype` holds exactly `want_len` of `want`.
    pub fn buffer(
        what: &str,
        len: usize,
        dtype: DType,
        want_len: usize,
        want: DType,
    ) -> Result<()> {
        self::dtype(what, dtype, want)?;
        if len != want_len {
            bail!("{what} holds {len} elements but the op needs {want_len}");
        }
        Ok(())
    }
}

/// One buffer's bytes as counted by a [`MemoryMeter`]: acquired when made, released when
/// dropped. A buffer handed to another rank of the same memory space leaves its maker's meter
/// when sent ([`MeterClaim::release`]) and joins the receiver's when received
/// ([`MeterClaim::count_on`]), so every meter changes only in its own rank's program order and
/// each rank's peak is the same on every run, whatever the threads' timing.
#[derive(Debug)]
pub struct MeterClaim {
    meter: Option<Arc<MemoryMeter>>,
    bytes: u64,
}

impl MeterClaim {
    /// Count `bytes` on `meter` from now until drop.
    pub fn new(meter: &Arc<MemoryMeter>, bytes: u64) -> Self {
        meter.acquire(bytes);
        Self {
            meter: Some(Arc::clone(meter)),
            bytes,
        }
    }

    /// Stop counting (the buffer is in flight to another rank).
    pub fn release(&mut self) {
        if let Some(meter) = self.meter.take() {
            meter.release(self.bytes);
        }
    }

    /// Count on `meter` from now on, and no longer on the meter before it.
    pub fn count_on(&mut self, meter: &Arc<MemoryMeter>) {
        self.release();
        meter.acquire(self.bytes);
        self.meter = Some(Arc::clone(meter));
    }
}

impl Drop for MeterClaim {
    fn drop(&mut self) {
        self.release();
    }
}

/// The counters behind [`MemoryStats`]: bytes held by one backend's live buffers and the most
/// held since the last reset. Backends share one (in an `Arc`) with every buffer they make and
/// update it on allocation and on drop.
#[derive(Debug, Default)]
pub struct MemoryMeter {
    in_use: AtomicU64,
    peak: AtomicU64,
}

impl MemoryMeter {
    /// Record `bytes` newly held.
    pub fn acquire(&self, bytes: u64) {
        let now = self.in_use.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    /// Record `bytes` released.
    pub fn release(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::SeqCst);
    }

    /// Bytes held now and at peak.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            in_use: self.in_use.load(Ordering::SeqCst),
            peak: self.peak.load(Ordering::SeqCst),
        }
    }

    /// Start a new peak window at the current usage.
    pub fn reset_peak(&self) {
        self.peak
            .store(self.in_use.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// Device compute: buffers and every operation a training step of a model family needs.
///
/// Three groups: device plumbing (buffers, copies, marks, memory), the primitive ops every
/// backend implements (matmul, elementwise, the layers GPT-2 was built on), and fused ops with
/// a default written once (on the host, in f64 sums, checked once for every backend) that a
/// backend overrides with a kernel where that pays: RMSNorm, RoPE, SwiGLU, grouped-query
/// packing, token-only embedding. A new layer op runs on every backend the day it is written.
///
/// One value of a backend serves one rank: it owns a device (or a stream on a shared one).
/// Ops are enqueued in order; results are visible to later ops and to [`Backend::download`].
pub trait Backend: Send + 'static {
    /// A device buffer. Dropping it frees its memory.
    type Buffer: Send + 'static;
    /// A point in this backend's stream of work ([`Backend::mark`]), for timing what runs
    /// between two points without waiting for it.
    type Mark;

    /// A one-line description of the device, e.g. `wgpu: llvmpipe (Vulkan, cpu)`.
    fn describe(&self) -> String;

    /// The memory this backend's buffers live in, when other backend values reporting the same
    /// space may use them directly (stages on one GPU, in one process): the in-process
    /// transport then hands buffers over instead of staging them through host memory. `None`
    /// (the default) always stages.
    fn memory_space(&self) -> Option<String> {
        None
    }
    /// `buf` leaves this rank for another rank of the same [`Backend::memory_space`]: this
    /// backend's meter stops counting it. Backends without a memory space need nothing.
    fn hand_over(&self, _buf: &mut Self::Buffer) {}
    /// `buf`, handed over by another rank of the same memory space, is this backend's now: its
    /// meter counts it until drop.
    fn take_over(&self, _buf: &mut Self::Buffer) {}
    /// Whether buffers and ops of `dtype` are available (every backend has F32 and U32).
    fn supports(&self, dtype: DType) -> bool {
        dtype != DType::BF16
    }
    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize, dtype: DType) -> Result<Self::Buffer>;
    /// A buffer of `len` elements for the output of an op that overwrites all of it: its
    /// contents before that are unspecified. A backend that can skip the zero-fill does (on a
    /// GPU it is a full pass over memory); the default is [`Backend::alloc`].
    fn alloc_output(&self, len: usize, dtype: DType) -> Result<Self::Buffer> {
        self.alloc(len, dtype)
    }
    /// A new f32 buffer holding `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buffer>;
    /// A new u32 buffer holding `data` (token ids).
    fn upload_u32(&self, data: &[u32]) -> Result<Self::Buffer>;
    /// Overwrite an existing float buffer with `data` (same length; rounded into bf16).
    fn write(&self, buf: &mut Self::Buffer, data: &[f32]) -> Result<()>;
    /// The contents of a float buffer as f32, after all enqueued work.
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<f32>>;
    /// Number of elements in a buffer.
    fn len(&self, buf: &Self::Buffer) -> usize;
    /// Element type of a buffer.
    fn dtype(&self, buf: &Self::Buffer) -> DType;
    /// Bytes of device memory a buffer's elements take.
    fn bytes(&self, buf: &Self::Buffer) -> u64 {
        (self.len(buf) * self.dtype(buf).size()) as u64
    }

    /// Set every element of a float buffer to `value`.
    fn fill(&self, buf: &mut Self::Buffer, value: f32) -> Result<()>;
    /// `dst = src` (same length; u32 buffers too, so token ids can be kept). Between f32 and
    /// bf16 the values are converted (rounded to nearest even into bf16).
    fn copy(&self, dst: &mut Self::Buffer, src: &Self::Buffer) -> Result<()>;
    /// `dst[dst_start..dst_start + len] = src[src_start..src_start + len]` between f32
    /// buffers (the rows of one sequence out of a batch of several, and back). This default
    /// goes through the host; a backend with device memory copies on the device.
    fn copy_range(
        &self,
        dst: &mut Self::Buffer,
        dst_start: usize,
        src: &Self::Buffer,
        src_start: usize,
        len: usize,
    ) -> Result<()> {
        fused::copy_range(self, dst, dst_start, src, src_start, len)
    }
    /// `out = a + b`, elementwise. bf16: `b` may be bf16 (a matmul output added to the f32
    /// residual stream).
    fn add(&self, out: &mut Self::Buffer, a: &Self::Buffer, b: &Self::Buffer) -> Result<()>;
    /// `acc += x`, elementwise (gradient accumulation, residual gradients).
    fn add_assign(&self, acc: &mut Self::Buffer, x: &Self::Buffer) -> Result<()>;
    /// `out[slot] = Σ x²` over an f32 buffer `x`, summed in a fixed order (the same bits every
    /// time); the other elements of the f32 buffer `out` are left alone. Gradient clipping
    /// fills one slot per gradient and downloads `out` once. This default goes through the
    /// host; a GPU backend reduces on the device.
    fn sum_squares(&self, out: &mut Self::Buffer, slot: usize, x: &Self::Buffer) -> Result<()> {
        let mut host = self.download(out)?;
        let len = host.len();
        let cell = host.get_mut(slot).ok_or_else(|| {
            anyhow::anyhow!("sum of squares into slot {slot} of a buffer of {len}")
        })?;
        *cell = self
            .download(x)?
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>() as f32;
        self.write(out, &host)
    }

    /// Token + position embedding: `out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]`.
    /// `tokens` is u32 `[batch·seq]`, `wte` is `[vocab, channels]`, `wpe` is `[n_positions, channels]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: &mut Self::Buffer,
        tokens: &Self::Buffer,
        wte: &Self::Buffer,
        wpe: &Self::Buffer,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        self.embedding_forward_at(out, tokens, wte, wpe, batch, seq, 0, channels)
    }
    /// [`Backend::embedding_forward`] for tokens at positions `start..start + seq` of their
    /// sequences: `out[b,t,:] = wte[tokens[b,t],:] + wpe[start + t,:]` (decoding after a cache).
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward_at(
        &self,
        out: &mut Self::Buffer,
        tokens: &Self::Buffer,
        wte: &Self::Buffer,
        wpe: &Self::Buffer,
        batch: usize,
        seq: usize,
        start: usize,
        channels: usize,
    ) -> Result<()>;
    /// Embedding backward: `dwte[tokens[b,t],:] += dout[b,t,:]`, `dwpe[t,:] += dout[b,t,:]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dwte: &mut Self::Buffer,
        dwpe: &mut Self::Buffer,
        dout: &Self::Buffer,
        tokens: &Self::Buffer,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()>;

    /// Layernorm over the last dimension (epsilon 1e-5) of `inp[rows, channels]`; saves each
    /// row's `mean` and reciprocal standard deviation `rstd` (both `[rows]`) for backward.
    /// bf16: `out` may be bf16.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut Self::Buffer,
        mean: &mut Self::Buffer,
        rstd: &mut Self::Buffer,
        inp: &Self::Buffer,
        weight: &Self::Buffer,
        bias: &Self::Buffer,
        rows: usize,
        channels: usize,
    ) -> Result<()>;
    /// Layernorm backward: overwrites `dinp`, accumulates `dweight` and `dbias`.
    /// bf16: `dout` may be bf16.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: &mut Self::Buffer,
        dweight: &mut Self::Buffer,
        dbias: &mut Self::Buffer,
        dout: &Self::Buffer,
        inp: &Self::Buffer,
        weight: &Self::Buffer,
        mean: &Self::Buffer,
        rstd: &Self::Buffer,
        rows: usize,
        channels: usize,
    ) -> Result<()>;

    /// Matrix product `out = op(a)·op(b)`, plus `bias[n]` broadcast over rows when given.
    /// bf16: `a` and `b` may be bf16 together, and `out` may be bf16 or f32 (weight gradients
    /// accumulate in f32); `bias` is f32.
    fn matmul(
        &self,
        out: &mut Self::Buffer,
        a: &Self::Buffer,
        b: &Self::Buffer,
        bias: Option<&Self::Buffer>,
        shape: Matmul,
    ) -> Result<()>;
    /// Bias gradient: `dbias[j] += Σ_rows dout[row, j]` for `dout[rows, cols]`.
    /// bf16: `dout` may be bf16.
    fn bias_backward(
        &self,
        dbias: &mut Self::Buffer,
        dout: &Self::Buffer,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// GELU, tanh approximation (as GPT-2): `out = gelu(inp)`. bf16: all operands bf16
    /// (forward and backward).
    fn gelu_forward(&self, out: &mut Self::Buffer, inp: &Self::Buffer) -> Result<()>;
    /// GELU backward: `dinp = gelu'(inp) · dout`.
    fn gelu_backward(
        &self,
        dinp: &mut Self::Buffer,
        inp: &Self::Buffer,
        dout: &Self::Buffer,
    ) -> Result<()>;

    /// A buffer for what [`Backend::attention_forward`] keeps for backward. By default the
    /// `[batch, heads, seq, seq]` softmax probabilities in `dtype`; a backend that recomputes
    /// them in backward keeps less (the CUDA backend's bf16 tensor-core attention keeps one
    /// f32 log-sum-exp per query row). Its contents belong to the backend.
    fn attention_state(&self, shape: Attention, dtype: DType) -> Result<Self::Buffer> {
        let len = check::elems(&[shape.batch, shape.heads, shape.seq, shape.seq])?;
        self.alloc_output(len, dtype)
    }
    /// Causal multi-head self-attention. `qkv` is `[batch, seq, 3·channels]` (q, k, v side by
    /// side, heads contiguous within each), `out` is `[batch, seq, channels]`, and `att`, from
    /// [`Backend::attention_state`], receives what backward needs (by default the softmax
    /// probabilities, zero above the diagonal). bf16: all operands bf16 (forward and
    /// backward); `att` is whatever `attention_state` made.
    fn attention_forward(
        &self,
        out: &mut Self::Buffer,
        att: &mut Self::Buffer,
        qkv: &Self::Buffer,
        shape: Attention,
    ) -> Result<()>;
    /// Attention backward: overwrites `dqkv` from `dout` and the forward's `qkv`, `out` and
    /// `att`.
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buffer,
        dout: &Self::Buffer,
        qkv: &Self::Buffer,
        out: &Self::Buffer,
        att: &Self::Buffer,
        shape: Attention,
    ) -> Result<()>;

    /// Causal attention of `shape.new` tokens per sequence that follow `shape.past` tokens
    /// whose keys and values are in `cache`: first the new tokens' keys and values (from
    /// `qkv`, `[batch, new, 3·channels]`) are written into the cache at positions
    /// `past..past + new`, then `out` (`[batch, new, channels]`) receives, for the new token at
    /// position `past + t`, attention over positions `0..=past + t`, exactly as
    /// [`Backend::attention_forward`] over the whole sequence computes that row. f32 only.
    fn attention_decode(
        &self,
        out: &mut Self::Buffer,
        cache: &mut Self::Buffer,
        qkv: &Self::Buffer,
        shape: CachedAttention,
    ) -> Result<()>;

    /// Softmax cross-entropy per row: `losses[r] = logsumexp(logits[r,:]) − logits[r, targets[r]]`
    /// for `logits[rows, vocab]` and u32 `targets[rows]`. bf16: `logits` (and `dlogits` in
    /// backward) may be bf16; `losses` is f32.
    fn cross_entropy_forward(
        &self,
        losses: &mut Self::Buffer,
        logits: &Self::Buffer,
        targets: &Self::Buffer,
        rows: usize,
        vocab: usize,
    ) -> Result<()>;
    /// Logits gradient of `scale · Σ_r losses[r]`: `dlogits = scale · (softmax(logits) − onehot)`.
    fn cross_entropy_backward(
        &self,
        dlogits: &mut Self::Buffer,
        logits: &Self::Buffer,
        targets: &Self::Buffer,
        scale: f32,
        rows: usize,
        vocab: usize,
    ) -> Result<()>;

    /// Whether ops compute values. The meta backend (sizes only) says no: the fused ops'
    /// host defaults then do nothing, as its own ops do.
    fn computes(&self) -> bool {
        true
    }

    /// Token embedding without positions: `out[r,:] = table[tokens[r],:]` for u32
    /// `tokens[rows]` and `table[vocab, channels]` (models with rotary positions).
    /// Default: on the host.
    fn embedding_lookup(
        &self,
        out: &mut Self::Buffer,
        tokens: &Self::Buffer,
        table: &Self::Buffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        fused::embedding_lookup(self, out, tokens, table, rows, channels)
    }
    /// [`Backend::embedding_lookup`] backward: `dtable[tokens[r],:] += dout[r,:]`, rows in order.
    fn embedding_lookup_backward(
        &self,
        dtable: &mut Self::Buffer,
        dout: &Self::Buffer,
        tokens: &Self::Buffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        fused::embedding_lookup_backward(self, dtable, dout, tokens, rows, channels)
    }

    /// RMSNorm over the last dimension of `inp[rows, channels]`:
    /// `out = inp · rstd · weight` with `rstd = 1/√(mean(inp²) + eps)`, saved per row for
    /// backward. bf16: `out` may be bf16. Default: on the host, sums in f64.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buffer,
        rstd: &mut Self::Buffer,
        inp: &Self::Buffer,
        weight: &Self::Buffer,
        rows: usize,
        channels: usize,
        eps: f32,
    ) -> Result<()> {
        fused::rmsnorm_forward(self, out, rstd, inp, weight, rows, channels, eps)
    }
    /// RMSNorm backward: overwrites `dinp`, accumulates `dweight`. bf16: `dout` may be bf16.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dinp: &mut Self::Buffer,
        dweight: &mut Self::Buffer,
        dout: &Self::Buffer,
        inp: &Self::Buffer,
        weight: &Self::Buffer,
        rstd: &Self::Buffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        fused::rmsnorm_backward(self, dinp, dweight, dout, inp, weight, rstd, rows, channels)
    }

    /// Rotary position embedding of `inp` into `out` (see [`Rope`]); with `shape.inverse` the
    /// rotation back, which is also its backward. bf16: both may be bf16.
    /// Default: on the host.
    fn rope(&self, out: &mut Self::Buffer, inp: &Self::Buffer, shape: Rope) -> Result<()> {
        fused::rope(self, out, inp, shape)
    }

    /// SwiGLU's gate: `out = silu(gate) · up`, elementwise (`silu(x) = x · σ(x)`).
    /// bf16: all operands bf16. Default: on the host.
    fn swiglu_forward(
        &self,
        out: &mut Self::Buffer,
        gate: &Self::Buffer,
        up: &Self::Buffer,
    ) -> Result<()> {
        fused::swiglu_forward(self, out, gate, up)
    }
    /// SwiGLU backward: overwrites `dgate = dout · up · silu'(gate)` and `dup = dout · silu(gate)`.
    fn swiglu_backward(
        &self,
        dgate: &mut Self::Buffer,
        dup: &mut Self::Buffer,
        gate: &Self::Buffer,
        up: &Self::Buffer,
        dout: &Self::Buffer,
    ) -> Result<()> {
        fused::swiglu_backward(self, dgate, dup, gate, up, dout)
    }

    /// Pack separate queries `q[rows, heads·d]`, keys and values `k, v[rows, kv_heads·d]`
    /// into the `qkv[rows, 3·heads·d]` that [`Backend::attention_forward`] reads, each key and
    /// value head repeated for the `heads / kv_heads` query heads that share it (grouped-query
    /// attention: query head `h` reads key/value head `h / (heads / kv_heads)`).
    /// Default: on the host.
    fn pack_qkv(
        &self,
        qkv: &mut Self::Buffer,
        q: &Self::Buffer,
        k: &Self::Buffer,
        v: &Self::Buffer,
        shape: Heads,
    ) -> Result<()> {
        fused::pack_qkv(self, qkv, q, k, v, shape)
    }
    /// [`Backend::pack_qkv`] backward: overwrites `dq`, and `dk`, `dv` with the sum over the
    /// query heads that shared each key/value head, in head order.
    fn unpack_qkv_grad(
        &self,
        dq: &mut Self::Buffer,
        dk: &mut Self::Buffer,
        dv: &mut Self::Buffer,
        dqkv: &Self::Buffer,
        shape: Heads,
    ) -> Result<()> {
        fused::unpack_qkv_grad(self, dq, dk, dv, dqkv, shape)
    }

    /// One AdamW update of `param` from `grad`, updating the moments `m` and `v` in place.
    fn adamw(
        &self,
        param: &mut Self::Buffer,
        grad: &Self::Buffer,
        m: &mut Self::Buffer,
        v: &mut Self::Buffer,
        hp: AdamW,
    ) -> Result<()>;

    /// Block until all enqueued work has finished (before host reads).
    fn synchronize(&self) -> Result<()>;
    /// The point after all work enqueued so far. A GPU backend records it on its stream and
    /// returns at once; a backend whose ops run as they are called takes the clock.
    fn mark(&self) -> Result<Self::Mark>;
    /// Milliseconds the device took from `start` to `end` (marks of this backend, `end`
    /// made after `start`). Call it after [`Backend::synchronize`]: before, it may wait.
    fn elapsed_ms(&self, start: &Self::Mark, end: &Self::Mark) -> Result<f64>;
    /// Device memory held now and at peak.
    fn memory(&self) -> MemoryStats;
    /// Start a new peak-memory window at the current usage.
    fn reset_peak_memory(&self);
}

/// Moves tensors between ranks. Messages between one pair of ranks arrive in the order they
/// were sent (NCCL's and TCP's guarantee), and `recv` blocks until its message arrives.
///
/// The in-process implementation stages through host memory; NCCL and TCP implementations
/// move the same messages between processes and machines.
pub trait Transport<B: Backend>: Send {
    /// Send `buf` (f32) to rank `to`.
    fn send(&mut self, backend: &B, to: usize, buf: &B::Buffer) -> Result<()>;
    /// Receive the next f32 tensor from rank `from` into a new buffer of `len` values. The
    /// receiver states the length because NCCL must post a receive of known size; a message
    /// of another length is an error, never a silent truncation.
    fn recv(&mut self, backend: &B, from: usize, len: usize) -> Result<B::Buffer>;
    /// This rank has failed and sends nothing more: where the transport can, a peer waiting
    /// on it learns so at once instead of after its timeout. By default nothing (a process
    /// that fails tells its peers on its own).
    fn stop(&mut self) {}
}
