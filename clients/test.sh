#!/usr/bin/env bash
# Runs every test of the clients: the TypeScript client (unit tests and tests against a real jobcast
# server), the React hooks (against a real server), and the demo page in headless Chromium.
# Installs what it needs on a fresh machine (npm ci; chromium from Debian when missing), checks that
# the committed demo bundle in ../src/demo matches its sources, builds the server (which embeds that
# bundle), and ends with one line: "N passed, N failed". Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"
clients=$(pwd)
repo=$(cd .. && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! command -v node >/dev/null || ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)'; then
  echo "clients/test.sh: Node >= 20.19 is required (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi

chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  echo "== installing chromium (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi

echo "== npm ci"
npm ci --no-audit --no-fund --loglevel=error

echo "== type check and build of the client package"
npx tsc -p typescript/tsconfig.json
npx tsc -p tsconfig.tests.json

echo "== demo bundle: committed src/demo matches clients/demo"
node demo/build.mjs "$work/demo" >/dev/null
if ! cmp -s "$work/demo/app.js" "$repo/src/demo/app.js"; then
  echo "src/demo/app.js differs from what clients/demo builds: run 'npm run build:demo' in clients/ and commit it" >&2
  exit 1
fi
echo "src/demo/app.js is up to date"

echo "== cargo build (the server embeds the demo bundle)"
(cd "$repo" && cargo build --quiet)
export JOBCAST_BIN="$repo/target/debug/jobcast"

echo "== vitest: client, react, e2e"
status=0
timeout --kill-after=30 1200 npx vitest run --reporter=default --reporter=json \
  --outputFile.json="$work/vitest.json" || status=$?

# One closing line: N passed, N failed.
if [ -f "$work/vitest.json" ]; then
  node -e '
    const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    console.log(`${r.numPassedTests} passed, ${r.numFailedTests} failed`);
    if (r.numFailedTests > 0 || r.numTotalTests === 0) process.exit(1);
  ' "$work/vitest.json" || status=1
else
  echo "0 passed, 1 failed"
  status=1
fi
exit "$status"
