"""The audit trail end to end: one event per PHI request, a chain that verifies after a
concurrent run, no PHI in any form in it, and a sink that cannot write blocks PHI."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from phi_gateway.audit import AuditEmitter
from phi_gateway.audit_chain import ChainedFileSink, load_chain_key, verify_chain
from phi_gateway.audit_event import MAIN_RECORDS
from phi_gateway.aws import AwsSettings
from phi_gateway.cache import DataKeyCache
from phi_gateway.demo_upstream import create_upstream
from phi_gateway.identity import Identity, IdentitySettings
from phi_gateway.keyring import LocalKeyring
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from tests.e2e.canary import forms as leak_forms
from tests.e2e.conftest import (
    AUTH,
    POLICIES,
    AuditFile,
    Deployment,
    ThreadServer,
    Upstream,
    free_port,
    proxy_deployment,
    read_events,
)

PATIENT = json.loads((Path(__file__).parents[1] / "samples" / "patient.json").read_text())


def assert_documented(events: list[dict[str, Any]]) -> None:
    """Every field the gateway wrote is in docs/audit.md's tables of event fields."""
    text = (Path(__file__).parents[2] / "docs" / "audit.md").read_text()
    section = text[text.index("## Events") : text.index("## Sinks")]
    names = {
        name
        for cell in re.findall(r"^\| ((?:`[a-z_]+`(?:, )?)+) \|", section, re.MULTILINE)
        for name in re.findall(r"`([a-z_]+)`", cell)
    }
    for event in events:
        assert set(event) <= names, set(event) - names
        assert event["outcome" if event["kind"] == "request" else "side"] in re.findall(
            r"`([a-z_]+)`", section
        )
        for side in ("request", "response"):
            if side in event:
                assert set(event[side]) <= names, set(event[side]) - names
                assert all(f"`{action}`" in section for action in event[side]["fields"])


def test_every_phi_request_is_recorded_and_the_chain_verifies(
    deploy: Callable[[], AbstractContextManager[Deployment]],
    secrets_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    canary = f"CANARY-{uuid.uuid4()}"
    patients = [{**PATIENT, "notes": f"{canary}-{n}", "first_name": canary} for n in range(40)]

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=AUTH) as client:
            return await asyncio.gather(
                *(client.put(f"/patients/au-{n}", json=p) for n, p in enumerate(patients))
            )

    with deploy() as deployment:
        assert deployment.audit_file is not None
        responses = asyncio.run(burst(deployment.url))
        with deployment.client(roles="nurse") as nurse:
            nurse.get("/patients/au-1")
            nurse.get("/patients", params={"ssn": "123-45-6789"})
        with httpx.Client(base_url=deployment.url) as anonymous:
            anonymous.get("/patients/au-1")  # 401: a denied access is recorded too
        with deployment.client() as client:
            client.get("/_received")  # not a policy route: no event
    assert all(r.status_code == 200 for r in responses)
    report = verify_chain(deployment.audit_file, load_chain_key(secrets_dir / "chain.key"))
    assert report.ok and not report.torn_tail, report.message
    events = read_events(deployment.audit_file)
    assert report.records == len(events) == 40 + 3
    assert_documented(events)
    puts = [e for e in events if e["method"] == "PUT"]
    assert {e["status"] for e in puts} == {200} and len({e["request_id"] for e in puts}) == 40
    assert all(e["request"]["fields"]["encrypted"]["$.ssn"] == 1 for e in puts)
    assert all(e["principal"] == "dr-test" and e["roles"] == ["clinician"] for e in puts)
    # the patient id reaches the audit trail only as its pseudonym (kms: pseudonymize)
    assert all(e["request"]["records"][0]["ResourceId"].startswith("p1.") for e in puts)
    nurse_read = next(
        e
        for e in events
        if e["route"] == "/patients/{patient_id}" and e["method"] == "GET" and e["status"] == 200
    )
    assert nurse_read["response"]["fields"]["withheld"] == {"$.ssn": 1, "$.notes": 1}
    search = next(e for e in events if e["route"] == "/patients")
    assert search["searched"] == {"ssn_bidx": 1}
    denied = next(e for e in events if e["status"] == 401)
    assert denied["outcome"] == "refused" and denied["error"] == "authentication_required"
    text = deployment.audit_file.read_text()
    for secret in [canary, "123-45-6789", "123456789", PATIENT["dob"], 'au-1"']:
        for form in leak_forms(secret).values():
            assert form not in text, f"{secret!r} leaked into the audit trail as {form!r}"
    assert "phi:" not in text  # no token either
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    for form in leak_forms(canary).values():
        assert form not in logged


class FlakySink:
    """The real chained file sink, failing like a full disk while ``broken`` is set."""

    def __init__(self, inner: ChainedFileSink) -> None:
        self.inner = inner
        self.broken = False

    async def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        if self.broken:
            raise OSError(errno.ENOSPC, "No space left on device")
        await self.inner.write(events)

    async def close(self) -> None:
        await self.inner.close()


