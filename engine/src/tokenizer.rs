//! Text to token ids and back: bytes for pipit's own byte-level models, or GPT-2's byte-level
//! BPE for checkpoints that carry its `vocab.json` and `merges.txt` (Hugging Face GPT-2
//! directories do).
//!
//! GPT-2's BPE (Radford et al., 2019, as released with the model):
//! 1. The text is cut into pre-tokens by the pattern
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
//!    tried in that order at each position ([`pre_tokens`]; the `regex` crate has no
//!    lookahead, so `\s+(?!\S)` is done by hand).
//! 2. Each pre-token's UTF-8 bytes become printable characters, one per byte (the table of
//!    [`byte_chars`]), and are merged pairwise, always the adjacent pair that comes first in
//!    `merges.txt`, until no listed pair is left.
//! 3. Each resulting symbol is looked up in `vocab.json`.
//!
//! GPT-2's one special token, `<|endoftext|>` (which separates documents, and ends a sample),
//! is cut out of the text before all that and becomes its own id, as Hugging Face's GPT-2
//! tokenizers do.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use regex::Regex;

use crate::invalid_input;

/// How text becomes tokens for one model.
pub enum Tokenizer {
    /// One token per byte (a vocabulary of 256).
    Bytes,
    /// GPT-2's byte-level BPE.
    Bpe(Bpe),
}

