"""Pepper rotation in the engine: searches ask for every version during the overlap, and
data keys wrapped under an older version's pseudonyms still open."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest

from phi_gateway.cache import DataKeyCache
from phi_gateway.demo_upstream import create_upstream
from phi_gateway.exceptions import InvalidToken
from phi_gateway.keys import KeyProvider
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.rules import PolicySet
from phi_gateway.search import rewrite_query
from phi_gateway.transform import Report, Scope, decrypt_response, encrypt_request
from tests.recording_keys import RecordingKeys

# Index names are the demo upstream's columns, so its SQLite search can be used as is.
POLICY = """
version: 1
name: rotation
routes:
  - match: {methods: [PUT], path: "/patients/{pid}"}
    request:
      context: {ResourceId: "{pid}", Purpose: PHI_Storage}
      encrypt: ["$.ssn", "$.codes[*]"]
      blind_index:
        - {field: "$.ssn", into: ssn_bidx, normalize: digits, bits: 32}
        - {fields: ["$.last_name", "$.dob"], into: name_dob_bidx, normalize: [trim, lowercase], bits: 24}
  - match: {methods: [GET], path: "/patients"}
    query:
      - {param: ssn, blind_index: ssn_bidx}
      - {params: [last_name, dob], blind_index: name_dob_bidx}
    response:
      records: "$[*]"
      context: {ResourceId: "$.id", Purpose: PHI_Storage}
      decrypt: ["$.ssn", "$.codes[*]"]
  - match: {methods: [POST], path: "/patients/search"}
    request:
      criteria:
        - {field: "$.ssn", blind_index: ssn_bidx}
        - {fields: ["$.last_name", "$.dob"], blind_index: name_dob_bidx}
  - match: {methods: [GET], path: "/patients/{pid}"}
    response:
      context: {ResourceId: "{pid}", Purpose: PHI_Storage}
      decrypt: ["$.ssn", "$.codes[*]"]
  - match: {methods: [GET], path: "/lenient/{pid}"}
    response:
      context: {ResourceId: "{pid}", Purpose: PHI_Storage}
      decrypt: ["$.ssn", "$.codes[*]"]
      on_error: redact
  # KMS sees only the tenant's pseudonym: patients of one tenant share a KMS context, and
  # only the token's AAD (the exact context) tells them apart.
  - match: {methods: [PUT], path: "/tenants/{pid}"}
    request:
      context: {ResourceId: {param: pid, kms: omit}, Tenant: {header: X-Tenant}}
      encrypt: ["$.ssn"]
  - match: {methods: [GET], path: "/tenants/{pid}"}
    response:
      context: {ResourceId: {param: pid, kms: omit}, Tenant: {header: X-Tenant}}
      decrypt: ["$.ssn"]
  - match: {methods: [PUT], path: "/plain/{pid}"}
    request:
      context: {ResourceId: {param: pid, kms: plain}}
      encrypt: ["$.ssn"]
  - match: {methods: [GET], path: "/plain/{pid}"}
    response:
      context: {ResourceId: {param: pid, kms: plain}}
      decrypt: ["$.ssn"]
