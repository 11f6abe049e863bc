"""A `taipan serve` process on a free loopback port, for the benchmark scripts in this folder."""
import json, os, re, socket, subprocess, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "taipan")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """Starts `taipan serve ARGS` (2 threads) and waits until /health answers 200."""

    def __init__(self, *args):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([BIN, "serve", "--port", str(self.port), "-t", "2", *args], stderr=subprocess.DEVNULL)
        for _ in range(1200):
            try:
                if urllib.request.urlopen(self.base + "/health").status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server not ready")

    def post(self, path, body):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def metric(self, name):
        text = urllib.request.urlopen(self.base + "/metrics").read().decode()
        return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))

    def rss_mb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
