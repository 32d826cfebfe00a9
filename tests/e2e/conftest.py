"""Real servers on loopback ports: the demo upstream as its own process, and the gateway
(standalone proxy, or middleware inside a Starlette app) under uvicorn in a thread."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from phi_gateway.audit import AuditEmitter
from phi_gateway.audit_chain import ChainedFileSink, create_chain_key_file, load_chain_key, verify_chain
from phi_gateway.cache import DataKeyCache
from phi_gateway.cli_serve import SERVER_OPTIONS
from phi_gateway.config import GatewayConfig
from phi_gateway.demo_upstream import create_upstream
from phi_gateway.gateway import Gateway
from phi_gateway.identity import Identity, IdentitySettings
from phi_gateway.keyring import LocalKeyring
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.pepper import Pepper, create_pepper_file
from phi_gateway.policy import load_policies

ROOT = Path(__file__).parents[2]
_AUDIT_FILES = itertools.count(1)
POLICIES = ROOT / "policies"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_env(upstream: str, secrets: Path, **settings: object) -> dict[str, str]:
    """The environment of ``phi-gateway serve`` as the tests run it: the test keys and pepper,
    the shipped policies, identity headers trusted from 127.0.0.1 and no admin port.
    ``settings`` (config names) add or override; None drops one. The runner's own
    ``PHI_GATEWAY_*`` variables never leak in."""
    values: dict[str, object] = {
        "upstream": upstream,
        "keyring": secrets / "keyring.json",
        "pepper": secrets / "pepper.json",
        "policies": POLICIES,
        "principal_header": "X-User",
        "roles_header": "X-Roles",
        "trusted_proxies": "127.0.0.1",
        "admin_port": 0,
        **settings,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_GATEWAY_")}
    env.update({f"PHI_GATEWAY_{k.upper()}": str(v) for k, v in values.items() if v is not None})
    return env


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class ThreadServer:
    """uvicorn serving an ASGI app on a free loopback port, in a background thread."""

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, **{**SERVER_OPTIONS, "log_level": "warning"}, **options
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def assert_chain_verifies(path: Path, secrets: Path) -> None:
    """Every deployment's audit file, once its server has drained it, must verify."""
    report = verify_chain(path, load_chain_key(secrets / "chain.key"))
    assert report.ok and not report.torn_tail, f"{path}: {report.message}"


