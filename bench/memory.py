"""5. Memory: the gateway's RSS under the HTTP benchmark's load, and RSS per cached data key.

The cache is measured in fresh child processes (``python -m bench.memory <case>``), so that
nothing else this run allocated is in the numbers: one fills a ``DataKeyCache`` and reads
``/proc/self/status``, one repeats it under tracemalloc to see the Python side, and two do the
same for the floor, bare ``AESGCM`` objects.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

from bench.common import Section

ROOT = Path(__file__).resolve().parent.parent
KEYS = 100_000
CASES = ("cache", "cache-traced", "aesgcm", "aesgcm-traced")


def status() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process, in bytes."""
    found = {}
    with open("/proc/self/status", encoding="ascii") as lines:
        for line in lines:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0]) * 1024
    return found


class Probe:
    """RSS at each mark and, under tracemalloc, what Python allocated from the first mark to
    the last and still holds."""

    def __init__(self, traced: bool) -> None:
        self.traced = traced
        self.marks: list[dict[str, int]] = []
        self.snapshots: list[tracemalloc.Snapshot] = []

    def mark(self) -> None:
        gc.collect()
        if self.traced:
            self.snapshots.append(tracemalloc.take_snapshot())
        self.marks.append(status())

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"before": self.marks[0], "after": self.marks[-1]}
        if self.traced:
            ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
            first, last = (s.filter_traces(ignore) for s in (self.snapshots[0], self.snapshots[-1]))
            diff = last.compare_to(first, "lineno")
            out["traced_total"] = sum(stat.size_diff for stat in diff)
            out["traced_top"] = [
                {
                    "where": _where(stat.traceback[0].filename, stat.traceback[0].lineno),
                    "line": _source(stat.traceback[0].filename, stat.traceback[0].lineno),
                    "bytes": stat.size_diff,
                    "blocks": stat.count_diff,
                }
                for stat in sorted(diff, key=lambda s: s.size_diff, reverse=True)[:3]
            ]
        return out


def _where(filename: str, lineno: int) -> str:
    path = Path(filename)
    return f"{path.parent.name}/{path.name}:{lineno}"


def _source(filename: str, lineno: int) -> str:
    try:
        return Path(filename).read_text(encoding="utf-8").splitlines()[lineno - 1].strip()
    except (OSError, IndexError):
        return ""


def _fill_cache(keys: int, probe: Probe) -> dict[str, Any]:
    """A DataKeyCache over a LocalKeyring, filled with ``keys`` encrypt-side keys."""
    from phi_gateway.cache import DataKeyCache
    from phi_gateway.keyring import LocalKeyring, new_master_key_id

    master = new_master_key_id()
    keyring = LocalKeyring({master: os.urandom(32)}, master)

    def context(n: int) -> dict[str, str]:
        # The shape of the patients policy's KMS context, with a pseudonym-sized patient value.
        return {"phi:policy": "patients", "ResourceId": f"p1.{n:024d}", "Purpose": "PHI_Storage"}

    async def fill() -> dict[str, Any]:
        warm = DataKeyCache(keyring)  # first-use allocations (event loop, interned strings)
        for n in range(100):
            await warm.encryption_key(context(-n))
        del warm
        probe.mark()
        cache = DataKeyCache(keyring, capacity=200_000)
        for n in range(keys):
            await cache.encryption_key(context(n))
        probe.mark()
        tables = (cache._encrypt, cache._decrypt)  # private, read only: what the cache holds
        return {
            "encrypt_entries": len(cache._encrypt),
            "decrypt_entries": len(cache._decrypt),
            "data_keys": len({id(entry.key) for table in tables for entry in table.values()}),
            "wrapped_bytes": len(next(iter(cache._encrypt.values())).key.wrapped),
            "generate_calls": cache.stats.generate_calls,
        }

    return asyncio.run(fill())


