"""`ProgressTracker`: folds a job room's events into the job's state, with each stage's duration."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .protocol import FINAL_STATUSES, Envelope


@dataclass
class StageSummary:
    """One stage of a job as the events told it."""

    name: str
    #: Seconds since the tracker's clock epoch when the stage was first seen, and last seen.
    started: float
    ended: Optional[float] = None

    @property
    def duration(self) -> Optional[float]:
        """How long the stage took (up to the next stage or the job's end); None while it runs."""
        return None if self.ended is None else self.ended - self.started


@dataclass
class ProgressTracker:
    """A job's state from its room's events: feed it every envelope (`apply`)."""

    job_id: Optional[str] = None
    status: Optional[str] = None
    stage: Optional[str] = None
    progress: float = 0.0
    eta_seconds: Optional[float] = None
    message: Optional[str] = None
    processed: int = 0
    total: int = 0
    steps_completed: int = 0
    errors: int = 0
    metadata: Optional[Any] = None
    results: Optional[Any] = None
    error: Optional[str] = None
    recoverable: Optional[bool] = None
    cancel_requested_by: Optional[str] = None
    cancelled_by: Optional[str] = None
    stalled: bool = False
    last_seq: int = 0
    stages: List[StageSummary] = field(default_factory=list)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    @property
    def finished(self) -> bool:
        """Whether the job ended (completed, failed or cancelled)."""
        return self.status in FINAL_STATUSES

    def durations(self) -> Dict[str, Optional[float]]:
        """Each stage's duration in seconds (None for the one still running)."""
        return {s.name: s.duration for s in self.stages}

    def _enter_stage(self, name: Optional[str]) -> None:
        if not name or (self.stages and self.stages[-1].name == name):
            return
        now = self.clock()
        if self.stages and self.stages[-1].ended is None:
            self.stages[-1].ended = now
        self.stages.append(StageSummary(name, now))
        self.stage = name

    def _end(self, status: str) -> None:
        self.status = status
        if self.stages and self.stages[-1].ended is None:
            self.stages[-1].ended = self.clock()

    def apply(self, env: Envelope) -> None:
        """Applies one message (other rooms' events and unknown types are ignored)."""
        data = env.data if isinstance(env.data, dict) else {}
        if env.type == "subscribed":
            # A resume replays what was missed: the events tell it in order, and the snapshot (the
            # state after all of them) would get ahead of them.
            resumed = data.get("recovered") is True and self.last_seq > 0
            snap = data.get("snapshot")
            if isinstance(snap, dict) and not resumed:
                self._apply_snapshot(snap)
            return
        if self.job_id and data.get("job_id") not in (None, self.job_id):
            return
        if env.seq is not None:
            self.last_seq = env.seq
        kind = env.type
        if kind == "status":
            status = data.get("status")
            if isinstance(status, str):
                if status in FINAL_STATUSES:
                    self._end(status)
                else:
                    self.status = status
            self.message = data.get("message", self.message)
        elif kind == "processing_progress":
            self.progress = max(self.progress, float(data.get("progress", 0.0)))
            self._enter_stage(data.get("stage"))
            self.eta_seconds = data.get("eta_seconds")
            self.processed = int(data.get("processed", self.processed))
            self.total = int(data.get("total", self.total))
            self.steps_completed = max(self.steps_completed, int(data.get("zones_completed", 0)))
            self.errors = int(data.get("errors", self.errors))
            self.message = data.get("current_operation", self.message)
            if "metadata" in data:
                self.metadata = data["metadata"]
            self.stalled = False
        elif kind == "zone_completed":
            self.steps_completed += 1
        elif kind == "processing_completed":
            self.results = data.get("results")
            self.progress = 100.0
            self._end("completed")
        elif kind == "processing_failed":
            self.error = data.get("error")
            self.recoverable = data.get("recoverable")
            self._end("failed")
        elif kind == "job_cancelled":
            self.cancelled_by = data.get("by")
            self._end("cancelled")
        elif kind == "cancel_requested":
            self.cancel_requested_by = data.get("by")
        elif kind == "job_stalled":
            self.stalled = True

    def _apply_snapshot(self, snap: Dict[str, Any]) -> None:
        self.job_id = snap.get("job_id", self.job_id)
        status = snap.get("status")
        if isinstance(status, str):
            self.status = status
        self._enter_stage(snap.get("stage"))
        self.progress = max(self.progress, float(snap.get("progress") or 0.0))
        self.processed = int(snap.get("processed") or self.processed)
        self.total = int(snap.get("total") or self.total)
        if snap.get("metadata") is not None:
            self.metadata = snap["metadata"]
        if snap.get("results") is not None:
            self.results = snap["results"]
        err = snap.get("error")
        if isinstance(err, dict):
            self.error, self.recoverable = err.get("message"), err.get("recoverable")
        self.stalled = bool(snap.get("stalled", False))
