//! Tokens matched whole in text before the model's own algorithm runs (control and
//! user-defined tokens such as `<|im_start|>`): the longest one wins where several start at
//! the same place, as in llama.cpp.

use super::vocab::Vocab;
use super::{TokenizerError, CONTROL, UNKNOWN, USER_DEFINED};
use aho_corasick::{AhoCorasick, MatchKind};

/// The tokens a codec splits out before its own algorithm runs, in both encoding modes.
pub(crate) struct WholeTokens {
    /// Control, unknown and user-defined tokens: what a prompt with special parsing splits out.
    all: SpecialMatcher,
    /// User-defined tokens only: plain text still splits these out, as llama.cpp does.
    user_defined: SpecialMatcher,
}

impl WholeTokens {
    pub(crate) fn new(vocab: &Vocab, types: &[u8]) -> Result<Self, TokenizerError> {
        let all: Vec<u32> = (0..vocab.len() as u32)
            .filter(|&id| matches!(types.get(id as usize), Some(&(UNKNOWN | CONTROL | USER_DEFINED))))
            .collect();
        let user: Vec<u32> = all.iter().copied().filter(|&id| types[id as usize] == USER_DEFINED).collect();
        Ok(WholeTokens { all: SpecialMatcher::new(vocab, all)?, user_defined: SpecialMatcher::new(vocab, user)? })
    }

    /// Encodes text: tokens matched whole become their ids, the text between them goes through
    /// `fragment`. With `parse_special`, control-token text becomes its single id.
    pub(crate) fn encode(
        &self,
        text: &str,
        parse_special: bool,
        mut fragment: impl FnMut(&str, &mut Vec<u32>) -> Result<(), TokenizerError>,
    ) -> Result<Vec<u32>, TokenizerError> {
        let matcher = if parse_special { &self.all } else { &self.user_defined };
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        for f in matcher.fragments(text) {
            match f {
                Fragment::Text(t) => fragment(t, &mut out)?,
                Fragment::Token(id) => out.push(id),
            }
        }
        Ok(out)
    }
}

struct SpecialMatcher {
    automaton: AhoCorasick,
    ids: Vec<u32>,
}

/// A stretch of text between matched tokens, or one matched token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl SpecialMatcher {
    /// Matches the vocabulary strings of `ids` (an empty string is never matched).
    fn new(vocab: &Vocab, ids: Vec<u32>) -> Result<Self, TokenizerError> {
        let ids: Vec<u32> = ids.into_iter().filter(|&id| vocab.get(id).is_some_and(|t| !t.is_empty())).collect();
        let texts: Vec<&str> = ids.iter().map(|&id| vocab.get(id).unwrap_or_default()).collect();
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&texts)
            .map_err(|e| TokenizerError::Invalid { path: "tokenizer".into(), message: e.to_string() })?;
        Ok(SpecialMatcher { automaton, ids })
    }

    /// Splits `text` into the fragments the model's algorithm encodes and the tokens it skips.
    fn fragments<'a>(&'a self, text: &'a str) -> impl Iterator<Item = Fragment<'a>> + 'a {
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