@dataclass
class Upstream:
    """The demo patients API in its own process, recording what it receives."""

    url: str
    process: subprocess.Popen[bytes] | None = None

    def received(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/_received").json()  # type: ignore[no-any-return]

    def reset(self, *, data: bool = False) -> None:
        httpx.delete(f"{self.url}/_received", params={"data": "1"} if data else {})


@pytest.fixture(scope="session")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from phi_gateway.keyring import create_keyring

    path = tmp_path_factory.mktemp("gateway-secrets")
    create_keyring(path / "keyring.json")
    create_pepper_file(path / "pepper.json")
    create_chain_key_file(path / "chain.key")
    return path


@pytest.fixture(scope="session")
def upstream_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    port = free_port()
    db = tmp_path_factory.mktemp("upstream") / "patients.sqlite"
    process = subprocess.Popen(
        [sys.executable, "-m", "phi_gateway.demo_upstream", "--port", str(port), "--db", str(db), "--record"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield Upstream(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Deployment:
    """A gateway in front of a recording upstream, as the tests see it."""

    url: str
    upstream: Upstream
    keys: DataKeyCache
    kind: str
    store: Any = None  # the middleware's inner store; the proxy's upstream is reached over HTTP
    audit_file: Path | None = None
    admin_url: str | None = None  # the proxy's /healthz, /readyz and /metrics

    def client(self, *, roles: str = "clinician", **options: Any) -> httpx.Client:
        """A client authenticated by the trusted-proxy headers, as a clinician by default."""
        headers = {"X-User": "dr-test", "X-Roles": roles} if roles is not None else {}
        return httpx.Client(base_url=self.url, timeout=20, headers=headers, **options)

    def read_at_rest(self, pid: str) -> dict[str, Any]:
        """A record as the upstream holds it, bypassing the gateway."""
        if self.store is not None:
            return self.store.get(pid)  # type: ignore[no-any-return]
        return httpx.get(f"{self.upstream.url}/patients/{pid}").json()  # type: ignore[no-any-return]

    def write_at_rest(self, record: dict[str, Any]) -> None:
        """What an attacker with write access to the upstream's database can do."""
        if self.store is not None:
            self.store.put(record)
        else:
            httpx.put(f"{self.upstream.url}/patients/{record['id']}", json=record).raise_for_status()


def proxy_config(upstream: str, secrets: Path, **overrides: Any) -> GatewayConfig:
    settings: dict[str, Any] = {
        "upstream": upstream,
        "policies": [str(POLICIES)],
        "keyring": str(secrets / "keyring.json"),
        "pepper": str(secrets / "pepper.json"),
        "principal_header": "X-User",
        "roles_header": "X-Roles",
        "trusted_proxies": ["127.0.0.1"],
        "break_glass_role": "emergency",
        "audit_sink": "file",
        "audit_chain_key_file": str(secrets / "chain.key"),
        "audit_file": str(secrets / f"audit-{next(_AUDIT_FILES)}.jsonl"),
        "admin_port": free_port(),
    }
    return GatewayConfig(**{**settings, **overrides})


@contextlib.contextmanager
def proxy_deployment(upstream: Upstream, secrets: Path, **overrides: Any) -> Iterator[Deployment]:
    config = proxy_config(upstream.url, secrets, **overrides)
    gateway = Gateway(config)
    with ThreadServer(gateway) as server:
        yield Deployment(
            server.url,
            upstream,
            gateway.middleware.keys,
            "proxy",
            audit_file=Path(config.audit_file),
            admin_url=f"http://127.0.0.1:{config.admin_port}",
        )
    if config.audit_sink == "file" and Path(config.audit_file).exists():
        assert_chain_verifies(Path(config.audit_file), secrets)


@contextlib.contextmanager
def middleware_deployment(secrets: Path, tmp: Path, **limits: Any) -> Iterator[Deployment]:
    from phi_gateway.bodies import Limits

    app = create_upstream(str(tmp / "inner.sqlite"), record=True)
    keys = DataKeyCache(LocalKeyring.load(secrets / "keyring.json"))
    audit_file = tmp / f"audit-{next(_AUDIT_FILES)}.jsonl"
    emitter = AuditEmitter(ChainedFileSink(audit_file, load_chain_key(secrets / "chain.key")))
    app.add_middleware(
        PHIMiddleware,
        policies=load_policies([POLICIES]),
        keys=keys,
        pepper=Pepper.load(secrets / "pepper.json"),
        limits=Limits(**limits),
        identity=Identity(
            IdentitySettings(
                principal_header="X-User",
                roles_header="X-Roles",
                trusted_proxies=("127.0.0.1",),
                break_glass_role="emergency",
            )
        ),
        audit=emitter,
    )
    with ThreadServer(app) as server:
        yield Deployment(server.url, Upstream(server.url), keys, "middleware", app.state.store, audit_file)
    assert_chain_verifies(audit_file, secrets)


@pytest.fixture(params=["proxy", "middleware"])
def deployment(
    request: pytest.FixtureRequest, upstream_process: Upstream, secrets_dir: Path, tmp_path: Path
) -> Iterator[Deployment]:
    """Every test using this runs against the standalone proxy and against the middleware."""
    if request.param == "proxy":
        upstream_process.reset(data=True)
        with proxy_deployment(upstream_process, secrets_dir, max_body=64 * 1024, body_timeout=1.0) as d:
            yield d
    else:
        with middleware_deployment(secrets_dir, tmp_path, max_body=64 * 1024, body_timeout=1.0) as d:
            yield d


AUTH = {"X-User": "dr-test", "X-Roles": "clinician"}
RAW_AUTH = b"X-User: dr-test\r\nX-Roles: clinician\r\n"

PHI_CANARIES = ("123-45-6789", "123456789", "1980-02-29", "García", "penicillin", "E11.9", "201-3344")


def assert_no_phi(received: list[dict[str, Any]], canaries: tuple[str, ...] = PHI_CANARIES) -> None:
    text = repr(received)
    for canary in canaries:
        assert canary not in text, f"{canary!r} reached the upstream"


Checker = Callable[[list[dict[str, Any]]], None]
