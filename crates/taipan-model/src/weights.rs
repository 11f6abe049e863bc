//! Where an architecture's tensors come from: a GGUF file, or a Hugging Face directory of
//! safetensors. Both are read through GGUF's tensor names and dimension order (fastest-varying
//! first), so an architecture's loader is written once.

use crate::gguf::{GgufError, GgufFile};
use crate::ModelError;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use taipan_kernels::DType;

/// One tensor as stored: format, dimensions (fastest first, like GGUF `ne`) and bytes.
pub struct RawTensor<'a> {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl RawTensor<'_> {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// Tensors by GGUF name.
pub trait WeightSource {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;
    fn has(&self, name: &str) -> bool;
    fn get(&self, name: &str) -> Result<RawTensor<'_>, ModelError>;
    /// Whether tensors come from a Hugging Face checkpoint (which stores some values in another
    /// form than GGUF, e.g. Jamba's `A_log` instead of `A`).
    fn is_hf(&self) -> bool;
}

impl WeightSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn has(&self, name: &str) -> bool {
        self.has_tensor(name)
    }
    fn get(&self, name: &str) -> Result<RawTensor<'_>, ModelError> {
        let t = self.tensor(name)?;
        Ok(RawTensor {
            name: name.into(),
            dtype: t.dtype,
            dims: t.dims.iter().map(|&d| d as usize).collect(),
            data: Cow::Borrowed(self.tensor_data(t)),
        })
    }
    fn is_hf(&self) -> bool {
        false
    }
}

struct ShardTensor {
    shard: usize,
    dtype: DType,
    /// PyTorch order (slowest first).
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

/// A Hugging Face checkpoint directory: one `model.safetensors` or shards listed in
/// `model.safetensors.index.json`, memory-mapped. Names are translated by `rename`, a function
/// from the checkpoint's tensor names to GGUF names supplied by the architecture.
pub struct SafetensorsDir {
    pub dir: PathBuf,
    maps: Vec<memmap2::Mmap>,
    files: Vec<PathBuf>,
    tensors: HashMap<String, ShardTensor>,
}

fn st_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Gguf(GgufError::Corrupt { path: path.into(), what: "safetensors".into(), message: message.into() })
}

impl SafetensorsDir {
    pub fn open(dir: &Path, rename: &dyn Fn(&str) -> Option<String>) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| st_err(&index, e.to_string()))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| st_err(&index, e.to_string()))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| st_err(&index, "no weight_map"))?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| st_err(dir, e.to_string()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(st_err(dir, "no *.safetensors files"));
        }
        let mut maps = Vec::new();
        let mut tensors = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let file = std::fs::File::open(f).map_err(|e| st_err(f, e.to_string()))?;
            // SAFETY: read-only map of a checkpoint file; contents are validated before use.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| st_err(f, e.to_string()))?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| st_err(f, e.to_string()))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    other => {
                        return Err(ModelError::Tensor {
                            path: f.clone(),
                            tensor: name.clone(),
                            message: format!("dtype {other:?} is not supported (expected F32, F16 or BF16)"),
                        })
                    }
                };
                let (s, e) = info.data_offsets;
                if base + e > map.len() || s > e {
                    return Err(ModelError::Tensor {
                        path: f.clone(),
                        tensor: name.clone(),
                        message: "data runs past the end of the file".into(),
                    });
                }
                let Some(gguf_name) = rename(&name) else { continue };
                tensors.insert(
                    gguf_name,
                    ShardTensor { shard: i, dtype, shape: info.shape.clone(), range: base + s..base + e },
                );
            }
            maps.push(map);
        }
        Ok(SafetensorsDir { dir: dir.into(), maps, files, tensors })
    }
}

impl WeightSource for SafetensorsDir {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn get(&self, name: &str) -> Result<RawTensor<'_>, ModelError> {
        let t = self.tensors.get(name).ok_or_else(|| ModelError::Tensor {
            path: self.dir.clone(),
            tensor: name.into(),
            message: "missing from the checkpoint".into(),
        })?;
        let dims: Vec<usize> = t.shape.iter().rev().copied().collect();
        let n: usize = dims.iter().product();
        if t.dtype.row_bytes(n) != Some(t.range.len()) {
            return Err(ModelError::Tensor {
                path: self.files[t.shard].clone(),
                tensor: name.into(),
                message: format!("{} bytes do not hold shape {:?}", t.range.len(), t.shape),
            });
        }
        count_tensor_bytes(t.range.len() as u64);
        Ok(RawTensor {
            name: name.into(),
            dtype: t.dtype,
            dims,
            data: Cow::Borrowed(&self.maps[t.shard][t.range.clone()]),
        })
    }
    fn is_hf(&self) -> bool {
        true
    }
}

/// Tensor bytes handed out by GGUF files and checkpoints in this process so far.
static TENSOR_BYTES_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn count_tensor_bytes(n: u64) {
    TENSOR_BYTES_READ.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// Tensor bytes read so far in this process: loading reads each weight about once, so the growth
/// of this count during [`crate::Model::load`] against the files' size is its progress.
pub fn tensor_bytes_read() -> u64 {
    TENSOR_BYTES_READ.load(std::sync::atomic::Ordering::Relaxed)
}
