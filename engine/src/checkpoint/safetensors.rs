//! Reading and writing the safetensors format (f32 tensors), as Hugging Face stores weights.
//!
//! Layout: an 8-byte little-endian header length, a JSON header mapping each tensor name to
//! its dtype, shape and byte range, then the raw little-endian data. The header is padded with
//! spaces to a multiple of 8 bytes so the data that follows is aligned.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

use crate::invalid_input;
use crate::model::{HostTensor, HostTensors};

/// Serialise `tensors` (and string `metadata`) into safetensors bytes.
pub fn to_bytes(tensors: &HostTensors, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for (name, t) in tensors.iter() {
        let bytes = t.data.len() * 4;
        header.insert(
            name.to_string(),
            json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).expect("a JSON map serialises");
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for (_, t) in tensors.iter() {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Parse safetensors bytes into tensors and metadata. F32, F16 and BF16 tensors are read
/// (the latter two widened to f32); a malformed file is an [`crate::InvalidInput`] error.
pub fn from_bytes(bytes: &[u8]) -> Result<(HostTensors, BTreeMap<String, String>)> {
    let corrupt = |why: &str| invalid_input!("not a valid safetensors file: {why}");
    if bytes.len() < 8 {
        return Err(corrupt("shorter than its 8-byte header length"));
    }
    let head_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let data_start = 8usize
        .checked_add(head_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| corrupt(&format!("header length {head_len} exceeds the file")))?;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| corrupt(&format!("header is not a JSON object ({e})")))?;
    let data = &bytes[data_start..];
    let mut tensors = HostTensors::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            if let Value::Object(m) = entry {
                for (k, v) in m {
                    metadata.insert(k, v.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        let tensor =
            parse_tensor(&entry, data).map_err(|e| corrupt(&format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, tensor.shape, tensor.data)?;
    }
    Ok((tensors, metadata))
}

/// The tensors of the safetensors file at `path` whose names `keep` accepts, reading only
/// their bytes (the header, then a seek to each one): how a pipeline rank loads its share of
/// a checkpoint without holding the rest in memory.
pub fn read_some(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<HostTensors> {
    let corrupt =
        |why: &str| invalid_input!("{} is not a valid safetensors file: {why}", path.display());
    let mut file =
        File::open(path).map_err(|e| invalid_input!("cannot read {}: {e}", path.display()))?;
    let size = file.metadata()?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| corrupt("shorter than its 8-byte header length"))?;
    let head_len = u64::from_le_bytes(len);
    if head_len > size - 8 {
        return Err(corrupt(&format!(
            "header length {head_len} exceeds the file"
        )));
    }
    let mut head = vec![0u8; head_len as usize];
    file.read_exact(&mut head)?;
    let header: Map<String, Value> = serde_json::from_slice(&head)
        .map_err(|e| corrupt(&format!("header is not a JSON object ({e})")))?;
    let data_start = 8 + head_len;
    let mut tensors = HostTensors::new();
    for (name, entry) in header {
        if name == "__metadata__" || !keep(&name) {
            continue;
        }
        let offsets: [u64; 2] = serde_json::from_value(entry["data_offsets"].clone())
            .map_err(|_| corrupt(&format!("tensor `{name}`: bad data_offsets")))?;
        let [begin, end] = offsets;
        if begin > end || data_start.checked_add(end).is_none_or(|e| e > size) {
            return Err(corrupt(&format!(
                "tensor `{name}`: byte range {begin}..{end} exceeds the data"
            )));
        }
        let mut raw = vec![0u8; (end - begin) as usize];
        file.seek(SeekFrom::Start(data_start + begin))?;
        file.read_exact(&mut raw)?;
        // The tensor's bytes now start at 0 of `raw`.
        let mut local = entry.clone();
        local["data_offsets"] = json!([0, end - begin]);
        let tensor =
            parse_tensor(&local, &raw).map_err(|e| corrupt(&format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, tensor.shape, tensor.data)?;
    }
    Ok(tensors)
}

fn parse_tensor(entry: &Value, data: &[u8]) -> Result<HostTensor> {
    let dtype = entry["dtype"].as_str().context("no dtype")?;
    let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).context("bad shape")?;
    let offsets: [usize; 2] =
        serde_json::from_value(entry["data_offsets"].clone()).context("bad data_offsets")?;
    let [begin, end] = offsets;
    ensure!(
        begin <= end && end <= data.len(),
        "byte range {begin}..{end} exceeds the data"
    );
    let raw = &data[begin..end];
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .context("shape's element count overflows")?;
    let width = match dtype {
        "F32" => 4,
        "F16" | "BF16" => 2,
        other => bail!("dtype {other} is not supported (F32, F16, BF16 are)"),
    };
    ensure!(
        count.checked_mul(width) == Some(raw.len()),
        "{} bytes for shape {shape:?} of {dtype}",
        raw.len()
    );
    let values = match dtype {
        "F32" => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        "BF16" => raw
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        _ => raw
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
    };
    Ok(HostTensor {
        shape,
        data: values,
    })
}

/// IEEE half to single precision (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = frac · 2^-24.
            let v = frac as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_names_shapes_values_and_metadata() {
        let mut t = HostTensors::new();
        t.insert("wte", vec![2, 3], vec![1., -2., 3.5, 0., 1e-8, -0.25])
            .unwrap();
        t.insert("ln_f.bias", vec![3], vec![0.5, 0.25, -1.0])
            .unwrap();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = to_bytes(&t, &meta);
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()) % 8, 0);
        let (back, meta_back) = from_bytes(&bytes).unwrap();
        assert_eq!(back, t);
        assert_eq!(meta_back, meta);
    }

    #[test]
    fn truncated_or_garbled_files_are_invalid_input() {
        let mut t = HostTensors::new();
        t.insert("a", vec![4], vec![1.0; 4]).unwrap();
        let bytes = to_bytes(&t, &BTreeMap::new());
        for bad in [
            &bytes[..4],
            &bytes[..bytes.len() - 1],
            b"\xff\xff\xff\xff\xff\xff\xff\x7f{}",
        ] {
            let err = from_bytes(bad).unwrap_err();
            assert!(crate::is_invalid_input(&err), "{err:#}");
        }
    }

    #[test]
    fn half_precision_values_widen_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