def _fill_aesgcm(keys: int, probe: Probe) -> dict[str, Any]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    AESGCM(os.urandom(32)).encrypt(os.urandom(12), b"warm", b"")
    probe.mark()
    held = [AESGCM(os.urandom(32)) for _ in range(keys)]
    probe.mark()
    return {"objects": len(held)}


def child(case: str, keys: int) -> dict[str, Any]:
    probe = Probe(traced=case.endswith("-traced"))
    if probe.traced:
        tracemalloc.start(1)
    facts = _fill_cache(keys, probe) if case.startswith("cache") else _fill_aesgcm(keys, probe)
    return {**facts, **probe.result(), "keys": keys}


def measure(case: str, keys: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", case, str(keys)],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=600,
    )
    return orjson.loads(done.stdout)


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def _gateway(context: dict[str, Any], section: Section, per_key: float) -> None:
    section.add("**(a) The gateway under load.**", "")
    rss = context.get("gateway_rss")
    if not rss:
        section.add(
            "Not measured in this run: the HTTP part (4) did not run before this one, and it is what"
            " loads the gateway and records its RSS. Run `python -m bench --only http,memory`.",
            "",
        )
        return
    processes = {"gateway": rss}  # then part 4's other processes, for comparison
    others = context.get("rss_others")
    if isinstance(others, dict):
        processes.update(
            {name: value for name, value in others.items() if "idle" in value and "peak" in value}
        )
    section.table(
        ["process", "idle RSS", "peak RSS (VmHWM)", "growth under load"],
        [
            [
                name.replace("_", " "),
                mib(value["idle"]),
                mib(value["peak"]),
                mib(value["peak"] - value["idle"]),
            ]
            for name, value in processes.items()
        ],
    )
    note = context.get("gateway_rss_note")
    if note:
        section.add(str(note), "")
    section.add(
        f"For scale: a data key held on both sides of the cache costs about {per_key / 1024:.1f} KiB,"
        " from (b) below. A full cache at the default capacity of 10,000 keys per side is about"
        f" {mib(10_000 * per_key)} when both sides hold the same keys (a replica reading what it"
        f" wrote), and up to about {mib(20_000 * per_key)} when they hold different ones (reads of"
        f" other replicas' writes), against the gateway's {mib(rss['peak'])} peak here.",
        "",
    )


def _measure(keys: int) -> dict[str, dict[str, Any]]:
    traced = keys // 5  # tracemalloc slows the fill about threefold; per-key bytes are linear
    return {
        "cache": measure("cache", keys),
        "aesgcm": measure("aesgcm", keys),
        "cache-traced": measure("cache-traced", traced),
        "aesgcm-traced": measure("aesgcm-traced", traced),
    }


def _per_key(result: dict[str, Any]) -> float:
    return float(result["after"]["VmRSS"] - result["before"]["VmRSS"]) / result["keys"]


