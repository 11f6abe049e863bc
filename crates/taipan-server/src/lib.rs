//! The HTTP face of taipan: AI21 Studio (`/studio/v1/...`) and OpenAI (`/v1/...`) routes over one
//! engine, with API-key auth, SSE streaming, health, metrics, a browser playground and graceful
//! shutdown.
//!
//! The shaping decision: handlers stay thin — read the body, validate it with `taipan-api`, build
//! the prompt off the async runtime, submit to the engine thread, and map its events to the
//! dialect's JSON. Status codes are chosen in exactly one place ([`error::HttpError`]). No model
//! maths runs on tokio.

pub mod auth;
pub mod error;
mod handlers;
pub mod heap;
mod ids;
mod metrics;
mod playground;
mod prompt;
mod state;
mod structured;

pub use state::{AppState, ServerConfig};
pub use structured::{thinking_syntax, ReasoningFormat};

use axum::body::Body;
use axum::http::{Request, Uri};
use axum::routing::{get, post};
use axum::Router;
use std::future::IntoFuture;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use taipan_api::Dialect;

/// All routes, with auth and the body-size limit applied.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/studio/v1/chat/completions", post(|s, h, b| handlers::chat_in(Dialect::Ai21, s, h, b)))
        .route("/v1/chat/completions", post(|s, h, b| handlers::chat_in(Dialect::OpenAi, s, h, b)))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models_openai))
        .route("/studio/v1/models", get(handlers::models_ai21))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .route("/v1/tokenize", post(handlers::tokenize))
        .route("/v1/detokenize", post(handlers::detokenize))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/", get(playground::index))
        .route("/playground.js", get(playground::script))
        .route("/playground.css", get(playground::style))
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), auth::require_key))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Collapses repeated slashes and drops one trailing slash, so that clients that join base URLs
/// carelessly (`.../studio/v1//chat/completions`) still reach their route.
pub fn normalize_path(mut req: Request<Body>) -> Request<Body> {
    let path = req.uri().path();
    let sloppy = path.contains("//") || (path.len() > 1 && path.ends_with('/'));
    if !sloppy {
        return req;
    }
    let mut clean = String::with_capacity(path.len());
    for part in path.split('/').filter(|p| !p.is_empty()) {
        clean.push('/');
        clean.push_str(part);
    }
    if clean.is_empty() {
        clean.push('/');
    }
    if let Some(q) = req.uri().query() {
        clean.push('?');
        clean.push_str(q);
    }
    if let Ok(uri) = clean.parse::<Uri>() {
        *req.uri_mut() = uri;
    }
    req
}

