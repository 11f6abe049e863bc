#!/usr/bin/env bash
# Jamba Reasoning 3B's shape side by side with llama.cpp, in one run: `taipan synth-jamba --shape
# reasoning-3b` (random weights, Q8_0) re-quantized by llama.cpp's own quantizer in its Q4_K_M
# recipe, so llama.cpp loads the very file it made. Prefill 512 and decode 128 on 2 threads
# (taipan bench and llama-bench, interleaved, REPS runs each); a long prompt's time to first
# token on both (LONG tokens, once each); taipan's resident size once a server has loaded the
# file with a KV budget of KV MiB, beside the file's size; the decode's share of the machine's
# read bandwidth for the file's bytes per token.
#
# Usage: bench/reasoning3b.sh LLAMA_BIN_DIR [REPS] [LONG] [KV_MB]
#   LLAMA_BIN_DIR holds llama-bench and llama-quantize built from llama.cpp's sources (see
#   bench/kquants.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:?usage: bench/reasoning3b.sh LLAMA_BIN_DIR [REPS] [LONG] [KV_MB]}"
REPS="${2:-2}"
LONG="${3:-16000}"
KV="${4:-256}"
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
OUT=bench/out
Q8="$OUT/reasoning-3b-q8_0.gguf"
F="$OUT/reasoning-3b-Q4_K_M.gguf"
mkdir -p "$OUT"
cargo build --release --locked -p taipan >/dev/null
T=./target/release/taipan
[ -f "$Q8" ] || "$T" synth-jamba "$Q8" --tokenizer-from tests/fixtures/jamba-tiny-dense.gguf --shape reasoning-3b
[ -f "$F" ] || "$BIN/llama-quantize" --allow-requantize "$Q8" "$F" Q4_K_M 2 >/dev/null 2>&1

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "file: $F ($(du -m "$F" | cut -f1) MiB); tensor types: $("$T" inspect "$F" --tensors 2>/dev/null | grep -oE '\b(Q[0-9]_[0-9A-Z]+|F32|F16)\b' | sort | uniq -c | xargs)"
for run in $(seq "$REPS"); do
    echo "run $run"
    "$T" bench -m "$F" -t 2 --prompt 512 --gen 128 --reps 1 --json 2>/dev/null | tee -a "$OUT/r3b-ours.jsonl"
    "$BIN/llama-bench" -m "$F" -t 2 -p 512 -n 128 -r 1 -o jsonl 2>/dev/null | tee -a "$OUT/r3b-peer.jsonl"
done
echo "long prompt: $LONG tokens"
"$T" bench -m "$F" -t 2 --prompt "$LONG" --gen 1 --reps 1 --json 2>/dev/null | tee "$OUT/r3b-ours-long.json"
"$BIN/llama-bench" -m "$F" -t 2 -p "$LONG" -n 0 -r 1 -o jsonl 2>/dev/null | tee "$OUT/r3b-peer-long.jsonl"

"$T" serve -m "$F" --port 8098 --kv-cache-mb "$KV" >/dev/null 2>&1 &
pid=$!
for _ in $(seq 600); do curl -sf localhost:8098/health >/dev/null && break; sleep 0.5; done
curl -s localhost:8098/v1/chat/completions -d '{"model":"jamba-mini","messages":[{"role":"user","content":"Hi"}],"max_tokens":8}' >/dev/null
rss=$(awk '/VmRSS/{printf "%.1f", $2/1024}' "/proc/$pid/status")
kill "$pid"; wait "$pid" 2>/dev/null || true
echo "server RSS with a $KV MiB budget: $rss MiB"
