//! Default implementations of the fused ops, written once for every backend.
//!
//! Each checks its operands' sizes and types first (so a wrong call is the same one-line error
//! on every device), then computes: the token-only embedding through the primitive embedding
//! op on the device, the rest on the host from downloaded operands, summing in f64 as the
//! reference backend does, and writing results back (rounded once into a bf16 output). A
//! backend with a kernel for one of them overrides the trait method and calls the op's
//! `check_*` function here first, so the checks are written once; one that
//! [`Backend::computes`] nothing (the meta backend) stops after the checks.

use anyhow::{bail, Result};

use super::{check, Backend, DType, Heads, Rope};

/// Errors unless `buf` holds `len` floats.
fn floats<B: Backend + ?Sized>(b: &B, what: &str, buf: &B::Buffer, len: usize) -> Result<()> {
    check::float(what, b.dtype(buf))?;
    if b.len(buf) != len {
        bail!(
            "{what} holds {} elements but the op needs {len}",
            b.len(buf)
        );
    }
    Ok(())
}

/// Errors unless `buf` is an f32 buffer of `len` elements.
fn f32s<B: Backend + ?Sized>(b: &B, what: &str, buf: &B::Buffer, len: usize) -> Result<()> {
    check::buffer(what, b.len(buf), b.dtype(buf), len, DType::F32)
}

/// Errors unless `src[src_start..][..len]` and `dst[dst_start..][..len]` lie inside f32
/// buffers.
pub fn check_copy_range<B: Backend + ?Sized>(
    b: &B,
    dst: &B::Buffer,
    dst_start: usize,
    src: &B::Buffer,
    src_start: usize,
    len: usize,
) -> Result<()> {
    check::dtype("range copy destination", b.dtype(dst), DType::F32)?;
    check::dtype("range copy source", b.dtype(src), DType::F32)?;
    for (what, start, buf) in [("destination", dst_start, dst), ("source", src_start, src)] {
        if start.checked_add(len).is_none_or(|end| end > b.len(buf)) {
            bail!(
                "range copy: {len} elements from {start} overrun the {what}'s {}",
                b.len(buf)
            );
        }
    }
    Ok(())
}

pub(super) fn copy_range<B: Backend + ?Sized>(
    b: &B,
    dst: &mut B::Buffer,
    dst_start: usize,
    src: &B::Buffer,
    src_start: usize,
    len: usize,
) -> Result<()> {
    check_copy_range(b, dst, dst_start, src, src_start, len)?;
    if !b.computes() || len == 0 {
        return Ok(());
    }
    let mut host = b.download(dst)?;
    let from = b.download(src)?;
    host[dst_start..dst_start + len].copy_from_slice(&from[src_start..src_start + len]);
    b.write(dst, &host)
}

pub(super) fn embedding_lookup<B: Backend + ?Sized>(
    b: &B,
    out: &mut B::Buffer,
    tokens: &B::Buffer,
    table: &B::Buffer,
    rows: usize,
    channels: usize,
) -> Result<()> {
    check::buffer("tokens", b.len(tokens), b.dtype(tokens), rows, DType::U32)?;
    f32s(b, "embedding output", out, check::elems(&[rows, channels])?)?;
    check::dtype("embedding table", b.dtype(table), DType::F32)?;
    if channels == 0 || b.len(table) % channels != 0 {
        bail!(
            "embedding table of {} elements is not rows of {channels} channels",
            b.len(table)
        );
    }
    // Each token as a sequence of one, at position 0 of a zero position table (allocated
    // where nothing is computed too, so the meta backend counts it).
    let zero = b.alloc(channels, DType::F32)?;
    if !b.computes() {
        return Ok(());
    }
    b.embedding_forward_at(out, tokens, table, &zero, rows, 1, 0, channels)
}

pub(super) fn embedding_lookup_backward<B: Backend + ?Sized>(
    b: &B,
    dtable: &mut B::Buffer,
    dout: &B::Buffer,
    tokens: &B::Buffer,
    rows: usize,
    channels: usize,
) -> Result<()> {
    check::buffer("tokens", b.len(tokens), b.dtype(tokens), rows, DType::U32)?;
    f32s(
        b,
        "embedding output gradient",
        dout,
        check::elems(&[rows, channels])?,
    )?;
    check::dtype("embedding table gradient", b.dtype(dtable), DType::F32)?;
    let mut unused = b.alloc(channels, DType::F32)?;
    if !b.computes() {
        return Ok(());
    }
    b.embedding_backward(dtable, &mut unused, dout, tokens, rows, 1, channels)
}

