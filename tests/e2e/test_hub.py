"""Models by Hub name, against a local stand-in for the Hub's file endpoints (HF_ENDPOINT):
fresh downloads into the standard cache layout, a download killed midway and resumed, a
checksum that does not match, a gated repository, and --offline."""
import hashlib
import http.server
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, Server, free_port

FIXTURES = ROOT / "tests" / "fixtures"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token"


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class StandInHub:
    """Serves `/api/models/{repo}/revision/{rev}` and `/{repo}/resolve/{rev}/{file}` as the Hub
    does: Range requests, X-Repo-Commit, and the content hash in X-Linked-Etag (LFS) or ETag."""

    def __init__(self, repos, gated=()):
        self.repos = repos  # repo -> {file name: bytes}
        self.gated = set(gated)
        self.requests = []  # (path, Range header)
        self.corrupt = set()  # (repo, file) served with one byte flipped, under the true hash
        self.stall_after = {}  # (repo, file) -> bytes sent before the response hangs
        self.release = threading.Event()
        self.sent = {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
                    return self.info("/".join(parts[2:4]))
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self.file("/".join(parts[:2]), "/".join(parts[4:]))
                self.reply(404, b'{"error":"not found"}')

            def allowed(self, repo):
                return repo not in hub.gated or self.headers.get("Authorization") == f"Bearer {TOKEN}"

            def reply(self, status, body, headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def info(self, repo):
                if repo not in hub.repos:
                    return self.reply(404, b'{"error":"Repository not found"}')
                if not self.allowed(repo):
                    return self.reply(401, b'{"error":"Access to this model is restricted"}')
                body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in hub.repos[repo]]}
                self.reply(200, json.dumps(body).encode(), [("Content-Type", "application/json")])

            def file(self, repo, name):
                data = hub.repos.get(repo, {}).get(name)
                if data is None:
                    return self.reply(404, b'{"error":"Entry not found"}')
                if not self.allowed(repo):
                    return self.reply(401, b'{"error":"Access to this model is restricted"}')
                lfs = name.endswith((".gguf", ".safetensors"))
                digest = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
                if (repo, name) in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start, end = 0, len(data) - 1
                rng = self.headers.get("Range")
                if rng:
                    a, _, b = rng.removeprefix("bytes=").partition("-")
                    start, end = int(a), (int(b) if b else len(data) - 1)
                body = data[start:end + 1]
                headers = [("X-Repo-Commit", COMMIT), ("ETag", f'"{digest}"'), ("Accept-Ranges", "bytes")]
                if lfs:
                    headers.append(("X-Linked-Etag", f'"{digest}"'))
                if rng:
                    headers.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
                self.send_response(206 if rng else 200)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                stall = hub.stall_after.get((repo, name))
                if stall is not None and len(body) > stall:
                    self.wfile.write(body[:stall])
                    self.wfile.flush()
                    hub.sent[(repo, name)] = stall
                    hub.release.wait(120)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.release.set()
        self.httpd.shutdown()


def read(path):
    return Path(path).read_bytes()


GGUF_REPO = "ai21labs/jamba-tiny-GGUF"
HF_REPO = "ai21labs/jamba-tiny"


@pytest.fixture
def hub():
    ckpt = FIXTURES / "jamba-tiny-a"
    h = StandInHub({
        GGUF_REPO: {
            "README.md": b"# jamba tiny\n",
            "jamba-tiny-a-Q8_0.gguf": read(FIXTURES / "jamba-tiny-a-q8_0.gguf"),
            "jamba-tiny-a-F32.gguf": read(FIXTURES / "jamba-tiny-a.gguf"),
        },
        HF_REPO: {**{f: read(ckpt / f) for f in
                     ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "model.safetensors", "README.md", "tokenizer.model")},
                  "chat_template.jinja": json.loads(read(ckpt / "tokenizer_config.json"))["chat_template"].encode()},
        "org/gated-GGUF": {"m-Q8_0.gguf": read(FIXTURES / "jamba-tiny-a-q8_0.gguf")},
    }, gated={"org/gated-GGUF"})
    yield h
    h.stop()


def env_for(hub, home, **extra):
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_TOKEN": "", "HF_HUB_OFFLINE": ""}
    env.update(extra)
    return env


def blob_dir(home, repo):
    return Path(home) / "hub" / f"models--{repo.replace('/', '--')}" / "blobs"


def log_of(server):
    server.log.flush()
    return Path(server.log.name).read_text()


