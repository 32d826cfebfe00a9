"""3. KMS economics: how many KMS calls the data-key cache saves, against moto's server.

The requests run in-process through the real ``transform`` + ``DataKeyCache`` +
``KmsKeyProvider`` (no HTTP hop), one gateway process with one cache at the default TTL.
KMS calls are counted with ``AwsSettings.observer``, by operation. The moto server runs in
its own process, so its CPU does not share our GIL.
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import orjson
from pyinstrument import Profiler

from bench.common import Section
from phi_gateway.aws import AwsSettings
from phi_gateway.cache import DataKeyCache
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.rules import RequestRule, ResponseRule
from phi_gateway.transform import Scope, decrypt_response, encrypt_request

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
BURST = 100
SEED_CONCURRENCY = 8  # in-flight seeding writes; seeding is setup, not measured

_MOTO = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # serve until the bench closes our stdin
server.stop()
"""


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's KMS in a child process on 127.0.0.1; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError("moto server did not start")
        yield url
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def fake_aws_credentials() -> Iterator[None]:
    # For the moto server only: every client here is given its endpoint_url.
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")  # noqa: S106
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class CallCounter:
    """An ``AwsObserver``: KMS calls by operation; anything but ``ok`` is a bench failure."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    def __call__(self, service: str, operation: str, outcome: str, seconds: float) -> None:
        self.calls[operation] += 1
        if outcome != "ok":
            self.failed[f"{operation} {outcome}"] += 1

    def since(self, before: Counter[str]) -> Counter[str]:
        return self.calls - before


class ConnectCounter:
    """Counts the TCP connections the event loop opens (aiohttp connects through
    ``loop.sock_connect``), to show whether the KMS client reuses them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.count = 0
        self._loop = loop
        real = loop.sock_connect

        async def counting(sock: Any, address: Any) -> None:
            self.count += 1
            await real(sock, address)

        loop.sock_connect = counting  # type: ignore[method-assign]

    def close(self) -> None:
        del self._loop.sock_connect  # back to the class's method


@dataclass(frozen=True)
class Mode:
    name: str  # as in the policy file: per_record or per_policy
    put: RequestRule
    get: ResponseRule


def _modes(directory: Path) -> list[Mode]:
    """patients.yaml as shipped (per_record), and the same with ``data_key: per_policy``."""
    text = (ROOT / "policies" / "patients.yaml").read_text(encoding="utf-8")
    per_policy = text.replace("data_key: per_record", "data_key: per_policy").replace(
        ", kms: pseudonymize", ""
    )
    assert "per_policy" in per_policy
    assert "kms: pseudonymize" not in per_policy
    modes = []
    for name, policy in (("per_record", text), ("per_policy", per_policy)):
        folder = directory / name
        folder.mkdir()
        (folder / "patients.yaml").write_text(policy, encoding="utf-8")
        policies = load_policies([folder])
        put, get = policies.match("PUT", "/patients/p-0"), policies.match("GET", "/patients/p-0")
        assert put is not None
        assert put.route.request is not None
        assert get is not None
        assert get.route.response is not None
        modes.append(Mode(name, put.route.request, get.route.response))
    return modes


