"""Starts real `taipan serve` processes on the default model for the end-to-end tests."""
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("TAIPAN_BIN", ROOT / "target" / "release" / "taipan"))
KEY = "test-key-7f3a"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None, threads=2, wait=True):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(ROOT / "target" / f"e2e-server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        if wait:
            self.wait_ready()

    def wait_ready(self):
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited early, see {self.log.name}"
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def stop(self):
        """SIGTERM, as an orchestrator would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return -9
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    s = Server("--api-key", KEY, "--max-queue", "8")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="session")
def open_server():
    s = Server()
    yield s
    assert s.stop() == 0


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c
