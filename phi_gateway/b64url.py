"""base64url without padding: how tokens, keyrings, peppers and chain keys write bytes as text."""

from __future__ import annotations

import base64


def encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode(text: str | bytes) -> bytes:
    """Padding optional. Callers that must refuse stray characters check the alphabet first."""
    data = text.encode("ascii") if isinstance(text, str) else text
    data = data.rstrip(b"=")
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
