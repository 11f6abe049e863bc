#!/usr/bin/env python3
"""Writes tests/fixtures/families/: one tiny GGUF per Llama-family architecture taipan loads, with
random f32 weights (deterministic), and llama.cpp's answers on each file (family.json):
full-vocabulary log-probabilities at 12 greedy steps after a 24-token prompt (each step asked
for separately, with the sequence so far as its prompt), and the token ids of a few strings.

  llama3.gguf   `llama`, `llama-bpe` byte-level BPE, GQA, rope_freqs (Llama 3.1's RoPE factors)
  qwen2.gguf    `qwen2` pre-tokenizer, q/k/v biases, YaRN RoPE scaling
  qwen3.gguf    q/k RMSNorm per head, linear RoPE scaling, an untied output matrix
  gemma3.gguf   SentencePiece vocabulary, √hidden embedding scale, q/k norms, post-norms, GELU,
                8-position sliding window on two layers of every three (own RoPE base), head
                size × heads ≠ hidden, final logit soft-capping

Usage: bench/family_fixtures.py LLAMA_BIN_DIR   (llama-server built from llama.cpp's sources)
"""
import json, os, random, socket, struct, subprocess, sys, time, urllib.request

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "families")
ALIGN = 32
STRINGS = ["Hello world", "the cat sat on the mat", "don't 123456 stop", "  two  spaces\nnew line", "héllo ü"]

# GGUF value types.
U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_value(kind, v):
    if kind == U32:
        return struct.pack("<I", v)
    if kind == I32:
        return struct.pack("<i", v)
    if kind == F32:
        return struct.pack("<f", v)
    if kind == BOOL:
        return struct.pack("<?", v)
    if kind == STR:
        return gguf_string(v)
    if kind == U64:
        return struct.pack("<Q", v)
    raise ValueError(kind)


def write_gguf(path, metadata, tensors):
    """metadata: [(key, kind, value)] with kind (ARR, elem_kind) for arrays; tensors: [(name, dims, floats)]."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, kind, value in metadata:
        out += gguf_string(key)
        if isinstance(kind, tuple):
            out += struct.pack("<IIQ", ARR, kind[1], len(value))
            for v in value:
                out += gguf_value(kind[1], v)
        else:
            out += struct.pack("<I", kind) + gguf_value(kind, value)
    offset = 0
    blobs = []
    for name, dims, data in tensors:
        n = 1
        for d in dims:
            n *= d
        assert len(data) == n, name
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, offset)  # F32
        blob = struct.pack(f"<{n}f", *data)
        blobs.append(blob)
        offset += (len(blob) + ALIGN - 1) // ALIGN * ALIGN
    out += b"\0" * ((-len(out)) % ALIGN)
    for blob in blobs:
        out += blob + b"\0" * ((-len(blob)) % ALIGN)
    with open(path, "wb") as f:
        f.write(out)


def byte_level_alphabet():
    """GPT-2's byte-to-character map: printable bytes stand for themselves, the others shift up."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def bpe_vocab(specials):
    alphabet = byte_level_alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ s", "a t", "Ġ c", "o n", "e r", "Ġ m", "Ġs at", "Ġc at",
              "Ġm at", "Ġ o", "Ġo n", "l l", "e ll", "H ell", "Hell o", "o r", "Ġw or", "Ġ w", "Ġwor l", "Ġworl d",
              "1 2", "3 4", "5 6", "Ġ Ġ", "Ċ Ċ"]
    tokens = list(alphabet)
    for m in merges:
        a, b = m.split(" ")
        if a + b not in tokens:
            tokens.append(a + b)
    types = [1] * len(tokens)
    for s in specials:
        tokens.append(s)
        types.append(3)
    return tokens, types, merges


def spm_vocab():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 3]
    scores = [0.0] * len(tokens)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)
        scores.append(0.0)
    pieces = ["▁", "e", "t", "a", "o", "n", "s", "h", "l", "c", "m", "w", "r", "d", "H", "i", "▁t", "he", "▁the",
              "▁c", "▁ca", "▁cat", "▁s", "▁sa", "▁sat", "▁o", "▁on", "▁m", "▁ma", "▁mat", "ll", "ello", "Hello",
              "▁w", "▁wo", "▁wor", "▁worl", "▁world", "1", "2", "3", "12", "▁▁", "\n"]
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i))
    return tokens, types, scores


class Rand:
    def __init__(self, seed):
        self.r = random.Random(seed)

    def matrix(self, rows, cols, gain=1.0):
        scale = gain / cols ** 0.5
        return [self.r.uniform(-1.7, 1.7) * scale for _ in range(rows * cols)]

    def around(self, n, centre, spread):
        return [centre + self.r.uniform(-spread, spread) for _ in range(n)]


