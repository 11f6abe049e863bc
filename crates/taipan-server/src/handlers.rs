//! Route handlers: read, validate, submit to the engine, shape the answer.

use crate::error::{dialect_of, HttpError};
use crate::ids::{new_id, new_tool_id, random_u64, unix_now};
use crate::prompt::{chat_prompt, message_boundaries, resolve_max_tokens, ContextWindow};
use crate::state::AppState;
use crate::structured::{plan_output, shape_constraint, OutputPlan};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use taipan_api::chat::{ChatRequest, AI21_MAX_TOKENS};
use taipan_api::reasoning::{split_reasoning, ReasoningPiece, ReasoningStream};
use taipan_api::response::{self, ChoiceOut, LogprobEntry, OpenAiStream, Usage};
use taipan_api::tools::{parse_answer, StreamPiece, ToolStream};
use taipan_api::{parse_chat, parse_completion, ApiError, Dialect, ErrorKind, PromptInput};
use taipan_engine::output::ThinkingBudget;
use taipan_engine::{
    EngineHandle, Event, EventSink, Fault, FinishReason, GenRequest, SamplingParams, SubmitError, TokenLogprob,
};
use taipan_model::Model;
use tokio::sync::mpsc;

/// Forwards engine events to the request's task; notices when the client is gone.
struct ChannelSink {
    events: mpsc::UnboundedSender<Event>,
    client: ClientPresence,
}

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.events.send(event).is_ok()
    }
    fn alive(&self) -> bool {
        !self.events.is_closed() && self.client.present()
    }
}

/// Whether the client still waits for a request's answer. hyper drops the handler's future (a
/// plain answer) or the response body (a stream) when the connection closes; the [`ClientGuard`]
/// held there clears the flag, and the engine, which checks it every step, cancels the request
/// at once, during a long prefill too, rather than at the next event it would have sent.
#[derive(Clone)]
struct ClientPresence(Arc<std::sync::atomic::AtomicBool>);

/// Clears its [`ClientPresence`] when dropped; counted in [`AppState::in_flight`] meanwhile.
struct ClientGuard(ClientPresence, Arc<std::sync::atomic::AtomicUsize>);

impl ClientPresence {
    fn new(state: &AppState) -> (ClientPresence, ClientGuard) {
        let p = ClientPresence(Arc::new(std::sync::atomic::AtomicBool::new(true)));
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        (p.clone(), ClientGuard(p, Arc::clone(&state.in_flight)))
    }

    fn present(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        (self.0).0.store(false, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}

type HttpResult<T> = Result<T, HttpError>;

fn fail(dialect: Dialect, e: ApiError) -> HttpError {
    HttpError::new(dialect, e)
}

fn engine(state: &AppState, dialect: Dialect) -> HttpResult<EngineHandle> {
    state.engine.get().cloned().ok_or_else(|| {
        fail(dialect, ApiError::new(ErrorKind::Unavailable, "the model is still loading; retry shortly"))
    })
}

fn read_body(body: Result<Bytes, BytesRejection>, dialect: Dialect, limit: usize) -> HttpResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            fail(
                dialect,
                ApiError::new(ErrorKind::PayloadTooLarge, format!("request body exceeds the limit of {limit} bytes")),
            )
        } else {
            fail(dialect, ApiError::invalid("body", format!("cannot read the request body: {e}")))
        }
    })
}

fn check_model(state: &AppState, name: &str, dialect: Dialect) -> HttpResult<()> {
    let names = state.names.get().map(Vec::as_slice).unwrap_or(&[]);
    if names.iter().any(|n| n == name) {
        return Ok(());
    }
    Err(fail(
        dialect,
        ApiError {
            kind: ErrorKind::UnknownModel,
            field: Some("model".into()),
            message: format!("model '{name}' is not served here; available: {}", names.join(", ")),
        },
    ))
}

fn busy(dialect: Dialect) -> HttpError {
    HttpError {
        dialect,
        error: ApiError::new(ErrorKind::Overloaded, "the server is busy: too many requests are waiting; retry shortly"),
        retry_after: Some(1),
    }
}

