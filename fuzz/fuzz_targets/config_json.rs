//! A Hugging Face `config.json` of any family: a model's sizes or a one-line error. A config
//! that parses also validates and lists its parameters without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipit_engine::model::ModelConfig;

fuzz_target!(|bytes: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    if let Ok(config) = ModelConfig::from_hf_config(&value) {
        // Sizes stay small enough to list (huge ones are refused before any allocation).
        if config.num_parameters() < 1 << 24 {
            let _ = config.all_params();
            let _ = config.hf_config();
        }
    }
});
