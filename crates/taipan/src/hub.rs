//! Models by Hugging Face Hub name: `org/repo`, `org/repo:Q4_K_M`, `org/repo:file.gguf` or
//! `org/repo/dir/file.gguf`, fetched with the `hf-hub` crate into the standard Hub cache
//! (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), which
//! `huggingface_hub` shares. `HF_ENDPOINT` moves the Hub, `HF_TOKEN` (or the token file
//! `huggingface-cli login` writes) opens gated repositories.
//!
//! A download goes to a `.part` file beside its blob and a later run resumes it; the finished
//! file is checked against the content hash the Hub names in its ETag (SHA-256 for LFS files, the
//! git blob SHA-1 for small ones) before anything loads it, and removed when it does not match.

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A model named by its Hub repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    pub repo: String,
    pub pick: Pick,
}

/// Which file(s) of the repository to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// A safetensors checkpoint when there is one, else the repository's only GGUF, else its
    /// Q4_K_M GGUF (llama.cpp's choice).
    Default,
    /// The GGUF whose name carries this quantization tag.
    Quant(String),
    /// This GGUF file.
    File(String),
}

impl std::fmt::Display for HubModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pick {
            Pick::Default => write!(f, "{}", self.repo),
            Pick::Quant(q) => write!(f, "{}:{q}", self.repo),
            Pick::File(file) => write!(f, "{}/{file}", self.repo),
        }
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Reads `org/repo[:QUANT | :file.gguf]` or `org/repo/path/file.gguf`; `None` when `spec` is not
/// shaped like a Hub name (a local path, say).
pub fn parse(spec: &str) -> Option<HubModel> {
    if spec.starts_with(['/', '.', '~']) || spec.contains('\\') {
        return None;
    }
    let (name, tag) = match spec.split_once(':') {
        Some((name, tag)) => (name, Some(tag)),
        None => (spec, None),
    };
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() < 2 || !parts.iter().all(|p| valid_segment(p)) {
        return None;
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let in_repo = parts[2..].join("/");
    let pick = match tag {
        Some(tag) if !in_repo.is_empty() || !valid_segment(tag) => return None,
        Some(tag) if tag.to_ascii_lowercase().ends_with(".gguf") => Pick::File(tag.to_string()),
        Some(tag) => Pick::Quant(tag.to_string()),
        None if in_repo.is_empty() => Pick::Default,
        None if in_repo.to_ascii_lowercase().ends_with(".gguf") => Pick::File(in_repo),
        None => return None,
    };
    Some(HubModel { repo, pick })
}

/// What to load once the files are in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selection {
    files: Vec<String>,
    /// A GGUF file, or (None) the directory of a safetensors checkpoint.
    gguf: Option<String>,
}

/// What loading a checkpoint folder reads besides its `*.safetensors` (the tokenizer comes from
/// `tokenizer.json`; `tokenizer.model` and `special_tokens_map.json` are not read, so not fetched).
const CHECKPOINT_FILES: [&str; 6] = [
    "config.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors.index.json",
];

fn is_gguf(f: &str) -> bool {
    f.to_ascii_lowercase().ends_with(".gguf")
}

/// The quantization tag as a whole word of the file name: `Q4_K_M` picks `x-Q4_K_M.gguf`, not
/// `x-Q4_K_M_L.gguf`.
fn names_quant(file: &str, quant: &str) -> bool {
    let base = file.rsplit('/').next().unwrap_or(file);
    base.split(['-', '.']).any(|word| word.eq_ignore_ascii_case(quant))
}

fn is_split_part(file: &str) -> bool {
    let lower = file.to_ascii_lowercase();
    lower.contains("-of-") && lower.split(['-', '.']).any(|w| w.len() == 5 && w.bytes().all(|b| b.is_ascii_digit()))
}

