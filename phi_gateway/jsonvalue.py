"""Strict parsing of one JSON value for the CLI: exactly what round-trips, nothing else.

Duplicate keys, NaN/Infinity and integers beyond 64 bits are refused rather than silently
resolved, so the value encrypted is exactly the value the operator wrote.
"""

from __future__ import annotations

import json
from typing import Any

from phi_gateway.exceptions import ValueNotEncryptable

_INT64 = range(-(2**63), 2**64)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueNotEncryptable("duplicate key in JSON object")
    return result


def _integer(text: str) -> int:
    value = int(text)
    if value not in _INT64:
        raise ValueNotEncryptable("integer beyond 64 bits")
    return value


def _constant(name: str) -> Any:
    raise ValueNotEncryptable(f"{name} is not a JSON value")


def loads_strict(raw: bytes) -> Any:
    """Parse UTF-8 JSON text strictly; errors never quote the input."""
    try:
        text = raw.decode("utf-8")
        return json.loads(text, object_pairs_hook=_pairs, parse_int=_integer, parse_constant=_constant)
    except UnicodeDecodeError:
        raise ValueNotEncryptable("input is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueNotEncryptable(
            f"input is not one JSON value (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise ValueNotEncryptable("input is nested too deeply") from None
