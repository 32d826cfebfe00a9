"""The hash-chained audit file: each JSON line carries its sequence number, the previous
line's hash and an HMAC over both, so ``verify_chain`` finds the first record that was
modified, deleted, inserted or reordered. Format and guarantees: ``docs/audit.md``."""

import asyncio
import binascii
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from phi_gateway import b64url
from phi_gateway.exceptions import AuditError
from phi_gateway.secretfile import create_private_file, read_private_file

logger = logging.getLogger("phi_gateway.audit")

ZERO_HASH = "0" * 64
MIN_KEY_BYTES = 32
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_TAIL_CHUNK = 64 * 1024


def _check_key(chain_key: bytes) -> None:
    if not isinstance(chain_key, bytes) or len(chain_key) < MIN_KEY_BYTES:
        raise ValueError(f"audit chain key must be at least {MIN_KEY_BYTES} bytes.")


def _record(key: bytes, seq: int, prev: str, event: Mapping[str, Any]) -> bytes:
    """One chained line, without its newline. Raises AuditError if the event is not plain JSON."""
    event = dict(event)
    try:
        signed = orjson.dumps({"seq": seq, "prev": prev, "event": event}, option=orjson.OPT_SORT_KEYS)
        body = orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        raise AuditError("audit event is not plain JSON") from None
    mac = hmac.new(key, signed, hashlib.sha256).hexdigest()
    return b'{"seq":%d,"prev":"%s","event":%s,"mac":"%s"}' % (seq, prev.encode(), body, mac.encode())


