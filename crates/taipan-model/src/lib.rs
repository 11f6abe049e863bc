//! Models for taipan: weights from GGUF files, tokenizers, chat templates and the architectures'
//! forward passes.
//!
//! The shaping decision: a loaded [`Model`] is immutable and holds weights only; everything that
//! changes while a sequence runs (attention keys and values, Mamba state) lives in a [`Cache`]
//! owned by the caller, so one model serves any number of sequences and the engine decides where
//! their state lives. Every architecture runs the same call, [`Model::forward_batch`]: one pass
//! over the new tokens of many sequences, each with its block table and state slot.

pub mod arch;
pub mod cache;
pub mod chat;
pub mod gguf;
mod hf;
pub mod synth;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use cache::{BatchItem, Cache, CacheSpec, KvPool, Logits, StatePool};
pub use chat::{ChatMessage, ChatTemplate, RenderOptions};
pub use gguf::{GgufError, GgufFile};
use taipan_kernels::{Compute, MatmulMode};
pub use tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] chat::TemplateError),
    #[error("{path}: tensor '{tensor}': {message}")]
    Tensor { path: PathBuf, tensor: String, message: String },
    #[error("{path}: config field '{field}': {message}")]
    Config { path: PathBuf, field: String, message: String },
    #[error("{path}: architecture '{arch}' is not supported (supported: llama, qwen2, qwen3, gemma3, jamba)")]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error("{0}")]
    Input(String),
}

impl ModelError {
    pub(crate) fn tensor(f: &GgufFile, tensor: &str, message: String) -> Self {
        ModelError::Tensor { path: f.path.clone(), tensor: tensor.into(), message }
    }
}

/// How to load a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub mode: MatmulMode,
    /// Quantize f32/f16/bf16 weight matrices to this format at load (only Q8_0 for now), so that
    /// Hugging Face checkpoints run on the integer kernels. Vectors and matrices whose rows are not
    /// whole 32-element blocks stay as they are.
    pub quantize: Option<taipan_kernels::DType>,
}

/// The architecture-specific weights.
#[derive(Debug)]
pub enum Arch {
    Llama(arch::llama::Llama),
    Jamba(arch::jamba::Jamba),
}

/// One sequence's state in pools of its own, for single-stream use (the CLI, evaluation, tests);
/// the engine shares one [`Cache`] among many sequences instead. Runs through the same
/// [`Model::forward_batch`] as the engine, as a batch of one.
#[derive(Debug, Clone)]
pub struct SeqState {
    cache: Cache,
    /// Always `0..cache.kv.blocks()`: the private pool is laid out in order.
    table: Vec<u32>,
    len: usize,
    recurrent: bool,
}

/// Block size of private single-sequence caches.
const PRIVATE_BLOCK: usize = 64;

impl SeqState {
    /// Tokens processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held (caches and recurrent state).
    pub fn memory_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Bytes of recurrent (Mamba) state: constant in the sequence length.
    pub fn recurrent_bytes(&self) -> usize {
        self.cache.states.slots() * self.cache.states.slot_bytes()
    }

    /// Bytes of attention keys and values held.
    pub fn kv_bytes(&self) -> usize {
        self.cache.kv.blocks() * self.cache.kv.block_bytes()
    }

    /// Forgets positions from `len` on (attention caches can rewind).
    /// Recurrent (Mamba) state cannot rewind, so a recurrent state only accepts its own length.
    pub fn truncate(&mut self, len: usize) -> Result<(), ModelError> {
        if len >= self.len {
            return Ok(());
        }
        if self.recurrent {
            return Err(ModelError::Input("a Mamba state cannot be rewound".into()));
        }
        self.len = len;
        Ok(())
    }
}

/// Buffers for forward passes, reusable across sequences.
#[derive(Debug, Default)]
pub struct Scratch {
    llama: arch::llama::LlamaScratch,
    jamba: arch::jamba::JambaScratch,
    /// Which architecture wrote the logits last.
    last_jamba: bool,
}

impl Scratch {
    /// Logits of the last forward call: `[rows, vocab]`.
    pub fn logits(&self) -> &[f32] {
        if self.last_jamba {
            &self.jamba.logits
        } else {
            &self.llama.logits
        }
    }

    /// Records every layer's intermediate outputs of the next forward calls (Jamba only), or stops.
    pub fn set_trace(&mut self, on: bool) {
        self.jamba.trace = on.then(Vec::new);
    }

