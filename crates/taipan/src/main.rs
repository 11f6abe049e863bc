//! The `taipan` command line: generate, chat, inspect, bench, perplexity.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use taipan_api::OutputShape;
use taipan_engine::{eval, generate, Constraint, GenerateParams, Generation, GrammarCompiler, SamplingParams};
use taipan_kernels::{Compute, MatmulMode};
use taipan_model::{ChatMessage, GgufFile, LoadOptions, Model, RenderOptions};

mod hub;

/// File name of the default model inside the model folder.
const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(name = "taipan", version, about = "Self-hosted LLM inference for Jamba and Llama-family models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the AI21 Studio and OpenAI chat-completions APIs.
    Serve(ServeArgs),
    /// Generate text from a prompt or a chat conversation, streamed to stdout.
    Generate(GenerateArgs),
    /// Interactive chat in the terminal: line editing, recalled lines, the conversation kept.
    Chat(ChatArgs),
    /// Show a GGUF file's metadata and tensors.
    Inspect {
        /// The GGUF file.
        file: PathBuf,
        /// Also list every tensor.
        #[arg(long)]
        tensors: bool,
    },
    /// Measure prefill and decode speed.
    Bench(BenchArgs),
    /// Write a synthetic Jamba GGUF (Q8_0) with random weights, for benchmarks: by default
    /// hidden 1024, 8 layers, 16 experts (Jamba-1.5-Mini's proportions scaled down); `--shape
    /// reasoning-3b` is Jamba Reasoning 3B's shape (dense, one KV head; see BENCHMARKS.md).
    SynthJamba {
        /// Output file.
        out: PathBuf,
        /// A Jamba GGUF whose tokenizer (and chat template) to copy, e.g. the jamba-tiny-a or
        /// jamba-tiny-dense fixture.
        #[arg(long)]
        tokenizer_from: PathBuf,
        /// A named shape: mini-scaled (default), reasoning-3b, hidden-256. The size flags below
        /// apply to the default shape only.
        #[arg(long)]
        shape: Option<String>,
        #[arg(long, default_value_t = 1024)]
        hidden: usize,
        #[arg(long, default_value_t = 8)]
        layers: usize,
        #[arg(long, default_value_t = 16)]
        experts: usize,
        #[arg(long, default_value_t = 2816)]
        intermediate: usize,
    },
    /// Perplexity of a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity {
        /// The model (GGUF).
        file: PathBuf,
        /// The text file.
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        #[command(flatten)]
        run: RunArgs,
    },
}

