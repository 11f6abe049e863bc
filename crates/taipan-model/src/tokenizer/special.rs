//! Tokens matched whole in text before the model's own algorithm runs (control and
//! user-defined tokens such as `<|im_start|>`): the longest one wins where several start at
//! the same place, as in llama.cpp.

use super::vocab::Vocab;
use super::TokenizerError;
use aho_corasick::{AhoCorasick, MatchKind};

pub(crate) struct SpecialMatcher {
    automaton: AhoCorasick,
    ids: Vec<u32>,
}

/// A stretch of text between matched tokens, or one matched token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl SpecialMatcher {
    /// Matches the vocabulary strings of `ids` (an empty string is never matched).
    pub(crate) fn new(vocab: &Vocab, ids: Vec<u32>) -> Result<Self, TokenizerError> {
        let ids: Vec<u32> = ids.into_iter().filter(|&id| vocab.get(id).is_some_and(|t| !t.is_empty())).collect();
        let texts: Vec<&str> = ids.iter().map(|&id| vocab.get(id).unwrap_or_default()).collect();
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&texts)
            .map_err(|e| TokenizerError::Invalid { path: "tokenizer".into(), message: e.to_string() })?;
        Ok(SpecialMatcher { automaton, ids })
    }

    /// Splits `text` into the fragments the model's algorithm encodes and the tokens it skips.
    pub(crate) fn fragments<'a>(&'a self, text: &'a str) -> impl Iterator<Item = Fragment<'a>> + 'a {
        let mut at = 0;
        let mut matches = self.automaton.find_iter(text);
        let mut pending: Option<u32> = None;
        std::iter::from_fn(move || {
            if let Some(id) = pending.take() {
                return Some(Fragment::Token(id));
            }
            match matches.next() {
                Some(m) => {
                    let id = self.ids[m.pattern().as_usize()];
                    let before = &text[at..m.start()];
                    at = m.end();
                    if before.is_empty() {
                        Some(Fragment::Token(id))
                    } else {
                        pending = Some(id);
                        Some(Fragment::Text(before))
                    }
                }
                None if at < text.len() => {
                    let rest = &text[at..];
                    at = text.len();
                    Some(Fragment::Text(rest))
                }
                None => None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_token_wins_and_text_between_is_kept() {
        let vocab = Vocab::new(&["<a>", "<a>b", "x", ""]);
        let m = SpecialMatcher::new(&vocab, vec![0, 1, 3]).unwrap();
        let got: Vec<Fragment> = m.fragments("q<a>b<a>zz<a>").collect();
        assert_eq!(
            got,
            [Fragment::Text("q"), Fragment::Token(1), Fragment::Token(0), Fragment::Text("zz"), Fragment::Token(0)]
        );
        assert_eq!(m.fragments("").count(), 0);
        assert_eq!(m.fragments("plain").collect::<Vec<_>>(), [Fragment::Text("plain")]);
    }
}
