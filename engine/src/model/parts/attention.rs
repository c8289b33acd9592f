//! Causal self-attention: queries, keys and values from the normed input (one packed
//! projection, or three with grouped key/value heads), rotary positions where the family uses
//! them, and attention over the whole sequence or against a cache. The output projection is
//! the block's.

use anyhow::{Context, Result};

use super::{Linear, ParamSpec};
use crate::backend::{Attention, Backend, CachedAttention, DType, Heads, Rope};
use crate::model::params::Params;
use crate::model::weight_grads::{WeightGrads, WeightJob};

/// Where the queries, keys and values come from.
#[derive(Clone, Debug)]
pub(crate) enum Qkv {
    /// One projection to `[q | k | v]` (GPT-2's `c_attn`); as many key/value heads as queries.
    Packed(Linear),
    /// Three projections; `k` and `v` have `kv_heads` heads each.
    Split { q: Linear, k: Linear, v: Linear },
}

/// Attention with `heads` query heads sharing `kv_heads` key/value heads of `head_dim`.
#[derive(Clone, Debug)]
pub(crate) struct SelfAttention {
    pub(crate) qkv: Qkv,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Rotary positions with this base θ; `None`: positions come from the embedding.
    pub(crate) rope: Option<f32>,
}

/// What attention keeps for backward.
pub(crate) struct AttnActs<B: Backend> {
    /// `[rows, 3·heads·head_dim]` as attention read it (after rotary positions).
    qkv: B::Buffer,
    /// What attention keeps for backward; `None` after attention against a cache.
    att: Option<B::Buffer>,
}

impl<B: Backend> AttnActs<B> {
    pub(crate) fn bytes(&self, b: &B) -> u64 {
        b.bytes(&self.qkv) + self.att.as_ref().map_or(0, |a| b.bytes(a))
    }
}

