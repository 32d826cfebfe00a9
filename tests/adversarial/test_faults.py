"""Faults around a running gateway: the key service stopped, slow, throttling or resetting
(through a fault-injecting proxy in front of the moto server), the upstream truncating,
hanging or failing mid-body, the audit file's disk full, and ``kill -9`` under load.

Every case asserts what reached the upstream (no plaintext, and nothing at all for a
refused request), the JSON error code the client got, and that the answer came in time.
Faults covered elsewhere and not repeated here: upstream refusing, resetting, hanging and
answering non-JSON (``tests/e2e/test_failures.py::test_upstream_faults_are_json_errors``,
``test_upstream_refusing_connections_is_502``), KMS unreachable from the start
(``test_key_service_down_is_503_with_retry_after_and_nothing_forwarded``), an audit sink that
fails (``tests/e2e/test_audit_trail.py::test_a_sink_that_cannot_write_blocks_phi_and_loses_nothing``)
and the chained file's failed writes and torn tails (``tests/test_audit.py``)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from phi_gateway import envelope
from phi_gateway.audit import AuditEmitter
from phi_gateway.audit_chain import ChainedFileSink, load_chain_key, verify_chain
from phi_gateway.aws import AwsSettings
from phi_gateway.gateway import Gateway
from tests.adversarial.faults import FakeClock, FaultyKms, ScriptedUpstream, kms_gateway
from tests.conftest import REGION
from tests.e2e.conftest import (
    AUTH,
    PHI_CANARIES,
    ThreadServer,
    Upstream,
    assert_no_phi,
    free_port,
    proxy_config,
    proxy_deployment,
    serve_env,
    wait_for_port,
)

PATIENT: dict[str, Any] = json.loads((Path(__file__).parents[1] / "samples" / "patient.json").read_text())
PROMPT = 1.5  # seconds beyond a deadline that a refusal may take: it must come, and soon


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def assert_clean(response: httpx.Response) -> None:
    for canary in PHI_CANARIES:
        assert canary not in response.text, f"{canary!r} in a response"


def puts(upstream: Upstream) -> list[str]:
    return [r["path"] for r in upstream.received() if r["method"] == "PUT"]


@pytest.fixture
def store(upstream_process: Upstream) -> Iterator[Upstream]:
    upstream_process.reset(data=True)
    yield upstream_process
    assert_no_phi(upstream_process.received())


@pytest.fixture
def faulty_kms(moto_url: str) -> Iterator[FaultyKms]:
    with FaultyKms(moto_url) as proxy:
        yield proxy


def aws(proxy: FaultyKms, **options: Any) -> AwsSettings:
    return AwsSettings(region=REGION, endpoint_url=proxy.url, **{"connect_timeout": 0.5, **options})


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def assert_key_service_refused(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert error_code(response) == "key_service_unavailable"
    assert response.headers["retry-after"].isdigit()
    assert_clean(response)


# -- the key service -------------------------------------------------------------------------


def test_kms_stopped_mid_run_cached_keys_serve_within_their_limits(
    faulty_kms: FaultyKms, kms_key: str, store: Upstream, secrets_dir: Path
) -> None:
    clock = FakeClock()
    settings = aws(faulty_kms, read_timeout=1, max_attempts=2, deadline=3)
    # One PUT of the sample reserves 8 uses of its data key (6 fields, 2 diagnosis codes).
    cache = {"ttl": 60, "max_uses": 16, "clock": clock}
    with kms_gateway(store, secrets_dir, [kms_key], settings, cache=cache) as gateway, gateway.client() as c:
        assert c.put("/patients/ks-a", json=PATIENT).status_code == 200
        faulty_kms.stop()  # KMS goes away: listener closed, open connections dropped
        faulty_kms.clear()

        # Within TTL and uses: reads and a second write of the same patient are served.
        assert c.get("/patients/ks-a").json()["ssn"] == PATIENT["ssn"]
        assert c.put("/patients/ks-a", json=PATIENT).status_code == 200
        # The data key's 16 uses are spent: a third write needs a new one.
        spent, took = timed(lambda: c.put("/patients/ks-a", json=PATIENT))
        assert_key_service_refused(spent)
        assert took < 3 + PROMPT
        # Another patient needs a data key of their own.
        other, took = timed(lambda: c.put("/patients/ks-b", json=PATIENT))
        assert_key_service_refused(other)
        assert took < 3 + PROMPT
        assert puts(store) == ["/patients/ks-a", "/patients/ks-a"]  # the refused writes went nowhere
        # Reads keep working from the cache until the TTL runs out; then they fail whole.
        assert c.get("/patients/ks-a").json()["dob"] == PATIENT["dob"]
        clock.now += 61
        expired, took = timed(lambda: c.get("/patients/ks-a"))
        assert_key_service_refused(expired)
        assert took < 3 + PROMPT
        assert faulty_kms.counts() == {}  # nothing reached KMS while it was down

        faulty_kms.start()  # KMS is back: both patients are served again
        assert c.get("/patients/ks-a").json()["ssn"] == PATIENT["ssn"]
        assert c.put("/patients/ks-b", json=PATIENT).status_code == 200
        assert faulty_kms.counts() == {"Decrypt": 1, "GenerateDataKey": 1}
    assert puts(store) == ["/patients/ks-a", "/patients/ks-a", "/patients/ks-b"]


def test_kms_slower_than_the_deadline_is_503_in_time(
    faulty_kms: FaultyKms, kms_key: str, store: Upstream, secrets_dir: Path
) -> None:
    settings = aws(faulty_kms, read_timeout=5, max_attempts=4, deadline=1.5)
    with kms_gateway(store, secrets_dir, [kms_key], settings) as gateway, gateway.client() as c:
        faulty_kms.set("GenerateDataKey", "delay", delay=0.2)
        assert c.put("/patients/kd-a", json=PATIENT).status_code == 200  # slow, within the deadline
        faulty_kms.set("GenerateDataKey", "delay", delay=30)
        response, took = timed(lambda: c.put("/patients/kd-b", json=PATIENT))
        assert_key_service_refused(response)
        assert 1.5 <= took < 1.5 + PROMPT  # the deadline, not botocore's 60 s, nor 4 x 5 s
    assert puts(store) == ["/patients/kd-a"]


def test_kms_read_timeout_per_attempt_and_bounded_attempts(
    faulty_kms: FaultyKms, kms_key: str, store: Upstream, secrets_dir: Path
) -> None:
    settings = aws(faulty_kms, read_timeout=0.3, max_attempts=2, deadline=30)
    with kms_gateway(store, secrets_dir, [kms_key], settings) as gateway, gateway.client() as c:
        faulty_kms.set("Decrypt", "delay", delay=30)
        assert c.put("/patients/kt-a", json=PATIENT).status_code == 200
        gateway.keys.clear()
        response, took = timed(lambda: c.get("/patients/kt-a"))
        assert_key_service_refused(response)  # the response fails whole: nothing partial
        # Two attempts of 0.3 s and one backoff of at most 1 s, far below the 30 s deadline.
        assert took < 0.6 + 1 + PROMPT
        assert faulty_kms.count("Decrypt") == 2


@pytest.mark.parametrize("fault", ["throttle", "reset"])
def test_kms_throttling_or_resetting_is_retried_a_bounded_number_of_times(
    faulty_kms: FaultyKms, kms_key: str, store: Upstream, secrets_dir: Path, fault: str
) -> None:
    settings = aws(faulty_kms, read_timeout=2, max_attempts=3, deadline=10)
    with kms_gateway(store, secrets_dir, [kms_key], settings) as gateway, gateway.client() as c:
        faulty_kms.clear()
        faulty_kms.set("GenerateDataKey", fault)
        response, took = timed(lambda: c.put("/patients/kq-a", json=PATIENT))
        assert_key_service_refused(response)
        assert faulty_kms.count("GenerateDataKey") == 3  # max_attempts, the first included
        assert took < 10
        assert puts(store) == []
        # Fewer failures than the retry budget: the write goes through on the last attempt.
        faulty_kms.clear()
        faulty_kms.set("GenerateDataKey", fault, times=2)
        assert c.put("/patients/kq-a", json=PATIENT).status_code == 200
        assert faulty_kms.count("GenerateDataKey") == 3
    assert puts(store) == ["/patients/kq-a"]


# -- the upstream, mid-body ------------------------------------------------------------------


def _response(status: int, body: bytes, *, length: int | None = None, extra: bytes = b"") -> bytes:
    reason = {200: b"OK", 500: b"Internal Server Error", 503: b"Service Unavailable"}[status]
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
        % (status, reason, len(body) if length is None else length, extra)
        + body
    )


def _chunked(body: bytes, *, finished: bool) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:100], body[100:]))
    return head + chunks + (b"0\r\n\r\n" if finished else b"")


@pytest.fixture(scope="module")
def stored_tokens(upstream_process: Upstream, secrets_dir: Path) -> bytes:
    """A real patient record as the upstream stores it (tokens), written through a gateway."""
    upstream_process.reset(data=True)
    with proxy_deployment(upstream_process, secrets_dir) as gateway, gateway.client() as c:
        assert c.put("/patients/up-1", json=PATIENT).status_code == 200
    body = httpx.get(f"{upstream_process.url}/patients/up-1").content
    assert envelope.is_token(json.loads(body)["ssn"])
    return body


UPSTREAM_FAULTS: dict[str, tuple[Callable[[bytes], bytes], bool, int, str | None]] = {
    # name: (the upstream's raw answer to a stored record, then hold the connection?, status, code)
    "complete (control)": (lambda b: _response(200, b), False, 200, None),
    "cut mid-body": (
        lambda b: _response(200, b[: len(b) // 2], length=len(b)),
        False,
        502,
        "upstream_unavailable",
    ),
    "one byte short": (lambda b: _response(200, b[:-1], length=len(b)), False, 502, "upstream_unavailable"),
    "chunked, cut before the last chunk": (
        lambda b: _chunked(b, finished=False),
        False,
        502,
        "upstream_unavailable",
    ),
    "half a body, then silence": (
        lambda b: _response(200, b[: len(b) // 2], length=len(b)),
        True,
        504,
        "upstream_timeout",
    ),
}


@pytest.mark.parametrize("fault", list(UPSTREAM_FAULTS))
def test_an_upstream_failing_mid_body_sends_no_partial_plaintext(
    stored_tokens: bytes, secrets_dir: Path, fault: str
) -> None:
    make, hold, status, code = UPSTREAM_FAULTS[fault]
    answer = make(stored_tokens)
    with (
        ScriptedUpstream(lambda method, path: answer, hold=hold) as scripted,
        proxy_deployment(Upstream(scripted.url), secrets_dir, upstream_read_timeout=0.5) as gateway,
        gateway.client() as c,
    ):
        response, took = timed(lambda: c.get("/patients/up-1"))
    assert response.status_code == status, response.text
    assert took < 0.5 + PROMPT
    if code is None:  # the control: had the gateway relayed anything, plaintext would show
        assert response.json()["ssn"] == PATIENT["ssn"]
        return
    assert error_code(response) == code
    assert_clean(response)
    assert "phi:" not in response.text


def test_an_upstream_trickling_its_answer_gets_504_at_the_response_deadline(
    stored_tokens: bytes, secrets_dir: Path
) -> None:
    """A byte every 0.1 s never trips the per-read timeout (0.5 s), so only the deadline for
    the whole response (1 s) ends it: 504, nothing of the body relayed."""
    answer = _response(200, stored_tokens)
    with (
        ScriptedUpstream(lambda method, path: answer, trickle=0.1) as scripted,
        proxy_deployment(
            Upstream(scripted.url), secrets_dir, upstream_read_timeout=0.5, response_timeout=1.0
        ) as gateway,
        gateway.client() as c,
    ):
        response, took = timed(lambda: c.get("/patients/up-1"))
    assert response.status_code == 504 and error_code(response) == "upstream_timeout"
    assert took < 1.0 + PROMPT
    assert_clean(response)
    assert "phi:" not in response.text


@pytest.mark.parametrize("status", [500, 503])
def test_upstream_5xx_is_relayed_as_it_is_never_decrypted(
    stored_tokens: bytes, secrets_dir: Path, status: int
) -> None:
    """A 5xx is the upstream's own answer: relayed with its status and body; the response rule
    covers 2xx, so tokens in an error body stay tokens. Cut short, the client's connection is
    dropped rather than a partial body passed off as complete."""
    error = _response(status, stored_tokens, extra=b"Retry-After: 7\r\n")
    with (
        ScriptedUpstream(lambda method, path: error) as scripted,
        proxy_deployment(Upstream(scripted.url), secrets_dir, upstream_read_timeout=0.5) as gateway,
        gateway.client() as c,
    ):
        response = c.get("/patients/up-1")
        assert response.status_code == status and response.headers["retry-after"] == "7"
        assert response.content == stored_tokens
        assert_clean(response)
        scripted.respond = lambda method, path: _response(
            status, stored_tokens[:100], length=len(stored_tokens)
        )
        with pytest.raises(httpx.RemoteProtocolError):
            c.get("/patients/up-1")


# -- the audit trail's disk ------------------------------------------------------------------


def test_a_full_disk_under_the_audit_file_blocks_phi_and_loses_nothing(
    store: Upstream, secrets_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real chained file sink in a gateway, with the disk filling up under it: a write
    stops half-way with ENOSPC, then every write fails until space is freed."""
    config = proxy_config(store.url, secrets_dir, audit_file=str(tmp_path / "audit.jsonl"))
    gateway = Gateway(config, open_audit=False)
    sink = ChainedFileSink(config.audit_file, load_chain_key(secrets_dir / "chain.key"))
    emitter = AuditEmitter(sink, retry_initial=0.01, retry_max=0.05)
    gateway.middleware.audit = emitter
    full = threading.Event()
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if fd == sink._fd and full.is_set():
            if len(data) > 1:
                real_write(fd, bytes(data)[: len(data) // 2])  # what fitted, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)

    def wait(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)

    with ThreadServer(gateway) as server, httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as c:
        assert c.put("/patients/df-0", json=PATIENT).status_code == 200
        wait(lambda: emitter.stats.written == 1)
        full.set()
        # Admitted before the failure is known: served, and its event waits in the queue.
        assert c.put("/patients/df-1", json=PATIENT).status_code == 200
        wait(lambda: not emitter.accepting)
        refused = [c.put("/patients/df-2", json=PATIENT), c.get("/patients/df-0"), c.get("/patients")]
        for response in refused:
            assert response.status_code == 503 and error_code(response) == "audit_unavailable"
            assert response.headers["retry-after"].isdigit()
        assert emitter.stats.write_failures >= 1
        full.clear()  # space freed: the held batch is written, the gateway takes PHI again
        wait(lambda: emitter.accepting)
        assert c.put("/patients/df-3", json=PATIENT).status_code == 200
    received = store.received()
    assert [(r["method"], r["path"]) for r in received] == [
        ("PUT", "/patients/df-0"),
        ("PUT", "/patients/df-1"),
        ("PUT", "/patients/df-3"),
    ]
    report = verify_chain(config.audit_file, load_chain_key(secrets_dir / "chain.key"))
    assert report.ok and not report.torn_tail, report.message
    events = [json.loads(line)["event"] for line in Path(config.audit_file).read_text().splitlines()]
    # Every request has exactly one event, refused ones too; the half-written batch is not there twice.
    assert [e["status"] for e in events] == [200, 200, 503, 503, 503, 200]
    assert emitter.stats.dropped == 0 and emitter.stats.written == 6


# -- kill -9 under load ----------------------------------------------------------------------


def _serve(
    upstream: Upstream, secrets: Path, audit_file: Path, port: int, log: Path
) -> subprocess.Popen[bytes]:
    env = serve_env(
        upstream.url,
        secrets,
        audit_sink="file",
        audit_file=audit_file,
        audit_chain_key_file=secrets / "chain.key",
        log_level="warning",
    )
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "phi_gateway", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    wait_for_port(port)
    return process


def _verify_cli(audit_file: Path, secrets: Path) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "phi_gateway",
            "audit",
            "verify",
            str(audit_file),
            "--chain-key-file",
            str(secrets / "chain.key"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_kill_9_under_load_leaves_only_tokens_upstream_and_a_chain_that_verifies(
    store: Upstream, secrets_dir: Path, tmp_path: Path
) -> None:
    audit_file, log = tmp_path / "audit.jsonl", tmp_path / "gateway.log"
    port = free_port()
    process = _serve(store, secrets_dir, audit_file, port, log)
    canary = f"KILL-CANARY-{uuid.uuid4().hex[:12]}"
    done = threading.Event()
    answered: list[int] = []

    def load(worker: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10) as client:
            for n in range(10_000):
                record = {**PATIENT, "first_name": f"{canary}-{worker}-{n}", "notes": f"{canary} note"}
                try:
                    answered.append(client.put(f"/patients/k9-{worker}-{n}", json=record).status_code)
                except httpx.HTTPError:
                    return  # the gateway is gone
                if done.is_set():
                    return

    workers = [threading.Thread(target=load, args=(w,)) for w in range(8)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 20
    while len(answered) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # mid-load: requests in flight, events queued
    process.wait(10)
    done.set()
    for worker in workers:
        worker.join(15)
    assert len(answered) >= 150 and set(answered) == {200}

    received = store.received()
    assert len([r for r in received if r["method"] == "PUT"]) >= len(answered)
    assert canary not in repr(received)
    assert_no_phi(received)
    at_rest = httpx.get(f"{store.url}/patients", params={"limit": "100000"}).json()
    assert len(at_rest) >= len(answered)
    assert all(envelope.is_token(r["first_name"]) and envelope.is_token(r["ssn"]) for r in at_rest)

    key = load_chain_key(secrets_dir / "chain.key")
    report = verify_chain(audit_file, key)
    assert report.ok, report.message  # up to a torn last line, if the kill left one
    assert 0 < report.records <= len(received)
    assert _verify_cli(audit_file, secrets_dir).startswith(f"ok: {report.records} records")
    text = audit_file.read_text()
    assert canary not in text and "phi:" not in text

    # What a kill during a write leaves: part of a record after the last newline. It is
    # reported as torn and not counted; everything before it verifies.
    with audit_file.open("ab") as f:
        f.write(b'{"seq":%d,"prev":"0123' % (report.records + 1))
    torn = audit_file.read_bytes().rpartition(b"\n")[2]  # with whatever the kill itself left
    after_crash = verify_chain(audit_file, key)
    assert (after_crash.ok, after_crash.torn_tail, after_crash.records) == (True, True, report.records)
    assert _verify_cli(audit_file, secrets_dir) == f"ok: {report.records} records; torn last line ignored"

    # The restarted gateway sets the torn bytes aside and continues the same chain.
    port = free_port()
    process = _serve(store, secrets_dir, audit_file, port, log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10) as client:
            assert client.put("/patients/k9-after", json=PATIENT).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)  # graceful: the queue is drained
        process.wait(30)
    assert canary not in log.read_text()
    resumed = verify_chain(audit_file, key)
    assert (resumed.ok, resumed.torn_tail, resumed.records) == (True, False, report.records + 1)
    assert Path(f"{audit_file}.torn").read_bytes() == torn + b"\n"
