"""CloudWatch Logs sink and STS identity against moto's server over HTTP."""

from __future__ import annotations

import asyncio
import json

import aioboto3
import pytest

from phi_gateway.audit import AuditEmitter
from phi_gateway.audit_cloudwatch import CloudWatchSink, caller_identity
from phi_gateway.aws import AwsSettings
from phi_gateway.exceptions import KeyAccessError, KeyUnavailable
from tests.conftest import REGION


async def test_events_reach_cloudwatch_logs_in_order(moto_url: str, kms_settings: AwsSettings) -> None:
    session = aioboto3.Session(region_name=REGION)
    async with session.client("logs", endpoint_url=moto_url) as logs:
        await logs.create_log_group(logGroupName="phi-audit")
    emitter = AuditEmitter(CloudWatchSink("phi-audit", "gateway-1", kms_settings), batch_size=7)
    await emitter.start()
    for n in range(20):
        assert emitter.emit({"request_id": f"r-{n}", "outcome": "ok"})
    await emitter.stop()
    async with session.client("logs", endpoint_url=moto_url) as logs:
        got = await logs.get_log_events(
            logGroupName="phi-audit", logStreamName="gateway-1", startFromHead=True
        )
    assert [json.loads(e["message"])["request_id"] for e in got["events"]] == [f"r-{n}" for n in range(20)]


async def test_a_missing_log_group_is_a_write_failure_not_a_loss(
    moto_url: str, kms_settings: AwsSettings
) -> None:
    sink = CloudWatchSink("no-such-group", "s", kms_settings)
    with pytest.raises(KeyAccessError) as failure:  # translated once, at the AWS boundary
        await sink.write([{"request_id": "CANARY-r"}])
    assert "CloudWatch Logs" in str(failure.value) and "CANARY" not in str(failure.value)
    await sink.close()


async def test_caller_identity_comes_from_sts(kms_settings: AwsSettings) -> None:
    assert (await caller_identity(kms_settings)).startswith("arn:aws:")


async def test_unreachable_sts_is_key_unavailable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    settings = AwsSettings(
        region=REGION, endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=0.5, max_attempts=1
    )
    with pytest.raises(KeyUnavailable):
        await caller_identity(settings)
