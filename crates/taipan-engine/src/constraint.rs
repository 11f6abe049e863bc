//! Constrained decoding: a grammar (from `llguidance`) masks the logits so that only tokens that
//! keep the output inside the grammar can be sampled.
//!
//! A [`GrammarCompiler`] is built once per model (the token trie costs tens of milliseconds); it
//! compiles Lark grammars — which may embed JSON schemas with `%json {...}` — into a
//! [`Grammar`], checked when the request arrives so that an unsupported schema is the client's
//! error and not a failure mid-generation. A [`Constraint`] applies a grammar either from the
//! first generated token or lazily: generation runs free until the text contains a trigger (a
//! tool call's opening tag), and the grammar governs everything after it.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;
use taipan_model::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    #[error("cannot build the token trie for constrained decoding: {0}")]
    Setup(String),
    #[error("{0}")]
    Grammar(String),
}

/// The model's vocabulary as a byte trie; plain text is split greedily, which is all a grammar
/// needs (it matches bytes, whatever the tokenization).
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

/// Compiles grammars for one model's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
    /// Tokens that close JSON, in order of preference, for when the token budget runs out.
    closers: Vec<u32>,
    stop_ids: Vec<u32>,
}

/// Single tokens that lead out of any JSON state, in order of preference: close a string, an
/// object, an array; after a key, its separator; then the shortest value. Taking the first one the
/// grammar allows at every step ends the JSON in a few tokens per level of nesting (a key opened
/// by `"` is closed by the next `"`, then gets `: ` and an empty string, then `}`).
const CLOSERS: [&[u8]; 6] = [b"\"", b"}", b"]", b": ", b":", b"0"];

fn closing_tokens(words: &[Vec<u8>]) -> Vec<u32> {
    CLOSERS.iter().filter_map(|c| words.iter().position(|w| w == c).map(|i| i as u32)).collect()
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarCompiler")
    }
}

impl GrammarCompiler {
    /// `vocab_size` is the width of the model's logits (it may exceed the tokenizer's vocabulary);
    /// a finished grammar allows exactly the tokenizer's stop ids.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self, ConstraintError> {
        let mut words = tokenizer.token_bytes();
        words.resize(vocab_size.max(words.len()), Vec::new());
        let closers = closing_tokens(&words);
        let stops = &tokenizer.specials.stop_ids;
        let eos = stops.first().copied().or(tokenizer.specials.eos).unwrap_or(0);
        let info = TokRxInfo::new(words.len() as u32, eos);
        let mut trie = TokTrie::from(&info, &words);
        if !stops.is_empty() {
            trie = trie.with_eos_tokens(stops);
        }
        let env: TokEnv = Arc::new(TrieEnv { trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| ConstraintError::Setup(e.to_string()))?;
        factory.quiet();
        Ok(GrammarCompiler { factory, closers, stop_ids: stops.clone() })
    }

    /// Compiles a Lark grammar; errors describe what the grammar or schema got wrong.
    pub fn compile(&self, lark: &str) -> Result<Grammar, ConstraintError> {
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_lark(lark.to_string()))
            .map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Grammar(e));
        }
        Ok(Grammar { matcher })
    }

    /// Splits text into tokens the way the grammar sees them (greedy over the trie).
    fn tokenize(&self, text: &str) -> Vec<u32> {
        self.factory.tok_env().tokenize_bytes(text.as_bytes())
    }
}

/// A compiled grammar in its start state; each sequence works on its own copy.
pub struct Grammar {
    matcher: Matcher,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

/// When a grammar applies to a request's output.
#[derive(Debug, Clone)]
pub struct Constraint {
    pub grammar: Arc<Grammar>,
    /// `None`: from the first token. `Some(tag)`: free text until `tag` appears; the grammar
    /// then governs the text after it.
    pub trigger: Option<String>,
    pub compiler: Arc<GrammarCompiler>,
}

/// What the guide made of a sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    Continue,
    /// The grammar is complete: nothing but a stop token could follow.
    Complete,
    /// The output cannot follow the grammar any more (e.g. the text after a trigger does not
    /// fit it); the rest runs unconstrained.
    Abandoned,
}

