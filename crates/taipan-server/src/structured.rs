//! What a chat request's output must look like, turned into a decoding constraint: JSON mode and
//! JSON schemas from the first token, a forced tool call (`required` or a named function) from
//! the first token, and with `auto` a tool call constrained from its opening tag on. For a model
//! that thinks first (its generation prompt opens `<think>`), "the first token" is the first
//! after its thinking: structured output constrains the answer, never the thinking.

use crate::prompt::tools_offered;
use serde_json::Value;
use std::sync::Arc;
use taipan_api::chat::ChatRequest;
use taipan_api::reasoning::ThinkingSyntax;
use taipan_api::tools::{tool_call_grammar, ToolChoice, ToolSyntax};
use taipan_api::{ApiError, ErrorKind, Guided};
use taipan_engine::{Constraint, GrammarCompiler};
use taipan_model::{ChatMessage, Model, RenderOptions};

/// What the server does with a thinking model's thinking (`--reasoning-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningFormat {
    /// Kept apart from the answer (`reasoning_content`) when the model thinks in `<think>` tags.
    #[default]
    Auto,
    /// Left in the answer as the model wrote it, tags included.
    None,
    /// As `Auto`, and a model without thinking tags is refused at start-up.
    Separate,
}

impl std::str::FromStr for ReasoningFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ReasoningFormat::Auto),
            "none" => Ok(ReasoningFormat::None),
            "separate" => Ok(ReasoningFormat::Separate),
            other => Err(format!("unknown reasoning format {other:?} (expected auto, none or separate)")),
        }
    }
}

/// The thinking tags of a model whose template and vocabulary have `<think>` and `</think>`;
/// whether its generation prompt opens the block is read from a rendering.
pub fn thinking_syntax(model: &Model) -> Option<ThinkingSyntax> {
    let template = model.template.as_ref()?;
    let syntax = ThinkingSyntax::think(false);
    let in_vocabulary = |tag: &str| model.tokenizer.token_id(tag).is_some();
    if !(template.source.contains(&syntax.close) && in_vocabulary(&syntax.open) && in_vocabulary(&syntax.close)) {
        return None;
    }
    let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
    let probe = template.render(&[ChatMessage::new("user", "Hi")], &opts).ok()?;
    Some(ThinkingSyntax::think(probe.trim_end().ends_with(&syntax.open)))
}

/// The tool-call syntax of a model: Jamba's when its template writes `<tool_calls>`; Hermes'
/// (one `<tool_call>` block per call) when a template that reads `tools` writes `<tool_call>`
/// (Jamba Reasoning 3B, Qwen); else the fallback `<tool_call>[...]` one. Tags that are single
/// special tokens are matched as such.
pub fn tool_syntax(model: &Model) -> ToolSyntax {
    let template = model.template.as_ref();
    let jamba = template.is_some_and(|t| t.source.contains("<tool_calls>"));
    let hermes = !jamba && template.is_some_and(|t| t.reads("tools") && t.source.contains("<tool_call>"));
    let tag = if jamba { "<tool_calls>" } else { "<tool_call>" };
    let special = model.tokenizer.token_id(tag).is_some_and(|id| model.tokenizer.is_special(id));
    if jamba {
        ToolSyntax::jamba(special)
    } else if hermes {
        ToolSyntax::hermes(special)
    } else {
        ToolSyntax::generic(special)
    }
}

/// How one request's output is constrained and read back.
#[derive(Debug, Default)]
pub struct OutputPlan {
    pub constraint: Option<Constraint>,
    /// Set when the answer may hold tool calls: the syntax to parse them with.
    pub tool_syntax: Option<ToolSyntax>,
    /// Special-token tags must reach the parser as text.
    pub special_text: bool,
    /// Set when the answer starts with thinking to keep apart: its tags.
    pub thinking: Option<ThinkingSyntax>,
}

