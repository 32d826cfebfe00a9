"""The data-key cache: single-flight, limits, LRU, failures, against real providers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from phi_gateway import envelope
from phi_gateway.cache import REFUSAL_TTL, DataKeyCache
from phi_gateway.context import Context
from phi_gateway.exceptions import (
    InvalidToken,
    KeyAccessDenied,
    KeyAccessError,
    KeyThrottled,
    KeyUnavailable,
    UnknownMasterKey,
)
from phi_gateway.keys import DataKey, KeyProvider
from phi_gateway.kms import KmsKeyProvider

CONTEXT = {"ResourceId": "patient-123", "Purpose": "PHI_Storage"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counting:
    """Passes through to a real provider, counting calls and optionally failing them."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.generated = 0
        self.decrypted = 0
        self.fail_next = 0
        self.failure: type[KeyAccessError] = KeyUnavailable
        self.gate: asyncio.Event | None = None

    @property
    def default_master_key(self) -> str:
        return self.inner.default_master_key

    async def _enter(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise self.failure("injected failure")

    async def generate_data_key(self, master_key: str, context: Context) -> DataKey:
        self.generated += 1
        await self._enter()
        return await self.inner.generate_data_key(master_key, context)

    async def decrypt_data_key(self, key_ref: str, wrapped: bytes, context: Context) -> DataKey:
        self.decrypted += 1
        await self._enter()
        return await self.inner.decrypt_data_key(key_ref, wrapped, context)

    async def rewrap(self, *args: Any, **kwargs: Any) -> tuple[str, bytes]:
        return await self.inner.rewrap(*args, **kwargs)


@pytest.fixture
def counting(provider: KeyProvider) -> Counting:
    return Counting(provider)


async def test_cold_burst_of_100_encrypts_makes_exactly_one_call(counting: Counting) -> None:
    cache = DataKeyCache(counting)
    keys = await asyncio.gather(*(cache.encryption_key(CONTEXT) for _ in range(100)))
    assert counting.generated == 1 and cache.stats.generate_calls == 1
    assert len({id(k) for k in keys}) == 1
    assert cache.stats.encrypt_misses == 100 and cache.stats.encrypt_hits == 0
    await cache.encryption_key(CONTEXT)
    assert cache.stats.encrypt_hits == 1 and counting.generated == 1


async def test_burst_against_kms_server_is_one_generate_data_key(kms: KmsKeyProvider) -> None:
    counting = Counting(kms)
    cache = DataKeyCache(counting)
    await asyncio.gather(*(cache.encryption_key(CONTEXT) for _ in range(100)))
    assert counting.generated == 1


async def test_distinct_contexts_get_distinct_keys(keyring: KeyProvider) -> None:
    cache = DataKeyCache(keyring)
    a = await cache.encryption_key(CONTEXT)
    b = await cache.encryption_key({**CONTEXT, "ResourceId": "patient-124"})
    assert a is not b and a.wrapped != b.wrapped
    assert cache.stats.generate_calls == 2


async def test_ttl_expiry_makes_a_new_key(keyring: KeyProvider) -> None:
    clock = Clock()
    cache = DataKeyCache(keyring, ttl=300, clock=clock)
    first = await cache.encryption_key(CONTEXT)
    clock.now += 299.9
    assert await cache.encryption_key(CONTEXT) is first
    clock.now += 0.1
    second = await cache.encryption_key(CONTEXT)
    assert second is not first and cache.stats.generate_calls == 2 and cache.stats.expirations == 1


async def test_max_uses_makes_a_new_key_and_reservations_are_counted(keyring: KeyProvider) -> None:
    cache = DataKeyCache(keyring, max_uses=10)
    first = await cache.encryption_key(CONTEXT, uses=7)
    assert await cache.encryption_key(CONTEXT, uses=3) is first
    second = await cache.encryption_key(CONTEXT, uses=1)
    assert second is not first
    with pytest.raises(ValueError, match="max_uses"):
        await cache.encryption_key(CONTEXT, uses=11)


async def test_max_bytes_makes_a_new_key(keyring: KeyProvider) -> None:
    cache = DataKeyCache(keyring, max_bytes=100)
    first = await cache.encryption_key(CONTEXT, nbytes=60)
    assert await cache.encryption_key(CONTEXT, nbytes=40) is first
    assert await cache.encryption_key(CONTEXT, nbytes=1) is not first


async def test_capacity_evicts_least_recently_used(keyring: KeyProvider) -> None:
    cache = DataKeyCache(keyring, capacity=2)
    a = await cache.encryption_key({"id": "a"})
    await cache.encryption_key({"id": "b"})
    assert await cache.encryption_key({"id": "a"}) is a  # a is now most recent
    await cache.encryption_key({"id": "c"})  # evicts b
    assert cache.stats.evictions >= 1
    assert await cache.encryption_key({"id": "a"}) is a
    calls = cache.stats.generate_calls
    await cache.encryption_key({"id": "b"})
    assert cache.stats.generate_calls == calls + 1


async def test_failure_reaches_every_waiter_and_is_not_cached(counting: Counting) -> None:
    cache = DataKeyCache(counting)
    counting.fail_next = 1
    results = await asyncio.gather(
        *(cache.encryption_key(CONTEXT) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, KeyUnavailable) for r in results)
    assert counting.generated == 1
    assert isinstance(await cache.encryption_key(CONTEXT), DataKey)
    assert counting.generated == 2


async def test_a_waiter_going_away_does_not_cancel_the_call_for_others(counting: Counting) -> None:
    cache = DataKeyCache(counting)
    counting.gate = asyncio.Event()
    leader = asyncio.create_task(cache.encryption_key(CONTEXT))
    follower = asyncio.create_task(cache.encryption_key(CONTEXT))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    counting.gate.set()
    key = await follower
    assert leader.cancelled() and isinstance(key, DataKey)
    assert counting.generated == 1
    assert await cache.encryption_key(CONTEXT) is key


async def test_a_list_of_records_under_one_data_key_costs_one_decrypt(counting: Counting) -> None:
    writer = DataKeyCache(counting.inner)
    key = await writer.encryption_key(CONTEXT)
    tokens = [envelope.parse(envelope.encrypt(key, i, context=CONTEXT, field="$.n")) for i in range(100)]
    reader = DataKeyCache(counting)
    keys = await asyncio.gather(*(reader.decryption_key(t.key_ref, t.wrapped_key, CONTEXT) for t in tokens))
    assert counting.decrypted == 1 and reader.stats.decrypt_calls == 1
    values = [envelope.decrypt(k, t, context=CONTEXT, field="$.n") for k, t in zip(keys, tokens, strict=True)]
    assert values == list(range(100))


async def test_keys_this_process_made_are_read_back_without_a_decrypt_call(counting: Counting) -> None:
    cache = DataKeyCache(counting)
    key = await cache.encryption_key(CONTEXT)
    assert await cache.decryption_key(key.key_ref, key.wrapped, CONTEXT) is key
    assert counting.decrypted == 0


async def test_decrypt_side_is_keyed_by_context_too(counting: Counting) -> None:
    cache = DataKeyCache(counting)
    key = await cache.encryption_key(CONTEXT)
    with pytest.raises(InvalidToken):
        await cache.decryption_key(key.key_ref, key.wrapped, {**CONTEXT, "ResourceId": "other"})
    assert counting.decrypted == 1


async def test_a_key_that_does_not_open_is_refused_from_memory_for_a_while(counting: Counting) -> None:
    # A forged or moved token read again and again must not cost a key-service call each time.
    clock = Clock()
    key = await DataKeyCache(counting.inner).encryption_key(CONTEXT)
    cache = DataKeyCache(counting, clock=clock)
    moved = {**CONTEXT, "ResourceId": "other"}
    for _ in range(5):
        with pytest.raises(InvalidToken):
            await cache.decryption_key(key.key_ref, key.wrapped, moved)
    assert counting.decrypted == 1 and cache.stats.refusals == 4
    assert await cache.decryption_key(key.key_ref, key.wrapped, CONTEXT)  # its own context opens
    clock.now += REFUSAL_TTL
    with pytest.raises(InvalidToken):
        await cache.decryption_key(key.key_ref, key.wrapped, moved)
    assert counting.decrypted == 3  # asked again once the refusal aged


@pytest.mark.parametrize("failure", [KeyUnavailable, KeyThrottled, KeyAccessDenied, UnknownMasterKey])
async def test_an_outage_or_access_error_is_never_remembered(
    counting: Counting, failure: type[KeyAccessError]
) -> None:
    # Only InvalidToken is remembered (REFUSAL_TTL); anything else is asked again at once.
    key = await DataKeyCache(counting.inner).encryption_key(CONTEXT)
    cache = DataKeyCache(counting)
    counting.fail_next, counting.failure = 1, failure
    with pytest.raises(failure):
        await cache.decryption_key(key.key_ref, key.wrapped, CONTEXT)
    assert await cache.decryption_key(key.key_ref, key.wrapped, CONTEXT)
    assert cache.stats.refusals == 0 and counting.decrypted == 2


async def test_decrypt_side_ttl(counting: Counting) -> None:
    clock = Clock()
    writer = DataKeyCache(counting.inner)
    key = await writer.encryption_key(CONTEXT)
    reader = DataKeyCache(counting, ttl=10, clock=clock)
    await reader.decryption_key(key.key_ref, key.wrapped, CONTEXT)
    await reader.decryption_key(key.key_ref, key.wrapped, CONTEXT)
    clock.now += 10
    await reader.decryption_key(key.key_ref, key.wrapped, CONTEXT)
    assert counting.decrypted == 2 and reader.stats.decrypt_hits == 1


async def test_more_contexts_in_flight_than_capacity_still_one_call_each(keyring: KeyProvider) -> None:
    counting = Counting(keyring)
    cache = DataKeyCache(counting, capacity=10)
    contexts = [{"ResourceId": str(i)} for i in range(200)]
    keys = await asyncio.gather(*(cache.encryption_key(c) for c in contexts for _ in range(3)))
    assert counting.generated == 200
    assert all(keys[3 * i] is keys[3 * i + 2] for i in range(200))
    assert len(cache) <= 20


async def test_a_key_made_for_waiters_serves_them_even_if_it_aged_meanwhile(keyring: KeyProvider) -> None:
    clock = Clock()
    counting = Counting(keyring)
    counting.gate = asyncio.Event()
    cache = DataKeyCache(counting, ttl=0.001, clock=clock)
    waiters = [asyncio.create_task(cache.encryption_key(CONTEXT)) for _ in range(50)]
    await asyncio.sleep(0)
    clock.now += 10  # every waiter wakes after the key's TTL
    counting.gate.set()
    keys = await asyncio.gather(*waiters)
    assert counting.generated == 1 and len({id(k) for k in keys}) == 1


async def test_clear_during_a_fetch_does_not_store_its_result(counting: Counting) -> None:
    cache = DataKeyCache(counting)
    counting.gate = asyncio.Event()
    waiter = asyncio.create_task(cache.encryption_key(CONTEXT))
    await asyncio.sleep(0)
    cache.clear()
    counting.gate.set()
    first = await waiter
    assert len(cache) == 0
    assert await cache.encryption_key(CONTEXT) is not first


async def test_context_changed_by_the_caller_during_the_wait_does_not_leak_in(counting: Counting) -> None:
    cache = DataKeyCache(counting)
    counting.gate = asyncio.Event()
    context = dict(CONTEXT)
    waiter = asyncio.create_task(cache.encryption_key(context))
    await asyncio.sleep(0)
    context["ResourceId"] = "patient-999"
    counting.gate.set()
    key = await waiter
    # The key must open under the context that was asked for, not the mutated one.
    await counting.inner.decrypt_data_key(key.key_ref, key.wrapped, CONTEXT)


async def test_failure_after_every_waiter_left_is_not_cached(counting: Counting) -> None:
    cache = DataKeyCache(counting)
    counting.gate = asyncio.Event()
    counting.fail_next = 1
    waiters = [asyncio.create_task(cache.encryption_key(CONTEXT)) for _ in range(5)]
    await asyncio.sleep(0)
    for waiter in waiters:
        waiter.cancel()
    counting.gate.set()
    await asyncio.sleep(0.01)
    assert len(cache) == 0
    assert isinstance(await cache.encryption_key(CONTEXT), DataKey)
    assert counting.generated == 2


def test_limits_are_checked_up_front(keyring: KeyProvider) -> None:
    with pytest.raises(ValueError, match="ttl"):
        DataKeyCache(keyring, ttl=float("nan"))
    with pytest.raises(ValueError, match="800-38D"):
        DataKeyCache(keyring, max_uses=2**32 + 1)
    with pytest.raises(ValueError, match="ttl"):
        DataKeyCache(keyring, ttl=0)
    with pytest.raises(ValueError, match="capacity"):
        DataKeyCache(keyring, capacity=0)