def family_file(name):
    r = Rand(sum(name.encode()) + 7)
    hidden, ff, layers = 64, 96, 4
    heads, kv_heads, head_dim = 4, 2, 16
    meta, tensors = [], []
    if name == "llama3":
        arch = "llama"
        tokens, types, merges = bpe_vocab(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
        meta += [("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "llama-bpe"),
                 ("tokenizer.ggml.tokens", (ARR, STR), tokens), ("tokenizer.ggml.token_type", (ARR, I32), types),
                 ("tokenizer.ggml.merges", (ARR, STR), merges),
                 ("tokenizer.ggml.bos_token_id", U32, len(tokens) - 3), ("tokenizer.ggml.eos_token_id", U32, len(tokens) - 2)]
        meta += [(f"{arch}.rope.freq_base", F32, 500000.0)]
    elif name in ("qwen2", "qwen3"):
        arch = name
        tokens, types, merges = bpe_vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        meta += [("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.pre", STR, "qwen2"),
                 ("tokenizer.ggml.tokens", (ARR, STR), tokens), ("tokenizer.ggml.token_type", (ARR, I32), types),
                 ("tokenizer.ggml.merges", (ARR, STR), merges),
                 ("tokenizer.ggml.bos_token_id", U32, len(tokens) - 3), ("tokenizer.ggml.eos_token_id", U32, len(tokens) - 3),
                 ("tokenizer.ggml.add_bos_token", BOOL, False)]
        meta += [(f"{arch}.rope.freq_base", F32, 1000000.0)]
        if name == "qwen2":
            meta += [(f"{arch}.rope.scaling.type", STR, "yarn"), (f"{arch}.rope.scaling.factor", F32, 4.0),
                     (f"{arch}.rope.scaling.original_context_length", U32, 32)]
        else:
            meta += [(f"{arch}.rope.scaling.type", STR, "linear"), (f"{arch}.rope.scaling.factor", F32, 2.0)]
    else:
        arch = "gemma3"
        layers, heads, kv_heads, head_dim = 6, 4, 2, 32
        tokens, types, scores = spm_vocab()
        meta += [("tokenizer.ggml.model", STR, "llama"), ("tokenizer.ggml.pre", STR, "default"),
                 ("tokenizer.ggml.tokens", (ARR, STR), tokens), ("tokenizer.ggml.scores", (ARR, F32), scores),
                 ("tokenizer.ggml.token_type", (ARR, I32), types),
                 ("tokenizer.ggml.bos_token_id", U32, 2), ("tokenizer.ggml.eos_token_id", U32, 1),
                 ("tokenizer.ggml.unknown_token_id", U32, 3), ("tokenizer.ggml.padding_token_id", U32, 0),
                 ("tokenizer.ggml.add_bos_token", BOOL, True), ("tokenizer.ggml.add_space_prefix", BOOL, False)]
        meta += [(f"{arch}.rope.freq_base", F32, 1000000.0), (f"{arch}.attention.sliding_window", U32, 8),
                 (f"{arch}.attention.sliding_window_pattern", U32, 3), (f"{arch}.final_logit_softcapping", F32, 10.0)]
    vocab = len(tokens)
    meta = [("general.architecture", STR, arch), ("general.name", STR, f"tiny-{name}"),
            (f"{arch}.context_length", U32, 128), (f"{arch}.embedding_length", U32, hidden),
            (f"{arch}.block_count", U32, layers), (f"{arch}.feed_forward_length", U32, ff),
            (f"{arch}.attention.head_count", U32, heads), (f"{arch}.attention.head_count_kv", U32, kv_heads),
            (f"{arch}.attention.key_length", U32, head_dim), (f"{arch}.attention.value_length", U32, head_dim),
            (f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-6)] + meta
    q, kv = heads * head_dim, kv_heads * head_dim
    emb_gain = 1.0 if arch != "gemma3" else 1.0 / hidden ** 0.5
    tensors.append(("token_embd.weight", [hidden, vocab], [x * emb_gain * hidden ** 0.5 for x in r.matrix(vocab, hidden)]))
    tensors.append(("output_norm.weight", [hidden], r.around(hidden, 1.0, 0.3)))
    if name == "qwen3":
        tensors.append(("output.weight", [hidden, vocab], r.matrix(vocab, hidden, 2.0)))
    if name == "llama3":
        tensors.append(("rope_freqs.weight", [head_dim // 2], [1.0 + (i % 4) * 2.0 for i in range(head_dim // 2)]))
    for i in range(layers):
        b = f"blk.{i}."
        tensors.append((b + "attn_norm.weight", [hidden], r.around(hidden, 1.0, 0.3)))
        tensors.append((b + "attn_q.weight", [hidden, q], r.matrix(q, hidden, 2.0)))
        tensors.append((b + "attn_k.weight", [hidden, kv], r.matrix(kv, hidden, 2.0)))
        tensors.append((b + "attn_v.weight", [hidden, kv], r.matrix(kv, hidden)))
        if name == "qwen2":
            tensors.append((b + "attn_q.bias", [q], r.around(q, 0.0, 0.5)))
            tensors.append((b + "attn_k.bias", [kv], r.around(kv, 0.0, 0.5)))
            tensors.append((b + "attn_v.bias", [kv], r.around(kv, 0.0, 0.5)))
        if name in ("qwen3", "gemma3"):
            tensors.append((b + "attn_q_norm.weight", [head_dim], r.around(head_dim, 1.0, 0.3)))
            tensors.append((b + "attn_k_norm.weight", [head_dim], r.around(head_dim, 1.0, 0.3)))
        tensors.append((b + "attn_output.weight", [q, hidden], r.matrix(hidden, q)))
        tensors.append((b + "ffn_norm.weight", [hidden], r.around(hidden, 1.0, 0.3)))
        tensors.append((b + "ffn_gate.weight", [hidden, ff], r.matrix(ff, hidden, 2.0)))
        tensors.append((b + "ffn_up.weight", [hidden, ff], r.matrix(ff, hidden)))
        tensors.append((b + "ffn_down.weight", [ff, hidden], r.matrix(hidden, ff)))
        if name == "gemma3":
            tensors.append((b + "post_attention_norm.weight", [hidden], r.around(hidden, 1.0, 0.3)))
            tensors.append((b + "post_ffw_norm.weight", [hidden], r.around(hidden, 1.0, 0.3)))
    path = os.path.join(OUT, f"{name}.gguf")
    write_gguf(path, meta, tensors)
    return path, vocab


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def llama_cpp_answers(bin_dir, path, vocab):
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(path + ".server.log", "w")
    server = subprocess.Popen([os.path.join(bin_dir, "llama-server"), "-m", path, "--port", str(port), "-t", "2",
                               "-c", "128", "-np", "1", "--no-warmup"], env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert server.poll() is None, f"llama-server exited, see {log.name}"
            try:
                if urllib.request.urlopen(base + "/health").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        rng = random.Random(99)
        prompt = [rng.randrange(3, vocab - 3) for _ in range(24)]
        # One request per step, the sequence so far as the prompt: llama-server drops the
        # probabilities of a token that leaves incomplete UTF-8 at the end of its text (it holds
        # the text back), which would put a multi-token answer's probabilities out of step with
        # its tokens. Such a step is recorded as null (its token is still fed on).
        steps, output = [], []
        for _ in range(12):
            r = post(base, "/completion", {"prompt": prompt + output, "n_predict": 1, "temperature": 0,
                                           "n_probs": vocab, "cache_prompt": False, "return_tokens": True,
                                           "samplers": ["top_k"], "top_k": 1})
            (token,) = r["tokens"]
            output.append(token)
            if not r.get("completion_probabilities"):
                steps.append(None)
                continue
            (st,) = r["completion_probabilities"]
            lp = [None] * vocab
            for t in st["top_logprobs"]:
                lp[t["id"]] = t["logprob"]
            assert all(v is not None for v in lp), "llama-server returned fewer than n_vocab probabilities"
            assert token == max(range(vocab), key=lambda i: lp[i]), "greedy token is not the most probable"
            steps.append(lp)
        tokenized = [{"text": s, "ids": post(base, "/tokenize", {"content": s, "add_special": False,
                                                                    "parse_special": False})["tokens"]} for s in STRINGS]
        return {"prompt_ids": prompt, "output_ids": output, "logprobs": steps, "tokenize": tokenized}
    finally:
        server.terminate()
        server.wait()
        log.close()
        os.unlink(log.name)


def main():
    bin_dir = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    for name in ["llama3", "qwen2", "qwen3", "gemma3"]:
        path, vocab = family_file(name)
        answers = llama_cpp_answers(bin_dir, path, vocab)
        answers["generator"] = "bench/family_fixtures.py: llama-server /completion (temperature 0, n_probs = vocabulary) and /tokenize; llama.cpp from llama-cpp-python 0.3.36"
        with open(os.path.join(OUT, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(answers, f, ensure_ascii=False)
            f.write("\n")
        held = sum(1 for st in answers["logprobs"] if st is None)
        print(name, os.path.getsize(path), "bytes; greedy", answers["output_ids"], f"({held} steps without probabilities)")


if __name__ == "__main__":
    main()
