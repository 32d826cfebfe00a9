"""Blind indexes: keyed, truncated hashes of normalized values, so equality search works
on encrypted fields without the upstream ever seeing the value.

    index = "<pepper version>:" hex(HMAC-SHA256(k, encode(normalized values)) truncated to `bits`)
    k     = HKDF(pepper[version], info="blind-index/<policy>/<index name>")

Truncation (as CipherSweet does) makes many values share one index, which bounds what
an index leaks to someone who can count them; the upstream filters the few false
positives away by decrypting, or simply returns them (they fail nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from phi_gateway.pepper import Pepper


class NormalizeError(ValueError):
    """A value cannot be normalized for an index (its message never quotes the value)."""


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isascii() and ch.isdigit())


def _e164(text: str) -> str:
    """A phone number as ``+<country><number>``; a bare 10-digit number is taken as NANP (+1)."""
    stripped = text.strip()
    digits = _digits(stripped)
    if stripped.startswith("+"):
        pass
    elif stripped.startswith("00"):
        digits = digits[2:]
    elif len(digits) == 10:
        digits = "1" + digits
    elif not (len(digits) == 11 and digits.startswith("1")):
        raise NormalizeError("phone number without a country code")
    if not 8 <= len(digits) <= 15:
        raise NormalizeError("phone number has the wrong number of digits for E.164")
    return "+" + digits


def _last4(text: str) -> str:
    digits = _digits(text)
    if len(digits) < 4:
        raise NormalizeError("fewer than four digits")
    return digits[-4:]


_WHITESPACE = re.compile(r"\s+")

NORMALIZERS: dict[str, Callable[[str], str]] = {
    "trim": lambda s: _WHITESPACE.sub(" ", s.strip()),
    "lowercase": str.lower,
    "uppercase": str.upper,
    "nfkc": lambda s: unicodedata.normalize("NFKC", s),
    "digits": _digits,
    "alnum": lambda s: "".join(ch for ch in s if ch.isalnum()),
    "e164": _e164,
    "last4": _last4,
}


def as_text(value: Any) -> str:
    """The text an index is computed over: strings as they are, integers in decimal."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:  # beyond Python's int-to-text digit limit
            raise NormalizeError("integer is too long to index") from None
    raise NormalizeError(f"cannot index a {type(value).__name__} value")


def _encode(values: Sequence[str]) -> bytes:
    """``u16 count ‖ (u32 length ‖ UTF-8)*``: compound values can never run into each other."""
    out = bytearray(len(values).to_bytes(2, "big"))
    for value in values:
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:
            raise NormalizeError("value is not valid Unicode text") from None
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


_INDEX_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class BlindIndex:
    """One named index of one policy: its normalizers and its length in bits."""

    policy: str
    name: str
    normalize: tuple[str, ...]
    bits: int
    arity: int = 1  # number of fields (compound index when > 1)

    def __post_init__(self) -> None:
        # Both names go into the HKDF label "blind-index/<policy>/<name>": no "/" in either.
        if not (_INDEX_NAME.fullmatch(self.policy) and _INDEX_NAME.fullmatch(self.name)):
            raise ValueError("policy and index names must be 1-64 of [A-Za-z0-9_.-].")
        if not 1 <= self.arity <= 8:
            raise ValueError("a blind index combines 1 to 8 fields.")
        unknown = [n for n in self.normalize if n not in NORMALIZERS]
        if unknown:
            raise ValueError(f"unknown normalizer(s): {', '.join(unknown)}")
        if not 8 <= self.bits <= 256:
            raise ValueError("blind index bits must be between 8 and 256.")

    def normalized(self, value: Any) -> str:
        text = as_text(value)
        for name in self.normalize:
            text = NORMALIZERS[name](text)
        if not text:
            raise NormalizeError("value is empty after normalization")
        return text

    def compute(self, pepper: Pepper, values: Sequence[Any], version: int | None = None) -> str:
        """The index of ``values`` (one per field) under a pepper version (default: current)."""
        if isinstance(values, str) or len(values) != self.arity:
            raise ValueError(f"index {self.name} takes {self.arity} value(s), as a sequence")
        version = pepper.current if version is None else version
        key = pepper.derive(f"blind-index/{self.policy}/{self.name}", version)
        mac = hmac.new(key, _encode([self.normalized(v) for v in values]), hashlib.sha256).digest()
        return f"{version}:{self._truncate(mac)}"

    def _truncate(self, mac: bytes) -> str:
        whole, extra = divmod(self.bits, 8)
        kept = mac[: whole + (1 if extra else 0)]
        if extra:  # keep only the top `extra` bits of the last byte
            kept = kept[:-1] + bytes([kept[-1] & (0xFF << (8 - extra)) & 0xFF])
        return kept.hex()
