#!/usr/bin/env bash
# Measures a CSV import end to end on this machine: rows/s from upload to processing_completed, and
# the server's peak memory (VmHWM). Usage: loadtest/scripts/import.sh [ROWS] [POSTGRES_URL]
# (default 1000000 rows into SQLite). With a PostgreSQL URL the server runs in cluster mode (Redis on
# 127.0.0.1:6379, or REDIS_URL) and the rows go into PostgreSQL, under a schema of this run's own
# that is dropped afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
rows=${1:-1000000}
database=${2:-}
work=$(mktemp -d)
prefix="import-$$-$RANDOM"
cleanup() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    if [ -n "$database" ]; then
        psql "$database" -qc "DROP SCHEMA IF EXISTS \"$prefix\" CASCADE" >/dev/null 2>&1 || true
        redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}" --scan --pattern "$prefix:*" | xargs -r redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}" del >/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
cargo build --release -q
python3 - "$rows" "$work/import.csv" <<'PY'
import sys
rows, path = int(sys.argv[1]), sys.argv[2]
with open(path, "w") as f:
    f.write("date,amount,description\n")
    for i in range(rows):
        f.write(f"2024-{i % 12 + 1:02d}-{i % 28 + 1:02d},-{i % 9973}.{i % 100:02d},card payment {i} grocery store\n")
PY
size=$(stat -c %s "$work/import.csv")
cluster=()
auth=(--data-dir "$work/data")
if [ -n "$database" ]; then
    secret="import-measure-secret-$RANDOM$RANDOM$RANDOM"
    cluster=(--redis-url "${REDIS_URL:-redis://127.0.0.1:6379}" --database-url "$database" --cluster-prefix "$prefix" --jwt-secret "$secret")
    auth=(--token "$(./target/release/jobcast token --user measure --tenant measure --jwt-secret "$secret")")
fi
./target/release/jobcast serve --bind 127.0.0.1:0 --data-dir "$work/data" --max-upload-bytes $((size + 1048576)) \
    "${cluster[@]}" > "$work/serve.out" 2> "$work/serve.err" &
server=$!
until grep -q "listening on" "$work/serve.out" 2>/dev/null; do sleep 0.1; done
addr=$(sed -n 's/^jobcast listening on //p' "$work/serve.out")
rss_before=$(awk '/VmRSS/ {print $2}' /proc/$server/status)
start=$(date +%s.%N)
./target/release/jobcast import "$work/import.csv" --server "$addr" "${auth[@]}" | tail -n 2
end=$(date +%s.%N)
peak=$(awk '/VmHWM/ {print $2}' /proc/$server/status)
python3 - "$rows" "$size" "$start" "$end" "$rss_before" "$peak" <<'PY'
import sys
rows, size, start, end, before, peak = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
secs = end - start
print(f"rows={rows} file_mb={size/1e6:.1f} seconds={secs:.2f} rows_per_s={rows/secs:,.0f} "
      f"server_rss_before_mib={before/1024:.1f} server_peak_rss_mib={peak/1024:.1f}")
PY
