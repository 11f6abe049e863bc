#!/usr/bin/env bash
# Fetch the default model if missing, build taipan, and start it on that model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/get-model.sh
cargo build --release --locked -p taipan
exec ./target/release/taipan chat "$@"
