//! The token embedding, with learned positions (GPT-2) or without (rotary models).

use anyhow::Result;

use super::{Init, ParamSpec};
use crate::backend::{Backend, DType};
use crate::model::params::Params;

/// Rows of `tokens` (`[vocab, C]`), plus `positions` (`[n_positions, C]`) when learned.
#[derive(Clone, Debug)]
pub(crate) struct Embedding {
    pub(crate) tokens: String,
    pub(crate) positions: Option<String>,
    pub(crate) vocab: usize,
    pub(crate) n_positions: usize,
    pub(crate) channels: usize,
    pub(crate) std: f64,
}

impl Embedding {
    pub(crate) fn params(&self) -> Vec<ParamSpec> {
        let c = self.channels;
        let table =
            |name: &str, rows| ParamSpec::new(name, vec![rows, c], Init::Normal(self.std), false);
        let mut out = vec![table(&self.tokens, self.vocab)];
        if let Some(positions) = &self.positions {
            out.push(table(positions, self.n_positions));
        }
        out
    }

    /// `out[b, t] = tokens[ids[b, t]] (+ positions[start + t])`, f32 `[batch·seq, C]`.
    pub(crate) fn forward<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        ids: &B::Buffer,
        (batch, seq, start): (usize, usize, usize),
    ) -> Result<B::Buffer> {
        let c = self.channels;
        let mut out = b.alloc_output(batch * seq * c, DType::F32)?;
        let table = p.value(&self.tokens)?;
        match &self.positions {
            Some(pos) => {
                let pos = p.value(pos)?;
                b.embedding_forward_at(&mut out, ids, table, pos, batch, seq, start, c)?
            }
            None => b.embedding_lookup(&mut out, ids, table, batch * seq, c)?,
        }
        Ok(out)
    }

    /// The embedding of `rows` tokens `ids` at the positions `positions` (u32 `[rows]`, the
    /// rows of several sequences, each from its own place): the same sums as
    /// [`Self::forward`] gives each row.
    pub(crate) fn forward_at_positions<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        ids: &B::Buffer,
        positions: &B::Buffer,
        rows: usize,
    ) -> Result<B::Buffer> {
        let c = self.channels;
        let mut out = b.alloc_output(rows * c, DType::F32)?;
        b.embedding_lookup(&mut out, ids, p.value(&self.tokens)?, rows, c)?;
        if let Some(pos) = &self.positions {
            let mut at = b.alloc_output(rows * c, DType::F32)?;
            b.embedding_lookup(&mut at, positions, p.value(pos)?, rows, c)?;
            let tokens = std::mem::replace(&mut out, b.alloc_output(rows * c, DType::F32)?);
            b.add(&mut out, &tokens, &at)?;
        }
        Ok(out)
    }

    /// Accumulate the tables' gradients from `dout`.
    pub(crate) fn backward<B: Backend>(
        &self,
        b: &B,
        p: &mut Params<B>,
        dout: &B::Buffer,
        ids: &B::Buffer,
        (batch, seq): (usize, usize),
    ) -> Result<()> {
        let c = self.channels;
        match &self.positions {
            Some(pos) => {
                let (dtok, dpos) = p.grads_pair_mut(&self.tokens, pos)?;
                b.embedding_backward(dtok, dpos, dout, ids, batch, seq, c)
            }
            None => {
                b.embedding_lookup_backward(p.grad_mut(&self.tokens)?, dout, ids, batch * seq, c)
            }
        }
    }
}
