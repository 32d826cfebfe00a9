"""Part 4, the HTTP hop: one upstream (the demo patients API) served (a) directly, (b) behind
nginx, (c) behind our proxy with no policy on its routes, (d) behind the gateway with the
patients policy, and (e) with ``PHIMiddleware`` inside the upstream's own app. wrk drives
GET and POST of a ~2 KB patient at fixed concurrency; the cases are interleaved and
repeated, and medians reported, with the CPU each process spent per request (from /proc).
The gateway's RSS is left in ``context`` for the memory part; py-spy, when installed, says
where the gateway's time goes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.types import ASGIApp

from bench.common import Section

ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = Path(__file__).with_name("wrk.lua")
THREADS, CONNECTIONS = 2, 32
PROFILE_RATE = 250  # py-spy samples per second
METHODS = ("GET", "POST")
CASES = {
    "direct": "(a) upstream, direct",
    "nginx": "(b) nginx reverse proxy",
    "proxy": "(c) our proxy, no policy",
    "gateway": "(d) gateway, patients policy",
    "middleware": "(e) middleware in the upstream",
}
IDENTITY = {"X-User": "bench", "X-Roles": "clinician"}
SSN, DOB = "123-45-6789", "1980-02-29"
# The proxy case's only policy names a route the bench never calls: every request passes through.
UNUSED_POLICY = """\
version: 1
name: unused
routes:
  - match: {methods: [GET], path: "/unused/{id}"}
    response:
      context: {ResourceId: {param: id}}
      decrypt: ["$.secret"]
"""
# A fair keep-alive reverse proxy: one worker, pooled upstream connections, no access log.
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream app {{
        server 127.0.0.1:{upstream};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def upstream_app() -> Starlette:
    """The demo patients API on the SQLite file ``BENCH_DB`` (for ``uvicorn --factory``)."""
    from phi_gateway.demo_upstream import create_upstream

    return create_upstream(os.environ["BENCH_DB"])


def middleware_app() -> ASGIApp:
    """The same API wrapped in ``PHIMiddleware``, configured from the gateway's own
    ``PHI_GATEWAY_*`` variables: keys, pepper, policies, identity and the audit file."""
    from phi_gateway.audit import AuditEmitter
    from phi_gateway.audit_chain import ChainedFileSink, load_chain_key
    from phi_gateway.cache import DataKeyCache
    from phi_gateway.config import load_config
    from phi_gateway.identity import Identity, IdentitySettings
    from phi_gateway.keyring import LocalKeyring
    from phi_gateway.middleware import PHIMiddleware
    from phi_gateway.pepper import Pepper
    from phi_gateway.policy import load_policies

    config = load_config()
    if not (config.keyring and config.pepper and config.audit_chain_key_file):
        raise RuntimeError("middleware_app needs PHI_GATEWAY_KEYRING, _PEPPER and _AUDIT_CHAIN_KEY_FILE")
    app = upstream_app()
    app.add_middleware(
        PHIMiddleware,
        policies=load_policies(config.policies),
        keys=DataKeyCache(LocalKeyring.load(config.keyring)),
        pepper=Pepper.load(config.pepper),
        identity=Identity(
            IdentitySettings(
                principal_header=config.principal_header,
                roles_header=config.roles_header,
                trusted_proxies=tuple(config.trusted_proxies),
            )
        ),
        audit=AuditEmitter(ChainedFileSink(config.audit_file, load_chain_key(config.audit_chain_key_file))),
    )
    return app


def patient(patient_id: str) -> dict[str, Any]:
    """A ~2 KB patient: the policy's PHI fields and the plain rest of a realistic record."""
    diagnoses = [
        ("E11.9", "Type 2 diabetes mellitus without complications", "2015-06-01", True),
        ("I10", "Essential (primary) hypertension", "2017-03-12", True),
        ("E78.5", "Hyperlipidemia, unspecified", "2018-11-20", True),
        ("J45.909", "Unspecified asthma, uncomplicated", "1996-04-02", False),
    ]
    return {
        "id": patient_id,
        "first_name": "Maria",
        "last_name": "García López",
        "ssn": SSN,
        "dob": DOB,
        "phone": "(555) 201-3344",
        "email": "maria.garcia@example.org",
        "sex": "female",
        "address": {
            "line": ["1200 Harbor View Drive", "Apartment 4B"],
            "city": "Springfield",
            "state": "IL",
            "postal_code": "62704",
            "country": "US",
        },
        "notes": (
            "Allergic to penicillin (hives, 2009). Follow-up in 6 weeks to review HbA1c and "
            "home glucose log; patient reports good adherence to metformin, occasional missed "
            "evening doses. Discussed diet, walking 30 minutes a day, and annual eye exam. Blood "
            "pressure well controlled on lisinopril. Asthma quiet, no rescue inhaler use in the "
            "last year. Referred to nutritionist; flu shot given today, left deltoid."
        ),
        "diagnoses": [
            {"code": code, "system": "ICD-10", "display": text, "onset": onset, "active": active}
            for code, text, onset, active in diagnoses
        ],
        "medications": [
            {"name": "Metformin", "dose": "500 mg", "route": "oral", "frequency": "twice daily"},
            {"name": "Lisinopril", "dose": "10 mg", "route": "oral", "frequency": "once daily"},
            {"name": "Atorvastatin", "dose": "20 mg", "route": "oral", "frequency": "at bedtime"},
        ],
        "allergies": [{"substance": "penicillin", "reaction": "hives", "severity": "moderate"}],
        "insurance": {"payer": "Acme Health Plan", "member_id": "AHP-99812345", "group": "GRP-2210"},
        "emergency_contact": {"name": "Luis García", "relationship": "spouse", "phone": "(555) 201-3345"},
        "primary_care": {"name": "Dr. Ana Okafor", "npi": "1234567893", "clinic": "Springfield Family Care"},
        "weight_kg": 71.5,
        "height_cm": 165,
        "smoker": False,
        "updated_at": "2024-05-14T09:30:00Z",
    }


