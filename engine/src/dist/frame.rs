//! Wire frames between ranks: a checksummed header, a payload, and the payload's checksum.
//!
//! Layout (little-endian):
//!
//! ```text
//! magic "PIPT" | version u8 | kind u8 | dtype u8 | 0u8 | seq u64 | ndim u32 | payload_len u64
//! | dims: ndim × u64 | header checksum u64 | payload bytes | payload checksum u64
//! ```
//!
//! The header has its own checksum so a corrupt length is caught before anything is
//! allocated for it; `seq` numbers the frames of one direction of one connection, so a lost
//! or repeated frame is caught as well. Checksums are FNV-1a 64.

use std::fmt;
use std::io::{self, Read, Write};

use crate::backend::DType;

/// First bytes of every frame.
const MAGIC: [u8; 4] = *b"PIPT";
/// Version of this layout; a peer speaking another is refused.
const VERSION: u8 = 1;
/// Largest rank of a tensor a frame may carry.
const MAX_DIMS: usize = 8;
/// Largest payload a frame may announce (16 GiB): a bound on what a reader allocates.
const MAX_PAYLOAD: u64 = 1 << 34;
/// Bytes of the fixed part of the header, before the dimensions.
const FIXED_HEADER: usize = 4 + 4 + 8 + 4 + 8;

/// FNV-1a, 64 bits: a streaming checksum.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Fnv64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// A checksum over no bytes yet.
    pub fn new() -> Self {
        Self(Self::OFFSET)
    }

    /// Fold `bytes` into the checksum.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(Self::PRIME);
        }
    }

    /// The checksum of everything folded in so far.
    pub fn finish(self) -> u64 {
        self.0
    }

    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut h = Self::new();
        h.update(bytes);
        h.finish()
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

/// What one frame carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A tensor: its element type, shape and little-endian elements.
    Tensor {
        /// Element type.
        dtype: DType,
        /// Dimensions, outermost first.
        shape: Vec<usize>,
        /// `shape.product() × 4` bytes.
        data: Vec<u8>,
    },
    /// A control message (JSON text): step figures, checkpoint manifests, results.
    Message(Vec<u8>),
    /// The sender has finished its run and will send nothing more.
    Goodbye,
    /// The sender has failed; the text says why.
    Abort(String),
    /// The sender is alive (sent while it computes or waits, so silence means it is stuck).
    Heartbeat,
}

impl Frame {
    /// An f32 tensor frame holding `values` as a flat `[len]` tensor.
    pub fn f32s(values: &[f32]) -> Self {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Frame::Tensor {
            dtype: DType::F32,
            shape: vec![values.len()],
            data,
        }
    }

    /// The elements of an f32 tensor frame, or `None` for any other frame.
    pub fn into_f32s(self) -> Option<Vec<f32>> {
        match self {
            Frame::Tensor {
                dtype: DType::F32,
                data,
                ..
            } => Some(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// A short name of the frame's kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Frame::Tensor { .. } => "a tensor",
            Frame::Message(_) => "a message",
            Frame::Goodbye => "a goodbye",
            Frame::Abort(_) => "an abort",
            Frame::Heartbeat => "a heartbeat",
        }
    }

    fn kind_code(&self) -> u8 {
        match self {
            Frame::Tensor { .. } => 1,
            Frame::Message(_) => 2,
            Frame::Goodbye => 3,
            Frame::Abort(_) => 4,
            Frame::Heartbeat => 5,
        }
    }
}

fn dtype_code(dtype: DType) -> u8 {
    match dtype {
        DType::F32 => 1,
        DType::U32 => 2,
        DType::BF16 => 3,
    }
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The connection failed or ended in the middle of a frame.
    Io(io::Error),
    /// The bytes arrived but are not a valid frame (bad magic, checksum, sizes or order).
    Corrupt(String),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("the connection ended in the middle of a frame (torn frame)")
            }
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::Corrupt(why) => write!(f, "corrupt frame: {why}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(e)
    }
}

/// The bytes of `frame` as frame number `seq` of its connection.
pub fn encode(seq: u64, frame: &Frame) -> Vec<u8> {
    let (dtype, shape, payload): (u8, &[usize], &[u8]) = match frame {
        Frame::Tensor { dtype, shape, data } => (dtype_code(*dtype), shape, data),
        Frame::Message(text) => (0, &[], text),
        Frame::Goodbye | Frame::Heartbeat => (0, &[], &[]),
        Frame::Abort(reason) => (0, &[], reason.as_bytes()),
    };
    let mut out = Vec::with_capacity(FIXED_HEADER + 8 * shape.len() + 8 + payload.len() + 8);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, frame.kind_code(), dtype, 0]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    for &d in shape {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    let header_sum = Fnv64::of(&out);
    out.extend_from_slice(&header_sum.to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&Fnv64::of(payload).to_le_bytes());
    out
}

