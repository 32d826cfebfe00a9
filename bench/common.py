"""What every bench part shares: a section of the report, interleaved timing, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any


@dataclass
class Section:
    """One part of BENCHMARKS.md: a title, markdown tables and prose, and the profile notes."""

    title: str
    body: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.body.extend(lines)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.body.append("| " + " | ".join(header) + " |")
        self.body.append("|" + "|".join(" --- " for _ in header) + "|")
        for row in rows:
            self.body.append("| " + " | ".join(str(cell) for cell in row) + " |")
        self.body.append("")

    def markdown(self) -> str:
        return f"## {self.title}\n\n" + "\n".join(self.body).rstrip() + "\n"


def interleaved(
    cases: dict[str, Callable[[], object]], *, rounds: int = 15, min_time: float = 0.02
) -> dict[str, float]:
    """Median seconds per call of each case, measured in alternating rounds so that drift in
    machine load hits every case alike. Each round times a batch of calls sized to last
    about ``min_time``."""
    batch: dict[str, int] = {}
    for name, call in cases.items():
        n = 1
        while True:
            start = time.perf_counter()
            for _ in range(n):
                call()
            if time.perf_counter() - start >= min_time / 4 or n >= 1 << 20:
                batch[name] = max(1, int(n * min_time / max(time.perf_counter() - start, 1e-9) / 4) * 4)
                break
            n *= 2
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            n = batch[name]
            start = time.perf_counter()
            for _ in range(n):
                call()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def ratio(value: float, floor: float) -> str:
    return f"{value / floor:,.1f}×"


def versions(*packages: str) -> dict[str, str]:
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def machine() -> list[str]:
    """Facts about where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            kb = int(next(line for line in info if line.startswith("MemTotal")).split()[1])
        memory = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return [
        f"- Machine: {cpu}, {os.cpu_count()} logical CPUs{memory}; {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- Commit: {commit or 'unknown'}",
    ]


def interleaved_prepared(
    cases: dict[str, tuple[Callable[[], Any], Callable[[Any], object]]],
    *,
    rounds: int = 15,
    min_time: float = 0.02,
) -> dict[str, float]:
    """``interleaved`` for calls that consume their input (a document transformed in place):
    each case is ``(prepare, call)``, ``prepare()`` runs untimed before every ``call(input)``
    and only the calls are timed, one clock read each (meant for calls of 10 µs and more)."""

    def timed(prepare: Callable[[], Any], call: Callable[[Any], object], n: int) -> float:
        spent = 0.0
        for _ in range(n):
            given = prepare()
            start = time.perf_counter()
            call(given)
            spent += time.perf_counter() - start
        return spent

    batch: dict[str, int] = {}
    for name, (prepare, call) in cases.items():
        n = 1
        while True:
            spent = timed(prepare, call, n)
            if spent >= min_time / 4 or n >= 1 << 20:
                batch[name] = max(1, int(n * min_time / max(spent, 1e-9) / 4) * 4)
                break
            n *= 2
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (prepare, call) in cases.items():
            samples[name].append(timed(prepare, call, batch[name]) / batch[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f}"
