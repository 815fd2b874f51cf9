"""The wire format of jobcast's WebSocket protocol: envelopes, frames, close codes.

The protocol description is `proto-docs/protocol.md` in the jobcast repository.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import msgpack

#: Close codes the server sends (`proto-docs/protocol.md`, "Close codes").
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009
CLOSE_DISCONNECTED = 4000
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_UNKNOWN_JOB = 4004
CLOSE_TIMEOUT = 4008
CLOSE_TOO_MANY = 4029

#: Statuses a job never leaves.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

#: The room events that end a job.
TERMINAL_EVENTS = frozenset({"processing_completed", "processing_failed", "job_cancelled"})


@dataclass(frozen=True)
class Envelope:
    """One server message. Room events carry `room`, `seq` and `epoch`; connection-level ones do not."""

    type: str
    data: Any
    id: Optional[str] = None
    room: Optional[str] = None
    seq: Optional[int] = None
    epoch: Optional[str] = None
    ts: Optional[str] = None
    redelivered: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def from_dict(value: Dict[str, Any]) -> "Envelope":
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise ValueError(f"not an envelope: {value!r:.200}")
        seq = value.get("seq")
        return Envelope(
            type=value["type"],
            data=value.get("data"),
            id=value.get("id"),
            room=value.get("room"),
            seq=int(seq) if isinstance(seq, int) else None,
            epoch=value.get("epoch"),
            ts=value.get("ts"),
            redelivered=bool(value.get("redelivered", False)),
            raw=value,
        )


def decode_frame(frame: Union[str, bytes]) -> Envelope:
    """A text frame is JSON; a binary frame is gzip(msgpack(envelope)) (format `auto`, above the
    server's `compress_threshold_bytes`)."""
    if isinstance(frame, str):
        value = json.loads(frame)
    else:
        value = msgpack.unpackb(gzip.decompress(frame), raw=False)
    return Envelope.from_dict(value)


def encode_message(message: Dict[str, Any]) -> str:
    """A client message (always JSON text)."""
    return json.dumps(message, separators=(",", ":"))
