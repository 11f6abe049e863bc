#!/usr/bin/env python3
"""Writes tests/fixtures/gemma3-llamacpp/greedy.json: llama.cpp's greedy continuations of 8 prompts
on Gemma 3 270M Q4_K_M, with the top-2 log-probabilities of every generated step (so that a test
can stop comparing at the first near-tie, where rounding may rightly pick the other token); and
perplexity.json: llama-perplexity's figures on the SmolLM2 fixture text at contexts 256 and 512.

Prompts are sent as token ids (BOS first, Gemma turn markers as their special ids) to llama-server's
/completion with temperature 0, so the comparison does not depend on either side's template code.

Usage: bench/gemma3_greedy.py LLAMA_BIN_DIR [GGUF]
"""
import hashlib, json, os, socket, subprocess, sys, time, urllib.request

PROMPTS = [
    ("chat", "What is the capital of France? Answer in one sentence."),
    ("chat", "Write a haiku about the sea."),
    ("chat", "List three primary colors."),
    ("chat", "Translate 'good morning' into Spanish."),
    ("raw", "The quick brown fox"),
    ("raw", "def fibonacci(n):\n    "),
    ("raw", "Once upon a time, in a small village by the mountains,"),
    ("raw", "1, 2, 3, 4, 5,"),
]
GENERATE = 32
# llama.cpp's figures move with its build (its kernels' activation rounding): say where they came
# from (the peer built as bench/kquants.sh describes: clang-16, GGML_NATIVE).
CPUINFO = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
BUILD = ("llama.cpp from llama-cpp-python 0.3.36, clang-16, GGML_NATIVE; recorded on "
         + next((l.split(":", 1)[1].strip() for l in CPUINFO.splitlines() if l.startswith("model name")), "an unknown CPU")
         + (" with AMX" if " amx_int8" in CPUINFO else ""))


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def perplexities(bin_dir, model, env):
    text = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "smollm2-llamacpp", "ppl_text.txt")
    out = {}
    for ctx in (256, 512):
        log = subprocess.run([os.path.join(bin_dir, "llama-perplexity"), "-m", model, "-f", text, "-c", str(ctx),
                              "-b", str(ctx), "-t", "2"], env=env, capture_output=True, text=True, check=True)
        line = [l for l in (log.stdout + log.stderr).splitlines() if "Final estimate: PPL" in l][-1]
        out[str(ctx)] = float(line.split("PPL = ")[1].split()[0])
        print(f"llama-perplexity ctx {ctx}: {out[str(ctx)]}")
    return out


def main():
    bin_dir = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser("~/.cache/taipan/models/gemma-3-270m-q4_k_m.gguf")
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [os.path.join(bin_dir, "llama-server"), "-m", model, "--port", str(port), "-t", "2", "-c", "2048",
         "-np", "1", "--no-warmup"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(base + "/health").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        cases = []
        for kind, text in PROMPTS:
            prompt = f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n" if kind == "chat" else text
            ids = [2] + post(base, "/tokenize", {"content": prompt, "add_special": False, "parse_special": True})["tokens"]
            r = post(base, "/completion", {
                "prompt": ids, "n_predict": GENERATE, "temperature": 0, "n_probs": 2, "cache_prompt": False,
                "return_tokens": True, "samplers": ["top_k"], "top_k": 1,
            })
            steps = r["completion_probabilities"]
            cases.append({
                "kind": kind,
                "text": text,
                "prompt_ids": ids,
                "output_ids": r["tokens"],
                "top2_logprobs": [[t["logprob"] for t in st["top_logprobs"][:2]] for st in steps],
                "top2_ids": [[t["id"] for t in st["top_logprobs"][:2]] for st in steps],
            })
            print(kind, repr(text), "->", repr(r["content"][:80]))
    finally:
        server.terminate()
        server.wait()
    digest = hashlib.sha256(open(model, "rb").read()).hexdigest()
    out = {
        "model": os.path.basename(model),
        "model_sha256": digest,
        "generator": "llama-server /completion, temperature 0, n_probs 2, 2 threads; " + BUILD,
        "generate": GENERATE,
        "cases": cases,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gemma3-llamacpp", "greedy.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {path}")
    ppl = {
        "model": os.path.basename(model),
        "model_sha256": digest,
        "text": "tests/fixtures/smollm2-llamacpp/ppl_text.txt",
        "generator": "llama-perplexity -c CTX -b CTX -t 2 (defaults otherwise); " + BUILD,
        "ppl_by_context": perplexities(bin_dir, model, env),
    }
    path = os.path.join(os.path.dirname(path), "perplexity.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(ppl, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
