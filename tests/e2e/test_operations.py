"""Operations, end to end: the admin port (health, readiness against a KMS that goes away and
comes back, Prometheus metrics after real traffic) and policy hot reload under load, by file
change and by SIGHUP to ``phi-gateway serve`` as shipped."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from prometheus_client.parser import text_string_to_metric_families

from phi_gateway.gateway import Gateway
from tests.conftest import REGION
from tests.e2e.conftest import (
    AUTH,
    POLICIES,
    ThreadServer,
    Upstream,
    free_port,
    proxy_config,
    proxy_deployment,
    serve_env,
    wait_for_port,
)

SSN = "078-05-1120"
PATIENT = {"first_name": "Ada", "last_name": "Lovelace", "ssn": SSN, "dob": "1815-12-10", "notes": "n"}


def metrics(admin_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    text = httpx.get(f"{admin_url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_admin_port_reports_health_and_the_traffic_it_saw(
    secrets_dir: Path, upstream_process: Upstream
) -> None:
    with proxy_deployment(upstream_process, secrets_dir) as gw:
        assert gw.admin_url is not None
        with gw.client() as client:
            assert client.put("/patients/ops-1", json={**PATIENT, "id": "ops-1"}).status_code == 200
            assert client.get("/patients/ops-1").json()["ssn"] == SSN
            assert client.get("/patients/ops-1", headers={"X-Roles": "nurse"}).status_code == 200
            assert client.get("/patients", params={"ssn": SSN}).status_code == 200
            client.get("/not-a-policy-route")  # passed through untouched
            assert client.get("/patients/%2e%2e/x").status_code == 400  # refused before routing
            client.request("PROPFIND", "/patients/ops-1")  # a WebDAV method: 405
            # The admin paths on the main port are the upstream's business, never the gateway's.
            assert "phi_gateway_" not in client.get("/metrics").text

        assert httpx.get(f"{gw.admin_url}/healthz").json() == {"status": "alive"}
        ready = httpx.get(f"{gw.admin_url}/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "checks": {"policies": "ok", "keys": "ok", "audit": "ok"}}
        assert httpx.post(f"{gw.admin_url}/readyz").status_code == 405
        assert httpx.get(f"{gw.admin_url}/patients/ops-1").status_code == 404  # never proxied

        samples = metrics(gw.admin_url)
        assert (
            total(
                samples,
                "phi_gateway_requests_total",
                route="/patients/{patient_id}",
                method="PUT",
                status="200",
            )
            == 1
        )
        assert total(samples, "phi_gateway_requests_total", route="/patients/{patient_id}", method="GET") == 2
        assert (
            total(samples, "phi_gateway_requests_total", route="(unmatched)", method="GET", status="404") >= 1
        )
        assert total(samples, "phi_gateway_requests_total", route="(refused)", status="400") == 1
        assert total(samples, "phi_gateway_requests_total", method="other") == 1  # "PROPFIND" is no label
        assert total(samples, "phi_gateway_request_seconds_count", route="/patients") == 1
        assert total(samples, "phi_gateway_upstream_seconds_count", route="/patients/{patient_id}") == 3
        assert total(samples, "phi_gateway_fields_total", policy="patients", action="encrypted") >= 5
        assert total(samples, "phi_gateway_fields_total", policy="patients", action="indexed") >= 2
        assert total(samples, "phi_gateway_fields_total", policy="patients", action="decrypted") >= 5
        assert total(samples, "phi_gateway_fields_total", policy="patients", action="withheld") >= 2
        assert total(samples, "phi_gateway_cache_misses_total", kind="encrypt") == 1
        assert total(samples, "phi_gateway_cache_hits_total", kind="decrypt") >= 1
        assert ("phi_gateway_cache_entries", ()) in samples
        assert total(samples, "phi_gateway_audit_events_written_total") >= 1
        assert total(samples, "phi_gateway_audit_events_dropped_total") == 0
        assert ("phi_gateway_audit_queue_depth", ()) in samples
        # a fresh chained file: its last sequence number is the count of events written to it
        assert samples[("phi_gateway_audit_last_seq", ())] == total(
            samples, "phi_gateway_audit_events_written_total"
        )
        assert samples[("phi_gateway_ready", ())] == 1

        text = httpx.get(f"{gw.admin_url}/metrics").text
        for secret in (SSN, "ops-1", "dr-test", "Lovelace", "123456789", "078051120"):
            assert secret not in text


def start_kms(port: int) -> ThreadedMotoServer:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def test_readyz_follows_the_key_service_down_and_back(secrets_dir: Path, upstream_process: Upstream) -> None:
    port = free_port()
    moto = start_kms(port)  # this test's own: moto keeps its keys across a stop and start
    url = f"http://127.0.0.1:{port}"
    arn = boto3.client("kms", region_name=REGION, endpoint_url=url).create_key()["KeyMetadata"]["Arn"]
    config = proxy_config(
        upstream_process.url,
        secrets_dir,
        keyring=None,
        kms_key_ids=[arn],
        aws_endpoint_url=url,
        aws_region=REGION,
    )
    admin = f"http://127.0.0.1:{config.admin_port}"
    try:
        with (
            ThreadServer(Gateway(config)) as server,
            httpx.Client(base_url=server.url, headers=AUTH) as client,
        ):
            assert httpx.get(f"{admin}/readyz").status_code == 200
            assert client.put("/patients/kms-1", json={**PATIENT, "id": "kms-1"}).status_code == 200

            moto.stop()
            until(lambda: httpx.get(f"{admin}/readyz", timeout=10).status_code == 503)
            down = httpx.get(f"{admin}/readyz", timeout=10).json()
            assert down["status"] == "unready" and down["checks"]["keys"] != "ok"
            assert down["checks"]["policies"] == "ok"
            assert httpx.get(f"{admin}/healthz").status_code == 200  # alive, just not ready
            assert metrics(admin)[("phi_gateway_ready", ())] == 0

            moto = start_kms(port)
            until(lambda: httpx.get(f"{admin}/readyz", timeout=10).status_code == 200)
            assert client.get("/patients/kms-1").json()["ssn"] == SSN
            samples = metrics(admin)
    finally:
        moto.stop()
    calls = "phi_gateway_aws_calls_total"
    assert total(samples, calls, service="KMS", operation="GenerateDataKey", outcome="ok") == 1
    assert total(samples, calls, service="KMS", operation="DescribeKey", outcome="ok") >= 2
    failed = total(samples, calls, service="KMS", operation="DescribeKey")
    assert failed - total(samples, calls, service="KMS", operation="DescribeKey", outcome="ok") >= 1
    assert total(samples, "phi_gateway_aws_call_seconds_count", service="KMS", operation="DescribeKey") >= 3


BROKEN = """version: 1
name: patients
routes:
  - match: {methods: [PUT], path: "/patients/{id}"}
    request:
      context: {ResourceId: {param: id}}
      encrypt: ["$.ssn["]
