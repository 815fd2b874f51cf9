"""A real jobcast server for the tests: the binary the test command built, on port 0."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

import pytest

REPO = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("JOBCAST_BIN", REPO / "target" / "debug" / "jobcast"))
SECRET = "python-client-test-secret"


@dataclass
class Server:
    url: str
    data_dir: str

    def token(self, user: str, tenant: str = "acme", *roles: str, ttl: int = 3600) -> str:
        args = [str(BIN), "token", "--user", user, "--tenant", tenant, "--ttl", str(ttl), "--jwt-secret", SECRET]
        for role in roles:
            args += ["--role", role]
        out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=self.data_dir)
        return out.stdout.strip()


def start(extra: List[str]) -> "tuple[subprocess.Popen[str], Server, tempfile.TemporaryDirectory[str]]":
    data = tempfile.TemporaryDirectory()
    args = [str(BIN), "serve", "--bind", "127.0.0.1:0", "--store", "memory", "--data-dir", data.name]
    args += ["--jwt-secret", SECRET, "--progress-max-rate-per-s", "0", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=data.name)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("jobcast listening on "):
            return proc, Server(line.split(" on ", 1)[1].strip(), data.name), data
    raise RuntimeError("jobcast did not start")


@pytest.fixture
def server() -> Iterator[Server]:
    proc, srv, data = start([])
    try:
        yield srv
    finally:
        proc.terminate()
        proc.wait(10)
        data.cleanup()


@pytest.fixture
def binary_server() -> Iterator[Server]:
    """Every message above 64 bytes comes as a binary gzip(msgpack) frame."""
    proc, srv, data = start(["--compress-threshold-bytes", "64"])
    try:
        yield srv
    finally:
        proc.terminate()
        proc.wait(10)
        data.cleanup()