/// A place among the requests being prepared, or 429 at once when the queue is full or that
/// many are already being prepared (nothing is rendered or tokenized for a request that would
/// be refused anyway).
fn admit_preparation(
    state: &AppState,
    eng: &EngineHandle,
    dialect: Dialect,
) -> HttpResult<tokio::sync::OwnedSemaphorePermit> {
    if eng.stats.queued.load(Ordering::SeqCst) >= state.config.max_queue.max(1) {
        return Err(busy(dialect));
    }
    Arc::clone(&state.preparing).try_acquire_owned().map_err(|_| busy(dialect))
}

fn submit(
    eng: &EngineHandle,
    req: GenRequest,
    dialect: Dialect,
    client: &ClientPresence,
) -> HttpResult<mpsc::UnboundedReceiver<Event>> {
    let (tx, rx) = mpsc::unbounded_channel();
    match eng.submit(req, Box::new(ChannelSink { events: tx, client: client.clone() })) {
        Ok(()) => Ok(rx),
        Err(SubmitError::QueueFull(_)) => Err(busy(dialect)),
        Err(SubmitError::Stopped) => {
            Err(fail(dialect, ApiError::new(ErrorKind::Unavailable, "the engine has stopped")))
        }
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn token_text(model: &Model, id: u32) -> String {
    model.tokenizer.decode(&[id], false).unwrap_or_default()
}

fn logprob_entry(model: &Model, t: &TokenLogprob) -> LogprobEntry {
    LogprobEntry {
        token: token_text(model, t.id),
        logprob: t.logprob,
        bytes: model.tokenizer.bytes_of(t.id),
        top: t.top.iter().map(|&(id, lp)| (token_text(model, id), lp, model.tokenizer.bytes_of(id))).collect(),
    }
}

fn json_response(body: String) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Server-sent events from a channel of already formatted `data:` payloads. The body holds the
/// client's guard: the stream's requests are cancelled as soon as hyper drops it.
fn sse_response(rx: mpsc::Receiver<String>, client: ClientGuard) -> Response {
    let stream = futures_util::stream::unfold((rx, client), |(mut rx, client)| async move {
        let payload = rx.recv().await?;
        Some((Ok::<_, Infallible>(Bytes::from(format!("data: {payload}\n\n"))), (rx, client)))
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

fn count(state: &AppState, resp: Response) -> Response {
    state.http.count(resp.status().as_u16());
    resp
}

/// The fault a test asks for with `x-taipan-fault`, honoured only when the server was started
/// with fault injection enabled.
fn injected_fault(state: &AppState, headers: &HeaderMap) -> Option<Fault> {
    if !state.config.fault_injection {
        return None;
    }
    match headers.get("x-taipan-fault")?.to_str().ok()? {
        "panic-sequence" => Some(Fault::PanicInSequence),
        "panic-forward" => Some(Fault::PanicInForward),
        "kill-engine" => Some(Fault::KillEngine),
        _ => None,
    }
}

/// `POST /studio/v1/chat/completions` (AI21) and `/v1/chat/completions` (OpenAI).
pub async fn chat_in(
    dialect: Dialect,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let fault = injected_fault(&state, &headers);
    let r = chat(&state, body, dialect, fault).await.unwrap_or_else(IntoResponse::into_response);
    count(&state, r)
}

async fn chat(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    dialect: Dialect,
    fault: Option<Fault>,
) -> HttpResult<Response> {
    let bytes = read_body(body, dialect, state.config.max_body_bytes)?;
    let req = parse_chat(&bytes, dialect).map_err(|e| fail(dialect, e))?;
    let eng = engine(state, dialect)?;
    check_model(state, &req.model, dialect)?;
    let model = Arc::clone(&eng.model);
    let req = Arc::new(req);
    let preparing = admit_preparation(state, &eng, dialect)?;
    let (client, guard) = ClientPresence::new(state);
    let (prompt, snapshot_at, plan) = {
        let (model, req, state) = (Arc::clone(&model), Arc::clone(&req), Arc::clone(state));
        tokio::task::spawn_blocking(move || {
            let ids = chat_prompt(&model, &req)?;
            let plan = plan_output(&model, &req, state.config.reasoning_format, || state.grammar_compiler())?;
            // Recurrent models can only resume where a state was saved: at message boundaries.
            let bounds =
                if model.cache_spec().is_recurrent() { message_boundaries(&model, &req, &ids) } else { vec![] };
            Ok::<_, ApiError>((ids, bounds, plan))
        })
        .await
        .map_err(|e| fail(dialect, ApiError::new(ErrorKind::Internal, e.to_string())))?
        .map_err(|e| fail(dialect, e))?
    };
    let cap = if dialect == Dialect::Ai21 { Some(AI21_MAX_TOKENS) } else { None };
    let max_tokens =
        resolve_max_tokens(prompt.len(), ContextWindow::of(&eng), req.max_tokens, cap).map_err(|e| fail(dialect, e))?;
    let prompt_tokens = prompt.len();
    let gen = GenRequest {
        prompt,
        n: req.n,
        max_tokens,
        min_tokens: req.min_tokens,
        sampling: SamplingParams {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed.unwrap_or_else(random_u64),
        },
        stop: req.stop.clone(),
        ignore_eos: req.ignore_eos,
        logprobs: req.logprobs.then_some(req.top_logprobs),
        prompt_logprobs: None,
        snapshot_at,
        constraint: plan.constraint.clone(),
        special_text: plan.special_text,
        thinking_budget: thinking_budget(&model, &plan, state.config.reasoning_budget),
        fault,
    };
    let rx = submit(&eng, gen, dialect, &client)?;
    drop(preparing);
    let id = new_id(if dialect == Dialect::Ai21 { "chat-" } else { "chatcmpl-" });
    if req.stream {
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(stream_chat(rx, tx, dialect, id, Arc::clone(&req), model, prompt_tokens, plan));
        return Ok(sse_response(out, guard));
    }
    let (mut choices, cached_tokens) = collect_choices(rx, req.n, &model, dialect).await?;
    if let Some(thinking) = &plan.thinking {
        for (c, _) in choices.iter_mut() {
            // Thinking cut off by the budget leaves no answer, not the half-thought as one.
            let split = split_reasoning(c.content.as_deref().unwrap_or_default(), thinking);
            c.reasoning_content = split.reasoning;
            c.content = Some(split.answer);
        }
    }
    if let Some(syntax) = &plan.tool_syntax {
        for (c, _) in choices.iter_mut() {
            let answer = parse_answer(c.content.as_deref().unwrap_or_default(), syntax, &req.tools, &mut new_tool_id);
            if !answer.calls.is_empty() {
                c.finish_reason = "tool_calls".into();
            }
            c.content = answer.content;
            c.tool_calls = answer.calls;
        }
    }
    let usage = Usage { prompt_tokens, completion_tokens: choices.iter().map(|c| c.1).sum(), cached_tokens };
    let choices: Vec<ChoiceOut> = choices.into_iter().map(|c| c.0).collect();
    Ok(json_response(match dialect {
        Dialect::Ai21 => response::ai21_chat_response(&id, &choices, usage),
        Dialect::OpenAi => response::openai_chat_response(&id, unix_now(), &req.model, &choices, usage),
    }))
}

/// The server's thinking budget, for thinking the prompt opened and a closing tag that is one
/// token.
fn thinking_budget(model: &Model, plan: &OutputPlan, budget: Option<usize>) -> Option<ThinkingBudget> {
    let thinking = plan.thinking.as_ref().filter(|t| t.opened_by_prompt)?;
    Some(ThinkingBudget { tokens: budget?, close: model.tokenizer.token_id(&thinking.close)? })
}

/// Waits for every choice; returns each with its completion-token count, and the prompt tokens
/// served from the cache.
async fn collect_choices(
    mut rx: mpsc::UnboundedReceiver<Event>,
    n: usize,
    model: &Model,
    dialect: Dialect,
) -> HttpResult<(Vec<(ChoiceOut, usize)>, usize)> {
    let mut out: Vec<(ChoiceOut, usize)> = (0..n)
        .map(|i| {
            let c = ChoiceOut {
                index: i,
                content: Some(String::new()),
                tool_calls: vec![],
                finish_reason: String::new(),
                logprobs: None,
                reasoning_content: None,
            };
            (c, 0)
        })
        .collect();
    let mut done = 0;
    let mut cached = 0;
    while done < n {
        match rx.recv().await {
            Some(Event::Delta { choice, text, logprobs }) => {
                let c = &mut out[choice].0;
                c.content.get_or_insert_with(String::new).push_str(&text);
                if !logprobs.is_empty() {
                    c.logprobs.get_or_insert_with(Vec::new).extend(logprobs.iter().map(|t| logprob_entry(model, t)));
                }
            }
            Some(Event::Done { choice, finish, completion_tokens, cached_tokens }) => {
                out[choice].0.finish_reason = finish_str(finish).into();
                out[choice].1 = completion_tokens;
                cached = cached_tokens;
                done += 1;
            }
            Some(Event::PromptLogprobs(_)) => {}
            Some(Event::Error(e)) => return Err(fail(dialect, ApiError::new(ErrorKind::Internal, e))),
            Some(Event::Cancelled(e)) => return Err(fail(dialect, ApiError::new(ErrorKind::Unavailable, e))),
            None => return Err(fail(dialect, ApiError::new(ErrorKind::Internal, "the engine dropped the request"))),
        }
    }
    Ok((out, cached))
}

fn stream_error(message: &str) -> String {
    json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}}).to_string()
}

/// A stream delta for one piece of an answer that may hold tool calls.
fn piece_delta(piece: StreamPiece, dialect: Dialect) -> Value {
    match piece {
        StreamPiece::Content(text) => json!({"content": text}),
        StreamPiece::CallStart { index, id, name } => {
            let function = match dialect {
                Dialect::Ai21 => json!({"name": name}),
                Dialect::OpenAi => json!({"name": name, "arguments": ""}),
            };
            json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": function}]})
        }
        StreamPiece::CallArguments { index, arguments } => {
            json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
        }
    }
}

/// Stream deltas for pieces of an answer: thinking as `reasoning_content`, the answer through the
/// tool-call parser when calls may come, else as `content`.
fn answer_deltas(pieces: Vec<ReasoningPiece>, mut tools: Option<&mut ToolStream>, dialect: Dialect) -> Vec<Value> {
    let mut out = Vec::new();
    for piece in pieces {
        match (piece, tools.as_deref_mut()) {
            (ReasoningPiece::Thinking(t), _) => out.push(json!({"reasoning_content": t})),
            (ReasoningPiece::Answer(a), Some(ts)) => {
                out.extend(ts.push(&a, &mut new_tool_id).into_iter().map(|p| piece_delta(p, dialect)))
            }
            (ReasoningPiece::Answer(a), None) => out.push(json!({"content": a})),
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn stream_chat(
    mut rx: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<String>,
    dialect: Dialect,
    id: String,
    req: Arc<ChatRequest>,
    model: Arc<Model>,
    prompt_tokens: usize,
    plan: OutputPlan,
) {
    let created = unix_now();
    let oa = OpenAiStream { id: &id, created, model: &req.model, include_usage: req.include_usage };
    let first: Vec<String> = match dialect {
        Dialect::Ai21 => vec![response::ai21_chat_chunk(&id, json!({"role": "assistant"}), None, None)],
        Dialect::OpenAi => {
            (0..req.n).map(|i| oa.chat_chunk(i, json!({"role": "assistant", "content": ""}), None, None)).collect()
        }
    };
    for f in first {
        if tx.send(f).await.is_err() {
            return;
        }
    }
    // Answers that may hold tool calls go through a parser per choice, after the thinking is
    // split off (a splitter per choice too).
    let mut tool_streams: Vec<Option<ToolStream>> =
        (0..req.n).map(|_| plan.tool_syntax.as_ref().map(|s| ToolStream::new(s.clone(), req.tools.clone()))).collect();
    let mut thinking: Vec<Option<ReasoningStream>> =
        (0..req.n).map(|_| plan.thinking.clone().map(ReasoningStream::new)).collect();
    let mut completion_tokens = 0;
    let mut cached_tokens = 0;
    let mut done = 0;
    while done < req.n {
        let mut payloads: Vec<String> = Vec::new();
        match rx.recv().await {
            Some(Event::Delta { choice, text, logprobs }) => {
                let pieces = match thinking.get_mut(choice).and_then(Option::as_mut) {
                    Some(rs) => rs.push(&text),
                    None => vec![ReasoningPiece::Answer(text)],
                };
                let deltas = answer_deltas(pieces, tool_streams.get_mut(choice).and_then(Option::as_mut), dialect);
                match dialect {
                    Dialect::Ai21 => payloads.extend(
                        deltas
                            .into_iter()
                            .filter(|d| d.get("content").is_none_or(|c| c.as_str() != Some("")))
                            .map(|d| response::ai21_chat_chunk(&id, d, None, None)),
                    ),
                    Dialect::OpenAi => {
                        let lp: Vec<LogprobEntry> = logprobs.iter().map(|t| logprob_entry(&model, t)).collect();
                        let lp = req.logprobs.then_some(lp.as_slice());
                        if deltas.is_empty() && lp.is_some_and(|l| !l.is_empty()) {
                            payloads.push(oa.chat_chunk(choice, json!({"content": ""}), None, lp));
                        }
                        for (k, d) in deltas.into_iter().enumerate() {
                            payloads.push(oa.chat_chunk(choice, d, None, if k == 0 { lp } else { None }));
                        }
                    }
                }
            }
            Some(Event::Done { choice, finish, completion_tokens: c, cached_tokens: hit }) => {
                completion_tokens += c;
                cached_tokens = hit;
                done += 1;
                let mut finish = finish_str(finish);
                let held = thinking.get_mut(choice).and_then(Option::as_mut).map(|rs| rs.finish()).unwrap_or_default();
                let mut tail = answer_deltas(held, tool_streams.get_mut(choice).and_then(Option::as_mut), dialect);
                if let Some(ts) = tool_streams.get_mut(choice).and_then(Option::as_mut) {
                    tail.extend(ts.finish(&mut new_tool_id).into_iter().map(|p| piece_delta(p, dialect)));
                    if ts.has_calls() {
                        finish = "tool_calls";
                    }
                }
                for d in tail {
                    payloads.push(match dialect {
                        Dialect::Ai21 => response::ai21_chat_chunk(&id, d, None, None),
                        Dialect::OpenAi => oa.chat_chunk(choice, d, None, None),
                    });
                }
                payloads.push(match dialect {
                    Dialect::Ai21 => response::ai21_chat_chunk(
                        &id,
                        json!({"content": ""}),
                        Some(finish),
                        Some(Usage { prompt_tokens, completion_tokens, cached_tokens }),
                    ),
                    Dialect::OpenAi => oa.chat_chunk(choice, json!({}), Some(finish), None),
                });
            }
            Some(Event::PromptLogprobs(_)) => continue,
            Some(Event::Error(e)) | Some(Event::Cancelled(e)) => {
                let _ = tx.send(stream_error(&e)).await;
                let _ = tx.send("[DONE]".into()).await;
                return;
            }
            None => {
                let _ = tx.send(stream_error("the engine dropped the request")).await;
                let _ = tx.send("[DONE]".into()).await;
                return;
            }
        };
        for payload in payloads {
            if tx.send(payload).await.is_err() {
                return; // Client gone: dropping `rx` cancels the sequence.
            }
        }
    }
    if dialect == Dialect::OpenAi && req.include_usage {
        let usage = Usage { prompt_tokens, completion_tokens, cached_tokens };
        let _ = tx.send(oa.usage_chunk("chat.completion.chunk", usage)).await;
    }
    let _ = tx.send("[DONE]".into()).await;
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let fault = injected_fault(&state, &headers);
    let r = completions_inner(&state, body, fault).await.unwrap_or_else(IntoResponse::into_response);
    count(&state, r)
}

async fn completions_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    fault: Option<Fault>,
) -> HttpResult<Response> {
    let d = Dialect::OpenAi;
    let bytes = read_body(body, d, state.config.max_body_bytes)?;
    let req = parse_completion(&bytes).map_err(|e| fail(d, e))?;
    let eng = engine(state, d)?;
    check_model(state, &req.model, d)?;
    let model = Arc::clone(&eng.model);
    let preparing = admit_preparation(state, &eng, d)?;
    let (client, guard) = ClientPresence::new(state);
    // Tokenize every prompt first so that a bad one fails the request before any work starts.
    let mut prompts = Vec::new();
    for (i, p) in req.prompts.iter().enumerate() {
        let (ids, text) = match p {
            PromptInput::Text(t) => (crate::prompt::tokenize(&model, t).map_err(|e| fail(d, e))?, t.clone()),
            PromptInput::Tokens(ids) => {
                // The tokenizer may know more ids than the model has embeddings for.
                if let Some(&bad) = ids.iter().find(|&&t| t as usize >= model.vocab_size()) {
                    let msg = format!("token id {bad} is outside the model's vocabulary of {}", model.vocab_size());
                    return Err(fail(d, ApiError::invalid(format!("prompt.{i}"), msg)));
                }
                let text = model
                    .tokenizer
                    .decode(ids, false)
                    .map_err(|e| fail(d, ApiError::invalid(format!("prompt.{i}"), e.to_string())))?;
                (ids.clone(), text)
            }
        };
        let max =
            resolve_max_tokens(ids.len(), ContextWindow::of(&eng), Some(req.max_tokens), None).map_err(|mut e| {
                e.field = Some("prompt".into());
                fail(d, e)
            })?;
        prompts.push((ids, text, max));
    }
    let constraint = match req.guided.clone() {
        Some(guided) => {
            let state = Arc::clone(state);
            let c = tokio::task::spawn_blocking(move || shape_constraint(&guided, || state.grammar_compiler()))
                .await
                .map_err(|e| fail(d, ApiError::new(ErrorKind::Internal, e.to_string())))?
                .map_err(|e| fail(d, e))?;
            Some(c)
        }
        None => None,
    };
    // Prepared: the engine's queue takes over the back-pressure.
    drop(preparing);
    let id = new_id("cmpl-");
    let created = unix_now();
    let (tx, mut out_rx) = mpsc::channel::<String>(64);
    let model_name = req.model.clone();
    let req = Arc::new(req);
    let tx_final = tx.clone();
    let worker = {
        let (req, model, eng) = (Arc::clone(&req), Arc::clone(&model), eng.clone());
        let id = id.clone();
        async move {
            let oa = OpenAiStream { id: &id, created, model: &model_name, include_usage: req.include_usage };
            let mut usage = Usage::default();
            let mut results = Vec::new();
            for (pi, (ids, text, max_tokens)) in prompts.into_iter().enumerate() {
                let gen = GenRequest {
                    prompt: ids.clone(),
                    n: req.n,
                    max_tokens,
                    min_tokens: req.min_tokens,
                    sampling: SamplingParams {
                        temperature: req.temperature,
                        top_p: req.top_p,
                        top_k: req.top_k,
                        seed: req.seed.unwrap_or_else(random_u64),
                    },
                    stop: req.stop.clone(),
                    ignore_eos: req.ignore_eos,
                    logprobs: req.logprobs,
                    prompt_logprobs: (req.echo && req.logprobs.is_some()).then(|| req.logprobs.unwrap_or(0)),
                    snapshot_at: vec![],
                    constraint: constraint.clone(),
                    special_text: false,
                    // A raw prompt opens no thinking of ours to budget.
                    thinking_budget: None,
                    fault,
                };
                let mut rx = submit(&eng, gen, d, &client)?;
                usage.prompt_tokens += ids.len();
                let mut texts = vec![String::new(); req.n];
                let mut lps: Vec<Vec<(String, Option<LogprobEntry>)>> = vec![Vec::new(); req.n];
                let mut prompt_lp: Vec<(String, Option<LogprobEntry>)> = Vec::new();
                let mut done = 0;
                let mut prompt_cached = 0;
                if req.echo && req.stream {
                    for c in 0..req.n {
                        let _ = tx.send(oa.completion_chunk(pi * req.n + c, &text, None, None)).await;
                    }
                }
                while done < req.n {
                    match rx.recv().await {
                        Some(Event::PromptLogprobs(v)) => {
                            prompt_lp = ids
                                .iter()
                                .zip(v)
                                .map(|(&t, e)| (token_text(&model, t), e.map(|e| logprob_entry(&model, &e))))
                                .collect();
                        }
                        Some(Event::Delta { choice, text: delta, logprobs }) => {
                            let entries: Vec<(String, Option<LogprobEntry>)> = logprobs
                                .iter()
                                .map(|t| (token_text(&model, t.id), Some(logprob_entry(&model, t))))
                                .collect();
                            if req.stream {
                                let lp =
                                    req.logprobs.map(|_| response::completion_logprobs(&entries, texts[choice].len()));
                                if tx.send(oa.completion_chunk(pi * req.n + choice, &delta, None, lp)).await.is_err() {
                                    return Ok(None);
                                }
                            }
                            texts[choice].push_str(&delta);
                            lps[choice].extend(entries);
                        }
                        Some(Event::Done { choice, finish, completion_tokens, cached_tokens }) => {
                            usage.completion_tokens += completion_tokens;
                            prompt_cached = cached_tokens;
                            done += 1;
                            if req.stream
                                && tx
                                    .send(oa.completion_chunk(pi * req.n + choice, "", Some(finish_str(finish)), None))
                                    .await
                                    .is_err()
                            {
                                return Ok(None);
                            }
                            let mut full = std::mem::take(&mut texts[choice]);
                            let mut entries = std::mem::take(&mut lps[choice]);
                            if req.echo {
                                full.insert_str(0, &text);
                                let mut with_prompt = prompt_lp.clone();
                                with_prompt.extend(entries);
                                entries = with_prompt;
                            }
                            let lp = req.logprobs.map(|_| response::completion_logprobs(&entries, 0));
                            results.push((pi * req.n + choice, full, finish_str(finish).to_string(), lp));
                        }
                        Some(Event::Error(e)) => return Err(fail(d, ApiError::new(ErrorKind::Internal, e))),
                        Some(Event::Cancelled(e)) => return Err(fail(d, ApiError::new(ErrorKind::Unavailable, e))),
                        None => {
                            return Err(fail(d, ApiError::new(ErrorKind::Internal, "the engine dropped the request")))
                        }
                    }
                }
                usage.cached_tokens += prompt_cached;
            }
            results.sort_by_key(|r| r.0);
            Ok::<_, HttpError>(Some((results, usage)))
        }
    };
    if req.stream {
        let include_usage = req.include_usage;
        let tx2 = tx_final;
        let id2 = id.clone();
        let model_name = req.model.clone();
        tokio::spawn(async move {
            match worker.await {
                Ok(Some((_, usage))) => {
                    if include_usage {
                        let oa = OpenAiStream { id: &id2, created, model: &model_name, include_usage };
                        let _ = tx2.send(oa.usage_chunk("text_completion", usage)).await;
                    }
                    let _ = tx2.send("[DONE]".into()).await;
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx2.send(stream_error(&e.error.message)).await;
                    let _ = tx2.send("[DONE]".into()).await;
                }
            }
        });
        return Ok(sse_response(out_rx, guard));
    }
    drop(tx_final);
    let drain = tokio::spawn(async move { while out_rx.recv().await.is_some() {} });
    let result = worker.await?;
    drain.abort();
    let (results, usage) = result.unwrap_or_default();
    Ok(json_response(response::completion_response(&id, created, &req.model, &results, usage)))
}

pub async fn models_openai(State(state): State<Arc<AppState>>) -> Response {
    let names = state.names.get().cloned().unwrap_or_default();
    // `max_model_len` as vLLM reports it: what the memory budget holds, not just the model's own.
    let ctx = state.engine.get().map(|e| e.context_limit()).unwrap_or(0);
    let data: Vec<Value> = names
        .iter()
        .map(|n| {
            json!({"id": n, "object": "model", "created": state.created, "owned_by": "taipan", "max_model_len": ctx})
        })
        .collect();
    json_response(json!({"object": "list", "data": data}).to_string())
}

pub async fn models_ai21(State(state): State<Arc<AppState>>) -> Response {
    let names = state.names.get().cloned().unwrap_or_default();
    let ctx = state.engine.get().map(|e| e.context_limit()).unwrap_or(0);
    let data: Vec<Value> = names
        .iter()
        .map(|n| {
            json!({"id": n, "name": n, "updated": state.created, "context_length": ctx, "quantization": "GGUF",
                   "max_completion_tokens": AI21_MAX_TOKENS.min(ctx), "pricing": {"prompt": 0, "completion": 0}})
        })
        .collect();
    json_response(json!({"data": data}).to_string())
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let status = match state.engine.get() {
        Some(e) if e.is_running() => return json_response(json!({"status": "ok"}).to_string()),
        Some(_) => "engine stopped",
        None => "loading",
    };
    {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, json!({"status": status}).to_string()).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }
}

pub async fn tokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let d = Dialect::OpenAi;
        let bytes = read_body(body, d, state.config.max_body_bytes)?;
        let eng = engine(&state, d)?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| fail(d, ApiError::invalid("body", format!("invalid JSON: {e}"))))?;
        let text = v.get("prompt").or_else(|| v.get("content")).and_then(Value::as_str);
        let text =
            text.ok_or_else(|| fail(d, ApiError::invalid("prompt", "a string 'prompt' (or 'content') is required")))?;
        let special = v.get("parse_special").and_then(Value::as_bool).unwrap_or(true);
        let mut ids = eng
            .model
            .tokenizer
            .encode(text, special)
            .map_err(|e| fail(d, ApiError::new(ErrorKind::Internal, e.to_string())))?;
        let add =
            v.get("add_special_tokens").or_else(|| v.get("add_special")).and_then(Value::as_bool).unwrap_or(false);
        let bos = eng.model.tokenizer.specials.bos;
        if add && eng.model.tokenizer.specials.add_bos && bos.is_some() && ids.first().copied() != bos {
            ids.splice(0..0, bos);
        }
        Ok::<_, HttpError>(json_response(
            json!({"tokens": ids, "count": ids.len(), "max_model_len": eng.context_limit()}).to_string(),
        ))
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    count(&state, r)
}

pub async fn detokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let d = Dialect::OpenAi;
        let bytes = read_body(body, d, state.config.max_body_bytes)?;
        let eng = engine(&state, d)?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| fail(d, ApiError::invalid("body", format!("invalid JSON: {e}"))))?;
        let ids: Option<Vec<u32>> = v
            .get("tokens")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|t| t.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32)).collect());
        let ids = ids.ok_or_else(|| fail(d, ApiError::invalid("tokens", "a list of token ids is required")))?;
        let text =
            eng.model.tokenizer.decode(&ids, false).map_err(|e| fail(d, ApiError::invalid("tokens", e.to_string())))?;
        Ok::<_, HttpError>(json_response(json!({"prompt": text, "content": text}).to_string()))
    }
    .await
    .unwrap_or_else(IntoResponse::into_response);
    count(&state, r)
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match crate::metrics::render(&state) {
        Ok((text, content_type)) => {
            let mut r = (StatusCode::OK, text).into_response();
            if let Ok(v) = HeaderValue::from_str(&content_type) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}")).into_response(),
    }
}

pub async fn not_found(uri: Uri) -> Response {
    let d = dialect_of(uri.path());
    HttpError::new(d, ApiError::new(ErrorKind::NotFound, format!("no route for {}", uri.path()))).into_response()
}
