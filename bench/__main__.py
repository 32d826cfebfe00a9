"""``python -m bench``: run every part in one run and write BENCHMARKS.md (``./scripts/bench``).

Each part is a module with ``run(context) -> Section``; ``context`` carries ``quick`` (a short
run, to check the bench itself) and lets a part leave results for a later one (the HTTP part
leaves the gateway's peak RSS for the memory part).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import machine, versions

PARTS = {
    "crypto": "bench.crypto",  # 1. per-field crypto against the floor, the AWS Encryption SDK, Tink
    "documents": "bench.documents",  # 2. whole documents against orjson
    "kms": "bench.kms",  # 3. KMS economics against moto's server
    "http": "bench.http",  # 4. the HTTP hop with wrk: direct, nginx, proxy, gateway, middleware
    "memory": "bench.memory",  # 5. peak RSS under load, and with 100,000 cached data keys
    "clients": "bench.clients",  # 6. the upstream hop's HTTP client: aiohttp against httpx
}
PACKAGES = (
    "phi-gateway", "cryptography", "orjson", "aioboto3", "aiohttp", "uvicorn", "starlette",
    "jsonpath-ng", "moto", "aws-encryption-sdk", "tink", "pyinstrument",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs: check the bench, not the numbers")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--output", default="BENCHMARKS.md", help="where to write the report")
    args = parser.parse_args()
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(chosen) - PARTS.keys()
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    context: dict[str, Any] = {"quick": args.quick}
    sections = []
    started = time.monotonic()
    for name in chosen:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        part_started = time.monotonic()
        sections.append(importlib.import_module(PARTS[name]).run(context))
        print(f"bench: {name} done in {time.monotonic() - part_started:.0f} s", file=sys.stderr, flush=True)
    report = [
        "# Benchmarks",
        "",
        "Written by `./scripts/bench` (`python -m bench`) in one run"
        + (" (--quick: short runs, numbers not meant to be quoted)" if args.quick else "")
        + f", {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, in {time.monotonic() - started:.0f} s. Every table"
        " compares cases measured side by side in that run, interleaved; read the ratios, not the"
        " absolute times: these machines are shared and noisy.",
        "",
        *machine(),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions(*PACKAGES).items()),
        "",
        "Reproduce: `./scripts/bench` on a fresh clone (it installs the bench extra, and nginx and wrk"
        " from Debian's packages when they are missing).",
        "",
    ]
    text = "\n".join(report) + "\n" + "\n".join(section.markdown() for section in sections)
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"bench: wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