impl Tokenizer {
    /// The tokenizer of the checkpoint in `dir` whose model has `vocab_size` tokens: its
    /// `vocab.json` and `merges.txt` when both are there (a Hugging Face GPT-2 directory), else
    /// the byte-level BPE of its `tokenizer.json` (Hugging Face's fast tokenizers), else bytes
    /// (pipit's models; a vocabulary beyond 256 only pads the model's shape).
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
            Tokenizer::Bpe(bpe) => bpe
                .encode(std::str::from_utf8(text).map_err(|e| {
                    invalid_input!("text for GPT-2's tokenizer must be UTF-8: {e}")
                })?),
        }
    }

    /// The id of GPT-2's `<|endoftext|>`, where the vocabulary has it: the token that ends a
    /// document. Bytes have none.
    pub fn end_of_text(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Bpe(bpe) => bpe.end_of_text,
        }
    }

    /// The files that define this tokenizer, by name, to be saved beside a model trained with
    /// it: GPT-2's `vocab.json` and `merges.txt` as they were read; none for bytes.
    pub fn files(&self) -> Vec<(&'static str, &[u8])> {
        match self {
            Tokenizer::Bytes => Vec::new(),
            Tokenizer::Bpe(bpe) => vec![
                ("vocab.json", bpe.vocab_json.as_bytes()),
                ("merges.txt", bpe.merges_txt.as_bytes()),
            ],
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

/// GPT-2's byte-level BPE: the vocabulary and the ranked merges.
pub struct Bpe {
    /// Symbol (in [`byte_chars`] form) → token id.
    ids: HashMap<String, u32>,
    /// Token id → its bytes.
    bytes: HashMap<u32, Vec<u8>>,
    /// Pair of symbols → rank (its line in `merges.txt`, first = 0).
    ranks: HashMap<(String, String), usize>,
    /// The id of [`END_OF_TEXT`], when the vocabulary has it.
    end_of_text: Option<u32>,
    /// The two files as read.
    vocab_json: String,
    merges_txt: String,
}

/// GPT-2's special token: written in text, it is this one id rather than its characters.
pub const END_OF_TEXT: &str = "<|endoftext|>";

impl Bpe {
    /// From the contents of `vocab.json` (`{"symbol": id, ...}`) and `merges.txt` (one pair
    /// `a b` per line after an optional `#version` line).
    pub fn new(vocab_json: &str, merges_txt: &str) -> Result<Self> {
        let vocab: HashMap<String, u32> =
            serde_json::from_str(vocab_json).context("vocab.json is not a map of tokens to ids")?;
        let unbyte: HashMap<char, u8> = byte_chars()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut bytes = HashMap::with_capacity(vocab.len());
        for (symbol, &id) in &vocab {
            // Symbols that are not byte sequences (added tokens such as <|endoftext|>) decode
            // to their text.
            let raw: Option<Vec<u8>> = symbol.chars().map(|c| unbyte.get(&c).copied()).collect();
            bytes.insert(id, raw.unwrap_or_else(|| symbol.as_bytes().to_vec()));
        }
        if let Some(b) = byte_chars()
            .iter()
            .position(|c| !vocab.contains_key(&c.to_string()))
        {
            return Err(anyhow!(
                "vocab.json lacks the token of byte {b}, so some text has no tokens"
            ));
        }
        let mut ranks = HashMap::new();
        for (n, line) in merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .enumerate()
        {
            let (a, b) = line
                .split_once(' ')
                .ok_or_else(|| anyhow!("merges.txt line {:?} is not a pair", line))?;
            ranks.entry((a.to_string(), b.to_string())).or_insert(n);
        }
        Ok(Self {
            end_of_text: vocab.get(END_OF_TEXT).copied(),
            ids: vocab,
            bytes,
            ranks,
            vocab_json: vocab_json.to_string(),
            merges_txt: merges_txt.to_string(),
        })
    }

    /// From a Hugging Face `tokenizer.json` whose model is GPT-2's byte-level BPE: its vocabulary
    /// (with the added tokens) and merges (written `"a b"` or `["a", "b"]`). Other models and
    /// pre-tokenizers, and a byte-level one that adds a prefix space, are refused by name.
    pub fn from_tokenizer_json(json: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(json).context("tokenizer.json is not JSON")?;
        let model = &v["model"];
        if model["type"] != "BPE" {
            return Err(anyhow!(
                "tokenizer.json's model is {}, not the byte-level BPE of GPT-2",
                model["type"]
            ));
        }
        let pre = &v["pre_tokenizer"];
        if pre["type"] != "ByteLevel" {
            return Err(anyhow!(
                "tokenizer.json's pre-tokenizer is {}, not GPT-2's ByteLevel",
                pre["type"]
            ));
        }
        if pre["add_prefix_space"] == true {
            return Err(anyhow!(
                "tokenizer.json's ByteLevel pre-tokenizer adds a prefix space, which pipit does not"
            ));
        }
        let mut vocab = model["vocab"]
            .as_object()
            .cloned()
            .ok_or_else(|| anyhow!("tokenizer.json has no model.vocab map"))?;
        for added in v["added_tokens"].as_array().into_iter().flatten() {
            if let (Some(text), Some(id)) = (added["content"].as_str(), added["id"].as_u64()) {
                vocab.entry(text).or_insert(id.into());
            }
        }
        let mut merges = String::new();
        for (n, m) in model["merges"]
            .as_array()
            .ok_or_else(|| anyhow!("tokenizer.json has no model.merges list"))?
            .iter()
            .enumerate()
        {
            let pair = match m {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) => match (a.first(), a.get(1), a.len()) {
                    (Some(serde_json::Value::String(x)), Some(serde_json::Value::String(y)), 2) => {
                        format!("{x} {y}")
                    }
                    _ => return Err(anyhow!("tokenizer.json merge {n} is not a pair: {m}")),
                },
                _ => return Err(anyhow!("tokenizer.json merge {n} is not a pair: {m}")),
            };
            merges.push_str(&pair);
            merges.push('\n');
        }
        Self::new(&serde_json::Value::Object(vocab).to_string(), &merges)
    }

    /// One past the largest token id in the vocabulary.
    pub fn len(&self) -> usize {
        self.ids.values().max().map_or(0, |&m| m as usize + 1)
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The token ids of `text`, each `<|endoftext|>` in it its one id (when the vocabulary
    /// has it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let Some(eot) = self.end_of_text else {
            return self.encode_ordinary(text);
        };
        let mut out = Vec::new();
        let mut parts = text.split(END_OF_TEXT);
        out.extend(self.encode_ordinary(parts.next().unwrap_or(""))?);
        for part in parts {
            out.push(eot);
            out.extend(self.encode_ordinary(part)?);
        }
        Ok(out)
    }

    /// The token ids of `text` taken as ordinary text throughout.
    fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>> {
        let table = byte_chars();
        let mut out = Vec::new();
        // Words recur: each distinct pre-token is merged once.
        let mut known: HashMap<&str, Vec<u32>> = HashMap::new();
        for piece in pre_tokens(text) {
            if let Some(ids) = known.get(piece) {
                out.extend_from_slice(ids);
                continue;
            }
            let word: Vec<String> = piece
                .bytes()
                .map(|b| table[b as usize].to_string())
                .collect();
            let ids = self
                .merge(word)
                .into_iter()
                .map(|symbol| {
                    self.ids.get(&symbol).copied().ok_or_else(|| {
                        anyhow!("the vocabulary lacks {symbol:?}, a piece of {piece:?}")
                    })
                })
                .collect::<Result<Vec<u32>>>()?;
            out.extend_from_slice(&ids);
            known.insert(piece, ids);
        }
        Ok(out)
    }

    /// The bytes of token `id`.
    pub fn decode(&self, id: u32) -> Result<Vec<u8>> {
        self.bytes
            .get(&id)
            .cloned()
            .ok_or_else(|| anyhow!("token {id} is not in the vocabulary"))
    }

    /// Merge adjacent symbols of `word`, the pair of lowest rank first, until none is listed.
    fn merge(&self, mut word: Vec<String>) -> Vec<String> {
        while word.len() > 1 {
            let best = word
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else {
                break;
            };
            let (a, b) = (word[i].clone(), word[i + 1].clone());
            // Every occurrence of the pair, left to right.
            let mut merged = Vec::with_capacity(word.len());
            let mut j = 0;
            while j < word.len() {
                if j + 1 < word.len() && word[j] == a && word[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(std::mem::take(&mut word[j]));
                    j += 1;
                }
            }
            word = merged;
        }
        word
    }
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

/// GPT-2's pattern without its one lookahead, anchored: `\s+(?!\S)` is `\s+` cut short in
/// [`pre_tokens`].
fn pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| {
        Regex::new(r"^(?:'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+)")
            .expect("a valid pattern")
    })
}

