"""An asyncio subscriber of jobcast rooms.

`Client` keeps one WebSocket open: it authenticates with an access token (sent in the
`authenticate` message, never in the URL), reconnects with exponential backoff and jitter when the
connection drops, subscribes again to every room with `since` = the last event it saw (so nothing
is missed, or it is told `recovered: false`), drops duplicates, acknowledges events with `ack=1`,
refreshes the token before it expires, and decodes binary (gzip + msgpack) frames.

    async with Client("http://127.0.0.1:8080", token=lambda: my_access_jwt()) as client:
        await client.subscribe(f"job:{job_id}")
        async for event in client.events():
            print(event.type, event.data)
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Optional, Union

import websockets
from websockets.exceptions import ConnectionClosed

from .protocol import (
    CLOSE_FORBIDDEN,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_JOB,
    Envelope,
    decode_frame,
    encode_message,
)

#: Something that gives an access token: the token itself, or a (possibly async) function.
TokenSource = Union[str, Callable[[], str], Callable[[], Awaitable[str]]]


class AuthError(Exception):
    """The server refused the credentials for good (a fresh token was refused too)."""


class Stopped(Exception):
    """The client was closed, or stopped for a reason it cannot recover from."""


@dataclass
class RoomState:
    """Where the client is in one room."""

    room: str
    seq: int = 0
    epoch: Optional[str] = None
    #: The last `subscribed` answer's `recovered` (False: events were lost; see `snapshot`).
    recovered: bool = True
    snapshot: Optional[Dict[str, Any]] = None


async def _token(source: TokenSource) -> str:
    if isinstance(source, str):
        return source
    value = source()
    if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
        return str(await value)
    return str(value)


def ws_url(server: str, ack: bool, fmt: str) -> str:
    """The `/ws` URL of a server given as `http(s)://host:port` or `ws(s)://host:port`."""
    base = server.rstrip("/")
    if base.startswith("http://"):
        base = "ws://" + base[len("http://") :]
    elif base.startswith("https://"):
        base = "wss://" + base[len("https://") :]
    query = f"format={fmt}" + ("&ack=1" if ack else "")
    return f"{base}/ws?{query}"


class Client:
    """A reconnecting subscriber. Use it as an async context manager, or call `start` and `close`."""

    def __init__(
        self,
        server: str,
        token: TokenSource,
        *,
        ack: bool = False,
        format: str = "auto",
        backoff_initial: float = 0.25,
        backoff_max: float = 10.0,
        max_queue: int = 10_000,
    ) -> None:
        self._url = ws_url(server, ack, format)
        self._token = token
        self._ack = ack
        self._backoff = (backoff_initial, backoff_max)
        self.rooms: Dict[str, RoomState] = {}
        self._queue: "asyncio.Queue[Union[Envelope, BaseException]]" = asyncio.Queue(max_queue)
        self._ws: Optional[Any] = None
        #: Set once the open connection is authenticated (rooms are subscribed only then).
        self._ready = False
        self._task: Optional["asyncio.Task[None]"] = None
        self._attempt = 0
        self._refused = 0
        self._closed = False
        self._connected = asyncio.Event()
        #: How many times a connection was (re)opened.
        self.connections = 0
        #: Duplicate events dropped (a resume overlapping what was already seen).
        self.duplicates = 0

    async def __aenter__(self) -> "Client":
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connects in the background; returns once the first connection is authenticated."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        done, _ = await asyncio.wait(
            {asyncio.ensure_future(self._connected.wait()), self._task}, return_when=asyncio.FIRST_COMPLETED
        )
        if self._task in done:
            self._task.result()

    async def close(self) -> None:
        """Closes the connection for good."""
        self._closed = True
        try:
            self._queue.put_nowait(Stopped("closed"))
        except asyncio.QueueFull:
            pass
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    async def subscribe(self, room: str) -> None:
        """Follows `room` from now on (and, after a reconnect, from the last event seen)."""
        state = self.rooms.setdefault(room, RoomState(room))
        if self._ws is not None and self._ready:
            await self._send_subscribe(state)

    async def unsubscribe(self, room: str) -> None:
        """Stops following `room`."""
        self.rooms.pop(room, None)
        if self._ws is not None and self._ready:
            await self._ws.send(encode_message({"type": "unsubscribe", "room": room}))

    async def cancel(self, job_id: str) -> None:
        """Asks the server to cancel a job (the answer comes as room events or an `error`)."""
        if self._ws is None:
            raise Stopped("not connected")
        await self._ws.send(encode_message({"type": "cancel", "job_id": job_id}))

    async def events(self) -> AsyncIterator[Envelope]:
        """Every message as it comes: room events (deduplicated, in `seq` order) and connection-level
        ones (`subscribed`, `error`, ...). Ends when the client stops."""
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def next(self, timeout: Optional[float] = None) -> Envelope:
        """The next message (see `events`)."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def drop(self) -> None:
        """Drops the connection as a network failure would (the client reconnects and resumes)."""
        if self._ws is not None:
            await self._ws.close(code=4999, reason="dropped by the client")

    # ---- the connection loop ----

    async def _run(self) -> None:
        self._attempt = 0
        self._refused = 0
        while not self._closed:
            try:
                async with websockets.connect(self._url, max_size=32 << 20, open_timeout=10) as ws:
                    self._ws = ws
                    await self._session(ws)
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd is not None else None
                if code == CLOSE_UNAUTHORIZED:
                    self._refused += 1
                    if self._refused >= 2:
                        return await self._fail(AuthError(f"the server refused the token twice ({e.rcvd})"))
                elif code in (CLOSE_FORBIDDEN, CLOSE_UNKNOWN_JOB):
                    return await self._fail(Stopped(f"refused for good: {e.rcvd}"))
                elif code == CLOSE_TOO_MANY:
                    self._attempt += 2
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake):
                pass
            except Exception as e:  # a frame that does not decode: the server is not one we speak to
                return await self._fail(Stopped(f"stopped: {e!r}"))
            finally:
                self._ws = None
                self._ready = False
                self._connected.clear()
            if self._closed:
                break
            self._attempt += 1
            initial, cap = self._backoff
            await asyncio.sleep(random.uniform(0, min(cap, initial * 2 ** min(self._attempt, 16))))
        try:
            self._queue.put_nowait(Stopped("closed"))
        except asyncio.QueueFull:
            pass

    async def _fail(self, error: BaseException) -> None:
        self._closed = True
        await self._queue.put(error)
        if not self._connected.is_set():
            raise error

    async def _session(self, ws: Any) -> None:
        await ws.send(encode_message({"type": "authenticate", "token": await _token(self._token)}))
        async for frame in ws:
            env = decode_frame(frame)
            if env.type == "authenticated":
                self.connections += 1
                self._attempt = self._refused = 0
                self._ready = True
                for state in list(self.rooms.values()):
                    await self._send_subscribe(state)
                self._connected.set()
            elif env.type == "token_expiring":
                await ws.send(encode_message({"type": "refresh", "token": await _token(self._token)}))
            elif env.type == "subscribed" and isinstance(env.data, dict):
                self._subscribed(env.data)
            if env.room is not None and env.seq is not None:
                if not self._fresh(env):
                    self.duplicates += 1
                    if self._ack:  # seen already, so acknowledged again (the server stops resending)
                        await ws.send(encode_message({"type": "ack", "room": env.room, "seq": env.seq}))
                    continue
                if self._ack:
                    await ws.send(encode_message({"type": "ack", "room": env.room, "seq": env.seq}))
            await self._queue.put(env)

    async def _send_subscribe(self, state: RoomState) -> None:
        message: Dict[str, Any] = {"type": "subscribe", "room": state.room}
        if state.epoch is not None and state.seq > 0:
            message["since"] = {"seq": state.seq, "epoch": state.epoch}
        assert self._ws is not None
        await self._ws.send(encode_message(message))

    def _subscribed(self, data: Dict[str, Any]) -> None:
        state = self.rooms.get(str(data.get("room")))
        if state is None:
            return
        state.recovered = bool(data.get("recovered", True))
        state.snapshot = data.get("snapshot")
        if not state.recovered or data.get("epoch") != state.epoch:
            # Starting over: the room's history from here on.
            state.epoch = data.get("epoch")
            state.seq = int(data.get("seq", 0)) - int(data.get("replayed", 0))

    def _fresh(self, env: Envelope) -> bool:
        """Whether a room event is new (not one already seen); records it."""
        state = self.rooms.get(env.room or "")
        if state is None:
            return True
        assert env.seq is not None
        if env.epoch != state.epoch:
            state.epoch, state.seq = env.epoch, env.seq
            return True
        if env.seq <= state.seq:
            return False
        state.seq = env.seq
        return True
