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

/// This rank's view of a group: the members (the first is the root), who this rank is, and
/// how it reaches the others.
pub struct Group<'a, B: Backend, T: Transport<B>> {
    members: &'a [usize],
    me: usize,
    backend: &'a B,
    transport: &'a mut T,
}

impl<'a, B: Backend, T: Transport<B>> Group<'a, B, T> {
    /// Rank `me`'s view of `members`; an error for an empty group or one `me` is not in.
    pub fn new(
        members: &'a [usize],
        me: usize,
        backend: &'a B,
        transport: &'a mut T,
    ) -> Result<Self> {
        if members.is_empty() {
            return Err(anyhow!("a collective over an empty group"));
        }
        if !members.contains(&me) {
            return Err(anyhow!("rank {me} is not in the group {members:?}"));
        }
        Ok(Group {
            members,
            me,
            backend,
            transport,
        })
    }

    fn root(&self) -> usize {
        self.members[0]
    }

    /// The members other than the root, in member order.
    fn others(&self) -> impl Iterator<Item = usize> + 'a {
        let root = self.root();
        self.members.iter().copied().filter(move |&r| r != root)
    }

    /// Replace `buf` on every member with the members' sum: at the root, its own value plus
    /// each other member's in member order.
    pub fn all_reduce_sum(&mut self, buf: &mut B::Buffer) -> Result<()> {
        let len = self.backend.len(buf);
        if self.me == self.root() {
            for member in self.others() {
                let part = self.transport.recv(self.backend, member, len)?;
                self.backend.add_assign(buf, &part)?;
            }
        } else {
            self.transport.send(self.backend, self.root(), buf)?;
        }
        self.broadcast(buf)
    }

    /// `value` summed over the members, on every member: in f64 at the root, its own first and
    /// then each other member's in member order, rounded to f32 once (each contribution
    /// travels as f32).
    pub fn all_reduce_sum_scalar(&mut self, value: f32) -> Result<f32> {
        let b = self.backend;
        let mut total = if self.me == self.root() {
            let mut sum = f64::from(value);
            for member in self.others() {
                sum += f64::from(b.download(&self.transport.recv(b, member, 1)?)?[0]);
            }
            b.upload(&[sum as f32])?
        } else {
            self.transport.send(b, self.root(), &b.upload(&[value])?)?;
            b.upload(&[0.0])?
        };
        self.broadcast(&mut total)?;
        Ok(b.download(&total)?[0])
    }

    /// Replace `buf` on every member with the root's.
    pub fn broadcast(&mut self, buf: &mut B::Buffer) -> Result<()> {
        if self.me == self.root() {
            for member in self.others() {
                self.transport.send(self.backend, member, buf)?;
            }
        } else {
            let value = self
                .transport
                .recv(self.backend, self.root(), self.backend.len(buf))?;
            self.backend.copy(buf, &value)?;
        }
        Ok(())
    }
}
