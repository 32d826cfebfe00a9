"""The gateway end to end: real HTTP client, uvicorn on loopback, a real upstream.

Every test runs twice: against the standalone proxy (``PHIMiddleware(ProxyApp)`` in front
of the demo API in its own process) and against the demo API wrapped in ``PHIMiddleware``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from phi_gateway import envelope
from tests.e2e.conftest import AUTH, PHI_CANARIES, RAW_AUTH, Deployment, assert_no_phi

SAMPLES = Path(__file__).parents[1] / "samples"
PATIENT: dict[str, Any] = json.loads((SAMPLES / "patient.json").read_text())


def put(client: httpx.Client, pid: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    return client.put(f"/patients/{pid}", json=PATIENT if body is None else body, **kwargs)


def error_code(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    return str(response.json()["error"]["code"])


def test_round_trip_plaintext_at_the_client_tokens_upstream(deployment: Deployment) -> None:
    with deployment.client() as client:
        written = put(client, "p-1001")
        assert written.status_code == 200, written.text
        assert written.json()["ssn"] == "123-45-6789"
        read = client.get("/patients/p-1001")
        assert read.status_code == 200
        body = read.json()
        assert {k: v for k, v in body.items() if not k.endswith("_bidx")} == {**PATIENT, "id": "p-1001"}
    received = deployment.upstream.received()
    assert [r["method"] for r in received] == ["PUT", "GET"]
    assert_no_phi(received)
    stored = json.loads(received[0]["body"])
    assert envelope.is_token(stored["ssn"]) and stored["ssn_bidx"].count(":") == 1
    assert stored["weight_kg"] == 71.5 and stored["smoker"] is False  # not PHI: untouched
    assert received[0]["headers"]["content-length"] == str(len(received[0]["body"].encode()))
    assert "transfer-encoding" not in received[0]["headers"]


def test_search_by_query_and_by_json_criteria(deployment: Deployment) -> None:
    with deployment.client() as client:
        for n in range(3):
            put(client, f"s-{n}", {**PATIENT, "ssn": f"900-00-000{n}", "last_name": f"Name{n}"})
        deployment.upstream.reset()
        found = client.get("/patients", params={"ssn": "900 00 0001", "limit": "10"})
        assert found.status_code == 200
        assert [p["id"] for p in found.json()] == ["s-1"]
        assert found.json()[0]["ssn"] == "900-00-0001"
        by_name = client.post("/patients/search", json={"last_name": "Name2", "dob": "1980-02-29"})
        assert [p["id"] for p in by_name.json()] == ["s-2"]
    received = deployment.upstream.received()
    assert "ssn_bidx=" in received[0]["query"] and "limit=10" in received[0]["query"]
    assert_no_phi(received, ("900-00-0001", "900000001", "900 00 0001", "Name2"))


def test_list_costs_one_key_unwrap_per_data_key_not_per_field(deployment: Deployment) -> None:
    with deployment.client() as client:
        for n in range(12):
            assert put(client, f"l-{n:02d}").status_code == 200
        deployment.keys.clear()
        before = deployment.keys.stats.decrypt_calls
        listing = client.get("/patients", params={"limit": "100"})
        assert listing.status_code == 200
        mine = [p for p in listing.json() if p["id"].startswith("l-")]
        assert len(mine) == 12 and all(p["ssn"] == "123-45-6789" for p in mine)
        # per_record policy: one data key per patient, 7 protected fields each
        assert deployment.keys.stats.decrypt_calls - before == len(listing.json())


def test_one_hundred_concurrent_requests(deployment: Deployment) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=deployment.url, timeout=30, headers=AUTH) as client:
            return await asyncio.gather(
                *(
                    client.put(f"/patients/c-{n}", json={**PATIENT, "ssn": f"555-00-{n:04d}"})
                    for n in range(100)
                )
            )

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.json()["ssn"] for r in responses) == sorted(f"555-00-{n:04d}" for n in range(100))
    with deployment.client() as client:
        assert client.get("/patients/c-42").json()["ssn"] == "555-00-0042"


def test_oversized_content_length_is_refused_before_the_body_is_read(deployment: Deployment) -> None:
    with socket.create_connection(("127.0.0.1", int(deployment.url.rsplit(":", 1)[1])), timeout=5) as sock:
        sock.sendall(
            b"PUT /patients/p-big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + RAW_AUTH
            + b"Content-Length: 10000000\r\n\r\n{"
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply
    assert deployment.upstream.received() == []


def test_slow_body_gets_408(deployment: Deployment) -> None:
    with socket.create_connection(("127.0.0.1", int(deployment.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(
            b"PUT /patients/p-slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + RAW_AUTH
            + b'Content-Length: 30\r\n\r\n{"ssn": '
        )
        started = time.monotonic()
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
    assert time.monotonic() - started < 9  # the body deadline fired, not the socket timeout
    assert deployment.upstream.received() == []


def test_a_moved_token_fails_closed_and_redact_routes_null_it(deployment: Deployment) -> None:
    with deployment.client() as client:
        put(client, "t-1")
        put(client, "t-2", {**PATIENT, "ssn": "999-99-9999"})
    stored, other = deployment.read_at_rest("t-1"), deployment.read_at_rest("t-2")
    deployment.write_at_rest({**stored, "ssn": other["ssn"]})  # t-2's SSN token moved into t-1's record
    with deployment.client() as client:
        single = client.get("/patients/t-1")  # on_error: redact
        assert single.status_code == 200 and single.json()["ssn"] is None
        assert single.json()["dob"] == PATIENT["dob"]
        listing = client.get("/patients", params={"limit": "1000"})  # on_error: fail
        assert listing.status_code == 502 and error_code(listing) == "integrity_error"
        assert "999-99-9999" not in listing.text and "123-45-6789" not in listing.text


def test_unmatched_routes_pass_through_untouched(deployment: Deployment) -> None:
    with deployment.client() as client:
        response = client.get("/_received")
    assert response.status_code == 200


def test_error_responses_of_the_upstream_pass_unchanged(deployment: Deployment) -> None:
    with deployment.client() as client:
        missing = client.get("/patients/nobody")
    assert missing.status_code == 404 and missing.json() == {"error": "not found"}


def test_the_canaries_would_catch_a_leak(deployment: Deployment) -> None:
    with deployment.client() as client:
        put(client, "k-1")
        seen_by_client = client.get("/patients/k-1").text
    for canary in PHI_CANARIES:
        if canary != "123456789":  # the digits-only form appears only if something normalizes and leaks
            assert canary in seen_by_client
    with pytest.raises(AssertionError):
        assert_no_phi([{"body": seen_by_client}])


FHIR_PATIENT: dict[str, Any] = json.loads((SAMPLES / "fhir-patient.json").read_text())
FHIR_BUNDLE: dict[str, Any] = json.loads((SAMPLES / "fhir-bundle.json").read_text())


def test_fhir_patient_and_bundle_round_trip_and_search(deployment: Deployment) -> None:
    fhir_json = {"content-type": "application/fhir+json"}
    with deployment.client() as client:
        put_one = client.put("/fhir/Patient/example-42", content=json.dumps(FHIR_PATIENT), headers=fhir_json)
        assert put_one.status_code == 200, put_one.text
        bundle = client.post("/fhir", content=json.dumps(FHIR_BUNDLE), headers=fhir_json)
        assert bundle.status_code == 200, bundle.text
        read = client.get("/fhir/Patient/example-42").json()
        assert {k: v for k, v in read.items() if not k.endswith("_bidx")} == FHIR_PATIENT
        deployment.keys.clear()
        calls = deployment.keys.stats.decrypt_calls
        found = client.get("/fhir/Patient", params={"identifier": "111-22-3333"}).json()
        assert [e["resource"]["id"] for e in found["entry"]] == ["b-1"]
        assert found["entry"][0]["resource"]["name"][0]["family"] == "Smith"
        everyone = client.get("/fhir/Patient").json()
        assert len(everyone["entry"]) == 3
        # per_policy: both writes used one cached data key, so three patients (about 25
        # tokens) cost a single unwrap
        assert deployment.keys.stats.generate_calls == 1
        assert deployment.keys.stats.decrypt_calls - calls == 1
    received = deployment.upstream.received()
    assert_no_phi(
        received, ("123-45-6789", "Chalmers", "1974-12-25", "Erewhon", "111-22-3333", "Smith", "Søren")
    )
    assert "ssn_bidx=" in next(r["query"] for r in received if r["method"] == "GET" and r["query"])


@pytest.mark.parametrize(
    "target",
    [
        "/x/../patients/p-2",
        "/patients/./p-2",
        "/patients/%2e/p-2",
        "/patients/x/%2E%2E/p-2",
        "//patients/p-2",
        "/patients%2Fp-2",
        "/patients;v=1/p-2",
        "/patients\\p-2",
        "/x/..;/patients/p-2",
        "/patients%3Bv=1/p-2",
        "/PATIENTS/%2e/p-2",
        "/fhir//Patient/p-2",
    ],
)
def test_paths_an_upstream_might_normalize_are_refused(deployment: Deployment, target: str) -> None:
    port = int(deployment.url.rsplit(":", 1)[1])
    body = b'{"ssn": "123-45-6789"}'
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400") and b"ambiguous_path" in reply
    assert deployment.upstream.received() == []


@pytest.mark.parametrize("target", ["/echo;v=1", "/files/a%2Fb", "/x//y", "/static/../echo", "/a\\b"])
def test_the_same_oddities_away_from_policy_routes_pass_through(deployment: Deployment, target: str) -> None:
    """Only a path an upstream could read as a policy route is refused; the demo API routes
    none of these, so its own 404 proves they reached it."""
    port = int(deployment.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 404") and reply.endswith(b"\r\n\r\nNot Found"), reply


def test_policy_paths_match_whatever_their_case(deployment: Deployment) -> None:
    with deployment.client() as client:
        response = client.put("/PATIENTS/p-3", json=PATIENT)
    assert response.status_code in (404, 405)  # the demo API is case-sensitive; the gateway was not fooled
    assert_no_phi(deployment.upstream.received())


def test_methods_and_heads_on_policy_paths(deployment: Deployment) -> None:
    with deployment.client() as client:
        patch = client.patch("/patients/p-1", json={"ssn": "123-45-6789"})
        head = client.head("/patients", params={"ssn": "123-45-6789"})
        body_on_get = client.request("GET", "/patients/p-1", content=b'{"ssn": "123-45-6789"}')
    assert patch.status_code == 405 and error_code(patch) == "method_not_allowed"
    assert head.status_code == 200
    assert body_on_get.status_code == 400 and error_code(body_on_get) == "unexpected_body"
    received = deployment.upstream.received()
    assert [(r["method"], r["query"].split("=")[0]) for r in received] == [("HEAD", "ssn_bidx")]
    assert_no_phi(received)


@pytest.mark.parametrize("name", ["SSN", "ssn[]", "Ssn", "s_sn", "ssn%00"])
def test_query_names_that_fold_to_a_searched_one_are_refused(deployment: Deployment, name: str) -> None:
    with deployment.client() as client:
        response = client.get(f"/patients?{name}=123-45-6789")
    assert response.status_code == 400 and error_code(response) == "query_ambiguous"
    assert deployment.upstream.received() == []


def test_decrypted_responses_are_not_cacheable(deployment: Deployment) -> None:
    with deployment.client() as client:
        put(client, "cc-1")
        response = client.get("/patients/cc-1", headers={"Range": "bytes=0-10"})
    assert response.status_code == 200 and response.json()["ssn"] == "123-45-6789"
    assert response.headers["cache-control"] == "private, no-store"
    assert "etag" not in response.headers
    assert "range" not in deployment.upstream.received()[-1]["headers"]


def test_phi_routes_need_a_principal(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.url, timeout=20) as anonymous:
        write = anonymous.put("/patients/a-1", json=PATIENT)
        read = anonymous.get("/patients/a-1")
    for response in (write, read):
        assert response.status_code == 401 and error_code(response) == "authentication_required"
        assert response.headers["www-authenticate"] == "Bearer"
        assert len(response.headers["x-request-id"]) == 32
    assert deployment.upstream.received() == []


@pytest.mark.parametrize(
    ("roles", "ssn", "notes"),
    [
        ("clinician", "123-45-6789", PATIENT["notes"]),
        ("billing", "123-45-6789", None),
        ("nurse", "*******6789", None),
        ("", "*******6789", None),
        ("billing,clinician", "123-45-6789", PATIENT["notes"]),
    ],
)
def test_reveal_matrix(deployment: Deployment, roles: str, ssn: str, notes: str | None) -> None:
    with deployment.client() as writer:
        put(writer, "r-1")
    with deployment.client(roles=roles) as reader:
        one = reader.get("/patients/r-1").json()
        many = reader.get("/patients", params={"limit": "5"}).json()
    for record in (one, many[0]):
        assert record["ssn"] == ssn
        assert record.get("notes") == notes and (notes is not None or "notes" not in record)
        assert record["dob"] == PATIENT["dob"]  # no reveal rule: every principal sees it


def test_break_glass_reveals_everything_and_needs_a_reason(deployment: Deployment) -> None:
    with deployment.client() as writer:
        put(writer, "bg-1")
    with deployment.client(roles="emergency") as responder:
        refused = responder.get("/patients/bg-1")
        allowed = responder.get(
            "/patients/bg-1", headers={"X-Break-Glass-Reason": "unconscious patient, ED bay 2"}
        )
    assert refused.status_code == 403 and error_code(refused) == "break_glass_reason_required"
    assert allowed.status_code == 200
    assert allowed.json()["ssn"] == "123-45-6789" and allowed.json()["notes"] == PATIENT["notes"]
    # the reason is for the audit trail; the upstream never sees it
    assert all("x-break-glass-reason" not in r["headers"] for r in deployment.upstream.received())


def test_request_ids_are_honoured_and_forwarded(deployment: Deployment) -> None:
    with deployment.client() as client:
        response = client.put("/patients/rid-1", json=PATIENT, headers={"X-Request-ID": "trace-abc.123"})
        generated = client.get("/patients/rid-1", headers={"X-Request-ID": "bad id with spaces"})
    assert response.headers["x-request-id"] == "trace-abc.123"
    assert (
        generated.headers["x-request-id"] != "bad id with spaces"
        and len(generated.headers["x-request-id"]) == 32
    )
    assert [r["headers"]["x-request-id"] for r in deployment.upstream.received()] == [
        "trace-abc.123",
        generated.headers["x-request-id"],
    ]


def test_repeated_identity_headers_are_refused(deployment: Deployment) -> None:
    port = int(deployment.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"GET /patients/p-1 HTTP/1.1\r\nHost: x\r\nX-User: nurse\r\nX-Roles: nurse\r\n"
            b"X-Roles: clinician\r\nConnection: close\r\n\r\n"
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 401") and b"invalid_credentials" in reply
    assert deployment.upstream.received() == []
