"""Real servers on loopback ports: the demo upstream as its own process, and the gateway
(standalone proxy, or middleware inside a Starlette app) under uvicorn in a thread.

Every server run in a thread here is watched (``ThreadServer``): its error responses, the
gateway's and uvicorn's log records with their exceptions, its metrics and its audit file are
swept for canaries when it stops (``canary.py``), and its audit file is checked by
``phi-gateway audit verify`` (``audit_cli.py``). Every value the gateway encrypts or indexes
in these tests is registered as a canary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phi_gateway import envelope
from phi_gateway.audit import AuditEmitter
from phi_gateway.audit_chain import ChainedFileSink, create_chain_key_file, load_chain_key
from phi_gateway.blindindex import BlindIndex
from phi_gateway.cache import DataKeyCache
from phi_gateway.cli_serve import SERVER_OPTIONS
from phi_gateway.config import GatewayConfig
from phi_gateway.demo_upstream import create_upstream
from phi_gateway.gateway import Gateway
from phi_gateway.identity import Identity, IdentitySettings
from phi_gateway.keyring import LocalKeyring
from phi_gateway.logs import Formatter
from phi_gateway.metrics import Metrics
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.pepper import Pepper, create_pepper_file
from phi_gateway.policy import load_policies
from tests.e2e import audit_cli, canary

ROOT = Path(__file__).parents[2]
POLICIES = ROOT / "policies"
SAMPLES = ROOT / "tests" / "samples"


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


class LogTap(logging.Handler):
    """While open, every record of the gateway's loggers (at every level) and of uvicorn's, as
    ``phi-gateway serve`` would write it, and the full text of any exception it carries:
    the log format leaves exception messages out, and this proves there was nothing to leave."""

    LOGGERS = ("phi_gateway", "uvicorn.error")

    def __init__(self, evidence: canary.Evidence) -> None:
        super().__init__()
        self.evidence = evidence
        self.line = Formatter("json")
        self.levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        where = f"log record ({record.name}, {record.levelname})"
        try:
            self.evidence.add(where, self.line.format(record))
            if record.exc_info and record.exc_info[1] is not None:
                trace = "".join(traceback.format_exception(record.exc_info[1]))
                self.evidence.add(f"exception in {where}", trace)
        except Exception:
            self.handleError(record)

    def __enter__(self) -> LogTap:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.levels[name] = logger.level
            logger.addHandler(self)
        logging.getLogger("phi_gateway").setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, level in self.levels.items():
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(level)


class ErrorResponses:
    """The served app, keeping the head and body of every response with a status of 400 or more."""

    def __init__(self, app: ASGIApp, evidence: canary.Evidence) -> None:
        self.app = app
        self.evidence = evidence

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kept: list[bytes] = []
        status = 0

        async def keep(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                kept.extend(b"%s: %s\n" % (name, value) for name, value in message.get("headers", []))
            elif status >= 400:
                kept.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, keep)
        finally:
            if status >= 400:
                self.evidence.add(
                    f"error response {status} to {scope['method']} {scope['path']}", b"".join(kept)
                )


@dataclass(frozen=True)
class AuditFile:
    path: Path
    chain_key_file: Path


class ThreadServer:
    """uvicorn serving an ASGI app on a free loopback port, in a background thread.

    When it stops, what it left behind is swept for canaries (a leak fails the test): its
    error responses, its log records, ``metrics`` (scraped just before it stops) and ``audit``
    (read once drained, then checked by ``phi-gateway audit verify``). A ``Gateway`` brings
    its own: its admin port's /metrics and its chained audit file."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Callable[[], str] | None = None,
        audit: AuditFile | None = None,
        **options: Any,
    ) -> None:
        self.port = free_port()
        self.evidence = canary.Evidence()
        if isinstance(app, Gateway):
            metrics = metrics or _metrics_of(app)
            if app.config.audit_sink == "file" and app.config.audit_file:
                path = Path(app.config.audit_file.replace("{pid}", str(os.getpid())))
                audit = audit or AuditFile(path, Path(str(app.config.audit_chain_key_file)))
        self.metrics, self.audit = metrics, audit
        config = uvicorn.Config(
            ErrorResponses(app, self.evidence),
            host="127.0.0.1",
            port=self.port,
            # uvicorn's default logging config, applied by each new server, would drop the log
            # tap of one already running
            **{**SERVER_OPTIONS, "log_level": "warning", "log_config": None},
            **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.logs = LogTap(self.evidence)

    def __enter__(self) -> ThreadServer:
        self.logs.__enter__()
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.logs.__exit__()
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, failed: type[BaseException] | None, *exc: object) -> None:
        try:
            if failed is None and self.metrics is not None:
                self.evidence.add("metrics", self.metrics())
        finally:
            self.server.should_exit = True
            self.thread.join(10)
            self.logs.__exit__()
        if failed is not None:
            return  # the test's own failure says more than a sweep would
        audit = self.audit if self.audit is not None and self.audit.path.exists() else None
        if audit is not None:
            self.evidence.add(f"audit file {audit.path.name}", audit.path.read_bytes())
        self.evidence.assert_clean()
        if audit is not None:
            audit_cli.assert_verifies(audit.path, audit.chain_key_file)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _metrics_of(gateway: Gateway) -> Callable[[], str]:
    """A scrape of the admin port's /metrics, or the same text in-process when it has none."""
    if gateway.config.admin_port:
        url = f"http://{gateway.config.admin_host}:{gateway.config.admin_port}/metrics"
        return lambda: httpx.get(url, timeout=10).raise_for_status().text
    return lambda: gateway.metrics.render().decode()


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


