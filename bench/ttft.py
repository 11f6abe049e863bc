"""Time to first token through `taipan serve` vs `taipan generate`'s own prefill + one decode step.

Starts a server on the default model (2 threads), sends streaming chat requests one at a time, and
times the first content chunk; then runs `taipan generate --stats` on the same message to get
the engine's own prefill time and decode step. Prints JSON with both and their ratio."""
import json, os, re, socket, statistics, subprocess, sys, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "taipan")
MESSAGE = "What is the capital of France?"
REPS = int(os.environ.get("REPS", "20"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    port = free_port()
    server = subprocess.Popen([BIN, "serve", "--port", str(port), "-t", "2"], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(base + "/health").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        body = json.dumps({"model": "jamba-mini", "messages": [{"role": "user", "content": MESSAGE}],
                           "max_tokens": 16, "temperature": 0, "stream": True}).encode()
        ttfts = []
        for i in range(REPS + 2):
            req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req) as r:
                for line in r:
                    if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                        ttfts.append(time.perf_counter() - t)
                        break
                r.read()
        ttfts = ttfts[2:]
    finally:
        server.terminate()
        server.wait()
    pre, step = [], []
    for _ in range(7):
        out = subprocess.run([BIN, "generate", "-t", "2", "-p", MESSAGE, "-n", "8", "--stats"],
                             capture_output=True, text=True, check=True).stderr
        m = re.search(r"in ([\d.]+) ms .*?\(([\d.]+) ms per decode step\)", out)
        pre.append(float(m.group(1)))
        step.append(float(m.group(2)))
    baseline = statistics.median(pre) + statistics.median(step)
    ttft = statistics.median(ttfts) * 1e3
    print(json.dumps({"ttft_ms_p50": round(ttft, 2), "ttft_ms_max": round(max(ttfts) * 1e3, 2),
                      "generate_prefill_ms": statistics.median(pre), "generate_decode_step_ms": statistics.median(step),
                      "baseline_ms": round(baseline, 2), "ratio": round(ttft / baseline, 3)}))


if __name__ == "__main__":
    sys.exit(main())