/// Binds, loads the model in the background (answering 503 until it is ready), and serves until
/// `shutdown` resolves; in-flight requests then get `config.shutdown_grace_secs` to finish, and
/// those still running after it are cancelled, each with an error its client sees.
pub async fn serve<F>(
    config: ServerConfig,
    load: impl FnOnce() -> Result<taipan_model::Model, String> + Send + 'static,
    shutdown: F,
) -> std::io::Result<Shutdown>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "listening");
    eprintln!("taipan: listening on http://{local} (model loading)");
    let state = Arc::new(AppState::new(config.clone()));
    let started = std::time::Instant::now();
    {
        let state = Arc::clone(&state);
        tokio::task::spawn_blocking(move || match load() {
            Ok(model) => {
                let model = Arc::new(model);
                let mut ec = state.config.engine.clone();
                ec.threads = state.config.threads;
                ec.max_queue = state.config.max_queue;
                eprintln!(
                    "taipan: starting the engine: KV cache {} MiB, {} threads…",
                    ec.kv_cache_bytes >> 20,
                    ec.threads
                );
                let engine = match taipan_engine::engine::start(model, ec) {
                    Ok(engine) => engine,
                    Err(e) => {
                        eprintln!("taipan: {e}");
                        std::process::exit(1);
                    }
                };
                watch_engine(engine.clone());
                state.set_engine(engine.clone());
                // Index the vocabulary for grammars now rather than on the first JSON request.
                let indexing = std::time::Instant::now();
                eprintln!("taipan: indexing the vocabulary for constrained decoding…");
                if let Err(e) = state.grammar_compiler() {
                    eprintln!("taipan: constrained decoding unavailable: {e}");
                } else {
                    eprintln!("taipan: indexed in {:.1} s", indexing.elapsed().as_secs_f64());
                }
                // The summary re-reads the file's metadata (a whole vocabulary on the heap):
                // written before the freed heap goes back, so its buffers go back too.
                let summary = summary(&state, &engine, local, started.elapsed());
                heap::release_freed();
                eprint!("{summary}");
            }
            Err(e) => {
                eprintln!("taipan: cannot load the model: {e}");
                std::process::exit(1);
            }
        });
    }
    let app = tower::ServiceBuilder::new().map_request(normalize_path).service(router(Arc::clone(&state)));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let server = axum::serve(listener, tower::make::Shared::new(app)).with_graceful_shutdown(signal).into_future();
    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    let cut_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cut = {
        let (state, cut_count) = (Arc::clone(&state), Arc::clone(&cut_count));
        async move {
            if stop_rx.wait_for(|&stop| stop).await.is_err() {
                return std::future::pending::<()>().await;
            }
            eprintln!(
                "taipan: shutting down; {} requests in flight have {} s to finish",
                state.in_flight.load(Ordering::SeqCst),
                grace.as_secs()
            );
            tokio::time::sleep(grace).await;
            let cut = state.in_flight.load(Ordering::SeqCst);
            cut_count.store(cut, Ordering::SeqCst);
            if let Some(engine) = state.engine.get() {
                engine.cancel_everything();
            }
            eprintln!("taipan: grace period over; cancelling {cut} requests, each told why");
            // Moments for the cancellations to reach their clients before connections close.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            while state.in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    tokio::select! {
        served = server => served?,
        () = cut => {}
    }
    // Every connection is closed (or the cancellations had their moments): report what was cut.
    let cut = cut_count.load(Ordering::SeqCst);
    if cut == 0 {
        eprintln!("taipan: every request finished; exiting");
    } else {
        eprintln!("taipan: {cut} requests were cut by the shutdown");
    }
    Ok(Shutdown { cut })
}

