from __future__ import annotations

import base64
import hashlib
import os
import socket
import stat
import traceback
import uuid
from pathlib import Path

import aioboto3
import orjson
import pytest

from phi_gateway.aws import AwsSettings
from phi_gateway.blindindex import BlindIndex
from phi_gateway.exceptions import KeyAccessError, KeyUnavailable, PepperError
from phi_gateway.pepper import Pepper, create_pepper_file, new_pepper_document

REGION = "us-east-1"
SECRET_V1 = hashlib.sha256(b"test pepper version 1").digest()
SECRET_V2 = hashlib.sha256(b"test pepper version 2").digest()
CANARY = b"CANARY-pepper-secret-do-not-leak!"
SHORT_CANARY = b"CANARY-short-pepper"
SSN_INDEX = BlindIndex(policy="patients", name="ssn_bidx", normalize=("digits",), bits=128)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _doc(peppers: dict[str, str], current: str = "1", fmt: str = "phi-gateway/pepper") -> bytes:
    return orjson.dumps({"format": fmt, "current": current, "peppers": peppers})


def _leaks(exc: BaseException, secret: bytes) -> bool:
    shown = str(exc) + repr(exc) + "".join(traceback.format_exception(exc))
    return any(form in shown for form in (secret.decode(), _b64(secret), secret.hex()))


@pytest.fixture
def pepper_path(tmp_path: Path) -> Path:
    path = tmp_path / "pepper.json"
    create_pepper_file(path)
    return path


@pytest.fixture
def rotated() -> Pepper:
    return Pepper({1: SECRET_V1, 2: SECRET_V2}, current=2)


def test_create_writes_a_private_file_that_loads(pepper_path: Path) -> None:
    assert stat.S_IMODE(pepper_path.stat().st_mode) == 0o600
    pepper = Pepper.load(pepper_path)
    assert pepper.versions == [1] and pepper.current == 1
    same = Pepper.from_json(pepper_path.read_bytes(), "copy")
    assert SSN_INDEX.compute(pepper, ["123-45-6789"]) == SSN_INDEX.compute(same, ["123-45-6789"])


def test_each_new_pepper_is_different(tmp_path: Path) -> None:
    create_pepper_file(tmp_path / "a.json")
    create_pepper_file(tmp_path / "b.json")
    a = Pepper.load(tmp_path / "a.json")
    b = Pepper.load(tmp_path / "b.json")
    assert a.derive("blind-index/patients/ssn_bidx") != b.derive("blind-index/patients/ssn_bidx")
    assert new_pepper_document() != new_pepper_document()


def test_create_never_overwrites(tmp_path: Path, pepper_path: Path) -> None:
    before = pepper_path.read_bytes()
    with pytest.raises(PepperError, match="refusing to overwrite"):
        create_pepper_file(pepper_path)
    assert pepper_path.read_bytes() == before
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(PepperError):
        create_pepper_file(link)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_load_refuses_a_file_others_can_read(pepper_path: Path, mode: int) -> None:
    os.chmod(pepper_path, mode)
    with pytest.raises(PepperError, match="chmod 600"):
        Pepper.load(pepper_path)


