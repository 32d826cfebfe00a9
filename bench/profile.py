"""Where the time goes, in one line per cost: pyinstrument over a call repeated for a while.

``top_costs(call)`` charges every sampled moment to the innermost function of our own package
on the stack (``package``): library and C time is charged to the function of ours that asked
for it (the AES-GCM call inside ``Aead.seal`` is ``Aead.seal``'s), and comprehensions to the
function they are written in, so each line names code someone here could change.
``by="module"`` adds those up per module; ``package=None`` ranks plain self time instead. A
function's label also names the biggest foreign callee inside its cost when that is over a
third of it.

pyinstrument's hook runs on every call, so functions that make many tiny calls look a little
heavier than they are: read shares as a ranking, and time a suspect alone before trusting
its percentage.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

from pyinstrument import Profiler

_HARNESS = __name__  # the sampling loop itself
# A sample spans the time since the one before. One far longer than the interval is this
# process waiting for a CPU (the machines are shared), not code running: it counts as this
# much at most, which is still longer than any single library call on these paths.
_LONGEST_SAMPLE = 0.001


class _Site:
    """One stack entry of a pyinstrument sample: its function, module and label."""

    __slots__ = ("function", "label", "module")

    def __init__(self, info: str, shorten: Callable[[str], str]) -> None:
        identifier, *attributes = info.split("\x01")
        function, _, rest = identifier.partition("\x00")
        path = rest.partition("\x00")[0]
        owner = next((a[1:] for a in attributes if a.startswith("c")), "")
        self.function = function
        short = shorten(path) if path.endswith(".py") else ""
        self.module = short[: -len(".py")].replace("/", ".").removesuffix(".__init__") if short else ""
        name = f"{owner}.{function}" if owner and "." not in function else function
        self.label = f"{self.module}.{name}" if self.module else f"{name} (built-in)"


def top_costs(
    call: Callable[[], object],
    n: int = 3,
    *,
    seconds: float = 1.0,
    package: str | None = "phi_gateway",
    by: Literal["function", "module"] = "function",
) -> list[tuple[str, float]]:
    """The ``n`` biggest costs of ``call()`` as (function, share of the time), largest first."""
    profiler = Profiler(interval=0.0001, async_mode="disabled")
    profiler.start()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        call()
    session = profiler.stop()
    sites: dict[str, _Site] = {}
    charged: dict[str, float] = defaultdict(float)
    foreign: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for stack, spent in session.frame_records:
        frames = [
            sites.get(info) or sites.setdefault(info, _Site(info, session.shorten_path)) for info in stack
        ]
        leaf = frames[-1]
        code = next((f for f in reversed(frames) if f.module), leaf)  # the Python frame running
        if code.module == _HARNESS or code.module.startswith("pyinstrument"):
            continue
        owner = leaf
        if package is not None:
            ours = [f for f in frames if f.module.startswith(package + ".")]
            # Comprehensions and lambdas count as the function they are written in.
            named = [f for f in ours if not f.function.startswith("<")] or ours
            owner = named[-1] if named else leaf
        name = owner.label if by == "function" else (owner.module or owner.label)
        spent = min(spent, _LONGEST_SAMPLE)
        charged[name] += spent
        if by == "function" and owner is not leaf and not leaf.module.startswith(f"{package}."):
            foreign[name][leaf.label] += spent
    total = sum(charged.values())
    if total <= 0:
        return []
    costs = []
    for name, spent in sorted(charged.items(), key=lambda item: item[1], reverse=True)[:n]:
        inside = foreign.get(name)
        if inside:
            callee, callee_time = max(inside.items(), key=lambda item: item[1])
            if callee_time > spent / 3:
                name = f"{name} → {callee}"
        costs.append((name, spent / total))
    return costs


def describe(costs: list[tuple[str, float]]) -> str:
    """Costs as one markdown line: each function in backticks, then its share."""
    return ", ".join(f"`{name}` {share:.0%}" for name, share in costs) or "(no samples)"


def count_calls(call: Callable[[], object], function: Callable[..., object]) -> int:
    """How many times one ``call()`` runs ``function`` (a Python function), at any depth."""
    code = getattr(function, "__code__", None)
    if code is None:
        raise TypeError("count_calls needs a Python function")
    seen = 0

    def hook(frame: Any, event: str, arg: object) -> None:
        nonlocal seen
        if event == "call" and frame.f_code is code:
            seen += 1

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        call()
    finally:
        sys.setprofile(previous)
    return seen
