//! Thinking kept apart from the answer, for models that think before they answer in a
//! `<think>...</think>` block (Jamba Reasoning 3B, DeepSeek-R1, Qwen3).
//!
//! The block is either opened by the chat template's generation prompt (the generated text starts
//! inside it) or by the model itself (its answer starts with the opening tag). The thinking is
//! the text up to the closing tag, trimmed; the answer is what follows, leading blanks dropped.
//! An answer that never closes its thinking (the token budget ran out) has no answer at all.
//! [`split_reasoning`] splits a whole answer; [`ReasoningStream`] does the same incrementally,
//! and its pieces always join to the same two texts.

use crate::tools::partial_suffix;

/// The tags around a model's thinking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinkingSyntax {
    pub open: String,
    pub close: String,
    /// The prompt opens the block: generated text starts inside it.
    pub opened_by_prompt: bool,
}

impl ThinkingSyntax {
    /// `<think>` ... `</think>`.
    pub fn think(opened_by_prompt: bool) -> Self {
        ThinkingSyntax { open: "<think>".into(), close: "</think>".into(), opened_by_prompt }
    }
}

/// A whole answer split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitAnswer {
    /// The thinking, trimmed; `None` when there was none (or it was blank).
    pub reasoning: Option<String>,
    /// The answer after the thinking (empty if the thinking never ended).
    pub answer: String,
    /// The answer began with thinking that never closed.
    pub unfinished_thinking: bool,
}

/// Splits a whole generated text into thinking and answer.
pub fn split_reasoning(text: &str, syntax: &ThinkingSyntax) -> SplitAnswer {
    let thought =
        if syntax.opened_by_prompt { Some(text) } else { text.trim_start().strip_prefix(syntax.open.as_str()) };
    let Some(thought) = thought else {
        return SplitAnswer { reasoning: None, answer: text.to_string(), unfinished_thinking: false };
    };
    let nonblank = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
    match thought.find(syntax.close.as_str()) {
        Some(at) => SplitAnswer {
            reasoning: nonblank(&thought[..at]),
            answer: thought[at + syntax.close.len()..].trim_start().to_string(),
            unfinished_thinking: false,
        },
        None => SplitAnswer { reasoning: nonblank(thought), answer: String::new(), unfinished_thinking: true },
    }
}

/// One piece of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasoningPiece {
    Thinking(String),
    Answer(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not yet known whether the text opens a thinking block.
    Start,
    Thinking,
    Answer,
}

/// Splits a stream of text into thinking and answer pieces. Text that may be the start of a tag,
/// and blanks that may turn out to be the trimmed ends of either part, are held back until the
/// text after them decides.
pub struct ReasoningStream {
    syntax: ThinkingSyntax,
    phase: Phase,
    /// Text received and not yet sent.
    pending: String,
    /// Something of the current part was sent (so inner blanks are part of it).
    sent_in_phase: bool,
    /// The thinking was opened and never closed (so far).
    open: bool,
}

impl ReasoningStream {
    pub fn new(syntax: ThinkingSyntax) -> Self {
        let phase = if syntax.opened_by_prompt { Phase::Thinking } else { Phase::Start };
        ReasoningStream { open: phase == Phase::Thinking, syntax, phase, pending: String::new(), sent_in_phase: false }
    }

    /// Whether the text so far is inside thinking that has not closed.
    pub fn in_thinking(&self) -> bool {
        self.open
    }

