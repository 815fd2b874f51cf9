"""A thin synchronous wrapper of `Client`: its event loop runs on a thread of its own.

    with SyncClient("http://127.0.0.1:8080", token) as client:
        client.subscribe(f"job:{job_id}")
        for event in client.events(timeout=30):
            print(event.type)
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, Iterator, Optional, TypeVar

from .client import Client, Stopped, TokenSource
from .protocol import Envelope

T = TypeVar("T")


class SyncClient:
    """`Client` for synchronous code (scripts, Django views, Celery tasks)."""

    def __init__(self, server: str, token: TokenSource, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jobcast-client", daemon=True)
        self._thread.start()
        self._client = self._call(self._make(server, token, options))
        self._call(self._client.start())

    async def _make(self, server: str, token: TokenSource, options: Any) -> Client:
        return Client(server, token, **options)

    def _call(self, coro: "Coroutine[Any, Any, T]", timeout: Optional[float] = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def client(self) -> Client:
        """The asyncio client underneath."""
        return self._client

    def subscribe(self, room: str) -> None:
        self._call(self._client.subscribe(room))

    def unsubscribe(self, room: str) -> None:
        self._call(self._client.unsubscribe(room))

    def cancel(self, job_id: str) -> None:
        self._call(self._client.cancel(job_id))

    def next(self, timeout: Optional[float] = None) -> Envelope:
        """The next message; `TimeoutError` when none came within `timeout` seconds."""
        return self._call(self._client.next(timeout))

    def events(self, timeout: Optional[float] = None) -> Iterator[Envelope]:
        """Messages until the client stops (or none came within `timeout` seconds: `TimeoutError`)."""
        while True:
            try:
                yield self.next(timeout)
            except Stopped:
                return

    def close(self) -> None:
        try:
            self._call(self._client.close(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
