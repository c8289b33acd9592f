//! Text data: the train/validation split, random training batches, and the consecutive
//! windows evaluation walks.
//!
//! Tokens are bytes (a vocabulary of 256), or the ids of a checkpoint's [`Tokenizer`]. A
//! training batch is a pure function of `(seed, step)`, so a resumed run sees exactly the
//! batches an uninterrupted run would have.

use anyhow::Result;

use crate::invalid_input;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

/// A corpus cut into a training part and a held-out validation tail, as tokens.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// The leading part, trained on.
    pub train: Vec<u32>,
    /// The trailing part, held out.
    pub val: Vec<u32>,
}

impl Corpus {
    /// Hold out the last `val_fraction` of `text` for validation; its bytes are the tokens.
    pub fn split(text: &[u8], val_fraction: f64) -> Result<Self> {
        Self::tokenized(text, val_fraction, &Tokenizer::Bytes)
    }

    /// Hold out the last `val_fraction` of `text` ([`split_text`]) and turn each part into
    /// `tokenizer`'s tokens.
    pub fn tokenized(text: &[u8], val_fraction: f64, tokenizer: &Tokenizer) -> Result<Self> {
        let (train, val) = split_text(text, val_fraction)?;
        Ok(Self {
            train: tokenizer.encode_bytes(train)?,
            val: tokenizer.encode_bytes(val)?,
        })
    }

    /// A checksum of every token, training part then validation (FNV-1a over their
    /// little-endian bytes): processes that must train on the same tokens compare it.
    pub fn checksum(&self) -> u64 {
        let mut h = crate::dist::frame::Fnv64::new();
        for t in self.train.iter().chain(&self.val) {
            h.update(&t.to_le_bytes());
        }
        h.finish()
    }
}

/// `text` as its leading part and its held-out tail, the last `val_fraction` of its bytes; the
/// cut moves forward past UTF-8 continuation bytes, so it never splits a character.
pub fn split_text(text: &[u8], val_fraction: f64) -> Result<(&[u8], &[u8])> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(invalid_input!(
            "validation fraction must be in [0, 1), got {val_fraction}"
        ));
    }
    let mut cut = ((text.len() as f64) * (1.0 - val_fraction)).round() as usize;
    while cut < text.len() && text[cut] & 0xC0 == 0x80 {
        cut += 1;
    }
    Ok(text.split_at(cut))
}

/// `batch` sequences of `seq` input tokens and their next-token targets, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Input tokens `[batch·seq]`.
    pub inputs: Vec<u32>,
    /// Target tokens `[batch·seq]`: each input's successor in the text.
    pub targets: Vec<u32>,
}

impl Batch {
    /// The window of `data` (bytes, or token ids) starting at each offset, as inputs and
    /// shifted targets.
    pub fn from_offsets<T: Copy + Into<u32>>(data: &[T], offsets: &[usize], seq: usize) -> Self {
        let mut inputs = Vec::with_capacity(offsets.len() * seq);
        let mut targets = Vec::with_capacity(offsets.len() * seq);
        for &o in offsets {
            inputs.extend(data[o..o + seq].iter().map(|&t| t.into()));
            targets.extend(data[o + 1..o + seq + 1].iter().map(|&t| t.into()));
        }
        Self {
            batch: offsets.len(),
            seq,
            inputs,
            targets,
        }
    }

    /// Micro-batch `i` of `m` equal parts (whole sequences); `batch` must divide by `m`.
    pub fn microbatch(&self, i: usize, m: usize) -> Batch {
        let rows = self.batch / m;
        let span = rows * self.seq;
        Batch {
            batch: rows,
            seq: self.seq,
            inputs: self.inputs[i * span..(i + 1) * span].to_vec(),
            targets: self.targets[i * span..(i + 1) * span].to_vec(),
        }
    }
}

