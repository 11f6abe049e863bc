//! SentencePiece vocabularies as GGUF stores them (`tokenizer.ggml.model = "llama"`), tokenized
//! the way llama.cpp does: special and user-defined tokens split out first; each text fragment
//! spaced (`▁`) and, where the file asks for it, given a leading space; then its characters merged
//! pairwise, always the adjacent pair whose joined text is the vocabulary entry with the highest
//! score (leftmost first among equals), until no pair joins; a piece left outside the
//! vocabulary becomes byte tokens (`<0xNN>`).
//!
//! It needs only the vocabulary's strings and scores: no merge table, no second copy of the
//! strings (a 262k vocabulary through `tokenizers` with merges derived from scores held ~100 MiB).

use super::special::WholeTokens;
use super::vocab::Vocab;
use super::{sentencepiece_byte, TokenizerError, CONTROL, NORMAL, UNKNOWN, USER_DEFINED};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub(crate) struct SentencePiece {
    scores: Vec<f32>,
    /// Id of `<0xNN>` per byte (`u32::MAX` where the vocabulary lacks it).
    byte_ids: [u32; 256],
    unknown: Option<u32>,
    add_space_prefix: bool,
    whole: WholeTokens,
}

/// A candidate merge of two adjacent symbols; the heap pops the highest score, then the leftmost.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the joined text: a merge whose sides changed since it was queued is stale.
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

