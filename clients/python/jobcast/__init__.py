"""jobcast for Python: follow jobs live (`Client`, `SyncClient`, `ProgressTracker`) and report a job
from your own worker (`WorkerJob`, `AsyncWorkerJob`)."""

from .client import AuthError, Client, RoomState, Stopped
from .protocol import FINAL_STATUSES, TERMINAL_EVENTS, Envelope, decode_frame
from .sync import SyncClient
from .tracker import ProgressTracker, StageSummary
from .worker import AsyncWorkerJob, Created, JobcastError, WorkerJob

__all__ = [
    "AsyncWorkerJob",
    "AuthError",
    "Client",
    "Created",
    "Envelope",
    "FINAL_STATUSES",
    "JobcastError",
    "ProgressTracker",
    "RoomState",
    "StageSummary",
    "Stopped",
    "SyncClient",
    "TERMINAL_EVENTS",
    "WorkerJob",
    "decode_frame",
]
__version__ = "0.1.0"
