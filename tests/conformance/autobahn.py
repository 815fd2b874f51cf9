"""Runs the Autobahn TestSuite cases (through kosoku) against `jobcast serve --conformance-echo`.

Usage: python autobahn.py PATH/TO/jobcast [REPORT_DIR]

Starts the server on a free loopback port with a throw-away data directory, drives every case but
9.* (performance) and 12.*/13.* (permessage-deflate, which jobcast does not offer) at /ws/echo, and
passes when every case's behaviour is OK, NON-STRICT or INFORMATIONAL and its closing handshake OK
or INFORMATIONAL. Prints one line per case that is not OK, then `N passed, N failed`; exits 1 on any
failure. With REPORT_DIR, kosoku's HTML/JSON reports are written there.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile

import kosoku
from kosoku._report import write_reports

EXCLUDED = ["9.*", "12.*", "13.*"]
SOUND = {"OK", "NON-STRICT", "INFORMATIONAL"}
SOUND_CLOSE = {"OK", "INFORMATIONAL"}


async def drive(url: str) -> list:
    try:
        return await asyncio.wait_for(
            kosoku.run_fuzzingclient(url, None, EXCLUDED, concurrency=4), timeout=600
        )
    except kosoku.FailureError as failure:
        return failure.results


def main() -> int:
    binary = sys.argv[1]
    report_dir = sys.argv[2] if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory(prefix="jobcast-autobahn-") as data:
        server = subprocess.Popen(
            [binary, "serve", "--conformance-echo", "--bind", "127.0.0.1:0", "--data-dir", data],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            first = server.stdout.readline()
            found = re.search(r"listening on http://(127\.0\.0\.1:\d+)", first)
            if not found:
                print(f"the server did not start: {first!r}", file=sys.stderr)
                return 1
            results = asyncio.run(drive(f"ws://{found.group(1)}/ws/echo"))
        finally:
            server.terminate()
            server.wait(timeout=30)
    if report_dir:
        write_reports(results, report_dir)
    failed = 0
    counts: dict[str, int] = {}
    for r in results:
        behavior, closing = r.behavior.value, r.behavior_close.value
        counts[behavior] = counts.get(behavior, 0) + 1
        ok = behavior in SOUND and closing in SOUND_CLOSE
        failed += not ok
        if not ok or behavior != "OK":
            print(f"  {r.case_id}: {behavior} / close {closing}{'' if ok else '  <- FAILED'}")
    summary = ", ".join(f"{n} {b}" for b, n in sorted(counts.items()))
    print(f"Autobahn cases (all but {', '.join(EXCLUDED)}): {len(results)} run: {summary}")
    if not results:
        print("no case ran", file=sys.stderr)
        return 1
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
