"""The shared async data-key cache in front of a ``KeyProvider``.

Encrypt side: one data key per (master key, SHA-256 of the KMS context), reused until its
age, use count or byte count runs out, so a burst of writes for one context costs one KMS
call. Decrypt side: unwrapped keys under a SHA-256 of (master key, wrapped key, KMS
context), so a list of 100 records under one data key costs one KMS Decrypt. Both are
LRU-bounded.

Single-flight: concurrent misses for one key share one provider call, run as its own
task so that a caller who goes away does not cancel it for the others. Its failure
reaches every waiter. An outage, throttling or a refused access (any ``KeyAccessError``)
is never cached: the next request asks the provider again. One answer is remembered: a
wrapped key the provider refuses as invalid (``InvalidToken``: it does not open under that
master key and context) is answered from memory for ``REFUSAL_TTL`` (60 s), so a forged
or moved token read in a loop cannot turn into one KMS call per read.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from phi_gateway.context import Context, context_digest, encode_context
from phi_gateway.exceptions import InvalidToken
from phi_gateway.keys import DataKey, KeyProvider

# Per-request hit/miss counts for the audit trail. A context variable, because one cache
# serves every request at once; tasks a request spawns share its counter.
_REQUEST_COUNTS: contextvars.ContextVar[Counter[str] | None] = contextvars.ContextVar(
    "phi_gateway_cache_counts", default=None
)


@contextmanager
def counting_requests() -> Iterator[Counter[str]]:
    """Counts the cache hits and misses of the code run inside it (this task and its children)."""
    counts: Counter[str] = Counter()
    token = _REQUEST_COUNTS.set(counts)
    try:
        yield counts
    finally:
        _REQUEST_COUNTS.reset(token)


def _count(what: str) -> None:
    counts = _REQUEST_COUNTS.get()
    if counts is not None:
        counts[what] += 1


# NIST SP 800-38D: at most 2^32 invocations of GCM with random IVs under one key.
GCM_RANDOM_IV_LIMIT = 2**32


@dataclass
class CacheStats:
    """Counters for metrics; monotonic over the cache's life."""

    encrypt_hits: int = 0
    encrypt_misses: int = 0
    decrypt_hits: int = 0
    decrypt_misses: int = 0
    generate_calls: int = 0
    decrypt_calls: int = 0
    evictions: int = 0  # dropped for capacity
    expirations: int = 0  # dropped for age, uses or bytes
    refusals: int = 0  # unwraps answered "does not open" from memory, without a key-service call

    @property
    def provider_calls(self) -> int:
        return self.generate_calls + self.decrypt_calls


class _Entry:
    __slots__ = ("bytes", "created", "key", "uses")

    def __init__(self, key: DataKey, created: float) -> None:
        self.key = key
        self.created = created
        self.uses = 0
        self.bytes = 0


# Seconds a wrapped key that did not open (InvalidToken) is refused from memory, per
# (master key, wrapped key, KMS context). Outages and access errors are never remembered.
REFUSAL_TTL = 60.0


