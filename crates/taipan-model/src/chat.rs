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

/// How Python's `json.dumps` lays out one value.
struct PyJsonLayout {
    indent: Option<usize>,
    item_separator: String,
    key_separator: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJsonLayout {
    fn string(&self, s: &str, out: &mut String) {
        // serde_json escapes exactly the characters Python escapes (quote, backslash, controls).
        let quoted = serde_json::to_string(s).unwrap_or_default();
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }

    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }

    fn write(&self, v: &serde_json::Value, depth: usize, out: &mut String) {
        use serde_json::Value as J;
        match v {
            J::String(s) => self.string(s, out),
            J::Array(items) if items.is_empty() => out.push_str("[]"),
            J::Object(map) if map.is_empty() => out.push_str("{}"),
            J::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_separator);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            J::Object(map) => {
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_separator);
                    }
                    self.newline(depth + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key_separator);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
}

/// `tojson` as Hugging Face's chat templates define it: Python's `json.dumps` with
/// `ensure_ascii=False` by default, `indent`, `separators` and `sort_keys` as keywords (an indent
/// may also be given positionally, as in Jinja). Unlike Jinja's and minijinja's own filter it does
/// not escape `<`, `>`, `&` or `'`, so tool schemas render byte for byte as transformers renders
/// them.
fn tojson(value: Jv, indent: Option<Jv>, kwargs: minijinja::value::Kwargs) -> Result<Jv, minijinja::Error> {
    let bad = |m: &str| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {m}"));
    let indent = match kwargs.get::<Option<Jv>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v).map_err(|_| bad("indent must be a non-negative integer"))?),
    };
    let (item_separator, key_separator) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(pair) if pair.len() == 2 => (pair[0].clone(), pair[1].clone()),
        Some(_) => return Err(bad("separators must be a pair of strings")),
        // Python's defaults: no space after the comma once lines are indented.
        None => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let layout = PyJsonLayout {
        indent,
        item_separator,
        key_separator,
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| bad(&e.to_string()))?;
    let mut out = String::new();
    layout.write(&json, 0, &mut out);
    Ok(Jv::from_safe_string(out))
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
        env.add_filter("tojson", tojson);
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

    /// `tojson` writes what Python's `json.dumps` writes in transformers' templates: nothing
    /// HTML-escaped, key order kept, Python's indented layout, its keywords honoured.
    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let src = "{{ v | tojson }}\n{{ v | tojson(indent=2) }}\n{{ v | tojson(ensure_ascii=true, sort_keys=true, separators=[',', ':']) }}";
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let v = serde_json::json!({"b": "it's <x> & é", "a": [1, 2.5, {}, []], "n": null, "t": true});
        let mut ctx = serde_json::Map::new();
        ctx.insert("v".into(), v);
        let want = "{\"b\": \"it's <x> & é\", \"a\": [1, 2.5, {}, []], \"n\": null, \"t\": true}\n\
                    {\n  \"b\": \"it's <x> & é\",\n  \"a\": [\n    1,\n    2.5,\n    {},\n    []\n  ],\n  \"n\": null,\n  \"t\": true\n}\n\
                    {\"a\":[1,2.5,{},[]],\"b\":\"it's <x> & \\u00e9\",\"n\":null,\"t\":true}";
        assert_eq!(t.render_context(&ctx).expect("renders"), want);
        let bad = ChatTemplate::new("{{ 1 | tojson(colour=1) }}", "", "").expect("compiles");
        assert!(bad.render_context(&serde_json::Map::new()).is_err(), "an unknown keyword is an error");
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
