//! A safetensors file, whole (`from_bytes`) and as a rank reads its share of one (`read_some`:
//! the header, then a seek to each tensor kept): an error or tensors, never a panic, and no
//! allocation beyond what the file's own length allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipit_engine::checkpoint::safetensors;

fuzz_target!(|bytes: &[u8]| {
    let _ = safetensors::from_bytes(bytes);
    let path = std::env::temp_dir().join(format!("pipit-fuzz-{}.safetensors", std::process::id()));
    if std::fs::write(&path, bytes).is_ok() {
        let _ = safetensors::read_some(&path, &|name| name.len() % 2 == 0);
    }
});