/// `taipan serve` settings. Precedence: flags, then environment variables, then the TOML file
/// (`--config`), then defaults.
#[derive(Args)]
struct ServeArgs {
    /// The model: a GGUF file, a safetensors checkpoint folder, or a Hugging Face Hub name
    /// (`org/repo`, `org/repo:Q4_K_M`, `org/repo:file.gguf`). Default: the default model.
    #[arg(short = 'm', long, env = "TAIPAN_MODEL")]
    model: Option<PathBuf>,
    /// Never download: a Hub name must already be in the Hub cache (also HF_HUB_OFFLINE=1).
    #[arg(long, env = "TAIPAN_OFFLINE")]
    offline: bool,
    /// Address to bind. Default 127.0.0.1 when no API key is configured, else 0.0.0.0.
    #[arg(long, env = "TAIPAN_HOST")]
    host: Option<String>,
    /// Port (default 8080).
    #[arg(short = 'p', long, env = "TAIPAN_PORT")]
    port: Option<u16>,
    /// Accepted API keys (comma-separated in the environment variable).
    #[arg(long = "api-key", env = "TAIPAN_API_KEYS", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// A file with one API key per line.
    #[arg(long, env = "TAIPAN_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Names the model answers to (comma-separated); default: AI21's public model names.
    #[arg(long = "alias", env = "TAIPAN_ALIASES", value_delimiter = ',')]
    aliases: Vec<String>,
    /// Compute threads (default: all cores).
    #[arg(short = 't', long, env = "TAIPAN_THREADS")]
    threads: Option<usize>,
    /// Requests that may wait before new ones get 429 (default 64).
    #[arg(long, env = "TAIPAN_MAX_QUEUE")]
    max_queue: Option<usize>,
    /// Largest accepted request body in bytes (default 10 MiB).
    #[arg(long, env = "TAIPAN_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Seconds in-flight requests get after SIGTERM/SIGINT (default 30).
    #[arg(long, env = "TAIPAN_SHUTDOWN_GRACE")]
    shutdown_grace: Option<u64>,
    /// KV cache size in MiB (default: a quarter of available memory, at most 2048).
    #[arg(long, env = "TAIPAN_KV_CACHE_MB")]
    kv_cache_mb: Option<usize>,
    /// Tokens one engine step may run, decode and prefill together (default 384).
    #[arg(long, env = "TAIPAN_MAX_BATCH_TOKENS")]
    max_batch_tokens: Option<usize>,
    /// Sequences batched at once (default 64).
    #[arg(long, env = "TAIPAN_MAX_RUNNING")]
    max_running: Option<usize>,
    /// A TOML file with any of: model, offline, host, port, api_keys, api_key_file, aliases, threads,
    /// max_queue, max_body_bytes, shutdown_grace_secs, kv_cache_mb, max_batch_tokens, max_running,
    /// chat_template, reasoning_format, reasoning_budget.
    #[arg(long, env = "TAIPAN_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    exact: bool,
    /// Quantize f32/f16/bf16 weight matrices at load: q8_0.
    #[arg(long, env = "TAIPAN_QUANTIZE")]
    quantize: Option<String>,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long, env = "TAIPAN_CHAT_TEMPLATE")]
    chat_template: Option<PathBuf>,
    /// A thinking model's thinking: `auto` (default) returns it apart from the answer, as
    /// `reasoning_content`, when the template and vocabulary have `<think>` tags; `separate` does
    /// the same and refuses a model without them; `none` leaves it in the answer, tags included.
    #[arg(long, env = "TAIPAN_REASONING_FORMAT")]
    reasoning_format: Option<String>,
    /// Tokens a thinking model may think before `</think>` is forced and it must answer
    /// (default: no limit; 0 answers at once). Applies where the generation prompt opens the
    /// thinking.
    #[arg(long, env = "TAIPAN_REASONING_BUDGET")]
    reasoning_budget: Option<usize>,
}

/// The optional TOML configuration file.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    model: Option<PathBuf>,
    offline: Option<bool>,
    host: Option<String>,
    port: Option<u16>,
    api_keys: Option<Vec<String>>,
    api_key_file: Option<PathBuf>,
    aliases: Option<Vec<String>>,
    threads: Option<usize>,
    max_queue: Option<usize>,
    max_body_bytes: Option<usize>,
    shutdown_grace_secs: Option<u64>,
    kv_cache_mb: Option<usize>,
    max_batch_tokens: Option<usize>,
    max_running: Option<usize>,
    chat_template: Option<PathBuf>,
    reasoning_format: Option<String>,
    reasoning_budget: Option<usize>,
}

