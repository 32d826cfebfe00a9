"""``phi-gateway serve`` and ``phi-gateway demo``: running the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import aiohttp
import click
import orjson
import uvicorn

from phi_gateway.audit_chain import create_chain_key_file
from phi_gateway.config import GatewayConfig, load_config
from phi_gateway.exceptions import PHIGatewayError
from phi_gateway.gateway import Gateway
from phi_gateway.keyring import create_keyring
from phi_gateway.logs import log_config
from phi_gateway.pepper import create_pepper_file
from phi_gateway.server import HeaderDeadlineProtocol

# uvicorn settings every gateway run uses: httptools (via HeaderDeadlineProtocol) refuses
# Content-Length together with Transfer-Encoding where h11 accepts it (request smuggling);
# uvloop, named rather than left to "auto", which falls back to asyncio without a word;
# the access log would print query strings, which carry PHI before the gateway rewrites them.
SERVER_OPTIONS: dict[str, Any] = {
    "http": HeaderDeadlineProtocol,
    "loop": "uvloop",
    "access_log": False,
    "proxy_headers": False,
    "server_header": False,
    "date_header": False,  # the upstream's Date is relayed; two would contradict each other
    "lifespan": "on",  # a failed startup (pepper, keys) must stop the server, not be ignored
    "log_level": "info",
}


_DEMO_CLINICIAN = {"X-User": "dr-demo", "X-Roles": "clinician"}


def _fail(message: str) -> None:
    click.echo(f"phi-gateway: error: {message}", err=True)
    raise SystemExit(1)


@click.command()
@click.option(
    "--config",
    "config_path",
    envvar="PHI_GATEWAY_CONFIG",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML config file; PHI_GATEWAY_* variables and flags override it.",
)
@click.option("--upstream", help="Base URL of the API behind the gateway.")
@click.option("--policies", multiple=True, type=click.Path(exists=True), help="Policy files or directories.")
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to listen on (default 8080).")
@click.option(
    "--workers",
    type=int,
    help="Worker processes (default 1). More than one needs --admin-port 0: the admin port "
    "serves one process.",
)
@click.option("--admin-port", type=int, help="Port of /healthz, /readyz, /metrics (default 9090; 0: none).")
@click.option("--keyring", type=click.Path(dir_okay=False), help="Local development keyring.")
@click.option("--kms-key-id", "kms_key_ids", multiple=True, help="KMS key(s); the first is current.")
@click.option("--pepper", type=click.Path(dir_okay=False), help="Pepper file for blind indexes.")
@click.option("--pepper-secret-id", help="Secrets Manager secret holding the pepper.")
def serve(config_path: str | None, **flags: Any) -> None:
    """Run the gateway in front of an upstream API."""
    try:
        config = load_config(config_path, overrides=flags).check()
        Gateway(config, open_audit=False)  # fail here, with one line, on a bad policy or key source
    except PHIGatewayError as exc:
        _fail(str(exc))
    # Workers rebuild the gateway from the environment, so every source of config reaches them.
    os.environ.update(config.to_env())
    uvicorn.run(
        "phi_gateway.gateway:create_app",
        factory=True,
        host=config.host,
        port=config.port,
        workers=config.workers,
        ssl_certfile=config.tls_certfile,
        ssl_keyfile=config.tls_keyfile,
        **{
            **SERVER_OPTIONS,
            "log_config": log_config(config.log_format, config.log_level),
            "log_level": config.log_level,
        },
    )


class _Server(uvicorn.Server):
    """A server that leaves signal handling to its caller (the demo runs two)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _showcase(gateway: str, db: Path) -> None:
    patient = orjson.loads((Path(__file__).parent / "demo_patient.json").read_bytes())
    async with aiohttp.ClientSession(headers=_DEMO_CLINICIAN) as http:
        async with http.put(f"{gateway}/patients/p-1001", json=patient) as response:
            echoed = await response.json()
        click.echo(
            f"\n1. PUT /patients/p-1001 through the gateway -> {response.status}; a clinician sees plaintext:"
        )
        click.echo(f"   ssn={echoed['ssn']!r} dob={echoed['dob']!r}")
        row = (
            sqlite3.connect(db).execute("SELECT body, ssn_bidx FROM patients WHERE id = 'p-1001'").fetchone()
        )
        stored = orjson.loads(row[0])
        click.echo("\n2. The same row at rest in the legacy API's SQLite database:")
        for key in ("first_name", "ssn", "dob"):
            token = stored[key]
            click.echo(f"   {key}: {token[:20]}...{token[-40:]} ({len(token)} chars)")
        click.echo(f"   ssn_bidx: {row[1]}   (blind index: equality search without the SSN)")
        async with http.get(f"{gateway}/patients", params={"ssn": "123 45 6789"}) as response:
            found = await response.json()
        click.echo(
            f"\n3. GET /patients?ssn=123+45+6789 -> {len(found)} match; the upstream saw only ssn_bidx=..."
        )
        async with http.get(f"{gateway}/patients/p-1001", headers={"X-Roles": "nurse"}) as response:
            nurse = await response.json()
        shown = "shown" if "notes" in nurse else "removed"
        click.echo(f"\n4. The same record for a nurse: ssn={nurse['ssn']!r}, notes {shown} (reveal rules)")


