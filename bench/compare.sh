#!/usr/bin/env bash
# taipan vs llama.cpp on the same GGUF and machine, side by side in one run.
# The peer is llama-cpp-python (built from source by pip; set PEER_PYTHON to reuse an install).
# Usage: bench/compare.sh [MODEL] [THREADS...]   (defaults: the default model, threads 1 2)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-${TAIPAN_MODEL_DIR:-$HOME/.cache/taipan/models}/SmolLM2-135M-Instruct.Q4_1.gguf}"
shift || true
THREADS=("${@:-1 2}")
THREADS=(${THREADS[*]})
PY="${PEER_PYTHON:-bench/.venv/bin/python}"
if [ ! -x "$PY" ]; then
    python3 -m venv bench/.venv
    bench/.venv/bin/pip install -q llama-cpp-python==0.3.36 numpy
    PY=bench/.venv/bin/python
fi
cargo build --release --locked -p taipan >/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "model: $MODEL"
echo
echo "| threads | engine | prefill 512 tok/s | decode 128 tok/s |"
echo "|---|---|---|---|"
for t in "${THREADS[@]}"; do
    ours=$(./target/release/taipan bench -m "$MODEL" -t "$t" --prompt 512 --gen 128 --reps 3 --json)
    peer=$("$PY" bench/peer_llamacpp.py "$MODEL" --threads "$t" --prompt 512 --gen 128 --reps 3)
    python3 - "$t" "$ours" "$peer" <<'PY'
import json, sys
t, ours, peer = sys.argv[1], json.loads(sys.argv[2])[0], json.loads(sys.argv[3])
print(f"| {t} | taipan ({ours['isa']}) | {ours['prefill_tok_s']:.1f} | {ours['decode_tok_s']:.1f} |")
print(f"| {t} | {peer['engine']} | {peer['prefill_tok_s']:.1f} | {peer['decode_tok_s']:.1f} |")
print(f"| {t} | **ratio taipan / llama.cpp** | **{ours['prefill_tok_s']/peer['prefill_tok_s']:.2f}x** | **{ours['decode_tok_s']/peer['decode_tok_s']:.2f}x** |")
PY
done
