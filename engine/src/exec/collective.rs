//! Collectives over a group of ranks, written once over any [`Transport`]: the group's first
//! member is its root; a reduction gathers the other members' contributions at the root in
//! member order, reduces them there, and sends the result back to each member. The order of
//! every sum is therefore fixed by the group alone — the same on every transport, and from
//! run to run — and every member ends with the same bits.
//!
//! The step's gradient norm is an all-reduce over every rank, and a parameter shared between
//! the first and the last stage (a tied embedding) an all-reduce over the ranks holding them.

use anyhow::{anyhow, Result};

use crate::backend::{Backend, Transport};

/// The root of `group` (its first member), or an error for an empty group or one `me` is not
/// in.
fn root_of(group: &[usize], me: usize) -> Result<usize> {
    let root = *group
        .first()
        .ok_or_else(|| anyhow!("a collective over an empty group"))?;
    if !group.contains(&me) {
        return Err(anyhow!("rank {me} is not in the group {group:?}"));
    }
    Ok(root)
}

/// Replace `buf` on every member of `group` with the members' sum: at the root, its own value
/// plus each other member's in member order.
pub fn all_reduce_sum<B: Backend, T: Transport<B>>(
    group: &[usize],
    me: usize,
    backend: &B,
    transport: &mut T,
    buf: &mut B::Buffer,
) -> Result<()> {
    let root = root_of(group, me)?;
    let len = backend.len(buf);
    if me == root {
        for &member in group.iter().filter(|&&r| r != root) {
            let part = transport.recv(backend, member, len)?;
            backend.add_assign(buf, &part)?;
        }
    } else {
        transport.send(backend, root, buf)?;
    }
    broadcast(group, me, backend, transport, buf)
}

/// `value` summed over `group` on every member: in f64 at the root, its own first and then each
/// other member's in member order, rounded to f32 once (each contribution travels as f32).
pub fn all_reduce_sum_scalar<B: Backend, T: Transport<B>>(
    group: &[usize],
    me: usize,
    backend: &B,
    transport: &mut T,
    value: f32,
) -> Result<f32> {
    let root = root_of(group, me)?;
    let mut total = if me == root {
        let mut sum = f64::from(value);
        for &member in group.iter().filter(|&&r| r != root) {
            sum += f64::from(backend.download(&transport.recv(backend, member, 1)?)?[0]);
        }
        backend.upload(&[sum as f32])?
    } else {
        transport.send(backend, root, &backend.upload(&[value])?)?;
        backend.upload(&[0.0])?
    };
    broadcast(group, me, backend, transport, &mut total)?;
    Ok(backend.download(&total)?[0])
}

/// Replace `buf` on every member of `group` with the root's.
pub fn broadcast<B: Backend, T: Transport<B>>(
    group: &[usize],
    me: usize,
    backend: &B,
    transport: &mut T,
    buf: &mut B::Buffer,
) -> Result<()> {
    let root = root_of(group, me)?;
    if me == root {
        for &member in group.iter().filter(|&&r| r != root) {
            transport.send(backend, member, buf)?;
        }
    } else {
        let value = transport.recv(backend, root, backend.len(buf))?;
        backend.copy(buf, &value)?;
    }
    Ok(())
}