fn select(model: &HubModel, files: &[String]) -> Result<Selection> {
    let ggufs: Vec<&String> = files.iter().filter(|f| is_gguf(f)).collect();
    let listing = || {
        if ggufs.is_empty() {
            "it has no GGUF files".to_string()
        } else {
            format!("its GGUF files: {}", ggufs.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
        }
    };
    let one_gguf = |chosen: &String| -> Result<Selection> {
        if is_split_part(chosen) {
            bail!("{}: {chosen} is one part of a split GGUF; split GGUF files are not supported", model.repo);
        }
        Ok(Selection { files: vec![chosen.clone()], gguf: Some(chosen.clone()) })
    };
    match &model.pick {
        Pick::File(file) => match files.iter().find(|f| *f == file) {
            Some(f) => one_gguf(f),
            None => bail!("{} has no file {file}; {}", model.repo, listing()),
        },
        Pick::Quant(quant) => {
            let matching: Vec<&String> = ggufs.iter().copied().filter(|f| names_quant(f, quant)).collect();
            match matching.as_slice() {
                [one] => one_gguf(one),
                [] => bail!("{} has no GGUF file for quantization {quant}; {}", model.repo, listing()),
                several if several.iter().all(|f| is_split_part(f)) => {
                    bail!(
                        "{}:{quant} is a split GGUF ({} parts); split GGUF files are not supported",
                        model.repo,
                        several.len()
                    )
                }
                several => bail!(
                    "{}:{quant} names {} files ({}); name one with {}:<file.gguf>",
                    model.repo,
                    several.len(),
                    several.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                    model.repo
                ),
            }
        }
        Pick::Default => {
            let weights: Vec<&String> =
                files.iter().filter(|f| !f.contains('/') && f.ends_with(".safetensors")).collect();
            if files.iter().any(|f| f == "config.json") && !weights.is_empty() {
                let mut wanted: Vec<String> =
                    CHECKPOINT_FILES.iter().filter(|c| files.iter().any(|f| f == *c)).map(|c| c.to_string()).collect();
                wanted.extend(weights.into_iter().cloned());
                return Ok(Selection { files: wanted, gguf: None });
            }
            match ggufs.as_slice() {
                [one] => one_gguf(one),
                [] => bail!(
                    "{} has neither a safetensors checkpoint (config.json + *.safetensors) nor a GGUF file",
                    model.repo
                ),
                several => match several.iter().find(|f| names_quant(f, "Q4_K_M")) {
                    Some(f) => one_gguf(f),
                    None => bail!(
                        "{} has {} GGUF files and no Q4_K_M; name one: {}:<QUANT> or {}:<file.gguf>; {}",
                        model.repo,
                        several.len(),
                        model.repo,
                        model.repo,
                        listing()
                    ),
                },
            }
        }
    }
}

/// The Hub cache folder, as `huggingface_hub` finds it.
fn cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => Cache::new(PathBuf::from(dir)),
        None => Cache::from_env(),
    }
}

/// True when the environment forbids the network (`HF_HUB_OFFLINE=1`, as huggingface_hub reads it).
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Makes sure the model's files are in the Hub cache (downloading what is missing unless
/// `offline`) and returns what to load: the GGUF file, or the checkpoint's snapshot folder.
pub fn fetch(model: &HubModel, offline: bool) -> Result<PathBuf> {
    let cache = cache();
    let repo = Repo::model(model.repo.clone());
    let cached = cache.repo(repo.clone());
    if offline {
        let snapshot = snapshot_dir(&cache, &model.repo).with_context(|| {
            format!("{model} is not in the Hub cache ({}) and --offline forbids downloading it", cache.path().display())
        })?;
        let files = list_files(&snapshot)?;
        let chosen = select(model, &files)?;
        return Ok(match &chosen.gguf {
            Some(f) => snapshot.join(f),
            None => snapshot,
        });
    }
    let mut builder = ApiBuilder::from_env().with_progress(false).with_retries(3);
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        builder = builder.with_cache_dir(PathBuf::from(dir));
    }
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        builder = builder.with_token(Some(token.trim().to_string()));
    }
    let api = builder.build().map_err(|e| hub_error(e, model))?;
    let remote = api.repo(repo);
    let info = remote.info().map_err(|e| hub_error(e, model))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let chosen = select(model, &files)?;
    // Files join the snapshot of the commit the Hub serves now (`refs/main`). Should the
    // repository have moved on since some of them were cached, the first pass leaves them in an
    // older snapshot; the second fetches them into the current one, so one folder holds them all.
    for _ in 0..2 {
        let mut local = Vec::with_capacity(chosen.files.len());
        for file in &chosen.files {
            let path = match cached.get(file) {
                Some(path) => path,
                None => {
                    download(&api, &remote, &model.repo, file).map_err(|e| e.context(format!("downloading {model}")))?
                }
            };
            local.push(path);
        }
        let snapshot =
            local[0].parent().map(Path::to_path_buf).ok_or_else(|| anyhow!("{model}: empty snapshot path"))?;
        let current: Vec<Option<PathBuf>> = chosen.files.iter().map(|f| cached.get(f)).collect();
        if current.iter().zip(&local).all(|(now, had)| now.as_ref() == Some(had)) {
            return Ok(match &chosen.gguf {
                Some(_) => local.swap_remove(0),
                None => snapshot,
            });
        }
    }
    bail!("{model}: the repository changed while its files were being fetched; try again")
}

fn hub_error(e: ApiError, model: &HubModel) -> anyhow::Error {
    let text = e.to_string();
    let hint = if text.contains("401") || text.contains("403") {
        "; the repository may be gated or private: set HF_TOKEN to a token that may read it"
    } else if text.contains("404") {
        "; check the repository name"
    } else {
        ""
    };
    anyhow!("the Hub could not serve {model}: {text}{hint}")
}