def chat(server):
    r = httpx.post(server.base + "/v1/chat/completions", timeout=60,
                   json={"model": "jamba-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_gguf_by_hub_name_downloads_into_the_hub_cache_then_serves_offline(hub, tmp_path):
    s = Server("-m", f"{GGUF_REPO}:Q8_0", env=env_for(hub, tmp_path))
    try:
        names = [m["id"] for m in httpx.get(s.base + "/v1/models").json()["data"]]
        assert names[0] == GGUF_REPO
        chat(s)
        log = log_of(s)
        assert f"downloading {GGUF_REPO}/jamba-tiny-a-Q8_0.gguf" in log and "100.0%" in log
        assert "playground" in log and "ready in" in log
    finally:
        assert s.stop() == 0
    want = read(FIXTURES / "jamba-tiny-a-q8_0.gguf")
    blob = blob_dir(tmp_path, GGUF_REPO) / hashlib.sha256(want).hexdigest()
    assert read(blob) == want
    snapshot = blob.parents[1] / "snapshots" / COMMIT / "jamba-tiny-a-Q8_0.gguf"
    assert snapshot.resolve() == blob.resolve()
    assert (blob.parents[1] / "refs" / "main").read_text().strip() == COMMIT
    # The F32 file was not fetched: only what was asked for.
    assert not any("F32" in path for path, _ in hub.requests)
    # Offline, with the Hub gone: served from the cache.
    hub.requests.clear()
    s = Server("-m", f"{GGUF_REPO}:Q8_0", "--offline", env=env_for(hub, tmp_path, HF_ENDPOINT="http://127.0.0.1:9"))
    try:
        chat(s)
    finally:
        assert s.stop() == 0
    assert hub.requests == []


def test_a_safetensors_checkpoint_by_hub_name(hub, tmp_path):
    s = Server("-m", HF_REPO, env=env_for(hub, tmp_path))
    try:
        assert chat(s)["choices"][0]["message"]["role"] == "assistant"
    finally:
        assert s.stop() == 0
    fetched = {path.rsplit("/", 1)[-1] for path, rng in hub.requests if "/resolve/" in path}
    assert fetched == {"config.json", "chat_template.jinja", "generation_config.json", "tokenizer.json",
                       "tokenizer_config.json", "model.safetensors"}


def test_a_download_killed_midway_resumes_where_it_stopped(hub, tmp_path):
    name = "jamba-tiny-a-F32.gguf"
    want = read(FIXTURES / "jamba-tiny-a.gguf")
    cut = 2 << 20
    hub.stall_after[(GGUF_REPO, name)] = cut
    s = Server("-m", f"{GGUF_REPO}:{name}", env=env_for(hub, tmp_path), wait=False)
    part = blob_dir(tmp_path, GGUF_REPO) / (hashlib.sha256(want).hexdigest() + ".part")
    deadline = time.time() + 60
    while not (part.exists() and part.stat().st_size == cut):
        assert time.time() < deadline, "the download never reached the cut"
        time.sleep(0.1)
    s.proc.kill()
    s.proc.wait()
    del hub.stall_after[(GGUF_REPO, name)]
    hub.release.set()
    hub.requests.clear()
    s = Server("-m", f"{GGUF_REPO}:{name}", env=env_for(hub, tmp_path))
    try:
        chat(s)
        assert "resuming" in log_of(s)
    finally:
        assert s.stop() == 0
    ranges = [rng for path, rng in hub.requests if path.endswith(name)]
    assert f"bytes={cut}-" in ranges, ranges
    assert read(part.with_suffix("")) == want
    assert not part.exists()


def test_a_wrong_checksum_is_an_error_and_leaves_no_file_to_load(hub, tmp_path):
    hub.corrupt.add((GGUF_REPO, "jamba-tiny-a-Q8_0.gguf"))
    s = Server("-m", f"{GGUF_REPO}:Q8_0", env=env_for(hub, tmp_path), wait=False)
    assert s.proc.wait(timeout=60) == 1
    log = log_of(s)
    assert "checksum mismatch" in log and "jamba-tiny-a-Q8_0.gguf" in log and "removed" in log
    repo_dir = blob_dir(tmp_path, GGUF_REPO).parent
    leftovers = [p for p in repo_dir.rglob("*") if p.is_file() or p.is_symlink()]
    assert not [p for p in leftovers if p.suffix not in (".lock",) and p.parent.name != "refs"], leftovers
    # Offline, nothing is there to be used.
    s = Server("-m", f"{GGUF_REPO}:Q8_0", "--offline", env=env_for(hub, tmp_path), wait=False)
    assert s.proc.wait(timeout=60) == 1


def test_gated_repositories_need_hf_token_and_errors_name_what_is_missing(hub, tmp_path):
    s = Server("-m", "org/gated-GGUF:Q8_0", env=env_for(hub, tmp_path), wait=False)
    assert s.proc.wait(timeout=60) == 1
    assert "HF_TOKEN" in log_of(s)
    s = Server("-m", "org/gated-GGUF:Q8_0", env=env_for(hub, tmp_path, HF_TOKEN=TOKEN))
    try:
        chat(s)
    finally:
        assert s.stop() == 0
    s = Server("-m", f"{GGUF_REPO}:Q2_K", env=env_for(hub, tmp_path), wait=False)
    assert s.proc.wait(timeout=60) == 1
    log = log_of(s)
    assert "no GGUF file for quantization Q2_K" in log and "jamba-tiny-a-Q8_0.gguf" in log
    s = Server("-m", "nobody/nothing", env=env_for(hub, tmp_path), wait=False)
    assert s.proc.wait(timeout=60) == 1
    assert "nobody/nothing" in log_of(s)
    s = Server("-m", "nobody/nothing", "--offline", env=env_for(hub, tmp_path), wait=False)
    assert s.proc.wait(timeout=60) == 1
    assert "--offline forbids downloading" in log_of(s)
