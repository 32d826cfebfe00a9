"""Data keys and the ``KeyProvider`` protocol that makes and unwraps them.

A data key is a fresh AES-256 key, used for fields, and stored beside them wrapped
(encrypted) under a master key that never leaves the key service. Two providers:
``kms.KmsKeyProvider`` (AWS KMS) and ``keyring.LocalKeyring`` (a file, for development).
"""

from __future__ import annotations

from typing import Protocol

from phi_gateway.aead import KEY_BYTES, Aead
from phi_gateway.context import Context


class DataKey:
    """A plaintext data key, ready to use, with its wrapped form and master key reference.

    The plaintext is handed to the AES-GCM context once and our buffer is zeroed (a
    ``bytearray`` argument is taken over and zeroed too), so the copy we keep lives inside
    OpenSSL, which cleanses it when the key is dropped. Immutable ``bytes`` passed in (as
    botocore returns them) cannot be zeroed by Python: callers drop them at once.
    ``repr`` and ``str`` never show key material.
    """

    __slots__ = ("aead", "key_ref", "wrapped")

    def __init__(self, key_ref: str, wrapped: bytes, plaintext: bytes | bytearray) -> None:
        if len(plaintext) != KEY_BYTES:
            raise ValueError("data key must be 32 bytes.")
        if not key_ref or not wrapped:
            raise ValueError("data key needs a master key reference and a wrapped form.")
        buffer = bytearray(plaintext)
        try:
            self.aead = Aead(buffer)
        finally:
            buffer[:] = bytes(len(buffer))
        if isinstance(plaintext, bytearray):
            plaintext[:] = bytes(len(plaintext))
        self.key_ref = key_ref
        self.wrapped = bytes(wrapped)

    def __repr__(self) -> str:
        return f"DataKey(key_ref={self.key_ref!r}, wrapped=<{len(self.wrapped)} bytes>)"


class KeyProvider(Protocol):
    """Makes, unwraps and re-wraps data keys under master keys, bound to a context.

    ``context`` is the KMS-side encryption context: it must be presented again, exactly,
    to unwrap. ``key_ref`` is the canonical master key identity stored in tokens.
    """

    @property
    def default_master_key(self) -> str:
        """The master key new data keys are made under when none is named."""
        ...

    async def generate_data_key(self, master_key: str, context: Context) -> DataKey: ...

    async def decrypt_data_key(self, key_ref: str, wrapped: bytes, context: Context) -> DataKey: ...

    async def rewrap(
        self,
        key_ref: str,
        wrapped: bytes,
        context: Context,
        *,
        master_key: str,
        new_context: Context | None = None,
    ) -> tuple[str, bytes]:
        """Wrap the same data key under ``master_key``; return (new key_ref, new wrapped)."""
        ...