fn read_keys(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading API key file {}", path.display()))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect())
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    let file: FileConfig = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{}: invalid configuration", p.display()))?
        }
        None => FileConfig::default(),
    };
    let mut api_keys =
        if a.api_keys.is_empty() { file.api_keys.clone().unwrap_or_default() } else { a.api_keys.clone() };
    if let Some(p) = a.api_key_file.as_ref().or(file.api_key_file.as_ref()) {
        api_keys.extend(read_keys(p)?);
    }
    api_keys.retain(|k| !k.is_empty());
    let aliases = if a.aliases.is_empty() { file.aliases.clone() } else { Some(a.aliases.clone()) };
    let host =
        a.host.or(file.host).unwrap_or_else(|| if api_keys.is_empty() { "127.0.0.1".into() } else { "0.0.0.0".into() });
    let source = model_source(a.model.or(file.model).unwrap_or_else(default_model_path))?;
    let offline = a.offline || file.offline.unwrap_or(false) || hub::offline_from_env();
    let config = taipan_server::ServerConfig {
        host,
        port: a.port.or(file.port).unwrap_or(8080),
        model_path: source.path_for_display(),
        hub_repo: match &source {
            ModelSource::Hub(m) => Some(m.repo.clone()),
            ModelSource::Local(_) => None,
        },
        api_keys,
        aliases,
        max_body_bytes: a.max_body_bytes.or(file.max_body_bytes).unwrap_or(10 << 20),
        max_queue: a.max_queue.or(file.max_queue).unwrap_or(64),
        threads: threads(a.threads.or(file.threads)),
        shutdown_grace_secs: a.shutdown_grace.or(file.shutdown_grace_secs).unwrap_or(30),
        engine: {
            let mut e = taipan_engine::EngineConfig::default();
            if let Some(mb) = a.kv_cache_mb.or(file.kv_cache_mb) {
                e.kv_cache_bytes = mb.max(1) << 20;
            }
            e.max_batch_tokens = a.max_batch_tokens.or(file.max_batch_tokens).unwrap_or(e.max_batch_tokens).max(1);
            e.max_running = a.max_running.or(file.max_running).unwrap_or(e.max_running).max(1);
            e
        },
        // Only the test suite sets this: it lets a request inject a panic into the engine.
        fault_injection: std::env::var_os("TAIPAN_FAULT_INJECTION").is_some_and(|v| v == "1"),
        reasoning_format: a
            .reasoning_format
            .or(file.reasoning_format)
            .map(|f| f.parse().map_err(|e: String| anyhow::anyhow!("--reasoning-format: {e}")))
            .transpose()?
            .unwrap_or_default(),
        reasoning_budget: a.reasoning_budget.or(file.reasoning_budget),
    };
    let reasoning_format = config.reasoning_format;
    let mode = if a.exact { MatmulMode::Exact } else { MatmulMode::Fast };
    let quantize = parse_quantize(a.quantize.as_deref())?;
    let template = match a.chat_template.as_ref().or(file.chat_template.as_ref()) {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    // Only the test suite sets this (with fault injection on): a replica that stays "loading"
    // for a while, to show that a load balancer sends it nothing until /health says ready.
    let load_delay = match std::env::var("TAIPAN_FAULT_LOAD_DELAY_MS") {
        Ok(ms) if config.fault_injection => {
            Some(std::time::Duration::from_millis(ms.parse().context("TAIPAN_FAULT_LOAD_DELAY_MS")?))
        }
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let stopped = runtime.block_on(taipan_server::serve(
        config,
        move || {
            if let Some(delay) = load_delay {
                std::thread::sleep(delay);
            }
            let model_path = source.fetch(offline).map_err(|e| format!("{e:#}"))?;
            let mut model =
                load_announced(&model_path, LoadOptions { mode, quantize }).map_err(|e| format!("{e:#}"))?;
            if let Some(src) = &template {
                model.set_chat_template(src).map_err(|e| format!("--chat-template: {e}"))?;
            }
            let thinking = taipan_server::thinking_syntax(&model);
            match (reasoning_format, &thinking) {
                (taipan_server::ReasoningFormat::Separate, None) => {
                    return Err("--reasoning-format separate: the model's chat template and vocabulary have no \
                                <think>...</think> tags"
                        .into())
                }
                (taipan_server::ReasoningFormat::None, _) | (_, None) => {}
                (_, Some(t)) => tracing::info!(
                    "thinking in <think> tags ({}) is returned apart from the answer, as reasoning_content",
                    if t.opened_by_prompt { "opened by the generation prompt" } else { "when the model opens it" }
                ),
            }
            Ok(model)
        },
        taipan_server::shutdown_signal(),
    ))?;
    if stopped.cut > 0 {
        std::process::exit(taipan_server::SHUTDOWN_CUT_EXIT);
    }
    Ok(())
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Compute threads (default: all cores).
    #[arg(short = 't', long, env = "TAIPAN_THREADS")]
    threads: Option<usize>,
    /// Exact maths: f32 activations against dequantized weights (slower, for verification).
    #[arg(long)]
    exact: bool,
    /// Quantize f32/f16/bf16 weight matrices at load: q8_0.
    #[arg(long, env = "TAIPAN_QUANTIZE")]
    quantize: Option<String>,
}

#[derive(Args)]
struct ModelArg {
    /// The model: a GGUF file, a safetensors checkpoint folder, or a Hugging Face Hub name
    /// (`org/repo`, `org/repo:Q4_K_M`, `org/repo:file.gguf`). Default: $TAIPAN_MODEL, else the
    /// default model in $TAIPAN_MODEL_DIR (default ~/.cache/taipan/models).
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    /// Never download: a Hub name must already be in the Hub cache (also HF_HUB_OFFLINE=1).
    #[arg(long, env = "TAIPAN_OFFLINE")]
    offline: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The prompt. With --raw it is passed as is; otherwise it is one user message.
    #[arg(short = 'p', long)]
    prompt: Option<String>,
    /// A JSON file with chat messages ([{"role": ..., "content": ...}]).
    #[arg(long, conflicts_with = "prompt")]
    messages: Option<PathBuf>,
    /// Do not apply the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(short = 'n', long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print timing statistics to stderr.
    #[arg(long)]
    stats: bool,
    /// The answer is one JSON object (constrained decoding).
    #[arg(long, group = "shape")]
    json: bool,
    /// The answer is JSON following the schema in this file.
    #[arg(long, group = "shape")]
    schema: Option<PathBuf>,
    /// The answer matches this regular expression.
    #[arg(long, group = "shape")]
    regex: Option<String>,
    /// The answer follows the grammar in this file (llguidance's Lark syntax).
    #[arg(long, group = "shape")]
    grammar: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    #[arg(short = 'n', long, default_value_t = 512)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The file that keeps entered lines between sessions (default:
    /// $XDG_STATE_HOME/taipan/chat_history, else ~/.local/state/taipan/chat_history).
    #[arg(long)]
    history: Option<PathBuf>,
    /// Keep no line history on disk.
    #[arg(long)]
    no_history: bool,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Repetitions (median reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Thread counts to measure, comma-separated.
    #[arg(short = 't', long, value_delimiter = ',', default_value = "2")]
    threads: Vec<usize>,
    #[arg(long)]
    exact: bool,
    /// Quantize f32/f16/bf16 weight matrices at load: q8_0.
    #[arg(long)]
    quantize: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also measure batched decode: this many sequences stepped together (as the server runs
    /// that many streams), aggregate tok/s and where a step's time goes.
    #[arg(long)]
    batch: Option<usize>,
    /// Also measure the machine's read bandwidth (a streaming read of 1 GiB), the bound of decode.
    #[arg(long)]
    bandwidth: bool,
}

fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TAIPAN_MODEL") {
        return PathBuf::from(p);
    }
    let dir = std::env::var_os("TAIPAN_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache/taipan/models")
    });
    dir.join(DEFAULT_MODEL_FILE)
}

