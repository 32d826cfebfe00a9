"""Envelope token v1: one JSON value, encrypted with AES-256-GCM under a wrapped data key.

Byte layout and design notes: ``docs/envelope.md``. In short::

    token  = "phi:" base64url(version ‖ algorithm ‖ key_ref ‖ wrapped_key ‖ IV ‖ ciphertext ‖ tag)
    AAD    = version ‖ algorithm ‖ field path ‖ encryption context

Version and algorithm are authenticated by GCM. The key reference and wrapped key are
authenticated by the key service (a wrapped key opens only under its master key and KMS
context), which is what lets ``rewrap`` replace them without touching the ciphertext.
This module is synchronous, pure and does no I/O.
"""

from __future__ import annotations

import binascii
import math
import os
from dataclasses import dataclass
from typing import Any

import orjson

from phi_gateway import b64url
from phi_gateway.aead import IV_BYTES, TAG_BYTES
from phi_gateway.context import Context, encode_context
from phi_gateway.exceptions import InvalidToken, ValueNotEncryptable
from phi_gateway.keys import DataKey

PREFIX = "phi:"
VERSION = 1
ALG_AES256_GCM_JSON = 1  # AES-256-GCM, 96-bit IV, 128-bit tag, payload is UTF-8 JSON text

_SUITE = bytes((VERSION, ALG_AES256_GCM_JSON))
_MAX_KEY_REF = 0xFF
_MAX_WRAPPED = 0xFFFF
_MAX_FIELD = 0xFFFF
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_PADDING = {0: b"", 2: b"==", 3: b"="}
# A last character carries 4 (length % 4 == 2) or 2 (== 3) spare bits, which must be zero.
_CANONICAL_LAST = {
    2: frozenset(c for i, c in enumerate(_ALPHABET) if i & 0x0F == 0),
    3: frozenset(c for i, c in enumerate(_ALPHABET) if i & 0x03 == 0),
}
# Refuse values orjson would silently change type of, instead of serializing them.
_DUMPS_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS
)


@dataclass(frozen=True, slots=True, repr=False)
class Token:
    """A parsed, not yet authenticated token."""

    key_ref: str
    wrapped_key: bytes
    iv: bytes
    sealed: bytes  # ciphertext ‖ tag
    version: int = VERSION
    algorithm: int = ALG_AES256_GCM_JSON

    def __repr__(self) -> str:
        return (
            f"Token(version={self.version}, algorithm={self.algorithm}, key_ref={self.key_ref!r}, "
            f"wrapped_key=<{len(self.wrapped_key)} bytes>, ciphertext=<{self.ciphertext_length} bytes>)"
        )

    @property
    def ciphertext_length(self) -> int:
        return len(self.sealed) - TAG_BYTES

    def with_key(self, key_ref: str, wrapped_key: bytes) -> Token:
        """The same ciphertext under a re-wrapped data key (see ``KeyProvider.rewrap``)."""
        return Token(key_ref, wrapped_key, self.iv, self.sealed, self.version, self.algorithm)

    def to_bytes(self) -> bytes:
        return key_header(self.key_ref, self.wrapped_key) + self.iv + self.sealed

    def serialize(self) -> str:
        return PREFIX + b64url.encode(self.to_bytes())


def key_header(key_ref: str, wrapped_key: bytes) -> bytes:
    """Everything before the IV: version, algorithm, key reference, wrapped key."""
    ref = key_ref.encode("utf-8")
    if not 1 <= len(ref) <= _MAX_KEY_REF:
        raise ValueError("key reference must be 1 to 255 bytes of UTF-8.")
    if not 1 <= len(wrapped_key) <= _MAX_WRAPPED:
        raise ValueError("wrapped key must be 1 to 65535 bytes.")
    return _SUITE + bytes((len(ref),)) + ref + len(wrapped_key).to_bytes(2, "big") + wrapped_key


def _b64decode(text: str) -> bytes:
    """Strict base64url without padding: one canonical text per byte string.

    On the hot path of every decrypt, so it checks with C-speed byte operations: the
    alphabet (``translate`` deleting it leaves nothing), the length, and that the spare low
    bits of the last character are zero (else another spelling of the same bytes).
    """
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidToken() from None
    spare = len(data) % 4
    if data.translate(None, _ALPHABET) or spare == 1 or (spare and data[-1] not in _CANONICAL_LAST[spare]):
        raise InvalidToken()
    try:
        return binascii.a2b_base64(data.translate(_TO_STANDARD) + _PADDING[spare])
    except binascii.Error:
        raise InvalidToken() from None


