"""Caller identity end to end: a gateway verifying bearer JWTs, identity headers that reach
the upstream only from the trusted proxy, break-glass on the audit trail, and context
headers that must not be repeated."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from phi_gateway.audit import AuditEmitter
from phi_gateway.audit_chain import ChainedFileSink, load_chain_key
from phi_gateway.cache import DataKeyCache
from phi_gateway.identity import Identity, IdentitySettings
from phi_gateway.keyring import LocalKeyring
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from tests.e2e.conftest import (
    AUTH,
    AuditFile,
    Deployment,
    ThreadServer,
    Upstream,
    proxy_deployment,
    read_events,
)

PATIENT = json.loads((Path(__file__).parents[1] / "samples" / "patient.json").read_text())
ISSUER, AUDIENCE = "https://idp.example", "phi-gateway"
IDP_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: Any = IDP_KEY, algorithm: str = "RS256", **overrides: Any) -> str:
    now = int(time.time())
    claims = {"sub": "dr-jwt", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "roles": ["clinician"]}
    return jwt.encode({**claims, **overrides}, key, algorithm=algorithm)


@pytest.fixture
def jwt_gateway(upstream_process: Upstream, secrets_dir: Path, tmp_path: Path) -> Iterator[Deployment]:
    """The proxy verifying RS256 tokens from a PEM key file. The identity headers are trusted
    only from an address the tests never connect from: to this gateway the tests are clients."""
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        IDP_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    upstream_process.reset(data=True)
    with proxy_deployment(
        upstream_process,
        secrets_dir,
        jwt_public_key_file=str(pem),
        jwt_algorithms=["RS256"],
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        trusted_proxies=["192.0.2.10"],
    ) as deployment:
        yield deployment


def test_a_gateway_verifying_jwts_lets_valid_tokens_through_and_audits_them(
    jwt_gateway: Deployment, upstream_process: Upstream
) -> None:
    forged = {"X-User": "mallory", "X-Roles": "clinician"}  # a client's own claim: never trusted
    with httpx.Client(base_url=jwt_gateway.url, timeout=20) as client:
        bearer = {"Authorization": f"Bearer {token()}"}
        written = client.put("/patients/jwt-1", json=PATIENT, headers={**bearer, **forged})
        read = client.get("/patients/jwt-1", headers=bearer)
        refused = {
            name: client.get("/patients/jwt-1", headers={"Authorization": f"Bearer {bad}"})
            for name, bad in (
                ("expired", token(exp=int(time.time()) - 3600)),
                ("audience", token(aud="another-service")),
                ("none", token(None, "none")),
                ("other-key", token(rsa.generate_private_key(public_exponent=65537, key_size=2048))),
            )
        }
        headers_only = client.get("/patients/jwt-1", headers=forged)
    assert written.status_code == 200 and read.status_code == 200
    assert read.json()["ssn"] == PATIENT["ssn"]  # the token's clinician role reveals it
    for response in refused.values():
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_credentials"
        assert response.headers["www-authenticate"] == "Bearer"
    assert headers_only.status_code == 401  # X-User from an untrusted address names nobody
    assert headers_only.json()["error"]["code"] == "authentication_required"
    received = upstream_process.received()
    assert [r["method"] for r in received] == ["PUT", "GET"]  # refused requests went nowhere
    assert all("x-user" not in r["headers"] and "x-roles" not in r["headers"] for r in received)
    assert jwt_gateway.audit_file is not None
    events = read_events(jwt_gateway.audit_file)  # drained: the deployment is still up, so wait
    deadline = time.monotonic() + 10
    while len(events) < 7 and time.monotonic() < deadline:
        time.sleep(0.02)
        events = read_events(jwt_gateway.audit_file)
    assert len(events) == 7
    put, get, *denied = events
    for event in (put, get):
        assert (event["auth"], event["principal"], event["roles"]) == ("jwt", "dr-jwt", ["clinician"])
        assert event["outcome"] == "ok" and event["status"] == 200
    assert get["response"]["fields"]["decrypted"]["$.ssn"] == 1
    assert [(e["principal"], e["status"], e["error"]) for e in denied] == [
        *[(None, 401, "invalid_credentials")] * 4,
        (None, 401, "authentication_required"),
    ]


def test_identity_headers_of_the_trusted_proxy_reach_the_upstream_as_sent(
    deploy: Callable[[], AbstractContextManager[Deployment]],
) -> None:
    with deploy() as deployment, deployment.client() as client:
        assert client.put("/patients/tp-1", json=PATIENT).status_code == 200
        received = deployment.upstream.received()
    assert received[-1]["headers"]["x-user"] == AUTH["X-User"]
    assert received[-1]["headers"]["x-roles"] == AUTH["X-Roles"]


def test_break_glass_is_on_the_trail_granted_and_refused(
    deploy: Callable[[], AbstractContextManager[Deployment]],
) -> None:
    reason = "unconscious patient, ED bay 2"
    with deploy() as deployment:
        with deployment.client() as writer:
            assert writer.put("/patients/bg-1", json=PATIENT).status_code == 200
        with deployment.client(roles="emergency") as responder:
            refused = responder.get("/patients/bg-1")
            allowed = responder.get("/patients/bg-1", headers={"X-Break-Glass-Reason": reason})
    assert refused.status_code == 403 and allowed.status_code == 200
    assert deployment.audit_file is not None
    put, denied, granted = read_events(deployment.audit_file)
    assert not put["break_glass"] and not put["break_glass_attempted"]
    # who tried, with which roles, and that it was a break-glass attempt
    assert (denied["principal"], denied["roles"], denied["auth"]) == ("dr-test", ["emergency"], "header")
    assert denied["break_glass_attempted"] and not denied["break_glass"]
    assert (denied["outcome"], denied["error"], denied["status"]) == (
        "refused",
        "break_glass_reason_required",
        403,
    )
    assert "break_glass_reason" not in denied
    assert granted["break_glass"] and granted["break_glass_attempted"]
    assert granted["break_glass_reason"] == reason
    assert granted["principal"] == "dr-test" and granted["outcome"] == "ok"
    assert granted["response"]["fields"]["decrypted"]["$.ssn"] == 1  # revealed, whatever the roles
    assert "withheld" not in granted["response"]["fields"]


TENANT_POLICY = """
version: 1
name: notes
routes:
  - match: {methods: [PUT], path: "/notes/{note_id}"}
    request:
      context: {Tenant: {header: X-Tenant}, NoteId: "{note_id}"}
      encrypt: ["$.text"]
