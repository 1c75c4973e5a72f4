"""A local HTTP sink that counts deliveries: the target of side-effect tests.

It accepts ``POST`` on any path at 127.0.0.1 and records every delivery with its
``Idempotency-Key`` header and the ``"key"`` field of its JSON body (the
caller's own id for the thing delivered). Like a payment API, it applies a
delivery once per idempotency key: a delivery whose key it has applied before
is answered with the stored response (header ``Idempotent-Replayed: true``)
and not applied again. A delivery without a key is applied every time.

So a test can count both what the target *received* (raw deliveries) and
what it *applied* (effects), per body key or per idempotency key.

Gates let a test aim at a moment of a delivery, by its body key:

- ``hold_before``: hold the request before applying it, until released (then
  apply and answer) or until the client hangs up (then it is dropped, never applied);
- ``hold_after``: apply it, then hold the answer until released or the client hangs up;
- ``die_before`` / ``die_after``: close the connection without answering, before or
  after applying it (the target died mid-request).

Each gate has events (`Gate.arrived`, `Gate.answered`, `Gate.client_gone`) that a
test waits on instead of sleeping. ``GET /stats`` returns `stats()` as JSON.

    with HttpSink() as sink:
        gate = sink.gate("order-7", "hold_after")
        ... a tool POSTs {"key": "order-7"} to sink.url + "/orders" ...
        gate.arrived.wait(30); ...; gate.release()
        sink.counts("order-7")   # {"received": 1, "applied": 1, ...}
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from typing import Any, Literal

from ._loopback import LoopbackServer, read_request, until_closed

GateMode = Literal["hold_before", "hold_after", "die_before", "die_after"]
MODES = ("hold_before", "hold_after", "die_before", "die_after")


@dataclasses.dataclass
class Delivery:
    """One request, recorded on arrival."""

    n: int
    at: float  # time.monotonic() of arrival
    method: str
    path: str
    idempotency_key: str | None
    key: str | None  # the JSON body's "key" field
    request_id: str | None  # X-Request-Id
    applied: bool = False  # the effect happened with this delivery
    replayed: bool = False  # its idempotency key was applied before: the stored answer was sent
    # "pending", "answered", "client_gone" (hung up before the answer), "died" (closed by a gate)
    outcome: str = "pending"


class Gate:
    """Where to stop one delivery (the next ``times`` whose body key is ``key``)."""

    def __init__(self, key: str, mode: GateMode, times: int) -> None:
        if mode not in MODES:
            raise ValueError(f"gate mode must be one of {MODES}, not {mode!r}")
        self.key = key
        self.mode = mode
        self.times = times
        self.arrived = threading.Event()  # a delivery is at the gate (held, or died there)
        self.answered = threading.Event()  # its whole answer was written
        self.client_gone = threading.Event()  # its client hung up while it was held
        self.delivery: Delivery | None = None
        self._release = threading.Event()
        self._loop_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def release(self) -> None:
        """Let a held delivery go on (apply it and/or answer it)."""
        self._release.set()
        if self._loop is not None and self._loop_event is not None:
            self._loop.call_soon_threadsafe(self._loop_event.set)

    def wait_arrived(self, timeout: float) -> Delivery:
        if not self.arrived.wait(timeout):
            raise TimeoutError(f"no delivery with key {self.key!r} reached the sink's "
                               f"{self.mode} gate within {timeout:g} s")
        assert self.delivery is not None
        return self.delivery

    async def _held(self, reader: asyncio.StreamReader) -> bool:
        """Wait for release or hang-up; True if released."""
        self._loop = asyncio.get_running_loop()
        self._loop_event = asyncio.Event()
        if self._release.is_set():
            return True
        released = asyncio.ensure_future(self._loop_event.wait())
        gone = asyncio.ensure_future(until_closed(reader))
        try:
            await asyncio.wait([released, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hung_up = gone.done() and not gone.cancelled() and gone.exception() is None
            for t in (released, gone):
                t.cancel()
            # the watcher must be gone before anyone reads this connection again
            await asyncio.gather(released, gone, return_exceptions=True)
        if hung_up:
            self.client_gone.set()
            return False
        return True


class HttpSink(LoopbackServer):
    kind = "http sink"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._answers: dict[str, tuple[int, bytes]] = {}  # idempotency key -> stored answer
        self._gates: list[Gate] = []

    def stop(self) -> None:
        for g in self.gates():
            g.release()
        super().stop()

    # -- what tests use -------------------------------------------------------------------

    def gate(self, key: str, mode: GateMode, times: int = 1) -> Gate:
        """Stop the next ``times`` deliveries whose body key is ``key`` (see the module doc)."""
        g = Gate(key, mode, times)
        with self._lock:
            self._gates.append(g)
        return g

    def gates(self) -> list[Gate]:
        with self._lock:
            return list(self._gates)

    def deliveries(self, key: str | None = None) -> list[Delivery]:
        """Every delivery (or those whose body key or idempotency key is ``key``), in order."""
        with self._lock:
            out = [dataclasses.replace(d) for d in self._deliveries]
        if key is not None:
            out = [d for d in out if key in (d.key, d.idempotency_key)]
        return out

    def counts(self, key: str) -> dict[str, Any]:
        """For one body key (or idempotency key): deliveries received, effects applied,
        stored answers replayed, answers written, and the idempotency keys it came with."""
        ds = self.deliveries(key)
        return {"received": len(ds), "applied": sum(d.applied for d in ds),
                "replayed": sum(d.replayed for d in ds),
                "answered": sum(d.outcome == "answered" for d in ds),
                "idempotency_keys": sorted({d.idempotency_key for d in ds
                                            if d.idempotency_key is not None})}

    def stats(self) -> dict[str, Any]:
        ds = self.deliveries()
        by_key: dict[str, dict[str, int]] = {}
        by_idem: dict[str, dict[str, int]] = {}
        for d in ds:
            for table, k in ((by_key, d.key), (by_idem, d.idempotency_key)):
                if k is None:
                    continue
                c = table.setdefault(k, {"received": 0, "applied": 0, "replayed": 0})
                c["received"] += 1
                c["applied"] += d.applied
                c["replayed"] += d.replayed
        return {"deliveries": len(ds), "applied": sum(d.applied for d in ds),
                "by_key": by_key, "by_idempotency_key": by_idem}

    # -- HTTP ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await read_request(reader)
                if req is None or not await self._respond(req, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a client that hung up mid-request, or sent garbage
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _respond(self, req: tuple[str, str, dict[str, str], bytes],
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False closes the connection."""
        method, path, headers, body = req
        if method == "GET" and path.split("?", 1)[0] in ("/stats", "/health"):
            await _send(writer, 200, self.stats() if path.startswith("/stats") else {"ok": True})
            return True
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        key = data.get("key") if isinstance(data, dict) else None
        with self._lock:
            d = Delivery(n=len(self._deliveries) + 1, at=time.monotonic(), method=method,
                         path=path, idempotency_key=headers.get("idempotency-key"),
                         key=str(key) if key is not None else None,
                         request_id=headers.get("x-request-id"))
            self._deliveries.append(d)
            gate = self._take_gate(d)
        if method != "POST":
            d.outcome = "answered"
            await _send(writer, 405, {"error": f"{method} not allowed: POST a delivery"})
            return True
        if gate is not None:
            gate.delivery = d
        if gate is not None and gate.mode == "die_before":
            return self._die(gate, d, writer)
        if gate is not None and gate.mode == "hold_before":
            gate.arrived.set()
            if not await gate._held(reader):
                d.outcome = "client_gone"
                return False
        status, answer, replayed = self._apply(d)
        if gate is not None and gate.mode == "die_after":
            return self._die(gate, d, writer)
        if gate is not None and gate.mode == "hold_after":
            gate.arrived.set()
            if not await gate._held(reader):
                d.outcome = "client_gone"
                return False
        extra = {"Idempotent-Replayed": "true"} if replayed else None
        await _send_bytes(writer, status, answer, extra)
        d.outcome = "answered"
        if gate is not None:
            gate.answered.set()
        return True

    def _take_gate(self, d: Delivery) -> Gate | None:
        for g in self._gates:
            if g.times > 0 and d.key is not None and d.key == g.key:
                g.times -= 1
                return g
        return None

    def _apply(self, d: Delivery) -> tuple[int, bytes, bool]:
        """Apply a delivery once per idempotency key: (status, body, replayed)."""
        with self._lock:
            stored = self._answers.get(d.idempotency_key) if d.idempotency_key else None
            if stored is not None:
                d.replayed = True
                return stored[0], stored[1], True
            d.applied = True
            # a receipt that depends only on what was delivered: the same delivery made by
            # another run (a reference run) gets the same receipt
            ident = d.key or d.idempotency_key or str(d.n)
            receipt = hashlib.sha1(ident.encode()).hexdigest()[:10]
            answer = json.dumps({"ok": True, "key": d.key, "receipt": receipt}).encode()
            if d.idempotency_key:
                self._answers[d.idempotency_key] = (200, answer)
            return 200, answer, False

    def _die(self, gate: Gate, d: Delivery, writer: asyncio.StreamWriter) -> bool:
        d.outcome = "died"
        gate.arrived.set()
        writer.transport.abort()  # a reset, not an orderly close: the target died
        return False


async def _send(writer: asyncio.StreamWriter, status: int, body: Any) -> None:
    await _send_bytes(writer, status, json.dumps(body).encode())


async def _send_bytes(writer: asyncio.StreamWriter, status: int, data: bytes,
                      extra: dict[str, str] | None = None) -> None:
    reason = {200: "OK", 405: "Method Not Allowed"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
             f"Content-Length: {len(data)}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
    await writer.drain()
