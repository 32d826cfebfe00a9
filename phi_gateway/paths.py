"""Which request paths policies are matched on, and which are refused because an upstream
could read them as a policy route's although they match none here.

Dot segments (raw or encoded), empty segments, encoded slashes, dots or ';', backslashes
and ';' parameters are normalized, or not, differently by every server and framework. Such
a path is refused when one of its readings falls under a policy route's literal prefix;
anywhere else it is the app's business and passes untouched.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.types import Scope

from phi_gateway.exceptions import HTTPError
from phi_gateway.rules import PolicySet

_ODD = re.compile(rb"%2[eEfF]|%3[bB]|%5[cC]|\\|;")
_SEGMENT_PARAMS = re.compile(r";[^/]*")
_SLASHES = re.compile(r"//+")
AMBIGUOUS_PATH = HTTPError(
    400,
    "ambiguous_path",
    "a path an upstream could read as a policy route must be plain: no dot or empty segments, "
    "backslashes, ';', or encoded '/', '\\', '.' or ';'",
)


def route_path(scope: Scope, policies: PolicySet) -> str | None:
    """The path policies are matched on, or None when an upstream could read it as a
    policy route although it does not match one here (see the module docstring)."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    if not raw.startswith(b"/"):
        return None
    root = scope.get("root_path", "")
    if not _plain(raw) and _near_policy(raw.decode("latin-1"), root, policies):
        return None
    path: str = scope["path"]
    if root and path.startswith(root):  # mounted under a prefix: policies name the app's own paths
        path = path[len(root) :] or "/"
    return path


def _plain(raw: bytes) -> bool:
    if _ODD.search(raw):
        return False
    segments = raw.split(b"/")[1:]
    return not (any(s in (b".", b"..") for s in segments) or b"" in segments[:-1])


def _near_policy(target: str, root: str, policies: PolicySet) -> bool:
    prefixes = {_literal_prefix(route.template.shape) for route in policies.routes}
    for reading in _readings(target):
        if root and reading.startswith(root):
            reading = reading[len(root) :] or "/"
        folded = reading.casefold()
        if any(p == "/" or folded == p or folded.startswith(p + "/") for p in prefixes):
            return True
    return False


def _literal_prefix(shape: tuple[str | None, ...]) -> str:
    """``/fhir/Patient`` for ``/fhir/Patient/{id}``; ``/`` when a route starts with a parameter."""
    literal = []
    for segment in shape:
        if segment is None:
            break
        literal.append(segment)
    return ("/" + "/".join(literal)).casefold()


def _readings(target: str) -> set[str]:
    """The paths an upstream could route ``target`` to, decoded: every combination of
    decoding before routing, '\\' as '/', dropping ';' parameters (per segment, or the
    whole tail), merging '//' and resolving dot segments (raw or encoded)."""
    found = set()
    for decoded in (target, unquote(target)):
        for slashes in {decoded, decoded.replace("\\", "/")}:
            for params in {slashes, _SEGMENT_PARAMS.sub("", slashes), slashes.split(";", 1)[0]}:
                for merged in {params, _SLASHES.sub("/", params)}:
                    found.add(unquote(merged))
                    found.add(unquote(_resolve(merged)))
    return found


def _resolve(path: str) -> str:
    """RFC 3986 remove_dot_segments, counting '%2e' as '.'."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for segment in segments:
        dots = unquote(segment)
        if dots == "..":
            if out:
                out.pop()
        elif dots != ".":
            out.append(segment)
    if segments and unquote(segments[-1]) in (".", ".."):
        out.append("")  # "/a/b/.." is "/a/"
    return "/" + "/".join(out)
