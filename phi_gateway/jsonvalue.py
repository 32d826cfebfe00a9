"""Strict JSON parsing: exactly the documents that round-trip, for the gateway and the CLI.

The gateway forwards its own re-serialization of what it parsed, so the parser decides
what the upstream sees. Everything another parser might read differently is refused:
duplicate keys (at any depth), NaN/Infinity, numbers that overflow a double, integers
beyond 64 bits, invalid UTF-8, a BOM, and nesting deeper than ``max_depth``. Lone
surrogates are caught when the document is serialized again (orjson refuses them).

Given the member names a policy protects, a key that differs from one of them only by case
(``SSN``, or ``\u017fsn`` whose case fold is ``ssn``) is refused too: Go's encoding/json,
Json.NET and ASP.NET Core bind keys case-insensitively, so such a key would carry plaintext
past the policy into the upstream's protected field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from typing import Any

from phi_gateway.exceptions import DocumentError

MAX_DEPTH = 64
_INT64 = range(-(2**63), 2**64)


class _Duplicate(Exception):
    pass


class _Constant(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Duplicate
    return result


class _CaseVariant(Exception):
    pass


def _guarded(protected: Collection[str]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    folded = {name.casefold(): name for name in protected}

    def pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = _pairs(pairs)
        for key in result:
            name = folded.get(key.casefold())
            if name is not None and key != name:
                raise _CaseVariant(name)
        return result

    return pairs


def _constant(name: str) -> Any:
    raise _Constant


def _invalid(message: str) -> DocumentError:
    return DocumentError("invalid_json", message)


def _check(value: Any, max_depth: int) -> None:
    """Depth, finite floats and 64-bit integers, without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict or kind is list:
            if depth > max_depth:
                raise _invalid(f"JSON nested deeper than {max_depth} levels")
            children = item.values() if kind is dict else item
            stack.extend((child, depth + 1) for child in children if type(child) in (dict, list, float, int))
        elif kind is float:
            if not math.isfinite(item):
                raise _invalid("number out of range")
        elif kind is int and item not in _INT64:
            raise _invalid("integer beyond 64 bits")


def loads_strict(raw: bytes, *, max_depth: int = MAX_DEPTH, protected: Collection[str] = ()) -> Any:
    """Parse one UTF-8 JSON document strictly. Errors never quote the input. ``protected``:
    member names no key may spell with another case."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("body is not valid UTF-8") from None
    try:
        hook = _guarded(protected) if protected else _pairs
        value = json.loads(text, object_pairs_hook=hook, parse_constant=_constant)
    except _Duplicate:
        raise _invalid("duplicate key in a JSON object") from None
    except _CaseVariant as exc:
        raise DocumentError(
            "field_ambiguous", f"a key is spelled like {exc.args[0]!r} in another case"
        ) from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except _Constant:
        raise _invalid("NaN and Infinity are not JSON") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise _invalid("number too long") from None
    except RecursionError:
        raise _invalid(f"JSON nested deeper than {max_depth} levels") from None
    _check(value, max_depth)
    return value
