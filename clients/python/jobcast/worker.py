"""The worker side: report a job's progress into jobcast from your own worker.

A backend holding a `publisher` access token creates the job; the worker needs only the job token
the creation answers (it authorizes this one job's reports, nothing else):

    job = WorkerJob.create("http://127.0.0.1:8080", publisher_token, kind="thumbnails",
                           stages=[("download", 1), ("resize", 3)])
    job.stage("download", 0.5)
    job.progress(done=2, total=3, message="photo 2 of 3", stage="resize")
    if job.cancel_requested:
        job.fail("stopped on request")
    else:
        job.complete({"resized": 3})

`AsyncWorkerJob` is the same for asyncio code (FastAPI background tasks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import httpx

#: A stage as `(name, weight)` or `{"name", "weight"}`.
StageLike = Union[Tuple[str, float], Mapping[str, Any], str]


class JobcastError(Exception):
    """The server refused a call: its HTTP status and `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    @property
    def retryable(self) -> bool:
        """A 503 (the server's engines away) or 429: try again later."""
        return self.status in (429, 503)


def _stages(stages: Optional[Sequence[StageLike]]) -> Optional[list]:  # type: ignore[type-arg]
    if stages is None:
        return None
    out = []
    for s in stages:
        if isinstance(s, str):
            out.append({"name": s, "weight": 1.0})
        elif isinstance(s, tuple):
            out.append({"name": s[0], "weight": float(s[1])})
        else:
            out.append({"name": str(s["name"]), "weight": float(s.get("weight", 1.0))})
    return out


def _answer(res: httpx.Response) -> Dict[str, Any]:
    try:
        body = res.json()
    except ValueError:
        body = {}
    if res.status_code >= 400:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        raise JobcastError(res.status_code, str(err.get("code", "error")), str(err.get("message", res.text)))
    return body if isinstance(body, dict) else {}


def _report_body(
    progress: Optional[float],
    done: Optional[int],
    total: Optional[int],
    stage: Optional[str],
    message: Optional[str],
    metadata: Optional[Mapping[str, Any]],
    step: Optional[Mapping[str, Any]],
) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    for key, value in (
        ("progress", progress),
        ("done", done),
        ("total", total),
        ("stage", stage),
        ("message", message),
        ("metadata", dict(metadata) if metadata is not None else None),
        ("step", dict(step) if step is not None else None),
    ):
        if value is not None:
            body[key] = value
    return body


@dataclass
class Created:
    """What `POST /api/v1/jobs` answered."""

    job_id: str
    room: str
    token: str


def _create_body(
    kind: str,
    title: Optional[str],
    stages: Optional[Sequence[StageLike]],
    total: Optional[int],
    metadata: Optional[Mapping[str, Any]],
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"kind": kind}
    if title is not None:
        body["title"] = title
    if stages is not None:
        body["stages"] = _stages(stages)
    if total is not None:
        body["total"] = total
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return body


class WorkerJob:
    """A job reported from a synchronous worker (a Celery task, a script)."""

    def __init__(self, server: str, job_id: str, token: str, *, room: Optional[str] = None, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self.job_id = job_id
        #: The job token (pass it to the worker that reports).
        self.token = token
        self.room = room or f"job:{job_id}"
        self._http = httpx.Client(
            base_url=self.server, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )
        #: True once any answer said someone asked to cancel the job: stop, then `fail` or `complete`.
        self.cancel_requested = False
        #: The `seq` of the last event a call produced.
        self.last_seq: Optional[int] = None

    @classmethod
    def create(
        cls,
        server: str,
        publisher_token: str,
        *,
        kind: str,
        title: Optional[str] = None,
        stages: Optional[Sequence[StageLike]] = None,
        total: Optional[int] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> "WorkerJob":
        """Creates a job (role `publisher`) and answers its worker handle."""
        with httpx.Client(base_url=server.rstrip("/"), timeout=10.0) as http:
            res = http.post(
                "/api/v1/jobs",
                json=_create_body(kind, title, stages, total, metadata),
                headers={"Authorization": f"Bearer {publisher_token}"},
            )
        body = _answer(res)
        return cls(server, str(body["job_id"]), str(body["token"]), room=str(body["room"]))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "WorkerJob":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _post(self, action: str, body: Dict[str, Any]) -> Dict[str, Any]:
        answer = _answer(self._http.post(f"/api/v1/jobs/{self.job_id}/{action}", json=body))
        if answer.get("cancel_requested"):
            self.cancel_requested = True
        seq = answer.get("seq")
        if isinstance(seq, int):
            self.last_seq = seq
        return answer

    def progress(
        self,
        progress: Optional[float] = None,
        *,
        done: Optional[int] = None,
        total: Optional[int] = None,
        stage: Optional[str] = None,
        message: Optional[str] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> bool:
        """Reports progress (a fraction 0–1, or `done` of `total`; of the current stage when the job
        has stages). Answers whether a cancel was requested."""
        self._post("report", _report_body(progress, done, total, stage, message, metadata, None))
        return self.cancel_requested

    def stage(self, name: str, progress: float = 0.0, *, message: Optional[str] = None) -> bool:
        """Moves to stage `name` (with its own fraction done)."""
        return self.progress(progress, stage=name, message=message)

    def step(self, step_id: str, index: int, status: str = "completed", duration_ms: Optional[int] = None) -> bool:
        """Reports a step (`processing`, `completed` or `failed`): `zone_processing` / `zone_completed`."""
        step: Dict[str, Any] = {"id": step_id, "index": index, "status": status}
        if duration_ms is not None:
            step["duration_ms"] = duration_ms
        self._post("report", {"step": step})
        return self.cancel_requested

    def complete(self, results: Any = None) -> str:
        """Ends the job; answers its final status (`cancelled` when a cancel was requested)."""
        return str(self._post("complete", {"results": results})["status"])

    def fail(self, error: str, recoverable: bool = False) -> str:
        """Ends the job failed; answers its final status (`cancelled` when a cancel was requested)."""
        return str(self._post("fail", {"error": error, "recoverable": recoverable})["status"])


class AsyncWorkerJob:
    """`WorkerJob` for asyncio code."""

    def __init__(self, server: str, job_id: str, token: str, *, room: Optional[str] = None, timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self.job_id = job_id
        self.token = token
        self.room = room or f"job:{job_id}"
        self._http = httpx.AsyncClient(
            base_url=self.server, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )
        self.cancel_requested = False
        self.last_seq: Optional[int] = None

    @classmethod
    async def create(
        cls,
        server: str,
        publisher_token: str,
        *,
        kind: str,
        title: Optional[str] = None,
        stages: Optional[Sequence[StageLike]] = None,
        total: Optional[int] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> "AsyncWorkerJob":
        async with httpx.AsyncClient(base_url=server.rstrip("/"), timeout=10.0) as http:
            res = await http.post(
                "/api/v1/jobs",
                json=_create_body(kind, title, stages, total, metadata),
                headers={"Authorization": f"Bearer {publisher_token}"},
            )
        body = _answer(res)
        return cls(server, str(body["job_id"]), str(body["token"]), room=str(body["room"]))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, action: str, body: Dict[str, Any]) -> Dict[str, Any]:
        answer = _answer(await self._http.post(f"/api/v1/jobs/{self.job_id}/{action}", json=body))
        if answer.get("cancel_requested"):
            self.cancel_requested = True
        seq = answer.get("seq")
        if isinstance(seq, int):
            self.last_seq = seq
        return answer

    async def progress(
        self,
        progress: Optional[float] = None,
        *,
        done: Optional[int] = None,
        total: Optional[int] = None,
        stage: Optional[str] = None,
        message: Optional[str] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> bool:
        await self._post("report", _report_body(progress, done, total, stage, message, metadata, None))
        return self.cancel_requested

    async def stage(self, name: str, progress: float = 0.0, *, message: Optional[str] = None) -> bool:
        return await self.progress(progress, stage=name, message=message)

    async def step(self, step_id: str, index: int, status: str = "completed", duration_ms: Optional[int] = None) -> bool:
        step: Dict[str, Any] = {"id": step_id, "index": index, "status": status}
        if duration_ms is not None:
            step["duration_ms"] = duration_ms
        await self._post("report", {"step": step})
        return self.cancel_requested

    async def complete(self, results: Any = None) -> str:
        return str((await self._post("complete", {"results": results}))["status"])

    async def fail(self, error: str, recoverable: bool = False) -> str:
        return str((await self._post("fail", {"error": error, "recoverable": recoverable}))["status"])