/// One sequence's position in its constraint.
pub(crate) struct Guide {
    constraint: Constraint,
    /// Active once the trigger was seen (at once without one).
    matcher: Option<Matcher>,
    /// Text generated while waiting for the trigger.
    seen: String,
    abandoned: bool,
}

impl Guide {
    pub(crate) fn new(constraint: &Constraint) -> Self {
        let matcher = constraint.trigger.is_none().then(|| constraint.grammar.matcher.deep_clone());
        Guide { constraint: constraint.clone(), matcher, seen: String::new(), abandoned: false }
    }

    /// Masks the logits of tokens the grammar does not allow now. With `closing`, the budget is
    /// nearly spent: only the most closing tier of allowed tokens stays, so that JSON ends
    /// before the budget does. Returns false when no token is allowed at all (the caller ends
    /// the sequence).
    pub(crate) fn mask(&mut self, logits: &mut [f32], closing: bool) -> bool {
        let Some(m) = self.matcher.as_mut() else { return true };
        match m.compute_mask() {
            Ok(mask) => {
                if mask.num_set() == 0 {
                    return false;
                }
                if closing {
                    let compiler = &self.constraint.compiler;
                    let forced: Vec<u32> = if m.is_accepting().unwrap_or(false) {
                        compiler.stop_ids.iter().copied().filter(|&t| mask.is_allowed(t)).collect()
                    } else {
                        compiler.closers.iter().copied().find(|&t| mask.is_allowed(t)).into_iter().collect()
                    };
                    if !forced.is_empty() {
                        let kept: Vec<(usize, f32)> =
                            forced.iter().filter_map(|&t| logits.get(t as usize).map(|&l| (t as usize, l))).collect();
                        logits.fill(f32::NEG_INFINITY);
                        for (t, l) in kept {
                            // Any finite value: the sampler must pick among these alone.
                            logits[t] = if l.is_finite() { l } else { 0.0 };
                        }
                        return true;
                    }
                }
                let n = mask.len().min(logits.len());
                mask.iter_unset_entries(|i| {
                    if i < n {
                        logits[i] = f32::NEG_INFINITY;
                    }
                });
                for l in logits.iter_mut().skip(n) {
                    *l = f32::NEG_INFINITY;
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Advances past a sampled token whose decoded text is `text`.
    pub(crate) fn advance(&mut self, token: u32, text: &str) -> Progress {
        if self.abandoned {
            return Progress::Abandoned;
        }
        if let Some(m) = self.matcher.as_mut() {
            return match m.consume_token(token) {
                Ok(()) if m.is_stopped() => Progress::Complete,
                Ok(()) => Progress::Continue,
                Err(_) => self.abandon(),
            };
        }
        let Some(trigger) = self.constraint.trigger.as_deref() else { return Progress::Continue };
        self.seen.push_str(text);
        let Some(at) = self.seen.find(trigger) else {
            // Only a tail shorter than the trigger can still become part of it.
            let mut keep = self.seen.len().saturating_sub(trigger.len());
            while !self.seen.is_char_boundary(keep) {
                keep -= 1;
            }
            self.seen.drain(..keep);
            return Progress::Continue;
        };
        let mut m = self.constraint.grammar.matcher.deep_clone();
        let rest = &self.seen[at + trigger.len()..];
        if !rest.is_empty() {
            let tokens = self.constraint.compiler.tokenize(rest);
            if m.consume_tokens(&tokens).is_err() {
                return self.abandon();
            }
        }
        let stopped = m.is_stopped();
        self.matcher = Some(m);
        self.seen.clear();
        if stopped {
            Progress::Complete
        } else {
            Progress::Continue
        }
    }

    fn abandon(&mut self) -> Progress {
        self.matcher = None;
        self.abandoned = true;
        Progress::Abandoned
    }
}