class DataKeyCache:
    """Caches data keys from ``provider`` for ``ttl`` seconds; ``clock`` is injectable."""

    def __init__(
        self,
        provider: KeyProvider,
        *,
        ttl: float = 300.0,
        max_uses: int = 2**20,
        max_bytes: int = 2**32,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (0 < ttl < math.inf):
            raise ValueError("cache ttl must be a positive number of seconds.")
        if not 1 <= max_uses <= GCM_RANDOM_IV_LIMIT:
            raise ValueError("max_uses must be between 1 and 2**32 (NIST SP 800-38D).")
        if max_bytes < 1 or capacity < 1:
            raise ValueError("max_bytes and capacity must be at least 1.")
        self.provider = provider
        self.ttl = ttl
        self.max_uses = max_uses
        self.max_bytes = max_bytes
        self.capacity = capacity
        self.stats = CacheStats()
        self._clock = clock
        self._encrypt: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._decrypt: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._flights: dict[Hashable, asyncio.Task[_Entry]] = {}
        # Wrapped keys that did not open under a context, remembered for REFUSAL_TTL: a forged
        # or moved token read again and again must not cost a KMS call each time.
        self._refused: OrderedDict[Hashable, float] = OrderedDict()
        self._generation = 0

    def __repr__(self) -> str:
        return (
            f"DataKeyCache(ttl={self.ttl}, max_uses={self.max_uses}, capacity={self.capacity}, "
            f"encrypt_entries={len(self._encrypt)}, decrypt_entries={len(self._decrypt)})"
        )

    def __len__(self) -> int:
        return len(self._encrypt) + len(self._decrypt)

    def clear(self) -> None:
        """Forget every key; keys still being fetched are not stored when they arrive."""
        self._generation += 1
        self._encrypt.clear()
        self._decrypt.clear()
        self._refused.clear()

    async def encryption_key(
        self, context: Context, *, master_key: str | None = None, uses: int = 1, nbytes: int = 0
    ) -> DataKey:
        """A data key for ``context`` with ``uses`` encryptions of ``nbytes`` reserved on it."""
        context = dict(context)  # the caller's mapping may change while we wait
        key = self.cached_encryption_key(context, master_key=master_key, uses=uses, nbytes=nbytes)
        if key is not None:
            return key
        master = master_key or self.provider.default_master_key
        slot = ("encrypt", master, context_digest(context))
        self.stats.encrypt_misses += 1
        _count("misses")
        while True:
            # Reserve on the entry this flight made, even if it has since been evicted or aged:
            # looking it up again could miss it and call KMS once more, without end.
            entry = await self._fly(
                slot, lambda generation: self._generate(slot, master, context, generation)
            )
            if self._reserve(entry, uses, nbytes):
                return entry.key
            # Others used this fresh key up first; each round serves at least one caller.

    async def decryption_key(self, key_ref: str, wrapped: bytes, context: Context) -> DataKey:
        """The unwrapped data key of a token, bound to the KMS ``context``."""
        context = dict(context)
        slot = self._decrypt_slot(key_ref, wrapped, context)
        entry = self._live(self._decrypt, slot)
        if entry is not None:
            self.stats.decrypt_hits += 1
            _count("hits")
            return entry.key
        refused = self._refused.get(slot)
        if refused is not None:
            if self._clock() - refused < REFUSAL_TTL:
                self.stats.refusals += 1
                raise InvalidToken()
            del self._refused[slot]
        self.stats.decrypt_misses += 1
        _count("misses")
        entry = await self._fly(
            slot, lambda generation: self._unwrap(slot, key_ref, wrapped, context, generation)
        )
        return entry.key

    def cached_encryption_key(
        self, context: Context, *, master_key: str | None = None, uses: int = 1, nbytes: int = 0
    ) -> DataKey | None:
        """The cached data key for ``context`` with ``uses`` reserved on it, if one is live and
        has room; never calls the provider (a document's keys are looked up without a task)."""
        if not 1 <= uses <= self.max_uses or not 0 <= nbytes <= self.max_bytes:
            raise ValueError("one request may not reserve more than max_uses / max_bytes.")
        master = master_key or self.provider.default_master_key
        entry = self._live(self._encrypt, ("encrypt", master, context_digest(context)))
        if entry is None or not self._reserve(entry, uses, nbytes):
            return None
        self.stats.encrypt_hits += 1
        _count("hits")
        return entry.key

    def cached_decryption_key(self, key_ref: str, wrapped: bytes, context: Context) -> DataKey | None:
        """The data key if it is cached under this KMS ``context``; never calls the provider."""
        entry = self._live(self._decrypt, self._decrypt_slot(key_ref, wrapped, context))
        if entry is None:
            return None
        self.stats.decrypt_hits += 1
        _count("hits")
        return entry.key

    def _reserve(self, entry: _Entry, uses: int, nbytes: int) -> bool:
        if entry.uses + uses > self.max_uses or entry.bytes + nbytes > self.max_bytes:
            return False
        entry.uses += uses
        entry.bytes += nbytes
        return True

    @staticmethod
    def _decrypt_slot(key_ref: str, wrapped: bytes, context: Context) -> Hashable:
        digest = hashlib.sha256(encode_context({"key_ref": key_ref}))
        digest.update(len(wrapped).to_bytes(4, "big"))
        digest.update(wrapped)
        digest.update(encode_context(context))
        return ("decrypt", digest.digest())

    def _live(self, table: OrderedDict[Hashable, _Entry], slot: Hashable) -> _Entry | None:
        entry = table.get(slot)
        if entry is None:
            return None
        if self._clock() - entry.created >= self.ttl:
            self._drop(table, slot)
            return None
        if table is self._encrypt and (entry.uses >= self.max_uses or entry.bytes >= self.max_bytes):
            self._drop(table, slot)  # used up: the next caller makes a new one
            return None
        table.move_to_end(slot)
        return entry

    def _drop(self, table: OrderedDict[Hashable, _Entry], slot: Hashable) -> None:
        # Dropping the last reference frees the AES-GCM context; OpenSSL cleanses it.
        if table.pop(slot, None) is not None:
            self.stats.expirations += 1

    def _store(self, table: OrderedDict[Hashable, _Entry], slot: Hashable, entry: _Entry) -> None:
        table[slot] = entry
        table.move_to_end(slot)
        while len(table) > self.capacity:
            table.popitem(last=False)
            self.stats.evictions += 1

    async def _fly(self, slot: Hashable, call: Callable[[int], Awaitable[_Entry]]) -> _Entry:
        task = self._flights.get(slot)
        if task is None:
            task = asyncio.ensure_future(call(self._generation))
            self._flights[slot] = task
            task.add_done_callback(lambda t: self._landed(slot, t))
        return await asyncio.shield(task)

    def _landed(self, slot: Hashable, task: asyncio.Task[_Entry]) -> None:
        if self._flights.get(slot) is task:
            del self._flights[slot]
        if not task.cancelled():
            task.exception()  # retrieved here so a flight nobody awaits any more is not logged

    async def _generate(self, slot: Hashable, master: str, context: Context, generation: int) -> _Entry:
        self.stats.generate_calls += 1
        key = await self.provider.generate_data_key(master, context)
        entry = _Entry(key, self._clock())
        if generation == self._generation:
            self._store(self._encrypt, slot, entry)
            # What this process just wrote, it can read back without a Decrypt call.
            readback = _Entry(key, entry.created)
            self._store(self._decrypt, self._decrypt_slot(key.key_ref, key.wrapped, context), readback)
        return entry

    async def _unwrap(
        self, slot: Hashable, key_ref: str, wrapped: bytes, context: Context, generation: int
    ) -> _Entry:
        self.stats.decrypt_calls += 1
        try:
            key = await self.provider.decrypt_data_key(key_ref, wrapped, context)
        except InvalidToken:
            if generation == self._generation:
                self._refused[slot] = self._clock()
                while len(self._refused) > self.capacity:
                    self._refused.popitem(last=False)
            raise
        entry = _Entry(key, self._clock())
        if generation == self._generation:
            self._store(self._decrypt, slot, entry)
        return entry
