"""A bounded load test: about three thousand requests, 64 at a time, through the standalone
gateway with the hash-chained file audit sink, in front of the recording upstream.

The mix is PHI writes, reads and searches, requests passed through untouched, and faults
injected on purpose (bodies that are not JSON, callers without identity, ambiguous paths,
methods no policy names, a protected key spelled in another case). Afterwards: every
request was answered with the status its kind calls for, the audit trail holds exactly one
event per request on a policy route and verifies, no error was logged that was not
injected, and the upstream received tokens and blind indexes only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from phi_gateway import envelope
from phi_gateway.audit_chain import load_chain_key, verify_chain
from tests.e2e.conftest import AUTH, Upstream, proxy_deployment

CONCURRENCY = 64
PATIENTS = 700  # each: a write, a read and a search by SSN
PASS_THROUGH = 400
BAD_JSON = 150
ANONYMOUS = 100
AMBIGUOUS_PATH = 60
NO_SUCH_METHOD = 40
CASE_VARIANT = 50
PHI_ROUTE_REQUESTS = 3 * PATIENTS + BAD_JSON + ANONYMOUS + CASE_VARIANT  # each has an audit event


def ssn(n: int) -> str:
    return f"7{n // 10000:02d}-55-{n % 10000:04d}"


def name(n: int) -> str:
    return f"Loadtest{n:05d}"


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    target: str  # the path and query asked for

    def json(self) -> Any:
        return json.loads(self.body)


Job = Callable[[aiohttp.ClientSession], Awaitable[list[tuple[str, Answer]]]]


async def ask(session: aiohttp.ClientSession, method: str, target: str, **options: Any) -> Answer:
    # encoded=True: the target goes out as written (yarl would resolve "%2e%2e" itself).
    async with session.request(method, URL(target, encoded=True), **options) as response:
        body = await response.read()
        return Answer(response.status, response.headers.get("content-type", ""), body, target)


def patient(n: int) -> Job:
    async def run(session: aiohttp.ClientSession) -> list[tuple[str, Answer]]:
        record = {"first_name": name(n), "last_name": "Load", "ssn": ssn(n), "dob": "1970-01-01"}
        written = await ask(session, "PUT", f"/patients/ld-{n}", json=record)
        read = await ask(session, "GET", f"/patients/ld-{n}")
        found = await ask(session, "GET", f"/patients?ssn={ssn(n)}")
        return [("write", written), ("read", read), ("search", found)]

    return run


def single(kind: str, method: str, path: str, **options: Any) -> Job:
    async def run(session: aiohttp.ClientSession) -> list[tuple[str, Answer]]:
        return [(kind, await ask(session, method, path, **options))]

    return run


def jobs() -> list[Job]:
    mix = [patient(n) for n in range(PATIENTS)]
    mix += [single("pass", "GET", f"/not-a-policy-route/{n}") for n in range(PASS_THROUGH)]
    mix += [
        single(
            "bad_json",
            "PUT",
            f"/patients/ld-bad-{n}",
            data=f'{{"ssn": "{ssn(90_000 + n)}",}}'.encode(),
            headers={"content-type": "application/json"},
        )
        for n in range(BAD_JSON)
    ]
    mix += [
        single("anonymous", "GET", f"/patients/ld-{n}", headers={"X-User": "", "X-Roles": ""})
        for n in range(ANONYMOUS)
    ]
    mix += [single("ambiguous", "GET", f"/patients/%2e%2e/ld-{n}") for n in range(AMBIGUOUS_PATH)]
    mix += [
        single("method", "PATCH", f"/patients/ld-{n}", json={"ssn": ssn(n)}) for n in range(NO_SUCH_METHOD)
    ]
    mix += [
        single("case_variant", "PUT", f"/patients/ld-cv-{n}", json={"SSN": ssn(80_000 + n)})
        for n in range(CASE_VARIANT)
    ]
    # Interleave the kinds, deterministically, so faults land among good requests.
    return [mix[(n * 7919) % len(mix)] for n in range(len(mix))]


EXPECTED = {  # kind: (status, error code or None)
    "write": (200, None),
    "read": (200, None),
    "search": (200, None),
    "pass": (404, None),
    "bad_json": (400, "invalid_json"),
    "anonymous": (401, "authentication_required"),
    "ambiguous": (400, "ambiguous_path"),
    "method": (405, "method_not_allowed"),
    "case_variant": (400, "field_ambiguous"),
}


async def drive(url: str, work: list[Job]) -> list[tuple[str, Answer]]:
    """Run the jobs on CONCURRENCY workers sharing one pooled client (aiohttp: the client
    must not eat the CPU the gateway is measured on; httpx costs ten times more per request)."""
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in work:
        queue.put_nowait(job)
    results: list[tuple[str, Answer]] = []
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(url, headers=AUTH, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                results.extend(await queue.get_nowait()(session))

        # A request that hangs fails the run here, not by hanging the suite.
        async with asyncio.timeout(240):
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def test_load_every_request_answered_audited_and_tokens_only_upstream(
    upstream_process: Upstream, secrets_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    upstream_process.reset(data=True)
    work = jobs()
    with proxy_deployment(upstream_process, secrets_dir) as gateway:
        results = asyncio.run(drive(gateway.url, work))
        audit_file = gateway.audit_file
    assert audit_file is not None  # proxy_deployment has drained and verified it on exit

    # Every request answered, each with what its kind calls for.
    kinds = Counter(kind for kind, _ in results)
    assert kinds == {
        "write": PATIENTS,
        "read": PATIENTS,
        "search": PATIENTS,
        "pass": PASS_THROUGH,
        "bad_json": BAD_JSON,
        "anonymous": ANONYMOUS,
        "ambiguous": AMBIGUOUS_PATH,
        "method": NO_SUCH_METHOD,
        "case_variant": CASE_VARIANT,
    }
    wrong = Counter(
        (kind, answer.status) for kind, answer in results if (answer.status, _code(answer)) != EXPECTED[kind]
    )
    assert not wrong, f"unexpected answers: {dict(wrong)}"
    by_path = {r.target: r.json() for kind, r in results if kind == "read"}
    assert all(by_path[f"/patients/ld-{n}"]["ssn"] == ssn(n) for n in range(PATIENTS))
    searches = [(r.target.rsplit("=", 1)[1], r.json()) for kind, r in results if kind == "search"]
    assert all([p["ssn"] for p in found] == [searched] for searched, found in searches)

    # One event per request on a policy route, none lost, none extra; the chain verifies.
    report = verify_chain(audit_file, load_chain_key(secrets_dir / "chain.key"))
    assert report.ok and not report.torn_tail, report.message
    text = audit_file.read_text()
    events = [json.loads(line)["event"] for line in text.splitlines()]
    assert len(events) == report.records == PHI_ROUTE_REQUESTS
    outcomes = Counter((e["method"], e["status"], e["error"]) for e in events)
    assert outcomes == {
        ("PUT", 200, None): PATIENTS,
        ("GET", 200, None): 2 * PATIENTS,
        ("PUT", 400, "invalid_json"): BAD_JSON,
        ("GET", 401, "authentication_required"): ANONYMOUS,
        ("PUT", 400, "field_ambiguous"): CASE_VARIANT,
    }
    assert len({e["request_id"] for e in events}) == len(events)
    assert not _canaries(text), "PHI in the audit trail"

    # No error logged but those injected (the gateway logs none for a refused request).
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not _canaries(caplog.text)

    # The upstream received every accepted PHI request, as tokens and blind indexes only.
    received = upstream_process.received()
    assert Counter(r["method"] for r in received) == {"PUT": PATIENTS, "GET": 2 * PATIENTS}
    assert not _canaries(repr(received)), "plaintext PHI reached the upstream"
    for r in received:
        if r["method"] == "PUT":
            body = json.loads(r["body"])
            assert envelope.is_token(body["ssn"]) and envelope.is_token(body["first_name"])
        elif r["path"] == "/patients":
            assert r["query"].startswith("ssn_bidx=")


# The canaries, as written or digits only, standing alone (not inside a token or an id).
_SSN = re.compile(r"(?<![\w-])(?:7\d\d-55-\d{4}|7\d\d55\d{4}|Loadtest\d{5})(?![\w-])")


def _canaries(text: str) -> list[str]:
    return _SSN.findall(text)


def _code(answer: Answer) -> str | None:
    if answer.status < 400 or answer.status == 404:  # 404: the upstream's own, passed through
        return None
    assert answer.content_type == "application/json"
    return str(answer.json()["error"]["code"])
