"""Encryption contexts: their one canonical byte encoding, and pseudonyms for KMS.

A context is a flat ``str -> str`` mapping (patient id, purpose, ...). Its exact values
are bound into every token's associated data. The copy sent to KMS may have some values
replaced by keyed-HMAC pseudonyms, because KMS writes the EncryptionContext in plaintext
to CloudTrail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping

Context = Mapping[str, str]

_MAX_ITEM = 0xFFFF


def encode_context(context: Context) -> bytes:
    """Canonical encoding: entries sorted by key, every string length-prefixed.

    ``u16 count ‖ (u16 len ‖ key ‖ u16 len ‖ value)*`` with UTF-8 strings, so two different
    contexts can never encode to the same bytes.
    """
    if len(context) > _MAX_ITEM:
        raise ValueError("encryption context has too many entries")
    parts = [len(context).to_bytes(2, "big")]  # joined once: this runs for every record
    for key in sorted(context):
        value = context[key]
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("encryption context keys and values must be strings")
        raw_key, raw_value = key.encode("utf-8"), value.encode("utf-8")
        if len(raw_key) > _MAX_ITEM or len(raw_value) > _MAX_ITEM:
            raise ValueError("encryption context entry is too long")
        parts += (len(raw_key).to_bytes(2, "big"), raw_key, len(raw_value).to_bytes(2, "big"), raw_value)
    return b"".join(parts)


def context_digest(context: Context) -> bytes:
    """A fixed-size cache key for a context (SHA-256 of its canonical encoding)."""
    return hashlib.sha256(encode_context(context)).digest()


class Pseudonymizer:
    """Replaces chosen context values with ``HMAC-SHA256(secret, encode_context({key: value}))``.

    The pseudonym is deterministic, so the gateway can recompute the KMS context at
    decrypt time, and keyed, so a CloudTrail reader cannot test guesses offline.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("pseudonym secret must be at least 32 bytes.")
        self._secret = bytes(secret)

    def __repr__(self) -> str:
        return "Pseudonymizer(<secret hidden>)"

    def pseudonym(self, key: str, value: str) -> str:
        mac = hmac.new(self._secret, encode_context({key: value}), hashlib.sha256).digest()
        return "p1." + base64.urlsafe_b64encode(mac[:18]).decode("ascii")

    def kms_context(self, context: Context, pseudonymize: Iterable[str]) -> dict[str, str]:
        """The context as KMS should see it: the named entries pseudonymized, the rest as is."""
        names = set(pseudonymize)
        missing = names - context.keys()
        if missing:
            raise ValueError(f"cannot pseudonymize absent context entries: {sorted(missing)}")
        return {k: self.pseudonym(k, v) if k in names else v for k, v in context.items()}
