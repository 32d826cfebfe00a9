"""The audit trail's storage half (HIPAA 164.312(b)): the sink protocol, a stdout sink, and
the bounded async emitter the request path hands events to. The chained file sink is in
``audit_chain.py``. Nothing here logs or raises an event's content: messages name files,
counts and error types.
"""

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TextIO

import orjson

from phi_gateway.exceptions import AuditError

logger = logging.getLogger("phi_gateway.audit")

# CloudWatch Logs takes events of up to 256 KiB, 26 bytes of which are its own overhead.
MAX_EVENT_BYTES = 256 * 1024 - 26


class AuditSink(Protocol):
    async def write(self, events: Sequence[Mapping[str, Any]]) -> None: ...  # raises AuditError/OSError
    async def close(self) -> None: ...


class StdoutSink:
    """One JSON line per event on stdout (or ``stream``), for a log collector to ship off-host."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    async def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        try:
            data = b"".join(orjson.dumps(dict(e)) + b"\n" for e in events)
        except orjson.JSONEncodeError:
            raise AuditError("audit event is not plain JSON") from None
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        stream = self._stream or sys.stdout  # looked up late: tests and servers replace sys.stdout
        stream.flush()  # whatever was printed as text goes first
        stream.buffer.write(data)
        stream.buffer.flush()

    async def close(self) -> None:
        await asyncio.to_thread((self._stream or sys.stdout).flush)


@dataclass
class AuditStats:
    """Counters for metrics. Always ``emitted == written + dropped + queue_depth``."""

    emitted: int = 0  # events offered to emit()
    written: int = 0  # acknowledged by the sink
    dropped: int = 0  # refused by emit(), or still unwritten when stop() gave up
    write_failures: int = 0  # failed sink.write calls, retries included

    @property
    def queue_depth(self) -> int:
        return self.emitted - self.written - self.dropped


def _describe(exc: BaseException) -> str:
    # Only our own messages and the OS's are known to carry no event content; others show their type.
    if isinstance(exc, AuditError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


class AuditEmitter:
    """Queues events from the request path and writes them to ``sink`` in batches, in order.

    A failed write keeps its batch and is retried with backoff until it succeeds; meanwhile
    ``accepting`` is False. In "block" mode ``accepting`` also turns False at ``max_queue`` events
    pending, but emit() keeps taking events up to twice that, so requests admitted just before
    are still recorded. In "drop" mode emit() drops (and counts) events past ``max_queue``.
    """

    def __init__(
        self,
        sink: AuditSink,
        *,
        max_queue: int = 10_000,
        batch_size: int = 256,
        on_failure: Literal["block", "drop"] = "block",
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_queue < 1 or batch_size < 1:
            raise ValueError("max_queue and batch_size must be at least 1.")
        if on_failure not in ("block", "drop"):
            raise ValueError('on_failure must be "block" or "drop".')
        if not 0 < retry_initial <= retry_max:
            raise ValueError("retry delays must satisfy 0 < retry_initial <= retry_max.")
        self.sink = sink
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.on_failure = on_failure
        self.stats = AuditStats()
        self._limit = max_queue if on_failure == "drop" else 2 * max_queue
        self._retry = (retry_initial, retry_max)
        self._sleep = sleep
        self._queue: deque[dict[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop_lock = asyncio.Lock()
        self._failing = self._stopping = self._closed = self._dropping = False
        self._reserved = 0  # admitted requests whose events are not emitted yet

    def __repr__(self) -> str:
        return (
            f"AuditEmitter({self.sink!r}, on_failure={self.on_failure!r}, accepting={self.accepting}, "
            f"queue_depth={self.stats.queue_depth})"
        )

    @property
    def accepting(self) -> bool:
        running = self._task is not None and not self._task.done() and not self._stopping
        return running and not self._failing and self.stats.queue_depth + self._reserved < self.max_queue

    def admit(self) -> bool:
        """Reserve room for one request's event before it moves PHI; False when there is none.

        An admitted request's event (``emit(..., admitted=True)``) is never dropped in block
        mode, however long the request takes or however many refusals are recorded meanwhile.
        """
        if not self.accepting:
            return False
        self._reserved += 1
        return True

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("audit emitter is stopped")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="phi-gateway audit")

    def emit(self, event: Mapping[str, Any], *, admitted: bool = False) -> bool:
        """Queue a copy of ``event``; False if it was dropped. Raises AuditError if it is not JSON,
        or is over ``MAX_EVENT_BYTES``.

        ``admitted``: the event of a request ``admit()`` let in, which spends its reservation.
        """
        return self.emit_all([event], admitted=admitted)

    def emit_all(self, events: Sequence[Mapping[str, Any]], *, admitted: bool = False) -> bool:
        """``emit`` for the events of one request (a main event and its continuations), as a
        unit: all are queued, in order, or all dropped. Nothing is queued if one is refused."""
        if admitted:
            self._reserved = max(0, self._reserved - 1)
        copies = []
        for event in events:
            try:
                # A round trip through JSON copies deeply and makes sure the sink can serialize
                # it, so one bad event cannot wedge the queue behind it.
                data = orjson.dumps(event)
            except orjson.JSONEncodeError:
                raise AuditError("audit event is not plain JSON") from None
            if len(data) > MAX_EVENT_BYTES:  # a sink would refuse it on every retry
                raise AuditError(f"audit event is {len(data)} bytes, over the {MAX_EVENT_BYTES}-byte limit")
            copy = orjson.loads(data)
            if not isinstance(copy, dict):
                raise AuditError("audit event must be a JSON object")
            copies.append(copy)
        depth = self.stats.queue_depth
        self.stats.emitted += len(copies)
        reserved = admitted and self.on_failure == "block"
        if self._closed or (depth >= self._limit and not reserved):
            self.stats.dropped += len(copies)
            if not self._dropping:  # one line per run of drops, not one per event
                self._dropping = True
                why = "emitter is stopped" if self._closed else f"{depth} events already queued"
                logger.error("audit event dropped: %s (%d dropped so far)", why, self.stats.dropped)
            return False
        self._dropping = False
        self._queue.extend(copies)
        self._wakeup.set()
        return True

    async def stop(self) -> None:
        """Write everything queued, then close the sink. Idempotent.

        To bound the wait, wrap it in ``asyncio.timeout()``: events still unwritten when it is
        cancelled are counted as dropped and logged as a count; the sink is closed either way.
        """
        async with self._stop_lock:
            if self._closed:
                return
            self._stopping = True
            self._wakeup.set()
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._drain())
            try:
                await self._task  # cancelling stop() cancels the drain too
            except asyncio.CancelledError:
                lost = self.stats.queue_depth
                self.stats.dropped += lost
                self._queue.clear()
                logger.error("audit emitter stopped with %d events unwritten", lost)
                raise
            finally:
                self._closed = True
                await self.sink.close()

    async def _drain(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            count = min(self.batch_size, len(self._queue))
            await self._write([self._queue.popleft() for _ in range(count)])

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        delay, failures = self._retry[0], 0
        while True:
            try:
                await self.sink.write(batch)
            except Exception as exc:
                self.stats.write_failures += 1
                failures += 1
                if not self._failing:
                    self._failing = True
                    logger.error(
                        "audit sink write failed (%s); holding %d events and retrying",
                        _describe(exc),
                        self.stats.queue_depth,
                    )
                await self._sleep(delay)
                delay = min(delay * 2, self._retry[1])
                continue
            self.stats.written += len(batch)
            if self._failing:
                self._failing = False
                logger.warning("audit sink recovered after %d failed writes", failures)
            return
