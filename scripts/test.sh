#!/usr/bin/env bash
# The whole test suite: fetch the default model if missing, run every crate's tests in release
# mode (the model tests run real forward passes, too slow unoptimised), then the end-to-end server
# tests with the official SDKs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/get-model.sh
cargo test --release --workspace --locked
bash scripts/e2e.sh
