#!/usr/bin/env bash
# Fetch the default model if missing, build taipan, and serve it (http://127.0.0.1:8080).
# Extra arguments go to `taipan serve` (e.g. --port 9000 --api-key KEY).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/get-model.sh
cargo build --release --locked -p taipan
exec ./target/release/taipan serve "$@"
