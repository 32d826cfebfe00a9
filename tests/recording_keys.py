"""A real key provider with every call it gets written down, for tests that count or
inspect what reaches the key service."""

from __future__ import annotations

from typing import Any

from phi_gateway.context import Context
from phi_gateway.keys import DataKey, KeyProvider


class RecordingKeys:
    """``inner``, noting the KMS-side context of each data key made and unwrapped, and how
    many re-wraps were asked for."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.generated: list[dict[str, str]] = []
        self.unwrapped: list[dict[str, str]] = []
        self.rewraps = 0

    @property
    def default_master_key(self) -> str:
        return self.inner.default_master_key

    async def generate_data_key(self, master_key: str, context: Context) -> DataKey:
        self.generated.append(dict(context))
        return await self.inner.generate_data_key(master_key, context)

    async def decrypt_data_key(self, key_ref: str, wrapped: bytes, context: Context) -> DataKey:
        self.unwrapped.append(dict(context))
        return await self.inner.decrypt_data_key(key_ref, wrapped, context)

    async def rewrap(self, *args: Any, **kwargs: Any) -> tuple[str, bytes]:
        self.rewraps += 1
        return await self.inner.rewrap(*args, **kwargs)
