#!/usr/bin/env bash
# Fuzzes one target with libFuzzer for a while: fuzz/run.sh TARGET SECONDS.
# Seeds come from taipan-fuzz (written into fuzz/corpus/TARGET, not committed) plus the
# committed regression inputs in crates/taipan-fuzz/corpus/TARGET; crashes land in
# fuzz/artifacts/TARGET. Needs nightly Rust and `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")"
target=$1
seconds=${2:-600}
mkdir -p "corpus/$target"
cargo run -q --release --manifest-path ../Cargo.toml -p taipan-fuzz --example write_seeds -- "$target" "corpus/$target"
cp -n ../crates/taipan-fuzz/corpus/"$target"/* "corpus/$target"/ 2>/dev/null || true
# SANITIZER=none runs the safe-Rust targets many times faster; TIMEOUT is per input, in seconds
# (a template that spends its whole fuel budget takes far longer under AddressSanitizer).
exec cargo +nightly fuzz run -s "${SANITIZER:-address}" "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout="${TIMEOUT:-10}" -rss_limit_mb=4096 -max_len=1048576 -print_final_stats=1