"""
SECRET_V1 = hashlib.sha256(b"rotation test pepper 1").digest()
SECRET_V2 = hashlib.sha256(b"rotation test pepper 2").digest()
SECRET_V3 = hashlib.sha256(b"rotation test pepper 3").digest()
BEFORE = Pepper({1: SECRET_V1}, current=1)
DURING = Pepper({1: SECRET_V1, 2: SECRET_V2}, current=2)
AFTER = Pepper({2: SECRET_V2}, current=2)  # version 1 dropped
PATIENT = {"ssn": "123-45-6789", "last_name": "García", "dob": "1980-02-29", "codes": ["E11.9", "I10"]}
TENANT = {"x-tenant": "north"}


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    path: Path = tmp_path_factory.mktemp("policies") / "rotation.yaml"
    path.write_text(POLICY)
    return load_policies([path])


def rule(policies: PolicySet, method: str, path: str, part: str) -> Any:
    found = policies.match(method, path)
    assert found is not None
    return getattr(found.route, part)


async def write(policies: PolicySet, provider: KeyProvider, pepper: Pepper, path: str) -> dict[str, Any]:
    """What the upstream stores for ``PUT path`` of PATIENT (just its SSN off /patients)."""
    found = policies.match("PUT", path)
    assert found is not None and found.route.request is not None
    doc = copy.deepcopy(PATIENT) if path.startswith("/patients/") else {"ssn": PATIENT["ssn"]}
    scope = Scope(found.params, TENANT)
    await encrypt_request(doc, found.route.request, scope, keys=DataKeyCache(provider), pepper=pepper)
    return {**doc, "id": found.params["pid"]}


async def read(policies: PolicySet, cache: DataKeyCache, pepper: Pepper, doc: Any, path: str) -> Report:
    """Decrypt ``doc`` in place as the response to ``GET path``."""
    found = policies.match("GET", path)
    assert found is not None and found.route.response is not None
    scope = Scope(found.params, TENANT)
    return await decrypt_response(doc, found.route.response, scope, keys=cache, pepper=pepper, roles=None)


@pytest.fixture
async def upstream() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_upstream())
    async with httpx.AsyncClient(transport=transport, base_url="http://upstream") as client:
        yield client


async def store(upstream: httpx.AsyncClient, record: dict[str, Any]) -> None:
    response = await upstream.put(f"/patients/{record['id']}", json=record)
    assert response.status_code == 200


# Searches


@pytest.mark.parametrize("written_under", [BEFORE, DURING], ids=["before", "during"])
async def test_query_during_the_overlap_finds_records_of_either_version(
    policies: PolicySet, keyring: KeyProvider, upstream: httpx.AsyncClient, written_under: Pepper
) -> None:
    await store(upstream, await write(policies, keyring, written_under, "/patients/p-1"))
    await store(upstream, {"id": "p-9", "ssn_bidx": "1:00000000", "name_dob_bidx": "2:000000"})
    rules = rule(policies, "GET", "/patients", "query")
    for query in ("ssn=123456789", "last_name=+Garc%C3%ADa+&dob=1980-02-29"):
        rewritten, _ = rewrite_query(query, rules, DURING)
        found = (await upstream.get(f"/patients?{rewritten}")).json()
        assert [r["id"] for r in found] == ["p-1"]


@pytest.mark.parametrize("written_under", [BEFORE, DURING], ids=["before", "during"])
async def test_criteria_during_the_overlap_find_records_of_either_version(
    policies: PolicySet, keyring: KeyProvider, upstream: httpx.AsyncClient, written_under: Pepper
) -> None:
    await store(upstream, await write(policies, keyring, written_under, "/patients/p-1"))
    search = rule(policies, "POST", "/patients/search", "request")
    for criteria in ({"ssn": "123 45 6789"}, {"last_name": "GARCÍA", "dob": "1980-02-29"}):
        body = dict(criteria)
        report = await encrypt_request(body, search, Scope({}, {}), keys=DataKeyCache(keyring), pepper=DURING)
        assert len(report.indexed) == 1 and set(report.indexed.values()) == {1}
        (values,) = body.values()
        assert [v.split(":")[0] for v in values] == ["2", "1"]  # current first
        found = (await upstream.post("/patients/search", json=body)).json()
        assert [r["id"] for r in found] == ["p-1"]


def test_query_asks_for_every_version_current_first(policies: PolicySet) -> None:
    rules = rule(policies, "GET", "/patients", "query")
    index = rules[0].index
    rewritten, counts = rewrite_query("limit=5&ssn=123-45-6789&ssn=987-65-4320", rules, DURING)
    assert parse_qsl(rewritten) == [
        ("limit", "5"),
        ("ssn_bidx", index.compute(DURING, ["123456789"], 2)),
        ("ssn_bidx", index.compute(DURING, ["123456789"], 1)),
        ("ssn_bidx", index.compute(DURING, ["987654320"], 2)),
        ("ssn_bidx", index.compute(DURING, ["987654320"], 1)),
    ]
    assert counts == {"ssn_bidx": 2}  # values searched, not one per version
    compound, counts = rewrite_query("dob=1980-02-29&last_name=Garc%C3%ADa", rules, DURING)
    assert [(k, v.split(":")[0]) for k, v in parse_qsl(compound)] == [
        ("name_dob_bidx", "2"),
        ("name_dob_bidx", "1"),
    ]
    assert counts == {"name_dob_bidx": 1}
    for secret in ("123", "987", "Garc", "1980"):
        assert secret not in rewritten.replace("ssn_bidx", "") + compound.replace("name_dob_bidx", "")


@pytest.mark.parametrize(
    ("versions", "current", "order"),
    [
        ({1: SECRET_V1, 2: SECRET_V2, 3: SECRET_V3}, 3, ["3", "2", "1"]),
        ({1: SECRET_V1, 2: SECRET_V2}, 1, ["1", "2"]),
    ],
    ids=["three-versions", "new-version-staged"],
)
def test_search_order_is_current_then_newest(
    policies: PolicySet, versions: dict[int, bytes], current: int, order: list[str]
) -> None:
    rewritten, _ = rewrite_query(
        "ssn=123456789", rule(policies, "GET", "/patients", "query"), Pepper(versions, current)
    )
    assert [v.split(":")[0] for _, v in parse_qsl(rewritten)] == order


async def test_single_version_pepper_searches_exactly_as_before(
    policies: PolicySet, keyring: KeyProvider
) -> None:
    rules = rule(policies, "GET", "/patients", "query")
    index = rules[0].index.compute(BEFORE, ["123456789"])
    assert rewrite_query("ssn=123-45-6789&limit=5", rules, BEFORE) == (
        f"ssn_bidx={index.replace(':', '%3A')}&limit=5",
        {"ssn_bidx": 1},
    )
    body: dict[str, Any] = {"ssn": "123-45-6789", "limit": 10}
    search = rule(policies, "POST", "/patients/search", "request")
    await encrypt_request(body, search, Scope({}, {}), keys=DataKeyCache(keyring), pepper=BEFORE)
    assert body == {"limit": 10, "ssn_bidx": index}
    assert AFTER.versions == [2]
    rewritten, _ = rewrite_query("ssn=123-45-6789", rules, AFTER)
    assert rewritten == urlencode([("ssn_bidx", rules[0].index.compute(AFTER, ["123456789"]))])


async def test_indexes_written_on_requests_use_only_the_current_version(
    policies: PolicySet, keyring: KeyProvider
) -> None:
    record = await write(policies, keyring, DURING, "/patients/p-1")
    index = rule(policies, "GET", "/patients", "query")[0].index
    assert record["ssn_bidx"] == index.compute(DURING, ["123456789"], 2)
    assert isinstance(record["name_dob_bidx"], str) and record["name_dob_bidx"].startswith("2:")


# Decrypt after a rotation


async def test_tokens_written_before_a_rotation_still_decrypt(
    policies: PolicySet, provider: KeyProvider
) -> None:
    old = await write(policies, provider, BEFORE, "/patients/p-1")
    cache = DataKeyCache(provider)
    doc = copy.deepcopy(old)
    report = await read(policies, cache, DURING, doc, "/patients/p-1")
    assert doc["ssn"] == PATIENT["ssn"] and doc["codes"] == PATIENT["codes"]
    assert report.decrypted == {"$.ssn": 1, "$.codes[*]": 2} and report.stale_pepper == 1
    # once under version 2's context, once under 1: per key, not per field
    assert cache.stats.decrypt_calls == 2
    again = copy.deepcopy(old)
    report = await read(policies, cache, DURING, again, "/patients/p-1")
    assert again["ssn"] == PATIENT["ssn"] and report.stale_pepper == 1
    assert cache.stats.decrypt_calls == 2  # found in the cache under version 1: no refused call


async def test_a_listing_mixes_old_and_new_tokens(policies: PolicySet, provider: KeyProvider) -> None:
    listing = [
        await write(policies, provider, BEFORE, "/patients/p-1"),
        await write(policies, provider, DURING, "/patients/p-2"),
        await write(policies, provider, BEFORE, "/patients/p-3"),
    ]
    stored = copy.deepcopy(listing)
    cache = DataKeyCache(provider)
    report = await read(policies, cache, DURING, listing, "/patients")
    assert [r["ssn"] for r in listing] == [PATIENT["ssn"]] * 3
    assert report.stale_pepper == 2 and report.decrypted == {"$.ssn": 3, "$.codes[*]": 6}
    assert cache.stats.decrypt_calls == 3 + 2
    report = await read(policies, cache, DURING, stored, "/patients")
    assert report.stale_pepper == 2 and cache.stats.decrypt_calls == 3 + 2  # all from the cache


async def test_fallback_tries_other_versions_newest_first(policies: PolicySet, keyring: KeyProvider) -> None:
    old = await write(policies, keyring, BEFORE, "/patients/p-1")
    recording = RecordingKeys(keyring)
    latest = Pepper({1: SECRET_V1, 2: SECRET_V2, 3: SECRET_V3}, current=3)
    doc = copy.deepcopy(old)
    report = await read(policies, DataKeyCache(recording), latest, doc, "/patients/p-1")
    assert doc["ssn"] == PATIENT["ssn"] and report.stale_pepper == 1
    tried = [u["ResourceId"] for u in recording.unwrapped]
    assert tried == [latest.pseudonymizer("rotation", v).pseudonym("ResourceId", "p-1") for v in (3, 2, 1)]


async def test_current_tokens_need_no_fallback(policies: PolicySet, provider: KeyProvider) -> None:
    doc = await write(policies, provider, DURING, "/patients/p-1")
    cache = DataKeyCache(provider)
    report = await read(policies, cache, DURING, doc, "/patients/p-1")
    assert doc["ssn"] == PATIENT["ssn"] and report.stale_pepper == 0 and cache.stats.decrypt_calls == 1


async def test_fallback_does_not_open_another_patients_token(
    policies: PolicySet, provider: KeyProvider
) -> None:
    theirs = await write(policies, provider, BEFORE, "/patients/p-2")
    mine = await write(policies, provider, BEFORE, "/patients/p-1")
    mine["ssn"] = theirs["ssn"]
    with pytest.raises(InvalidToken):
        await read(policies, DataKeyCache(provider), DURING, copy.deepcopy(mine), "/patients/p-1")
    report = await read(policies, DataKeyCache(provider), DURING, mine, "/lenient/p-1")
    assert mine["ssn"] is None and mine["codes"] == PATIENT["codes"]
    assert report.redacted == {"$.ssn": 1} and report.stale_pepper == 1  # p-1's own key did fall back


async def test_fallback_key_still_meets_the_exact_context(policies: PolicySet, keyring: KeyProvider) -> None:
    # Same tenant, so the older KMS context does unwrap the other patient's data key:
    # the token's AAD (ResourceId included) must still refuse it.
    theirs = await write(policies, keyring, BEFORE, "/tenants/p-2")
    moved = {"ssn": theirs["ssn"]}
    with pytest.raises(InvalidToken):
        await read(policies, DataKeyCache(keyring), DURING, moved, "/tenants/p-1")
    own = await write(policies, keyring, BEFORE, "/tenants/p-1")
    report = await read(policies, DataKeyCache(keyring), DURING, own, "/tenants/p-1")
    assert own["ssn"] == PATIENT["ssn"] and report.stale_pepper == 1


async def test_dropped_old_version_fails_closed(policies: PolicySet, provider: KeyProvider) -> None:
    old = await write(policies, provider, BEFORE, "/patients/p-1")
    with pytest.raises(InvalidToken):
        await read(policies, DataKeyCache(provider), AFTER, copy.deepcopy(old), "/patients/p-1")
    report = await read(policies, DataKeyCache(provider), AFTER, old, "/lenient/p-1")
    assert old["ssn"] is None and old["codes"] == [None, None]
    assert report.redacted == {"$.ssn": 1, "$.codes[*]": 2} and report.stale_pepper == 0


async def test_no_fallback_without_pseudonyms_in_the_kms_context(
    policies: PolicySet, keyring: KeyProvider
) -> None:
    theirs = await write(policies, keyring, BEFORE, "/plain/p-2")
    cache = DataKeyCache(keyring)
    with pytest.raises(InvalidToken):
        await read(policies, cache, DURING, {"ssn": theirs["ssn"]}, "/plain/p-1")
    assert cache.stats.decrypt_calls == 1  # rotation cannot explain it: no retry


# The demo upstream


async def test_demo_upstream_reads_repeated_parameters_and_lists_as_or(upstream: httpx.AsyncClient) -> None:
    await store(upstream, {"id": "a", "ssn_bidx": "1:aaaa", "name_dob_bidx": "1:cc"})
    await store(upstream, {"id": "b", "ssn_bidx": "2:bbbb", "name_dob_bidx": "2:dd"})
    await store(upstream, {"id": "c", "ssn_bidx": "2:eeee", "name_dob_bidx": "2:dd"})

    async def ids(response: httpx.Response) -> list[str]:
        assert response.status_code == 200
        return [r["id"] for r in response.json()]

    assert await ids(
        await upstream.get("/patients", params=[("ssn_bidx", "2:bbbb"), ("ssn_bidx", "1:aaaa")])
    ) == [
        "a",
        "b",
    ]
    assert await ids(await upstream.get("/patients", params={"ssn_bidx": "2:bbbb"})) == ["b"]
    both = [("ssn_bidx", "2:bbbb"), ("ssn_bidx", "2:eeee"), ("name_dob_bidx", "2:dd"), ("limit", "1")]
    assert await ids(await upstream.get("/patients", params=both)) == ["b"]  # AND across indexes, then limit
    search = "/patients/search"
    assert await ids(await upstream.post(search, json={"ssn_bidx": ["2:bbbb", "1:aaaa"]})) == ["a", "b"]
    assert await ids(await upstream.post(search, json={"ssn_bidx": "1:aaaa"})) == ["a"]
    assert (
        await ids(await upstream.post(search, json={"ssn_bidx": ["2:eeee"], "name_dob_bidx": ["1:cc"]})) == []
    )
    assert await ids(await upstream.post(search, json={"ssn_bidx": []})) == []