async def _run_demo(port: int, upstream_port: int, admin_port: int, workdir: Path, wait: bool) -> None:
    from phi_gateway.demo_upstream import create_upstream  # only the demo needs it

    keyring, pepper, db = workdir / "keyring.json", workdir / "pepper.json", workdir / "patients.sqlite"
    if not keyring.exists():
        create_keyring(keyring)
    if not pepper.exists():
        create_pepper_file(pepper)
    chain_key, audit_file = workdir / "audit-chain.key", workdir / "audit.jsonl"
    if not chain_key.exists():
        create_chain_key_file(chain_key)
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    config = GatewayConfig(
        principal_header="X-User",  # the demo trusts these headers; production uses a JWT or a real proxy
        roles_header="X-Roles",
        trusted_proxies=["127.0.0.1", "::1"],  # the demo's curl plays the login proxy
        break_glass_role="emergency",
        upstream=upstream_url,
        policies=[str(Path(__file__).parent / "demo_policies")],  # a copy of policies/patients.yaml
        keyring=str(keyring),
        pepper=str(pepper),
        port=port,
        admin_port=admin_port,
        audit_sink="file",
        audit_file=str(audit_file),
        audit_chain_key_file=str(chain_key),
    )
    quiet = {**SERVER_OPTIONS, "log_level": "warning"}
    servers = [
        _Server(uvicorn.Config(create_upstream(str(db)), host="127.0.0.1", port=upstream_port, **quiet)),
        _Server(uvicorn.Config(Gateway(config), host="127.0.0.1", port=port, **quiet)),
    ]
    tasks = [asyncio.create_task(server.serve()) for server in servers]

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    while not all(s.started for s in servers):
        if any(t.done() for t in tasks):
            stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise SystemExit("phi-gateway: error: the demo servers did not start (ports in use?)")
        await asyncio.sleep(0.05)
    gateway = f"http://127.0.0.1:{port}"
    click.echo(
        f"legacy patients API (SQLite {db}) on {upstream_url}; phi-gateway in front of it on {gateway}"
    )
    await _showcase(gateway, db)
    click.echo(f"""
Try it yourself (the demo trusts X-User / X-Roles headers as if set by a login proxy):
  curl -s -X PUT {gateway}/patients/p-2 -H 'content-type: application/json' -H 'X-User: dr-a' \\
       -H 'X-Roles: clinician' -d '{{"first_name": "Ada", "last_name": "Lovelace", "ssn": "078-05-1120"}}'
  curl -s {gateway}/patients/p-2 -H 'X-User: dr-a' -H 'X-Roles: clinician'   # plaintext
  curl -s {gateway}/patients/p-2 -H 'X-User: bob' -H 'X-Roles: billing'      # SSN yes, notes no
  curl -s {gateway}/patients/p-2                                             # 401: who is asking?
  curl -s {upstream_url}/patients/p-2                    # what the legacy API holds: tokens
  curl -s '{gateway}/patients?ssn=078051120' -H 'X-User: dr-a' -H 'X-Roles: clinician'  # blind index
Every request above is in the hash-chained audit trail; check it with
  phi-gateway audit verify {audit_file} --chain-key-file {chain_key}
Health, readiness and Prometheus metrics: curl -s http://127.0.0.1:{admin_port}/metrics | grep ^phi_gateway
Keys, data and audit trail in {workdir}. Ctrl-C stops everything.""")
    if not wait:
        stop()
    await asyncio.gather(*tasks)


@click.command()
@click.option("--port", default=8080, show_default=True, help="Gateway port.")
@click.option("--upstream-port", default=8081, show_default=True, help="Demo API port.")
@click.option("--admin-port", default=9090, show_default=True, help="Gateway's /healthz, /readyz, /metrics.")
@click.option(
    "--dir", "workdir", type=click.Path(file_okay=False), help="Keep keys and data here (default: temp)."
)
@click.option("--wait/--no-wait", default=True, help="Keep serving after the walk-through (default) or stop.")
def demo(port: int, upstream_port: int, admin_port: int, workdir: str | None, wait: bool) -> None:
    """Start a demo patients API with the gateway in front of it, and walk through it."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="phi-gateway-demo-"))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        asyncio.run(_run_demo(port, upstream_port, admin_port, Path(workdir), wait))
