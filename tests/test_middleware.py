"""PHIMiddleware on routes no policy names: the app gets the request as sent, except for
identity headers a client has no right to set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from phi_gateway.cache import DataKeyCache
from phi_gateway.identity import Identity, IdentitySettings
from phi_gateway.keyring import LocalKeyring
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.policy import load_policies

POLICIES = Path(__file__).resolve().parents[1] / "policies"
PROXY = "10.0.0.7"


async def _pass(keyring: LocalKeyring, client: str) -> list[tuple[bytes, bytes]]:
    """Headers the app behind the middleware saw for a GET on an unmatched route."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    identity = Identity(
        IdentitySettings(principal_header="X-User", roles_header="X-Roles", trusted_proxies=(PROXY,))
    )
    middleware = PHIMiddleware(
        app, policies=load_policies([POLICIES]), keys=DataKeyCache(keyring), identity=identity
    )
    headers = [(b"x-user", b"admin"), (b"x-roles", b"superuser"), (b"x-kept", b"yes")]
    scope: dict[str, Any] = {
        "type": "http", "method": "GET", "path": "/status", "raw_path": b"/status", "query_string": b"",
        "headers": headers, "client": (client, 40000), "root_path": "",
    }  # fmt: skip
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    assert sent[0]["status"] == 204
    return list(seen[0]["headers"])


@pytest.mark.parametrize("client", ["192.0.2.1", "unix-socket"])
async def test_a_clients_own_identity_headers_never_reach_the_app(keyring: LocalKeyring, client: str) -> None:
    assert await _pass(keyring, client) == [(b"x-kept", b"yes")]


async def test_the_trusted_proxys_identity_headers_do(keyring: LocalKeyring) -> None:
    assert await _pass(keyring, PROXY) == [
        (b"x-user", b"admin"),
        (b"x-roles", b"superuser"),
        (b"x-kept", b"yes"),
    ]
