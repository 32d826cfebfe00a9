"""Compiled JSONPath selectors for policies: parse once at load, walk fast per request.

``compile_path`` parses each expression once. A path made only of these steps is lowered
to a walker over a pre-built tuple of steps, 10 to 100 times faster than jsonpath-ng::

    $              the document root
    .name          an object member; name is ASCII [A-Za-z_][A-Za-z0-9_-]*, so "-" is allowed
                   after the first character as jsonpath-ng allows it; a leading digit is not
                   (".0" would read as an index): other names need brackets
    ['k'] ["k"]    an object member of any name; a backslash escapes the next character,
                   as in jsonpath-ng ("\\'" "\\"" "\\\\"; "\\n" is just "n")
    [0] [-1]       an array element, negative from the end
    [*] .*         every array element in order, or every member value in insertion order

A step that does not apply (a member of an array, an index of an object, a missing member,
an index out of range, any step on a scalar) selects nothing; walking never raises. Only
``list`` and ``dict`` are containers, as parsed JSON has no others. Everything else
(filters ``[?(...)]``, ``..``, slices, unions) is served by jsonpath-ng's extended parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeAlias

from jsonpath_ng.exceptions import JSONPathError
from jsonpath_ng.ext.parser import parse as _parse_extended
from jsonpath_ng.jsonpath import DatumInContext, Fields, Index, JSONPath

from phi_gateway.exceptions import PHIGatewayError

Container: TypeAlias = dict[str, Any] | list[Any]
Place: TypeAlias = tuple[Container, str | int]
# A member name, an array index, or None for the wildcard.
_Step: TypeAlias = str | int | None

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_STEP = re.compile(
    r"""
      \.(?P<name>[A-Za-z_][A-Za-z0-9_-]*)
    | (?:\.\*|\[[ \t]*\*[ \t]*\])(?P<star>)
    | \[[ \t]*(?:
          (?P<index>-?[0-9]+)
        | '(?P<single>(?:[^'\\]|\\.)*)'
        | "(?P<double>(?:[^"\\]|\\.)*)"
      )[ \t]*\]
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_MISSING = object()


class InvalidPath(PHIGatewayError, ValueError):
    """A policy path is not JSONPath this gateway can evaluate; the message is one line."""


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class JsonPath:
    """One compiled expression; equal to another when their canonical spellings are equal.

    ``locate`` reports places a caller can assign to, ``parent[key] = new``. The root has no
    parent, so ``locate`` never reports it (for ``$`` it returns ``[]``) while ``find``
    does (``find("$")`` is ``[doc]``): callers that act on whole documents check
    ``canonical == "$"`` themselves. Indices are non-negative, each place is reported
    once (jsonpath-ng repeats places named twice, as in ``[0,0]``), and results are in
    document order, so deleting in reverse order is safe.

    jsonpath-ng places may nest (``$..*`` reports a member and its descendants): callers
    replacing values decide how to treat those. Values jsonpath-ng computes rather than
    finds (```len```, arithmetic) are not places and are left out of both lists.
    """

    source: str
    canonical: str
    is_simple: bool
    _steps: tuple[_Step, ...]  # the walker's steps; () for "$" and for jsonpath-ng paths
    _head: tuple[_Step, ...]  # every step but the last: the walk to the parents
    _last: _Step
    _expression: JSONPath | None  # set only when jsonpath-ng serves the path

    def __repr__(self) -> str:
        return f"JsonPath({self.canonical!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonPath) and other.canonical == self.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)

    def locate(self, doc: Any) -> list[Place]:
        """Every existing match as (parent container, member name or array index)."""
        if self._expression is not None:
            return _matches(self._expression, doc)[0]
        if not self._steps:
            return []
        step = self._last
        parents = _walk([doc], self._head)
        places: list[Place] = []
        if isinstance(step, str):
            for node in parents:
                if isinstance(node, dict) and step in node:
                    places.append((node, step))
        elif isinstance(step, int):
            for node in parents:
                if isinstance(node, list) and -len(node) <= step < len(node):
                    places.append((node, step % len(node)))
        else:
            for node in parents:
                if isinstance(node, dict):
                    for key in node:
                        places.append((node, key))
                elif isinstance(node, list):
                    for index in range(len(node)):
                        places.append((node, index))
        return places

    def find(self, doc: Any) -> list[Any]:
        """The matched values, in the order ``locate`` reports their places."""
        if self._expression is not None:
            return _matches(self._expression, doc)[1]
        return _walk([doc], self._steps)