/// A constraint from a Lark grammar; a grammar that does not compile is the client's error in
/// `field`.
fn constraint_from(
    compiler: &Arc<GrammarCompiler>,
    lark: &str,
    field: &str,
    triggers: Vec<String>,
) -> Result<Constraint, ApiError> {
    let grammar = compiler
        .compile(lark)
        .map_err(|e| ApiError::invalid(field, format!("cannot be used for constrained decoding: {e}")))?;
    Ok(Constraint { grammar: Arc::new(grammar), triggers, compiler: Arc::clone(compiler) })
}

/// The constraint for an output shape alone (legacy completions).
pub fn shape_constraint(
    guided: &Guided,
    compiler: impl FnOnce() -> Result<Arc<GrammarCompiler>, String>,
) -> Result<Constraint, ApiError> {
    let compiler = compiler().map_err(|e| ApiError::new(ErrorKind::Internal, e))?;
    constraint_from(&compiler, &guided.shape.lark(), &guided.field, vec![])
}

/// Decides the constraint for `req`. `compiler` is only asked for when a grammar is needed.
pub fn plan_output(
    model: &Model,
    req: &ChatRequest,
    reasoning: ReasoningFormat,
    compiler: impl FnOnce() -> Result<Arc<GrammarCompiler>, String>,
) -> Result<OutputPlan, ApiError> {
    let thinking = match reasoning {
        ReasoningFormat::None => None,
        ReasoningFormat::Auto | ReasoningFormat::Separate => thinking_syntax(model),
    };
    let special = |tag: &str| model.tokenizer.token_id(tag).is_some_and(|id| model.tokenizer.is_special(id));
    let thinking_special = thinking.as_ref().is_some_and(|t| special(&t.open) || special(&t.close));
    // A grammar waits for the end of thinking the prompt opened. (A model that opens its own
    // thinking is constrained from its first token, so under a grammar it answers at once.)
    let after_thinking: Vec<String> = thinking.iter().filter(|t| t.opened_by_prompt).map(|t| t.close.clone()).collect();
    let plan = plan_answer(model, req, compiler, &after_thinking)?;
    Ok(OutputPlan { special_text: plan.special_text || thinking_special, thinking, ..plan })
}

