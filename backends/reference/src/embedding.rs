//! Token + position embedding, forward and backward.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use crate::buffer::{elems, expect_len};

/// Checked sizes of one embedding call.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    seq: usize,
    /// Position of the first token of every sequence.
    start: usize,
    channels: usize,
}

impl Dims {
    /// Check the tables and the token ids against `batch`, `seq` tokens from position `start`,
    /// and `channels`.
    pub(crate) fn check(
        tokens: &[u32],
        wte_len: usize,
        wpe_len: usize,
        batch: usize,
        seq: usize,
        start: usize,
        channels: usize,
    ) -> Result<Self> {
        if channels == 0 {
            bail!("embedding needs at least one channel");
        }
        expect_len("tokens", tokens.len(), elems(&[batch, seq])?)?;
        if wte_len % channels != 0 || wpe_len % channels != 0 {
            bail!("embedding tables ({wte_len} and {wpe_len} elements) are not whole rows of {channels} channels");
        }
        let (vocab, positions) = (wte_len / channels, wpe_len / channels);
        if start + seq > positions {
            bail!(
                "positions {start}..{} exceed the {positions} positions of wpe",
                start + seq
            );
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary of {vocab}");
        }
        Ok(Self {
            seq,
            start,
            channels,
        })
    }
}

/// `out[b,t,:] = wte[tokens[b,t],:] + wpe[start + t,:]`.
pub(crate) fn forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], d: Dims) {
    let c = d.channels;
    for (row, (o, &tok)) in out.chunks_exact_mut(c).zip(tokens).enumerate() {
        let t = d.start + row % d.seq;
        let w = &wte[tok as usize * c..][..c];
        let p = &wpe[t * c..][..c];
        for ((o, &w), &p) in o.iter_mut().zip(w).zip(p) {
            *o = w + p;
        }
    }
}

/// `dwte[tokens[b,t],:] += dout[b,t,:]` and `dwpe[t,:] += dout[b,t,:]`, summed in f64 first
/// because a frequent token or a position collects many rows.
pub(crate) fn backward(dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], tokens: &[u32], d: Dims) {
    let c = d.channels;
    let mut by_token: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    let mut by_position = vec![0f64; d.seq * c];
    for (row, (g, &tok)) in dout.chunks_exact(c).zip(tokens).enumerate() {
        let t = row % d.seq;
        let sum = by_token.entry(tok).or_insert_with(|| vec![0.0; c]);
        for ((s, p), &g) in sum.iter_mut().zip(&mut by_position[t * c..][..c]).zip(g) {
            *s += g as f64;
            *p += g as f64;
        }
    }
    for (tok, sum) in by_token {
        for (w, s) in dwte[tok as usize * c..][..c].iter_mut().zip(sum) {
            *w = (*w as f64 + s) as f32;
        }
    }
    for (w, s) in dwpe.iter_mut().zip(by_position) {
        *w = (*w as f64 + s) as f32;
    }
}