def _cache(results: dict[str, dict[str, Any]], quick: bool, section: Section) -> None:
    cache, floor = results["cache"], results["aesgcm"]
    traced, floor_traced = results["cache-traced"], results["aesgcm-traced"]
    keys, traced_keys = cache["keys"], traced["keys"]
    for result, size in ((cache, keys), (traced, traced_keys)):
        assert result["encrypt_entries"] == size
        assert result["decrypt_entries"] == size
        assert result["data_keys"] == size
        assert result["generate_calls"] == size
    per_key, floor_per_key = _per_key(cache), _per_key(floor)
    python_per_key = traced["traced_total"] / traced_keys
    floor_python = floor_traced["traced_total"] / traced_keys
    held = cache["encrypt_entries"] + cache["decrypt_entries"]
    section.add(
        f"**(b) {keys:,} cached data keys**"
        + (" (--quick: scaled down from 100,000)" if quick else "")
        + f". In a fresh process, a `DataKeyCache(capacity=200_000)` over a `LocalKeyring` is filled"
        f" with {keys:,} encrypt-side keys, one per distinct KMS context (the patients policy's"
        " shape). Each miss also stores a read-back entry on the decrypt side (`_generate`: what a"
        f" process wrote it reads without a Decrypt), so the cache holds {cache['encrypt_entries']:,}"
        f" + {cache['decrypt_entries']:,} = {held:,} entries, sharing {cache['data_keys']:,}"
        f" `DataKey` objects (one AES-GCM context each). The floor: {keys:,} bare `AESGCM` objects in"
        " a list, in a similar process. RSS is VmRSS from `/proc/self/status` after `gc.collect()`,"
        " before and after the fill; VmHWM is the process's peak.",
        "",
    )
    section.table(
        ["process", "RSS before", "RSS after", "peak (VmHWM)", "bytes per key", "vs floor"],
        [
            [
                f"`DataKeyCache`, {keys:,} keys ({held:,} entries)",
                mib(cache["before"]["VmRSS"]),
                mib(cache["after"]["VmRSS"]),
                mib(cache["after"]["VmHWM"]),
                f"{per_key:,.0f}",
                f"{per_key / floor_per_key:,.2f}×",
            ],
            [
                f"floor: {keys:,} `AESGCM`",
                mib(floor["before"]["VmRSS"]),
                mib(floor["after"]["VmRSS"]),
                mib(floor["after"]["VmHWM"]),
                f"{floor_per_key:,.0f}",
                "1.00×",
            ],
        ],
    )
    section.add(
        f"What dominates: the AES-GCM state, outside Python's allocator. A bare `AESGCM` costs"
        f" {floor_per_key:,.0f} bytes of RSS, of which tracemalloc sees {floor_python:,.0f}: the rest"
        f" is OpenSSL's cipher context. That is {floor_per_key / per_key:.0%} of the cache's"
        f" {per_key:,.0f} bytes per key. Python's share, measured with tracemalloc on a separate fill"
        f" of {traced_keys:,} keys, is {python_per_key:,.0f} bytes per key (both entries, slot tuples"
        f" and digests, the `DataKey`, its wrapped key: {cache['wrapped_bytes']} bytes from"
        " `LocalKeyring`; KMS's ciphertext blobs are about three times longer, roughly 120 bytes more"
        " per key)."
        " The top three Python sites still holding memory after the fill:",
        "",
    )
    section.table(
        ["where", "line", "bytes per key", "blocks per key"],
        [
            [
                f"`{top['where']}`",
                f"`{top['line']}`",
                f"{top['bytes'] / traced_keys:,.0f}",
                f"{top['blocks'] / traced_keys:,.1f}",
            ]
            for top in traced["traced_top"]
        ],
    )
    section.add(
        f"So 60,000 keys cost {mib(60_000 * per_key)} and 120,000 cost {mib(120_000 * per_key)},"
        " in line with the ≈ 200 MB and ≈ 400 MB `docs/operations.md` budgets for those capacities."
        " The encrypt and decrypt sides already share one AES-GCM context per key, and the Python"
        " bookkeeping is already `__slots__`; what would shrink the total is fewer live AES-GCM"
        " contexts (a lower capacity or TTL, or `per_policy`), not leaner Python objects: building the"
        " context on each use instead would keep plaintext keys in Python memory, which `DataKey`"
        " avoids on purpose.",
    )


def run(context: dict[str, Any]) -> Section:
    quick = bool(context.get("quick"))
    section = Section("5. Memory")
    results = _measure(20_000 if quick else KEYS)
    _gateway(context, section, _per_key(results["cache"]))
    _cache(results, quick, section)
    return section


if __name__ == "__main__":
    case, count = sys.argv[1], int(sys.argv[2])
    if case not in CASES:
        raise SystemExit(f"usage: python -m bench.memory {{{','.join(CASES)}}} KEYS")
    sys.stdout.buffer.write(orjson.dumps(child(case, count)))
