"""Audit events to CloudWatch Logs through aioboto3: off the gateway host, where the
gateway's own operator cannot rewrite them. One long-lived client; errors translated at
the AWS boundary (``aws.py``), never carrying event content."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from typing import Any

import aioboto3
import orjson

from phi_gateway.aws import AwsSettings, calling
from phi_gateway.exceptions import AuditError

# PutLogEvents limits: 10,000 events and 1,048,576 bytes (each event counts 26 extra bytes).
_MAX_EVENTS = 10_000
_MAX_BYTES = 1_048_576 - 1024
_OVERHEAD = 26


class CloudWatchSink:
    """Writes each batch with PutLogEvents into one stream, created on first use."""

    def __init__(
        self,
        group: str,
        stream: str,
        settings: AwsSettings | None = None,
        *,
        session: aioboto3.Session | None = None,
    ) -> None:
        self.group, self.stream = group, stream
        self._settings = settings or AwsSettings()
        self._session = session or aioboto3.Session()
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        # (batch id, events already put): a batch split across calls and retried after a
        # failure resumes where it stopped instead of writing its first part twice.
        self._progress: tuple[int, int] = (0, 0)

    def __repr__(self) -> str:
        return f"CloudWatchSink(group={self.group!r}, stream={self.stream!r})"

    async def _ready(self) -> Any:
        if self._client is None:
            stack = AsyncExitStack()
            try:
                async with calling("CloudWatch Logs", "CreateLogStream", self._settings):
                    client = await stack.enter_async_context(
                        self._session.client(
                            "logs",
                            endpoint_url=self._settings.endpoint_url,
                            config=self._settings.botocore_config(),
                        )
                    )
                    with suppress(client.exceptions.ResourceAlreadyExistsException):
                        await client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
            except BaseException:
                await stack.aclose()
                raise
            self._stack, self._client = stack, client
        return self._client

    async def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        client = await self._ready()
        now = int(time.time() * 1000)
        batch: list[dict[str, Any]] = []
        size = 0
        done = self._progress[1] if self._progress[0] == id(events) else 0
        self._progress = (id(events), done)
        for event in events[done:]:
            try:
                message = orjson.dumps(dict(event)).decode()
            except orjson.JSONEncodeError:
                raise AuditError("audit event is not plain JSON") from None
            cost = len(message.encode()) + _OVERHEAD
            if batch and (len(batch) == _MAX_EVENTS or size + cost > _MAX_BYTES):
                await self._put(client, batch)
                done += len(batch)
                self._progress = (id(events), done)
                batch, size = [], 0
            batch.append({"timestamp": now, "message": message})
            size += cost
        if batch:
            await self._put(client, batch)
        self._progress = (0, 0)

    async def _put(self, client: Any, batch: list[dict[str, Any]]) -> None:
        async with calling("CloudWatch Logs", "PutLogEvents", self._settings):
            await client.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=batch)

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()


async def caller_identity(settings: AwsSettings, *, session: aioboto3.Session | None = None) -> str:
    """The gateway's own AWS principal (STS GetCallerIdentity), recorded in every event."""
    session = session or aioboto3.Session()
    config = settings.botocore_config()
    async with (
        calling("STS", "GetCallerIdentity", settings),
        session.client("sts", endpoint_url=settings.endpoint_url, config=config) as client,
    ):
        response = await client.get_caller_identity()
    return str(response["Arn"])
