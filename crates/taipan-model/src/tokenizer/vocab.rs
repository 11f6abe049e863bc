//! The vocabulary's strings, stored once: one text buffer with an end offset per id and an
//! open-addressing index from text to id. A `Vec<String>` plus a `HashMap<String, u32>` costs
//! about 100 bytes per token; this costs about 14 plus the text (Gemma 3's 262k tokens: ~5 MiB
//! instead of ~25).

/// Token strings by id, and ids by string.
pub(crate) struct Vocab {
    text: String,
    /// `ends[id]` is where token `id` ends in `text`; it starts where `id - 1` ends.
    ends: Vec<u32>,
    /// `id + 1` per slot, 0 for an empty one; the length is a power of two at least twice the
    /// vocabulary, so probes stay short.
    slots: Vec<u32>,
}

/// FNV-1a: short keys, no adversary (the keys are the model's own tokens; lookups of arbitrary
/// text only ever probe).
fn hash(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Vocab {
    /// Builds the index. A text that appears under several ids maps to the last of them (as
    /// llama.cpp's and `tokenizers`' maps do).
    pub(crate) fn new<S: AsRef<str>>(pieces: &[S]) -> Self {
        let total: usize = pieces.iter().map(|p| p.as_ref().len()).sum();
        let mut text = String::with_capacity(total);
        let mut ends = Vec::with_capacity(pieces.len());
        for p in pieces {
            text.push_str(p.as_ref());
            ends.push(text.len() as u32);
        }
        let mut vocab = Vocab { text, ends, slots: vec![0; (pieces.len() * 2).next_power_of_two().max(2)] };
        for id in 0..pieces.len() {
            let slot = vocab.probe(vocab.get(id as u32).unwrap_or_default());
            vocab.slots[slot] = id as u32 + 1;
        }
        vocab
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// The string of token `id`.
    pub(crate) fn get(&self, id: u32) -> Option<&str> {
        let end = *self.ends.get(id as usize)? as usize;
        let start = if id == 0 { 0 } else { self.ends[id as usize - 1] as usize };
        self.text.get(start..end)
    }

    /// The id whose string is exactly `piece`.
    pub(crate) fn id_of(&self, piece: &str) -> Option<u32> {
        match self.slots[self.probe(piece)] {
            0 => None,
            stored => Some(stored - 1),
        }
    }

    /// The slot holding `piece`, or the empty slot where it would go.
    fn probe(&self, piece: &str) -> usize {
        let mask = self.slots.len() - 1;
        let mut slot = hash(piece.as_bytes()) as usize & mask;
        loop {
            match self.slots[slot] {
                0 => return slot,
                stored if self.get(stored - 1) == Some(piece) => return slot,
                _ => slot = (slot + 1) & mask,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Vocab;

    #[test]
    fn finds_every_piece_and_nothing_else() {
        let pieces: Vec<String> = (0..5000).map(|i| format!("▁tok{i}")).chain(["".into(), "a".into()]).collect();
        let vocab = Vocab::new(&pieces);
        assert_eq!(vocab.len(), pieces.len());
        for (id, p) in pieces.iter().enumerate() {
            assert_eq!(vocab.get(id as u32), Some(p.as_str()));
            assert_eq!(vocab.id_of(p), Some(id as u32));
        }
        assert_eq!(vocab.id_of("▁tok5000"), None);
        assert_eq!(vocab.id_of("b"), None);
        assert_eq!(vocab.get(pieces.len() as u32), None);
    }

    #[test]
    fn a_repeated_piece_maps_to_its_last_id() {
        let vocab = Vocab::new(&["x", "y", "x"]);
        assert_eq!(vocab.id_of("x"), Some(2));
        assert_eq!(vocab.get(0), Some("x"));
    }
}