def _authenticate(key: bytes, line: bytes) -> tuple[int, str] | str:
    """(seq, prev) of a line that is exactly what ``_record`` makes under ``key``; else why not."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not a complete record (torn or corrupted line)"
    if not isinstance(doc, dict):
        return "not a record"
    seq, prev, event = doc.get("seq"), doc.get("prev"), doc.get("event")
    if type(seq) is not int or seq < 1 or not isinstance(prev, str) or not isinstance(event, dict):
        return "not a record"
    try:
        expected = _record(key, seq, prev, event)
    except AuditError:
        return "not a record"
    # Comparing whole lines also rejects changes that keep the MAC valid (spacing, key order).
    if not hmac.compare_digest(expected, line):
        return "record does not authenticate (modified, or another chain key)"
    return seq, prev


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    records: int  # records that verified, in order, before any failure
    first_bad_seq: int | None
    torn_tail: bool
    message: str


def verify_chain(
    path: str | os.PathLike[str], chain_key: bytes, *, expected_last_seq: int | None = None
) -> ChainReport:
    """Check every record of a chained file; report the first bad sequence number.

    Deleting whole records from the end is invisible in the file alone: pass the last seq known
    from elsewhere as ``expected_last_seq`` and a file that stops short of it fails.
    """
    _check_key(chain_key)
    name = os.fspath(path)
    seq, prev, torn = 0, ZERO_HASH, False
    try:
        with open(name, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    torn = True  # only the last piece can lack a newline: a write that never finished
                    break
                line, want = raw[:-1], seq + 1
                found = _authenticate(chain_key, line)
                if isinstance(found, str):
                    reason = found
                elif found[0] != want:
                    reason = f"found seq {found[0]} (records deleted, inserted or reordered)"
                elif found[1] != prev:
                    reason = "does not chain to the record before it"
                else:
                    seq, prev = want, _line_hash(line)
                    continue
                return ChainReport(False, seq, want, False, reason)
    except OSError as exc:
        raise AuditError(f"cannot read audit file {name}: {exc.strerror}") from None
    if expected_last_seq is not None and seq < expected_last_seq:
        reason = f"file ends at seq {seq}, expected at least {expected_last_seq} (records removed?)"
        return ChainReport(False, seq, seq + 1, torn, reason)
    return ChainReport(True, seq, None, torn, f"{seq} records" + ("; torn last line ignored" if torn else ""))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _tail(fd: int, size: int) -> tuple[int, bytes | None]:
    """(offset just past the last complete line, that line without its newline)."""
    buf, pos = b"", size
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        end = buf.rfind(b"\n")
        if end >= 0 and (pos == 0 or buf.rfind(b"\n", 0, end) >= 0):
            return pos + end + 1, buf[buf.rfind(b"\n", 0, end) + 1 : end]
    return 0, None


class ChainedFileSink:
    """Appends events as hash-chained JSON lines to ``path`` (created 0600), fsync per batch.

    One process per file (an exclusive flock enforces it). Opening resumes the chain from the
    last complete line, which must authenticate under ``chain_key``; a torn last line from a crash
    is moved to ``<path>.torn`` first. Blocking I/O runs in a worker thread.
    """

    def __init__(self, path: str | os.PathLike[str], chain_key: bytes) -> None:
        _check_key(chain_key)
        self.path = os.fspath(path)
        self._key = bytes(chain_key)
        self._lock = threading.Lock()  # one writer thread at a time; close waits for a write
        self._fd: int | None = None
        self._fd, self._size, self._seq, self._prev = self._open()

    def __repr__(self) -> str:
        return f"ChainedFileSink({self.path!r}, last_seq={self._seq}, chain_key=<hidden>)"

    @property
    def last_seq(self) -> int:
        return self._seq

    def _open(self) -> tuple[int, int, int, str]:
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit file {self.path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditError(f"audit file {self.path} is in use by another process") from None
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise AuditError(f"audit file {self.path} is not a regular file")
            end, last = _tail(fd, info.st_size)
            if end < info.st_size:
                self._set_aside(fd, end, info.st_size)
            if info.st_size == 0:  # maybe just created: make its directory entry durable too
                _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            if last is None:
                return fd, end, 0, ZERO_HASH
            found = _authenticate(self._key, last)
            if isinstance(found, str):
                raise AuditError(f"last record of audit file {self.path}: {found}; run `audit verify` on it")
            return fd, end, found[0], _line_hash(last)
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"cannot open audit file {self.path}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise

    def _set_aside(self, fd: int, end: int, size: int) -> None:
        # A torn tail is a write whose fsync never returned, so it was never acknowledged. Keep
        # its bytes for forensics, but out of the chain, so the next record follows a whole line.
        fragment = os.pread(fd, size - end, end)
        side = os.open(self.path + ".torn", _OPEN_FLAGS, 0o600)
        try:
            _write_all(side, fragment + b"\n")
            os.fsync(side)
        finally:
            os.close(side)
        os.ftruncate(fd, end)
        os.fsync(fd)
        logger.warning("audit file %s ended in a torn line (%d bytes), moved to .torn", self.path, size - end)

    async def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        if events:
            await asyncio.to_thread(self._write, list(events))

    def _write(self, events: list[Mapping[str, Any]]) -> None:
        with self._lock:
            if self._fd is None:
                raise AuditError(f"audit file {self.path} is closed")
            seq, prev, lines = self._seq, self._prev, []
            for event in events:
                seq += 1
                lines.append(_record(self._key, seq, prev, event))
                prev = _line_hash(lines[-1])
            data = b"\n".join(lines) + b"\n"
            try:
                size = os.fstat(self._fd).st_size
                if size < self._size:
                    raise AuditError(f"audit file {self.path} shrank while open; not extending its chain")
                if size > self._size:
                    os.ftruncate(self._fd, self._size)  # a failed earlier try; it was never acknowledged
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError as exc:
                raise AuditError(f"cannot write audit file {self.path}: {exc.strerror}") from None
            self._size += len(data)
            self._seq, self._prev = seq, prev

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # also releases the flock
                self._fd = None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_chain_key_file(path: str | os.PathLike[str]) -> None:
    """A new random 32-byte chain key as base64url text, mode 0600; never overwrites."""
    text = b64url.encode(secrets.token_bytes(32)).encode("ascii") + b"\n"
    try:
        create_private_file(path, text, "audit chain key file")
    except OSError as exc:
        raise AuditError(str(exc)) from None


def load_chain_key(path: str | os.PathLike[str]) -> bytes:
    """Read a chain key file: base64url text (padding optional), at least 32 bytes decoded."""
    name = os.fspath(path)
    try:
        text = read_private_file(name, "audit chain key file").strip()
    except OSError as exc:
        raise AuditError(str(exc)) from None
    try:
        if not re.fullmatch(rb"[A-Za-z0-9_-]+={0,2}", text):
            raise ValueError
        key = b64url.decode(text)
    except (ValueError, binascii.Error):
        raise AuditError(f"audit chain key file {name} is not base64url text") from None
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(f"audit chain key in {name} is shorter than {MIN_KEY_BYTES} bytes")
    return key