def test_a_sink_that_cannot_write_blocks_phi_and_loses_nothing(secrets_dir: Path, tmp_path: Path) -> None:
    key = load_chain_key(secrets_dir / "chain.key")
    sink = FlakySink(ChainedFileSink(tmp_path / "audit.jsonl", key))
    emitter = AuditEmitter(sink, max_queue=4, retry_initial=0.01, retry_max=0.05)
    app = create_upstream(str(tmp_path / "inner.sqlite"), record=True)
    app.add_middleware(
        PHIMiddleware,
        policies=load_policies([POLICIES]),
        keys=DataKeyCache(LocalKeyring.load(secrets_dir / "keyring.json")),
        pepper=Pepper.load(secrets_dir / "pepper.json"),
        identity=Identity(
            IdentitySettings(
                principal_header="X-User", roles_header="X-Roles", trusted_proxies=("127.0.0.1",)
            )
        ),
        audit=emitter,
    )
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, headers=AUTH, timeout=20) as client:
        assert client.put("/patients/f-0", json=PATIENT).status_code == 200
        # f-0's event must be on disk before the sink breaks: with it still queued, the 8 events
        # below would reach the refusal limit (2 * max_queue) and the last refusal be dropped.
        deadline = time.monotonic() + 10
        while emitter.stats.written < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        sink.broken = True
        statuses = [client.put(f"/patients/f-{n}", json=PATIENT).status_code for n in range(1, 8)]
        # The first requests are admitted while the failure is not yet known; once the sink
        # has failed, PHI requests are refused and nothing reaches the app.
        assert statuses[-1] == 503
        refused = client.put("/patients/f-99", json=PATIENT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "audit_unavailable"
        stored_before_recovery = len(app.state.received)
        sink.broken = False
        deadline = time.monotonic() + 10
        while not emitter.accepting and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.put("/patients/f-100", json=PATIENT).status_code == 200
    assert all(r["path"] != "/patients/f-99" for r in app.state.received)
    admitted = stored_before_recovery + 1  # + f-100
    report = verify_chain(tmp_path / "audit.jsonl", key)
    assert report.ok, report.message
    events = read_events(tmp_path / "audit.jsonl")
    # every request has its event: admitted ones and refused ones alike, none lost
    assert len(events) == 1 + 7 + 1 + 1
    assert sum(1 for e in events if e["status"] == 200) == admitted
    assert emitter.stats.dropped == 0


def test_with_kms_events_name_the_gateway_and_the_master_key(
    upstream_process: Upstream, secrets_dir: Path, moto_url: str, kms_key: str, tmp_path: Path
) -> None:
    audit_file = tmp_path / "kms-audit.jsonl"
    overrides = {
        "keyring": None,
        "kms_key_ids": [kms_key],
        "aws_endpoint_url": moto_url,
        "audit_file": str(audit_file),
    }
    upstream_process.reset(data=True)
    with (
        proxy_deployment(upstream_process, secrets_dir, **overrides) as deployment,
        deployment.client() as client,
    ):
        assert client.put("/patients/k-1", json=PATIENT).status_code == 200
        deployment.keys.clear()
        assert client.get("/patients/k-1").json()["ssn"] == PATIENT["ssn"]
    events = read_events(audit_file)
    assert [e["method"] for e in events] == ["PUT", "GET"]
    assert all(e["gateway"].startswith("arn:aws:") for e in events)  # STS GetCallerIdentity at start
    assert events[0]["request"]["key_refs"] == [kms_key] and events[1]["response"]["key_refs"] == [kms_key]
    # PUT: one miss to make the data key, one hit to decrypt its own echo; the cache was
    # cleared before the GET, which misses once
    assert [e["key_cache"] for e in events] == [{"hits": 1, "misses": 1}, {"hits": 0, "misses": 1}]
    assert "123-45-6789" not in upstream_process.received().__repr__()


def main_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "request"]


def test_a_listing_of_more_records_than_an_event_holds_is_on_the_trail_in_parts(
    upstream_process: Upstream, secrets_dir: Path
) -> None:
    count = MAIN_RECORDS + 30

    async def write_all(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=AUTH) as client:
            sent = [client.put(f"/patients/big-{n}", json=PATIENT) for n in range(count)]
            return [r.status_code for r in await asyncio.gather(*sent)]

    upstream_process.reset(data=True)
    with proxy_deployment(upstream_process, secrets_dir) as deployment:
        assert set(asyncio.run(write_all(deployment.url))) == {200}
        with deployment.client() as client:
            listing = client.get("/patients", params={"limit": "1000"})
    assert listing.status_code == 200 and len(listing.json()) == count
    assert deployment.audit_file is not None
    events = read_events(deployment.audit_file)
    assert len(main_events(events)) == count + 1  # one main event per request, as ever
    written = {e["request"]["records"][0]["ResourceId"] for e in main_events(events) if e["method"] == "PUT"}
    (read,) = [e for e in events if e["kind"] == "request" and e["method"] == "GET"]
    parts = [e for e in events if e["kind"] == "records"]
    assert read["record_parts"] == len(parts) == 1
    assert read["response"]["records_total"] == count
    assert len(read["response"]["records"]) == MAIN_RECORDS
    (part,) = parts
    assert (part["request_id"], part["part"], part["parts"], part["side"]) == (
        read["request_id"],
        1,
        1,
        "response",
    )
    assert part["first"] == MAIN_RECORDS and part["principal"] == "dr-test"
    disclosed = read["response"]["records"] + part["records"]
    assert {r["ResourceId"] for r in disclosed} == written  # patient #101 onwards included
    assert events.index(part) == events.index(read) + 1  # queued with its main event
    assert_documented(events)