"""


def test_a_repeated_context_header_is_refused(secrets_dir: Path, tmp_path: Path) -> None:
    """Servers disagree on which copy of a repeated header counts, so a context value taken
    from a header must come from exactly one."""
    seen: list[Any] = []

    async def store(request: Request) -> JSONResponse:
        seen.append(await request.json())
        return JSONResponse({})

    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "notes.yaml").write_text(TENANT_POLICY)
    audit_file = tmp_path / "audit.jsonl"
    app = Starlette(routes=[Route("/notes/{note_id}", store, methods=["PUT"])])
    app.add_middleware(
        PHIMiddleware,
        policies=load_policies([tmp_path / "policies"]),
        keys=DataKeyCache(LocalKeyring.load(secrets_dir / "keyring.json")),
        pepper=Pepper.load(secrets_dir / "pepper.json"),
        identity=Identity(
            IdentitySettings(
                principal_header="X-User", roles_header="X-Roles", trusted_proxies=("127.0.0.1",)
            )
        ),
        audit=AuditEmitter(ChainedFileSink(audit_file, load_chain_key(secrets_dir / "chain.key"))),
    )
    note = b'{"text": "a note"}'
    with ThreadServer(app, audit=AuditFile(audit_file, secrets_dir / "chain.key")) as server:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=20) as client:
            once = client.put(
                "/notes/n-1", content=note, headers={"X-Tenant": "t-1", "Content-Type": "application/json"}
            )
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(
                b"PUT /notes/n-2 HTTP/1.1\r\nHost: x\r\nX-User: dr-test\r\nX-Roles: clinician\r\n"
                b"X-Tenant: t-1\r\nx-tenant: t-2\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(note)}\r\nConnection: close\r\n\r\n".encode()
                + note
            )
            reply = sock.recv(4096)
    assert once.status_code == 200
    assert reply.startswith(b"HTTP/1.1 400") and b"header_ambiguous" in reply
    assert len(seen) == 1  # the refused request reached nothing
    _, refused = read_events(audit_file)
    assert (refused["error"], refused["principal"], refused["status"]) == ("header_ambiguous", "dr-test", 400)
