//! A `--schedule-file`: a schedule or an error naming the line; one that parses is then
//! validated (deadlock check included) within the plan size limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipit_engine::schedule::{validate, Schedule};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(schedule) = Schedule::parse(text) {
        let _ = validate(&schedule);
    }
});
