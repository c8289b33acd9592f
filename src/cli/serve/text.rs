//! A choice's text as its tokens come: bytes turned into whole UTF-8 characters (a token may
//! end inside one), cut at the first stop string, and held back while it may be the start of
//! one, so that a streamed answer never shows a stop string or half a character.

/// The text of one choice so far.
pub struct TextStream {
    stops: Vec<String>,
    /// Bytes that do not make a whole character yet.
    bytes: Vec<u8>,
    /// Text decoded but not handed out: it may begin a stop string.
    held: String,
    stopped: bool,
}

impl TextStream {
    /// A stream that stops at any of `stops` (non-empty strings).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            bytes: Vec::new(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Add a token's bytes; returns the text now safe to hand out, and whether a stop string
    /// ended the text (nothing more comes after that).
    pub fn push(&mut self, bytes: &[u8]) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.bytes.extend_from_slice(bytes);
        self.decode(false);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), true);
        }
        // Keep the longest tail that is the start of a stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                s.char_indices()
                    .map(|(i, c)| i + c.len_utf8())
                    .filter(|&n| n < s.len() && self.held.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// The rest of the text when the choice ends (bytes of no whole character as U+FFFD).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        self.decode(true);
        std::mem::take(&mut self.held)
    }

    /// Move the whole characters of `bytes` to `held` (invalid bytes as U+FFFD; an
    /// incomplete last character stays unless `all`).
    fn decode(&mut self, all: bool) {
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    self.held.push_str(s);
                    self.bytes.clear();
                    return;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    self.held
                        .push_str(std::str::from_utf8(&self.bytes[..good]).expect("valid"));
                    match e.error_len() {
                        Some(bad) => {
                            self.held.push('\u{FFFD}');
                            self.bytes.drain(..good + bad);
                        }
                        None if all => {
                            self.held.push('\u{FFFD}');
                            self.bytes.clear();
                            return;
                        }
                        None => {
                            self.bytes.drain(..good);
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_across_tokens_come_whole() {
        let mut t = TextStream::new(vec![]);
        let e = "é".as_bytes();
        assert_eq!(t.push(b"a"), ("a".into(), false));
        assert_eq!(t.push(&e[..1]), ("".into(), false));
        assert_eq!(t.push(&e[1..]), ("é".into(), false));
        assert_eq!(t.push(&[0xff]), ("\u{FFFD}".into(), false));
        t.push(&e[..1]);
        assert_eq!(t.finish(), "\u{FFFD}");
    }

    #[test]
    fn stop_strings_cut_the_text_and_are_never_shown() {
        let mut t = TextStream::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(t.push(b"one\n"), ("one".into(), false));
        assert_eq!(t.push(b"two"), ("\ntwo".into(), false));
        assert_eq!(t.push(b" E"), (" ".into(), false));
        assert_eq!(t.push(b"N"), ("".into(), false));
        assert_eq!(t.push(b"Dxyz"), ("".into(), true));
        assert_eq!(t.push(b"more"), ("".into(), true));
        assert_eq!(t.finish(), "");
        let mut t = TextStream::new(vec!["END".into()]);
        assert_eq!(t.push(b"aE"), ("a".into(), false));
        assert_eq!(t.finish(), "E");
    }
}
