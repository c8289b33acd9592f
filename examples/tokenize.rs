//! Text on stdin to the token ids of a checkpoint's tokenizer (GPT-2's BPE where the
//! directory has vocab.json and merges.txt, else bytes), as one JSON array on stdout.
//! `scripts/gpt2-tokenizer-check.sh` compares its output with tiktoken's GPT-2 encoding.
//!
//! Run: `cargo run --release --example tokenize -- DIR < text.txt`

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use pipit::engine::tokenizer::Tokenizer;

fn main() -> Result<()> {
    let dir: PathBuf = std::env::args_os()
        .nth(1)
        .context("usage: tokenize DIR < text")?
        .into();
    let tokenizer = Tokenizer::for_checkpoint(&dir, usize::MAX)?;
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("the text on stdin must be UTF-8")?;
    let ids = tokenizer.encode(&text)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
