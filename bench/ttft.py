"""Time to first token through `taipan serve` vs the engine's own prefill + one decode step.

Starts a server on the default model (2 threads), sends streaming chat requests one at a time, and
times the first content chunk; then measures, warm, the engine's prefill of the same number of
prompt tokens and one decode step (`taipan bench`). Prints JSON with both and their ratio."""
import json, os, re, statistics, subprocess, sys, time
import urllib.request

from server import BIN, Server

MESSAGE = "What is the capital of France?"
REPS = int(os.environ.get("REPS", "20"))


def main():
    server = Server()
    base = server.base
    try:
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
        server.stop()
    # The engine's own cost, warm (median over repetitions after a warm-up): prefill of the same
    # number of prompt tokens plus one decode step.
    n_prompt = int(re.search(r"prompt (\d+) tokens", subprocess.run(
        [BIN, "generate", "-t", "2", "-p", MESSAGE, "-n", "1", "--stats"], capture_output=True, text=True, check=True).stderr).group(1))
    r = json.loads(subprocess.run([BIN, "bench", "-t", "2", "--prompt", str(n_prompt), "--gen", "32", "--reps", "7", "--json"],
                                  capture_output=True, text=True, check=True).stdout)[0]
    pre = [1e3 * n_prompt / r["prefill_tok_s"]]
    step = [1e3 / r["decode_tok_s"]]
    baseline = statistics.median(pre) + statistics.median(step)
    ttft = statistics.median(ttfts) * 1e3
    print(json.dumps({"ttft_ms_p50": round(ttft, 2), "ttft_ms_max": round(max(ttfts) * 1e3, 2),
                      "prompt_tokens": n_prompt, "engine_prefill_ms": round(pre[0], 2), "engine_decode_step_ms": round(step[0], 2),
                      "baseline_ms": round(baseline, 2), "ratio": round(ttft / baseline, 3)}))


if __name__ == "__main__":
    sys.exit(main())