/// Where a model comes from.
enum ModelSource {
    /// A GGUF file or a safetensors checkpoint folder on this machine.
    Local(PathBuf),
    /// A Hugging Face Hub repository, fetched into the Hub cache.
    Hub(hub::HubModel),
}

/// A local path that exists, else a Hub name, else an error that says what was looked for.
fn model_source(path: PathBuf) -> Result<ModelSource> {
    if path.exists() {
        return Ok(ModelSource::Local(path));
    }
    if let Some(model) = path.to_str().and_then(hub::parse) {
        return Ok(ModelSource::Hub(model));
    }
    bail!(
        "model file {} not found; run scripts/get-model.sh to fetch the default model, or pass --model \
         (a GGUF file, a checkpoint folder, or a Hub name such as org/repo:Q4_K_M)",
        path.display()
    )
}

impl ModelSource {
    fn path_for_display(&self) -> PathBuf {
        match self {
            Self::Local(p) => p.clone(),
            // The file stem of a Hub name is what the file would be called: the repository's
            // name, or the GGUF's own.
            Self::Hub(m) => match &m.pick {
                hub::Pick::File(f) => PathBuf::from(f),
                _ => PathBuf::from(&m.repo),
            },
        }
    }

    /// The local file or folder to load, downloading a Hub model's missing files first.
    fn fetch(&self, offline: bool) -> Result<PathBuf> {
        match self {
            Self::Local(p) => Ok(p.clone()),
            Self::Hub(m) => {
                let path = hub::fetch(m, offline)?;
                eprintln!("taipan: {m} is {}", path.display());
                Ok(path)
            }
        }
    }
}