fn download(api: &Api, remote: &ApiRepo, repo: &str, file: &str) -> Result<PathBuf> {
    let metadata = api.metadata(&remote.url(file)).map_err(|e| anyhow!("{file}: {e}"))?;
    let expected = ContentHash::from_etag(metadata.etag())
        .ok_or_else(|| anyhow!("{file}: the Hub's ETag {:?} names no content hash to verify it by", metadata.etag()))?;
    let progress = ProgressLine::new(format!("{repo}/{file}"));
    let path = remote.download_with_progress(file, progress).map_err(|e| anyhow!("{file}: {e}"))?;
    let actual = expected.of_file(&path)?;
    if actual != expected.hex() {
        // The snapshot entry points at the blob: neither may stay where the next run would use it.
        if let Ok(blob) = std::fs::canonicalize(&path) {
            let _ = std::fs::remove_file(blob);
        }
        let _ = std::fs::remove_file(&path);
        bail!(
            "{file}: checksum mismatch: the Hub says {} {}, the downloaded file has {actual}; the file was removed",
            expected.name(),
            expected.hex()
        );
    }
    Ok(path)
}

/// The content hash a Hub ETag carries.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ContentHash {
    /// LFS files: the SHA-256 of the content.
    Sha256(String),
    /// Files kept in git: the SHA-1 of `blob <len>\0<content>`.
    GitBlob(String),
}

impl ContentHash {
    fn from_etag(etag: &str) -> Option<Self> {
        let tag = etag.trim().trim_start_matches("W/").trim_matches('"').to_ascii_lowercase();
        if !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        match tag.len() {
            64 => Some(Self::Sha256(tag)),
            40 => Some(Self::GitBlob(tag)),
            _ => None,
        }
    }

    fn hex(&self) -> &str {
        match self {
            Self::Sha256(h) | Self::GitBlob(h) => h,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Sha256(_) => "sha256",
            Self::GitBlob(_) => "git blob sha1",
        }
    }

    fn of_file(&self, path: &Path) -> Result<String> {
        let mut file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut buf = vec![0u8; 1 << 20];
        match self {
            Self::Sha256(_) => hash_reader(Sha256::new(), &mut file, &mut buf),
            Self::GitBlob(_) => {
                let mut h = Sha1::new();
                h.update(format!("blob {len}\0").as_bytes());
                hash_reader(h, &mut file, &mut buf)
            }
        }
    }
}

