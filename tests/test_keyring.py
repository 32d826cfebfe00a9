from __future__ import annotations

import os
import stat
from pathlib import Path

import orjson
import pytest

from phi_gateway.exceptions import InvalidToken, KeyringError, UnknownMasterKey
from phi_gateway.keyring import LocalKeyring, create_keyring

CONTEXT = {"ResourceId": "patient-123"}


def test_init_writes_a_private_file_with_one_current_key(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    key_id = create_keyring(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = orjson.loads(path.read_bytes())
    assert doc["current"] == key_id and key_id.startswith("local:")
    assert "Not for production" in doc["warning"]
    assert LocalKeyring.load(path).default_master_key == key_id


def test_init_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text("precious")
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        create_keyring(path)
    assert path.read_text() == "precious"
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(KeyringError):
        create_keyring(link)
    assert not (tmp_path / "nowhere").exists()


def test_load_refuses_a_file_others_can_read(keyring_path: Path) -> None:
    os.chmod(keyring_path, 0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        LocalKeyring.load(keyring_path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"format": "other", "version": 1}',
        b'{"format": "phi-gateway/local-keyring", "version": 1, "current": "local:a",'
        b' "master_keys": {"local:a": "AAAA"}}',
        b'{"format": "phi-gateway/local-keyring", "version": 2, "current": "local:a", "master_keys": {}}',
    ],
)
def test_load_refuses_malformed_files_without_quoting_them(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyringError) as failure:
        LocalKeyring.load(path)
    assert "AAAA" not in str(failure.value)


async def test_wrapped_key_opens_only_under_its_context_and_master_key(
    tmp_path: Path, keyring: LocalKeyring
) -> None:
    key = await keyring.generate_data_key(keyring.default_master_key, CONTEXT)
    assert len(key.wrapped) == 61
    with pytest.raises(InvalidToken):
        await keyring.decrypt_data_key(key.key_ref, key.wrapped, {"ResourceId": "patient-124"})
    with pytest.raises(UnknownMasterKey):
        await keyring.decrypt_data_key("local:0000000000000000", key.wrapped, CONTEXT)
    other_path = tmp_path / "other.json"
    create_keyring(other_path)
    with pytest.raises(UnknownMasterKey):
        await LocalKeyring.load(other_path).decrypt_data_key(key.key_ref, key.wrapped, CONTEXT)


async def test_rewrap_to_another_master_key_keeps_the_data_key(keyring_path: Path) -> None:
    doc = orjson.loads(keyring_path.read_bytes())
    old = doc["current"]
    doc["master_keys"]["local:feedfacefeedface"] = "B" * 43
    doc["current"] = "local:feedfacefeedface"
    keyring_path.write_bytes(orjson.dumps(doc))
    keyring = LocalKeyring.load(keyring_path)
    key = await keyring.generate_data_key(old, CONTEXT)
    new_ref, new_wrapped = await keyring.rewrap(
        key.key_ref, key.wrapped, CONTEXT, master_key=keyring.default_master_key
    )
    assert new_ref == "local:feedfacefeedface"
    moved = await keyring.decrypt_data_key(new_ref, new_wrapped, CONTEXT)
    iv, aad = bytes(12), b"aad"
    assert moved.aead.open(iv, key.aead.seal(iv, b"same key", aad), aad) == b"same key"
    with pytest.raises(InvalidToken):  # the new wrapping is bound to the new master key
        await keyring.decrypt_data_key(old, new_wrapped, CONTEXT)
