"""DataKey: what it does with the key bytes it is given."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phi_gateway.keys import DataKey

SECRET = bytes(range(32))


def test_a_bytearray_key_comes_back_zeroed_and_the_key_still_works() -> None:
    # DataKey hands the key to AESGCM, which copies it into its own (OpenSSL) context, then
    # zeroes the caller's buffer: sealing afterwards proves the copy was made first.
    buffer = bytearray(SECRET)
    key = DataKey("local:x", b"w", buffer)
    assert buffer == bytearray(32)
    sealed = key.aead.seal(bytes(12), b"payload", b"aad")
    assert AESGCM(SECRET).decrypt(bytes(12), sealed, b"aad") == b"payload"
    assert key.aead.open(bytes(12), sealed, b"aad") == b"payload"


def test_immutable_bytes_are_accepted_and_left_alone() -> None:
    key = DataKey("local:x", b"w", SECRET)  # as botocore returns it: Python cannot zero it
    assert bytes(range(32)) == SECRET  # not zeroed: it cannot be
    assert AESGCM(SECRET).decrypt(bytes(12), key.aead.seal(bytes(12), b"p", b""), b"") == b"p"


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_a_key_of_the_wrong_size_is_refused_and_its_buffer_untouched(size: int) -> None:
    buffer = bytearray(b"k" * size)
    with pytest.raises(ValueError, match="32 bytes"):
        DataKey("local:x", b"w", buffer)
    assert buffer == bytearray(b"k" * size)