fn hash_reader<D: Digest>(mut hasher: D, reader: &mut impl Read, buf: &mut [u8]) -> Result<String> {
    loop {
        let n = reader.read(buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The snapshot folder `refs/main` points at, if the repository is cached.
fn snapshot_dir(cache: &Cache, repo: &str) -> Result<PathBuf> {
    let root = cache.path().join(format!("models--{}", repo.replace('/', "--")));
    let commit = std::fs::read_to_string(root.join("refs").join("main"))
        .with_context(|| format!("no {}", root.join("refs/main").display()))?;
    let dir = root.join("snapshots").join(commit.trim());
    if !dir.is_dir() {
        bail!("no snapshot folder {}", dir.display());
    }
    Ok(dir)
}

/// Every file under a snapshot folder, as paths relative to it with `/` separators.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel)).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            if entry.path().is_dir() {
                stack.push(rel);
            } else if let Some(s) = rel.to_str() {
                out.push(s.replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Download progress on stderr: one line redrawn in place on a terminal, a line every few
/// seconds in a log.
struct ProgressLine {
    name: String,
    total: usize,
    done: usize,
    resumed_at: usize,
    /// Set by `init`: the next `update` reports where this attempt starts (0, or a resume).
    attempt_start: bool,
    started: Instant,
    shown: Option<Instant>,
    terminal: bool,
}

impl ProgressLine {
    fn new(name: String) -> Self {
        Self {
            name,
            total: 0,
            done: 0,
            resumed_at: 0,
            attempt_start: false,
            started: Instant::now(),
            shown: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, last: bool) {
        let every = if self.terminal { Duration::from_millis(150) } else { Duration::from_secs(3) };
        if !last && self.shown.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.shown = Some(Instant::now());
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = mib(self.done.saturating_sub(self.resumed_at)) / secs;
        let pct = if self.total > 0 { 100.0 * self.done as f64 / self.total as f64 } else { 100.0 };
        let width = 24;
        let filled = ((pct / 100.0) * width as f64).round() as usize;
        let bar: String = "#".repeat(filled.min(width)) + &" ".repeat(width - filled.min(width));
        let line = format!(
            "taipan: downloading {} [{bar}] {pct:5.1}% {:.1}/{:.1} MiB {rate:.1} MiB/s",
            self.name,
            mib(self.done),
            mib(self.total)
        );
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r{line}\x1b[K");
            if last {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
}

impl Progress for ProgressLine {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size;
        self.done = 0;
        self.attempt_start = true;
        self.started = Instant::now();
    }

    fn update(&mut self, size: usize) {
        if std::mem::take(&mut self.attempt_start) {
            self.resumed_at = size;
            if size > 0 {
                eprintln!("taipan: resuming {} at {:.1} MiB", self.name, size as f64 / (1 << 20) as f64);
            }
        }
        self.done += size;
        self.show(false);
    }

    fn finish(&mut self) {
        self.show(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(repo: &str, pick: Pick) -> Option<HubModel> {
        Some(HubModel { repo: repo.into(), pick })
    }

    #[test]
    fn reads_hub_names_and_leaves_paths_alone() {
        assert_eq!(parse("ai21labs/AI21-Jamba-Reasoning-3B"), hub("ai21labs/AI21-Jamba-Reasoning-3B", Pick::Default));
        assert_eq!(parse("org/repo-GGUF:Q4_K_M"), hub("org/repo-GGUF", Pick::Quant("Q4_K_M".into())));
        assert_eq!(parse("org/repo:model.Q8_0.gguf"), hub("org/repo", Pick::File("model.Q8_0.gguf".into())));
        assert_eq!(parse("org/repo/sub/model.gguf"), hub("org/repo", Pick::File("sub/model.gguf".into())));
        for local in [
            "model.gguf",
            "./org/repo",
            "/abs/org/repo",
            "~/m/x.gguf",
            "org/repo/notes.txt",
            "org/../x",
            "a/b:c:d",
            "org/repo/x.gguf:Q4",
        ] {
            assert_eq!(parse(local), None, "{local}");
        }
    }

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_files_like_llama_cpp_and_refuses_what_it_cannot_load() {
        let gguf_repo = files(&["README.md", "m-Q4_K_M.gguf", "m-Q4_K_M_L.gguf", "m-Q8_0.gguf"]);
        let m = |pick| HubModel { repo: "o/r".into(), pick };
        let s = select(&m(Pick::Quant("q8_0".into())), &gguf_repo).unwrap();
        assert_eq!(s.gguf.as_deref(), Some("m-Q8_0.gguf"));
        assert_eq!(select(&m(Pick::Default), &gguf_repo).unwrap().gguf.as_deref(), Some("m-Q4_K_M.gguf"));
        let e = select(&m(Pick::Quant("Q2_K".into())), &gguf_repo).unwrap_err().to_string();
        assert!(e.contains("no GGUF file for quantization Q2_K") && e.contains("m-Q8_0.gguf"), "{e}");
        let e = select(&m(Pick::File("x.gguf".into())), &gguf_repo).unwrap_err().to_string();
        assert!(e.contains("has no file x.gguf"), "{e}");
        let split = files(&["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"]);
        let e = select(&m(Pick::Quant("Q8_0".into())), &split).unwrap_err().to_string();
        assert!(e.contains("split GGUF"), "{e}");
        let e = select(&m(Pick::Default), &files(&["a-Q8_0.gguf", "a-F16.gguf"])).unwrap_err().to_string();
        assert!(e.contains("no Q4_K_M"), "{e}");
        let checkpoint = files(&["config.json", "model.safetensors", "tokenizer.json", "README.md", "x-Q8_0.gguf"]);
        let s = select(&m(Pick::Default), &checkpoint).unwrap();
        assert_eq!((s.files, s.gguf), (files(&["config.json", "tokenizer.json", "model.safetensors"]), None));
    }

    #[test]
    fn etags_name_the_hash_to_check() {
        let sha = "a".repeat(64);
        assert_eq!(ContentHash::from_etag(&format!("\"{sha}\"")), Some(ContentHash::Sha256(sha)));
        assert_eq!(
            ContentHash::from_etag("W/\"0123456789abcdef0123456789abcdef01234567\"").map(|h| h.name()),
            Some("git blob sha1")
        );
        assert_eq!(ContentHash::from_etag("\"abc-123\""), None);
    }

    #[test]
    fn git_blob_hash_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let dir = std::env::temp_dir().join(format!("taipan-hub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("hello");
        std::fs::write(&f, "hello\n").unwrap();
        let h = ContentHash::GitBlob("ce013625030ba8dba906f756967f9e9ca394464a".into());
        assert_eq!(h.of_file(&f).unwrap(), h.hex());
        let s = ContentHash::Sha256("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03".into());
        assert_eq!(s.of_file(&f).unwrap(), s.hex());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