def test_integrity_failures_are_findable_in_the_trail(
    deploy: Callable[[], AbstractContextManager[Deployment]],
) -> None:
    with deploy() as deployment:
        with deployment.client() as client:
            client.put("/patients/i-1", json=PATIENT)
            client.put("/patients/i-2", json={**PATIENT, "ssn": "999-99-9999"})
        stored, other = deployment.read_at_rest("i-1"), deployment.read_at_rest("i-2")
        deployment.write_at_rest({**stored, "ssn": other["ssn"]})  # i-2's SSN token moved into i-1
        with deployment.client() as client:
            single = client.get("/patients/i-1")  # on_error: redact
            listing = client.get("/patients", params={"limit": "1000"})  # on_error: fail
    assert single.status_code == 200 and single.json()["ssn"] is None
    assert listing.status_code == 502
    assert deployment.audit_file is not None
    *_, redacted, failed = read_events(deployment.audit_file)
    # not "ok": the caller got a response with a field that did not authenticate nulled
    assert (redacted["outcome"], redacted["status"], redacted["error"]) == ("redacted", 200, None)
    assert redacted["response"]["fields"]["redacted"] == {"$.ssn": 1}
    assert (failed["outcome"], failed["status"], failed["error"]) == ("refused", 502, "integrity_error")
    assert failed["upstream_status"] == 200 and failed["principal"] == "dr-test"


def test_events_say_which_withheld_values_were_decrypted_to_mask_them(
    deploy: Callable[[], AbstractContextManager[Deployment]],
) -> None:
    with deploy() as deployment:
        with deployment.client() as client:
            client.put("/patients/m-1", json=PATIENT)
            client.put("/patients/m-2", json=PATIENT)
        stored = deployment.read_at_rest("m-2")
        deployment.write_at_rest({**stored, "ssn": PATIENT["ssn"]})  # written around the gateway
        with deployment.client(roles="nurse") as nurse:
            token = nurse.get("/patients/m-1").json()
            clear = nurse.get("/patients/m-2").json()
    assert token["ssn"] == clear["ssn"] == "*******6789"
    assert deployment.audit_file is not None
    *_, from_token, from_clear = read_events(deployment.audit_file)
    # mask_last4 opens the token to compute the mask; remove (notes) never opens it
    assert from_token["response"]["fields"]["withheld"] == {"$.ssn": 1, "$.notes": 1}
    assert from_token["response"]["fields"]["decrypted_for_mask"] == {"$.ssn": 1}
    # a value stored in the clear is masked without decrypting anything
    assert from_clear["response"]["fields"]["withheld"] == {"$.ssn": 1, "$.notes": 1}
    assert from_clear["response"]["fields"]["plaintext_seen"] == {"$.ssn": 1}
    assert "decrypted_for_mask" not in from_clear["response"]["fields"]


def test_a_key_service_failure_is_on_the_trail(secrets_dir: Path, tmp_path: Path) -> None:
    audit = AuditFile(tmp_path / "audit.jsonl", secrets_dir / "chain.key")
    app = create_upstream(str(tmp_path / "inner.sqlite"), record=True)
    nowhere = AwsSettings(region="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    app.add_middleware(
        PHIMiddleware,
        policies=load_policies([POLICIES]),
        keys=DataKeyCache(KmsKeyProvider(["arn:aws:kms:us-east-1:111122223333:key/k"], nowhere)),
        pepper=Pepper.load(secrets_dir / "pepper.json"),
        identity=Identity(
            IdentitySettings(
                principal_header="X-User", roles_header="X-Roles", trusted_proxies=("127.0.0.1",)
            )
        ),
        audit=AuditEmitter(ChainedFileSink(audit.path, load_chain_key(audit.chain_key_file))),
    )
    with (
        ThreadServer(app, audit=audit) as server,
        httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client,
    ):
        write = client.put("/patients/k-1", json=PATIENT)
    assert write.status_code == 503
    (event,) = read_events(audit.path)
    assert (event["outcome"], event["status"], event["error"]) == ("refused", 503, "key_service_unavailable")
    assert event["upstream_status"] is None and event["principal"] == "dr-test"  # nothing forwarded