/// Write `frame` as frame number `seq`, in one write.
pub fn write_frame(w: &mut impl Write, seq: u64, frame: &Frame) -> io::Result<()> {
    w.write_all(&encode(seq, frame))?;
    w.flush()
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Read the next frame and its sequence number; `Ok(None)` when the connection ended cleanly
/// between frames.
pub fn read_frame(r: &mut impl Read) -> Result<Option<(u64, Frame)>, FrameError> {
    let mut fixed = [0u8; FIXED_HEADER];
    // A clean end of stream is only possible before the first byte of a frame.
    let first = loop {
        match r.read(&mut fixed[..1]) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if first == 0 {
        return Ok(None);
    }
    r.read_exact(&mut fixed[1..])?;
    if fixed[..4] != MAGIC {
        return Err(FrameError::Corrupt(format!(
            "bad magic {:02x?} (not a pipit frame, or the stream lost its place)",
            &fixed[..4]
        )));
    }
    if fixed[4] != VERSION {
        return Err(FrameError::Corrupt(format!(
            "frame version {} (this pipit speaks {VERSION})",
            fixed[4]
        )));
    }
    let (kind, dtype) = (fixed[5], fixed[6]);
    let seq = u64_at(&fixed, 8);
    let ndim = u32::from_le_bytes([fixed[16], fixed[17], fixed[18], fixed[19]]) as usize;
    let payload_len = u64_at(&fixed, 20);
    if ndim > MAX_DIMS {
        return Err(FrameError::Corrupt(format!(
            "{ndim} dimensions (at most {MAX_DIMS})"
        )));
    }
    let mut rest = vec![0u8; 8 * ndim + 8];
    r.read_exact(&mut rest)?;
    let mut sum = Fnv64::new();
    sum.update(&fixed);
    sum.update(&rest[..8 * ndim]);
    let stated = u64_at(&rest, 8 * ndim);
    if sum.finish() != stated {
        return Err(FrameError::Corrupt(format!(
            "header checksum mismatch (computed {:016x}, frame says {stated:016x})",
            sum.finish()
        )));
    }
    if payload_len > MAX_PAYLOAD {
        return Err(FrameError::Corrupt(format!(
            "payload of {payload_len} bytes"
        )));
    }
    let shape: Vec<usize> = (0..ndim).map(|i| u64_at(&rest, 8 * i) as usize).collect();
    // Grown as the bytes arrive, so a frame that states more than it carries holds no more
    // memory than it sent.
    let mut payload = Vec::with_capacity((payload_len as usize).min(1 << 20));
    r.by_ref().take(payload_len).read_to_end(&mut payload)?;
    if payload.len() as u64 != payload_len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    let mut tail = [0u8; 8];
    r.read_exact(&mut tail)?;
    let (computed, stated) = (Fnv64::of(&payload), u64::from_le_bytes(tail));
    if computed != stated {
        return Err(FrameError::Corrupt(format!(
            "payload checksum mismatch over {payload_len} bytes (computed {computed:016x}, frame says {stated:016x})"
        )));
    }
    let frame = match kind {
        1 => {
            let dtype = match dtype {
                1 => DType::F32,
                2 => DType::U32,
                3 => DType::BF16,
                other => return Err(FrameError::Corrupt(format!("unknown dtype code {other}"))),
            };
            let elements = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            if elements.and_then(|e| e.checked_mul(dtype.size())) != Some(payload.len()) {
                return Err(FrameError::Corrupt(format!(
                    "shape {shape:?} of {dtype:?} does not fit a payload of {} bytes",
                    payload.len()
                )));
            }
            Frame::Tensor {
                dtype,
                shape,
                data: payload,
            }
        }
        2 => Frame::Message(payload),
        3 => Frame::Goodbye,
        4 => Frame::Abort(String::from_utf8_lossy(&payload).into_owned()),
        5 => Frame::Heartbeat,
        other => return Err(FrameError::Corrupt(format!("unknown frame kind {other}"))),
    };
    Ok(Some((seq, frame)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_published_values() {
        assert_eq!(Fnv64::of(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(Fnv64::of(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(Fnv64::of(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::f32s(&[1.5, -0.0, f32::MAX, f32::MIN_POSITIVE, 3.25e-7]),
            Frame::Tensor {
                dtype: DType::U32,
                shape: vec![2, 3],
                data: vec![7; 24],
            },
            Frame::Message(br#"{"loss": 1}"#.to_vec()),
            Frame::Goodbye,
            Frame::Abort("rank 3 ran out of memory".into()),
            Frame::Heartbeat,
            Frame::f32s(&[]),
        ];
        let mut wire = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            write_frame(&mut wire, i as u64 + 10, f).unwrap();
        }
        let mut r = wire.as_slice();
        for (i, f) in frames.iter().enumerate() {
            let (seq, got) = read_frame(&mut r).unwrap().unwrap();
            assert_eq!(seq, i as u64 + 10);
            assert_eq!(&got, f);
        }
        assert!(
            read_frame(&mut r).unwrap().is_none(),
            "a clean end between frames"
        );
        let back = frames[0].clone().into_f32s().unwrap();
        assert_eq!(back[2], f32::MAX);
        assert_eq!(back[1].to_bits(), (-0.0f32).to_bits());
    }

    fn error_of(bytes: &[u8]) -> String {
        read_frame(&mut &bytes[..]).unwrap_err().to_string()
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let wire = encode(4, &Frame::f32s(&[1.0, 2.0, 3.0]));
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x10;
            let result = read_frame(&mut bad.as_slice());
            assert!(result.is_err(), "flipping byte {i} went unnoticed");
        }
        let mut bad = wire.clone();
        let n = bad.len();
        bad[n - 12] ^= 1;
        assert!(
            error_of(&bad).contains("payload checksum mismatch"),
            "{}",
            error_of(&bad)
        );
        let mut bad = wire.clone();
        bad[20] ^= 1;
        assert!(
            error_of(&bad).contains("header checksum mismatch"),
            "{}",
            error_of(&bad)
        );
    }

    #[test]
    fn a_truncated_frame_is_torn_not_a_clean_end() {
        let wire = encode(0, &Frame::f32s(&[1.0; 16]));
        for cut in [1, 10, FIXED_HEADER + 3, wire.len() - 1] {
            let err = error_of(&wire[..cut]);
            assert!(err.contains("torn"), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn garbage_is_refused_by_its_magic() {
        assert!(error_of(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n").contains("bad magic"));
    }
}
