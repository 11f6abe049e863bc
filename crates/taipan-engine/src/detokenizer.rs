//! Incremental detokenization: turns a growing list of ids into text deltas that never split a
//! UTF-8 character, even when one character spans several byte-level tokens.

use taipan_model::Tokenizer;

/// Decodes a sequence's new tokens into text as they arrive.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window re-decoded for context (a few tokens back, for merges of spaces).
    prefix_offset: usize,
    /// Tokens before this one have been emitted.
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special: bool) -> Self {
        IncrementalDecoder { skip_special, ..Default::default() }
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special).unwrap_or_default();
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special).unwrap_or_default();
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Text held back because it ended mid-character (emitted as-is at the end of a sequence).
    pub fn flush(&mut self, tok: &Tokenizer) -> String {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special).unwrap_or_default();
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special).unwrap_or_default();
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
