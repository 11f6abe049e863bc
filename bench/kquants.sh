#!/usr/bin/env bash
# K-quant files side by side with llama.cpp, in one run: SmolLM2 re-quantized by llama.cpp's own
# quantizer (Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K; plus the Q4_1 default for reference) and, when
# present, Gemma 3 270M Q4_K_M (scripts/get-gemma3.sh). Per file: prefill 512 / decode 128 on
# 2 threads (taipan bench, llama-bench; the two interleaved per file), and taipan's resident
# size once a server has loaded it (weights + KV budget + fixed overhead) beside the file's size.
#
# Usage: bench/kquants.sh LLAMA_BIN_DIR [KV_MB]
#   LLAMA_BIN_DIR holds llama-bench and llama-quantize built from llama.cpp's sources (as in
#   bench/: the sources vendored in llama-cpp-python 0.3.36; on AMX machines build with clang,
#   see the performance spec).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:?usage: bench/kquants.sh LLAMA_BIN_DIR [KV_MB]}"
KV="${2:-64}"
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
MODELS="${TAIPAN_MODEL_DIR:-$HOME/.cache/taipan/models}"
BASE="$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT=bench/out
mkdir -p "$OUT"
cargo build --release --locked -p taipan >/dev/null
files=("$BASE")
for t in Q4_K_M Q5_K_M Q6_K Q3_K_M Q2_K; do
    f="$OUT/smollm2-$t.gguf"
    [ -f "$f" ] || "$BIN/llama-quantize" --allow-requantize "$BASE" "$f" "$t" 2 >/dev/null 2>&1
    files+=("$f")
done
[ -f "$MODELS/gemma-3-270m-q4_k_m.gguf" ] && files+=("$MODELS/gemma-3-270m-q4_k_m.gguf")

resident_mib() {
    ./target/release/taipan serve -m "$1" --port 8099 --kv-cache-mb "$KV" >/dev/null 2>&1 &
    local pid=$!
    for _ in $(seq 240); do curl -sf localhost:8099/health >/dev/null && break; sleep 0.5; done
    sleep 1
    awk '/VmRSS/{printf "%.1f", $2/1024}' "/proc/$pid/status"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB; KV budget $KV MiB"
echo
echo "| file | MiB | taipan prefill | llama.cpp prefill | ratio | taipan decode | llama.cpp decode | ratio | RSS MiB | (RSS − KV) / file |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for f in "${files[@]}"; do
    ours=$(./target/release/taipan bench -m "$f" -t 2 --prompt 512 --gen 128 --reps 3 --json 2>/dev/null) || ours='[null]'
    peer=$("$BIN/llama-bench" -m "$f" -t 2 -p 512 -n 128 -r 3 -o json 2>/dev/null)
    rss=0
    [ "$ours" != '[null]' ] && rss=$(resident_mib "$f")
    python3 - "$f" "$ours" "$peer" "$rss" "$KV" <<'PY'
import json, os, sys
f, ours, peer, rss, kv = sys.argv[1], json.loads(sys.argv[2])[0], json.loads(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
pp = next(r["avg_ts"] for r in peer if r["n_prompt"] > 0)
tg = next(r["avg_ts"] for r in peer if r["n_gen"] > 0)
mib = os.path.getsize(f) / 2**20
if ours is None:
    print(f"| {os.path.basename(f)} | {mib:.1f} | does not load | {pp:.1f} | | | {tg:.1f} | | | |")
    sys.exit(0)
print(f"| {os.path.basename(f)} | {mib:.1f} | {ours['prefill_tok_s']:.1f} | {pp:.1f} | {ours['prefill_tok_s']/pp:.2f}x "
      f"| {ours['decode_tok_s']:.1f} | {tg:.1f} | {ours['decode_tok_s']/tg:.2f}x | {rss:.1f} | {(rss - kv)/mib:.2f} |")
PY
done