    /// What was recorded: `(name, values)` in order, names as in transformers' module tree.
    pub fn trace(&self) -> &[(String, Vec<f32>)] {
        self.jamba.trace.as_deref().unwrap_or(&[])
    }

    /// Starts (or stops) adding up where forward time goes (Jamba only).
    pub fn set_profile(&mut self, on: bool) {
        self.jamba.profile = on.then_some([0.0; 5]);
    }

    /// Seconds per part since profiling started: attention, Mamba mixer, experts, dense MLP, rest.
    pub fn profile(&self) -> Vec<(&'static str, f64)> {
        match self.jamba.profile {
            Some(p) => arch::jamba::PROFILE_PARTS.iter().copied().zip(p).collect(),
            None => vec![],
        }
    }

    /// The same, writable (samplers mask tokens in place).
    pub fn logits_mut(&mut self) -> &mut [f32] {
        if self.last_jamba {
            &mut self.jamba.logits
        } else {
            &mut self.llama.logits
        }
    }
}

/// A loaded model: weights, tokenizer and chat template.
#[derive(Debug)]
pub struct Model {
    /// Name to serve it under (from `general.name`, else the file stem).
    pub name: String,
    pub path: PathBuf,
    pub arch: Arch,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// How its weights multiply: in exact mode no row goes through tile kernels either.
    pub mode: MatmulMode,
}

impl Model {
    /// Loads a GGUF model file, or a Hugging Face model directory (config.json + safetensors).
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Model, ModelError> {
        if path.is_dir() {
            return hf::load_dir(path, opts);
        }
        let file = GgufFile::open(path)?;
        let arch_name = file.get_str("general.architecture")?.to_string();
        let arch = match arch_name.as_str() {
            "jamba" => {
                let config = arch::jamba::JambaConfig::from_gguf(&file)?;
                Arch::Jamba(arch::jamba::Jamba::load(&file, config, opts)?)
            }
            name => match arch::llama::Family::from_arch(name) {
                Some(family) => Arch::Llama(arch::llama::Llama::from_gguf(&file, family, opts.mode)?),
                None => return Err(ModelError::UnsupportedArch { path: path.into(), arch: arch_name }),
            },
        };
        let mut tokenizer = Tokenizer::from_gguf(&file)?;
        if let Some(eom) = tokenizer.token_id("<|eom|>") {
            if !tokenizer.specials.stop_ids.contains(&eom) {
                tokenizer.specials.stop_ids.push(eom);
            }
        }
        let piece = |id: Option<u32>| id.and_then(|i| tokenizer.decode(&[i], false).ok()).unwrap_or_default();
        let builtin = match &arch {
            Arch::Llama(m) if m.config.family == arch::llama::Family::Gemma3 => Some(chat::GEMMA_TEMPLATE),
            _ => None,
        };
        let template = match (file.get("tokenizer.chat_template").and_then(|v| v.as_str()), builtin) {
            (Some(src), _) => {
                Some(ChatTemplate::new(src, &piece(tokenizer.specials.bos), &piece(tokenizer.specials.eos))?)
            }
            (None, Some(src)) => {
                tracing::info!("{}: no chat template in the file; using Gemma's turn format", path.display());
                Some(ChatTemplate::new(src, &piece(tokenizer.specials.bos), &piece(tokenizer.specials.eos))?)
            }
            (None, None) => None,
        };
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let name = file.get("general.name").and_then(|v| v.as_str()).map(str::to_string).unwrap_or(stem);
        Ok(Model { name, path: path.into(), arch, tokenizer, template, mode: opts.mode })
    }