/// The constraint and tool syntax of the answer, which starts after `after_thinking`'s tags.
fn plan_answer(
    model: &Model,
    req: &ChatRequest,
    compiler: impl FnOnce() -> Result<Arc<GrammarCompiler>, String>,
    after_thinking: &[String],
) -> Result<OutputPlan, ApiError> {
    let tools = tools_offered(req);
    let forced_tool = match &req.tool_choice {
        ToolChoice::Required if tools => Some(None),
        ToolChoice::Named(name) if tools => Some(Some(name.as_str())),
        _ => None,
    };
    if !tools && req.guided.is_none() {
        return Ok(OutputPlan::default());
    }
    let compiler = compiler().map_err(|e| ApiError::new(ErrorKind::Internal, e))?;
    let syntax = tool_syntax(model);
    let special_text = tools && syntax.special_tags;
    let constraint = |lark: String, field: &str, then: Option<&str>| {
        let triggers = after_thinking.iter().map(String::as_str).chain(then).map(String::from).collect();
        constraint_from(&compiler, &lark, field, triggers)
    };
    let tools_list: &[Value] = &req.tools;
    let plan = if let Some(only) = forced_tool {
        let g = tool_call_grammar(tools_list, only, req.parallel_tool_calls && only.is_none(), &syntax, true);
        OutputPlan {
            constraint: Some(constraint(g, "tools", None)?),
            tool_syntax: Some(syntax),
            special_text,
            thinking: None,
        }
    } else if let Some(guided) = &req.guided {
        // A demanded shape wins over optional tool calls: the answer must be that shape.
        OutputPlan {
            constraint: Some(constraint(guided.shape.lark(), &guided.field, None)?),
            tool_syntax: None,
            special_text: false,
            thinking: None,
        }
    } else {
        let g = tool_call_grammar(tools_list, None, req.parallel_tool_calls, &syntax, false);
        let open = syntax.open.clone();
        OutputPlan {
            constraint: Some(constraint(g, "tools", Some(&open))?),
            tool_syntax: Some(syntax),
            special_text,
            thinking: None,
        }
    };
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::{chat_prompt, render};
    use serde_json::json;
    use std::path::PathBuf;
    use std::sync::{mpsc, OnceLock};
    use taipan_api::tools::parse_answer;
    use taipan_api::{parse_chat, Dialect};
    use taipan_engine::{EngineConfig, Event, GenRequest};
    use taipan_model::LoadOptions;

    fn fixture(path: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(path)
    }

    /// jamba-tiny-a with the Jamba 1.5 chat template (its own file carries a ChatML one).
    fn jamba() -> Arc<Model> {
        static M: OnceLock<Arc<Model>> = OnceLock::new();
        Arc::clone(M.get_or_init(|| {
            let mut m = Model::load(&fixture("jamba-tiny-a"), LoadOptions::default()).expect("loads");
            let src = std::fs::read_to_string(fixture("spec/jamba-chat-template.jinja")).expect("template");
            m.set_chat_template(&src).expect("compiles");
            Arc::new(m)
        }))
    }

    fn golden(name: &str) -> String {
        let text = std::fs::read_to_string(fixture("spec/jamba-chat-template.examples.json")).expect("goldens");
        let v: Value = serde_json::from_str(&text).expect("json");
        let case = v["cases"].as_array().and_then(|c| c.iter().find(|c| c["name"] == name)).expect("case");
        case["rendered"].as_str().expect("rendered").to_string()
    }

    const WEATHER: &str = r#"{"type": "function", "function": {"name": "get_current_weather",
        "description": "Get the current weather", "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "City"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location", "format"]}}}"#;

    fn ai21(body: Value) -> ChatRequest {
        parse_chat(body.to_string().as_bytes(), Dialect::Ai21).expect("valid request")
    }

    /// AI21 requests with tools, documents and JSON mode render as the Jamba template's goldens.
    #[test]
    fn jamba_requests_render_as_the_goldens() {
        let m = jamba();
        let weather: Value = serde_json::from_str(WEATHER).unwrap();
        let tools = ai21(json!({"model": "m", "tools": [weather],
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}));
        assert_eq!(render(&m, &tools, None, true).unwrap(), golden("4_tools_user"));

        let args = |city: &str| format!(r#"{{"location": "{city}", "format": "celsius"}}"#);
        let call = |id: &str, city: &str| {
            json!({"id": id, "type": "function",
            "function": {"name": "get_current_weather", "arguments": args(city)}})
        };
        let round_trip = ai21(json!({"model": "m", "tools": [weather], "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [call("c1", "Paris"), call("c2", "Rome")]},
            {"role": "tool", "content": "18 C", "tool_call_id": "c1"},
            {"role": "tool", "content": "21 C", "tool_call_id": "c2"}]}));
        assert_eq!(render(&m, &round_trip, None, true).unwrap(), golden("5_tool_roundtrip"));

        let docs = ai21(json!({"model": "m", "messages": [
            {"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Who wrote Harry Potter?"}],
            "documents": [
                {"content": "HP was written by J.K. Rowling.", "metadata": {"title": "Harry Potter"}},
                {"content": "Gatsby is by Fitzgerald.",
                 "metadata": [{"key": "title", "value": "Gatsby"}, {"key": "country", "value": "United States"},
                              {"key": "genre", "value": "Novel"}]}]}));
        assert_eq!(render(&m, &docs, None, true).unwrap(), golden("6_documents"));

        let json_mode = ai21(json!({"model": "m", "messages": [{"role": "user", "content": "Describe Washington."}],
            "response_format": {"type": "json_object"}}));
        assert_eq!(render(&m, &json_mode, None, true).unwrap(), golden("7_json_knob"));
    }

    /// A template that reads neither tools nor documents (jamba-tiny-a's own ChatML one) gets
    /// them, and earlier calls, in the documented fallback formats.
    #[test]
    fn chatml_template_gets_the_fallback_formats() {
        let m = Model::load(&fixture("jamba-tiny-a"), LoadOptions::default()).expect("loads");
        let weather: Value = serde_json::from_str(WEATHER).unwrap();
        let req = ai21(json!({"model": "m", "tools": [weather], "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
            {"role": "tool", "content": "18 C", "tool_call_id": "c1"}],
            "documents": [{"content": "Paris is in France.", "id": "d1", "metadata": {"topic": "geo"}}],
            "response_format": {"type": "json_object"}}));
        let text = render(&m, &req, None, true).unwrap();
        let system = text.split("<|im_end|>").next().unwrap();
        assert!(
            system
                .starts_with("<|startoftext|><|im_start|>system\nBe brief.\n\nYou are an expert at calling functions."),
            "{text}"
        );
        assert!(
            system.contains("<tools>[{\"name\": \"get_current_weather\", \"description\": \"Get the current weather\""),
            "{text}"
        );
        assert!(system.contains("<tool_call>[{\"name\": \"function_name\""), "{text}");
        assert!(
            system.contains("<documents>\n## Document 0 (id: d1)\ntopic: geo\nParis is in France.\n</documents>"),
            "{text}"
        );
        assert!(system.ends_with("Answer with a single JSON object and nothing else."), "{text}");
        assert!(text.contains("<|im_start|>assistant\n<tool_call>[{\"name\": \"get_current_weather\", \"arguments\": {\"location\": \"Paris\"}}]</tool_call><|im_end|>"), "{text}");
        assert!(text.contains("<|im_start|>tool\n18 C<|im_end|>"), "{text}");
        let plan = plan_output(&m, &req, ReasoningFormat::Auto, compiler_for(&m)).unwrap();
        assert!(plan.constraint.is_some() && plan.tool_syntax.is_none(), "JSON mode wins over optional calls");
        // `none` keeps the tools out of the prompt.
        let mut none = req.clone();
        none.tool_choice = ToolChoice::None;
        assert!(!render(&m, &none, None, true).unwrap().contains("<tools>"));
    }

    fn run(model: &Arc<Model>, prompt: Vec<u32>, plan: &OutputPlan, max_tokens: usize, seed: u64) -> String {
        let engine = taipan_engine::engine::start(
            Arc::clone(model),
            EngineConfig { threads: 1, kv_cache_bytes: 16 << 20, ..Default::default() },
        )
        .expect("engine starts");
        let mut req = GenRequest::new(prompt, max_tokens);
        req.sampling = taipan_engine::SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed };
        req.constraint = plan.constraint.clone();
        req.special_text = plan.special_text;
        let (tx, rx) = mpsc::channel();
        engine.submit(req, Box::new(tx)).expect("queued");
        let mut text = String::new();
        loop {
            match rx.recv().expect("answer") {
                Event::Delta { text: t, .. } => text.push_str(&t),
                Event::Done { .. } => return text,
                Event::Error(e) | Event::Cancelled(e) => panic!("{e}"),
                Event::PromptLogprobs(_) => {}
            }
        }
    }

    fn compiler_for(m: &Model) -> impl FnOnce() -> Result<Arc<GrammarCompiler>, String> + '_ {
        move || GrammarCompiler::new(&m.tokenizer, m.vocab_size()).map(Arc::new).map_err(|e| e.to_string())
    }

    /// A random-weight model forced to call a tool, sampled at temperature 1 with budgets from
    /// tight to roomy, still writes a complete call that parses, names the tool and has the
    /// required, enumerated arguments.
    #[test]
    fn forced_jamba_tool_call_parses() {
        let m = jamba();
        let weather: Value = serde_json::from_str(WEATHER).unwrap();
        let body = json!({"model": "m", "tools": [weather], "tool_choice": "required",
            "messages": [{"role": "user", "content": "Weather in Paris?"}]});
        let req = parse_chat(body.to_string().as_bytes(), Dialect::OpenAi).unwrap();
        let plan = plan_output(&m, &req, ReasoningFormat::Auto, compiler_for(&m)).unwrap();
        assert_eq!(plan.tool_syntax, Some(ToolSyntax::jamba(false)));
        let prompt = chat_prompt(&m, &req).unwrap();
        for (budget, seed) in [(80, 1), (120, 2), (200, 3), (400, 4)] {
            let text = run(&m, prompt.clone(), &plan, budget, seed);
            assert!(text.trim_end().ends_with("</tool_calls>"), "{budget}: {text}");
            let mut n = 0;
            let answer = parse_answer(&text, &ToolSyntax::jamba(false), &req.tools, &mut || {
                n += 1;
                format!("id{n}")
            });
            assert!(!answer.calls.is_empty(), "{text}");
            for call in &answer.calls {
                assert_eq!(call.name, "get_current_weather");
                let args: Value = serde_json::from_str(&call.arguments).unwrap();
                assert!(args["location"].is_string(), "{text}");
                assert!(["celsius", "fahrenheit"].contains(&args["format"].as_str().unwrap_or("")), "{text}");
            }
        }
    }

    /// Jamba Reasoning 3B's form (jamba-tiny-dense): Hermes calls and thinking the prompt opens,
    /// both read from the template and vocabulary; a grammar then waits for `</think>` (and, for
    /// optional calls, the call's tag after it). `--reasoning-format none` turns the split off.
    #[test]
    fn a_thinking_hermes_model_is_recognised_and_planned_for() {
        let m = Model::load(&fixture("jamba-tiny-dense.gguf"), LoadOptions::default()).expect("loads");
        assert_eq!(tool_syntax(&m), ToolSyntax::hermes(false));
        assert_eq!(thinking_syntax(&m), Some(ThinkingSyntax::think(true)));
        assert_eq!(tool_syntax(&jamba()), ToolSyntax::jamba(false));
        assert_eq!(thinking_syntax(&jamba()), None);
        let weather: Value = serde_json::from_str(WEATHER).unwrap();
        let triggers = |choice: Value, format: ReasoningFormat| {
            let body = json!({"model": "m", "tools": [weather.clone()], "tool_choice": choice,
                "messages": [{"role": "user", "content": "Weather in Paris?"}]});
            let req = parse_chat(body.to_string().as_bytes(), Dialect::OpenAi).unwrap();
            let plan = plan_output(&m, &req, format, compiler_for(&m)).unwrap();
            (plan.constraint.expect("constrained").triggers, plan.thinking.is_some())
        };
        assert_eq!(triggers(json!("required"), ReasoningFormat::Auto), (vec!["</think>".to_string()], true));
        assert_eq!(
            triggers(json!("auto"), ReasoningFormat::Auto),
            (vec!["</think>".to_string(), "<tool_call>".to_string()], true)
        );
        assert_eq!(triggers(json!("required"), ReasoningFormat::None), (vec![], false));
        assert_eq!(triggers(json!("auto"), ReasoningFormat::None), (vec!["<tool_call>".to_string()], false));
    }

    #[test]
    fn unsupported_schemas_are_the_clients_error() {
        let m = jamba();
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "s",
                "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}});
        let req = parse_chat(body.to_string().as_bytes(), Dialect::OpenAi).unwrap();
        let err = plan_output(&m, &req, ReasoningFormat::Auto, compiler_for(&m)).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("response_format.json_schema.schema"));
        assert_eq!(err.kind, ErrorKind::Invalid);
    }
}