    pub fn push(&mut self, text: &str) -> Vec<ReasoningPiece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.phase {
                Phase::Start => {
                    let lead = self.pending.trim_start();
                    if let Some(rest) = lead.strip_prefix(self.syntax.open.as_str()) {
                        self.pending = rest.to_string();
                        self.phase = Phase::Thinking;
                        self.open = true;
                        continue;
                    }
                    if lead.is_empty() || self.syntax.open.starts_with(lead) {
                        return out; // Still undecided.
                    }
                    self.phase = Phase::Answer;
                    // No thinking: the answer is the text as it is, leading blanks included.
                    self.sent_in_phase = true;
                }
                Phase::Thinking => {
                    if let Some(at) = self.pending.find(self.syntax.close.as_str()) {
                        let thought = self.pending[..at].trim_end().to_string();
                        self.send(&thought, &mut out, ReasoningPiece::Thinking);
                        self.pending.drain(..at + self.syntax.close.len());
                        self.phase = Phase::Answer;
                        self.sent_in_phase = false;
                        self.open = false;
                        continue;
                    }
                    // Hold a possible start of the closing tag, and trailing blanks.
                    let keep = partial_suffix(&self.pending, &self.syntax.close);
                    let sendable = self.pending[..self.pending.len() - keep].trim_end().len();
                    let part = self.pending[..sendable].to_string();
                    self.pending.drain(..sendable);
                    self.send(&part, &mut out, ReasoningPiece::Thinking);
                    return out;
                }
                Phase::Answer => {
                    let part = std::mem::take(&mut self.pending);
                    self.send(&part, &mut out, ReasoningPiece::Answer);
                    return out;
                }
            }
        }
    }

    /// Sends `part` as the current phase's piece, dropping the part's leading blanks while
    /// nothing of it was sent yet.
    fn send(&mut self, part: &str, out: &mut Vec<ReasoningPiece>, piece: fn(String) -> ReasoningPiece) {
        let part = if self.sent_in_phase { part } else { part.trim_start() };
        if !part.is_empty() {
            out.push(piece(part.to_string()));
            self.sent_in_phase = true;
        }
    }

    /// The end of the text: what was held back and belongs to the answer (blanks held at the
    /// end of unfinished thinking are trimmed away).
    pub fn finish(&mut self) -> Vec<ReasoningPiece> {
        let rest = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        match self.phase {
            Phase::Start => {
                if !rest.is_empty() {
                    out.push(ReasoningPiece::Answer(rest));
                }
            }
            Phase::Thinking => self.send(rest.trim_end(), &mut out, ReasoningPiece::Thinking),
            Phase::Answer => self.send(&rest, &mut out, ReasoningPiece::Answer),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(pieces: &[ReasoningPiece]) -> (Option<String>, String) {
        let mut thinking: Option<String> = None;
        let mut answer = String::new();
        for p in pieces {
            match p {
                ReasoningPiece::Thinking(t) => thinking.get_or_insert_with(String::new).push_str(t),
                ReasoningPiece::Answer(a) => answer.push_str(a),
            }
        }
        (thinking, answer)
    }

    #[test]
    fn whole_answers_split_at_the_closing_tag() {
        let opened = ThinkingSyntax::think(true);
        let s = split_reasoning("\nAdd them: 4.\n</think>\n\nThe answer is 4.", &opened);
        assert_eq!(s.reasoning.as_deref(), Some("Add them: 4."));
        assert_eq!(s.answer, "The answer is 4.");
        assert!(!s.unfinished_thinking);
        let cut = split_reasoning("Let me think about", &opened);
        assert_eq!(
            (cut.reasoning.as_deref(), cut.answer.as_str(), cut.unfinished_thinking),
            (Some("Let me think about"), "", true)
        );
        let own = ThinkingSyntax::think(false);
        let s = split_reasoning("  <think>hmm</think>Yes.", &own);
        assert_eq!((s.reasoning.as_deref(), s.answer.as_str()), (Some("hmm"), "Yes."));
        let none = split_reasoning(" Plain <think> answer.", &own);
        assert_eq!((none.reasoning, none.answer.as_str()), (None, " Plain <think> answer."));
        let blank = split_reasoning("\n\n</think>\n{\"a\": 1}", &opened);
        assert_eq!((blank.reasoning, blank.answer.as_str()), (None, "{\"a\": 1}"));
    }

    /// Every split of a text into pieces streams to the whole-answer split.
    #[test]
    fn streams_join_to_the_whole_split() {
        let cases = [
            (true, "\n  First, add.\n\nThen check. </thi nk> is not a tag.\n</think>\n\nThe answer: 4 </think> again"),
            (true, "thinking cut off mid <\\th"),
            (true, "</think>"),
            (false, "\n<think>\nhm\n</think>\nOk"),
            (false, "<thinking is not the tag"),
            (false, "  plain"),
            (false, " <thi"),
            (true, "a\u{e9}\u{1f40d} \n</think> b\u{e9}"),
        ];
        for (opened, text) in cases {
            let syntax = ThinkingSyntax::think(opened);
            let whole = split_reasoning(text, &syntax);
            let chars: Vec<char> = text.chars().collect();
            for step in 1..9 {
                let mut stream = ReasoningStream::new(syntax.clone());
                let mut pieces = Vec::new();
                for chunk in chars.chunks(step) {
                    pieces.extend(stream.push(&chunk.iter().collect::<String>()));
                }
                assert_eq!(stream.in_thinking(), whole.unfinished_thinking, "{text:?} step {step}");
                pieces.extend(stream.finish());
                assert!(pieces
                    .iter()
                    .all(|p| !matches!(p, ReasoningPiece::Thinking(t) | ReasoningPiece::Answer(t) if t.is_empty())));
                assert_eq!(joined(&pieces), (whole.reasoning.clone(), whole.answer.clone()), "{text:?} step {step}");
            }
        }
    }
}