def test_load_of_a_missing_file_is_a_pepper_error(tmp_path: Path) -> None:
    with pytest.raises(PepperError, match=r"missing\.json"):
        Pepper.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("content", "secret"),
    [
        pytest.param(_doc({"1": _b64(CANARY)})[:-3], CANARY, id="truncated-json"),
        pytest.param(b"not json " + CANARY, CANARY, id="not-json"),
        pytest.param(_doc({"1": _b64(CANARY)}, fmt="phi-gateway/local-keyring"), CANARY, id="wrong-format"),
        pytest.param(orjson.dumps({"current": "1", "peppers": {"1": _b64(CANARY)}}), CANARY, id="no-format"),
        pytest.param(_doc({"1": _b64(SHORT_CANARY)}), SHORT_CANARY, id="short-secret"),
        pytest.param(
            _doc({"1": _b64(CANARY), "2": _b64(SHORT_CANARY)}, current="1"), SHORT_CANARY, id="short-old"
        ),
        pytest.param(_doc({"1": _b64(CANARY)}, current="2"), CANARY, id="current-not-a-version"),
        pytest.param(
            orjson.dumps({"format": "phi-gateway/pepper", "peppers": {"1": _b64(CANARY)}}),
            CANARY,
            id="current-missing",
        ),
        pytest.param(_doc({"one": _b64(CANARY)}, current="one"), CANARY, id="non-numeric-version"),
        pytest.param(
            orjson.dumps({"format": "phi-gateway/pepper", "current": "1", "peppers": [_b64(CANARY)]}),
            CANARY,
            id="peppers-not-a-mapping",
        ),
        pytest.param(b"[]", CANARY, id="not-an-object"),
    ],
)
def test_malformed_peppers_are_refused_without_quoting_the_secret(
    tmp_path: Path, content: bytes, secret: bytes
) -> None:
    path = tmp_path / "pepper.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(PepperError) as from_file:
        Pepper.load(path)
    assert not _leaks(from_file.value, secret)
    with pytest.raises(PepperError) as from_text:
        Pepper.from_json(content, "secret test/pepper")
    assert not _leaks(from_text.value, secret)


def test_constructor_checks_versions_without_quoting_them() -> None:
    with pytest.raises(PepperError) as short:
        Pepper({1: SHORT_CANARY}, current=1)
    assert not _leaks(short.value, SHORT_CANARY)
    with pytest.raises(PepperError) as absent:
        Pepper({1: CANARY}, current=2)
    assert not _leaks(absent.value, CANARY)


def test_derive_is_deterministic_and_32_bytes(rotated: Pepper) -> None:
    again = Pepper({1: SECRET_V1, 2: SECRET_V2}, current=2)
    key = rotated.derive("blind-index/patients/ssn_bidx")
    assert len(key) == 32
    assert key == rotated.derive("blind-index/patients/ssn_bidx", 2)
    assert key == again.derive("blind-index/patients/ssn_bidx", 2)


def test_derive_separates_purposes_and_versions(rotated: Pepper) -> None:
    keys = {
        rotated.derive("blind-index/patients/ssn_bidx", 1),
        rotated.derive("blind-index/patients/ssn_bidx", 2),
        rotated.derive("blind-index/patients/mrn_bidx", 2),
        rotated.derive("blind-index/claims/ssn_bidx", 2),
        rotated.derive("context-pseudonym/patients", 2),
    }
    assert len(keys) == 5
    assert SECRET_V1 not in keys and SECRET_V2 not in keys


def test_derive_refuses_an_unknown_version(rotated: Pepper) -> None:
    with pytest.raises(PepperError, match="unknown pepper version"):
        rotated.derive("blind-index/patients/ssn_bidx", 3)


def test_repr_hides_the_secrets() -> None:
    pepper = Pepper({7: CANARY}, current=7)
    for shown in (repr(pepper), str(pepper), f"{pepper!r} {pepper}"):
        assert "CANARY" not in shown
        assert _b64(CANARY) not in shown and CANARY.hex() not in shown
        assert base64.b64encode(CANARY).decode() not in shown
    assert "7" in repr(pepper)


def test_pseudonymizer_is_per_policy_and_stable(rotated: Pepper) -> None:
    again = Pepper({1: SECRET_V1, 2: SECRET_V2}, current=2)
    patients = rotated.pseudonymizer("patients").pseudonym("PatientId", "patient-123")
    assert patients != rotated.pseudonymizer("claims").pseudonym("PatientId", "patient-123")
    assert patients == rotated.pseudonymizer("patients").pseudonym("PatientId", "patient-123")
    assert patients == again.pseudonymizer("patients").pseudonym("PatientId", "patient-123")
    assert "patient-123" not in patients


