//! Constrained decoding: a grammar (from `llguidance`) masks the logits so that only tokens that
//! keep the output inside the grammar can be sampled.
//!
//! A [`GrammarCompiler`] is built once per model (the token trie costs tens of milliseconds); it
//! compiles Lark grammars — which may embed JSON schemas with `%json {...}` — into a
//! [`Grammar`], checked when the request arrives so that an unsupported schema is the client's
//! error and not a failure mid-generation. A [`Constraint`] applies a grammar either from the
//! first generated token or lazily: generation runs free until the text contains its triggers in
//! order (the end of a thinking block, a tool call's opening tag), and the grammar governs
//! everything after the last one.

use crate::sampler::Sampler;
use llguidance::api::TopLevelGrammar;
use llguidance::earley::{BiasComputer, ParserRecognizer};
use llguidance::toktrie::{self, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
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
///
/// `ParserFactory::new` builds llguidance's own slicer from `tok_trie()`: four filtered copies of
/// the trie (two of them nearly whole, ~35 MiB for Gemma 3's 262k vocabulary), of which a
/// single-slice mask computer uses one small one. Parsers get our [`StringBodySlicer`] instead, so
/// while the factory is built the environment shows a one-token stand-in and those copies are
/// empty; the vocabulary is installed right after, before any grammar is compiled.
struct TrieEnv {
    trie: OnceLock<TokTrie>,
    stand_in: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        self.trie.get().unwrap_or(&self.stand_in)
    }
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.tok_trie().greedy_tokenize(s)
    }
    /// Greedy splits are not the model's own: never let the grammar insert tokens by itself.
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// Fuel the lexer may spend proving that the current lexeme accepts any string body (llguidance's
/// own figure for its slices).
const SUBSUME_BUDGET: u64 = 1000;

/// The mask computer: where the lexer is inside a JSON string (any [`STRING_BODY_SLICE`] text
/// may follow), every token of that form is allowed at once and only the others are walked;
/// anywhere else the whole trie is walked. This is llguidance's slicer reduced to the one slice we
/// use, holding one filtered trie instead of four.
struct StringBodySlicer {
    env: TokEnv,
    /// Tokens whose bytes all fit inside a JSON string.
    body: SimpleVob,
    /// The trie of every other token.
    rest: TokTrie,
    /// Masks computed the string-body way (tests check the path is taken).
    #[cfg(test)]
    string_body_masks: std::sync::atomic::AtomicUsize,
}

impl StringBodySlicer {
    fn new(env: TokEnv) -> Result<Self, ConstraintError> {
        let trie = env.tok_trie();
        let mut regex = llguidance::derivre::Regex::new(STRING_BODY_SLICE)
            .map_err(|e| ConstraintError::Setup(format!("slice {STRING_BODY_SLICE:?}: {e}")))?;
        let mut body = trie.alloc_token_set();
        for id in 0..trie.vocab_size() as u32 {
            let bytes = trie.token(id);
            if !bytes.is_empty() && regex.is_match_bytes(bytes) {
                body.allow_token(id);
            }
        }
        let mut others = trie.alloc_token_set();
        others.set_all(true);
        others.sub(&body);
        let rest = trie.filter(&others);
        body.trim_trailing_zeros();
        Ok(StringBodySlicer {
            env,
            body,
            rest,
            #[cfg(test)]
            string_body_masks: Default::default(),
        })
    }
}

impl BiasComputer for StringBodySlicer {
    fn compute_bias(&self, rec: &mut ParserRecognizer<'_>, start: &[u8]) -> SimpleVob {
        let trie = self.env.tok_trie();
        let mut set = trie.alloc_token_set();
        let state = rec.lexer_state();
        // The string-body lexeme is the grammar's first extra lexeme (the factory's one slice).
        let in_string_body = start.is_empty()
            && rec.lexer_mut().subsume_possible(state)
            && rec.lexer_mut().check_subsume(state, 0, SUBSUME_BUDGET, None).unwrap_or(false);
        if in_string_body {
            #[cfg(test)]
            self.string_body_masks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            set.or(&self.body);
            self.rest.add_bias(rec, &mut set, &[]);
        } else {
            trie.add_bias(rec, &mut set, start);
        }
        set
    }

    fn trie(&self) -> &TokTrie {
        self.env.tok_trie()
    }
}

