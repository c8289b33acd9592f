//! Text to token ids and back: bytes for pipit's own byte-level models, or a Hugging Face
//! tokenizer through the `tokenizers` crate for checkpoints that carry one: GPT-2's
//! `vocab.json` and `merges.txt` (assembled as transformers' `GPT2TokenizerFast` is: byte-level
//! pre-tokenizer without a prefix space, `<|endoftext|>` as a special token), or any
//! `tokenizer.json` — byte-level BPE as GPT-2 and Llama 3 use, SentencePiece-style BPE with
//! byte fallback as Llama 2 and Mistral use.
//!
//! Generation writes text one token at a time, so each id also has its bytes: a byte-level
//! token's characters mapped back through GPT-2's byte table ([`byte_chars`]), a byte-fallback
//! token `<0xAB>` its byte, any other piece its text with `▁` as a space (a SentencePiece
//! decoder also strips the one space it prepended to the text: token by token, that space
//! stays).

use std::collections::HashMap;

use anyhow::{anyhow, Context, Result};
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::invalid_input;

/// How text becomes tokens for one model.
pub enum Tokenizer {
    /// One token per byte (a vocabulary of 256).
    Bytes,
    /// A Hugging Face BPE tokenizer.
    Bpe(Bpe),
}

impl Tokenizer {
    /// The tokenizer of the checkpoint in `dir` whose model has `vocab_size` tokens: its
    /// `vocab.json` and `merges.txt` when both are there (a Hugging Face GPT-2 directory), else
    /// its `tokenizer.json` (Hugging Face's fast tokenizers), else bytes (pipit's models; a
    /// vocabulary beyond 256 only pads the model's shape).
    pub fn for_checkpoint(dir: &Path, vocab_size: usize) -> Result<Self> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let (source, bpe) = match (vocab.exists(), merges.exists()) {
            (true, true) => {
                let bpe = Bpe::new(&read(&vocab)?, &read(&merges)?);
                (vocab, bpe)
            }
            (false, false) if dir.join("tokenizer.json").exists() => {
                let path = dir.join("tokenizer.json");
                let bpe = Bpe::from_tokenizer_json(&read(&path)?);
                (path, bpe)
            }
            (false, false) => return Ok(Tokenizer::Bytes),
            (has_vocab, _) => {
                let (has, lacks) = match has_vocab {
                    true => ("vocab.json", "merges.txt"),
                    false => ("merges.txt", "vocab.json"),
                };
                return Err(invalid_input!(
                    "{} has a {has} without its {lacks}: GPT-2's tokenizer needs both",
                    dir.display()
                ));
            }
        };
        let bpe = bpe.map_err(|e| invalid_input!("{}: {e:#}", source.display()))?;
        if bpe.len() > vocab_size {
            return Err(invalid_input!(
                "{} maps text to {} tokens but the model has a vocabulary of {vocab_size}",
                source.display(),
                bpe.len()
            ));
        }
        Ok(Tokenizer::Bpe(bpe))
    }

    /// Token ids below this one have text ([`Tokenizer::decode`]); a sampler draws only
    /// among them.
    pub fn len(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Bpe(bpe) => bpe.len(),
        }
    }

    /// Whether no token has text.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The token ids of `text` given as bytes: any bytes for [`Tokenizer::Bytes`], UTF-8 for
    /// BPE (else an invalid-input error).
    pub fn encode_bytes(&self, text: &[u8]) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.iter().map(|&b| u32::from(b)).collect()),
            Tokenizer::Bpe(bpe) => bpe.encode(
                std::str::from_utf8(text)
                    .map_err(|e| invalid_input!("text for a BPE tokenizer must be UTF-8: {e}"))?,
            ),
        }
    }

    /// The id of the token that ends a document, where the vocabulary has one (GPT-2's
    /// `<|endoftext|>`, Llama 3's `<|end_of_text|>`, Llama 2's `</s>`). Bytes have none.
    pub fn end_of_text(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Bpe(bpe) => bpe.end_of_text,
        }
    }

    /// The files that define this tokenizer, by name, to be saved beside a model trained with
    /// it, as they were read: `vocab.json` and `merges.txt`, or `tokenizer.json`; none for
    /// bytes.
    pub fn files(&self) -> Vec<(&'static str, &[u8])> {
        match self {
            Tokenizer::Bytes => Vec::new(),
            Tokenizer::Bpe(bpe) => bpe
                .files
                .iter()
                .map(|(name, text)| (*name, text.as_bytes()))
                .collect(),
        }
    }

    /// What one token is, for the units of a loss: "byte" or "token".
    pub fn unit(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "byte",
            Tokenizer::Bpe(_) => "token",
        }
    }

    /// The token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Bpe(bpe) => bpe.encode(text),
        }
    }

    /// The bytes of token `id` (a token may hold part of a UTF-8 character).
    pub fn decode(&self, id: u32) -> Result<Vec<u8>> {
        match self {
            Tokenizer::Bytes => u8::try_from(id)
                .map(|b| vec![b])
                .map_err(|_| anyhow!("token {id} is not a byte")),
            Tokenizer::Bpe(bpe) => bpe.decode(id),
        }
    }
}

