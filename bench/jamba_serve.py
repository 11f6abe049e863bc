"""Serving the synthetic Jamba to many clients: `taipan serve` vs `llama-server`, side by side.

Both servers get the same GGUF (`taipan synth-jamba`), 2 threads, and the same closed-loop
workload: N streaming clients, each sending ROUNDS requests of ~40-token prompts for 128 tokens
(`ignore_eos`) to `/v1/completions`. Reports aggregate generated tok/s (tokens as each server's
final `usage` counts them: a token whose text is held back, e.g. part of a UTF-8 character,
streams no text of its own, so counting text chunks would undercount by a few percent, unequally
between servers), time to first token and inter-token latency (between text chunks), plus
taipan's own single-stream decode (`taipan bench`, same run).
Usage: bench/jamba_serve.py GGUF LLAMA_SERVER_BINARY [--clients 16] [--rounds 2] [--peer-args=ARGS]
(`--peer-args=--no-repack`: llama-server's AMX build crashed with 16 Jamba sequences at once on
2026-12-02; without weight repacking it runs, on its AVX-512 kernels.)"""
import argparse, json, os, statistics, subprocess, sys, threading, time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import BIN, Server, free_port  # noqa: E402

WORDS = ("the model reads every weight once per step so many streams share the cost of one "
         "pass while each keeps its own recurrent state and its own attention blocks").split()


def prompt(i):
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(36))


def stream(base, text, max_tokens):
    body = json.dumps({"model": "jamba-mini", "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times, generated = [], None
    with urllib.request.urlopen(req, timeout=900) as r:
        for line in r:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    generated = chunk["usage"]["completion_tokens"]
    return times, t0, len(times) if generated is None else generated


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * p)))] if xs else float("nan")


def load(base, clients, rounds, max_tokens=128):
    ttft, itl, tokens = [], [], [0]
    lock = threading.Lock()

    def client(c):
        for k in range(rounds):
            times, t0, generated = stream(base, prompt(c * 31 + k), max_tokens)
            with lock:
                ttft.append(times[0] - t0)
                itl.extend(b - a for a, b in zip(times, times[1:]))
                tokens[0] += generated

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return {"clients": clients, "tok_s": tokens[0] / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "itl_p50": pct(itl, 0.5)}


class LlamaServer:
    def __init__(self, binary, model, slots, ctx=None, extra=()):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([binary, "-m", model, "-t", "2", "-tb", "2", "-np", str(slots), "-c", str(ctx or slots * 512),
                                      "--cont-batching", "--port", str(self.port), "--host", "127.0.0.1", *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(1200):
            try:
                if urllib.request.urlopen(self.base + "/health").status == 200:
                    return
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("llama-server not ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def row(name, r):
    return (f"| {name} | {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p95'] * 1e3:.0f} ms | "
            f"{r['itl_p50'] * 1e3:.1f} ms |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("llama_server")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peer-args", default="", help="extra llama-server arguments")
    a = ap.parse_args()
    bench = json.loads(subprocess.run([BIN, "bench", "-m", a.model, "-t", "2", "--prompt", "64", "--gen", "128", "--reps", "2",
                                       "--json", "--batch", str(a.clients)], capture_output=True, text=True, check=True).stdout)[0]
    rows = []
    s = Server("--model", a.model)
    try:
        load(s.base, 1, 1, 8)  # warm-up
        ours1 = load(s.base, 1, 2)
        ours = load(s.base, a.clients, a.rounds)
        rows += [row("taipan", ours1), row("taipan", ours)]
    finally:
        s.stop()
    p = LlamaServer(a.llama_server, a.model, a.clients, extra=a.peer_args.split())
    try:
        load(p.base, 1, 1, 8)
        peer1 = load(p.base, 1, 2)
        peer = load(p.base, a.clients, a.rounds)
        rows += [row("llama-server", peer1), row("llama-server", peer)]
    finally:
        p.stop()
    print(f"model: {a.model}; {os.cpu_count()} cores; 2 threads each; {a.clients} clients x {a.rounds} requests x 128 tokens"
          + (f"; llama-server {a.peer_args}" if a.peer_args else "") + "\n")
    print("| server | clients | aggregate tok/s | TTFT p50 | TTFT p95 | inter-token p50 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    single = bench["decode_tok_s"]
    b = bench["batch"]
    print(f"\ntaipan single-stream decode (taipan bench): {single:.1f} tok/s; batched decode of {b['sequences']} sequences "
          f"in one process: {b['decode_tok_s']:.1f} tok/s, {b['step_ms']:.1f} ms per step: "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in b["step_breakdown"].items()))
    print(f"\n**taipan / llama-server at {a.clients} clients: {ours['tok_s'] / peer['tok_s']:.2f}x**; "
          f"taipan {a.clients} clients / its single-stream decode: {ours['tok_s'] / single:.2f}x; "
          f"/ its own 1-client server rate: {ours['tok_s'] / ours1['tok_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
