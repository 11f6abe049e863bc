//! Models for taipan: weights from GGUF files, tokenizers, chat templates and the architectures'
//! forward passes.
//!
//! The shaping decision: a loaded [`Model`] is immutable and holds weights only; everything that
//! changes while a sequence runs (its KV cache, later its Mamba state) lives in a [`SeqState`]
//! owned by the caller, so one model serves any number of sequences and the engine decides where
//! their state lives.

pub mod arch;
pub mod chat;
pub mod gguf;
mod hf;
pub mod kv;
pub mod synth;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use chat::{ChatMessage, ChatTemplate, RenderOptions};
pub use gguf::{GgufError, GgufFile};
pub use kv::{BatchItem, KvPool, Logits};
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
    #[error("{path}: architecture '{arch}' is not supported (supported: llama, jamba)")]
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

/// Per-sequence state an architecture needs between forward calls.
#[derive(Debug, Clone)]
pub enum SeqState {
    Llama(arch::llama::KvCache),
    Jamba(arch::jamba::JambaState),
}

impl SeqState {
    /// Tokens processed so far.
    pub fn len(&self) -> usize {
        match self {
            SeqState::Llama(c) => c.len,
            SeqState::Jamba(s) => s.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held (caches and recurrent state).
    pub fn memory_bytes(&self) -> usize {
        match self {
            SeqState::Llama(c) => c.memory_bytes(),
            SeqState::Jamba(s) => s.recurrent_bytes() + s.kv_bytes(),
        }
    }

    /// Forgets positions from `len` on (attention caches can rewind).
    /// Recurrent (Mamba) state cannot rewind, so a Jamba state only accepts its own length.
    pub fn truncate(&mut self, len: usize) -> Result<(), ModelError> {
        match self {
            SeqState::Llama(c) => {
                c.truncate(len);
                Ok(())
            }
            SeqState::Jamba(s) if len >= s.len => Ok(()),
            SeqState::Jamba(_) => Err(ModelError::Input("a Mamba state cannot be rewound".into())),
        }
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
            "llama" => Arch::Llama(arch::llama::Llama::from_gguf(&file, "llama", opts.mode)?),
            "jamba" => {
                let config = arch::jamba::JambaConfig::from_gguf(&file)?;
                Arch::Jamba(arch::jamba::Jamba::load(&file, config, opts)?)
            }
            _ => return Err(ModelError::UnsupportedArch { path: path.into(), arch: arch_name }),
        };
        let mut tokenizer = Tokenizer::from_gguf(&file)?;
        if let Some(eom) = tokenizer.token_id("<|eom|>") {
            if !tokenizer.specials.stop_ids.contains(&eom) {
                tokenizer.specials.stop_ids.push(eom);
            }
        }
        let piece = |id: Option<u32>| id.and_then(|i| tokenizer.decode(&[i], false).ok()).unwrap_or_default();
        let template = match file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(src) => Some(ChatTemplate::new(src, &piece(tokenizer.specials.bos), &piece(tokenizer.specials.eos))?),
            None => None,
        };
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let name = file.get("general.name").and_then(|v| v.as_str()).map(str::to_string).unwrap_or(stem);
        Ok(Model { name, path: path.into(), arch, tokenizer, template })
    }

    /// Replaces the chat template (e.g. a model whose file carries none, or an outdated one).
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), ModelError> {
        let tk = &self.tokenizer;
        let piece = |id: Option<u32>| id.and_then(|i| tk.decode(&[i], false).ok()).unwrap_or_default();
        self.template = Some(ChatTemplate::new(source, &piece(tk.specials.bos), &piece(tk.specials.eos))?);
        Ok(())
    }

    /// Whether [`Model::forward_batch`] can run several sequences over a shared paged KV pool.
    /// Models with recurrent state run sequence by sequence on their own [`SeqState`].
    pub fn supports_batching(&self) -> bool {
        matches!(self.arch, Arch::Llama(_))
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

    pub fn new_state(&self) -> SeqState {
        match &self.arch {
            Arch::Llama(m) => SeqState::Llama(m.new_cache()),
            Arch::Jamba(m) => SeqState::Jamba(m.new_state()),
        }
    }

    /// Runs `tokens` after the state's current position. Logits land in `scratch.logits()`:
    /// one row per token when `all_logits`, else the last token's only.
    pub fn forward(
        &self,
        compute: &Compute,
        tokens: &[u32],
        state: &mut SeqState,
        scratch: &mut Scratch,
        all_logits: bool,
    ) -> Result<(), ModelError> {
        match (&self.arch, state) {
            (Arch::Llama(m), SeqState::Llama(c)) => {
                scratch.last_jamba = false;
                m.forward(compute, tokens, c, &mut scratch.llama, all_logits)
            }
            (Arch::Jamba(m), SeqState::Jamba(st)) => {
                scratch.last_jamba = true;
                m.forward(compute, tokens, st, &mut scratch.jamba, all_logits)
            }
            _ => Err(ModelError::Input("sequence state belongs to another model".into())),
        }
    }

    /// A paged KV pool of `blocks` blocks of `block_size` positions for this model.
    pub fn new_pool(&self, block_size: usize, blocks: usize) -> KvPool {
        match &self.arch {
            Arch::Llama(m) => m.new_pool(block_size, blocks),
            Arch::Jamba(m) => {
                KvPool::new(m.config.layers, m.config.kv_heads * m.config.head_dim, block_size, blocks.min(1))
            }
        }
    }

    /// Bytes of KV cache one position takes (all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        match &self.arch {
            Arch::Llama(m) => 2 * m.config.layers * m.config.kv_dim() * 4,
            Arch::Jamba(m) => 2 * m.config.layers * m.config.kv_heads * m.config.head_dim * 4,
        }
    }

    /// One forward pass over a batch of sequences sharing `pool`; see
    /// [`arch::llama::Llama::forward_batch`].
    pub fn forward_batch(
        &self,
        compute: &Compute,
        items: &[BatchItem<'_>],
        pool: &mut KvPool,
        scratch: &mut Scratch,
    ) -> Result<(), ModelError> {
        match &self.arch {
            Arch::Llama(m) => {
                scratch.last_jamba = false;
                m.forward_batch(compute, items, pool, &mut scratch.llama)
            }
            Arch::Jamba(_) => Err(ModelError::Input(
                "batched serving of Jamba models is not implemented yet (their Mamba state needs engine slots)".into(),
            )),
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
