"""A local keyring file: master keys kept on disk, for development and the demo only.

The file holds its master keys in the clear (base64url), so anyone who can read it can
decrypt everything. It exists so the product runs with no cloud account; production
uses ``kms.KmsKeyProvider``. The format is in ``docs/keyring.md``; rotation (a new current
key, the old ones kept for decrypting) in ``docs/rotation.md``.
"""

from __future__ import annotations

import os
import secrets

import orjson

from phi_gateway import b64url
from phi_gateway.aead import IV_BYTES, KEY_BYTES, Aead
from phi_gateway.context import Context, encode_context
from phi_gateway.exceptions import InvalidToken, KeyringError, UnknownMasterKey
from phi_gateway.keys import DataKey
from phi_gateway.secretfile import create_private_file, read_private_file

FORMAT = "phi-gateway/local-keyring"
WARNING = "Development keyring: master keys are stored here in the clear. Not for production."
_WRAP_VERSION = b"\x01"
_WRAP_LABEL = b"phi-gateway/keyring/wrap/v1"


def new_master_key_id() -> str:
    return "local:" + secrets.token_hex(8)


def _document(keys: dict[str, bytes], current: str) -> bytes:
    document = {
        "format": FORMAT,
        "version": 1,
        "warning": WARNING,
        "current": current,
        "master_keys": {key_id: b64url.encode(key) for key_id, key in keys.items()},
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, bytes], str]:
    """A keyring file's master keys (in file order) and current key id."""
    name = os.fspath(path)
    try:
        raw = read_private_file(name, "keyring")
    except OSError as exc:
        raise KeyringError(str(exc)) from None
    try:
        doc = orjson.loads(raw)
        if doc.get("format") != FORMAT or doc.get("version") != 1:
            raise ValueError
        keys = {str(k): b64url.decode(v) for k, v in doc["master_keys"].items()}
        current = str(doc["current"])
        if any(not k.startswith("local:") or len(v) != KEY_BYTES for k, v in keys.items()):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError):
        raise KeyringError(f"keyring {name} is not a valid phi-gateway keyring") from None
    return keys, current


def create_keyring(path: str | os.PathLike[str]) -> str:
    """Write a new keyring with one master key at ``path`` (mode 0600); return the key id.

    Refuses to overwrite anything, including a dangling symlink.
    """
    key_id = new_master_key_id()
    try:
        create_private_file(path, _document({key_id: secrets.token_bytes(KEY_BYTES)}, key_id), "keyring")
    except OSError as exc:
        raise KeyringError(str(exc)) from None
    return key_id


def rotate_keyring(path: str | os.PathLike[str]) -> str:
    """Add a new master key to the keyring at ``path`` and make it current; return its id.

    Older keys stay, so tokens wrapped under them still decrypt until ``phi-gateway rewrap``
    moves them. The file is replaced whole (a new 0600 file renamed over it), never edited
    in place, so a crash leaves the old keyring or the new one. Not safe against two
    rotations of one file at the same moment: the last rename wins.
    """
    name = os.fspath(path)
    keys, current = _read(name)
    if current not in keys:
        raise KeyringError(f"keyring {name} is not a valid phi-gateway keyring")
    key_id = new_master_key_id()
    while key_id in keys:  # 64 random bits make a clash theoretical, but one would drop an old key
        key_id = new_master_key_id()
    keys[key_id] = secrets.token_bytes(KEY_BYTES)
    directory, base = os.path.split(os.path.abspath(name))
    temporary = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    try:
        create_private_file(temporary, _document(keys, key_id), "keyring")
        try:
            os.replace(temporary, name)
        except OSError as exc:
            os.unlink(temporary)
            raise OSError(f"cannot replace keyring {name}: {exc.strerror}") from None
        _sync_directory(directory)
    except OSError as exc:
        raise KeyringError(str(exc)) from None
    return key_id


def _sync_directory(directory: str) -> None:
    """Make the rename durable: a crash after it must not bring the old file back."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalKeyring:
    """``KeyProvider`` over a keyring file. Data keys are wrapped with AES-256-GCM.

    Wrapped form: ``0x01 ‖ IV (12) ‖ AES-GCM(master, data key) ‖ tag (16)`` = 61 bytes, with
    the label, the master key id and the canonical context as associated data, so, as with
    KMS, a wrapped key opens only under the context it was made for.
    """

    def __init__(self, master_keys: dict[str, bytes], current: str) -> None:
        if current not in master_keys:
            raise KeyringError("keyring's current key is not among its keys")
        self._aeads = {kid: Aead(key) for kid, key in master_keys.items()}
        self._current = current

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        return cls(*_read(path))

    def __repr__(self) -> str:
        return f"LocalKeyring(master_keys={sorted(self._aeads)!r}, current={self._current!r})"

    @property
    def default_master_key(self) -> str:
        return self._current

    def _aead(self, key_ref: str) -> Aead:
        try:
            return self._aeads[key_ref]
        except KeyError:
            raise UnknownMasterKey("master key is not in this keyring") from None

    @staticmethod
    def _aad(key_ref: str, context: Context) -> bytes:
        return _WRAP_LABEL + encode_context({"master_key": key_ref}) + encode_context(context)

    def _wrap(self, key_ref: str, plaintext: bytearray, context: Context) -> bytes:
        iv = secrets.token_bytes(IV_BYTES)
        # The caller's bytearray goes in as is (no immutable copy), and its caller zeroes it.
        sealed = self._aead(key_ref).seal(iv, plaintext, self._aad(key_ref, context))
        return _WRAP_VERSION + iv + sealed

    def _unwrap(self, key_ref: str, wrapped: bytes, context: Context) -> bytearray:
        aead = self._aead(key_ref)
        if wrapped[:1] != _WRAP_VERSION:
            raise InvalidToken()
        iv, sealed = wrapped[1 : 1 + IV_BYTES], wrapped[1 + IV_BYTES :]
        # AESGCM.decrypt returns immutable bytes, dropped at once (decrypt_into, which would
        # write into our bytearray, is newer than the cryptography versions we support).
        return bytearray(aead.open(iv, sealed, self._aad(key_ref, context)))

    async def generate_data_key(self, master_key: str, context: Context) -> DataKey:
        # token_bytes' immutable result is dropped at once; DataKey zeroes the bytearray.
        plaintext = bytearray(secrets.token_bytes(KEY_BYTES))
        wrapped = self._wrap(master_key, plaintext, context)
        return DataKey(master_key, wrapped, plaintext)

    async def decrypt_data_key(self, key_ref: str, wrapped: bytes, context: Context) -> DataKey:
        return DataKey(key_ref, wrapped, self._unwrap(key_ref, wrapped, context))

    async def rewrap(
        self,
        key_ref: str,
        wrapped: bytes,
        context: Context,
        *,
        master_key: str,
        new_context: Context | None = None,
    ) -> tuple[str, bytes]:
        plaintext = self._unwrap(key_ref, wrapped, context)
        try:
            target = context if new_context is None else new_context
            return master_key, self._wrap(master_key, plaintext, target)
        finally:
            plaintext[:] = bytes(len(plaintext))
