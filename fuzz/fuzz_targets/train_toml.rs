//! A `pipit train --config FILE`: settings or an error; settings that parse validate (and
//! plan, within the action limit) without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipit_engine::train::TrainConfig;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(config) = toml::from_str::<TrainConfig>(text) {
        if config.validate().is_ok() {
            let _ = config.plan();
        }
    }
});
