//! Server configuration and the state shared by handlers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use taipan_engine::{EngineHandle, GrammarCompiler};

/// AI21's public model names, served by the loaded model when no aliases are configured.
pub const AI21_MODEL_NAMES: [&str; 11] = [
    "jamba-large",
    "jamba-mini",
    "jamba-1.5-large",
    "jamba-1.5-mini",
    "jamba-large-1.7",
    "jamba-large-1.7-2025-07",
    "jamba-mini-2",
    "jamba-mini-2-2026-01",
    "jamba-large-1.6",
    "jamba-mini-1.6",
    "jamba-instruct",
];

/// Everything the server is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub model_path: PathBuf,
    /// The Hub repository the model came from (`org/repo`), served as its first name, as vLLM does.
    pub hub_repo: Option<String>,
    /// Accepted API keys; empty turns auth off.
    pub api_keys: Vec<String>,
    /// Extra names the model answers to; `None` means AI21's public names.
    pub aliases: Option<Vec<String>>,
    pub max_body_bytes: usize,
    /// Requests that may wait for the engine before new ones get 429.
    pub max_queue: usize,
    pub threads: usize,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    pub shutdown_grace_secs: u64,
    /// KV cache size, batch token budget and concurrency of the engine.
    pub engine: taipan_engine::EngineConfig,
    /// Honour the `x-taipan-fault` header (tests of failure handling only; off in production).
    pub fault_injection: bool,
    /// Whether a thinking model's thinking is kept apart from its answer.
    pub reasoning_format: crate::structured::ReasoningFormat,
    /// Tokens of thinking a request may spend before `</think>` is forced (none: no limit).
    pub reasoning_budget: Option<usize>,
}

impl ServerConfig {
    /// The names to serve for a model called `model_name` loaded from `model_path`.
    pub fn served_names(&self, model_name: &str) -> Vec<String> {
        // The file name is the stable id; `general.name` joins it when it is usable as one.
        let mut names: Vec<String> = self.hub_repo.iter().cloned().collect();
        if let Some(stem) = self.model_path.file_stem().map(|s| s.to_string_lossy().into_owned()) {
            names.push(stem);
        }
        if !model_name.chars().any(char::is_whitespace) {
            names.push(model_name.to_string());
        }
        match &self.aliases {
            Some(a) => names.extend(a.iter().cloned()),
            None => names.extend(AI21_MODEL_NAMES.iter().map(|s| s.to_string())),
        }
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
        names
    }
}

/// Counters of HTTP outcomes, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub ok: AtomicU64,
    pub client_errors: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub server_errors: AtomicU64,
}

impl HttpStats {
    pub fn count(&self, status: u16) {
        let c = match status {
            200..=299 => &self.ok,
            429 => &self.rejected_busy,
            400..=499 => &self.client_errors,
            _ => &self.server_errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Shared by every handler.
pub struct AppState {
    pub config: ServerConfig,
    /// Set once the model has loaded; until then the server answers 503.
    pub engine: OnceLock<EngineHandle>,
    /// Names the model answers to, the loaded model's own name first.
    pub names: OnceLock<Vec<String>>,
    pub http: HttpStats,
    pub created: u64,
    /// Grammar compiler for the model's vocabulary, built on the first constrained request.
    pub grammar: OnceLock<Result<Arc<GrammarCompiler>, String>>,
    /// Requests being prepared (rendered, tokenized, grammars compiled) before they reach the
    /// engine's queue: as many as the queue holds, so that a flood is refused with 429 before it
    /// costs any work.
    pub preparing: Arc<tokio::sync::Semaphore>,
    /// Generation requests whose client still waits for the answer: what a shutdown would cut.
    pub in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl AppState {
    pub fn new(config: ServerConfig) -> Self {
        AppState {
            engine: OnceLock::new(),
            names: OnceLock::new(),
            http: HttpStats::default(),
            created: crate::ids::unix_now(),
            grammar: OnceLock::new(),
            preparing: Arc::new(tokio::sync::Semaphore::new(config.max_queue.max(1))),
            in_flight: Arc::default(),
            config,
        }
    }

    /// The grammar compiler, built once (it indexes the whole vocabulary).
    pub fn grammar_compiler(&self) -> Result<Arc<GrammarCompiler>, String> {
        let engine = self.engine.get().ok_or("the model is still loading")?;
        self.grammar
            .get_or_init(|| {
                let m = &engine.model;
                GrammarCompiler::new(&m.tokenizer, m.vocab_size()).map(Arc::new).map_err(|e| e.to_string())
            })
            .clone()
    }

    /// Installs the loaded engine; from now on requests are served.
    pub fn set_engine(&self, engine: EngineHandle) {
        let names = self.config.served_names(&engine.model.name);
        let _ = self.names.set(names);
        let _ = self.engine.set(engine);
    }
}
