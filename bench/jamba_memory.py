"""Memory stays where the operator put it: `--kv-cache-mb` bounds attention blocks, recurrent-state
slots and saved states together.

1. Rounds of many concurrent long conversations on a small synthetic Jamba (fast enough to push
   ~128,000 prompt tokens per round on 2 cores) with a budget that holds only part of them at once:
   every request must end 200 (or 429 when the queue is full), and the server's RSS must stay
   within weights + budget + a fixed overhead, round after round.
2. One 32,000-token prompt on the 646 M synthetic Jamba in a 256 MiB budget: time to first token,
   beside llama-server on the same file.
Usage: bench/jamba_memory.py SMALL_GGUF BIG_GGUF LLAMA_SERVER_BINARY [conversations|long]"""
import json, os, re, sys, threading, time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jamba_serve import LlamaServer  # noqa: E402
from server import Server  # noqa: E402


def complete(base, prompt, max_tokens, stream=False, timeout=1800):
    """Returns (status, seconds to the first token)."""
    body = json.dumps({"model": "jamba-mini", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": stream}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            first = None
            for line in r:
                if first is None and (not stream or line.startswith(b"data: {")):
                    first = time.perf_counter() - t0
            return r.status, first
    except urllib.error.HTTPError as e:
        return e.code, None


def weights_mb(log):
    m = re.search(r"weights? (\d+) MB", log)
    return int(m.group(1)) if m else None


def conversations(small, budget_mb, clients, tokens, rounds):
    s = Server("--model", small, "--kv-cache-mb", str(budget_mb), "--max-queue", str(clients))
    try:
        rss = [s.rss_mb()]
        outcomes = {}
        for rnd in range(rounds):
            codes = []
            lock = threading.Lock()

            def client(c):
                # Each conversation its own ~`tokens`-token history (ids avoid tokenizer effects).
                prompt = [(c * 7919 + rnd * 104729 + i * 31) % 4000 + 10 for i in range(tokens)]
                code, _ = complete(s.base, prompt, 16)
                with lock:
                    codes.append(code)

            threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            for c in codes:
                outcomes[c] = outcomes.get(c, 0) + 1
            rss.append(s.rss_mb())
            print(f"round {rnd + 1}: {len(codes)} requests in {time.perf_counter() - t:.1f} s, statuses "
                  f"{sorted(set(codes))}, RSS {rss[-1]:.0f} MB", flush=True)
        running = s.metric("taipan_running_sequences")
        return rss, outcomes, running
    finally:
        s.stop()


def long_prompt(big, llama_server, n):
    prompt = [(i * 7919 + 100) % 4000 + 10 for i in range(n)]
    s = Server("--model", big, "--kv-cache-mb", "256")
    try:
        rss0 = s.rss_mb()
        code, ttft = complete(s.base, prompt, 8, stream=True)
        ours = (code, ttft, s.rss_mb() - rss0)
    finally:
        s.stop()
    p = LlamaServer(llama_server, big, 1, ctx=n + 64)
    try:
        code, ttft = complete(p.base, prompt, 8, stream=True)
        peer = (code, ttft)
    finally:
        p.stop()
    return ours, peer


def main():
    small, big, llama_server = sys.argv[1:4]
    only = sys.argv[4] if len(sys.argv) > 4 else None
    if only != "long":
        part_conversations(small)
    if only != "conversations":
        part_long(big, llama_server)


def part_conversations(small):
    print("## Conversations: 64 clients x ~2,000 tokens, 5 rounds, --kv-cache-mb 64 (small synthetic Jamba)\n", flush=True)
    rss, outcomes, running = conversations(small, 64, 64, 2000, 5)
    print(f"\nRSS MB: start {rss[0]:.0f}, after each round {', '.join(f'{x:.0f}' for x in rss[1:])}; "
          f"outcomes {outcomes}; running sequences after the load: {running:.0f}\n", flush=True)


def part_long(big, llama_server):
    print("## One 32,000-token prompt, 646 M synthetic Jamba, --kv-cache-mb 256\n", flush=True)
    ours, peer = long_prompt(big, llama_server, 32000)
    print(f"taipan: status {ours[0]}, time to first token {ours[1]:.1f} s, RSS growth {ours[2]:.0f} MB")
    print(f"llama-server: status {peer[0]}, time to first token {peer[1]:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
