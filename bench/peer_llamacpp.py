"""llama.cpp (through llama-cpp-python) on the same GGUF, measured like `taipan bench`:
prefill of a P-token prompt from an empty cache, and G single-token decode steps from an empty
cache (llama-bench's pp/tg), median over repetitions after one warm-up. Prints JSON."""
import argparse, json, statistics, sys, time

import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=a.prompt + a.gen + 8, n_batch=512, n_ubatch=512,
                          n_threads=a.threads, n_threads_batch=a.threads, logits_all=False, verbose=False)
    vocab = llm.n_vocab()
    prompt = [(i * 7919 + 100) % vocab for i in range(a.prompt)]
    pre, dec = [], []
    for rep in range(a.reps + 1):
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t = time.perf_counter()
        llm.eval(prompt)
        p = time.perf_counter() - t
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        tok = (rep * 31 + 5) % vocab
        t = time.perf_counter()
        for _ in range(a.gen):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        d = time.perf_counter() - t
        if rep > 0:
            pre.append(a.prompt / p)
            dec.append(a.gen / d)
    print(json.dumps({"engine": "llama.cpp (llama-cpp-python %s)" % llama_cpp.__version__, "threads": a.threads,
                      "prompt_tokens": a.prompt, "gen_tokens": a.gen,
                      "prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec)}))


if __name__ == "__main__":
    sys.exit(main())
