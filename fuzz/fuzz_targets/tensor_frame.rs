//! The TCP tensor frames ranks exchange: a stream of frames read one after another until an
//! error or the end, never a panic, and no allocation beyond what the stream's bytes carry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipit_engine::dist::frame::read_frame;

fuzz_target!(|bytes: &[u8]| {
    let mut stream = std::io::Cursor::new(bytes);
    while let Ok(Some((_, frame))) = read_frame(&mut stream) {
        let _ = frame.into_f32s();
    }
});