class Processes:
    """Children in sessions of their own, each stopped with its whole process group."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.running[name] = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        return self.running[name].pid

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_http(self, name: str, url: str, timeout: float = 30.0) -> None:
        """Until ``url`` answers anything at all."""
        deadline = time.monotonic() + timeout
        while True:
            if self.running[name].poll() is not None:
                raise RuntimeError(f"{name} exited at startup:\n{self.log(name)[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                httpx.get(url, timeout=1)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer {url} within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self, name: str) -> None:
        process = self.running.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group outlived its leader
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


@dataclass
class Sample:
    rps: float
    p50: float  # seconds
    p99: float
    requests: int
    front_cpu: float  # CPU seconds per request
    upstream_cpu: float


@dataclass
class Target:
    """One way of reaching the upstream, and the processes whose CPU it spends."""

    label: str
    url: str
    get_id: str  # the record its GETs read
    front: list[int]  # the hop in front of the upstream (none for direct and middleware)
    upstream: int
    body: Path = Path()  # what its POSTs send
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {m: [] for m in METHODS})

    def path(self, method: str) -> str:
        return self.url + (f"/patients/{self.get_id}" if method == "GET" else "/patients")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cpu(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(stat[11]) + int(stat[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _rss(pids: list[int]) -> dict[str, int]:
    """Resident set now and at its peak (VmHWM), in bytes, summed over ``pids``."""
    found = {"rss": 0, "peak": 0}
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found["rss" if name == "VmRSS" else "peak"] += int(value.split()[0]) * 1024
    return found


def _wrk_argv(wrk: str, url: str, seconds: float) -> list[str]:
    load = [f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "10s"]
    return [wrk, *load, "-s", str(WRK_SCRIPT), url]


def _wrk_env(method: str, target: Target) -> dict[str, str]:
    return {**os.environ, "BENCH_METHOD": method, "BENCH_BODY": str(target.body) if method == "POST" else ""}


def _wrk_result(output: str, what: str) -> dict[str, int]:
    """The summary line of bench/wrk.lua; any error or non-2xx/3xx answer fails the bench."""
    line = next((line for line in output.splitlines() if line.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk {what}: no summary line\n{output}")
    result: dict[str, int] = json.loads(line.removeprefix("BENCH "))
    errors = {k: result[k] for k in ("connect", "read", "write", "status", "timeout") if result[k]}
    if errors or not result["requests"]:
        raise RuntimeError(
            f"wrk {what}: {result['requests']} requests, errors {errors} (status: non-2xx or 3xx)\n{output}"
        )
    return result


def measure(wrk: str, target: Target, method: str, seconds: float) -> Sample:
    before = _cpu(target.front), _cpu([target.upstream])
    done = subprocess.run(
        _wrk_argv(wrk, target.path(method), seconds), env=_wrk_env(method, target), capture_output=True,
        text=True, timeout=seconds + 60, check=False,
    )  # fmt: skip
    front_cpu, upstream_cpu = _cpu(target.front) - before[0], _cpu([target.upstream]) - before[1]
    result = _wrk_result(done.stdout + done.stderr, f"{method} {target.label}")
    n = result["requests"]
    return Sample(
        rps=n / (result["duration_us"] / 1e6),
        p50=result["p50_us"] / 1e6,
        p99=result["p99_us"] / 1e6,
        requests=n,
        front_cpu=front_cpu / n,
        upstream_cpu=upstream_cpu / n,
    )


def _environment(tmp: Path) -> dict[str, str]:
    """Keys, pepper and chain key in ``tmp``, and the settings every gateway process shares."""
    from phi_gateway.audit_chain import create_chain_key_file
    from phi_gateway.keyring import create_keyring
    from phi_gateway.pepper import create_pepper_file

    create_keyring(tmp / "keyring.json")
    create_pepper_file(tmp / "pepper.json")
    create_chain_key_file(tmp / "chain.key")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_GATEWAY_")}
    env.update(
        PHI_GATEWAY_KEYRING=str(tmp / "keyring.json"),
        PHI_GATEWAY_PEPPER=str(tmp / "pepper.json"),
        PHI_GATEWAY_POLICIES=str(ROOT / "policies"),
        PHI_GATEWAY_PRINCIPAL_HEADER="X-User",
        PHI_GATEWAY_ROLES_HEADER="X-Roles",
        PHI_GATEWAY_TRUSTED_PROXIES="127.0.0.1",
        PHI_GATEWAY_AUDIT_SINK="file",
        PHI_GATEWAY_AUDIT_CHAIN_KEY_FILE=str(tmp / "chain.key"),
        PHI_GATEWAY_LOG_LEVEL="warning",
    )
    return env


def _start(procs: Processes, tmp: Path, db_dir: Path, nginx_bin: str) -> tuple[dict[str, Target], str]:
    """Both upstreams, nginx, the proxy and the gateway, on free loopback ports; the targets,
    and the gateway's admin URL."""
    env = _environment(tmp)
    port = {name: _free_port() for name in (*CASES, "proxy-admin", "gateway-admin")}
    url = {name: f"http://127.0.0.1:{number}" for name, number in port.items()}
    uvicorn = [sys.executable, "-m", "uvicorn", "--factory", "--host", "127.0.0.1", "--http", "httptools",
               "--no-access-log", "--log-level", "warning", "--lifespan", "on"]  # fmt: skip
    upstream = procs.start(
        "upstream",
        [*uvicorn, "--port", str(port["direct"]), "bench.http:upstream_app"],
        {**env, "BENCH_DB": str(db_dir / "upstream.sqlite")},
    )
    env_e = {
        "BENCH_DB": str(db_dir / "middleware.sqlite"),
        "PHI_GATEWAY_AUDIT_FILE": str(tmp / "audit-e.jsonl"),
    }
    middleware = procs.start(
        "middleware",
        [*uvicorn, "--port", str(port["middleware"]), "bench.http:middleware_app"],
        {**env, **env_e},
    )
    home = tmp / "nginx"
    home.mkdir()
    (home / "nginx.conf").write_text(NGINX_CONF.format(dir=home, upstream=port["direct"], port=port["nginx"]))
    nginx = procs.start(
        "nginx", [nginx_bin, "-p", str(home), "-e", str(home / "error.log"), "-c", str(home / "nginx.conf")]
    )
    (tmp / "unused").mkdir()
    (tmp / "unused" / "unused.yaml").write_text(UNUSED_POLICY)
    gateways = {}
    for name, policies in (("proxy", tmp / "unused"), ("gateway", ROOT / "policies")):
        serve = ["serve", "--upstream", url["direct"], "--policies", str(policies), "--port", str(port[name])]
        gateways[name] = procs.start(
            name,
            [sys.executable, "-m", "phi_gateway", *serve, "--admin-port", str(port[f"{name}-admin"])],
            {**env, "PHI_GATEWAY_AUDIT_FILE": str(tmp / f"audit-{name}.jsonl")},
        )
    for name, case in (("upstream", "direct"), ("middleware", "middleware"), ("nginx", "nginx"),
                       ("proxy", "proxy"), ("gateway", "gateway")):  # fmt: skip
        procs.wait_http(name, url[case])
    targets = {
        "direct": Target(CASES["direct"], url["direct"], "bench-plain", [], upstream),
        "nginx": Target(CASES["nginx"], url["nginx"], "bench-plain", [nginx, *_children(nginx)], upstream),
        "proxy": Target(CASES["proxy"], url["proxy"], "bench-plain", [gateways["proxy"]], upstream),
        "gateway": Target(CASES["gateway"], url["gateway"], "bench-gateway", [gateways["gateway"]], upstream),
        "middleware": Target(CASES["middleware"], url["middleware"], "bench-middleware", [], middleware),
    }  # fmt: skip
    return targets, url["gateway-admin"]


