//! Byte-level BPE vocabularies as GGUF stores them (`tokenizer.ggml.model = "gpt2"`), tokenized
//! the way llama.cpp does: control, unknown and user-defined tokens split out first; each text
//! fragment cut into pieces by the pre-tokenizer's regular expressions; each piece spelled in
//! GPT-2's byte alphabet (one character per byte) and merged pairwise, always the adjacent pair of
//! lowest rank in the merge table (leftmost first among equals), until no listed pair is left. A
//! family that takes whole pieces (`ignore_merges`) first looks the piece up as one token.
//!
//! It keeps only a byte table and the merge table (pairs of ids to a rank and the joined id):
//! ~1 MiB for a 49k-merge vocabulary, where `tokenizers` held ~7 MiB of maps for the same file.

use super::special::WholeTokens;
use super::vocab::Vocab;
use super::TokenizerError;
#[cfg(test)]
use super::{CONTROL, USER_DEFINED};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, SplitDelimiterBehavior};

/// GPT-2's byte alphabet: printable bytes stand for themselves, the others are shifted to code
/// points from U+0100 up, in byte order.
pub(crate) fn byte_chars() -> &'static [char; 256] {
    static CHARS: std::sync::OnceLock<[char; 256]> = std::sync::OnceLock::new();
    CHARS.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut chars = ['\0'; 256];
        let mut shifted = 0x100u32;
        for (b, c) in chars.iter_mut().enumerate() {
            let b = b as u8;
            *c = if printable(b) {
                b as char
            } else {
                shifted += 1;
                char::from_u32(shifted - 1).unwrap_or('\u{FFFD}')
            };
        }
        chars
    })
}

/// Merge-table keys are two token ids; the splitmix64 finalizer spreads them over the table.
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ b as u64);
        }
    }
    fn write_u64(&mut self, n: u64) {
        let mut z = n ^ self.0.rotate_left(17);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = z ^ (z >> 31);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn pair(left: u32, right: u32) -> u64 {
    (left as u64) << 32 | right as u64
}

#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    joined: u32,
}

pub(crate) struct BytePairs {
    /// Token id of each byte's one-character spelling; `u32::MAX` where the vocabulary lacks it
    /// (such a byte is left out, as llama.cpp leaves it out).
    byte_ids: [u32; 256],
    merges: HashMap<u64, Merge, BuildHasherDefault<PairHasher>>,
    /// The pre-tokenizer's expressions, applied one after another.
    splits: Vec<Split>,
    /// A piece that is itself a token is taken whole.
    ignore_merges: bool,
    whole: WholeTokens,
}

/// A queued merge of the symbols at `left` and `right`; the heap pops the lowest rank, then the
/// leftmost. It is stale once either side no longer holds the ids it was queued with.
#[derive(Debug, PartialEq, Eq)]
struct Candidate {
    rank: u32,
    left: usize,
    right: usize,
    ids: (u32, u32),
    joined: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        other.rank.cmp(&self.rank).then_with(|| other.left.cmp(&self.left))
    }
}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// One symbol of a piece being merged: a token id and its neighbours; merged-away ones are dead.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    alive: bool,
}

fn invalid(message: String) -> TokenizerError {
    TokenizerError::Invalid { path: "tokenizer".into(), message }
}

