"""A small asyncio server on a loopback port, in a thread of its own: the lifecycle the
local provider server and the HTTP sink share (tests and demos start them in process)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, TypeVar

S = TypeVar("S", bound="LoopbackServer")


class LoopbackServer:
    """Subclasses implement ``_connection(reader, writer)``; ``port=0`` picks a free port."""

    kind = "loopback server"
    backlog = 512
    read_limit = 1 << 16

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self: S, timeout: float = 10.0) -> S:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"{self.kind.replace(' ', '-')}-{id(self):x}")
        self._thread.start()
        if not self._ready.wait(timeout) or self._start_error is not None:
            raise RuntimeError(f"{self.kind} did not start: {self._start_error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_ready(self) -> None:
        """Called in the server's loop once it listens."""

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> Any:
        raise NotImplementedError

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._start_error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        handlers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers[task] = writer
            try:
                await self._connection(reader, writer)
            finally:
                handlers.pop(task, None)

        server = await asyncio.start_server(on_connect, self.host, self.port,
                                            backlog=self.backlog, limit=self.read_limit)
        self.port = server.sockets[0].getsockname()[1]
        self._on_ready()
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            # closing the sockets (not cancelling the tasks) lets every handler, one held
            # open by a fault or a gate included, end the ordinary way
            for writer in list(handlers.values()):
                writer.transport.abort()
            if handlers:
                await asyncio.wait(list(handlers), timeout=5)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    """One HTTP/1.1 request: (method, target, lower-cased headers, body); None at EOF."""
    line = await reader.readline()
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return method, target, headers, body


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Returns when the client hangs up."""
    while await reader.read(65536):
        pass