    /// Replaces the chat template (e.g. a model whose file carries none, or an outdated one).
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), ModelError> {
        let tk = &self.tokenizer;
        let piece = |id: Option<u32>| id.and_then(|i| tk.decode(&[i], false).ok()).unwrap_or_default();
        self.template = Some(ChatTemplate::new(source, &piece(tk.specials.bos), &piece(tk.specials.eos))?);
        Ok(())
    }

    /// The architecture's name as GGUF writes it (`general.architecture`).
    pub fn arch_name(&self) -> &'static str {
        match &self.arch {
            Arch::Jamba(_) => "jamba",
            Arch::Llama(m) => m.config.family.arch(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.arch {
            Arch::Llama(m) => m.config.vocab,
            Arch::Jamba(m) => m.config.vocab,
        }
    }

    pub fn context_length(&self) -> usize {
        match &self.arch {
            Arch::Llama(m) => m.config.context,
            Arch::Jamba(m) => m.config.context,
        }
    }

    pub fn weight_bytes(&self) -> usize {
        match &self.arch {
            Arch::Llama(m) => m.weight_bytes(),
            Arch::Jamba(m) => m.weight_bytes(),
        }
    }

    /// Whether prompt attention may run through tiles (where the CPU has them): only when a
    /// sequence's attention panels at the full context fit (`tiles::attention_panels_fit`; the
    /// models ask the same question of their own shapes).
    pub fn prompt_attention_in_tiles(&self) -> bool {
        let spec = self.cache_spec();
        spec.attention_layers > 0 && taipan_kernels::tiles::attention_panels_fit(1, spec.kv_dim, spec.context)
    }

    /// What the model keeps per sequence: attention layers and their width, recurrent layers and
    /// their state sizes.
    pub fn cache_spec(&self) -> CacheSpec {
        match &self.arch {
            Arch::Llama(m) => m.config.cache_spec(),
            Arch::Jamba(m) => m.config.cache_spec(),
        }
    }

    /// A fresh single-sequence state.
    pub fn new_state(&self) -> SeqState {
        let spec = self.cache_spec();
        SeqState {
            cache: Cache::new(&spec, PRIVATE_BLOCK, 0, spec.is_recurrent() as usize),
            table: Vec::new(),
            len: 0,
            recurrent: spec.is_recurrent(),
        }
    }

    /// Runs `tokens` after the state's current position. Logits land in `scratch.logits()`:
    /// one row per token when `all_logits`, else the last token's only. Several tokens are taken
    /// for a prompt, one for a sampled token (see [`BatchItem::prompt`]).
    pub fn forward(
        &self,
        compute: &Compute,
        tokens: &[u32],
        state: &mut SeqState,
        scratch: &mut Scratch,
        all_logits: bool,
    ) -> Result<(), ModelError> {
        let needed = state.len + tokens.len();
        let context = self.context_length();
        if needed > context {
            return Err(ModelError::Input(format!("sequence of {needed} tokens exceeds the context length {context}")));
        }
        let blocks = needed.div_ceil(PRIVATE_BLOCK);
        if blocks > state.cache.kv.blocks() {
            let cap = blocks.next_power_of_two().min(context.div_ceil(PRIVATE_BLOCK)).max(blocks);
            state.cache.kv.grow(cap);
            state.table = (0..cap as u32).collect();
        }
        let item = BatchItem {
            tokens,
            start: state.len,
            blocks: &state.table,
            state_slot: state.recurrent.then_some(0),
            logits: if all_logits { Logits::All } else { Logits::Last },
            prompt: tokens.len() > 1,
        };
        self.forward_batch(compute, &[item], &mut state.cache, scratch)?;
        state.len = needed;
        Ok(())
    }

    /// One forward pass over a batch of sequences sharing `cache`: every weight matrix is read
    /// once for all their tokens. Each item's new keys and values go to its blocks, its recurrent
    /// state is read from and written back to its slot. Logits land in `scratch.logits()`, one
    /// row per wanted token, in item order.
    pub fn forward_batch(
        &self,
        compute: &Compute,
        items: &[BatchItem<'_>],
        cache: &mut Cache,
        scratch: &mut Scratch,
    ) -> Result<(), ModelError> {
        // Exact maths means f32 throughout: prompt rows too stay off the bf16 tiles.
        let exact: Vec<BatchItem<'_>>;
        let items = if self.mode == MatmulMode::Exact {
            exact = items.iter().map(|it| BatchItem { prompt: false, ..*it }).collect();
            &exact[..]
        } else {
            items
        };
        match &self.arch {
            Arch::Llama(m) => {
                scratch.last_jamba = false;
                m.forward_batch(compute, items, &mut cache.kv, &mut scratch.llama)
            }
            Arch::Jamba(m) => {
                scratch.last_jamba = true;
                m.forward_batch(compute, items, cache, &mut scratch.jamba)
            }
        }
    }

    /// Renders a conversation with the model's chat template.
    pub fn render_chat(&self, messages: &[ChatMessage], opts: &RenderOptions) -> Result<String, ModelError> {
        match &self.template {
            Some(t) => Ok(t.render(messages, opts)?),
            None => Err(ModelError::Input("the model has no chat template".into())),
        }
    }
}