def plan(patients: int, requests: int) -> list[tuple[str, str]]:
    """Request n is for patient n mod ``patients``; each patient's requests alternate read and
    write, even-numbered patients starting with a read."""
    out = []
    for n in range(requests):
        p = n % patients
        out.append(("read" if (n // patients + p) % 2 == 0 else "write", f"p-{p:05d}"))
    return out


class Workload:
    """The patients API as the gateway sees it: PUT bodies in, stored records out."""

    def __init__(self, mode: Mode, pepper: Pepper) -> None:
        self.mode = mode
        self.pepper = pepper
        self.body = (ROOT / "phi_gateway" / "demo_patient.json").read_bytes()

    async def write(self, pid: str, keys: DataKeyCache, store: dict[str, Any]) -> None:
        doc = orjson.loads(self.body)  # the gateway's own freshly parsed copy
        doc["id"] = pid
        scope = Scope({"patient_id": pid}, {})
        await encrypt_request(doc, self.mode.put, scope, keys=keys, pepper=self.pepper)
        store[pid] = orjson.dumps(doc)  # what the upstream keeps

    async def read(self, pid: str, keys: DataKeyCache, store: dict[str, Any]) -> None:
        doc = orjson.loads(store[pid])  # the upstream's answer, freshly parsed
        scope = Scope({"patient_id": pid}, {})
        report = await decrypt_response(doc, self.mode.get, scope, keys=keys, pepper=self.pepper, roles=None)
        assert sum(report.decrypted.values()) == 8, report.decrypted

    async def run(
        self, requests: list[tuple[str, str]], keys: Callable[[], DataKeyCache], store: dict[str, Any]
    ) -> tuple[float, float]:
        """Wall and CPU seconds (this process: moto runs in another) for the requests, one after
        another; ``keys`` is asked for each request's cache."""
        started, cpu = time.perf_counter(), time.process_time()
        for kind, pid in requests:
            if kind == "write":
                await self.write(pid, keys(), store)
            else:
                await self.read(pid, keys(), store)
        return time.perf_counter() - started, time.process_time() - cpu

    async def seed(self, pids: list[str], keys: DataKeyCache) -> dict[str, Any]:
        """Records already stored before the gateway started: written through another cache."""
        store: dict[str, Any] = {}
        limit = asyncio.Semaphore(SEED_CONCURRENCY)

        async def one(pid: str) -> None:
            async with limit:
                await self.write(pid, keys, store)

        await asyncio.gather(*(one(pid) for pid in pids))
        return store


@asynccontextmanager
async def kms_provider(url: str, counter: CallCounter) -> AsyncIterator[KmsKeyProvider]:
    session = aioboto3.Session(region_name=REGION)
    async with session.client("kms", endpoint_url=url) as kms:
        arn = (await kms.create_key(Description="phi-gateway bench key"))["KeyMetadata"]["Arn"]
    settings = AwsSettings(region=REGION, endpoint_url=url, observer=counter)
    async with KmsKeyProvider([arn], settings, session=session) as provider:
        yield provider


def _label(stack: list[Any]) -> str:
    """Who a sample belongs to: the outermost third-party package on its stack (the KMS client,
    JSONPath), else the innermost phi_gateway function, else the event loop or the bench."""
    for frame in stack:
        if "site-packages/" in frame.file_path and "pyinstrument" not in frame.file_path:
            return "`" + frame.file_path.split("site-packages/", 1)[1].split("/", 1)[0] + "`"
    for frame in reversed(stack):
        if "/phi_gateway/" in frame.file_path:
            module = frame.file_path.rsplit("/", 1)[1].removesuffix(".py")
            return f"`{module}.{frame.function}`"
    if stack and stack[-1].function in ("epoll.poll", "select.epoll.poll", "poll"):
        return "event loop idle (waiting for KMS)"
    inner = max((i for i, frame in enumerate(stack) if "/asyncio/" in frame.file_path), default=-1)
    if any("/bench/" in frame.file_path for frame in stack[inner + 1 :]):
        return "bench harness"
    return "asyncio and other stdlib"


def profile_shares(profiler: Profiler, n: int = 3) -> list[tuple[str, float, float]]:
    """The ``n`` largest shares of the profiled time by ``_label``: (label, share, seconds)."""
    session = profiler.last_session
    assert session is not None
    root = session.root_frame()
    assert root is not None
    totals: Counter[str] = Counter()

    def walk(frame: Any, stack: list[Any]) -> None:
        stack = [*stack, frame]
        totals[_label(stack)] += frame.total_self_time  # includes its synthetic children
        for child in frame.children:
            if not child.is_synthetic:
                walk(child, stack)

    walk(root, [])
    whole = sum(totals.values()) or 1.0
    return [(name, seconds / whole, seconds) for name, seconds in totals.most_common(n)]


async def _scenarios(url: str, context: dict[str, Any], section: Section) -> list[dict[str, Any]]:
    quick = bool(context.get("quick"))
    requests = 1_000 if quick else 10_000
    naive_sample = 100 if quick else 500
    patient_counts = (1, 100, requests)
    pepper = Pepper({1: os.urandom(32)}, current=1)
    counter = CallCounter()
    with tempfile.TemporaryDirectory() as directory:
        modes = _modes(Path(directory))
    rows: list[dict[str, Any]] = []
    connects = ConnectCounter(asyncio.get_running_loop())
    profiles: dict[str, tuple[str, int, int, int, list[tuple[str, float, float]]]] = {}
    async with kms_provider(url, counter) as provider:
        for mode in modes:
            work = Workload(mode, pepper)
            for patients in patient_counts:
                requests_plan = plan(patients, requests)
                first: dict[str, str] = {}
                for kind, pid in requests_plan:
                    first.setdefault(pid, kind)
                readers = [pid for pid, kind in first.items() if kind == "read"]
                before = counter.calls.copy()
                seeded = await work.seed(readers, DataKeyCache(provider))
                seeding = counter.since(before)
                # The seed's design: no cache shared between requests, one KMS call per request.
                before = counter.calls.copy()
                naive_time, _ = await work.run(
                    requests_plan[:naive_sample], lambda: DataKeyCache(provider), dict(seeded)
                )
                naive = counter.since(before)
                # The gateway: one cache for every request, default TTL and capacity.
                cache = DataKeyCache(provider)
                before, connected = counter.calls.copy(), connects.count
                cached_time, cached_cpu = await work.run(
                    requests_plan, lambda cache=cache: cache, dict(seeded)
                )
                cached = counter.since(before)
                assert connects.count - connected == sum(cached.values()), "moto kept a connection"
                assert cache.stats.expirations == cache.stats.evictions == 0, cache.stats
                assert not counter.failed, counter.failed
                assert sum(naive.values()) == naive_sample, naive
                print(
                    f"bench: kms {mode.name} {patients} patients: {dict(cached)} "
                    f"(naive sample {dict(naive)}, seeding {dict(seeding)})",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(
                    {
                        "mode": mode.name,
                        "patients": patients,
                        "requests": requests,
                        "reads": sum(kind == "read" for kind, _ in requests_plan),
                        "generate": cached["GenerateDataKey"],
                        "decrypt": cached["Decrypt"],
                        "seconds": cached_time,
                        "cpu": cached_cpu,
                        "naive": naive,
                        "naive_per_request": naive_time / naive_sample,
                    }
                )
        # Profiles, on fresh caches: the best case, and the worst (every request a new patient).
        for key, mode, patients, count in (
            ("best", modes[1], 1, requests),
            ("worst", modes[0], requests, min(requests, 1_000)),
        ):
            work = Workload(mode, pepper)
            requests_plan = plan(patients, requests)[:count]
            readers = list(dict.fromkeys(pid for kind, pid in requests_plan if kind == "read"))
            seeded = await work.seed(readers, DataKeyCache(provider))
            cache = DataKeyCache(provider)
            profiler = Profiler(interval=0.0005, async_mode="disabled")
            before = counter.calls.copy()
            profiler.start()
            await work.run(requests_plan, lambda cache=cache: cache, seeded)
            profiler.stop()
            calls = sum(counter.since(before).values())
            profiles[key] = (mode.name, patients, count, calls, profile_shares(profiler))
        startup = counter.calls["DescribeKey"]
        connects.close()

    best = min(rows, key=lambda r: r["seconds"])
    best_per_request = best["seconds"] / requests
    section.add(
        f"**Requests.** {requests:,} requests"
        + (" (--quick: scaled down from 10,000)" if quick else "")
        + f" over 1, 100 and {requests:,} distinct patients. Request n is for patient n mod P, and"
        " each patient's requests alternate a read and a write (even-numbered patients start with a"
        " read), so half are reads. A write is `PUT /patients/{id}` of the demo patient (8 PHI"
        " tokens, 3 blind indexes) through `transform.encrypt_request` with the patients policy's"
        " PUT rule; a read is `GET /patients/{id}` of that patient's stored record through"
        " `transform.decrypt_response` (all 8 fields decrypted). Before each scenario, every patient"
        " whose first request is a read already has a record, written through another cache (data at"
        " rest from another process; those KMS calls are not counted). Requests run in-process, one"
        " after another, through the real transform, `DataKeyCache` (default TTL 300 s, capacity"
        " 10,000) and `KmsKeyProvider`: no HTTP. One gateway process, one cache. KMS is moto's"
        " server on 127.0.0.1, in a child process; calls are counted with `AwsSettings.observer`.",
        "",
        "**Naive** is the seed's design: the same requests with a fresh cache for each, so one"
        " GenerateDataKey per write and one Decrypt per read. Its count is one per request by"
        " construction (every request has one record, so one data key); it was measured on the first"
        f" {naive_sample:,} requests of each scenario, and its time is per request on that sample."
        " Times are ratios to the fastest cached scenario"
        f" (`{best['mode']}`, {best['patients']:,} patient{'s' if best['patients'] > 1 else ''}:"
        f" {best_per_request * 1e6:,.0f} µs per request); every scenario has the same requests.",
        "",
    )
    section.table(
        [
            "data key",
            "patients",
            "requests (reads)",
            "GenerateDataKey",
            "Decrypt",
            "KMS calls / request",
            "naive: KMS calls / request",
            "wall time vs best",
            "CPU µs / request",
            "naive: time / request vs best",
        ],
        [
            [
                f"`{r['mode']}`",
                f"{r['patients']:,}",
                f"{requests:,} ({r['reads']:,})",
                f"{r['generate']:,}",
                f"{r['decrypt']:,}",
                f"{(r['generate'] + r['decrypt']) / requests:.4f}",
                f"1 (measured: {sum(r['naive'].values()):,} in {naive_sample:,})",
                f"{r['seconds'] / best['seconds']:,.1f}×",
                f"{r['cpu'] / requests * 1e6:,.0f}",
                f"{r['naive_per_request'] / best_per_request:,.1f}×",
            ]
            for r in rows
        ],
    )
    section.add(
        "Not per request: a `KmsKeyProvider` makes one DescribeKey per master key when it starts"
        f" ({startup} in this section). Wall times include moto's latency, a few ms per call on"
        " loopback. moto's server (werkzeug) answers `Connection: close`, so every call opened a new"
        " TCP connection (the bench counts them: as many connects as KMS calls), without TLS; KMS"
        " speaks TLS but keeps connections alive, so a real call costs a handshake only now and"
        " then. CPU is this process's"
        " (`time.process_time`); moto's is not in it.",
        "",
        "Top three costs (pyinstrument, sampled on the event loop's thread after the table, on fresh"
        " caches; a sample is charged to the outermost third-party package on its stack, else to the"
        " innermost `phi_gateway` function):",
        "",
    )
    for key, (mode_name, patients, count, calls, costs) in profiles.items():
        shares = "; ".join(
            f"{label} {share:.0%} ({seconds / count * 1e6:,.0f} µs per request)"
            for label, share, seconds in costs
        )
        section.add(
            f"- {key} case (`{mode_name}`, {patients:,} patient{'s' if patients > 1 else ''},"
            f" {count:,} requests, {calls:,} KMS calls): {shares}"
        )
    # CPU per KMS call: per_record's all-miss row against its one-patient row (same transform).
    low, high = rows[0], rows[len(patient_counts) - 1]
    extra_calls = (high["generate"] + high["decrypt"] - low["generate"] - low["decrypt"]) or 1
    per_call = (high["cpu"] - low["cpu"]) / extra_calls
    section.add(
        "",
        f"What they mean: when every request misses, each KMS call costs this process about"
        f" {per_call * 1e3:.1f} ms of CPU (the `per_record` rows' CPU difference over their call"
        " difference), nearly all in the AWS client (aiobotocore, botocore, aiohttp: building,"
        " signing, sending and parsing the request, on a fresh connection here), against"
        f" {low['cpu'] / requests * 1e6:,.0f} µs for a whole request that hits. So a miss costs"
        " CPU as well as latency, and only fewer calls help much: a longer TTL, sticky routing by"
        " patient, or `per_policy`. When the cache hits, what remains is the transform's per-record"
        " work (context encoding, pseudonym HMACs, token parsing), which parts 1 and 2 measure.",
        "",
    )
    return rows


async def _bursts(url: str, section: Section) -> None:
    pepper = Pepper({1: os.urandom(32)}, current=1)
    counter = CallCounter()
    with tempfile.TemporaryDirectory() as directory:
        modes = _modes(Path(directory))
    rows = []
    async with kms_provider(url, counter) as provider:
        for mode in modes:
            work = Workload(mode, pepper)
            # Writes: 100 at once on a cold cache, all for one KMS context.
            pids = ["p-00042"] * BURST if mode.name == "per_record" else [f"p-{i:05d}" for i in range(BURST)]
            cache, store = DataKeyCache(provider), {}
            before = counter.calls.copy()
            await asyncio.gather(*(work.write(pid, cache, store) for pid in pids))
            writes = counter.since(before)
            # Reads: 100 at once of one token written by another cache.
            stored = orjson.loads(store[pids[0]])
            one_token = {"id": stored["id"], "ssn": stored["ssn"]}
            reader = DataKeyCache(provider)
            before = counter.calls.copy()
            docs = [copy.deepcopy(one_token) for _ in range(BURST)]
            scope = Scope({"patient_id": stored["id"]}, {})
            await asyncio.gather(
                *(
                    decrypt_response(doc, mode.get, scope, keys=reader, pepper=pepper, roles=None)
                    for doc in docs
                )
            )
            reads = counter.since(before)
            assert all(doc["ssn"] == "123-45-6789" for doc in docs)
            assert not counter.failed, counter.failed
            print(
                f"bench: kms burst {mode.name}: writes {dict(writes)}, reads {dict(reads)}", file=sys.stderr
            )
            assert writes == Counter({"GenerateDataKey": 1}), f"cold write burst made {dict(writes)}"
            assert reads == Counter({"Decrypt": 1}), f"cold read burst made {dict(reads)}"
            who = "one patient" if mode.name == "per_record" else f"{BURST} patients (one KMS context)"
            rows.append(
                [
                    f"`{mode.name}`",
                    f"{BURST} concurrent writes, {who}",
                    writes["GenerateDataKey"],
                    writes["Decrypt"],
                ]
            )
            rows.append(
                [
                    f"`{mode.name}`",
                    f"{BURST} concurrent reads of one token",
                    reads["GenerateDataKey"],
                    reads["Decrypt"],
                ]
            )
    section.add(
        "**Cold-cache bursts.** A fresh cache (a new pod), then requests started together with"
        " `asyncio.gather`. Single-flight must turn each burst into exactly one KMS call; the bench"
        " asserts it.",
        "",
    )
    section.table(["data key", "burst", "GenerateDataKey", "Decrypt"], rows)


def _quota(section: Section, rows: list[dict[str, Any]]) -> None:
    """The one-paragraph tie to docs/operations.md's arithmetic, from this run's counts."""
    by = {(r["mode"], r["patients"]): r["generate"] + r["decrypt"] for r in rows}
    requests = rows[0]["requests"]
    sweep = sorted({r["patients"] for r in rows})
    middle, every = sweep[1], sweep[-1]
    replicas, ttl = 6, 300  # docs/operations.md's worked example
    section.add(
        f'**Against the KMS quota** (`docs/operations.md`, "KMS request rates": KMS/s ≈ min(N,'
        " R·P/T + R·W) for `per_record`). Read each row as one TTL's traffic at one replica: the"
        f" {requests:,} requests take far less than T = {ttl} s, and no key expired or was evicted"
        " (asserted). `per_record` over"
        f" {every:,} patients is the ceiling N: every request is a first touch, so"
        f" {by['per_record', every]:,} calls, and spreading the requests over replicas changes"
        " nothing (no patient comes twice). Over"
        f" {middle} patients the cache turned {requests:,} requests into {by['per_record', middle]:,}"
        " calls: one GenerateDataKey per patient written and one Decrypt per patient whose stored"
        " record was read before this replica wrote it, which is the R·P/T term for R = 1. Multiply"
        " that term by the replicas: each has its own cache and pays its own first touches"
        f" (R = {replicas}, the worked example's: {replicas * by['per_record', middle]:,} calls per"
        f" {ttl} s), and each write on one replica gives the patient a data key the other R − 1 must"
        " unwrap (the R·W term, up to R² calls per patient per TTL), which one process cannot show."
        f" `per_policy` made {by['per_policy', every]} calls whatever the number of patients: R·(C +"
        " D)/T with C = 1 context and D = 1 data key among the records read (D grows with the writers"
        f" and windows those records span), {replicas * by['per_policy', every]} per TTL for"
        f" {replicas} replicas. The cold-cache bursts bound a new pod: one call per KMS context it"
        " meets, not one per request waiting on it.",
    )


def run(context: dict[str, Any]) -> Section:
    section = Section("3. KMS economics")
    with fake_aws_credentials(), moto_server() as url:
        rows = asyncio.run(_scenarios(url, context, section))
        asyncio.run(_bursts(url, section))
    _quota(section, rows)
    return section
