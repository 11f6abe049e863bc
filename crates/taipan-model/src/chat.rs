//! Chat templates: the model's own Jinja template rendered with `minijinja`.
//!
//! The environment mirrors Hugging Face's: `trim_blocks` and `lstrip_blocks`, Python string and
//! dict methods (`.strip()`, `.items()`, via `minijinja-contrib`'s pycompat), `raise_exception`,
//! and key order preserved end to end so that tool schemas render exactly as the client sent them.

use minijinja::{Environment, ErrorKind, Value as Jv};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template does not compile: {0}")]
    Compile(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

/// One chat message as the template sees it. Extra fields (tool calls, names) pass through.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: serde_json::Value,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.into(), content: content.into(), extra: Default::default() }
    }
}

/// What a render needs beyond the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    pub tools: Option<serde_json::Value>,
    pub documents: Option<serde_json::Value>,
    /// Any further template variables (e.g. Jamba's `knobs`).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A compiled chat template with the model's special-token strings.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// Top-level variables the template reads (`tools`, `documents`, `knobs`, ...).
    variables: std::collections::HashSet<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({} bytes)", self.source.len())
    }
}

/// Instructions one rendering may execute. The Jamba template spends a few hundred per message,
/// so this allows conversations of tens of thousands of messages and stops a runaway loop in
/// well under a second.
const TEMPLATE_FUEL: u64 = 20_000_000;

fn raise_exception(message: String) -> Result<Jv, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        // Templates come from model files: one that loops without end must fail, not hang.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned("chat", source.to_string()).map_err(|e| TemplateError::Compile(format!("{e:#}")))?;
        let variables =
            env.get_template("chat").map_err(|e| TemplateError::Compile(e.to_string()))?.undeclared_variables(false);
        Ok(ChatTemplate {
            env,
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            variables,
        })
    }

    /// Whether the template reads a variable, e.g. `tools` or `documents`: a template that does
    /// not would silently drop what the request put there.
    pub fn reads(&self, variable: &str) -> bool {
        self.variables.contains(variable)
    }

    /// Renders with an arbitrary context (`messages`, `tools`, `documents`, `knobs`, ...); the
    /// template's `bos_token`/`eos_token` are added unless the context sets them.
    pub fn render_context(
        &self,
        context: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let tmpl = self.env.get_template("chat").map_err(|e| TemplateError::Render(e.to_string()))?;
        let mut ctx = context.clone();
        ctx.entry("bos_token").or_insert_with(|| self.bos_token.clone().into());
        ctx.entry("eos_token").or_insert_with(|| self.eos_token.clone().into());
        tmpl.render(minijinja::value::Serde(&ctx)).map_err(|e| TemplateError::Render(format!("{e:#}")))
    }

    /// Renders a conversation to the prompt text.
    pub fn render(&self, messages: &[ChatMessage], opts: &RenderOptions) -> Result<String, TemplateError> {
        let tmpl = self.env.get_template("chat").map_err(|e| TemplateError::Render(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), serde_json::to_value(messages).unwrap_or_default());
        ctx.insert("add_generation_prompt".into(), opts.add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        if let Some(t) = &opts.tools {
            ctx.insert("tools".into(), t.clone());
        }
        if let Some(d) = &opts.documents {
            ctx.insert("documents".into(), d.clone());
        }
        tmpl.render(minijinja::value::Serde(&ctx)).map_err(|e| TemplateError::Render(format!("{e:#}")))
    }
}

/// Gemma's turn format, for Gemma GGUF files that carry no template (the 270M one does not):
/// `<start_of_turn>user` / `<start_of_turn>model` turns closed by `<end_of_turn>`, a system
/// message folded into the first user turn, contents trimmed, as Google's own template renders
/// them. Gemma has no tool role: a tool result is shown to the model as a user turn.
pub const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set preamble = messages[0]['content'] | trim ~ "\n\n" -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set preamble = "" -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
{%- set role = "model" if m['role'] == 'assistant' else "user" -%}
<start_of_turn>{{ role }}
{{ (preamble if loop.first else "") ~ (m['content'] | trim) }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}
<start_of_turn>model
{% endif -%}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma(messages: &[ChatMessage], generation: bool) -> String {
        let t = ChatTemplate::new(GEMMA_TEMPLATE, "<bos>", "<eos>").expect("compiles");
        let opts = RenderOptions { add_generation_prompt: generation, ..Default::default() };
        t.render(messages, &opts).expect("renders")
    }

    /// Gemma's turns as Google's template renders them: system text folded into the first user
    /// turn, "assistant" spoken as "model", contents trimmed, the model's turn opened at the end.
    #[test]
    fn gemma_template_renders_gemma_turns() {
        let conversation = [
            ChatMessage::new("system", "Be brief. "),
            ChatMessage::new("user", " Hi there\n"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "Capital of France?"),
        ];
        assert_eq!(
            gemma(&conversation, true),
            "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(gemma(&[ChatMessage::new("user", "Hi")], false), "<bos><start_of_turn>user\nHi<end_of_turn>\n");
    }
}
