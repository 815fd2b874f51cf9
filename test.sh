#!/usr/bin/env bash
# Runs every test jobcast has: formatting, lints, Rust unit and integration tests, the Autobahn
# TestSuite's WebSocket cases against `serve --conformance-echo`, the clients' tests (TypeScript
# client, React hooks, demo bundle check, browser end-to-end in Debian's chromium), then the Python
# package (mypy, pytest against the real server, in a venv under target/).
# This is the README's test command; .ci/run calls it on a fresh clone with CI=true. It installs what
# it needs itself (Redis started, or installed with apt-get, when none listens; kosoku into a venv
# under target/; npm packages with npm ci; chromium with apt-get when missing; PostgreSQL started, or
# installed with apt-get, when none listens).
set -euo pipefail
cd "$(dirname "$0")"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Cluster tests need Redis on 127.0.0.1:6379: started here when nothing listens (installed from
# Debian's packages when missing). Without it they are skipped with a printed reason, except under
# CI=true, where they fail.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# The https webhook test makes its receiver's certificate with the openssl command.
if ! command -v openssl >/dev/null && command -v apt-get >/dev/null; then
  echo "== installing openssl (Debian package)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null || true
fi
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

# Shared-store cluster tests need PostgreSQL on 127.0.0.1:5432 with a role that may create schemas in
# database `test` (JOBCAST_TEST_DATABASE_URL overrides postgres://root@127.0.0.1:5432/test). Started
# here when nothing listens (installed from Debian's packages when missing); skipped like Redis's
# tests otherwise, and failed under CI=true.
if [ -z "${JOBCAST_TEST_DATABASE_URL:-}" ] && ! listening 5432; then
  if ! command -v pg_ctlcluster >/dev/null && command -v apt-get >/dev/null; then
    echo "== installing postgresql (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || true
  fi
  if command -v pg_lsclusters >/dev/null; then
    if [ -z "$(pg_lsclusters -h)" ]; then
      pg_createcluster "$(ls /usr/lib/postgresql | sort -n | tail -1)" main >/dev/null || true
    fi
    echo "== starting PostgreSQL on 127.0.0.1:5432"
    pg_lsclusters -h | while read -r version cluster _; do pg_ctlcluster "$version" "$cluster" start || true; done
    for _ in $(seq 100); do listening 5432 && break; sleep 0.1; done
  fi
fi
if [ -z "${JOBCAST_TEST_DATABASE_URL:-}" ] && listening 5432 && command -v psql >/dev/null \
  && ! psql -h 127.0.0.1 -U root -d test -w -qAtc 'SELECT 1' >/dev/null 2>&1 && id postgres >/dev/null 2>&1; then
  # A fresh Debian cluster knows neither role root nor database test, and asks TCP clients for a
  # password: make both, with a password the tests then use.
  as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -n -u postgres "$@"; fi; }
  as_pg psql -qAtc "SELECT 1 FROM pg_roles WHERE rolname = 'root'" | grep -q 1 \
    || as_pg psql -qc "CREATE ROLE root SUPERUSER LOGIN" || true
  as_pg psql -qc "ALTER ROLE root PASSWORD 'jobcast-tests'" || true
  as_pg psql -qAtc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
    || as_pg createdb -O root test || true
  export JOBCAST_TEST_DATABASE_URL=postgres://root:jobcast-tests@127.0.0.1:5432/test
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

# After the clients: one Python test drives the built @jobcast/client in Node.
echo "== Python package (clients/python: mypy --strict, pytest against the real server)"
pyvenv=target/python-venv
if [ ! -x "$pyvenv/bin/python" ]; then python3 -m venv "$pyvenv"; fi
"$pyvenv/bin/python" -c 'import jobcast, pytest, mypy, websockets, httpx, msgpack' 2>/dev/null \
  || "$pyvenv/bin/pip" install --quiet -e 'clients/python[test]'
(cd clients/python && "../../$pyvenv/bin/python" -m mypy jobcast)
junit=$(mktemp)
pystatus=0
(cd clients/python && JOBCAST_BIN="$PWD/../../target/debug/jobcast" "../../$pyvenv/bin/python" -m pytest -q \
  -p no:cacheprovider --junitxml="$junit" tests) || pystatus=$?
"$pyvenv/bin/python" - "$junit" <<'PY' | tee -a "$log"
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
total, bad = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
print(f"{total - bad - int(suite.get('skipped', 0))} passed, {bad} failed")
PY
rm -f "$junit"
[ "$pystatus" -eq 0 ]

# One closing line for every runner above: N passed, N failed.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^[0-9]+ passed, [0-9]+ failed$/ { split($0, a, " "); p += a[1]; f += a[3] }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