def _seed(targets: dict[str, Target], tmp: Path, db_dir: Path) -> None:
    """Write the record each case reads (through the gateway and the middleware: encrypted),
    and check that every case serves it, that (d) and (e) apply the policy, and store ciphertext."""
    with httpx.Client(headers=IDENTITY, timeout=10) as client:
        for name in ("direct", "gateway", "middleware"):
            target = targets[name]
            client.post(f"{target.url}/patients", json=patient(target.get_id)).raise_for_status()
        for name, target in targets.items():
            target.body = tmp / f"body-{name}.json"
            document = patient(f"bench-write-{name}")
            target.body.write_bytes(json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode())
            got = client.get(target.path("GET"))
            if got.status_code != 200 or got.json()["ssn"] != SSN:
                raise RuntimeError(f"{target.label}: GET answered {got.status_code} {got.text[:200]}")
            anonymous = httpx.get(target.path("GET")).status_code
            if anonymous != (401 if name in ("gateway", "middleware") else 200):
                raise RuntimeError(f"{target.label}: a GET without identity answered {anonymous}")
        at_rest = [
            client.get(f"{targets['direct'].url}/patients/bench-gateway").text,
            sqlite3.connect(db_dir / "middleware.sqlite")
            .execute("SELECT body FROM patients WHERE id = 'bench-middleware'")
            .fetchone()[0],
        ]
    if any(SSN in text or DOB in text for text in at_rest):
        raise RuntimeError("a record written through the gateway or the middleware is stored in plaintext")