fn resolve_model(arg: &ModelArg) -> Result<PathBuf> {
    let offline = arg.offline || hub::offline_from_env();
    model_source(arg.model.clone().unwrap_or_else(default_model_path))?.fetch(offline)
}

/// Loads with a line before (what, how big) and after (how long, what it is): weights are mapped
/// and repacked here, which on a large model takes long enough to want saying.
fn load_announced(path: &Path, opts: LoadOptions) -> Result<Model> {
    let size = weight_bytes_on_disk(path);
    eprintln!("taipan: mapping and repacking {} ({:.0} MiB)…", path.display(), size as f64 / (1 << 20) as f64);
    let started = std::time::Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let model = std::thread::scope(|scope| {
        scope.spawn(|| report_load_progress(size, &done));
        let model = Model::load(path, opts);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        model
    })
    .with_context(|| format!("loading {}", path.display()))?;
    // What the weights are is said once, in the server's start-up summary.
    eprintln!("taipan: loaded {} in {:.1} s", model.name, started.elapsed().as_secs_f64());
    Ok(model)
}

/// While a load runs longer than a moment, says how much of the weights it has read: every
/// second on a terminal, every five in a log.
fn report_load_progress(size: u64, done: &std::sync::atomic::AtomicBool) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal { std::time::Duration::from_secs(1) } else { std::time::Duration::from_secs(5) };
    let base = taipan_model::weights::tensor_bytes_read();
    let started = std::time::Instant::now();
    let mut next = std::time::Duration::from_secs(2);
    let mut shown = false;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if started.elapsed() < next {
            continue;
        }
        next += every;
        let read = taipan_model::weights::tensor_bytes_read() - base;
        // Stacked tensors are read more than once: never claim to be done before it is.
        let pct = (100.0 * read as f64 / size.max(1) as f64).min(99.0);
        let line = format!("taipan: repacking weights {pct:3.0}% ({:.0} s)", started.elapsed().as_secs_f64());
        if terminal {
            eprint!("\r{line}\x1b[K");
            shown = true;
        } else {
            eprintln!("{line}");
        }
    }
    if shown {
        eprintln!();
    }
}

fn weight_bytes_on_disk(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| std::fs::metadata(e.path()).ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

fn threads(n: Option<usize>) -> usize {
    n.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1)
}

fn parse_quantize(q: Option<&str>) -> Result<Option<taipan_kernels::DType>> {
    match q.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") | Some("none") => Ok(None),
        Some("q8_0") => Ok(Some(taipan_kernels::DType::Q8_0)),
        Some(other) => bail!("--quantize {other}: supported formats: q8_0"),
    }
}

fn load(path: &Path, exact: bool, quantize: Option<&str>) -> Result<Model> {
    if !path.exists() {
        bail!(
            "model file {} not found; run scripts/get-model.sh to fetch the default model, or pass --model",
            path.display()
        );
    }
    let mode = if exact { MatmulMode::Exact } else { MatmulMode::Fast };
    let quantize = parse_quantize(quantize)?;
    Model::load(path, LoadOptions { mode, quantize }).with_context(|| format!("loading {}", path.display()))
}

