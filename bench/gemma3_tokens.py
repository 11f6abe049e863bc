#!/usr/bin/env python3
"""Writes tests/fixtures/gemma3-llamacpp/tokenize.json: llama.cpp's token ids for a fixed set of
strings (unicode, whitespace runs, digits, code, special-token text) on Gemma 3 270M Q4_K_M, both
with special-token text parsed and as plain text, no BOS.

Usage: bench/gemma3_tokens.py LLAMA_BIN_DIR [GGUF]   (llama-tokenize built from llama.cpp's sources)
"""
import hashlib, json, os, subprocess, sys, tempfile

CASES = [
    "Hello world", " Hello  world ", "The quick brown fox jumps over the lazy dog.", "1234567890 3.14159",
    "naïve café résumé", "日本語のテキスト", "emoji 🙂👍🏽 test", "def foo(x):\n    return x * 2\n",
    "\t\ttabs\tand\nnewlines\n\n", "   leading spaces", "trailing spaces   ", "ALLCAPS and MiXeD",
    "e-mail: someone@example.com", "URL https://example.org/a?b=c&d=e", "Привет, мир!", "مرحبا بالعالم",
    "x" * 40, "a  b   c    d", "<start_of_turn>user\nhi<end_of_turn>", "\u00a0nbsp\u2009thin", "Ünïcödé ßtraße",
    "1,000,000.00", "[{\"k\": [1, 2, 3]}]", "----====----", "…“quotes”…", "don't won't it's", "αβγ δεζ",
    "한국어 텍스트", "C++ && Rust || Go", "\r\nwindows\r\nlines", "", " ", "\n", "<0x41> is not a byte token",
]


def ids(binary, model, text, parse_special):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text)
    try:
        args = [binary, "-m", model, "-f", f.name, "--ids", "--no-bos", "--log-disable"]
        if not parse_special:
            args.append("--no-parse-special")
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        return json.loads([line for line in out.splitlines() if line.startswith("[")][-1])
    finally:
        os.unlink(f.name)


def main():
    bin_dir = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser("~/.cache/taipan/models/gemma-3-270m-q4_k_m.gguf")
    os.environ["LD_LIBRARY_PATH"] = bin_dir + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    binary = os.path.join(bin_dir, "llama-tokenize")
    digest = hashlib.sha256(open(model, "rb").read()).hexdigest()
    cases = [
        {"text": t, "ids_plain": ids(binary, model, t, False), "ids_parse_special": ids(binary, model, t, True)}
        for t in CASES
    ]
    out = {
        "model": os.path.basename(model),
        "model_sha256": digest,
        "generator": "llama-tokenize --ids --no-bos (and --no-parse-special for ids_plain), llama.cpp from llama-cpp-python 0.3.36",
        "cases": cases,
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gemma3-llamacpp", "tokenize.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
