//! The rendezvous messages: a joining rank's request as rank 0's store reads it, and the
//! store's roster as a joining rank reads it. A rank and port, a roster, or a reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipit_engine::dist::rendezvous::{read_hello, read_roster};

fuzz_target!(|bytes: &[u8]| {
    let Ok(line) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(request) = serde_json::from_str::<serde_json::Value>(line) {
        let taken = |r: usize| (r == 2).then(|| "127.0.0.1:40000".to_string());
        let _ = read_hello(&request, 4, Some("secret"), &taken);
    }
    let master = "127.0.0.1:29500".parse().expect("an address");
    let _ = read_roster(line, 4, master, 1);
});