/// A Hugging Face BPE tokenizer, with each token's bytes.
pub struct Bpe {
    inner: Box<tokenizers::Tokenizer>,
    /// Token id → its bytes.
    bytes: HashMap<u32, Vec<u8>>,
    /// The id of the token that ends a document, when the vocabulary has one.
    end_of_text: Option<u32>,
    /// The files it was read from, by name, as read.
    files: Vec<(&'static str, String)>,
}

/// GPT-2's special token: written in text, it is this one id rather than its characters.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The tokens that end a document, in the order they are looked for.
const ENDS: [&str; 3] = [END_OF_TEXT, "<|end_of_text|>", "</s>"];

/// The crate's errors as ours.
fn tk_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl Bpe {
    /// GPT-2's tokenizer from the contents of `vocab.json` (`{"symbol": id, ...}`) and
    /// `merges.txt` (one pair `a b` per line after an optional `#version` line).
    pub fn new(vocab_json: &str, merges_txt: &str) -> Result<Self> {
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab_json).context("vocab.json is not a map of tokens to ids")?;
        if let Some(b) = byte_chars()
            .iter()
            .position(|c| !vocab.contains_key(&c.to_string()))
        {
            return Err(anyhow!(
                "vocab.json lacks the token of byte {b}, so some text has no tokens"
            ));
        }
        let mut merges = Vec::new();
        for line in merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        {
            let (a, b) = line
                .split_once(' ')
                .ok_or_else(|| anyhow!("merges.txt line {:?} is not a pair", line))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let special = vocab.contains_key(END_OF_TEXT);
        let model = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .build()
            .map_err(tk_err)?;
        let mut inner = tokenizers::Tokenizer::new(model);
        let byte_level = ByteLevel::new(false, true, true);
        inner.with_pre_tokenizer(Some(byte_level));
        inner.with_decoder(Some(byte_level));
        if special {
            inner.add_special_tokens(&[AddedToken::from(END_OF_TEXT, true)]);
        }
        let files = vec![
            ("vocab.json", vocab_json.to_string()),
            ("merges.txt", merges_txt.to_string()),
        ];
        Ok(Self::with_bytes(inner, true, files))
    }

    /// Any BPE `tokenizer.json` of Hugging Face's fast tokenizers; other models (WordPiece,
    /// Unigram) are refused by name.
    pub fn from_tokenizer_json(json: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(json).context("tokenizer.json is not JSON")?;
        if v["model"]["type"] != "BPE" {
            return Err(anyhow!(
                "tokenizer.json's model is {}; pipit reads BPE tokenizers",
                v["model"]["type"]
            ));
        }
        let inner: tokenizers::Tokenizer = json.parse().map_err(tk_err)?;
        // Byte-level tokens are spelled in GPT-2's byte table, wherever the decoder says so.
        let byte_level = v["decoder"].to_string().contains("\"ByteLevel\"");
        Ok(Self::with_bytes(
            inner,
            byte_level,
            vec![("tokenizer.json", json.to_string())],
        ))
    }

    /// `inner` with each token's bytes (spelled in GPT-2's byte table when `byte_level`).
    fn with_bytes(
        inner: tokenizers::Tokenizer,
        byte_level: bool,
        files: Vec<(&'static str, String)>,
    ) -> Self {
        let unbyte: HashMap<char, u8> = byte_chars()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let special: Vec<String> = inner
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .collect();
        let bytes = inner
            .get_vocab(true)
            .into_iter()
            .map(|(token, id)| {
                let raw = if special.contains(&token) {
                    None
                } else if byte_level {
                    token.chars().map(|c| unbyte.get(&c).copied()).collect()
                } else {
                    byte_fallback(&token)
                };
                // Tokens that are not byte sequences (special ones) decode to their text.
                let raw = raw.unwrap_or_else(|| token.replace('\u{2581}', " ").into_bytes());
                (id, raw)
            })
            .collect();
        let end_of_text = ENDS.iter().find_map(|t| inner.token_to_id(t));
        Self {
            inner: Box::new(inner),
            bytes,
            end_of_text,
            files,
        }
    }

    /// One past the largest token id, added tokens included.
    pub fn len(&self) -> usize {
        self.bytes.keys().max().map_or(0, |&m| m as usize + 1)
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The token ids of `text`, each special token in it (`<|endoftext|>`) its one id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(tk_err)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The bytes of token `id`.
    pub fn decode(&self, id: u32) -> Result<Vec<u8>> {
        self.bytes
            .get(&id)
            .cloned()
            .ok_or_else(|| anyhow!("token {id} is not in the vocabulary"))
    }
}

/// The byte of a byte-fallback token (`<0x0A>`).
fn byte_fallback(token: &str) -> Option<Vec<u8>> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
        .map(|b| vec![b])
}

/// GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves,
/// the other 68 take the characters from U+0100 on, in byte order.
pub fn byte_chars() -> [char; 256] {
    let keeps = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let c = if keeps(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(c).expect("below U+0200");
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_table_is_a_bijection_onto_printable_characters() {
        let t = byte_chars();
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert!(t.iter().all(|c| !c.is_whitespace() && !c.is_control()));
        assert_eq!(
            (t[b'A' as usize], t[b' ' as usize], t[b'\n' as usize]),
            ('A', 'Ġ', 'Ċ')
        );
    }

    /// A SentencePiece-style tokenizer.json with byte fallback, as Llama 2's: a `▁` prepended
    /// and standing for every space, bytes without a token spelled `<0xAB>`.
    fn sentencepiece() -> Bpe {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), i.into());
        }
        for b in 0..256u32 {
            vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
        }
        for (i, t) in ["\u{2581}", "a", "b", "\u{2581}a"].iter().enumerate() {
            vocab.insert(t.to_string(), (259 + i).into());
        }
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 2, "content": "</s>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
            ]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": [["\u{2581}", "a"]]}
        });
        Bpe::from_tokenizer_json(&json.to_string()).unwrap()
    }

    #[test]
    fn sentencepiece_bpe_falls_back_to_bytes() {
        let bpe = sentencepiece();
        // "▁a", "▁", "b", then "é" and the newline, which have no token, as their bytes.
        let ids = bpe.encode("a bé\n").unwrap();
        assert_eq!(ids, [262, 259, 261, 3 + 0xC3, 3 + 0xA9, 3 + 0x0A]);
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| bpe.decode(id).unwrap()).collect();
        assert_eq!(
            bytes,
            " a bé\n".as_bytes(),
            "token by token, the prepended space stays"
        );
        assert_eq!(bpe.end_of_text, Some(2));
        assert_eq!(bpe.len(), 263);
    }

    /// A small vocabulary whose merges build "the" and " the" from bytes.
    fn tiny() -> Bpe {
        let t = byte_chars();
        let mut vocab: HashMap<String, u32> = (0..256u32)
            .map(|b| (t[b as usize].to_string(), b))
            .collect();
        for (i, s) in ["th", "the", "Ġthe", "<|endoftext|>"].iter().enumerate() {
            vocab.insert(s.to_string(), 256 + i as u32);
        }
        let merges = "#version: 0.2\nt h\nth e\nĠ the\n";
        Bpe::new(&serde_json::to_string(&vocab).unwrap(), merges).unwrap()
    }

    #[test]
    fn merges_apply_in_rank_order_and_decode_inverts_encode() {
        let bpe = tiny();
        assert_eq!(bpe.encode("the").unwrap(), [257]);
        assert_eq!(bpe.encode("the the").unwrap(), [257, 258]);
        assert_eq!(
            bpe.encode("tithe").unwrap(),
            [b't' as u32, b'i' as u32, 257]
        );
        let text = "Wherefore art thou, the — Romeo?\n";
        let bytes: Vec<u8> = bpe
            .encode(text)
            .unwrap()
            .iter()
            .flat_map(|&id| bpe.decode(id).unwrap())
            .collect();
        assert_eq!(bytes, text.as_bytes());
        assert_eq!(bpe.decode(259).unwrap(), b"<|endoftext|>");
    }

    #[test]
    fn end_of_text_in_the_text_is_its_one_token() {
        let bpe = tiny();
        assert_eq!(bpe.end_of_text, Some(259));
        let (t, lt) = (b't' as u32, b'<' as u32);
        assert_eq!(bpe.encode("<|endoftext|>").unwrap(), [259]);
        assert_eq!(
            bpe.encode("the<|endoftext|>the <|endoftext|><|endoftext|>t")
                .unwrap(),
            [257, 259, 257, b' ' as u32, 259, 259, t]
        );
        assert_eq!(
            bpe.encode("<|endoftext").unwrap()[0],
            lt,
            "only the whole marker"
        );
        // Without the token in the vocabulary, the marker is text like any other.
        let t = byte_chars();
        let bytes: HashMap<String, u32> = (0..256u32)
            .map(|b| (t[b as usize].to_string(), b))
            .collect();
        let plain = Bpe::new(&serde_json::to_string(&bytes).unwrap(), "").unwrap();
        assert_eq!(plain.end_of_text, None);
        assert_eq!(plain.encode("<|endoftext|>").unwrap().len(), 13);
    }

    #[test]
    fn a_checkpoint_without_tokenizer_files_speaks_bytes_and_half_a_tokenizer_is_refused() {
        let dir = std::env::temp_dir().join(format!("pipit-tokenizer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Tokenizer::for_checkpoint(&dir, 50304).unwrap();
        assert!(matches!(t, Tokenizer::Bytes));
        assert_eq!(t.len(), 256);
        for (file, needle) in [
            ("merges.txt", "has a merges.txt without its vocab.json"),
            ("tokenizer.json", "tokenizer.json is not JSON"),
        ] {
            std::fs::write(dir.join(file), "").unwrap();
            let err = Tokenizer::for_checkpoint(&dir, 50257).err().unwrap();
            assert!(crate::is_invalid_input(&err), "{err:#}");
            assert!(format!("{err}").contains(needle), "{err}");
            std::fs::remove_file(dir.join(file)).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokenizer_json_gives_the_same_tokenizer_as_vocab_and_merges() {
        let bpe = tiny();
        let t = byte_chars();
        let mut vocab: serde_json::Map<String, serde_json::Value> = (0..256u32)
            .map(|b| (t[b as usize].to_string(), b.into()))
            .collect();
        for (i, s) in ["th", "the", "Ġthe"].iter().enumerate() {
            vocab.insert(s.to_string(), (256 + i).into());
        }
        // Merges as pairs (current releases; older ones write "a b"); the end-of-text token
        // among the added tokens only.
        let byte_level = serde_json::json!(
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        );
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": 259, "content": "<|endoftext|>", "single_word": false,
                              "lstrip": false, "rstrip": false, "normalized": false,
                              "special": true}],
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": [["t", "h"], ["th", "e"], ["Ġ", "the"]]},
        });
        let fast = Bpe::from_tokenizer_json(&json.to_string()).unwrap();
        let mut old = json.clone();
        old["model"]["merges"] = serde_json::json!(["t h", "th e", "Ġ the"]);
        let old = Bpe::from_tokenizer_json(&old.to_string()).unwrap();
        let text = "the theme<|endoftext|>tithe the";
        assert_eq!(old.encode(text).unwrap(), bpe.encode(text).unwrap());
        assert_eq!(fast.encode(text).unwrap(), bpe.encode(text).unwrap());
        assert_eq!(fast.end_of_text, Some(259));
        assert_eq!(fast.decode(258).unwrap(), b" the");
        // A prefix space, as some byte-level tokenizers add: "the" is then " the".
        let mut spaced = json.clone();
        spaced["pre_tokenizer"]["add_prefix_space"] = true.into();
        let spaced = Bpe::from_tokenizer_json(&spaced.to_string()).unwrap();
        assert_eq!(spaced.encode("the").unwrap(), [258]);
        let mut wordpiece = json.clone();
        wordpiece["model"]["type"] = "WordPiece".into();
        let err = Bpe::from_tokenizer_json(&wordpiece.to_string())
            .err()
            .unwrap();
        assert!(
            format!("{err}").contains("pipit reads BPE tokenizers"),
            "{err}"
        );
    }

    #[test]
    fn a_vocabulary_without_every_byte_is_refused() {
        let err = Bpe::new(r#"{"a": 0}"#, "").err().unwrap();
        assert!(
            format!("{err}").contains("lacks the token of byte 0"),
            "{err}"
        );
    }
}
