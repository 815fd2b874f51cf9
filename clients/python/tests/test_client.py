"""The package against a real jobcast server: a Python worker reports while Python subscribers watch."""

from __future__ import annotations

import asyncio
import threading
from typing import List

import httpx
import pytest

from jobcast import Client, Envelope, JobcastError, ProgressTracker, SyncClient, WorkerJob
from jobcast.tracker import StageSummary

from .conftest import Server


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))


async def until(client: Client, kind: str, seen: List[Envelope]) -> Envelope:
    while True:
        env = await client.next(timeout=20)
        seen.append(env)
        if env.type == kind:
            return env


def test_a_worker_reports_and_a_subscriber_sees_every_event_once_in_order_across_a_reconnect(server: Server) -> None:
    publisher = server.token("svc", "acme", "publisher")
    job = WorkerJob.create(server.url, publisher, kind="thumbnails", stages=[("download", 1), ("resize", 3)], total=4)

    async def main() -> None:
        seen: List[Envelope] = []
        tracker = ProgressTracker()
        async with Client(server.url, server.token("alice"), ack=True) as client:
            await client.subscribe(job.room)
            await until(client, "subscribed", seen)
            job.stage("download", 1.0)
            await until(client, "processing_progress", seen)
            await client.drop()  # a network failure: the client resumes with `since`
            for i in range(4):
                job.step(f"photo-{i}", i, "completed", duration_ms=5)
                job.progress(done=i + 1, total=4, stage="resize", metadata={"last": f"photo-{i}"})
            assert job.complete({"resized": 4}) == "completed"
            await until(client, "processing_completed", seen)
            assert client.connections >= 2, "reconnected"
        room = [e for e in seen if e.room == job.room]
        seqs = [e.seq for e in room]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"no gap, no duplicate: {seqs}"
        for e in seen:
            tracker.apply(e)
        assert tracker.finished and tracker.status == "completed"
        assert tracker.progress == 100.0
        assert tracker.results == {"resized": 4}
        assert tracker.metadata == {"last": "photo-3"}
        assert tracker.steps_completed >= 4
        assert [s.name for s in tracker.stages] == ["download", "resize"]
        progress = [e.data["progress"] for e in room if e.type == "processing_progress"]
        assert progress == sorted(progress), progress

    run(main())


def test_a_cancel_reaches_an_http_only_worker(server: Server) -> None:
    job = WorkerJob.create(server.url, server.token("svc", "acme", "publisher"), kind="etl")
    assert job.progress(0.1) is False
    res = httpx.post(
        f"{server.url}/api/v1/jobs/{job.job_id}/cancel", headers={"Authorization": f"Bearer {server.token('alice')}"}
    )
    assert res.status_code == 202
    assert job.progress(0.2) is True and job.cancel_requested
    assert job.fail("stopped on request") == "cancelled"


def test_a_job_token_is_refused_for_another_job(server: Server) -> None:
    publisher = server.token("svc", "acme", "publisher")
    one = WorkerJob.create(server.url, publisher, kind="etl")
    other = WorkerJob.create(server.url, publisher, kind="etl")
    intruder = WorkerJob(server.url, other.job_id, one.token)
    with pytest.raises(JobcastError) as refused:
        intruder.progress(0.5)
    assert refused.value.status == 403
    with pytest.raises(JobcastError) as bad:
        one.progress(1.5)
    assert bad.value.status == 400 and bad.value.code == "bad_request"


def test_binary_frames_are_decoded(binary_server: Server) -> None:
    job = WorkerJob.create(binary_server.url, binary_server.token("svc", "acme", "publisher"), kind="etl")

    async def main() -> None:
        seen: List[Envelope] = []
        async with Client(binary_server.url, binary_server.token("alice")) as client:
            await client.subscribe(job.room)
            await until(client, "subscribed", seen)
            job.progress(0.5, message="x" * 200)
            env = await until(client, "processing_progress", seen)
            assert env.data["current_operation"] == "x" * 200
            assert env.data["progress"] == 50.0

    run(main())


