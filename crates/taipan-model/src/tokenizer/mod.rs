//! Tokenizers from a `tokenizer.json` or from GGUF metadata.
//!
//! GGUF files carry the vocabulary as arrays (`tokenizer.ggml.*`); both of their kinds run on our
//! own implementations of llama.cpp's algorithms, which need only what the file already holds:
//! byte-level BPE (`gpt2`, split first by the pre-tokenizer `tokenizer.ggml.pre` names) in
//! [`bpe`], SentencePiece (`llama`) in [`spm`]. A `tokenizer.json` runs on Hugging Face
//! `tokenizers`.

mod bpe;
mod special;
mod spm;
mod vocab;

use crate::gguf::{GgufError, GgufFile, Value};
use serde_json::Value as Json;
use std::path::Path;
use vocab::Vocab;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: tokenizer model '{model}' is not supported (expected gpt2 or llama)")]
    UnsupportedModel { path: String, model: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("token id {0} is outside the vocabulary")]
    UnknownId(u32),
    #[error("{path}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported; supported: {supported}")]
    UnsupportedPre { path: String, pre: String, supported: String },
}

/// Token texts that end generation wherever a vocabulary has them (llama.cpp's end-of-generation
/// list, the entries of the model families we load).
const END_OF_GENERATION: [&str; 8] =
    ["<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>"];

/// GGUF token types (`tokenizer.ggml.token_type`, llama.cpp's numbering).
pub(crate) const NORMAL: u8 = 1;
pub(crate) const UNKNOWN: u8 = 2;
pub(crate) const CONTROL: u8 = 3;
pub(crate) const USER_DEFINED: u8 = 4;
/// The highest type llama.cpp knows (6: byte).
const LAST_TYPE: u8 = 6;

