"""AES-256-GCM with the one parameter set phi-gateway uses: 96-bit IV, 128-bit tag.

The only layer that touches ``cryptography``'s AEAD primitive. It is synchronous and
does no I/O; every failure to authenticate is a bare ``InvalidToken``.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phi_gateway.exceptions import InvalidToken

KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16


class Aead:
    """One AES-256-GCM key, set up once and reused for every field it protects."""

    __slots__ = ("_aesgcm",)

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("AES-256-GCM key must be 32 bytes.")
        # AESGCM copies the key into its own context, so the caller may zero its buffer.
        self._aesgcm = AESGCM(key)

    def __repr__(self) -> str:
        return "Aead(<AES-256-GCM key hidden>)"

    def seal(self, iv: bytes, plaintext: bytes | bytearray, aad: bytes) -> bytes:
        """Return ciphertext followed by the 16-byte tag."""
        if len(iv) != IV_BYTES:
            raise ValueError("AES-GCM IV must be 12 bytes.")
        return self._aesgcm.encrypt(iv, plaintext, aad)

    def open(self, iv: bytes, ciphertext_and_tag: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt, or raise ``InvalidToken``."""
        if len(iv) != IV_BYTES or len(ciphertext_and_tag) < TAG_BYTES:
            raise InvalidToken()
        try:
            return self._aesgcm.decrypt(iv, ciphertext_and_tag, aad)
        except InvalidTag:
            raise InvalidToken() from None
