#!/usr/bin/env bash
# Runs every test jobcast has: formatting, lints, Rust unit and integration tests, the Autobahn
# TestSuite's WebSocket cases against `serve --conformance-echo`, then the clients' tests (TypeScript
# client, React hooks, demo bundle check, browser end-to-end in Debian's chromium).
# This is the README's test command; .ci/run calls it on a fresh clone with CI=true. It installs what
# it needs itself (Redis started, or installed with apt-get, when none listens; kosoku into a venv
# under target/; npm packages with npm ci; chromium with apt-get when missing). No test needs
# PostgreSQL yet (the PostgreSQL store is not built).
set -euo pipefail
cd "$(dirname "$0")"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Cluster tests need Redis on 127.0.0.1:6379: started here when nothing listens (installed from
# Debian's packages when missing). Without it they are skipped with a printed reason, except under
# CI=true, where they fail.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! listening 6379; then
  if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null; then
    echo "== installing redis-server (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null || true
  fi
  if command -v redis-server >/dev/null; then
    echo "== starting redis-server on 127.0.0.1:6379"
    # (a package install may have started one already: then this one just fails to bind)
    redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes >/dev/null || true
    for _ in $(seq 50); do listening 6379 && break; sleep 0.1; done
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --workspace 2>&1 | tee "$log"

echo "== Autobahn TestSuite cases against /ws/echo (kosoku, from PyPI)"
venv=target/conformance-venv
if [ ! -x "$venv/bin/python" ] && ! python3 -m venv "$venv" && command -v apt-get >/dev/null; then
  # Debian's python3 ships venv separately.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null || true
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
"$venv/bin/python" -c 'import kosoku' 2>/dev/null || "$venv/bin/pip" install --quiet kosoku==0.1.0
"$venv/bin/python" tests/conformance/autobahn.py target/debug/jobcast target/autobahn-report 2>&1 | tee -a "$log"

echo "== clients"
bash clients/test.sh 2>&1 | tee -a "$log"

# One closing line for every runner above: N passed, N failed.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^[0-9]+ passed, [0-9]+ failed$/ { split($0, a, " "); p += a[1]; f += a[3] }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