# Where a profile sample's time goes: the innermost frame whose file names an area.
AREAS = (
    ("crypto and tokens", ("cryptography/", "aead.py", "envelope.py", "blindindex.py", "pepper.py",
                           "cache.py", "keyring.py", "context.py", "b64url.py")),
    ("JSON parse and serialize", ("jsonvalue.py", "orjson", "json/")),
    ("policy engine (JSONPath, transform, reveal)", ("transform.py", "jsonpath.py", "reveal.py", "rules.py",
                                                     "policy.py")),
    ("audit events", ("audit.py", "audit_chain.py")),
    ("identity", ("identity.py",)),
    ("metrics", ("prometheus_client/", "metrics.py")),
    ("aiohttp upstream hop", ("aiohttp/", "yarl/", "multidict/", "proxy.py", "aiohappyeyeballs/")),
    ("uvicorn/httptools server", ("uvicorn/", "httptools/", "server.py")),
    ("middleware glue (exchange, bodies, starlette)", ("middleware.py", "exchange.py", "bodies.py",
                                                       "httperrors.py", "starlette/")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop/")),
)  # fmt: skip
# Stages of a request through the gateway, by the functions that run them (inclusive time).
STAGES = (
    ("strict JSON parse", ("loads_strict",)),
    ("encrypt + index the request", ("encrypt_request",)),
    ("decrypt the response", ("decrypt_response",)),
    ("aiohttp request to the upstream", ("ClientSession._request",)),
    ("audit event", ("Exchange.record", "AuditEmitter.emit")),
    ("metrics", ("Metrics.",)),
    ("identity", ("Identity.resolve",)),
)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


def summarize_profile(raw: str) -> tuple[int, int, Counter[str], Counter[str], Counter[str]]:
    """From ``py-spy record --threads --format raw``: busy samples of the main thread (the
    event loop, which bounds throughput) and of the other threads (the executor running the
    audit file's writes), and the main thread's counts by innermost function, by area and by
    stage."""
    functions: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    main = other = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if "MainThread" not in stack.split(";", 1)[0]:
            other += int(count)
            continue
        frames = [m.groupdict() for f in stack.split(";") if (m := _FRAME.match(f))]
        if not frames:
            continue
        main += int(count)
        functions[f"`{frames[-1]['function']}` ({frames[-1]['file']})"] += int(count)
        area = next(
            (a for f in reversed(frames) for a, files in AREAS if any(p in f["file"] for p in files)), "other"
        )
        areas[area] += int(count)
        for stage, names in STAGES:
            if any(name in f["function"] for f in frames for name in names):
                stages[stage] += int(count)
    return main, other, functions, areas, stages


def profile(procs: Processes, wrk: str, target: Target, method: str, seconds: float, tmp: Path) -> str:
    """py-spy on the gateway process while wrk loads it: where its time goes, as markdown, with
    stages in µs of the CPU per request the timed runs measured."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(spy, os.X_OK):
        return f"- {method}: no profile (py-spy is not installed: `pip install py-spy`)."
    name, out = f"wrk-profile-{method}", tmp / f"profile-{method}.txt"
    procs.start(name, _wrk_argv(wrk, target.path(method), seconds + 1), _wrk_env(method, target))
    time.sleep(0.5)
    spied = subprocess.run(
        [spy, "record", "--pid", str(target.front[0]), "--duration", str(int(seconds)),
         "--rate", str(PROFILE_RATE), "--format", "raw", "--threads", "--output", str(out)],
        capture_output=True, text=True, timeout=seconds + 60, check=False,
    )  # fmt: skip
    procs.running[name].wait(seconds + 60)
    procs.stop(name)
    _wrk_result(procs.log(name), f"{method} {target.label} (profiled)")
    if spied.returncode != 0 or not out.exists():
        return f"- {method}: py-spy failed ({spied.returncode}): {spied.stderr.strip()[-300:]}"
    main, other, functions, areas, stages = summarize_profile(out.read_text())
    if not main:
        return f"- {method}: py-spy recorded no samples."
    cpu = _medians(target.samples[method])["front_cpu"] * 1e6
    top = "; ".join(f"{f} {n / main:.0%}" for f, n in functions.most_common(3))
    by_area = ", ".join(f"{a} {n / main:.0%}" for a, n in areas.most_common())
    by_stage = ", ".join(f"{a} {n / main:.0%} (≈{n / main * cpu:,.0f} µs)" for a, n in stages.most_common())
    return (
        f"- **{method}** (event loop busy in {main / (seconds * PROFILE_RATE):.0%} of the samples). Top self"
        f" time: {top}. By area: {by_area}. Stages, inclusive, in µs of the {cpu:,.0f} µs of CPU per"
        f" request: {by_stage}. Worker threads (the audit file's HMAC chain, and its fsync, which py-spy"
        f" counts as busy): {other / main:.0%} as many busy samples as the event loop."
    )


def _metrics_count(admin: str) -> Counter[str]:
    """2xx answers on policy routes by method, from the gateway's /metrics."""
    counts: Counter[str] = Counter()
    for line in httpx.get(f"{admin}/metrics", timeout=5).text.splitlines():
        if line.startswith("phi_gateway_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels.get("status", "").startswith("2"):
                counts[labels["method"]] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def run(context: dict[str, Any]) -> Section:
    from phi_gateway.audit_chain import load_chain_key, verify_chain
    from phi_gateway.envelope import PREFIX

    quick = bool(context.get("quick"))
    seconds, rounds, warmup, profile_seconds = (2, 1, 1, 2) if quick else (6, 3, 2, 5)
    wrk = shutil.which("wrk")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not wrk or not nginx:
        raise RuntimeError("the HTTP bench needs wrk and nginx (./scripts/bench installs them)")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-http-")))
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # noqa: S108
        db_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-http-db-", dir=shm)))
        procs = Processes(tmp)
        stack.callback(procs.stop_all)  # on every exit, Ctrl-C included
        targets, admin = _start(procs, tmp, db_dir, nginx)
        _seed(targets, tmp, db_dir)
        gateway = targets["gateway"]
        watched = {
            "gateway": gateway.front,
            "nginx": targets["nginx"].front,
            "proxy": targets["proxy"].front,
            "upstream": [gateway.upstream],
            "middleware_upstream": [targets["middleware"].upstream],
        }
        idle = {name: _rss(pids) for name, pids in watched.items()}
        through_gateway: Counter[str] = Counter()
        names = list(CASES)
        for r in range(rounds + 1):  # round 0: warm-up, not recorded
            if r:
                print(f"bench: http round {r}/{rounds}", file=sys.stderr, flush=True)
            lead = r % len(names)
            for name in names[lead:] + names[:lead]:  # each round led by another case
                for method in METHODS:
                    sample = measure(wrk, targets[name], method, seconds if r else warmup)
                    if r:
                        targets[name].samples[method].append(sample)
                    if name == "gateway":
                        through_gateway[method] += sample.requests
        loaded = {name: _rss(pids) for name, pids in watched.items()}
        counted = _metrics_count(admin)
        profiles = [profile(procs, wrk, gateway, method, profile_seconds, tmp) for method in METHODS]
        procs.stop("gateway")  # a graceful stop drains the audit queue into the file
        audit = verify_chain(tmp / "audit-gateway.jsonl", load_chain_key(tmp / "chain.key"))
        stored = httpx.get(f"{targets['direct'].url}/patients/bench-gateway").content
        sizes = gateway.body.stat().st_size, len(stored), stored.count(b'"' + PREFIX.encode())
    rss = {name: {"idle": idle[name]["rss"], "peak": loaded[name]["peak"]} for name in watched}
    context["gateway_rss"] = rss.pop("gateway")
    context["rss_others"] = rss
    context["gateway_rss_note"] = (
        "The gateway is case (d) of the HTTP part: `phi-gateway serve`, one worker, the patients policy,"
        " file audit sink. Idle: VmRSS after startup and the setup's few requests; peak: VmHWM after"
        f" {sum(through_gateway.values()):,} GETs and POSTs of a ~2 KB patient at {CONNECTIONS} connections."
    )
    section = Section("4. The HTTP hop: direct, nginx, proxy, gateway, middleware (wrk)")
    _report(section, targets, seconds=seconds, rounds=rounds, sizes=sizes)
    if quick:
        section.add("(--quick: one short round; the numbers check the bench, they are not results.)", "")
    mib = 1024 * 1024
    memory = [f"{name.replace('_', ' ')} {idle[name]['rss'] / mib:.0f} → {loaded[name]['peak'] / mib:.0f} MiB"
              for name in watched]  # fmt: skip
    verified = "ok" if audit.ok and not audit.torn_tail else audit.message
    section.add(
        f"**Memory** (VmRSS when idle → VmHWM after the runs): {', '.join(memory)} (nginx: master and"
        " worker; upstream: the one behind (a)–(d); middleware upstream: (e)).",
        "",
        f"**Cross-checks.** wrk completed {through_gateway['GET']:,} GETs and {through_gateway['POST']:,}"
        f" POSTs through the gateway (warm-up included); its /metrics counted {counted['GET']:,} and"
        f" {counted['POST']:,} 2xx answers (a few more: the setup's requests, and those in flight when"
        f" each wrk run stopped). Its audit file holds {audit.records:,} events after a graceful stop,"
        " one per request on a policy route (the profiled runs' included); `phi-gateway audit verify`:"
        f" {verified}.",
        "",
        f"**Where the gateway's time goes** (case d: py-spy sampling the gateway process {PROFILE_RATE}"
        f" times a second during a {profile_seconds} s wrk run per method). Shares are of the event loop's"
        " busy samples; py-spy counts a thread busy unless it waits for I/O, so time spent waiting for a"
        " core counts too. Time in C extensions and system calls is charged to the Python function that"
        " made the call: uvicorn's `RequestResponseCycle.send` and aiohttp's `StreamWriter._write` are"
        " mostly socket writes on loopback (the kernel delivers to the reader in the writer's time, and"
        " the woken reader may take the core); `Runner.run` is uvloop's own C code.",
        *profiles,
        "",
    )
    return section


def _report(
    section: Section, targets: dict[str, Target], *, seconds: float, rounds: int, sizes: tuple[int, int, int]
) -> None:
    section.add(
        f"wrk ({THREADS} threads, {CONNECTIONS} connections, keep-alive) for {seconds} s per case and"
        f" method, {rounds} round{'s' * (rounds > 1)} with the cases interleaved (each round led by"
        " another case), after a warm-up run of each; medians of the rounds. GET reads one patient"
        f" of {sizes[0]:,} bytes of JSON; POST writes one (`POST /patients`, its id in the body: the demo"
        " API replaces the record, so every write succeeds). Through (d) and (e) the record is stored"
        f" encrypted ({sizes[1]:,} bytes at rest, {sizes[2]} values are tokens) and decrypted on every GET;"
        " every request carries `X-User`/`X-Roles` (trusted-proxy identity) and, on (d) and (e), writes"
        " an audit event to the hash-chained file sink (fsync per batch, on disk), as in production:"
        " `audit_sink: none` would flatter us. One patient, so the data-key cache always hits (KMS"
        " costs are part 3). The upstream is the demo API (Starlette, uvicorn with httptools and uvloop,"
        " one worker, no access log) on SQLite on tmpfs: as cheap an upstream as it gets, so the hop's"
        " cost shows. Any error or non-2xx answer fails the bench.",
        "",
        f"**wrk, nginx, the gateway and the upstream all share this machine's {os.cpu_count()} cores**"
        " (with whatever else runs on it): absolute throughput is a lower bound of what each would do"
        " alone, and the cases differ in how many processes compete ((b), (c) and (d) add one). Read"
        " the ratios to (a), and the CPU each process spent per request (utime + stime from /proc),"
        " which the contention disturbs less.",
        "",
    )  # fmt: skip
    direct_target = targets["direct"]
    direct = {m: _medians(direct_target.samples[m]) for m in METHODS}
    rows = []
    for target in targets.values():
        for method in METHODS:
            med, base = _medians(target.samples[method]), direct[method]
            later = "" if target is direct_target else f"{(med['p50'] - base['p50']) * 1e3:+,.2f} ms"
            rows.append([
                target.label, method, f"{med['rps']:,.0f}", _ms(med["p50"]), _ms(med["p99"]),
                f"{med['rps'] / base['rps']:.2f}×", later,
                f"{med['front_cpu'] * 1e6:,.0f}" if target.front else "", f"{med['upstream_cpu'] * 1e6:,.0f}",
            ])  # fmt: skip
    section.table(
        ["case", "method", "requests/s", "p50 ms", "p99 ms", "throughput vs (a)", "p50 vs (a)",
         "hop CPU µs/req", "upstream CPU µs/req"],
        rows,
    )  # fmt: skip
    lines = []
    for name in ("nginx", "proxy", "gateway", "middleware"):
        parts = []
        for method in METHODS:
            med, base = _medians(targets[name].samples[method]), direct[method]
            extra = med["front_cpu"] + med["upstream_cpu"] - base["upstream_cpu"]
            parts.append(
                f"{method} {med['rps'] / base['rps']:.2f}× direct throughput,"
                f" {(med['p50'] - base['p50']) * 1e3:+.1f} ms p50, {extra * 1e6:+,.0f} µs CPU per request"
            )
        lines.append(f"- {targets[name].label}: " + "; ".join(parts) + ".")
    section.add(
        "Against (a), with CPU per request added up over the case's processes (for (e) the middleware"
        " runs inside the upstream's process):",
        *lines,
        "",
        f"At fixed concurrency latency is about {CONNECTIONS} connections / throughput (Little's law), so"
        " the p50 column mirrors the throughput column; the CPU columns are each case's own cost.",
        "",
    )


def _medians(samples: list[Sample]) -> dict[str, float]:
    keys = ("rps", "p50", "p99", "front_cpu", "upstream_cpu")
    return {k: statistics.median(getattr(s, k) for s in samples) for k in keys}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f}"
