"""Load benchmark of `taipan serve`: closed-loop streaming clients.

Starts a server on the default model (2 threads) and measures, for each concurrency level, the
aggregate generated tok/s, time to first token and inter-token latency percentiles (128 tokens per
answer), then: resident memory across a 500-request run, time to first token for a prompt sharing
a 1,000-token prefix with an earlier one vs a cold prompt of the same length, and an overload of
200 simultaneous requests against a queue of 8. Also runs `taipan bench` for the single-stream
decode rate in the same run. Prints a markdown report."""
import json, os, re, statistics, subprocess, sys, threading, time
import urllib.error
import urllib.request

from server import BIN, FIXTURES, Server

TEXT = open(os.path.join(FIXTURES, "smollm2-llamacpp", "ppl_text.txt")).read()
WORDS = TEXT.split()


def stream(base, content, max_tokens, ignore_eos=True):
    """One streaming request; returns (status, [arrival times of content chunks], start time)."""
    body = json.dumps({"model": "jamba-mini", "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": ignore_eos}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times = []
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    times.append(time.perf_counter())
        return 200, times, t0
    except urllib.error.HTTPError as e:
        return e.code, times, t0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * p)))] if xs else float("nan")


def prompt(i):
    start = (i * 37) % (len(WORDS) - 40)
    return "Continue this text: " + " ".join(WORDS[start:start + 25])


def level(base, clients, per_client, max_tokens=128):
    ttft, itl, tokens = [], [], [0]
    lock = threading.Lock()

    def client(c):
        for k in range(per_client):
            status, times, t0 = stream(base, prompt(c * 100 + k), max_tokens)
            assert status == 200, status
            with lock:
                ttft.append(times[0] - t0)
                itl.extend(b - a for a, b in zip(times, times[1:]))
                tokens[0] += len(times)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return {"clients": clients, "requests": clients * per_client, "tok_s": tokens[0] / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95), "itl_p50": pct(itl, 0.5), "itl_p95": pct(itl, 0.95)}


def main():
    bench = json.loads(subprocess.run([BIN, "bench", "-t", "2", "--prompt", "64", "--gen", "128", "--reps", "3", "--json"],
                                      capture_output=True, text=True, check=True).stdout)[0]
    single = bench["decode_tok_s"]
    s = Server()
    try:
        rows = []
        for clients, per in [(1, 3), (4, 2), (8, 2), (16, 2), (32, 1)]:
            rows.append(level(s.base, clients, per))
            rows[-1]["rss_mb"] = s.rss_mb()
        print(f"single-stream decode (taipan bench, 2 threads): {single:.1f} tok/s\n")
        print("| clients | requests | aggregate tok/s | x single stream | TTFT p50 | TTFT p95 | inter-token p50 | inter-token p95 | server RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['tok_s'] / single:.2f} | {r['ttft_p50'] * 1e3:.0f} ms | "
                  f"{r['ttft_p95'] * 1e3:.0f} ms | {r['itl_p50'] * 1e3:.1f} ms | {r['itl_p95'] * 1e3:.1f} ms | {r['rss_mb']:.0f} |")
        # Memory across 500 requests at 16 clients.
        rss = [s.rss_mb()]
        for _ in range(5):
            level(s.base, 16, 100 // 16 + 1, max_tokens=16)
            rss.append(s.rss_mb())
        print(f"\nRSS over 5 rounds of ~100 requests (16 clients, 16 tokens each): {', '.join(f'{x:.0f}' for x in rss)} MB")
    finally:
        s.stop()
    # Prefix reuse: a fresh server so nothing else is cached.
    s = Server()
    try:
        history = " ".join(WORDS[:800])
        cold = []
        for i in range(3):
            _, times, t0 = stream(s.base, f"{i} " + " ".join(WORDS[200 + i * 3:1000 + i * 3]) + " Summarise.", 1)
            cold.append(times[0] - t0)
        stream(s.base, history + " First question: what is this about?", 1)
        warm = []
        for q in ["Second question: who wrote it?", "Third question: is it long?", "Fourth: give a title."]:
            _, times, t0 = stream(s.base, history + " " + q, 1)
            warm.append(times[0] - t0)
        metrics = urllib.request.urlopen(s.base + "/metrics").read().decode()
        hit_rate = float(re.search(r"^taipan_prefix_cache_hit_rate (\S+)", metrics, re.M).group(1))
        print(f"\nshared ~1,000-token prefix: cold TTFT median {statistics.median(cold) * 1e3:.0f} ms, "
              f"warm TTFT median {statistics.median(warm) * 1e3:.0f} ms, ratio {statistics.median(cold) / statistics.median(warm):.1f}x "
              f"(prefix cache hit rate {hit_rate:.2f})")
    finally:
        s.stop()
    # Overload: 200 simultaneous requests against a queue of 8.
    s = Server("--max-queue", "8")
    try:
        codes, retry = [], []
        lock = threading.Lock()
        rss0 = s.rss_mb()

        def hit(i):
            body = json.dumps({"model": "jamba-mini", "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": 16}).encode()
            req = urllib.request.Request(s.base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    r.read()
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
                with lock:
                    retry.append(e.headers.get("Retry-After"))
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=hit, args=(i,)) for i in range(200)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        counts = {c: codes.count(c) for c in sorted(set(codes))}
        print(f"\noverload, 200 simultaneous requests, queue 8: status counts {counts}, "
              f"every 429 has Retry-After: {all(r is not None for r in retry)}, RSS {rss0:.0f} -> {s.rss_mb():.0f} MB, "
              f"server alive: {s.proc.poll() is None}")
    finally:
        s.stop()


if __name__ == "__main__":
    sys.exit(main())
