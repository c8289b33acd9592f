//! Tokenizer files: a `tokenizer.json`, or GPT-2's `vocab.json` and `merges.txt` (the input cut
//! in two at its first NUL byte). A tokenizer that loads encodes a text and decodes its ids.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipit_engine::tokenizer::Bpe;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let loaded = match text.split_once('\0') {
        None => Bpe::from_tokenizer_json(text),
        Some((vocab, merges)) => Bpe::new(vocab, merges),
    };
    if let Ok(bpe) = loaded {
        if let Ok(ids) = bpe.encode("ROMEO: O, she doth teach the torches to burn bright!") {
            for id in ids {
                let _ = bpe.decode(id);
            }
        }
    }
});