/// What attention sees besides the tokens it is given.
pub(crate) enum Past<'a, B: Backend> {
    /// Nothing: the tokens are whole sequences.
    Nothing,
    /// The keys and values of the tokens before them, in this block's cache (decoding).
    Cached(&'a mut B::Buffer, CachedAttention),
    /// Several sequences one after the other, each with its own cache (a sequence of the
    /// batch) and as many new tokens as its shape says, at its own positions: the tokens'
    /// rows are the first sequence's new ones, then the second's, and so on.
    Ragged(Vec<(&'a mut B::Buffer, CachedAttention)>),
}

/// Sizes of one micro-batch as the parts see it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tokens {
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    /// Position of each sequence's first token.
    pub(crate) start: usize,
    /// Element type of the activations inside the layer.
    pub(crate) act: DType,
}

impl Tokens {
    pub(crate) fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

impl SelfAttention {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn shape(&self, t: Tokens) -> Attention {
        Attention {
            batch: t.batch,
            seq: t.seq,
            channels: self.width(),
            heads: self.heads,
        }
    }

    fn heads_of(&self, rows: usize) -> Heads {
        Heads {
            rows,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    fn rope(&self, t: Tokens, heads: usize, inverse: bool) -> Option<Rope> {
        self.rope.map(|theta| Rope {
            batch: t.batch,
            seq: t.seq,
            heads,
            head_dim: self.head_dim,
            start: t.start,
            theta,
            inverse,
        })
    }

    /// `x` turned by the rotary positions (forward or `inverse`), or `x` itself without them.
    fn rotated<B: Backend>(
        &self,
        b: &B,
        x: B::Buffer,
        t: Tokens,
        heads: usize,
        inverse: bool,
    ) -> Result<B::Buffer> {
        match self.rope(t, heads, inverse) {
            None => Ok(x),
            Some(shape) => {
                let mut out = b.alloc_output(b.len(&x), b.dtype(&x))?;
                b.rope(&mut out, &x, shape)?;
                Ok(out)
            }
        }
    }

    pub(crate) fn params(&self) -> Vec<ParamSpec> {
        match &self.qkv {
            Qkv::Packed(l) => l.params(),
            Qkv::Split { q, k, v } => [q, k, v].into_iter().flat_map(Linear::params).collect(),
        }
    }

    /// Multiply-adds per token of the projections.
    pub(crate) fn macs(&self) -> f64 {
        match &self.qkv {
            Qkv::Packed(l) => l.macs(),
            Qkv::Split { q, k, v } => q.macs() + k.macs() + v.macs(),
        }
    }

    /// Multiply-adds per token of the scores and the mixing, over sequences of `seq`.
    pub(crate) fn mixing_macs(&self, seq: usize) -> f64 {
        2.0 * seq as f64 * self.width() as f64
    }

    /// The attention output `[rows, heads·head_dim]` of the normed input `x`.
    pub(crate) fn forward<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        x: &B::Buffer,
        t: Tokens,
        past: Past<'_, B>,
    ) -> Result<(B::Buffer, AttnActs<B>)> {
        let rows = t.rows();
        let qkv = match &self.qkv {
            Qkv::Packed(l) => l.forward(b, p, x, rows, t.act)?,
            Qkv::Split { q, k, v } => {
                let q = q.forward(b, p, x, rows, t.act)?;
                let q = self.rotated_at(b, q, t, &past, self.heads)?;
                let k = k.forward(b, p, x, rows, t.act)?;
                let k = self.rotated_at(b, k, t, &past, self.kv_heads)?;
                let v = v.forward(b, p, x, rows, t.act)?;
                let mut qkv = b.alloc_output(rows * 3 * self.width(), t.act)?;
                b.pack_qkv(&mut qkv, &q, &k, &v, self.heads_of(rows))?;
                qkv
            }
        };
        let mut y = b.alloc_output(rows * self.width(), t.act)?;
        let att = match past {
            Past::Nothing => {
                let mut att = b.attention_state(self.shape(t), t.act)?;
                b.attention_forward(&mut y, &mut att, &qkv, self.shape(t))?;
                Some(att)
            }
            Past::Cached(cache, shape) => {
                b.attention_decode(&mut y, cache, &qkv, shape)?;
                None
            }
            Past::Ragged(sequences) => {
                let width = self.width();
                let mut row = 0;
                for (cache, shape) in sequences {
                    let n = shape.new;
                    let mut part = b.alloc(n * 3 * width, DType::F32)?;
                    b.copy_range(&mut part, 0, &qkv, row * 3 * width, n * 3 * width)?;
                    let mut out = b.alloc(n * width, DType::F32)?;
                    b.attention_decode(&mut out, cache, &part, shape)?;
                    b.copy_range(&mut y, row * width, &out, 0, n * width)?;
                    row += n;
                }
                None
            }
        };
        Ok((y, AttnActs { qkv, att }))
    }

    /// `x` (`[rows, heads·head_dim]`) turned by the rotary positions of its tokens, as the
    /// forward pass with `past` places them: after their caches for ragged sequences, each
    /// sequence's rows by its own position.
    fn rotated_at<B: Backend>(
        &self,
        b: &B,
        x: B::Buffer,
        t: Tokens,
        past: &Past<'_, B>,
        heads: usize,
    ) -> Result<B::Buffer> {
        let Past::Ragged(sequences) = past else {
            return self.rotated(b, x, t, heads, false);
        };
        if self.rope.is_none() {
            return Ok(x);
        }
        let width = heads * self.head_dim;
        let mut out = b.alloc_output(b.len(&x), b.dtype(&x))?;
        let mut row = 0;
        for (_, shape) in sequences {
            let n = shape.new;
            let mut part = b.alloc(n * width, DType::F32)?;
            b.copy_range(&mut part, 0, &x, row * width, n * width)?;
            let at = Tokens {
                batch: 1,
                seq: n,
                start: shape.past,
                act: t.act,
            };
            let part = self.rotated(b, part, at, heads, false)?;
            b.copy_range(&mut out, row * width, &part, 0, n * width)?;
            row += n;
        }
        Ok(out)
    }

    /// The gradient of the normed input (`x`, which the weight gradients take over) from the
    /// output's gradient `dy`; biases accumulate, weight products go to `wg`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward<B: Backend>(
        &self,
        b: &B,
        p: &mut Params<B>,
        a: AttnActs<B>,
        y: &B::Buffer,
        dy: B::Buffer,
        x: B::Buffer,
        t: Tokens,
        wg: &mut WeightGrads<B>,
    ) -> Result<B::Buffer> {
        let rows = t.rows();
        let AttnActs { qkv, att } = a;
        let mut dqkv = b.alloc_output(rows * 3 * self.width(), t.act)?;
        let att = att.context("attention run against a cache has no backward")?;
        b.attention_backward(&mut dqkv, &dy, &qkv, y, &att, self.shape(t))?;
        drop((dy, qkv, att));
        match &self.qkv {
            Qkv::Packed(l) => {
                l.bias_grad(b, p, &dqkv, rows)?;
                let dx = l.input_grad(b, p, &dqkv, rows, t.act)?;
                wg.push(b, p, l.job(x, dqkv, rows))?;
                Ok(dx)
            }
            Qkv::Split { q, k, v } => {
                let kv_width = self.kv_heads * self.head_dim;
                let mut dq = b.alloc_output(rows * self.width(), t.act)?;
                let mut dk = b.alloc_output(rows * kv_width, t.act)?;
                let mut dv = b.alloc_output(rows * kv_width, t.act)?;
                b.unpack_qkv_grad(&mut dq, &mut dk, &mut dv, &dqkv, self.heads_of(rows))?;
                drop(dqkv);
                let dq = self.rotated(b, dq, t, self.heads, true)?;
                let dk = self.rotated(b, dk, t, self.kv_heads, true)?;
                // Three products into one gradient: summed in f32.
                let mut dx = b.alloc_output(rows * q.fan_in, DType::F32)?;
                for (i, (l, d)) in [(q, &dq), (k, &dk), (v, &dv)].into_iter().enumerate() {
                    l.bias_grad(b, p, d, rows)?;
                    l.input_grad_into(b, p, &mut dx, d, rows, i > 0)?;
                }
                let products = vec![
                    (q.product(rows), dq),
                    (k.product(rows), dk),
                    (v.product(rows), dv),
                ];
                wg.push(b, p, WeightJob::new(x, products))?;
                Ok(dx)
            }
        }
    }
}