"""


def test_a_broken_policy_edit_during_load_changes_nothing_and_is_reported(
    secrets_dir: Path, upstream_process: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    caplog.set_level(logging.INFO, logger="phi_gateway.policy")
    with proxy_deployment(
        upstream_process, secrets_dir, policies=[str(policies)], policy_reload_interval=0.05
    ) as gw:
        assert gw.admin_url is not None
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with gw.client() as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    answer = client.put(f"/patients/load-{n}", json={**PATIENT, "id": f"load-{n}"})
                    statuses.append(answer.status_code)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            until(lambda: len(statuses) >= 5)
            (policies / "patients.yaml").write_text(BROKEN)
            until(
                lambda: (
                    total(metrics(gw.admin_url or ""), "phi_gateway_policy_reloads_total", outcome="rejected")
                    >= 1
                )
            )
            seen = len(statuses)
            until(lambda: len(statuses) >= seen + 10)
        finally:
            stop.set()
            worker.join(30)
        assert statuses and set(statuses) == {200}
        stored = [r for r in upstream_process.received() if r["path"].startswith("/patients/load-")]
        assert len(stored) == len(statuses)
        assert all(SSN not in json.dumps(r) for r in stored)  # still encrypted under the old set
        assert any("policy reload (files changed) rejected" in r.getMessage() for r in caplog.records)
        assert any("patients.yaml" in r.getMessage() for r in caplog.records)  # says where

        # A valid edit is taken, and the next request is served under it.
        text = (
            (POLICIES / "patients.yaml")
            .read_text()
            .replace("version: 1\n", "version: 1\nunmatched: deny\n", 1)
        )
        (policies / "patients.yaml").write_text(text)
        until(
            lambda: (
                total(metrics(gw.admin_url or ""), "phi_gateway_policy_reloads_total", outcome="loaded") >= 1
            )
        )
        with gw.client() as client:
            assert client.get("/somewhere-else").status_code == 403


def test_sighup_reloads_serve_and_logs_are_json(
    secrets_dir: Path, upstream_process: Upstream, tmp_path: Path
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    port, admin_port = free_port(), free_port()
    env = serve_env(
        upstream_process.url,
        secrets_dir,
        policies=policies,
        admin_port=admin_port,
        policy_reload_interval=0,  # SIGHUP only
        audit_sink="none",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "phi_gateway", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        wait_for_port(admin_port)
        reloads = lambda outcome: total(metrics(admin), "phi_gateway_policy_reloads_total", outcome=outcome)  # noqa: E731
        (policies / "patients.yaml").write_text(BROKEN)
        process.send_signal(signal.SIGHUP)
        until(lambda: reloads("rejected") == 1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as client:
            assert client.put("/patients/hup-1", json={**PATIENT, "id": "hup-1"}).status_code == 200
            shutil.copy(POLICIES / "patients.yaml", policies / "patients.yaml")
            process.send_signal(signal.SIGHUP)
            until(lambda: reloads("loaded") == 1)
            assert client.get("/patients/hup-1").json()["ssn"] == SSN
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if line.strip()]
    entries: list[dict[str, Any]] = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    assert any(e["level"] == "error" and "rejected" in e["message"] for e in entries)
    assert any("policies reloaded (SIGHUP)" in e["message"] for e in entries)
    assert SSN not in stderr
