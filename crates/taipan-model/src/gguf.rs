//! GGUF container reader (versions 2 and 3), memory-mapped.
//!
//! Every read is bounds-checked: a truncated or corrupt file yields a [`GgufError`] that names the
//! file, the key or tensor being read, and what was expected, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use taipan_kernels::DType;

/// Default alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a GGUF file (magic {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: GGUF version {version} is not supported (expected 2 or 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: truncated while reading {what} at byte {offset}: needs {needed} more bytes, file has {len}")]
    Truncated { path: PathBuf, what: String, offset: u64, needed: u64, len: u64 },
    #[error("{path}: {what}: {message}")]
    Corrupt { path: PathBuf, what: String, message: String },
    #[error("{path}: tensor '{tensor}' has ggml type {type_id}, which taipan does not support")]
    UnknownType { path: PathBuf, tensor: String, type_id: u32 },
    #[error(
        "{path}: tensor '{tensor}' ({bytes} bytes at data offset {offset}) runs past the end of the file ({len} bytes)"
    )]
    TensorOutOfBounds { path: PathBuf, tensor: String, offset: u64, bytes: u64, len: u64 },
    #[error("{path}: metadata key '{key}' is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key '{key}' has type {found}, expected {expected}")]
    WrongKeyType { path: PathBuf, key: String, found: &'static str, expected: &'static str },
    #[error("{path}: tensor '{tensor}' is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    WrongShape { path: PathBuf, tensor: String, found: Vec<u64>, expected: Vec<u64> },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                Value::I32(v) => Some(v as f64),
                Value::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A short human-readable rendering (arrays abbreviated).
    pub fn display_short(&self) -> String {
        match self {
            Value::String(s) if s.len() > 80 => format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(60)], s.len()),
            Value::String(s) => format!("{s:?}"),
            Value::Array(items) => {
                let head: Vec<String> = items.iter().take(4).map(|v| v.display_short()).collect();
                let more = if items.len() > 4 { ", …" } else { "" };
                format!("[{}{}] ({} items)", head.join(", "), more, items.len())
            }
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => other.as_u64().map(|v| v.to_string()).unwrap_or_else(|| format!("{other:?}")),
        }
    }
}

/// One tensor's header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest-varying first (`ne[0]` is the row length).
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes.
    pub bytes: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    data_start: u64,
    map: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgufFile({}, v{}, {} tensors)", self.path.display(), self.version, self.tensors.len())
    }
}

