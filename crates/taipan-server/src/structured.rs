//! What a chat request's output must look like, turned into a decoding constraint: JSON mode and
//! JSON schemas from the first token, a forced tool call (`required` or a named function) from
//! the first token, and with `auto` a tool call constrained from its opening tag on.

use crate::prompt::tools_offered;
use serde_json::Value;
use std::sync::Arc;
use taipan_api::chat::ChatRequest;
use taipan_api::tools::{json_grammar, tool_call_grammar, ToolChoice, ToolSyntax};
use taipan_api::{ApiError, ErrorKind, ResponseFormat};
use taipan_engine::{Constraint, GrammarCompiler};
use taipan_model::Model;

/// The tool-call syntax of a model: Jamba's when its template writes `<tool_calls>`, else the
/// fallback `<tool_call>` one. Tags that are single special tokens are matched as such.
pub fn tool_syntax(model: &Model) -> ToolSyntax {
    let jamba = model.template.as_ref().is_some_and(|t| t.source.contains("<tool_calls>"));
    let tag = if jamba { "<tool_calls>" } else { "<tool_call>" };
    let special = model.tokenizer.token_id(tag).is_some_and(|id| model.tokenizer.is_special(id));
    if jamba {
        ToolSyntax::jamba(special)
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
}

fn compile(compiler: &Arc<GrammarCompiler>, lark: &str, field: &str) -> Result<Arc<taipan_engine::Grammar>, ApiError> {
    compiler
        .compile(lark)
        .map(Arc::new)
        .map_err(|e| ApiError::invalid(field, format!("this schema is not supported for constrained decoding: {e}")))
}

/// Decides the constraint for `req`. `compiler` is only asked for when a grammar is needed.
pub fn plan_output(
    model: &Model,
    req: &ChatRequest,
    compiler: impl FnOnce() -> Result<Arc<GrammarCompiler>, String>,
) -> Result<OutputPlan, ApiError> {
    let tools = tools_offered(req);
    let forced_tool = match &req.tool_choice {
        ToolChoice::Required if tools => Some(None),
        ToolChoice::Named(name) if tools => Some(Some(name.as_str())),
        _ => None,
    };
    let json_schema = match &req.response_format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(None),
        ResponseFormat::JsonSchema(s) => Some(Some(s)),
    };
    if !tools && json_schema.is_none() {
        return Ok(OutputPlan::default());
    }
    let compiler = compiler().map_err(|e| ApiError::new(ErrorKind::Internal, e))?;
    let syntax = tool_syntax(model);
    let special_text = tools && syntax.special_tags;
    let constraint = |lark: String, field: &str, trigger: Option<String>| -> Result<Constraint, ApiError> {
        Ok(Constraint { grammar: compile(&compiler, &lark, field)?, trigger, compiler: Arc::clone(&compiler) })
    };
    let tools_list: &[Value] = &req.tools;
    let plan = if let Some(only) = forced_tool {
        let g = tool_call_grammar(tools_list, only, req.parallel_tool_calls && only.is_none(), &syntax, true);
        OutputPlan { constraint: Some(constraint(g, "tools", None)?), tool_syntax: Some(syntax), special_text }
    } else if let Some(schema) = json_schema {
        // JSON mode wins over optional tool calls: the answer must be the JSON.
        let field = if schema.is_some() { "response_format.json_schema.schema" } else { "response_format" };
        OutputPlan {
            constraint: Some(constraint(json_grammar(schema), field, None)?),
            tool_syntax: None,
            special_text: false,
        }
    } else {
        let g = tool_call_grammar(tools_list, None, req.parallel_tool_calls, &syntax, false);
        let trigger = Some(syntax.open.clone());
        OutputPlan { constraint: Some(constraint(g, "tools", trigger)?), tool_syntax: Some(syntax), special_text }
    };
    Ok(plan)
}