fn main() {
    taipan_server::heap::keep_large_blocks_mapped();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TAIPAN_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => cmd_serve(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Inspect { file, tensors } => cmd_inspect(&file, tensors),
        Command::SynthJamba { out, tokenizer_from, shape, hidden, layers, experts, intermediate } => {
            use taipan_model::synth::SynthJamba;
            let spec = match shape.as_deref() {
                Some(name) => SynthJamba::named(name)
                    .with_context(|| format!("--shape {name:?} is not one of {}", SynthJamba::NAMES.join(", ")))?,
                None => SynthJamba {
                    hidden,
                    layers,
                    experts,
                    intermediate,
                    heads: (hidden / 64).max(1),
                    kv_heads: (hidden / 256).max(1),
                    dt_rank: hidden.div_ceil(16),
                    ..Default::default()
                },
            };
            let params = taipan_model::synth::write_synthetic_jamba(&out, &tokenizer_from, &spec)?;
            println!("wrote {} ({params} parameters)", out.display());
            Ok(())
        }
        Command::Bench(a) => cmd_bench(a),
        Command::Perplexity { file, text, ctx, run } => {
            let model = load(&file, run.exact, run.quantize.as_deref())?;
            let compute = Compute::new(threads(run.threads));
            let text = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
            let mut ids = model.tokenizer.encode(&text, false)?;
            if model.tokenizer.specials.add_bos {
                ids.splice(0..0, model.tokenizer.specials.bos);
            }
            let p = eval::perplexity(&model, &compute, &ids, ctx)?;
            for (i, c) in p.chunk_ppl.iter().enumerate() {
                println!("chunk {:>3}: {:.4}", i + 1, c);
            }
            println!("PPL = {:.4} over {} scored tokens ({:.1} tok/s)", p.ppl, p.scored_tokens, p.tokens_per_second);
            Ok(())
        }
    }
}

fn read_messages(path: &Path) -> Result<Vec<ChatMessage>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw: Vec<serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON array of messages", path.display()))?;
    raw.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let mut obj = match v {
                serde_json::Value::Object(o) => o,
                _ => bail!("{}: message {i} is not an object", path.display()),
            };
            let role = match obj.remove("role") {
                Some(serde_json::Value::String(r)) => r,
                _ => bail!("{}: message {i} has no string 'role'", path.display()),
            };
            let content = obj.remove("content").unwrap_or(serde_json::Value::Null);
            Ok(ChatMessage { role, content, extra: obj })
        })
        .collect()
}

/// The chat-templated prompt text for `messages`, ready for the assistant's turn.
fn chat_text(model: &Model, messages: &[ChatMessage]) -> Result<String> {
    Ok(model.render_chat(messages, &RenderOptions { add_generation_prompt: true, ..Default::default() })?)
}

/// Generates from `ids`, streaming the text to stdout as it comes.
fn stream_to_stdout(model: &Model, compute: &Compute, ids: &[u32], params: &GenerateParams) -> Result<Generation> {
    let mut out = std::io::stdout().lock();
    let g = generate(model, compute, ids, params, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    Ok(g)
}

/// The grammar `--json`, `--schema`, `--regex` or `--grammar` asks for, if any.
fn output_constraint(model: &Model, a: &GenerateArgs) -> Result<Option<Constraint>> {
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let shape = if a.json {
        OutputShape::Json(None)
    } else if let Some(p) = &a.schema {
        OutputShape::Json(Some(serde_json::from_str(&read(p)?).with_context(|| format!("{}: not JSON", p.display()))?))
    } else if let Some(rx) = &a.regex {
        OutputShape::Regex(rx.clone())
    } else if let Some(p) = &a.grammar {
        OutputShape::Lark(read(p)?)
    } else {
        return Ok(None);
    };
    let compiler = Arc::new(GrammarCompiler::new(&model.tokenizer, model.vocab_size())?);
    let grammar = Arc::new(compiler.compile(&shape.lark())?);
    Ok(Some(Constraint { grammar, triggers: vec![], compiler }))
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let model = load(&resolve_model(&a.model)?, a.run.exact, a.run.quantize.as_deref())?;
    let compute = Compute::new(threads(a.run.threads));
    let prompt_text = match (&a.prompt, &a.messages) {
        (Some(p), _) if a.raw => p.clone(),
        (Some(p), _) => chat_text(&model, &[ChatMessage::new("user", p)])?,
        (None, Some(file)) => chat_text(&model, &read_messages(file)?)?,
        (None, None) => {
            let mut s = String::new();
            std::io::stdin().lock().read_line(&mut s)?;
            chat_text(&model, &[ChatMessage::new("user", s.trim_end())])?
        }
    };
    let mut ids = model.tokenizer.encode(&prompt_text, true)?;
    if a.raw && model.tokenizer.specials.add_bos {
        ids.splice(0..0, model.tokenizer.specials.bos);
    }
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: SamplingParams { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k, seed: a.seed },
        ignore_eos: false,
        constraint: output_constraint(&model, &a)?,
    };
    let g = stream_to_stdout(&model, &compute, &ids, &params)?;
    if a.stats {
        let steps = g.tokens.len().saturating_sub(1).max(1);
        eprintln!(
            "prompt {} tokens in {:.2} ms ({:.1} tok/s); generated {} tokens, {:.1} tok/s ({:.2} ms per decode step); finish: {:?}",
            g.prompt_tokens,
            g.prefill_time.as_secs_f64() * 1e3,
            g.prefill_tok_s(),
            g.tokens.len(),
            g.decode_tok_s(),
            g.decode_time.as_secs_f64() * 1e3 / steps as f64,
            g.finish
        );
    }
    Ok(())
}