def test_the_token_is_refreshed_before_it_expires(server: Server) -> None:
    tokens = iter([server.token("alice", ttl=62)] + [server.token("alice")] * 5)

    async def main() -> None:
        seen: List[Envelope] = []
        async with Client(server.url, lambda: next(tokens)) as client:
            await until(client, "token_expiring", seen)
            refreshed = await until(client, "token_refreshed", seen)
            assert refreshed.data["expires_at"]

    run(main())


def test_the_sync_client_follows_a_job(server: Server) -> None:
    job = WorkerJob.create(server.url, server.token("svc", "acme", "publisher"), kind="etl")
    with SyncClient(server.url, server.token("alice")) as client:
        client.subscribe(job.room)
        while client.next(timeout=20).type != "subscribed":
            pass  # connection_established, authenticated
        worker = threading.Thread(target=lambda: (job.progress(0.5), job.complete({"ok": True})))
        worker.start()
        kinds = []
        for env in client.events(timeout=20):
            kinds.append(env.type)
            if env.type == "processing_completed":
                break
        worker.join()
    assert "processing_progress" in kinds


def test_the_tracker_times_each_stage() -> None:
    now = [0.0]
    tracker = ProgressTracker(clock=lambda: now[0])
    for t, stage in [(0.0, "download"), (2.0, "resize"), (5.0, "resize")]:
        now[0] = t
        tracker.apply(Envelope("processing_progress", {"stage": stage, "progress": 10.0 + t}, room="job:x", seq=1))
    now[0] = 9.0
    tracker.apply(Envelope("processing_completed", {"results": None}, room="job:x", seq=2))
    assert tracker.durations() == {"download": 2.0, "resize": 7.0}
    assert tracker.stages[0] == StageSummary("download", 0.0, 2.0)


def test_a_browser_side_client_and_a_python_subscriber_see_the_same_events(server: Server) -> None:
    """A Python worker reports; @jobcast/client (in Node) and the Python client watch, the Python one
    through a dropped connection: both see the same events in the same order."""
    import json
    import os
    import shutil
    import subprocess
    from pathlib import Path

    here = Path(__file__).parent
    dist = here.parents[1] / "typescript" / "dist" / "index.js"
    if shutil.which("node") is None or not dist.exists():
        assert not os.environ.get("CI"), "CI=true: this test needs node and clients/typescript/dist"
        pytest.skip("no node or no built @jobcast/client (run clients/test.sh first)")
    job = WorkerJob.create(server.url, server.token("svc", "acme", "publisher"), kind="etl", stages=["a", "b"])
    ws_url = server.url.replace("http://", "ws://") + "/ws"
    node = subprocess.Popen(
        ["node", str(here / "node_watcher.mjs"), ws_url, server.token("carol"), job.room],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert node.stdout is not None
    assert json.loads(node.stdout.readline()) == {"subscribed": True}

    async def main() -> List[Envelope]:
        seen: List[Envelope] = []
        async with Client(server.url, server.token("dave")) as client:
            await client.subscribe(job.room)
            await until(client, "subscribed", seen)
            for i in range(1, 4):
                job.stage("a", i / 3)
            await client.drop()
            for i in range(1, 4):
                job.step(f"s{i}", i, "completed")
                job.stage("b", i / 3)
            job.complete({"ok": True})
            await until(client, "processing_completed", seen)
        return [e for e in seen if e.room == job.room]

    python_side = [(e.seq, e.type) for e in run(main())]
    node_side = [(json.loads(line)["seq"], json.loads(line)["type"]) for line in node.stdout]
    assert node.wait(10) == 0
    assert python_side == node_side, f"python {python_side}\nnode {node_side}"
    seqs = [s for s, _ in python_side]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
