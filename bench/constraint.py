"""Cost of constrained decoding on the default model: decode speed (the engine's own inter-token
latency, from /metrics) of the same prompt free and under a grammar, in the same run.

    python3 bench/constraint.py [--runs 5] [--tokens 256] [--clients 1]

Cases (each constrained one is compared with the free case of the same prompt length):
  free          no constraint (ignore_eos so that it runs the whole budget)
  free+tools    the same with the two tools in the prompt and tool_choice auto (no call starts, so
                no constraint applies): the baseline of tool-call
  json-string   json_schema {"text": string}: the mask is computed every token, and the long string
                keeps almost the whole vocabulary open (the closing steer ends it at the budget)
  json-object   json_object: free-form keys and values
  tool-call     tool_choice=required with two tools (forced tags, names and argument schemas)
Constrained answers may end before the budget; rates count the tokens they produced.
"""
import argparse, concurrent.futures, json, statistics, time

from server import Server

PROMPT = "Write a long story about a dragon who learns to cook."
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object", "properties": {
        "expression": {"type": "string"}}, "required": ["expression"]}}},
]
CASES = {
    "free": {"ignore_eos": True},
    "free+tools": {"ignore_eos": True, "tools": TOOLS, "tool_choice": "auto"},
    "json-string": {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}},
    "json-object": {"response_format": {"type": "json_object"}},
    "tool-call": {"tools": TOOLS, "tool_choice": "required"},
}


def answer_tokens(s, extra, tokens):
    body = {"model": "jamba-mini", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": tokens, **extra}
    return s.post("/v1/chat/completions", body)["usage"]["completion_tokens"]


def decode_rate(s, extra, tokens, clients):
    """Tokens per answer and tokens per second per sequence, from the inter-token latency histogram."""
    name = "taipan_inter_token_latency_seconds"
    before = [s.metric(m) for m in (name + "_sum", name + "_count", "taipan_constraint_microseconds_total",
                                    "taipan_constrained_tokens_total")]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(lambda _: answer_tokens(s, extra, tokens), range(clients)))
    after = [s.metric(m) for m in (name + "_sum", name + "_count", "taipan_constraint_microseconds_total",
                                   "taipan_constrained_tokens_total")]
    t, n, mask_us, masked = (a - b for a, b in zip(after, before))
    return statistics.mean(got), n / t, mask_us / max(masked, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--clients", type=int, default=1)
    a = ap.parse_args()
    s = Server()
    try:
        for extra in CASES.values():  # warm up: pages, the grammar compiler's trie
            answer_tokens(s, extra, 16)
        results = {name: [] for name in CASES}
        for _ in range(a.runs):
            for name, extra in CASES.items():  # interleaved, so drift hits every case alike
                results[name].append(decode_rate(s, extra, a.tokens, a.clients))
        rate_of = {name: statistics.median(r[1] for r in rs) for name, rs in results.items()}
        print(f"clients {a.clients}, budget {a.tokens} tokens, {a.runs} runs, medians; decode rate per sequence")
        for name, rs in results.items():
            rate = rate_of[name]
            base = rate_of["free+tools" if name == "tool-call" else "free"]
            toks = statistics.median(r[0] for r in rs)
            mask = statistics.median(r[2] for r in rs)
            # Masks of all sequences are computed one after another within each step.
            share = mask * 1e-6 * rate * a.clients
            print(f"{name:12s} {toks:6.0f} tokens/answer  {rate:7.1f} tok/s  {rate / base:5.3f} x its free case  "
                  f"mask {mask:6.1f} us/token = {100 * share:4.1f}% of decode time")
    finally:
        s.stop()


if __name__ == "__main__":
    main()