/// Compiles grammars for one model's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
    slicer: Arc<StringBodySlicer>,
    /// Tokens that close JSON, in order of preference, for when the token budget runs out.
    closers: Vec<u32>,
    /// Tokens that often end a whole answer (`"`, `}`, `.`, ...), tried first by a closing path.
    enders: Vec<u32>,
    /// Byte length of every token (a closing path prefers long tokens where nothing closes).
    token_len: Vec<u32>,
    stop_ids: Vec<u32>,
}

/// Single tokens that lead out of any JSON state, in order of preference: close a string, an
/// object, an array; after a key, its separator; then the shortest value. Taking the first one the
/// grammar allows at every step ends the JSON in a few tokens per level of nesting (a key opened
/// by `"` is closed by the next `"`, then gets `: ` and an empty string, then `}`). Where none is
/// allowed (required keys, enum values, closing tags) the longest allowed token goes furthest.
const CLOSERS: [&[u8]; 6] = [b"\"", b"}", b"]", b": ", b":", b"0"];

/// The one token slice the mask computer keeps: tokens that can sit anywhere inside a JSON string.
/// llguidance's default four slices cost ~75 MiB more on a 262k vocabulary (Gemma 3) and measured
/// no faster per masked token (206 vs 216 µs on Gemma, 277 vs 300 µs on SmolLM2, JSON mode, this
/// CPU), while no slice at all doubled the mask time.
const STRING_BODY_SLICE: &str = r#"[^"\\\x00-\x1F\x7F]+"#;

/// Single characters that often end a whole answer.
const ENDERS: [&[u8]; 10] = [b"\"", b"}", b"]", b".", b")", b"!", b"?", b">", b"\n", b"0"];

fn closing_tokens(words: &[Vec<u8>], list: &[&[u8]]) -> Vec<u32> {
    list.iter().filter_map(|c| words.iter().position(|w| w == c).map(|i| i as u32)).collect()
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarCompiler")
    }
}

/// The byte trie of a vocabulary whose finished grammars allow the `stops` ids.
fn vocabulary_trie(words: &[Vec<u8>], stops: &[u32], eos: u32) -> TokTrie {
    let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, eos), words);
    if stops.is_empty() {
        trie
    } else {
        trie.with_eos_tokens(stops)
    }
}

impl GrammarCompiler {
    /// `vocab_size` is the width of the model's logits (it may exceed the tokenizer's vocabulary);
    /// a finished grammar allows exactly the tokenizer's stop ids.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self, ConstraintError> {
        let mut words = tokenizer.token_bytes();
        words.resize(vocab_size.max(words.len()), Vec::new());
        let stops = &tokenizer.specials.stop_ids;
        let eos = stops.first().copied().or(tokenizer.specials.eos).unwrap_or(0);
        Self::from_words(&words, stops, eos)
    }

    /// The compiler for a vocabulary given as each token's bytes.
    fn from_words(words: &[Vec<u8>], stops: &[u32], eos: u32) -> Result<Self, ConstraintError> {
        let closers = closing_tokens(words, &CLOSERS);
        let enders = closing_tokens(words, &ENDERS);
        let token_len = words.iter().map(|w| w.len() as u32).collect();
        let trie = vocabulary_trie(words, stops, eos);
        let stand_in = TokTrie::from(&TokRxInfo::new(1, 0), &[Vec::new()]);
        let env = Arc::new(TrieEnv { trie: OnceLock::new(), stand_in });
        let tok_env: TokEnv = env.clone();
        let mut factory = ParserFactory::new(&tok_env, Default::default(), &[STRING_BODY_SLICE.to_string()])
            .map_err(|e| ConstraintError::Setup(e.to_string()))?;
        factory.quiet();
        if env.trie.set(trie).is_err() {
            return Err(ConstraintError::Setup("the vocabulary trie was installed twice".into()));
        }
        let slicer = Arc::new(StringBodySlicer::new(tok_env)?);
        Ok(GrammarCompiler { factory, slicer, closers, enders, token_len, stop_ids: stops.to_vec() })
    }

    /// Compiles a Lark grammar; errors describe what the grammar or schema got wrong.
    pub fn compile(&self, lark: &str) -> Result<Grammar, ConstraintError> {
        let mut parser = self
            .factory
            .create_parser(TopLevelGrammar::from_lark(lark.to_string()))
            .map_err(|e| ConstraintError::Grammar(e.to_string()))?;
        parser.bias_computer = self.slicer.clone();
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
    /// Empty: from the first token. Else free text until each trigger has appeared, in order
    /// (`["</think>", "<tool_call>"]`: a call the model starts after its thinking); the grammar
    /// then governs the text after the last one.
    pub triggers: Vec<String>,
    pub compiler: Arc<GrammarCompiler>,
}

