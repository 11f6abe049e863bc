"""Prefix reuse for a hybrid model: the next turn of a conversation on a synthetic Jamba.

Builds (once) a synthetic Jamba GGUF of Jamba-1.5-Mini's proportions scaled to hidden 1024
(`taipan synth-jamba`, 646 M parameters, random Q8_0 weights, jamba-tiny-a's tokenizer), serves it,
and measures time to first token of turn 2 (a ~2,000-token history resent verbatim plus a new
user message) on a server that answered turn 1 against a fresh server; checks that both answer
the same at temperature 0 and reports how many prompt tokens turn 2 computed."""
import json, os, subprocess, sys, time
import urllib.request

from server import BIN, ROOT, FIXTURES, Server

MODEL = os.path.join(ROOT, "bench", "out", "synth-jamba.gguf")


def chat(server, messages, max_tokens=8):
    """Returns (time to first content chunk, full text)."""
    body = {"model": "jamba-mini", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    req = urllib.request.Request(server.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, text = None, ""
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {"):
                for c in json.loads(line[6:])["choices"]:
                    piece = c["delta"].get("content") or ""
                    if piece and ttft is None:
                        ttft = time.perf_counter() - t0
                    text += piece
    return ttft if ttft is not None else time.perf_counter() - t0, text


def main():
    os.makedirs(os.path.dirname(MODEL), exist_ok=True)
    if not os.path.exists(MODEL):
        subprocess.run([BIN, "synth-jamba", MODEL, "--tokenizer-from", os.path.join(FIXTURES, "jamba-tiny-a.gguf")], check=True)
    words = open(os.path.join(FIXTURES, "smollm2-llamacpp", "ppl_text.txt")).read().split()
    s = Server("-m", MODEL)
    try:
        # About 2,000 tokens of history.
        n = 1200
        while s.post("/tokenize", {"prompt": " ".join(words[:n])})["count"] < 2000:
            n += 100
        history = " ".join(words[:n])
        turn1 = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": history}]
        _, answer = chat(s, turn1)
        turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Summarise that in one line."}]
        prompt_before, hit_before = s.metric("taipan_prompt_tokens_total"), s.metric("taipan_prefix_cache_hit_tokens_total")
        warm_ttft, warm_text = chat(s, turn2)
        prompt2 = s.metric("taipan_prompt_tokens_total") - prompt_before
        hit2 = s.metric("taipan_prefix_cache_hit_tokens_total") - hit_before
    finally:
        s.stop()
    c = Server("-m", MODEL)
    try:
        cold_ttft, cold_text = chat(c, turn2)
    finally:
        c.stop()
    print(json.dumps({
        "model": "synthetic Jamba, hidden 1024, 8 layers, 16 experts top-2, 646 M parameters (Q8_0)",
        "turn2_prompt_tokens": int(prompt2), "turn2_tokens_from_saved_state": int(hit2),
        "turn2_tokens_computed": int(prompt2 - hit2),
        "cold_ttft_ms": round(cold_ttft * 1e3, 1), "warm_ttft_ms": round(warm_ttft * 1e3, 1),
        "speedup": round(cold_ttft / warm_ttft, 1), "same_answer": warm_text == cold_text,
    }, indent=1))


if __name__ == "__main__":
    sys.exit(main())
