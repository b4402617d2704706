#!/usr/bin/env bash
# Runs every benchmark of docs/benchmarks.md, in one command: `bash bench/run.sh`.
# It installs the load generator (wrk) and the peer (nginx) from Debian's packages if they are
# missing. Never run in CI: absolute figures need a quiet machine; compare the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

cargo run --release -p bench --bin suite
cargo run --release -p bench --bin rebuild_latency 20
cargo bench -p bench --bench boundary
