"""Shared fixtures: a real moto KMS server on loopback, KMS keys, local keyrings."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aioboto3
import pytest
from moto.server import ThreadedMotoServer

from phi_gateway.aws import AwsSettings
from phi_gateway.keyring import LocalKeyring, create_keyring
from phi_gateway.kms import KmsKeyProvider

REGION = "us-east-1"


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_credentials() -> Iterator[None]:
    # Credentials for the moto server only; nothing here can reach AWS.
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    }
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    os.environ.pop("AWS_SESSION_TOKEN", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """A moto server on 127.0.0.1, reached over HTTP exactly as AWS would be."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def kms_settings(moto_url: str) -> AwsSettings:
    return AwsSettings(
        region=REGION, endpoint_url=moto_url, connect_timeout=1, read_timeout=2, max_attempts=2
    )


async def _create_key(moto_url: str) -> str:
    session = aioboto3.Session(region_name=REGION)
    async with session.client("kms", endpoint_url=moto_url) as kms:
        created = await kms.create_key(Description="phi-gateway test key")
        return str(created["KeyMetadata"]["Arn"])


@pytest.fixture
async def kms_key(moto_url: str) -> str:
    return await _create_key(moto_url)


@pytest.fixture
async def other_kms_key(moto_url: str) -> str:
    return await _create_key(moto_url)


@pytest.fixture
async def kms(kms_key: str, kms_settings: AwsSettings) -> AsyncIterator[KmsKeyProvider]:
    async with KmsKeyProvider([kms_key], kms_settings) as provider:
        yield provider


@pytest.fixture
def keyring_path(tmp_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    create_keyring(path)
    return path


@pytest.fixture
def keyring(keyring_path: Path) -> LocalKeyring:
    return LocalKeyring.load(keyring_path)


@pytest.fixture(params=["keyring", "kms"])
def provider(request: pytest.FixtureRequest) -> object:
    """Each test using this runs once per real provider."""
    return request.getfixturevalue(request.param)