def is_token(value: object) -> bool:
    """Whether a JSON value looks like a token (it may still fail to parse or authenticate)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def parse(text: str) -> Token:
    """Parse a token's structure, rejecting unknown versions before any key is fetched."""
    if not isinstance(text, str) or not text.startswith(PREFIX):
        raise InvalidToken()
    raw = _b64decode(text[len(PREFIX) :])
    if len(raw) < 3 or raw[0] != VERSION or raw[1] != ALG_AES256_GCM_JSON:
        raise InvalidToken()
    ref_end = 3 + raw[2]
    wrapped_end = ref_end + 2 + int.from_bytes(raw[ref_end : ref_end + 2], "big")
    if raw[2] == 0 or wrapped_end == ref_end + 2:
        raise InvalidToken()
    # At least one byte of ciphertext: the shortest JSON text is one byte long.
    if len(raw) < wrapped_end + IV_BYTES + 1 + TAG_BYTES:
        raise InvalidToken()
    try:
        key_ref = raw[3:ref_end].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidToken() from None
    return Token(
        key_ref=key_ref,
        wrapped_key=raw[ref_end + 2 : wrapped_end],
        iv=raw[wrapped_end : wrapped_end + IV_BYTES],
        sealed=raw[wrapped_end + IV_BYTES :],
    )


def field_prefix(field: str) -> bytes:
    """The first part of the associated data: suite and field path (constant per field)."""
    raw_field = field.encode("utf-8")
    if len(raw_field) > _MAX_FIELD:
        raise ValueError("field path is too long.")
    return _SUITE + len(raw_field).to_bytes(2, "big") + raw_field


def associated_data(context: Context, field: str) -> bytes:
    """What GCM authenticates besides the ciphertext: suite, field path, context."""
    return field_prefix(field) + encode_context(context)


def _check_plain_json(value: Any) -> None:
    """Refuse anything orjson would write as another type (tuple → array, NaN → null, Enum,
    UUID, dataclass ...). Iterative, so deep nesting cannot exhaust the Python stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is int or kind is bool or item is None:
            continue
        if kind is float:
            if not math.isfinite(item):
                raise ValueNotEncryptable("NaN and Infinity are not JSON values")
        elif kind is dict:
            if any(type(k) is not str for k in item):
                raise ValueNotEncryptable("object keys must be strings")
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        else:
            raise ValueNotEncryptable(f"a {kind.__name__} is not a plain JSON value")


def _why_orjson_refused(value: Any) -> str:
    """Which of the three things orjson refuses, in a value ``_check_plain_json`` passed.
    Only on that error path, so the common path pays for none of these checks."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds a lone surrogate, which is not valid Unicode"
        elif type(item) is int and not -(2**63) <= item < 2**64:
            return "integer beyond 64 bits"
        elif type(item) is dict:
            stack.extend(item)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return "nesting too deep"


def serialize_value(value: Any) -> bytes:
    """The exact JSON text of a value; refuses anything that would not round-trip."""
    _check_plain_json(value)
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise ValueNotEncryptable(_why_orjson_refused(value)) from None


def seal(key: DataKey, header: bytes, plaintext: bytes, aad: bytes, iv: bytes) -> str:
    """The token for already serialized parts; the document engine's per-field fast path.

    ``header`` is ``key_header(key.key_ref, key.wrapped)``, computed once per data key.
    """
    return PREFIX + b64url.encode(header + iv + key.aead.seal(iv, plaintext, aad))


def _encrypt_from_parts(key: DataKey, value: Any, context: Context, field: str, iv: bytes) -> str:
    """Deterministic core of ``encrypt``; only known-answer tests pass their own IV."""
    header = key_header(key.key_ref, key.wrapped)
    return seal(key, header, serialize_value(value), associated_data(context, field), iv)


def encrypt(key: DataKey, value: Any, *, context: Context, field: str) -> str:
    """Encrypt one JSON value, bound to ``context`` and ``field``, into a token string."""
    return _encrypt_from_parts(key, value, context, field, os.urandom(IV_BYTES))


def load_value(plaintext: bytes) -> Any:
    """The JSON value of an authenticated payload."""
    try:
        return orjson.loads(plaintext)
    except orjson.JSONDecodeError:
        raise InvalidToken() from None


def decrypt(key: DataKey, token: Token, *, context: Context, field: str) -> Any:
    """Authenticate and decrypt a parsed token with its unwrapped data key."""
    return load_value(key.aead.open(token.iv, token.sealed, associated_data(context, field)))
