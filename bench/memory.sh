#!/usr/bin/env bash
# Resident memory once a server has loaded a model, beside the file's size: taipan (with a KV
# budget, allocated and touched at start-up) and llama-server (context 512), for the default
# model, llama.cpp's re-quantizations of it (bench/kquants.sh makes them) and Gemma 3 when present.
# taipan is measured twice: ready, and after one JSON-mode request (the grammar index and the
# step's scratch buffers in use).
#
# Usage: bench/memory.sh LLAMA_BIN_DIR [KV_MB]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:?usage: bench/memory.sh LLAMA_BIN_DIR [KV_MB]}"
KV="${2:-64}"
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
MODELS="${TAIPAN_MODEL_DIR:-$HOME/.cache/taipan/models}"
cargo build --release --locked -p taipan >/dev/null 2>&1
files=("$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf")
for t in Q4_K_M Q5_K_M Q6_K Q3_K_M Q2_K; do
    [ -f "bench/out/smollm2-$t.gguf" ] && files+=("bench/out/smollm2-$t.gguf")
done
[ -f "$MODELS/gemma-3-270m-q4_k_m.gguf" ] && files+=("$MODELS/gemma-3-270m-q4_k_m.gguf")

rss() { awk '/VmRSS/{printf "%.1f", $2/1024}' "/proc/$1/status"; }
wait_health() { for _ in $(seq 240); do curl -sf "localhost:$1/health" >/dev/null && return; sleep 0.25; done; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); taipan KV budget $KV MiB"
echo
echo "| file | MiB | taipan ready | (ready − KV) / file | after a JSON request | llama-server (-c 512) | llama-server / file |"
echo "|---|---|---|---|---|---|---|"
for f in "${files[@]}"; do
    log=$(mktemp)
    ./target/release/taipan serve -m "$f" --port 8099 --kv-cache-mb "$KV" >"$log" 2>&1 &
    pid=$!
    # Ready: the summary is printed once the grammar index is built and freed heap returned.
    for _ in $(seq 480); do grep -q "taipan: ready in" "$log" && break; sleep 0.25; done
    rm -f "$log"
    sleep 1
    ready=$(rss "$pid")
    curl -s localhost:8099/v1/chat/completions -H 'content-type: application/json' -d \
        '{"model":"jamba-mini","messages":[{"role":"user","content":"A city as JSON."}],"max_tokens":32,"response_format":{"type":"json_object"}}' >/dev/null
    used=$(rss "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    "$BIN/llama-server" -m "$f" --port 8098 -t 2 -c 512 >/dev/null 2>&1 &
    pid=$!
    wait_health 8098
    sleep 1
    peer=$(rss "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 - "$f" "$ready" "$used" "$peer" "$KV" <<'PY'
import os, sys
f, ready, used, peer, kv = sys.argv[1], *map(float, sys.argv[2:])
mib = os.path.getsize(f) / 2**20
print(f"| {os.path.basename(f)} | {mib:.1f} | {ready:.1f} | {(ready - kv) / mib:.2f} | {used:.1f} | {peer:.1f} | {peer / mib:.2f} |")
PY
done