def _matches(expression: JSONPath, doc: Any) -> tuple[list[Place], list[Any]]:
    """jsonpath-ng's matches that are real places (or the root), each once, in document order."""
    found: list[tuple[tuple[int, ...], Place | None, Any]] = []
    seen: set[tuple[int, str | int]] = set()
    positions: dict[int, dict[str, int]] = {}
    root_seen = False
    for match in expression.find(doc):
        if match.context is None:
            if match.value is doc and not root_seen:
                root_seen = True
                found.append(((), None, doc))
            continue
        parent, path = match.context.value, match.path
        key: str | int
        if isinstance(path, Fields) and len(path.fields) == 1 and isinstance(parent, dict):
            key = path.fields[0]
            if key not in parent:
                continue
        elif isinstance(path, Index) and len(path.indices) == 1 and isinstance(parent, list):
            key = path.indices[0]
            if not -len(parent) <= key < len(parent):
                continue
            key %= len(parent)
        else:
            continue
        # id() is stable here: every parent stays alive inside doc for the whole call.
        if (id(parent), key) in seen:
            continue
        seen.add((id(parent), key))
        found.append((_position(match, positions), (parent, key), parent[key]))
    # jsonpath-ng orders by expression (``[2,0]``, unions); callers deleting in reverse need
    # document order. sort() is stable, so ties keep jsonpath-ng's order.
    found.sort(key=lambda entry: entry[0])
    places = [place for _, place, _ in found if place is not None]
    return places, [value for _, _, value in found]


def _position(match: DatumInContext, positions: dict[int, dict[str, int]]) -> tuple[int, ...]:
    """Where a match sits in document order: one ordinal per level, from the root down."""
    ordinals: list[int] = []
    while match.context is not None:
        parent, path = match.context.value, match.path
        if isinstance(path, Index) and isinstance(parent, list) and parent:
            ordinals.append(path.indices[0] % len(parent))
        elif isinstance(path, Fields) and isinstance(parent, dict):
            order = positions.get(id(parent))
            if order is None:
                order = positions[id(parent)] = {name: i for i, name in enumerate(parent)}
            ordinals.append(order.get(path.fields[0], -1))
        match = match.context
    ordinals.reverse()
    return tuple(ordinals)


def _walk(nodes: list[Any], steps: tuple[_Step, ...]) -> list[Any]:
    for step in steps:
        found: list[Any] = []
        if isinstance(step, str):
            for node in nodes:
                if isinstance(node, dict):
                    value = node.get(step, _MISSING)
                    if value is not _MISSING:
                        found.append(value)
        elif isinstance(step, int):
            for node in nodes:
                if isinstance(node, list) and -len(node) <= step < len(node):
                    found.append(node[step])
        else:
            for node in nodes:
                if isinstance(node, dict):
                    found.extend(node.values())
                elif isinstance(node, list):
                    found.extend(node)
        if not found:
            return found
        nodes = found
    return nodes


def _lower(text: str) -> tuple[_Step, ...] | None:
    """The walker's steps for ``text`` (which starts with "$"), or None if it needs jsonpath-ng."""
    steps: list[_Step] = []
    pos = 1
    while pos < len(text):
        match = _STEP.match(text, pos)
        if match is None:
            return None
        if match["name"] is not None:
            steps.append(match["name"])
        elif match["star"] is not None:
            steps.append(None)
        elif match["index"] is not None:
            steps.append(int(match["index"]))
        else:
            quoted = match["single"] if match["single"] is not None else match["double"]
            steps.append(_ESCAPE.sub(r"\1", quoted))
        pos = match.end()
    return tuple(steps)


def _spell(step: _Step) -> str:
    if step is None:
        return "[*]"
    if isinstance(step, int):
        return f"[{step}]"
    if _NAME.fullmatch(step):
        return "." + step
    return "['" + step.replace("\\", "\\\\").replace("'", "\\'") + "']"


def _invalid(text: str, problem: str) -> InvalidPath:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return InvalidPath(f"invalid JSONPath {shown!r}: {problem}")


def compile_path(text: str) -> JsonPath:
    """Parse a policy path once; raises ``InvalidPath`` with a one-line reason."""
    if not isinstance(text, str):
        raise InvalidPath(f"a JSONPath must be a string, not {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise _invalid(text, "the path is empty")
    if not stripped.startswith("$"):
        raise _invalid(text, "a path must start with '$' (the document root)")
    steps = _lower(stripped)
    if steps is not None:
        return JsonPath(
            source=text,
            canonical="$" + "".join(_spell(step) for step in steps),
            is_simple=True,
            _steps=steps,
            _head=steps[:-1],
            _last=steps[-1] if steps else None,
            _expression=None,
        )
    try:
        expression = _parse_extended(stripped)
    except JSONPathError as exc:
        # jsonpath-ng's messages are one line of positions and tokens; keep only that.
        reason = (str(exc).splitlines() or ["syntax error"])[0]
        raise _invalid(text, reason[:120]) from None
    except RecursionError:
        raise _invalid(text, "the path is nested too deeply") from None
    # The canonical spelling is bound into tokens' associated data, so it must not change
    # when jsonpath-ng does: for paths it serves, that is the author's own text.
    return JsonPath(
        source=text,
        canonical=stripped,
        is_simple=False,
        _steps=(),
        _head=(),
        _last=None,
        _expression=expression,
    )
