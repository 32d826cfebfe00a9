"""AWS KMS provider against moto's server over real HTTP, and against misbehaving servers."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import aioboto3
import aiohttp
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from phi_gateway import envelope
from phi_gateway.aws import AwsSettings, arn_region, calling
from phi_gateway.context import Pseudonymizer
from phi_gateway.exceptions import (
    InvalidToken,
    KeyAccessDenied,
    KeyAccessError,
    KeyThrottled,
    KeyUnavailable,
    PHIGatewayError,
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


KMS_URL = "https://kms.us-east-1.amazonaws.com"
# A wrapped key, as botocore might repeat it in an error message (its messages can carry
# request parameters): no project error may show it in any form.
BLOB = b"CANARY-wrapped-data-key-\x00\xff-bytes"
BLOB_FORMS = (BLOB.hex(), base64.b64encode(BLOB).decode(), repr(BLOB), "CANARY")


def _aws_error(code: str, operation: str) -> ClientError:
    message = f"CiphertextBlob {base64.b64encode(BLOB).decode()} ({BLOB!r}) was refused"
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


# moto ignores key state (a disabled key or one pending deletion still works there) and
# cannot be made to throttle, deny or time out on demand, so the translation is tested
# here, at the boundary, with the errors botocore and aiohttp raise, built by hand.
@pytest.mark.parametrize(
    ("operation", "error", "expected"),
    [
        ("GenerateDataKey", _aws_error("ThrottlingException", "GenerateDataKey"), KeyThrottled),
        ("Decrypt", _aws_error("AccessDeniedException", "Decrypt"), KeyAccessDenied),
        ("Decrypt", _aws_error("UnrecognizedClientException", "Decrypt"), KeyAccessDenied),
        ("Decrypt", _aws_error("ExpiredTokenException", "Decrypt"), KeyAccessDenied),
        ("Decrypt", _aws_error("DisabledException", "Decrypt"), KeyUnavailable),
        ("GenerateDataKey", _aws_error("KMSInvalidStateException", "GenerateDataKey"), KeyUnavailable),
        ("Decrypt", _aws_error("KeyUnavailableException", "Decrypt"), KeyUnavailable),
        ("Decrypt", _aws_error("KMSInternalException", "Decrypt"), KeyUnavailable),
        ("DescribeKey", _aws_error("NotFoundException", "DescribeKey"), KeyAccessError),
        ("Decrypt", _aws_error("InvalidCiphertextException", "Decrypt"), InvalidToken),
        ("ReEncrypt", _aws_error("IncorrectKeyException", "ReEncrypt"), InvalidToken),
        # Not a token's fault on an operation that unwraps nothing: a configuration error.
        ("GenerateDataKey", _aws_error("InvalidCiphertextException", "GenerateDataKey"), KeyUnavailable),
        ("Decrypt", EndpointConnectionError(endpoint_url=KMS_URL), KeyUnavailable),
        ("Decrypt", ConnectTimeoutError(endpoint_url=KMS_URL), KeyUnavailable),
        ("Decrypt", ReadTimeoutError(endpoint_url=KMS_URL), KeyUnavailable),
        ("Decrypt", aiohttp.ServerDisconnectedError(), KeyUnavailable),
        ("Decrypt", TimeoutError(), KeyUnavailable),  # our own deadline
        ("Decrypt", NoCredentialsError(), KeyAccessDenied),
        ("Decrypt", PartialCredentialsError(provider="env", cred_var="AWS_SECRET_KEY"), KeyAccessDenied),
        ("Decrypt", CredentialRetrievalError(provider="sso", error_msg="expired"), KeyAccessDenied),
        ("GetSecretValue", NoRegionError(), KeyAccessError),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
async def test_aws_errors_map_once_into_the_project_tree(
    operation: str, error: BaseException, expected: type[PHIGatewayError]
) -> None:
    outcomes: list[str] = []
    settings = AwsSettings(region=REGION, observer=lambda *call: outcomes.append(call[2]))
    with pytest.raises(PHIGatewayError) as caught:
        async with calling("KMS", operation, settings):
            raise error
    mapped = caught.value
    assert type(mapped) is expected
    assert mapped.__cause__ is None and mapped.__suppress_context__  # botocore's text dropped
    shown = str(mapped) + repr(mapped)
    assert not any(form in shown for form in BLOB_FORMS)
    if expected is not InvalidToken:
        assert f"KMS {operation}" in str(mapped)  # says which call failed
    assert outcomes and outcomes[0] != "ok"


@pytest.mark.parametrize(
    ("identifier", "region"),
    [
        ("arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab", "eu-west-1"),
        ("arn:aws:kms:us-west-2:111122223333:alias/patients", "us-west-2"),
        ("arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/x", "us-gov-west-1"),
        ("arn:aws:secretsmanager:ap-south-1:111122223333:secret:phi/pepper-AbCdEf", "ap-south-1"),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", None),
        ("alias/patients", None),
        ("arn:aws:iam::111122223333:role/x", None),
    ],
)
def test_the_region_inside_an_arn(identifier: str, region: str | None) -> None:
    assert arn_region(identifier) == region


@pytest.fixture
def no_ambient_region(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No region in the environment or a profile; returns the (absent) AWS config file."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    return config


ARN_WEST_2 = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_region_order_setting_then_arn_then_environment_then_profile(
    no_ambient_region: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def region(settings: AwsSettings, key: str = "alias/patients") -> str | None:
        return settings.resolve(aioboto3.Session(), key).region  # a fresh lookup each time

    with pytest.raises(KeyAccessError, match="no AWS region"):  # as `aws kms` refuses to guess
        region(AwsSettings())
    no_ambient_region.write_text("[default]\nregion = ap-south-1\n")
    assert region(AwsSettings()) == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert region(AwsSettings()) == "eu-central-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert region(AwsSettings()) == "eu-west-1"
    # Clients built from unresolved settings (Secrets Manager, CloudWatch Logs) see it too.
    assert AwsSettings().botocore_config().region_name == "eu-west-1"
    assert region(AwsSettings(), ARN_WEST_2) == "us-west-2"
    assert region(AwsSettings(region="ca-central-1"), ARN_WEST_2) == "ca-central-1"


async def test_fips_endpoint_follows_the_resolved_region(
    no_ambient_region: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = aioboto3.Session()  # no region of its own: only the settings carry one
    fips = AwsSettings(use_fips_endpoint=True)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for key, host in ((ARN_WEST_2, "kms-fips.us-west-2"), ("alias/patients", "kms-fips.eu-west-1")):
        async with session.client("kms", config=fips.resolve(session, key).botocore_config()) as client:
            assert client.meta.endpoint_url == f"https://{host}.amazonaws.com"


async def test_the_key_arn_region_beats_the_environment_against_moto(
    no_ambient_region: Path, monkeypatch: pytest.MonkeyPatch, kms_key: str, moto_url: str
) -> None:
    # moto keeps keys per region: the key made in us-east-1 opens only if the client went there.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    async with KmsKeyProvider([kms_key], AwsSettings(endpoint_url=moto_url, max_attempts=1)) as kms:
        assert kms.region == REGION == arn_region(kms_key)
        key = await kms.generate_data_key(kms_key, CONTEXT)
        assert (await kms.decrypt_data_key(kms_key, key.wrapped, CONTEXT)).key_ref == kms_key


def test_a_provider_refuses_a_missing_or_contradictory_region(no_ambient_region: Path) -> None:
    with pytest.raises(KeyAccessError, match="no AWS region"):
        KmsKeyProvider(["alias/patients"])
    with pytest.raises(KeyAccessError, match="not in this provider's region eu-west-1"):
        KmsKeyProvider([ARN_WEST_2], AwsSettings(region="eu-west-1"))
    with pytest.raises(KeyAccessError, match="not in this provider's region us-west-2"):
        KmsKeyProvider([ARN_WEST_2, ARN_WEST_2.replace("us-west-2", "us-east-1")])
    assert KmsKeyProvider([ARN_WEST_2, "alias/older"]).region == "us-west-2"