@pytest.fixture(scope="module", autouse=True)
def _phi_is_canaries() -> Iterator[None]:
    """Every value the gateway encrypts or indexes here is a canary from then on, and so is the
    shared sample's PHI: the tests that need real formats (an SSN's digits, a phone number to
    normalize) are swept for their own values."""
    canary.register([SAMPLE_PATIENT[name] for name in SAMPLE_PHI_FIELDS])
    canary.register(PHI_CANARIES)
    serialize, normalized = envelope.serialize_value, BlindIndex.normalized

    def serialize_value(value: Any) -> bytes:
        canary.register(value)
        return serialize(value)

    def normalized_value(self: BlindIndex, value: Any) -> str:
        text = normalized(self, value)
        canary.register([value, text])
        return text

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(envelope, "serialize_value", serialize_value)
        patch.setattr(BlindIndex, "normalized", normalized_value)
        yield


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
    evidence: canary.Evidence | None = None  # what the sweep looks through when it stops

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
        "audit_file": str(secrets / f"audit-{uuid.uuid4().hex}.jsonl"),
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
            evidence=server.evidence,
        )


@contextlib.contextmanager
def middleware_deployment(secrets: Path, tmp: Path, **limits: Any) -> Iterator[Deployment]:
    from phi_gateway.bodies import Limits

    app = create_upstream(str(tmp / "inner.sqlite"), record=True)
    keys = DataKeyCache(LocalKeyring.load(secrets / "keyring.json"))
    audit = AuditFile(tmp / f"audit-{uuid.uuid4().hex}.jsonl", secrets / "chain.key")
    emitter = AuditEmitter(ChainedFileSink(audit.path, load_chain_key(audit.chain_key_file)))
    metrics = Metrics()
    metrics.watch(keys, emitter)
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
        metrics=metrics,
    )
    with ThreadServer(app, metrics=lambda: metrics.render().decode(), audit=audit) as server:
        yield Deployment(
            server.url,
            Upstream(server.url),
            keys,
            "middleware",
            app.state.store,
            audit.path,
            evidence=server.evidence,
        )


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


@pytest.fixture(params=["proxy", "middleware"])
def deploy(
    request: pytest.FixtureRequest, upstream_process: Upstream, secrets_dir: Path, tmp_path: Path
) -> Callable[[], AbstractContextManager[Deployment]]:
    """A deployment factory, for tests that start (and stop) it themselves: the proxy, then
    the middleware."""

    def make() -> AbstractContextManager[Deployment]:
        if request.param == "proxy":
            upstream_process.reset(data=True)
            return proxy_deployment(upstream_process, secrets_dir)
        return middleware_deployment(secrets_dir, tmp_path)

    return make


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a chained audit file, in order."""
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


AUTH = {"X-User": "dr-test", "X-Roles": "clinician"}
RAW_AUTH = b"X-User: dr-test\r\nX-Roles: clinician\r\n"

PHI_CANARIES = ("123-45-6789", "123456789", "1980-02-29", "García", "penicillin", "E11.9", "201-3344")
SAMPLE_PATIENT: dict[str, Any] = json.loads((SAMPLES / "patient.json").read_text())
SAMPLE_PHI_FIELDS = ("first_name", "last_name", "ssn", "dob", "phone", "notes")


def assert_no_phi(received: list[dict[str, Any]], canaries: tuple[str, ...] = PHI_CANARIES) -> None:
    text = repr(received)
    for value in canaries:
        assert value not in text, f"{value!r} reached the upstream"


def canary_patient(pid: str) -> dict[str, Any]:
    """The shared sample patient with a fresh canary in every PHI field but the phone, which
    the phone index must be able to normalize: a random number of its own, registered."""
    phone = f"+1 555 {uuid.uuid4().int % 10**7:07d}"
    canary.register(phone)
    return {
        **SAMPLE_PATIENT,
        "id": pid,
        **{name: canary.new() for name in ("first_name", "last_name", "ssn", "dob", "notes")},
        "phone": phone,
        "diagnoses": [{**d, "code": canary.new()} for d in SAMPLE_PATIENT["diagnoses"]],
    }


Checker = Callable[[list[dict[str, Any]]], None]