/// What the guide made of a sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    Continue,
    /// The grammar is complete: nothing but a stop token could follow.
    Complete,
}

/// The output can no longer follow its grammar (the library refused a step, allowed nothing, or
/// panicked). The sequence must end with an error: a grammar is a guarantee, never dropped
/// mid-answer to carry on unconstrained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("structured output failed: {0}")]
pub struct GrammarFailure(pub String);

/// One sequence's position in its constraint.
pub(crate) struct Guide {
    constraint: Constraint,
    /// Active once the triggers were seen (at once without any).
    matcher: Option<Matcher>,
    /// Triggers seen so far.
    triggered: usize,
    /// Text generated since the last trigger seen, while waiting for the next.
    seen: String,
    /// The budget is nearly spent: every token now comes from the closing path.
    closing: bool,
    /// The last mask, while near the end of the budget (for replacing a sampled token).
    last_mask: Option<SimpleVob>,
    /// Cost not yet reported: tokens drawn under the grammar, time spent in it.
    constrained_tokens: u64,
    spent: Duration,
}

/// Tokens before the end of the budget from which a guide checks whether it must start closing.
const CLOSING_WINDOW: usize = 64;

/// The token a closing path takes from `mask`: a stop token once the grammar is complete; else an
/// ending token that completes it at once (a regex or grammar ending in `.`, `)`, ...); else the
/// first closer allowed; else the longest allowed token.
fn closing_token(compiler: &GrammarCompiler, m: &mut Matcher, mask: &SimpleVob) -> Option<u32> {
    if m.is_accepting().unwrap_or(false) {
        return compiler.stop_ids.iter().copied().find(|&t| mask.is_allowed(t));
    }
    let completes = |t: u32| {
        let mut after = m.clone();
        after.consume_token(t).is_ok() && (after.is_accepting().unwrap_or(false) || after.is_stopped())
    };
    if let Some(t) = compiler.enders.iter().copied().filter(|&t| mask.is_allowed(t)).find(|&t| completes(t)) {
        return Some(t);
    }
    if let Some(t) = compiler.closers.iter().copied().find(|&t| mask.is_allowed(t)) {
        return Some(t);
    }
    let mut best: Option<(u32, u32)> = None;
    mask.iter_set_entries(|i| {
        let len = compiler.token_len.get(i).copied().unwrap_or(0);
        if best.is_none_or(|(_, l)| len > l) {
            best = Some((i as u32, len));
        }
    });
    best.map(|(t, _)| t)
}

/// Tokens the closing path needs from the matcher's state to a complete grammar, if at most `limit`.
/// (Look-ahead works on plain clones, which share the lexer's caches with the original.)
fn closing_path_len(compiler: &GrammarCompiler, m: &Matcher, limit: usize) -> Option<usize> {
    let mut m = m.clone();
    for steps in 0..=limit {
        if m.is_accepting().unwrap_or(false) || m.is_stopped() {
            return Some(steps);
        }
        let mask = m.compute_mask().ok()?;
        let t = closing_token(compiler, &mut m, &mask)?;
        m.consume_token(t).ok()?;
    }
    None
}

impl Guide {
    pub(crate) fn new(constraint: &Constraint) -> Self {
        let matcher = constraint.triggers.is_empty().then(|| constraint.grammar.matcher.deep_clone());
        Guide {
            constraint: constraint.clone(),
            matcher,
            triggered: 0,
            seen: String::new(),
            closing: false,
            last_mask: None,
            constrained_tokens: 0,
            spent: Duration::ZERO,
        }
    }

    /// Draws the next token under the grammar: mask the logits, sample, vet the draw against the
    /// closing path. `left` is the token budget left, this token included. A grammar that allows
    /// nothing, refuses, or panics inside the library fails the sequence (never the engine thread).
    pub(crate) fn sample(
        &mut self,
        sampler: &mut Sampler,
        logits: &mut [f32],
        left: usize,
    ) -> Result<u32, GrammarFailure> {
        let active = self.active();
        let started = Instant::now();
        catch_unwind(AssertUnwindSafe(|| self.mask_inner(logits, left)))
            .unwrap_or_else(|_| Err(GrammarFailure("the grammar library panicked computing a mask".into())))?;
        let mut spent = started.elapsed();
        let drawn = sampler.sample(logits);
        let started = Instant::now();
        let token = catch_unwind(AssertUnwindSafe(|| self.vet_inner(drawn, left)))
            .map_err(|_| GrammarFailure("the grammar library panicked checking a token".into()))?;
        spent += started.elapsed();
        if active {
            self.constrained_tokens += 1;
            self.spent += spent;
        }
        Ok(token)
    }