/// A run of the fragment's bytes; merged-away symbols have `len` 0.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SentencePiece {
    pub(crate) fn new(
        vocab: &Vocab,
        types: &[u8],
        scores: Vec<f32>,
        unknown: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self, TokenizerError> {
        let mut byte_ids = [u32::MAX; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            if let Some(id) = vocab.id_of(&format!("<0x{b:02X}>")) {
                *slot = id;
            }
        }
        Ok(SentencePiece { scores, byte_ids, unknown, add_space_prefix, whole: WholeTokens::new(vocab, types)? })
    }

    /// Encodes text; with `parse_special`, control-token text becomes its single id.
    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.whole.encode(text, parse_special, |t, out| self.encode_fragment(vocab, t, out))
    }

    /// One fragment between special tokens. Every fragment follows the start or a special token,
    /// which is where llama.cpp adds the space prefix.
    fn encode_fragment(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut spaced = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            spaced.push('▁');
        }
        for c in text.chars() {
            spaced.push(if c == ' ' { '▁' } else { c });
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(spaced.len());
        for (start, c) in spaced.char_indices() {
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: index.checked_sub(1),
                next: (start + c.len_utf8() < spaced.len()).then_some(index + 1),
            });
        }
        let mut queue = BinaryHeap::with_capacity(symbols.len());
        let bigram = |symbols: &[Symbol], left: usize, right: usize| -> Option<Bigram> {
            let (l, r) = (symbols[left], symbols[right]);
            let joined = &spaced[l.start..l.start + l.len + r.len];
            let id = vocab.id_of(joined)?;
            Some(Bigram { score: self.scores.get(id as usize).copied().unwrap_or(0.0), left, right, len: joined.len() })
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, i - 1, i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            if let Some(p) = l.prev {
                queue.extend(bigram(&symbols, p, b.left));
            }
            if let Some(n) = r.next {
                queue.extend(bigram(&symbols, b.left, n));
            }
        }
        let mut index = (!symbols.is_empty()).then_some(0);
        while let Some(i) = index {
            let s = symbols[i];
            let piece = &spaced[s.start..s.start + s.len];
            match vocab.id_of(piece) {
                Some(id) => out.push(id),
                None => {
                    for &byte in piece.as_bytes() {
                        match (self.byte_ids[byte as usize], self.unknown) {
                            (u32::MAX, Some(unk)) => out.push(unk),
                            (u32::MAX, None) => {
                                return Err(TokenizerError::Invalid {
                                    path: "tokenizer".into(),
                                    message: format!(
                                        "byte 0x{byte:02X} of {piece:?} has no token (<0x{byte:02X}>) and the vocabulary no unknown token"
                                    ),
                                })
                            }
                            (id, _) => out.push(id),
                        }
                    }
                }
            }
            index = s.next;
        }
        Ok(())
    }

    /// Decodes ids: pieces with `▁` as spaces, byte tokens joined into characters (one U+FFFD per
    /// byte of a run that is not valid UTF-8), control and unknown tokens dropped with
    /// `skip_special`; one leading space removed where encoding adds one.
    pub(crate) fn decode(&self, vocab: &Vocab, types: &[u8], ids: &[u32], skip_special: bool) -> String {
        let mut text = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let flush = |bytes: &mut Vec<u8>, text: &mut String| {
            match std::str::from_utf8(bytes) {
                Ok(s) => text.push_str(s),
                Err(_) => text.extend(std::iter::repeat_n('\u{FFFD}', bytes.len())),
            }
            bytes.clear();
        };
        for &id in ids {
            let kind = types.get(id as usize).copied().unwrap_or(NORMAL);
            let piece = vocab.get(id).unwrap_or_default();
            if skip_special && matches!(kind, CONTROL | UNKNOWN) {
                continue;
            }
            if matches!(kind, CONTROL | USER_DEFINED) {
                flush(&mut bytes, &mut text);
                text.push_str(piece);
            } else if let Some(b) = sentencepiece_byte(piece) {
                bytes.push(b);
            } else {
                flush(&mut bytes, &mut text);
                text.push_str(&piece.replace('▁', " "));
            }
        }
        flush(&mut bytes, &mut text);
        if self.add_space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: `<s>` control, `<u>` user-defined, two bytes, letters and merges.
    fn toy(ab: f32, ba: f32, add_space_prefix: bool) -> (Vocab, Vec<u8>, SentencePiece) {
        let pieces = ["<unk>", "<s>", "<u>", "<0xC3>", "<0xA9>", "▁", "a", "b", "ab", "ba", "▁a"];
        let types = vec![UNKNOWN, CONTROL, USER_DEFINED, 6, 6, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL];
        let scores = vec![0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -2.0, ab, ba, -0.5];
        let vocab = Vocab::new(&pieces);
        let spm = SentencePiece::new(&vocab, &types, scores, Some(0), add_space_prefix).unwrap();
        (vocab, types, spm)
    }

    #[test]
    fn merges_the_best_scored_pair_first_and_the_leftmost_among_equals() {
        let (vocab, _, spm) = toy(-1.0, -1.0, false);
        assert_eq!(spm.encode(&vocab, "aba", false).unwrap(), [8, 6]);
        let (vocab, _, spm) = toy(-1.0, -0.9, false);
        assert_eq!(spm.encode(&vocab, "aba", false).unwrap(), [6, 9]);
    }

    #[test]
    fn spaces_prefix_and_bytes() {
        let (vocab, types, spm) = toy(-1.0, -1.0, true);
        // "▁a" outscores "ab": the prefix space joins the first letter.
        assert_eq!(spm.encode(&vocab, "ab", false).unwrap(), [10, 7]);
        // é has no piece: its two UTF-8 bytes; 'x' has neither piece nor byte token: unknown.
        assert_eq!(spm.encode(&vocab, "é", false).unwrap(), [5, 3, 4]);
        assert_eq!(spm.encode(&vocab, "x", false).unwrap(), [5, 0]);
        assert_eq!(spm.decode(&vocab, &types, &[10, 7, 3, 4], false), "abé");
        // A byte run that is not UTF-8 decodes to one replacement character per byte.
        assert_eq!(spm.decode(&vocab, &types, &[6, 3, 6], false), "a\u{FFFD}a");
    }

    #[test]
    fn control_tokens_split_out_only_when_asked_user_defined_always() {
        let (vocab, types, spm) = toy(-1.0, -1.0, true);
        assert_eq!(spm.encode(&vocab, "<s>a<u>b", true).unwrap(), [1, 10, 2, 5, 7]);
        let plain = spm.encode(&vocab, "<s>a<u>b", false).unwrap();
        assert!(!plain.contains(&1) && plain.contains(&2), "{plain:?}");
        assert_eq!(spm.decode(&vocab, &types, &[1, 10, 2, 5, 7], false), "<s> a<u> b");
        assert_eq!(spm.decode(&vocab, &types, &[1, 10, 2, 5, 7], true), "a<u> b");
    }
}
