"""Canaries: values registered as PHI, and the sweep that proves none of them left the gateway
in anything but a response to a caller allowed to see it.

``new()`` makes a ``CANARY-<uuid4>``; ``register()`` adds a test's own PHI (an SSN, a phone
number: formats a canary cannot take). The registry is one set for the whole session. Every
value is looked for in each form it could leak in: as it is, JSON-escaped, URL-encoded
(``quote``, ``quote_plus``), hex (lower and upper case), and base64 and base64url, padded or
not. A value inside a longer base64 text is encoded at one of three alignments, so each
alignment has its own needle: the characters that depend on the value's bytes alone.

``Evidence`` holds what one server left behind (log lines, exception texts, error responses,
metrics, the audit file); ``Evidence.assert_clean()`` names the artifact and the form of
every canary found, never the text around it.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

PREFIX = "CANARY-"
MIN_LENGTH = 6  # shorter text, or text with fewer than four letters and digits, could be anything's
_KEY = 6  # needles are indexed by their first characters; none is shorter than this

_URLSAFE = str.maketrans("+/", "-_")


@dataclass(frozen=True, slots=True)
class Needle:
    text: str
    value: str
    form: str
    bounded: bool  # a raw number: found only where no digit touches it, as an SSN would be written


@dataclass(frozen=True, slots=True)
class Leak:
    artifact: str
    form: str
    value: str
    offset: int

    def __str__(self) -> str:
        return f"{label(self.value)} in {self.artifact} ({self.form}, at character {self.offset})"


_lock = threading.Lock()
_values: set[str] = set()
_index: dict[str, list[Needle]] = defaultdict(list)


def new() -> str:
    """A fresh ``CANARY-<uuid4>``, registered."""
    value = f"{PREFIX}{uuid.uuid4()}"
    register(value)
    return value


def register(value: object) -> None:
    """Sweep for ``value`` from now on: a string, or every string inside a list or object.
    Text too short or too plain to be told from ordinary output is left out (``MIN_LENGTH``)."""
    for text in _strings(value):
        if len(text) < MIN_LENGTH or sum(ch.isalnum() for ch in text) < 4 or text in _values:
            continue
        needles = [
            Needle(needle, text, form, form == "raw" and needle.isascii() and needle.isdigit())
            for form, needle in forms(text).items()
        ]
        with _lock:
            if text not in _values:
                _values.add(text)
                for needle in needles:
                    _index[needle.text[:_KEY]].append(needle)


def registered(value: str) -> bool:
    return value in _values


def label(value: str) -> str:
    """How a report names a value: a canary in full (it is synthetic), other PHI by its first
    two characters and length."""
    return value if value.startswith(PREFIX) else f"{value[:2]!r}… ({len(value)} characters)"


def forms(value: str) -> dict[str, str]:
    """Each form ``value`` could leak in, by name; a form spelled like an earlier one is left
    out (a canary JSON-escaped or URL-encoded is the canary itself)."""
    raw = value.encode()
    candidates = {
        "raw": value,
        "JSON-escaped": json.dumps(value)[1:-1],
        "URL-encoded (quote)": quote(value),
        "URL-encoded (quote_plus)": quote_plus(value),
        "hex": raw.hex(),
        "HEX": raw.hex().upper(),
    }
    for offset in range(3):
        # Behind `offset` bytes, the value's bits start at bit 8 * offset: keep the characters
        # whose six bits all come from the value. Padding is past them, so padded or not, a
        # needle is in the text.
        encoded = base64.b64encode(bytes(offset) + raw).decode()
        needle = encoded[-(-8 * offset // 6) : 8 * (offset + len(raw)) // 6]
        candidates[f"base64 (offset {offset})"] = needle
        candidates[f"base64url (offset {offset})"] = needle.translate(_URLSAFE)
    first: dict[str, str] = {}
    for name, needle in candidates.items():
        first.setdefault(needle, name)
    return {name: needle for needle, name in first.items()}


def find(artifact: str, text: str) -> list[Leak]:
    """Every registered value in ``text``, once per form, at its first place."""
    return _scan(_snapshot(), artifact, text)


def _snapshot() -> dict[str, list[Needle]]:
    with _lock:  # a server thread may register more while a sweep reads: lists only grow
        return dict(_index)


def _scan(index: dict[str, list[Needle]], artifact: str, text: str) -> list[Leak]:
    found: dict[tuple[str, str], Leak] = {}
    for at in range(len(text) - _KEY + 1) if index else ():
        for needle in index.get(text[at : at + _KEY], ()):
            if text.startswith(needle.text, at) and (key := (needle.value, needle.form)) not in found:
                end = at + len(needle.text)
                if needle.bounded and (text[at - 1 : at].isdigit() or text[end : end + 1].isdigit()):
                    continue
                found[key] = Leak(artifact, needle.form, needle.value, at)
    return list(found.values())


@dataclass
class Evidence:
    """What one server left behind, as (artifact name, text) pairs; safe to add to from any
    thread."""

    artifacts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, content: str | bytes) -> None:
        text = content.decode("utf-8", "backslashreplace") if isinstance(content, bytes) else content
        self.artifacts.append((name, text))

    def names(self) -> Iterator[str]:
        return (name for name, _ in self.artifacts)

    def leaks(self) -> list[Leak]:
        index = _snapshot()
        return [leak for name, text in list(self.artifacts) for leak in _scan(index, name, text)]

    def assert_clean(self) -> None:
        leaks = self.leaks()
        assert not leaks, "canaries leaked:\n" + "\n".join(f"- {leak}" for leak in leaks)


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
