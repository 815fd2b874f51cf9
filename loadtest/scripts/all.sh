#!/usr/bin/env bash
# Runs the README's load-test figures, one scenario after another, and appends their JSON lines to
# loadtest/results.jsonl. Each run is bounded (durations below); the harness starts its own server.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
out=loadtest/results.jsonl
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
# The harness prints its JSON line, then a table; the line is kept.
run() { echo "== jobcast-loadtest $*" >&2; ./target/release/jobcast-loadtest "$@" 2>/dev/null >"$tmp"; head -n 1 "$tmp" | tee -a "$out"; }
run fanout -c 1000 -r 10 -p 1600 -b 256 -d 10
run step -c 1000 -r 10 -p 1500 -b 256 -d 5 --factor 1.15 --steps 6 --p99-ms 50
run ack -c 1000 -r 10 -p 1600 -b 256 -d 10
run fanout -c 1000 -r 10 -p 1600 -b 256 -d 10 --job-rooms
run fanout -c 10000 -r 100 -p 1000 -b 256 -d 10
run step -c 10000 -r 100 -p 300 -b 256 -d 5 --factor 1.25 --steps 5 --p99-ms 50
run idle -c 10000 -d 5
run storm -c 10000 -r 100
run storm -c 10000 -r 100 --cut
run jobs -u 20 -n 100000 -w 5
run reports -j 100 -w 10 -p 20000 -d 10
run reports -j 100 -w 10 -p 5000 -d 10 --server-arg=--progress-max-rate-per-s=0
run webhooks -j 10000
