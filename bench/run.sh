#!/usr/bin/env bash
# Runs every benchmark of docs/benchmarks.md in one command:
#
#   bash bench/run.sh            the default mode (under 20 minutes on 2 cores): the figures for docs
#   bash bench/run.sh --quick    development (under 3 minutes): 5 short interleaved rounds each,
#                                every figure but tls, accesslog and stats (name them to run
#                                them: `bash bench/run.sh --quick tls accesslog stats`)
#   bash bench/run.sh --full     the default plus the long runs, the WebSocket gateway and the
#                                scaling curves (no time bound; `bash bench/run.sh [--quick]
#                                gateway` runs the gateway alone): scale-workers, scale-size
#                                (reload time by workers and by plugin size), scale-conns (reload
#                                under load by connections), scale-memory (RSS, PSS, USS by idle
#                                connections), edit-live (source edit to new answer); each runs
#                                alone by name, `--quick` with fewer points and shorter runs
#                                (`bash bench/run.sh --quick scale-workers`)
#   bash bench/run.sh soak [RELOADS [FAULTS]] [--rate R] ...
#                                the soak: RELOADS good reloads under keep-alive load with FAULTS
#                                faults injected between them (bench/src/bin/soak.rs; 1000 100
#                                for the figures of docs/benchmarks.md, about 10 minutes)
#
# Figure names after the mode run only those (e.g. `bash bench/run.sh --quick steady`).
# Results are printed and written to <target>/bench-results/<mode>-<date>.md.
# It installs the load generators (wrk; h2load, from nghttp2-client, for HTTP/2) and the peer
# (nginx) from Debian's packages if they are missing. Never run in CI: absolute figures need a
# quiet machine; compare the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

# The suite builds what it measures, runs every figure (the plugin-boundary microbenchmark as
# `cargo bench -p bench --bench boundary`), and reports the measuring and build times itself;
# this total adds compiling the suite.
start=$SECONDS
if [ "${1:-}" = soak ]; then
    shift
    cargo run --release -p bench --bin soak -- "$@"
    echo "bench/run.sh soak $*: $((SECONDS - start)) s in all, builds included"
    exit 0
fi
cargo run --release -p bench --bin suite -- "$@"
echo "bench/run.sh${*:+ $*}: $((SECONDS - start)) s in all, builds included"
