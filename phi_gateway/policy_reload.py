"""Hot reload of policy files: on SIGHUP and when their contents change (polled, which also
sees Kubernetes ConfigMap updates, delivered by swapping a symlink). A new set is loaded and
checked completely before it is swapped in with one assignment; an invalid set is rejected,
logged with its problems and counted, and the set in force stays. A request keeps the set it
started with (``PHIMiddleware`` takes it once per request)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from phi_gateway.exceptions import PolicyError
from phi_gateway.metrics import Metrics
from phi_gateway.policy import load_policies, policy_files
from phi_gateway.rules import PolicySet

log = logging.getLogger("phi_gateway.policy")


def fingerprint(paths: Sequence[str | Path]) -> bytes:
    """A digest of the policy files' names and contents; unreadable files count as a change."""
    digest = hashlib.sha256()
    try:
        for file in policy_files(paths):
            content = file.read_bytes()
            digest.update(f"{file}\0{len(content)}\0".encode())
            digest.update(content)
    except OSError as exc:
        digest.update(f"unreadable: {exc.errno}".encode())
    return digest.digest()


class PolicyReloader:
    """Holds the policy set in force; ``policies`` is what ``PHIMiddleware`` calls per request."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        interval: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        if interval < 0:
            raise ValueError("policy reload interval cannot be negative.")
        self.paths = list(paths)
        self.interval = interval
        self.metrics = metrics
        self._seen = fingerprint(self.paths)
        self.current: PolicySet = load_policies(self.paths)  # a broken set at start is fatal
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._signal = False
        self._signalled: set[asyncio.Task[bool]] = set()

    def policies(self) -> PolicySet:
        return self.current

    async def reload(self, reason: str) -> bool:
        """Load the files now; True if a new set is in force."""
        async with self._lock:
            seen = await asyncio.to_thread(fingerprint, self.paths)
            try:
                loaded = await asyncio.to_thread(load_policies, self.paths)
            except PolicyError as exc:
                self._seen = seen  # the same broken files are not retried every interval
                log.error(
                    "policy reload (%s) rejected, the policies in force stay: %d problem(s)\n%s",
                    reason,
                    len(exc.problems),
                    exc,
                )
                if self.metrics is not None:
                    self.metrics.policy_reloads.labels("rejected").inc()
                return False
            self._seen, self.current = seen, loaded
        log.info(
            "policies reloaded (%s): %d route(s) from %s", reason, len(loaded.routes), ", ".join(loaded.names)
        )
        if self.metrics is not None:
            self.metrics.policy_reloads.labels("loaded").inc()
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                if await asyncio.to_thread(fingerprint, self.paths) != self._seen:
                    await self.reload("files changed")
            except Exception as exc:  # keep watching: the next change may load
                log.error("policy reload failed: %s", type(exc).__name__)

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"))
        self._signalled.add(task)  # a reference until done: the loop keeps only a weak one
        task.add_done_callback(self._signalled.discard)

    def start(self) -> None:
        """Start watching; SIGHUP only where this loop may handle signals (the main thread)."""
        loop = asyncio.get_running_loop()
        if self.interval > 0 and self._task is None:
            self._task = loop.create_task(self._watch(), name="phi-gateway policy reload")
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._signal = True
        except (ValueError, RuntimeError, NotImplementedError, AttributeError):
            log.debug("SIGHUP reload not available in this thread")

    async def stop(self) -> None:
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._signal = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