/// The training batch of `step`: `batch` windows at offsets drawn from `(seed, step)`.
pub fn sample_batch<T: Copy + Into<u32>>(
    data: &[T],
    batch: usize,
    seq: usize,
    seed: u64,
    step: u64,
) -> Result<Batch> {
    if data.len() < seq + 2 {
        return Err(invalid_input!(
            "the training text ({} tokens) must be longer than seq-len + 1 = {}",
            data.len(),
            seq + 1
        ));
    }
    let span = (data.len() - seq - 1) as u64;
    let mut rng = Rng::for_name(seed, &format!("batch {step}"));
    let offsets: Vec<usize> = (0..batch).map(|_| rng.below(span) as usize).collect();
    Ok(Batch::from_offsets(data, &offsets, seq))
}

/// The evaluation windows of `data` (see [`window_offsets`]), at most `max_tokens` tokens of
/// them (0: all), grouped `rows` windows to a batch; an error when not even one window fits.
pub fn eval_batches<T: Copy + Into<u32>>(
    data: &[T],
    seq: usize,
    max_tokens: usize,
    rows: usize,
) -> Result<Vec<Batch>> {
    let mut offsets = window_offsets(data.len(), seq);
    if max_tokens > 0 {
        offsets.truncate(max_tokens.div_ceil(seq));
    }
    if offsets.is_empty() {
        return Err(invalid_input!(
            "the evaluation text ({} tokens) is shorter than one window of {seq} tokens + 1",
            data.len()
        ));
    }
    Ok(offsets
        .chunks(rows.max(1))
        .map(|c| Batch::from_offsets(data, c, seq))
        .collect())
}

/// Consecutive non-overlapping windows of `seq` tokens: window `k` has inputs
/// `[k·seq, (k+1)·seq)` and targets shifted by one, for every `k` with `(k+1)·seq + 1 ≤ len`.
pub fn window_offsets(len: usize, seq: usize) -> Vec<usize> {
    if seq == 0 || len < seq + 1 {
        return Vec::new();
    }
    (0..(len - 1) / seq).map(|k| k * seq).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_holds_out_the_tail() {
        let bytes: Vec<u8> = (0..100).collect();
        let c = Corpus::split(&bytes, 0.1).unwrap();
        assert_eq!(c.train.len(), 90);
        assert_eq!(c.val, (90..100).collect::<Vec<u32>>());
        assert!(Corpus::split(&bytes, 1.0).is_err());
        // The cut falls inside "é" (two bytes at 8 and 9): it moves past it.
        let text = "abcdefgh\u{e9}x".as_bytes();
        assert_eq!(split_text(text, 0.18).unwrap().1, b"x");
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let text = b"hello, world! this is pipit.".repeat(4);
        let b = sample_batch(&text, 3, 8, 7, 11).unwrap();
        assert_eq!(b.inputs.len(), 24);
        for r in 0..3 {
            assert_eq!(b.inputs[r * 8 + 1..r * 8 + 8], b.targets[r * 8..r * 8 + 7]);
        }
        assert_eq!(
            b,
            sample_batch(&text, 3, 8, 7, 11).unwrap(),
            "same seed and step"
        );
        assert_ne!(b, sample_batch(&text, 3, 8, 7, 12).unwrap(), "another step");
    }

    #[test]
    fn microbatches_partition_the_batch() {
        let text: Vec<u8> = (0..=255).cycle().take(4096).collect();
        let b = sample_batch(&text, 8, 16, 1, 0).unwrap();
        let parts: Vec<Batch> = (0..4).map(|i| b.microbatch(i, 4)).collect();
        let joined: Vec<u32> = parts.iter().flat_map(|p| p.inputs.clone()).collect();
        assert_eq!(joined, b.inputs);
        assert!(parts.iter().all(|p| p.batch == 2));
    }

    #[test]
    fn windows_cover_every_full_window_and_no_more() {
        assert_eq!(window_offsets(10, 3), vec![0, 3, 6]);
        assert_eq!(window_offsets(9, 3), vec![0, 3]);
        assert_eq!(window_offsets(3, 3), Vec::<usize>::new());
    }
}