/// Where `taipan chat` keeps its line history: `$XDG_STATE_HOME/taipan/chat_history`, else
/// `~/.local/state/taipan/chat_history`.
fn default_chat_history() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("taipan").join("chat_history"))
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let model = load(&resolve_model(&a.model)?, a.run.exact, a.run.quantize.as_deref())?;
    let compute = Compute::new(threads(a.run.threads));
    let system: Vec<ChatMessage> = a.system.iter().map(|s| ChatMessage::new("system", s)).collect();
    let mut history = system.clone();
    let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
    let history_file = if a.no_history { None } else { a.history.clone().or_else(default_chat_history) };
    if let Some(f) = &history_file {
        // A missing file is the first run; an unreadable one only costs the old lines.
        if f.exists() {
            if let Err(e) = editor.load_history(f) {
                eprintln!("taipan: cannot read the chat history {}: {e}", f.display());
            }
        }
    }
    let mut seed = a.seed;
    eprintln!(
        "taipan chat with {}: Enter sends, arrows and Ctrl-R recall earlier lines, /clear starts over, Ctrl-D or /exit quits",
        model.name
    );
    loop {
        let line = match editor.readline("> ") {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading a line"),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(text);
        match text {
            "/exit" | "/quit" => break,
            "/clear" => {
                history.clone_from(&system);
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", text));
        let ids = model.tokenizer.encode(&chat_text(&model, &history)?, true)?;
        let params = GenerateParams {
            max_tokens: a.max_tokens,
            sampling: SamplingParams { temperature: a.temperature, top_p: a.top_p, top_k: 0, seed },
            ignore_eos: false,
            constraint: None,
        };
        seed = seed.wrapping_add(1);
        let g = stream_to_stdout(&model, &compute, &ids, &params)?;
        eprintln!(
            "({} tokens, first after {:.0} ms, {:.1} tokens/s)",
            g.tokens.len(),
            g.prefill_time.as_secs_f64() * 1e3,
            g.decode_tok_s()
        );
        history.push(ChatMessage::new("assistant", &g.text));
    }
    if let Some(f) = &history_file {
        let saved = f
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| editor.save_history(f).map_err(|e| std::io::Error::other(e.to_string())));
        if let Err(e) = saved {
            eprintln!("taipan: cannot save the chat history {}: {e}", f.display());
        }
    }
    Ok(())
}

fn cmd_inspect(path: &Path, list_tensors: bool) -> Result<()> {
    let f = GgufFile::open(path)?;
    // A reader that stops early (`taipan inspect … | head`) ends the listing, not the program.
    match write_inspection(&mut std::io::stdout().lock(), path, &f, list_tensors) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn write_inspection(
    out: &mut impl std::io::Write,
    path: &Path,
    f: &GgufFile,
    list_tensors: bool,
) -> std::io::Result<()> {
    writeln!(out, "file: {} ({} bytes, GGUF v{}, alignment {})", path.display(), f.file_len(), f.version, f.alignment)?;
    writeln!(out, "metadata ({} keys):", f.metadata.len())?;
    for (k, v) in &f.metadata {
        writeln!(out, "  {k} = {}", v.display_short())?;
    }
    let mut by_type: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in &f.tensors {
        let e = by_type.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.bytes;
    }
    let total: u64 = f.tensors.iter().map(|t| t.bytes).sum();
    let params: u64 = f.tensors.iter().map(|t| t.elements()).sum();
    writeln!(out, "tensors: {} ({} parameters, {} bytes)", f.tensors.len(), params, total)?;
    for (ty, (n, bytes)) in by_type {
        writeln!(out, "  {ty:>5}: {n:>4} tensors, {bytes} bytes")?;
    }
    if list_tensors {
        for t in &f.tensors {
            writeln!(out, "  {:<40} {:>5} {:?} {} bytes", t.name, t.dtype.name(), t.dims, t.bytes)?;
        }
    }
    out.flush()
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let path = resolve_model(&a.model)?;
    let model = load(&path, a.exact, a.quantize.as_deref())?;
    let mut rows = Vec::new();
    for &t in &a.threads {
        let compute = Compute::new(t.max(1));
        let r = eval::bench(&model, &compute, a.prompt, a.gen, a.reps.max(1))?;
        let batched = match a.batch {
            Some(b) => Some(eval::bench_batched(&model, &compute, b.max(1), 32, a.gen.max(1))?),
            None => None,
        };
        let gb_s = a.bandwidth.then(|| eval::read_bandwidth(&compute, 1 << 30));
        rows.push((t, r, compute.kernels.isa, batched, gb_s));
    }
    let shares = |parts: &[(&str, f64)]| {
        parts.iter().map(|(n, v)| (n.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>()
    };
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(t, r, isa, b, gb_s)| {
                let mut row = serde_json::json!({"model": path.display().to_string(), "threads": t, "isa": format!("{isa:?}"),
                    "prompt_tokens": r.prompt_tokens, "gen_tokens": r.gen_tokens,
                    "prefill_tok_s": r.prefill_tok_s, "decode_tok_s": r.decode_tok_s,
                    "decode_breakdown": shares(&r.decode_breakdown)});
                if let Some(g) = gb_s {
                    row["read_gb_s"] = serde_json::json!(g);
                    row["weight_bytes"] = serde_json::json!(model.weight_bytes());
                }
                if let Some(b) = b {
                    row["batch"] = serde_json::json!({"sequences": b.batch, "decode_tok_s": b.decode_tok_s,
                        "step_ms": b.step_ms, "step_breakdown": shares(&b.step_breakdown)});
                }
                row
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model: {} ({} MB of weights in memory)", path.display(), model.weight_bytes() / 1_000_000);
        println!(
            "{:>7} {:>10} {:>16} {:>16}",
            "threads",
            "kernels",
            format!("prefill {} tok/s", a.prompt),
            format!("decode {} tok/s", a.gen)
        );
        for (t, r, isa, _, gb_s) in &rows {
            println!("{t:>7} {:>10} {:>16.1} {:>16.1}", format!("{isa:?}"), r.prefill_tok_s, r.decode_tok_s);
            if let Some(g) = gb_s {
                println!("        read bandwidth with {t} threads: {g:.1} GB/s");
            }
        }
        if let Some((t, r, _, b, _)) = rows.last() {
            if !r.decode_breakdown.is_empty() {
                println!("where decode time goes ({t} threads):");
                for (part, share) in &r.decode_breakdown {
                    println!("  {part:<14} {:>5.1}%", 100.0 * share);
                }
            }
            if let Some(b) = b {
                println!(
                    "batched decode, {} sequences ({t} threads): {:.1} tok/s aggregate ({:.2}x single stream), {:.1} ms per step",
                    b.batch,
                    b.decode_tok_s,
                    b.decode_tok_s / r.decode_tok_s,
                    b.step_ms
                );
                for (part, share) in &b.step_breakdown {
                    println!("  {part:<14} {:>5.1}%", 100.0 * share);
                }
            }
        }
    }
    Ok(())
}