impl BytePairs {
    /// `merges` are the file's `"left right"` strings, highest priority first; `regexes` the
    /// pre-tokenizer's expressions.
    pub(crate) fn new(
        vocab: &Vocab,
        types: &[u8],
        merges: &[&str],
        regexes: &[&str],
        ignore_merges: bool,
    ) -> Result<Self, TokenizerError> {
        let chars = byte_chars();
        let mut byte_ids = [u32::MAX; 256];
        for (slot, c) in byte_ids.iter_mut().zip(chars) {
            if let Some(id) = vocab.id_of(c.encode_utf8(&mut [0; 4])) {
                *slot = id;
            }
        }
        let mut table: HashMap<u64, Merge, BuildHasherDefault<PairHasher>> =
            HashMap::with_capacity_and_hasher(merges.len(), Default::default());
        for (rank, line) in merges.iter().enumerate() {
            // Split at the first space after the first character, as llama.cpp does.
            let first = line.chars().next().map_or(0, char::len_utf8);
            let (left, right) = line[first..]
                .find(' ')
                .map(|at| (&line[..first + at], &line[first + at + 1..]))
                .ok_or_else(|| invalid(format!("tokenizer.ggml.merges[{rank}] {line:?} is not two pieces")))?;
            let id = |piece: &str| {
                vocab.id_of(piece).ok_or_else(|| {
                    invalid(format!("tokenizer.ggml.merges[{rank}] {line:?}: {piece:?} is not in the vocabulary"))
                })
            };
            let (l, r, joined) = (id(left)?, id(right)?, id(&format!("{left}{right}"))?);
            // The first listing of a pair wins, as in llama.cpp.
            table.entry(pair(l, r)).or_insert(Merge { rank: rank as u32, joined });
        }
        table.shrink_to_fit();
        let splits = regexes
            .iter()
            .map(|r| {
                Split::new(SplitPattern::Regex((*r).to_string()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| invalid(format!("pre-tokenizer expression {r:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(BytePairs { byte_ids, merges: table, splits, ignore_merges, whole: WholeTokens::new(vocab, types)? })
    }

    /// Encodes text; with `parse_special`, control-token text becomes its single id.
    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.whole.encode(text, parse_special, |t, out| self.encode_fragment(vocab, t, out))
    }

    fn encode_fragment(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut pieces = PreTokenizedString::from(text);
        for split in &self.splits {
            split.pre_tokenize(&mut pieces).map_err(|e| invalid(format!("pre-tokenizing: {e}")))?;
        }
        for (piece, _, _) in pieces.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            self.encode_piece(vocab, piece.as_bytes(), out);
        }
        Ok(())
    }

    fn encode_piece(&self, vocab: &Vocab, piece: &[u8], out: &mut Vec<u32>) {
        if self.ignore_merges {
            let chars = byte_chars();
            let spelled: String = piece.iter().map(|&b| chars[b as usize]).collect();
            if let Some(id) = vocab.id_of(&spelled) {
                out.push(id);
                return;
            }
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(piece.len());
        for &b in piece {
            let id = self.byte_ids[b as usize];
            if id != u32::MAX {
                let index = symbols.len();
                symbols.push(Symbol { id, prev: index.checked_sub(1), next: Some(index + 1), alive: true });
            }
        }
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        let candidate = |symbols: &[Symbol], left: usize, right: usize| {
            let ids = (symbols[left].id, symbols[right].id);
            self.merges.get(&pair(ids.0, ids.1)).map(|m| Candidate { rank: m.rank, left, right, ids, joined: m.joined })
        };
        let mut queue: BinaryHeap<Candidate> =
            (1..symbols.len()).filter_map(|i| candidate(&symbols, i - 1, i)).collect();
        while let Some(c) = queue.pop() {
            let (l, r) = (symbols[c.left], symbols[c.right]);
            if !l.alive || !r.alive || l.next != Some(c.right) || (l.id, r.id) != c.ids {
                continue;
            }
            symbols[c.left].id = c.joined;
            symbols[c.left].next = r.next;
            symbols[c.right].alive = false;
            if let Some(n) = r.next {
                symbols[n].prev = Some(c.left);
                queue.extend(candidate(&symbols, c.left, n));
            }
            if let Some(p) = l.prev {
                queue.extend(candidate(&symbols, p, c.left));
            }
        }
        out.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT2_LIKE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

    /// Every byte's character, then `extra` pieces (given in byte spelling).
    fn vocab(extra: &[&str]) -> Vocab {
        let mut pieces: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
        pieces.extend(extra.iter().map(|s| s.to_string()));
        Vocab::new(&pieces)
    }

    fn id(v: &Vocab, piece: &str) -> u32 {
        v.id_of(piece).unwrap()
    }

    #[test]
    fn merges_the_lowest_rank_first_and_the_leftmost_among_equals() {
        let v = vocab(&["ab", "ba", "aa"]);
        let types = vec![1; v.len()];
        let bpe = BytePairs::new(&v, &types, &["a b", "b a"], &[GPT2_LIKE], false).unwrap();
        assert_eq!(bpe.encode(&v, "aba", false).unwrap(), [id(&v, "ab"), id(&v, "a")]);
        let bpe = BytePairs::new(&v, &types, &["b a", "a b"], &[GPT2_LIKE], false).unwrap();
        assert_eq!(bpe.encode(&v, "aba", false).unwrap(), [id(&v, "a"), id(&v, "ba")]);
        // Equal ranks (the same pair twice): the leftmost pair joins first.
        let bpe = BytePairs::new(&v, &types, &["a a"], &[GPT2_LIKE], false).unwrap();
        assert_eq!(bpe.encode(&v, "aaa", false).unwrap(), [id(&v, "aa"), id(&v, "a")]);
    }

    #[test]
    fn pieces_are_cut_first_and_spelled_in_the_byte_alphabet() {
        // " b" is spelled "Ġb": the space is byte 0x20, shifted to U+0120.
        let v = vocab(&["Ġb", "ab"]);
        let types = vec![1; v.len()];
        let bpe = BytePairs::new(&v, &types, &["Ġ b", "a b"], &[GPT2_LIKE], false).unwrap();
        assert_eq!(bpe.encode(&v, "ab b", false).unwrap(), [id(&v, "ab"), id(&v, "Ġb")]);
        // The pre-tokenizer keeps "a" and " b" apart, so "a b" never sees the pair (a, Ġ).
        let é: Vec<u32> = "é".bytes().map(|b| id(&v, &byte_chars()[b as usize].to_string())).collect();
        assert_eq!(bpe.encode(&v, "é", false).unwrap(), é);
    }

    #[test]
    fn whole_pieces_skip_merges_when_the_family_says_so() {
        let v = vocab(&["abc", "ab"]);
        let types = vec![1; v.len()];
        let merging = BytePairs::new(&v, &types, &["a b"], &[GPT2_LIKE], false).unwrap();
        assert_eq!(merging.encode(&v, "abc", false).unwrap(), [id(&v, "ab"), id(&v, "c")]);
        let whole = BytePairs::new(&v, &types, &["a b"], &[GPT2_LIKE], true).unwrap();
        assert_eq!(whole.encode(&v, "abc", false).unwrap(), [id(&v, "abc")]);
    }

    #[test]
    fn control_tokens_split_out_only_when_asked_user_defined_always() {
        let v = vocab(&["<s>", "<u>"]);
        let mut types = vec![1; v.len()];
        types[id(&v, "<s>") as usize] = CONTROL;
        types[id(&v, "<u>") as usize] = USER_DEFINED;
        let bpe = BytePairs::new(&v, &types, &[], &[GPT2_LIKE], false).unwrap();
        assert_eq!(bpe.encode(&v, "<s>a<u>", true).unwrap(), [id(&v, "<s>"), id(&v, "a"), id(&v, "<u>")]);
        let plain = bpe.encode(&v, "<s>a<u>", false).unwrap();
        assert_eq!(plain.len(), 5, "{plain:?}");
        assert_eq!(plain[4], id(&v, "<u>"));
    }

    #[test]
    fn malformed_merges_are_refused_by_index() {
        let v = vocab(&["ab"]);
        let types = vec![1; v.len()];
        for bad in ["ab", "a q", "x\u{100}y z"] {
            let e = BytePairs::new(&v, &types, &["a b", bad], &[GPT2_LIKE], false).err().expect(bad).to_string();
            assert!(e.contains("tokenizer.ggml.merges[1]"), "{e}");
        }
    }

    #[test]
    fn a_long_run_merges_in_n_log_n() {
        // 200k identical letters: one piece; a quadratic merge loop would not finish.
        let v = vocab(&["aa", "aaaa"]);
        let types = vec![1; v.len()];
        let bpe = BytePairs::new(&v, &types, &["a a", "aa aa"], &[GPT2_LIKE], false).unwrap();
        let ids = bpe.encode(&v, &"a".repeat(200_000), false).unwrap();
        assert_eq!(ids.len(), 50_000);
        assert!(ids.iter().all(|&i| i == id(&v, "aaaa")));
    }
}