    /// See [`Guide::advance_inner`]; a panic inside the grammar library is a failure too.
    pub(crate) fn advance(&mut self, token: u32, text: &str) -> Result<Progress, GrammarFailure> {
        let active = self.active();
        let started = Instant::now();
        let progress = catch_unwind(AssertUnwindSafe(|| self.advance_inner(token, text)))
            .unwrap_or_else(|_| Err(GrammarFailure("the grammar library panicked consuming a token".into())));
        if active {
            self.spent += started.elapsed();
        }
        progress
    }

    /// Tokens drawn under the grammar and the time the grammar took since the last call.
    pub(crate) fn take_cost(&mut self) -> (u64, Duration) {
        (std::mem::take(&mut self.constrained_tokens), std::mem::take(&mut self.spent))
    }

    /// Whether the grammar governs the next token (a lazy one waits for its trigger).
    pub(crate) fn active(&self) -> bool {
        self.matcher.is_some()
    }

    /// Masks the logits of tokens the grammar does not allow now. `left` is the token budget
    /// left, this token included: once the shortest way to finish the grammar (as the closing
    /// path finds it) no longer fits comfortably, the guide follows that path, so that the output
    /// is complete when the budget ends.
    fn mask_inner(&mut self, logits: &mut [f32], left: usize) -> Result<(), GrammarFailure> {
        let compiler = Arc::clone(&self.constraint.compiler);
        let Some(m) = self.matcher.as_mut() else { return Ok(()) };
        if !self.closing && left <= CLOSING_WINDOW {
            // A margin of two tokens absorbs a path that grows by a token as the text moves on.
            // No known way to finish at all: leave the model free rather than steer it nowhere.
            self.closing = closing_path_len(&compiler, m, left).is_some_and(|need| need + 2 >= left);
        }
        match m.compute_mask() {
            Ok(mask) => {
                if mask.num_set() == 0 {
                    return Err(GrammarFailure("the grammar allows no token at this point".into()));
                }
                if left <= CLOSING_WINDOW && !self.closing {
                    self.last_mask = Some(mask.clone());
                }
                if self.closing {
                    if let Some(t) = closing_token(&compiler, m, &mask) {
                        let l = logits.get(t as usize).copied().unwrap_or(0.0);
                        logits.fill(f32::NEG_INFINITY);
                        if let Some(slot) = logits.get_mut(t as usize) {
                            *slot = if l.is_finite() { l } else { 0.0 };
                        }
                        return Ok(());
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
                Ok(())
            }
            Err(e) => Err(GrammarFailure(format!("the grammar cannot go on: {e}"))),
        }
    }

    /// Checks a freely sampled token near the end of the budget: if the closing path after it
    /// would not fit in what is left, the closing path starts now instead (one token can open
    /// several structures at once). Returns the token to use.
    fn vet_inner(&mut self, token: u32, left: usize) -> u32 {
        let (Some(m), Some(mask)) = (self.matcher.as_mut(), self.last_mask.take()) else { return token };
        if self.closing || left > CLOSING_WINDOW {
            return token;
        }
        let compiler = Arc::clone(&self.constraint.compiler);
        let mut after = m.clone();
        let room = left.saturating_sub(1);
        if after.consume_token(token).is_ok() && closing_path_len(&compiler, &after, room).is_some() {
            return token;
        }
        if closing_path_len(&compiler, m, left).is_none() {
            return token; // No known way to finish from here either.
        }
        self.closing = true;
        closing_token(&compiler, m, &mask).unwrap_or(token)
    }

    /// Advances past a sampled token whose decoded text is `text`.
    fn advance_inner(&mut self, token: u32, text: &str) -> Result<Progress, GrammarFailure> {
        if let Some(m) = self.matcher.as_mut() {
            return match m.consume_token(token) {
                Ok(()) if m.is_stopped() => Ok(Progress::Complete),
                Ok(()) => Ok(Progress::Continue),
                Err(e) => Err(GrammarFailure(format!("the grammar refused token {token}: {e}"))),
            };
        }
        self.seen.push_str(text);
        // One token's text may complete more than one trigger.
        while let Some(trigger) = self.constraint.triggers.get(self.triggered) {
            let Some(at) = self.seen.find(trigger.as_str()) else {
                // Only a tail shorter than the trigger can still become part of it.
                let mut keep = self.seen.len().saturating_sub(trigger.len());
                while !self.seen.is_char_boundary(keep) {
                    keep -= 1;
                }
                self.seen.drain(..keep);
                return Ok(Progress::Continue);
            };
            self.seen.drain(..at + trigger.len());
            self.triggered += 1;
        }
        let trigger = self.constraint.triggers.last().map(String::as_str).unwrap_or_default();
        let mut m = self.constraint.grammar.matcher.deep_clone();
        let rest = self.seen.as_str();
        if !rest.is_empty() {
            // The token that completed the trigger was drawn unconstrained: what it carries
            // past the trigger must already fit the grammar.
            let tokens = self.constraint.compiler.tokenize(rest);
            if let Err(e) = m.consume_tokens(&tokens) {
                return Err(GrammarFailure(format!("the text after {trigger:?} does not fit the grammar: {e}")));
            }
        }
        let stopped = m.is_stopped();
        self.matcher = Some(m);
        self.seen.clear();
        Ok(if stopped { Progress::Complete } else { Progress::Continue })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small byte-level vocabulary: printable bytes, whitespace, JSON punctuation runs, escapes,
    /// words, UTF-8, and a special token.
    fn words() -> Vec<Vec<u8>> {
        let mut words: Vec<Vec<u8>> = (0x20u8..0x7f).chain([b'\n', b'\t']).map(|b| vec![b]).collect();
        for t in [
            "{\"", "\":", "\": \"", "\", \"", "\"}", "\\\"", "\\n", "\\\\", "abc", " the", "name", "tags", "12", "345",
            "true", "false", "null", ", ", "\n ", "é", "日本", "\"name\"", "ab\"cd", "a\\b", "}\n", "\"]", "[\"",
            "\u{1}",
        ] {
            words.push(t.as_bytes().to_vec());
        }
        words.push([0xFF].iter().chain(b"<eos>").copied().collect());
        words
    }

    const SCHEMA: &str = r#"start: %json {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "tags"]}"#;

    /// Our one-slice mask computer allows exactly what llguidance's own slicer (same slice, same
    /// trie) allows, at every step of many walks through a JSON schema with strings in it.
    #[test]
    fn string_body_slicer_masks_like_llguidance() {
        let words = words();
        let eos = words.len() as u32 - 1;
        let ours = GrammarCompiler::from_words(&words, &[eos], eos).expect("compiler");
        let env: TokEnv = Arc::new(TrieEnv {
            trie: OnceLock::from(vocabulary_trie(&words, &[eos], eos)),
            stand_in: TokTrie::from(&TokRxInfo::new(1, 0), &[Vec::new()]),
        });
        let mut factory =
            ParserFactory::new(&env, Default::default(), &[STRING_BODY_SLICE.to_string()]).expect("factory");
        factory.quiet();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut steps = 0;
        for walk in 0..12 {
            let mut mine = ours.compile(SCHEMA).expect("grammar").matcher;
            let mut theirs = Matcher::new(factory.create_parser(TopLevelGrammar::from_lark(SCHEMA.to_string())));
            for _ in 0..120 {
                assert_eq!(mine.is_stopped(), theirs.is_stopped());
                if mine.is_stopped() {
                    break;
                }
                let (a, b) = (mine.compute_mask().expect("our mask"), theirs.compute_mask().expect("their mask"));
                let allowed: Vec<u32> = (0..words.len() as u32).filter(|&t| a.is_allowed(t)).collect();
                assert_eq!(allowed, (0..words.len() as u32).filter(|&t| b.is_allowed(t)).collect::<Vec<_>>());
                assert!(!allowed.is_empty());
                steps += 1;
                // Walks differ: some stay in strings (long tokens), others hurry to close them.
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let pick = allowed[((seed >> 33) as usize + walk) % allowed.len()];
                mine.consume_token(pick).expect("our step");
                theirs.consume_token(pick).expect("their step");
            }
        }
        assert!(steps > 200, "walks too short to mean anything: {steps} steps");
        let hits = ours.slicer.string_body_masks.load(std::sync::atomic::Ordering::Relaxed);
        assert!(hits > 20, "the string-body path was taken only {hits} times");
    }
}
