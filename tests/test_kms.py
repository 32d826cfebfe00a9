"""AWS KMS provider against moto's server over real HTTP, and against misbehaving servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aioboto3
import pytest

from phi_gateway import envelope
from phi_gateway.aws import AwsSettings
from phi_gateway.context import Pseudonymizer
from phi_gateway.exceptions import (
    InvalidToken,
    KeyAccessDenied,
    KeyThrottled,
    KeyUnavailable,
    UnknownMasterKey,
)
from phi_gateway.kms import KmsKeyProvider
from tests.conftest import REGION

CONTEXT = {"ResourceId": "patient-123", "Purpose": "PHI_Storage"}


async def test_generate_and_decrypt_a_data_key(kms: KmsKeyProvider, kms_key: str) -> None:
    key = await kms.generate_data_key(kms_key, CONTEXT)
    assert key.key_ref == kms_key  # the ARN, whatever form was configured
    again = await kms.decrypt_data_key(key.key_ref, key.wrapped, CONTEXT)
    token = envelope.parse(envelope.encrypt(key, "v", context=CONTEXT, field="$.f"))
    assert envelope.decrypt(again, token, context=CONTEXT, field="$.f") == "v"


async def test_wrapped_key_is_bound_to_the_kms_context(kms: KmsKeyProvider, kms_key: str) -> None:
    key = await kms.generate_data_key(kms_key, CONTEXT)
    with pytest.raises(InvalidToken) as failure:
        await kms.decrypt_data_key(key.key_ref, key.wrapped, {**CONTEXT, "ResourceId": "patient-124"})
    # Opaque all the way down: no chained KMS error says which check failed.
    assert failure.value.__cause__ is None and failure.value.__suppress_context__


async def test_oversized_wrapped_key_is_refused_before_any_kms_call(
    kms: KmsKeyProvider, kms_key: str
) -> None:
    with pytest.raises(InvalidToken):
        await kms.decrypt_data_key(kms_key, b"x" * 6145, CONTEXT)


async def test_context_values_must_be_strings_and_are_never_echoed(kms: KmsKeyProvider, kms_key: str) -> None:
    with pytest.raises(TypeError) as failure:
        await kms.generate_data_key(kms_key, {"ResourceId": 987654321})  # type: ignore[dict-item]
    assert "987654321" not in str(failure.value)


async def test_alias_is_resolved_and_tokens_carry_the_arn(
    moto_url: str, kms_key: str, kms_settings: AwsSettings
) -> None:
    session = aioboto3.Session(region_name=REGION)
    async with session.client("kms", endpoint_url=moto_url) as client:
        alias = f"alias/phi-test-{kms_key[-12:]}"
        await client.create_alias(AliasName=alias, TargetKeyId=kms_key)
    async with KmsKeyProvider([alias], kms_settings) as kms:
        key = await kms.generate_data_key(alias, CONTEXT)
        assert key.key_ref == kms_key
        assert (await kms.decrypt_data_key(kms_key, key.wrapped, CONTEXT)).key_ref == kms_key


async def test_a_token_cannot_name_a_key_outside_the_configured_set(
    kms: KmsKeyProvider, kms_key: str, other_kms_key: str, kms_settings: AwsSettings
) -> None:
    async with KmsKeyProvider([other_kms_key], kms_settings) as stranger:
        foreign = await stranger.generate_data_key(other_kms_key, CONTEXT)
    with pytest.raises(UnknownMasterKey):
        await kms.decrypt_data_key(foreign.key_ref, foreign.wrapped, CONTEXT)
    with pytest.raises(UnknownMasterKey):
        await kms.generate_data_key(other_kms_key, CONTEXT)


async def test_decrypt_pins_the_key_id_named_in_the_token(
    kms_key: str, other_kms_key: str, kms_settings: AwsSettings
) -> None:
    async with KmsKeyProvider([kms_key, other_kms_key], kms_settings) as kms:
        key = await kms.generate_data_key(kms_key, CONTEXT)
        # KeyAccessDenied is KMS (moto) refusing the pinned KeyId; without the pin, moto would
        # decrypt and our response check would raise a plain KeyAccessError instead.
        with pytest.raises(KeyAccessDenied):
            await kms.decrypt_data_key(other_kms_key, key.wrapped, CONTEXT)


async def test_rewrap_moves_a_data_key_to_the_new_master_key_without_touching_data(
    kms_key: str, other_kms_key: str, kms_settings: AwsSettings
) -> None:
    async with KmsKeyProvider([other_kms_key, kms_key], kms_settings) as kms:
        old = await kms.generate_data_key(kms_key, CONTEXT)
        token = envelope.parse(envelope.encrypt(old, {"ssn": "123"}, context=CONTEXT, field="$"))
        new_ref, new_wrapped = await kms.rewrap(
            old.key_ref, old.wrapped, CONTEXT, master_key=kms.default_master_key
        )
        assert new_ref == other_kms_key and new_wrapped != old.wrapped
        moved = token.with_key(new_ref, new_wrapped)
        assert moved.sealed == token.sealed
        key = await kms.decrypt_data_key(moved.key_ref, moved.wrapped_key, CONTEXT)
        assert envelope.decrypt(key, moved, context=CONTEXT, field="$") == {"ssn": "123"}


async def test_pseudonymized_context_is_what_kms_sees(
    kms: KmsKeyProvider, kms_key: str, moto_url: str
) -> None:
    pseudonyms = Pseudonymizer(b"k" * 32)
    kms_context = pseudonyms.kms_context(CONTEXT, ["ResourceId"])
    assert kms_context["ResourceId"] != "patient-123" and kms_context["Purpose"] == "PHI_Storage"
    key = await kms.generate_data_key(kms_key, kms_context)
    session = aioboto3.Session(region_name=REGION)
    async with session.client("kms", endpoint_url=moto_url) as client:
        await client.decrypt(CiphertextBlob=key.wrapped, KeyId=kms_key, EncryptionContext=kms_context)
        with pytest.raises(client.exceptions.InvalidCiphertextException):
            await client.decrypt(CiphertextBlob=key.wrapped, KeyId=kms_key, EncryptionContext=CONTEXT)
    # The exact patient id still binds the field through the associated data.
    token = envelope.parse(envelope.encrypt(key, "v", context=CONTEXT, field="$.f"))
    with pytest.raises(InvalidToken):
        envelope.decrypt(key, token, context={**CONTEXT, "ResourceId": "patient-124"}, field="$.f")


async def test_fips_switch_selects_the_fips_endpoint() -> None:
    session = aioboto3.Session(region_name="us-west-2")
    for fips, host in ((True, "kms-fips.us-west-2.amazonaws.com"), (False, "kms.us-west-2.amazonaws.com")):
        settings = AwsSettings(region="us-west-2", use_fips_endpoint=fips)
        async with session.client("kms", config=settings.botocore_config()) as client:
            assert client.meta.endpoint_url == f"https://{host}"


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="timeouts"):
        AwsSettings(read_timeout=0)
    with pytest.raises(ValueError, match="FIPS endpoint URL"):
        AwsSettings(use_fips_endpoint=True, endpoint_url="https://kms.us-west-2.amazonaws.com")
    AwsSettings(use_fips_endpoint=True, endpoint_url="https://kms-fips.us-west-2.amazonaws.com")
    with pytest.raises(ValueError, match="max_attempts"):
        AwsSettings(max_attempts=0)
    with pytest.raises(ValueError, match="master key"):
        KmsKeyProvider([])


async def test_unreachable_kms_is_key_unavailable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # the port is now closed: connections are refused
    settings = AwsSettings(endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=0.5, max_attempts=1)
    with pytest.raises(KeyUnavailable) as failure:
        await KmsKeyProvider(["arn:aws:kms:us-east-1:111122223333:key/x"], settings).start()
    assert "DescribeKey" in str(failure.value)


async def _serve(handler: object) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_silent_kms_times_out_as_key_unavailable() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async for url in _serve(hang):
        settings = AwsSettings(endpoint_url=url, read_timeout=0.3, connect_timeout=0.3, max_attempts=1)
        with pytest.raises(KeyUnavailable):
            # Our 0.3 s read timeout must fire long before botocore's 60 s default would.
            await asyncio.wait_for(
                KmsKeyProvider(["arn:aws:kms:us-east-1:111122223333:key/x"], settings).start(), 30
            )


async def test_throttling_is_retried_a_bounded_number_of_times() -> None:
    requests = 0

    async def throttle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            requests += 1
            body = b'{"__type":"ThrottlingException","message":"Rate exceeded"}'
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()

    async for url in _serve(throttle):
        settings = AwsSettings(endpoint_url=url, max_attempts=3, read_timeout=2)
        with pytest.raises(KeyThrottled):
            await KmsKeyProvider(["arn:aws:kms:us-east-1:111122223333:key/x"], settings).start()
    assert requests == 3