/// How llama.cpp splits text before byte-level BPE for one `tokenizer.ggml.pre` family: its
/// regular expressions, applied one after another (each splits the pieces the previous left,
/// matches and the text between them becoming pieces of their own), and its BPE options.
struct PreTokenizer {
    names: &'static [&'static str],
    regexes: &'static [&'static str],
    /// A piece that is itself in the vocabulary is taken whole, without merges.
    ignore_merges: bool,
    /// The family's default for adding BOS (a file's `add_bos_token` overrides it).
    add_bos: bool,
}

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` families we split exactly as llama.cpp does; any other name is
/// refused rather than approximated.
const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &["default"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "exaone4",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
        ],
        regexes: &[GPT2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"],
        regexes: &[r"\p{N}", GPT2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        regexes: &[LLAMA3_REGEX],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizer { names: &["dbrx", "smaug-bpe"], regexes: &[LLAMA3_REGEX], ignore_merges: false, add_bos: false },
    PreTokenizer {
        names: &["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"],
        regexes: &[QWEN2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizer {
        names: &["falcon"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, "[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
];

fn find_pre_tokenizer(name: &str) -> Option<&'static PreTokenizer> {
    PRE_TOKENIZERS.iter().find(|p| p.names.contains(&name))
}

/// Special-token ids a generator needs.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Every id that ends generation (eos, end-of-turn markers).
    pub stop_ids: Vec<u32>,
    /// Whether the model expects a BOS before a raw prompt.
    pub add_bos: bool,
}

/// A text ↔ token-id codec.
pub struct Tokenizer {
    codec: Codec,
    pub specials: SpecialTokens,
    /// Piece text per id (for display, logprobs and grammars) and id per piece.
    pieces: Vocab,
    /// Token type per id (GGUF numbering; a `tokenizer.json`'s added tokens are control tokens
    /// when special, else user-defined). Control, unknown and user-defined tokens are matched
    /// whole and their text is their bytes.
    types: Vec<u8>,
    /// How vocabulary strings spell bytes (needed to know each token's raw bytes).
    spelling: PieceSpelling,
}

enum Codec {
    /// One instance for both modes: it recognises special-token text (`<|im_start|>`) as single
    /// ids, except while a plain-text encode holds the write lock with that switched off.
    /// Prompts (special mode) share the read lock.
    HuggingFace(Box<std::sync::RwLock<tokenizers::Tokenizer>>),
    BytePairs(Box<bpe::BytePairs>),
    SentencePiece(Box<spm::SentencePiece>),
}

/// How a vocabulary string encodes the token's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceSpelling {
    /// GPT-2 byte-level: every byte is one printable character.
    ByteLevel,
    /// SentencePiece: text with `▁` for spaces, `<0xNN>` for raw bytes.
    SentencePiece,
}

/// GPT-2's byte-level alphabet, from character to byte.
fn byte_level_map() -> &'static std::collections::HashMap<char, u8> {
    static MAP: std::sync::OnceLock<std::collections::HashMap<char, u8>> = std::sync::OnceLock::new();
    MAP.get_or_init(|| bpe::byte_chars().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect())
}

fn spelling_of(json: &Json) -> PieceSpelling {
    let decoder = &json["decoder"];
    let is_byte_level = |d: &Json| d["type"].as_str() == Some("ByteLevel");
    let byte_level =
        is_byte_level(decoder) || decoder["decoders"].as_array().is_some_and(|ds| ds.iter().any(is_byte_level));
    if byte_level {
        PieceSpelling::ByteLevel
    } else {
        PieceSpelling::SentencePiece
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({} tokens)", self.pieces.len())
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid { path: path.display().to_string(), message: message.into() }
}

impl Tokenizer {
    fn from_json(json: &Json, path: &Path, specials: SpecialTokens) -> Result<Self, TokenizerError> {
        let text = json.to_string();
        let special: tokenizers::Tokenizer =
            text.parse().map_err(|e| invalid(path, format!("cannot build tokenizer: {e}")))?;
        let vocab_size = special.get_vocab_size(true);
        let mut pieces = vec![String::new(); vocab_size];
        let mut types = vec![NORMAL; vocab_size];
        for (piece, id) in special.get_vocab(true) {
            if let Some(slot) = pieces.get_mut(id as usize) {
                *slot = piece;
            }
        }
        for (id, token) in special.get_added_tokens_decoder() {
            if let Some(t) = types.get_mut(id as usize) {
                *t = if token.special { CONTROL } else { USER_DEFINED };
            }
        }
        Ok(Tokenizer {
            codec: Codec::HuggingFace(Box::new(std::sync::RwLock::new(special))),
            specials,
            pieces: Vocab::new(&pieces),
            types,
            spelling: spelling_of(json),
        })
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(path: &Path, specials: SpecialTokens) -> Result<Self, TokenizerError> {
        let text = std::fs::read_to_string(path).map_err(|e| invalid(path, e.to_string()))?;
        let json: Json = serde_json::from_str(&text).map_err(|e| invalid(path, e.to_string()))?;
        Self::from_json(&json, path, specials)
    }

    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let path = file.path.as_path();
        let model = file.get_str("tokenizer.ggml.model")?;
        let tokens = file.get_strings("tokenizer.ggml.tokens")?;
        // A file without types has only normal tokens; a malformed entry is an error, never a
        // silent default.
        let types: Vec<u8> = match file.get("tokenizer.ggml.token_type") {
            None => vec![NORMAL; tokens.len()],
            Some(_) => file
                .get_array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| v.as_u64().and_then(|t| u8::try_from(t).ok()).filter(|&t| t <= LAST_TYPE))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    invalid(path, "tokenizer.ggml.token_type holds a type outside 0..=6 (llama.cpp's token types)")
                })?,
        };
        if types.len() != tokens.len() {
            return Err(invalid(path, "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length"));
        }
        let id = |key: &str| file.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let eot = id("tokenizer.ggml.eot_token_id");
        let eom = id("tokenizer.ggml.eom_token_id");
        let mut stop_ids: Vec<u32> = [eos, eot, eom].into_iter().flatten().collect();
        // Converters often leave the end-of-turn marker out of the metadata (Gemma's
        // `<end_of_turn>`, Qwen's `<|im_end|>` beside an `<|endoftext|>` eos): like llama.cpp,
        // every token spelled as a known end of turn or text ends generation.
        for (i, t) in tokens.iter().enumerate() {
            if END_OF_GENERATION.contains(t) && !stop_ids.contains(&(i as u32)) {
                stop_ids.push(i as u32);
            }
        }
        // A byte-level vocabulary without a pre-tokenizer name gets llama.cpp's "default" split.
        let pre = match model {
            "gpt2" => {
                let name = file.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
                Some(find_pre_tokenizer(name).ok_or_else(|| TokenizerError::UnsupportedPre {
                    path: path.display().to_string(),
                    pre: name.into(),
                    supported:
                        PRE_TOKENIZERS.iter().flat_map(|p| p.names.iter().copied()).collect::<Vec<_>>().join(", "),
                })?)
            }
            _ => None,
        };
        let default_add_bos = model == "llama" || pre.is_some_and(|p| p.add_bos);
        let specials = SpecialTokens {
            bos,
            eos,
            stop_ids,
            add_bos: file.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(default_add_bos),
        };
        for &sid in specials.stop_ids.iter().chain(bos.iter()) {
            if sid as usize >= tokens.len() {
                return Err(invalid(path, format!("special token id {sid} is outside the vocabulary")));
            }
        }
        if model == "llama" {
            return Self::sentencepiece(file, &tokens, types, specials);
        }
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel { path: path.display().to_string(), model: model.into() });
        }
        let pre = pre.ok_or_else(|| invalid(path, "no pre-tokenizer for a gpt2 vocabulary"))?;
        let merges = file.get_strings("tokenizer.ggml.merges")?;
        let pieces = Vocab::new(&tokens);
        // The codec does not know the file: its errors get the file's path instead of its own.
        let codec =
            bpe::BytePairs::new(&pieces, &types, &merges, pre.regexes, pre.ignore_merges).map_err(|e| match e {
                TokenizerError::Invalid { message, .. } => invalid(path, message),
                other => other,
            })?;
        Ok(Tokenizer {
            codec: Codec::BytePairs(Box::new(codec)),
            specials,
            pieces,
            types,
            spelling: PieceSpelling::ByteLevel,
        })
    }

    /// A SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`).
    fn sentencepiece(
        file: &GgufFile,
        tokens: &[&str],
        types: Vec<u8>,
        specials: SpecialTokens,
    ) -> Result<Self, TokenizerError> {
        let path = file.path.as_path();
        // A file without scores merges nothing by preference (all equal); a malformed entry is an
        // error, never a silent zero.
        let scores: Vec<f32> = match file.get("tokenizer.ggml.scores") {
            None => vec![0.0; tokens.len()],
            Some(_) => file
                .get_array("tokenizer.ggml.scores")?
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid(path, "tokenizer.ggml.scores holds a value that is not a number"))?,
        };
        if scores.len() != tokens.len() {
            return Err(invalid(path, "tokenizer.ggml.scores and tokenizer.ggml.tokens differ in length"));
        }
        let unknown = file.get("tokenizer.ggml.unknown_token_id").and_then(Value::as_u64).map(|v| v as u32);
        if unknown.is_some_and(|u| u as usize >= tokens.len()) {
            return Err(invalid(path, "tokenizer.ggml.unknown_token_id is outside the vocabulary"));
        }
        let add_space_prefix = file.get_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let pieces = Vocab::new(tokens);
        let codec = spm::SentencePiece::new(&pieces, &types, scores, unknown, add_space_prefix)?;
        Ok(Tokenizer {
            codec: Codec::SentencePiece(Box::new(codec)),
            specials,
            pieces,
            types,
            spelling: PieceSpelling::SentencePiece,
        })
    }

    /// Encodes text. With `parse_special`, special-token text becomes its single id. No BOS is added.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let failed =
            |e: tokenizers::Error| TokenizerError::Invalid { path: "tokenizer".into(), message: e.to_string() };
        // A panic inside `tokenizers` poisons the lock without leaving the codec half-changed
        // (the plain-mode switch is restored before the guard drops), so a poisoned lock is usable.
        let codec = match &self.codec {
            Codec::SentencePiece(spm) => return spm.encode(&self.pieces, text, parse_special),
            Codec::BytePairs(bpe) => return bpe.encode(&self.pieces, text, parse_special),
            Codec::HuggingFace(codec) => codec,
        };
        let enc = if parse_special {
            codec.read().unwrap_or_else(|e| e.into_inner()).encode(text, false).map_err(failed)?
        } else {
            let mut codec = codec.write().unwrap_or_else(|e| e.into_inner());
            codec.set_encode_special_tokens(true);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| codec.encode(text, false)));
            codec.set_encode_special_tokens(false);
            match result {
                Ok(r) => r.map_err(failed)?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        };
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; special tokens appear as their text unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.pieces.len()) {
            return Err(TokenizerError::UnknownId(bad));
        }
        match &self.codec {
            Codec::SentencePiece(spm) => Ok(spm.decode(&self.pieces, &self.types, ids, skip_special)),
            Codec::BytePairs(_) => {
                // As llama.cpp: control and unknown tokens are what `skip_special` drops.
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    if !(skip_special && matches!(self.types[id as usize], CONTROL | UNKNOWN)) {
                        bytes.extend(self.piece_bytes(id as usize));
                    }
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Codec::HuggingFace(codec) => codec
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .decode(ids, skip_special)
                .map_err(|e| TokenizerError::Invalid { path: "tokenizer".into(), message: e.to_string() }),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The vocabulary string of an id (byte-level form for BPE vocabularies).
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id)
    }

    /// Whether an id is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&CONTROL)
    }

    /// The raw bytes of every token, for byte-level grammar matching. Special tokens are
    /// `0xFF` followed by their text so that no plain text can spell them.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        (0..self.pieces.len())
            .map(|id| {
                let mut b = if self.types[id] == CONTROL { vec![0xFF] } else { Vec::new() };
                b.extend(self.piece_bytes(id));
                b
            })
            .collect()
    }

    /// The bytes one token contributes to the output (its text for a special token): exact even
    /// where the token holds part of a UTF-8 character, which decoding it alone cannot show.
    pub fn bytes_of(&self, id: u32) -> Vec<u8> {
        if (id as usize) >= self.pieces.len() {
            return Vec::new();
        }
        self.piece_bytes(id as usize)
    }

    fn piece_bytes(&self, id: usize) -> Vec<u8> {
        let piece = self.pieces.get(id as u32).unwrap_or_default();
        if matches!(self.types[id], CONTROL | UNKNOWN | USER_DEFINED) {
            piece.as_bytes().to_vec()
        } else if self.spelling == PieceSpelling::ByteLevel {
            // A character outside the alphabet cannot come from a byte; keep its UTF-8.
            let map = byte_level_map();
            let mut b = Vec::with_capacity(piece.len());
            for c in piece.chars() {
                match map.get(&c) {
                    Some(&byte) => b.push(byte),
                    None => b.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            b
        } else if let Some(byte) = sentencepiece_byte(piece) {
            vec![byte]
        } else {
            piece.replace('▁', " ").into_bytes()
        }
    }

    /// The id of a token given by its exact vocabulary string.
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.pieces.id_of(piece)
    }
}

/// The byte a SentencePiece byte-fallback piece (`<0x0A>`) stands for.
fn sentencepiece_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