def test_pseudonym_under_a_pepper_is_the_documented_derivation() -> None:
    # docs/pepper.md: HKDF-SHA256(pepper, salt "phi-gateway/pepper/v1", info
    # "context-pseudonym/POLICY") keys the pseudonym HMAC. Literals computed once with OpenSSL:
    #   openssl kdf -keylen 32 -kdfopt digest:SHA256 -kdfopt hexkey:<SECRET_V1 hex>
    #     -kdfopt salt:phi-gateway/pepper/v1 -kdfopt info:context-pseudonym/patients HKDF
    #   printf '\x00\x01\x00\x09PatientId\x00\x0bpatient-123' |
    #     openssl dgst -sha256 -mac HMAC -macopt hexkey:<derived> -binary | head -c 18 | base64 | tr '+/' '-_'
    pepper = Pepper({1: SECRET_V1}, current=1)
    derived = "d57bb9aac275d35929dca0bed3a9e1f75ed8f8b34fd4c6ebf1aeb109c7fcacf3"
    assert pepper.derive("context-pseudonym/patients").hex() == derived
    pseudonym = pepper.pseudonymizer("patients").pseudonym("PatientId", "patient-123")
    assert pseudonym == "p1.x_89slOpTpd-3ZFJS0BDaHv7"


async def _put_secret(moto_url: str, value: str | bytes) -> str:
    secret_id = f"phi-gateway/pepper/{uuid.uuid4()}"
    session = aioboto3.Session(region_name=REGION)
    async with session.client("secretsmanager", endpoint_url=moto_url) as client:
        if isinstance(value, bytes):
            await client.create_secret(Name=secret_id, SecretBinary=value)
        else:
            await client.create_secret(Name=secret_id, SecretString=value)
    return secret_id


async def test_secrets_manager_pepper_indexes_like_the_same_file(
    moto_url: str, kms_settings: AwsSettings, pepper_path: Path
) -> None:
    secret_id = await _put_secret(moto_url, pepper_path.read_text())
    from_secret = await Pepper.from_secrets_manager(secret_id, kms_settings)
    from_file = Pepper.load(pepper_path)
    assert from_secret.versions == from_file.versions == [1]
    assert SSN_INDEX.compute(from_secret, ["123-45-6789"]) == SSN_INDEX.compute(from_file, ["123456789"])


async def test_secrets_manager_rotation_keeps_old_versions(moto_url: str, kms_settings: AwsSettings) -> None:
    document = _doc({"1": _b64(SECRET_V1), "2": _b64(SECRET_V2)}, current="2").decode()
    secret_id = await _put_secret(moto_url, document)
    pepper = await Pepper.from_secrets_manager(secret_id, kms_settings)
    old = Pepper({1: SECRET_V1}, current=1)
    assert pepper.current == 2
    assert SSN_INDEX.compute(pepper, ["123456789"], version=1) == SSN_INDEX.compute(old, ["123456789"])


async def test_secrets_manager_missing_secret_is_a_key_access_error(kms_settings: AwsSettings) -> None:
    with pytest.raises(KeyAccessError, match="ResourceNotFoundException") as caught:
        await Pepper.from_secrets_manager(f"phi-gateway/absent/{uuid.uuid4()}", kms_settings)
    assert type(caught.value) is KeyAccessError


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(_doc({"1": _b64(SHORT_CANARY)}).decode(), id="short-secret"),
        pytest.param(_doc({"1": _b64(CANARY)}, fmt="other").decode(), id="wrong-format"),
        pytest.param(_doc({"1": _b64(CANARY)}), id="secret-binary"),
    ],
)
async def test_secrets_manager_malformed_secret_is_a_pepper_error(
    moto_url: str, kms_settings: AwsSettings, stored: str | bytes
) -> None:
    secret_id = await _put_secret(moto_url, stored)
    with pytest.raises(PepperError) as caught:
        await Pepper.from_secrets_manager(secret_id, kms_settings)
    assert not _leaks(caught.value, CANARY) and not _leaks(caught.value, SHORT_CANARY)


async def test_secrets_manager_unreachable_is_key_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = AwsSettings(
        region=REGION,
        endpoint_url=f"http://127.0.0.1:{port}",
        connect_timeout=0.5,
        read_timeout=0.5,
        max_attempts=1,
    )
    with pytest.raises(KeyUnavailable, match="unreachable"):
        await Pepper.from_secrets_manager("phi-gateway/pepper", settings)