struct Reader<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos as u64,
                needed: n - remaining,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.corrupt(what(), "string is not valid UTF-8".into()))
    }
    fn corrupt(&self, what: String, message: String) -> GgufError {
        GgufError::Corrupt { path: self.path.to_path_buf(), what, message }
    }
    fn value(&mut self, type_id: u32, what: &dyn Fn() -> String, depth: u32) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.corrupt(what(), format!("bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(self.corrupt(what(), "arrays nested too deeply".into()));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: refuse counts the file cannot hold
                // before allocating for them.
                let remaining = (self.buf.len() - self.pos) as u64;
                if n > remaining {
                    return Err(self.corrupt(what(), format!("array of {n} items cannot fit in {remaining} bytes")));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(self.corrupt(what(), format!("unknown value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: header, metadata, tensor table and tensor bounds.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io { path: path.clone(), source };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath us by another process is outside
        // what any mmap-based loader can defend against, and we never trust its contents unchecked.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, map)
    }

    fn parse(path: PathBuf, map: memmap2::Mmap) -> Result<Self, GgufError> {
        let mut r = Reader { path: &path, buf: &map, pos: 0 };
        let magic: [u8; 4] = r.array(&|| "magic".into())?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic { path: path.clone(), found: magic });
        }
        let version = r.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { path: path.clone(), version });
        }
        let n_tensors = r.u64(&|| "tensor count".into())?;
        let n_kv = r.u64(&|| "metadata count".into())?;
        let mut metadata = Vec::new();
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata key #{i}"))?;
            let what = |k: &str| format!("metadata '{k}'");
            let ty = r.u32(&|| what(&key))?;
            let value = r.value(ty, &|| what(&key), 0)?;
            index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }
        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(r.corrupt("metadata 'general.alignment'".into(), format!("{v:?} is not a power of two")))
                }
            },
        };
        let mut tensors = Vec::new();
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = r.string(&|| format!("tensor info #{i}"))?;
            let what = || format!("tensor info '{name}'");
            let n_dims = r.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.corrupt(what(), format!("{n_dims} dimensions (expected 1..=4)")));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let type_id = r.u32(&what)?;
            let offset = r.u64(&what)?;
            let dtype = DType::from_ggml_id(type_id).ok_or_else(|| GgufError::UnknownType {
                path: path.clone(),
                tensor: name.clone(),
                type_id,
            })?;
            let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let row = dims[0];
            let bytes = elements.and_then(|e| {
                if row % dtype.block_elems() as u64 != 0 {
                    return None;
                }
                (e / dtype.block_elems() as u64).checked_mul(dtype.block_bytes() as u64)
            });
            let bytes = bytes
                .ok_or_else(|| r.corrupt(what(), format!("shape {dims:?} is not a whole number of {dtype} blocks")))?;
            if offset % alignment != 0 {
                return Err(r.corrupt(what(), format!("offset {offset} is not aligned to {alignment}")));
            }
            tensor_index.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo { name, dims, dtype, offset, bytes });
        }
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let len = map.len() as u64;
        for t in &tensors {
            let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.bytes));
            if end.is_none_or(|e| e > len) {
                return Err(GgufError::TensorOutOfBounds {
                    path: path.clone(),
                    tensor: t.name.clone(),
                    offset: t.offset,
                    bytes: t.bytes,
                    len,
                });
            }
        }
        Ok(GgufFile { path, version, metadata, index, tensors, tensor_index, alignment, data_start, map })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey { path: self.path.clone(), key: key.to_string() }
    }

    fn wrong(&self, key: &str, v: &Value, expected: &'static str) -> GgufError {
        GgufError::WrongKeyType { path: self.path.clone(), key: key.into(), found: v.type_name(), expected }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_u64().ok_or_else(|| self.wrong(key, v, "unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_f64().ok_or_else(|| self.wrong(key, v, "number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_str().ok_or_else(|| self.wrong(key, v, "string"))
    }

    /// An optional key: absent is `None`; present with the wrong type is an error, never the default.
    pub fn get_opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key).map(|_| self.get_u64(key)).transpose()
    }

    /// See [`GgufFile::get_opt_u64`].
    pub fn get_opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.get(key).map(|_| self.get_f64(key)).transpose()
    }

    /// See [`GgufFile::get_opt_u64`].
    pub fn get_opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key).map(|_| self.get_str(key)).transpose()
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        match self.get(key) {
            Some(Value::Array(items)) => Ok(items),
            Some(v) => Err(self.wrong(key, v, "array")),
            None => Err(self.missing(key)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// Array of strings (e.g. the vocabulary).
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let items = self.get_array(key)?;
        items.iter().map(|v| v.as_str().ok_or_else(|| self.wrong(key, v, "array of strings"))).collect()
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor { path: self.path.clone(), tensor: name.into() })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }

    /// The bytes of a tensor (bounds were checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        crate::weights::count_tensor_bytes(t.bytes);
        let start = (self.data_start + t.offset) as usize;
        &self.map[start..start + t.bytes as usize]
    }

    /// A tensor checked against an expected shape (fastest-varying first).
    pub fn tensor_shaped(&self, name: &str, expected: &[u64]) -> Result<&TensorInfo, GgufError> {
        let t = self.tensor(name)?;
        if t.dims != expected {
            return Err(GgufError::WrongShape {
                path: self.path.clone(),
                tensor: name.into(),
                found: t.dims.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }
}

/// Writes GGUF files; used by tests to build small and deliberately broken models.
pub mod writer {
    use super::Value;

    /// A tensor to write: name, dims (fastest first), ggml type id, raw data.
    pub struct TensorSpec {
        pub name: String,
        pub dims: Vec<u64>,
        pub type_id: u32,
        pub data: Vec<u8>,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => put_str(out, s),
            Value::Array(items) => {
                let elem = items.first().map(type_id).unwrap_or(0);
                out.extend(elem.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    put_value(out, i);
                }
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }

    /// Serialises a version-3 GGUF file with 32-byte alignment.
    pub fn to_bytes(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        let base = out.len();
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend(&t.data);
        }
        out
    }
}

/// A GGUF's architecture, parameter count and tensor formats (most bytes first), for start-up
/// messages; `None` for anything that is not a readable GGUF file (a checkpoint folder, say).
pub fn describe_weights(path: &Path) -> Option<String> {
    if path.is_dir() {
        return None;
    }
    let f = GgufFile::open(path).ok()?;
    let arch = f.get_str("general.architecture").ok()?.to_string();
    let mut by_type: std::collections::BTreeMap<&str, u64> = Default::default();
    for t in &f.tensors {
        *by_type.entry(t.dtype.name()).or_default() += t.bytes;
    }
    let mut types: Vec<(&str, u64)> = by_type.into_iter().collect();
    types.sort_by_key(|t| std::cmp::Reverse(t.1));
    let params: u64 = f.tensors.iter().map(|t| t.elements()).sum();
    let formats: Vec<&str> = types.iter().map(|t| t.0).collect();
    Some(format!("{arch} architecture, {:.1} M parameters in {} tensors", params as f64 / 1e6, formats.join(" > ")))
}
