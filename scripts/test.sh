#!/usr/bin/env bash
# The whole test suite: fetch the default model (and the optional Gemma 3 270M k-quant model the
# tokenizer and k-quant tests check against llama.cpp's outputs) if missing, run every crate's tests in release
# mode (the model tests run real forward passes, too slow unoptimised), then the end-to-end server
# tests with the official SDKs; between them, the container file and Helm chart checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/get-model.sh
bash scripts/get-gemma3.sh
cargo test --release --workspace --locked
# Name the kernel levels this CPU could not test (TAIPAN_REQUIRE_ISA=avx512 makes that a failure).
cargo test --release --locked -q -p taipan-kernels --test kernels every_instruction_set -- --nocapture 2>&1 \
    | grep -E '^(SKIPPED|kernel levels)' || true
bash scripts/check-deploy.sh
bash scripts/e2e.sh