/// `text` cut by GPT-2's pre-tokenizer pattern (see the module docs).
pub fn pre_tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let m = pattern()
            .find(rest)
            .expect("every character starts a match");
        let mut piece = &rest[..m.end()];
        // `\s+(?!\S)`: a run of whitespace followed by more text leaves its last character
        // to what follows, unless it is a single character (then plain `\s+` takes it).
        if piece.chars().all(char::is_whitespace) && m.end() < rest.len() {
            let mut chars = piece.char_indices();
            if let (Some(_), Some((last, _))) = (chars.next(), chars.next_back()) {
                piece = &piece[..last];
            }
        }
        out.push(piece);
        i += piece.len();
    }
    out
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

    #[test]
    fn pre_tokens_follow_the_pattern() {
        let cut = |s| pre_tokens(s);
        assert_eq!(cut("Hello world"), ["Hello", " world"]);
        assert_eq!(cut("don't  stop"), ["don", "'t", " ", " stop"]);
        assert_eq!(
            cut("ROMEO:\nBut, soft!"),
            ["ROMEO", ":", "\n", "But", ",", " soft", "!"]
        );
        assert_eq!(cut("a\n\n  b"), ["a", "\n\n ", " b"]);
        assert_eq!(cut("x \ny"), ["x", " ", "\n", "y"]);
        assert_eq!(
            cut("in 1599, 12ab "),
            ["in", " 1599", ",", " 12", "ab", " "]
        );
        assert_eq!(cut(" 'tis we'll"), [" '", "tis", " we", "'ll"]);
        assert_eq!(cut("héllo wörld"), ["héllo", " wörld"]);
        assert_eq!(
            cut("Ⓐb Ⅻ"),
            ["Ⓐ", "b", " Ⅻ"],
            "a symbol, a letter, a numeral"
        );
        assert_eq!(cut("  "), ["  "], "whitespace at the end stays whole");
        assert_eq!(cut(""), Vec::<&str>::new());
        let text = "The quick\tbrown  fox's 3 jumps!!\n\n";
        assert_eq!(cut(text).concat(), text, "the pieces are the text");
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
        // Merges in both spellings; the end-of-text token among the added tokens only.
        let json = serde_json::json!({
            "added_tokens": [{"id": 259, "content": "<|endoftext|>", "special": true}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},
            "model": {"type": "BPE", "vocab": vocab, "merges": ["t h", ["th", "e"], "Ġ the"]},
        });
        let fast = Bpe::from_tokenizer_json(&json.to_string()).unwrap();
        let text = "the theme<|endoftext|>tithe the";
        assert_eq!(fast.encode(text).unwrap(), bpe.encode(text).unwrap());
        assert_eq!(fast.end_of_text, Some(259));
        let refused = |patch: serde_json::Value, needle: &str| {
            let mut j = json.clone();
            for (k, v) in patch.as_object().unwrap() {
                j[k] = v.clone();
            }
            let err = Bpe::from_tokenizer_json(&j.to_string()).err().unwrap();
            assert!(format!("{err}").contains(needle), "{err}");
        };
        refused(
            serde_json::json!({"model": {"type": "WordPiece"}}),
            "not the byte-level BPE",
        );
        refused(
            serde_json::json!({"pre_tokenizer": {"type": "Metaspace"}}),
            "not GPT-2's ByteLevel",
        );
        refused(
            serde_json::json!({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": true}}),
            "adds a prefix space",
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