/// [`Backend::rmsnorm_forward`]'s operand checks.
pub fn check_rmsnorm_forward<B: Backend + ?Sized>(
    b: &B,
    out: &B::Buffer,
    rstd: &B::Buffer,
    inp: &B::Buffer,
    weight: &B::Buffer,
    rows: usize,
    channels: usize,
) -> Result<()> {
    let n = check::elems(&[rows, channels])?;
    f32s(b, "rmsnorm input", inp, n)?;
    floats(b, "rmsnorm output", out, n)?;
    f32s(b, "rmsnorm rstd", rstd, rows)?;
    f32s(b, "rmsnorm weight", weight, channels)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_forward<B: Backend + ?Sized>(
    b: &B,
    out: &mut B::Buffer,
    rstd: &mut B::Buffer,
    inp: &B::Buffer,
    weight: &B::Buffer,
    rows: usize,
    channels: usize,
    eps: f32,
) -> Result<()> {
    check_rmsnorm_forward(b, out, rstd, inp, weight, rows, channels)?;
    if !b.computes() {
        return Ok(());
    }
    let n = rows * channels;
    let (x, w) = (b.download(inp)?, b.download(weight)?);
    let mut y = vec![0.0f32; n];
    let mut r = vec![0.0f32; rows];
    for row in 0..rows {
        let xs = &x[row * channels..(row + 1) * channels];
        let ms = xs.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / channels as f64;
        let s = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
        r[row] = s;
        for (c, o) in y[row * channels..(row + 1) * channels]
            .iter_mut()
            .enumerate()
        {
            // As transformers: normalise in f32, then scale by the weight.
            *o = w[c] * (xs[c] * s);
        }
    }
    b.write(out, &y)?;
    b.write(rstd, &r)
}

/// [`Backend::rmsnorm_backward`]'s operand checks.
#[allow(clippy::too_many_arguments)]
pub fn check_rmsnorm_backward<B: Backend + ?Sized>(
    b: &B,
    dinp: &B::Buffer,
    dweight: &B::Buffer,
    dout: &B::Buffer,
    inp: &B::Buffer,
    weight: &B::Buffer,
    rstd: &B::Buffer,
    rows: usize,
    channels: usize,
) -> Result<()> {
    let n = check::elems(&[rows, channels])?;
    f32s(b, "rmsnorm input gradient", dinp, n)?;
    f32s(b, "rmsnorm weight gradient", dweight, channels)?;
    floats(b, "rmsnorm output gradient", dout, n)?;
    f32s(b, "rmsnorm input", inp, n)?;
    f32s(b, "rmsnorm weight", weight, channels)?;
    f32s(b, "rmsnorm rstd", rstd, rows)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_backward<B: Backend + ?Sized>(
    b: &B,
    dinp: &mut B::Buffer,
    dweight: &mut B::Buffer,
    dout: &B::Buffer,
    inp: &B::Buffer,
    weight: &B::Buffer,
    rstd: &B::Buffer,
    rows: usize,
    channels: usize,
) -> Result<()> {
    check_rmsnorm_backward(b, dinp, dweight, dout, inp, weight, rstd, rows, channels)?;
    if !b.computes() {
        return Ok(());
    }
    let n = rows * channels;
    let (dy, x, w, r) = (
        b.download(dout)?,
        b.download(inp)?,
        b.download(weight)?,
        b.download(rstd)?,
    );
    let mut dw: Vec<f64> = b.download(dweight)?.into_iter().map(f64::from).collect();
    let mut dx = vec![0.0f32; n];
    for (((xs, dys), dxs), &s) in x
        .chunks(channels)
        .zip(dy.chunks(channels))
        .zip(dx.chunks_mut(channels))
        .zip(&r)
    {
        let s = f64::from(s);
        // x̂ = x·s; dx = s·(w·dy − x̂·mean(w·dy·x̂)).
        let wdy = |c: usize| f64::from(w[c]) * f64::from(dys[c]);
        let dot = (0..channels)
            .map(|c| wdy(c) * f64::from(xs[c]) * s)
            .sum::<f64>()
            / channels as f64;
        for (c, (d, dwc)) in dxs.iter_mut().zip(dw.iter_mut()).enumerate() {
            let xhat = f64::from(xs[c]) * s;
            *d = (s * (wdy(c) - xhat * dot)) as f32;
            *dwc += f64::from(dys[c]) * xhat;
        }
    }
    b.write(dinp, &dx)?;
    let dw: Vec<f32> = dw.into_iter().map(|v| v as f32).collect();
    b.write(dweight, &dw)
}

/// [`Backend::rope`]'s operand checks.
pub fn check_rope<B: Backend + ?Sized>(
    b: &B,
    out: &B::Buffer,
    inp: &B::Buffer,
    shape: &Rope,
) -> Result<()> {
    if shape.head_dim == 0 || shape.head_dim % 2 != 0 {
        bail!(
            "rotary embedding needs an even head size, got {}",
            shape.head_dim
        );
    }
    if !(shape.theta > 1.0 && shape.theta.is_finite()) {
        bail!(
            "rotary embedding needs a base θ above 1, got {}",
            shape.theta
        );
    }
    let n = check::elems(&[shape.batch, shape.seq, shape.heads, shape.head_dim])?;
    floats(b, "rotary embedding input", inp, n)?;
    floats(b, "rotary embedding output", out, n)
}

pub(super) fn rope<B: Backend + ?Sized>(
    b: &B,
    out: &mut B::Buffer,
    inp: &B::Buffer,
    shape: Rope,
) -> Result<()> {
    check_rope(b, out, inp, &shape)?;
    if !b.computes() {
        return Ok(());
    }
    let n = b.len(inp);
    let table = shape.cos_sin();
    let x = b.download(inp)?;
    let mut y = vec![0.0f32; n];
    let (half, d) = (shape.head_dim / 2, shape.head_dim);
    let sign = if shape.inverse { -1.0f32 } else { 1.0 };
    for (i, (xs, ys)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
        let t = (i / shape.heads) % shape.seq;
        for j in 0..half {
            let (c, s) = (
                table[2 * (t * half + j)],
                sign * table[2 * (t * half + j) + 1],
            );
            // As transformers: x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁).
            ys[j] = xs[j] * c + (-xs[j + half]) * s;
            ys[j + half] = xs[j + half] * c + xs[j] * s;
        }
    }
    b.write(out, &y)
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// [`Backend::swiglu_forward`]'s operand checks.
pub fn check_swiglu_forward<B: Backend + ?Sized>(
    b: &B,
    out: &B::Buffer,
    gate: &B::Buffer,
    up: &B::Buffer,
) -> Result<()> {
    let n = b.len(gate);
    floats(b, "swiglu gate", gate, n)?;
    floats(b, "swiglu up", up, n)?;
    floats(b, "swiglu output", out, n)
}

pub(super) fn swiglu_forward<B: Backend + ?Sized>(
    b: &B,
    out: &mut B::Buffer,
    gate: &B::Buffer,
    up: &B::Buffer,
) -> Result<()> {
    check_swiglu_forward(b, out, gate, up)?;
    if !b.computes() {
        return Ok(());
    }
    let (g, u) = (b.download(gate)?, b.download(up)?);
    let y: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| (silu(f64::from(g)) as f32) * u)
        .collect();
    b.write(out, &y)
}

/// [`Backend::swiglu_backward`]'s operand checks.
pub fn check_swiglu_backward<B: Backend + ?Sized>(
    b: &B,
    dgate: &B::Buffer,
    dup: &B::Buffer,
    gate: &B::Buffer,
    up: &B::Buffer,
    dout: &B::Buffer,
) -> Result<()> {
    let n = b.len(gate);
    for (what, buf) in [
        ("swiglu gate", gate),
        ("swiglu up", up),
        ("swiglu output gradient", dout),
    ] {
        floats(b, what, buf, n)?;
    }
    floats(b, "swiglu gate gradient", dgate, n)?;
    floats(b, "swiglu up gradient", dup, n)
}

pub(super) fn swiglu_backward<B: Backend + ?Sized>(
    b: &B,
    dgate: &mut B::Buffer,
    dup: &mut B::Buffer,
    gate: &B::Buffer,
    up: &B::Buffer,
    dout: &B::Buffer,
) -> Result<()> {
    check_swiglu_backward(b, dgate, dup, gate, up, dout)?;
    if !b.computes() {
        return Ok(());
    }
    let n = b.len(gate);
    let (g, u, dy) = (b.download(gate)?, b.download(up)?, b.download(dout)?);
    let mut dg = vec![0.0f32; n];
    let mut du = vec![0.0f32; n];
    for i in 0..n {
        let x = f64::from(g[i]);
        let sig = 1.0 / (1.0 + (-x).exp());
        let dsilu = sig * (1.0 + x * (1.0 - sig));
        dg[i] = (f64::from(dy[i]) * f64::from(u[i]) * dsilu) as f32;
        du[i] = (f64::from(dy[i]) * (x * sig)) as f32;
    }
    b.write(dgate, &dg)?;
    b.write(dup, &du)
}

/// Checks a grouped-query layout; returns the widths of `q` and of `k`/`v` rows.
fn heads_widths(shape: &Heads) -> Result<(usize, usize)> {
    if shape.kv_heads == 0 || shape.heads % shape.kv_heads != 0 {
        bail!(
            "grouped-query attention needs key/value heads dividing the {} query heads, got {}",
            shape.heads,
            shape.kv_heads
        );
    }
    Ok((
        check::elems(&[shape.heads, shape.head_dim])?,
        check::elems(&[shape.kv_heads, shape.head_dim])?,
    ))
}

/// [`Backend::pack_qkv`]'s operand checks.
pub fn check_pack_qkv<B: Backend + ?Sized>(
    b: &B,
    qkv: &B::Buffer,
    q: &B::Buffer,
    k: &B::Buffer,
    v: &B::Buffer,
    shape: &Heads,
) -> Result<()> {
    let (qw, kw) = heads_widths(shape)?;
    let rows = shape.rows;
    floats(b, "queries", q, check::elems(&[rows, qw])?)?;
    floats(b, "keys", k, check::elems(&[rows, kw])?)?;
    floats(b, "values", v, check::elems(&[rows, kw])?)?;
    floats(b, "packed qkv", qkv, check::elems(&[rows, 3, qw])?)
}

pub(super) fn pack_qkv<B: Backend + ?Sized>(
    b: &B,
    qkv: &mut B::Buffer,
    q: &B::Buffer,
    k: &B::Buffer,
    v: &B::Buffer,
    shape: Heads,
) -> Result<()> {
    check_pack_qkv(b, qkv, q, k, v, &shape)?;
    if !b.computes() {
        return Ok(());
    }
    let (qw, kw) = heads_widths(&shape)?;
    let rows = shape.rows;
    let (q, k, v) = (b.download(q)?, b.download(k)?, b.download(v)?);
    let (d, group) = (shape.head_dim, shape.heads / shape.kv_heads);
    let mut out = vec![0.0f32; rows * 3 * qw];
    for r in 0..rows {
        let row = &mut out[r * 3 * qw..(r + 1) * 3 * qw];
        row[..qw].copy_from_slice(&q[r * qw..(r + 1) * qw]);
        for h in 0..shape.heads {
            let src = r * kw + (h / group) * d;
            row[qw + h * d..qw + (h + 1) * d].copy_from_slice(&k[src..src + d]);
            row[2 * qw + h * d..2 * qw + (h + 1) * d].copy_from_slice(&v[src..src + d]);
        }
    }
    b.write(qkv, &out)
}

/// [`Backend::unpack_qkv_grad`]'s operand checks.
pub fn check_unpack_qkv_grad<B: Backend + ?Sized>(
    b: &B,
    dq: &B::Buffer,
    dk: &B::Buffer,
    dv: &B::Buffer,
    dqkv: &B::Buffer,
    shape: &Heads,
) -> Result<()> {
    let (qw, kw) = heads_widths(shape)?;
    let rows = shape.rows;
    floats(
        b,
        "packed qkv gradient",
        dqkv,
        check::elems(&[rows, 3, qw])?,
    )?;
    floats(b, "query gradient", dq, check::elems(&[rows, qw])?)?;
    floats(b, "key gradient", dk, check::elems(&[rows, kw])?)?;
    floats(b, "value gradient", dv, check::elems(&[rows, kw])?)
}

pub(super) fn unpack_qkv_grad<B: Backend + ?Sized>(
    b: &B,
    dq: &mut B::Buffer,
    dk: &mut B::Buffer,
    dv: &mut B::Buffer,
    dqkv: &B::Buffer,
    shape: Heads,
) -> Result<()> {
    check_unpack_qkv_grad(b, dq, dk, dv, dqkv, &shape)?;
    if !b.computes() {
        return Ok(());
    }
    let (qw, kw) = heads_widths(&shape)?;
    let rows = shape.rows;
    let g = b.download(dqkv)?;
    let (d, group) = (shape.head_dim, shape.heads / shape.kv_heads);
    let mut q = vec![0.0f32; rows * qw];
    let mut k = vec![0.0f64; rows * kw];
    let mut v = vec![0.0f64; rows * kw];
    for r in 0..rows {
        let row = &g[r * 3 * qw..(r + 1) * 3 * qw];
        q[r * qw..(r + 1) * qw].copy_from_slice(&row[..qw]);
        for h in 0..shape.heads {
            let dst = r * kw + (h / group) * d;
            for e in 0..d {
                k[dst + e] += f64::from(row[qw + h * d + e]);
                v[dst + e] += f64::from(row[2 * qw + h * d + e]);
            }
        }
    }
    let narrow = |x: Vec<f64>| x.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    b.write(dq, &q)?;
    b.write(dk, &narrow(k))?;
    b.write(dv, &narrow(v))
}