/// The start-up summary printed once the model is ready: what runs, in how much memory, and
/// where to reach it.
fn summary(
    state: &AppState,
    engine: &taipan_engine::EngineHandle,
    local: std::net::SocketAddr,
    took: std::time::Duration,
) -> String {
    let m = engine.memory;
    let model = &engine.model;
    let spec = model.cache_spec();
    let kv_mb = state.config.engine.kv_cache_bytes >> 20;
    let mut context = format!("{} tokens", m.context);
    if m.context < model.context_length() {
        context.push_str(&format!(
            " (what the KV budget holds; the model's own is {}; raise --kv-cache-mb for more)",
            model.context_length()
        ));
    }
    let mut memory = format!(
        "weights {:.0} MiB; KV cache {kv_mb} MiB: {} blocks of {} positions",
        model.weight_bytes() as f64 / (1 << 20) as f64,
        m.blocks,
        m.block_size
    );
    if m.slots > 0 {
        memory.push_str(&format!(
            "; {} recurrent-state slots of {:.2} MiB",
            m.slots,
            spec.state_bytes() as f64 / (1 << 20) as f64
        ));
    }
    // An unspecified bind address is not somewhere a browser can go: show this machine's.
    let host = if local.ip().is_unspecified() { "localhost".to_string() } else { local.ip().to_string() };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let base = format!("http://{host}:{}", local.port());
    let names = state.names.get().cloned().unwrap_or_default();
    let aliases = if state.config.aliases.is_none() { " (AI21's public model names route here)" } else { "" };
    let auth = if state.config.api_keys.is_empty() {
        "off: no API keys configured".to_string()
    } else {
        format!("{} API key(s) required (Authorization: Bearer …)", state.config.api_keys.len())
    };
    let rows = [
        ("model", format!("{} ({})", model.name, model.path.display())),
        (
            "weights",
            taipan_model::gguf::describe_weights(&model.path)
                .unwrap_or_else(|| format!("{} architecture, safetensors checkpoint", model.arch_name())),
        ),
        ("context", context),
        ("memory", memory),
        (
            "threads",
            format!(
                "{}, {} kernels{}, continuous batching",
                state.config.threads,
                taipan_kernels::Kernels::best().isa.name(),
                match (taipan_kernels::Kernels::best().tiles.is_some(), model.prompt_attention_in_tiles()) {
                    (false, _) => "",
                    (true, true) => " (prompts in AMX bf16 tiles)",
                    (true, false) => {
                        " (prompt products in AMX bf16 tiles; prompt attention on the integer kernels, \
                         since its tile operands at the full context would take over 64 MiB a sequence)"
                    }
                }
            ),
        ),
        ("pages", pages_row(model.weight_bytes())),
        ("served as", format!("{}{aliases}", names.join(", "))),
        ("AI21 API", format!("{base}/studio/v1/chat/completions")),
        ("OpenAI API", format!("{base}/v1")),
        ("playground", format!("{base}/")),
        ("auth", auth),
    ];
    let mut out = format!("taipan: ready in {:.1} s\n", took.as_secs_f64());
    for (k, v) in rows {
        out.push_str(&format!("  {k:<11} {v}\n"));
    }
    out
}

/// Whether the weights stream from huge pages: on 4 KiB pages decode reads them markedly slower,
/// and a system with transparent huge pages off says so here rather than quietly.
fn pages_row(weight_bytes: usize) -> String {
    use taipan_kernels::huge::{huge_pages, resident_on_huge_pages, HugePages};
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    match (huge_pages(), resident_on_huge_pages()) {
        (HugePages::Given, Some(huge)) => {
            format!("weights and caches on 2 MiB pages ({:.0} MiB resident on them)", mib(huge))
        }
        (HugePages::Given, None) => "weights and caches on 2 MiB pages".to_string(),
        (HugePages::Off, _) => format!(
            "4 KiB only: transparent huge pages are off, so the {:.0} MiB of weights stream slower \
             (`echo madvise > /sys/kernel/mm/transparent_hugepage/enabled` turns them on)",
            mib(weight_bytes)
        ),
        (HugePages::Unknown, _) => "the system's (huge pages not known here)".to_string(),
    }
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// Requests still running when the grace period ran out, cancelled with an error.
    pub cut: usize,
}

/// Exit status of a shutdown that cut requests (EX_TEMPFAIL: their clients may retry elsewhere).
pub const SHUTDOWN_CUT_EXIT: i32 = 75;

/// Exit status when the engine thread died (EX_SOFTWARE), so that a supervisor restarts us.
pub const ENGINE_DIED_EXIT: i32 = 70;

/// Watches the engine thread: once it has died, `/health` answers 503 (it checks the same flag)
/// and, after a moment for in-flight responses to carry their errors out, the process exits with
/// [`ENGINE_DIED_EXIT`].
fn watch_engine(engine: taipan_engine::EngineHandle) {
    let spawned = std::thread::Builder::new().name("taipan-engine-watch".into()).spawn(move || {
        while engine.is_running() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        eprintln!("taipan: the engine thread died; /health reports 503; exiting in 2 s");
        std::thread::sleep(std::time::Duration::from_secs(2));
        std::process::exit(ENGINE_DIED_EXIT);
    });
    if let Err(e) = spawned {
        eprintln!("taipan: cannot watch the engine thread: {e}");
        std::process::exit(1);
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
