"""The audit trail's storage: the chained file and its verifier, the emitter, and ``audit`` CLI.

Real files under tmp_path; failures come from a sink told to fail or from a failing fsync/write.
Every test that logs runs with caplog at DEBUG, and canary values must never reach a log line.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import hmac
import logging
import os
import re
import stat
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from phi_gateway.audit import MAX_EVENT_BYTES, AuditEmitter, StdoutSink
from phi_gateway.audit_chain import ChainedFileSink, create_chain_key_file, load_chain_key, verify_chain
from phi_gateway.audit_event import MAIN_RECORDS, PART_BYTES, PART_RECORDS, request_events
from phi_gateway.cli_audit import audit
from phi_gateway.exceptions import AuditError, PHIGatewayError
from phi_gateway.transform import Report

KEY = hashlib.sha256(b"phi-gateway audit test chain key").digest()
OTHER_KEY = hashlib.sha256(b"some other chain key").digest()
CANARY = "CANARY-078-05-1120-do-not-log"
ZERO = "0" * 64


def event(n: int, **extra: Any) -> dict[str, Any]:
    return {"n": n, "action": "read", "principal": "dr-who", "patient": f"p{n}", **extra}


def doc_line(key: bytes, seq: int, prev: str, ev: Mapping[str, Any]) -> bytes:
    """A record built from docs/audit.md alone, to pin the format byte for byte."""
    signed = orjson.dumps({"seq": seq, "prev": prev, "event": ev}, option=orjson.OPT_SORT_KEYS)
    mac = hmac.new(key, signed, hashlib.sha256).hexdigest()
    body = orjson.dumps(ev, option=orjson.OPT_SORT_KEYS)
    return b'{"seq":%d,"prev":"%s","event":%s,"mac":"%s"}' % (seq, prev.encode(), body, mac.encode())


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def put_lines(path: Path, lines: Sequence[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


async def write_chain(path: Path, count: int, key: bytes = KEY, first: int = 1) -> None:
    sink = ChainedFileSink(path, key)
    try:
        for n in range(first, first + count):
            await sink.write([event(n)])
    finally:
        await sink.close()


@pytest.fixture
async def chain(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    await write_chain(path, 5)
    return path


def no_canary(caplog: pytest.LogCaptureFixture) -> None:
    assert CANARY not in caplog.text
    for record in caplog.records:
        assert CANARY not in record.getMessage()


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds; counts loop turns, never wall-clock time."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


# The chained file and its format


async def test_round_trip_matches_the_documented_format(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = ChainedFileSink(path, KEY)
    events = [event(1, z="last", a="first"), event(2, nested={"b": [1, 2.5, None], "a": True})]
    await sink.write(events)
    await sink.write([event(3, text="café ☂ \n\u2028")])
    await sink.close()
    events.append(event(3, text="café ☂ \n\u2028"))

    prev, expected = ZERO, []
    for seq, ev in enumerate(events, start=1):
        expected.append(doc_line(KEY, seq, prev, ev))
        prev = hashlib.sha256(expected[-1]).hexdigest()
    assert lines_of(path) == expected
    assert orjson.loads(expected[0])["prev"] == ZERO
    report = verify_chain(path, KEY)
    assert (report.ok, report.records, report.first_bad_seq, report.torn_tail) == (True, 3, None, False)
    assert report.message == "3 records"


async def test_file_is_created_0600_and_the_key_is_hidden(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = ChainedFileSink(path, KEY)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        shown = repr(sink) + str(sink)
        assert KEY.hex() not in shown and repr(KEY) not in shown
        assert base64.urlsafe_b64encode(KEY).decode().rstrip("=") not in shown
    finally:
        await sink.close()


def test_short_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        ChainedFileSink(tmp_path / "a.jsonl", b"k" * 31)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        verify_chain(tmp_path / "a.jsonl", b"k" * 31)


async def test_resume_across_restarts_keeps_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_chain(path, 3)
    sink = ChainedFileSink(path, KEY)
    assert sink.last_seq == 3
    await sink.write([event(4), event(5)])
    await sink.close()
    report = verify_chain(path, KEY)
    assert report.ok and report.records == 5
    assert [orjson.loads(line)["event"]["n"] for line in lines_of(path)] == [1, 2, 3, 4, 5]


async def test_a_second_writer_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = ChainedFileSink(path, KEY)
    try:
        with pytest.raises(AuditError, match="in use by another process"):
            ChainedFileSink(path, KEY)
    finally:
        await first.close()
    await ChainedFileSink(path, KEY).close()  # free again once closed


async def test_opening_with_another_key_is_refused(chain: Path) -> None:
    before = chain.read_bytes()
    with pytest.raises(AuditError, match="does not authenticate"):
        ChainedFileSink(chain, OTHER_KEY)
    assert chain.read_bytes() == before


async def test_write_after_close_fails(tmp_path: Path) -> None:
    sink = ChainedFileSink(tmp_path / "audit.jsonl", KEY)
    await sink.close()
    await sink.close()
    with pytest.raises(AuditError, match="closed"):
        await sink.write([event(1)])


def _modified(lines: list[bytes]) -> list[bytes]:
    doc = orjson.loads(lines[2])
    doc["event"]["principal"] = "mallory"
    lines[2] = orjson.dumps(doc)
    return lines


def _respaced_last(lines: list[bytes]) -> list[bytes]:
    lines[4] = lines[4].replace(b'"seq":5,', b'"seq": 5,')  # same JSON, same MAC input
    return lines


def _forged_insert(lines: list[bytes]) -> list[bytes]:
    prev = hashlib.sha256(lines[2]).hexdigest()
    return [*lines[:3], doc_line(OTHER_KEY, 4, prev, event(99)), *lines[3:]]


def _swapped(lines: list[bytes]) -> list[bytes]:
    lines[2], lines[3] = lines[3], lines[2]
    return lines


@pytest.mark.parametrize(
    ("tamper", "bad_seq", "reason"),
    [
        (_modified, 3, "does not authenticate"),
        (_respaced_last, 5, "does not authenticate"),
        (lambda lines: lines[:2] + lines[3:], 3, "found seq 4"),
        (_forged_insert, 4, "does not authenticate"),
        (lambda lines: [*lines[:3], lines[1], *lines[3:]], 4, "found seq 2"),
        (_swapped, 3, "found seq 4"),
        (lambda lines: [*lines[:2], b'{"seq":3,"prev":"', *lines[2:]], 3, "torn or corrupted"),
        (lambda lines: [*lines[:2], b"", *lines[2:]], 3, "torn or corrupted"),
    ],
    ids=["modified", "respaced", "deleted", "forged-insert", "replayed", "swapped", "torn-middle", "blank"],
)
async def test_tampering_is_caught_at_the_first_bad_seq(
    chain: Path, tamper: Callable[[list[bytes]], list[bytes]], bad_seq: int, reason: str
) -> None:
    put_lines(chain, tamper(lines_of(chain)))
    report = verify_chain(chain, KEY)
    assert not report.ok
    assert report.first_bad_seq == bad_seq
    assert report.records == bad_seq - 1
    assert reason in report.message


async def test_a_record_spliced_from_another_file_breaks_the_link(chain: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    await write_chain(other, 5, first=101)  # same key, same seq numbers, different history
    lines = lines_of(chain)
    lines[2] = lines_of(other)[2]
    put_lines(chain, lines)
    report = verify_chain(chain, KEY)
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert "does not chain" in report.message


async def test_wrong_key_fails_at_seq_1(chain: Path) -> None:
    report = verify_chain(chain, OTHER_KEY)
    assert (report.ok, report.first_bad_seq, report.records) == (False, 1, 0)


async def test_truncation_needs_an_expected_last_seq(chain: Path) -> None:
    put_lines(chain, lines_of(chain)[:3])
    assert verify_chain(chain, KEY).ok  # whole records cut off the end leave a valid chain
    report = verify_chain(chain, KEY, expected_last_seq=5)
    assert (report.ok, report.first_bad_seq, report.records) == (False, 4, 3)
    assert "ends at seq 3" in report.message
    assert verify_chain(chain, KEY, expected_last_seq=3).ok


async def test_torn_last_line_is_reported_but_ok(chain: Path) -> None:
    with chain.open("ab") as f:
        f.write(lines_of(chain)[0][:20])
    report = verify_chain(chain, KEY)
    assert (report.ok, report.records, report.torn_tail, report.first_bad_seq) == (True, 5, True, None)
    assert report.message == "5 records; torn last line ignored"
    # A torn line is never counted: a complete-looking last line without its newline is torn too.
    put_lines(chain, lines_of(chain)[:4])
    with chain.open("ab") as f:
        f.write(doc_line(KEY, 5, hashlib.sha256(lines_of(chain)[3]).hexdigest(), event(5)))
    report = verify_chain(chain, KEY, expected_last_seq=5)
    assert (report.ok, report.torn_tail, report.first_bad_seq) == (False, True, 5)


async def test_reopening_sets_a_torn_tail_aside_and_continues(
    chain: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fragment = b'{"seq":6,"prev":"' + CANARY.encode()
    with chain.open("ab") as f:
        f.write(fragment)
    caplog.set_level(logging.DEBUG)
    sink = ChainedFileSink(chain, KEY)
    assert sink.last_seq == 5
    await sink.write([event(6)])
    await sink.close()
    report = verify_chain(chain, KEY)
    assert (report.ok, report.records, report.torn_tail) == (True, 6, False)
    torn = Path(f"{chain}.torn")
    assert torn.read_bytes() == fragment + b"\n"
    assert stat.S_IMODE(torn.stat().st_mode) == 0o600
    assert "torn line" in caplog.text
    no_canary(caplog)


@pytest.mark.parametrize("torn", [b"", b'{"seq":6,"prev":"00'])
async def test_resume_reads_lines_longer_than_its_read_chunk(
    chain: Path, monkeypatch: pytest.MonkeyPatch, torn: bytes
) -> None:
    monkeypatch.setattr("phi_gateway.audit_chain._TAIL_CHUNK", 7)
    with chain.open("ab") as f:
        f.write(torn)
    sink = ChainedFileSink(chain, KEY)
    assert sink.last_seq == 5
    await sink.write([event(6)])
    await sink.close()
    assert verify_chain(chain, KEY).records == 6


async def test_a_crash_in_the_very_first_write_leaves_an_empty_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq":1,"pr')
    assert verify_chain(path, KEY).torn_tail
    sink = ChainedFileSink(path, KEY)
    assert sink.last_seq == 0
    await sink.write([event(1)])
    await sink.close()
    assert verify_chain(path, KEY).records == 1


async def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").touch()
    assert verify_chain(tmp_path / "empty.jsonl", KEY).records == 0
    with pytest.raises(AuditError, match="cannot read audit file"):
        verify_chain(tmp_path / "missing.jsonl", KEY)


@pytest.mark.parametrize("failing", ["fsync", "partial-write"])
async def test_a_failed_write_is_retried_without_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = ChainedFileSink(path, KEY)
    await sink.write([event(1)])
    audit_fd = sink._fd
    real_write, real_fsync = os.write, os.fsync
    fail_once = [True]

    def flaky_write(fd: int, data: Any) -> int:
        if fd == audit_fd and failing == "partial-write" and fail_once:
            fail_once.pop()
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def flaky_fsync(fd: int) -> None:
        if fd == audit_fd and failing == "fsync" and fail_once:
            fail_once.pop()
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "write", flaky_write)
    monkeypatch.setattr(os, "fsync", flaky_fsync)
    batch = [event(2), event(3), event(4)]
    with pytest.raises(AuditError, match="cannot write audit file"):
        await sink.write(batch)
    await sink.write(batch)  # the emitter retries the same batch
    await sink.close()
    report = verify_chain(path, KEY)
    assert (report.ok, report.records) == (True, 4)
    assert [orjson.loads(line)["event"]["n"] for line in lines_of(path)] == [1, 2, 3, 4]


async def test_stdout_sink_writes_one_line_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink()
    await sink.write([event(1), event(2, note="ü")])
    await sink.close()
    out = capsys.readouterr().out.splitlines()
    assert [orjson.loads(line) for line in out] == [event(1), event(2, note="ü")]


# The emitter


class FlakySink:
    """An in-memory sink that fails while ``broken``, with a message a careless sink might write."""

    def __init__(self, *, broken: bool = False) -> None:
        self.broken = broken
        self.events: list[Mapping[str, Any]] = []
        self.calls = 0
        self.closed = False

    async def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        self.calls += 1
        await asyncio.sleep(0)
        if self.broken:
            raise ValueError(f"could not store {events!r}")  # carries content: must not be logged
        self.events.extend(events)

    async def close(self) -> None:
        self.closed = True


class GateSink(FlakySink):
    """Holds every write until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        self.calls += 1
        await self.gate.wait()
        self.events.extend(events)


def recording_sleep(delays: list[float]) -> Callable[[float], Awaitable[None]]:
    async def sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0)

    return sleep


async def test_concurrent_emits_are_written_once_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    emitter = AuditEmitter(ChainedFileSink(path, KEY), batch_size=7)
    await emitter.start()
    order: list[int] = []

    async def request(n: int) -> None:
        await asyncio.sleep(0)
        order.append(n)
        assert emitter.emit(event(n))

    await asyncio.gather(*(request(n) for n in range(300)))
    await emitter.stop()
    report = verify_chain(path, KEY)
    assert (report.ok, report.records) == (True, 300)
    assert [orjson.loads(line)["event"]["n"] for line in lines_of(path)] == order
    stats = emitter.stats
    assert (stats.emitted, stats.written, stats.dropped, stats.queue_depth) == (300, 300, 0, 0)


async def test_emit_enqueues_a_copy(tmp_path: Path) -> None:
    sink = FlakySink()
    emitter = AuditEmitter(sink)
    ev = event(1, fields=["ssn"])
    emitter.emit(ev)
    ev["fields"].append("dob")
    ev["principal"] = "mallory"
    await emitter.stop()
    assert sink.events == [event(1, fields=["ssn"])]


async def test_a_failing_sink_loses_nothing_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sink, delays = FlakySink(broken=True), list[float]()
    emitter = AuditEmitter(sink, batch_size=4, sleep=recording_sleep(delays))
    assert not emitter.accepting  # not started yet
    await emitter.start()
    assert emitter.accepting
    for n in range(10):
        assert emitter.emit(event(n, ssn=CANARY))
    await until(lambda: emitter.stats.write_failures >= 9)
    assert not emitter.accepting
    assert delays[:9] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    for n in range(10, 15):
        assert emitter.emit(event(n, ssn=CANARY))  # block mode still queues; the caller saw not accepting
    sink.broken = False
    await until(lambda: emitter.stats.queue_depth == 0)
    assert emitter.accepting
    assert [e["n"] for e in sink.events] == list(range(15))
    await emitter.stop()
    assert sink.closed and emitter.stats.written == 15 and emitter.stats.dropped == 0
    failures = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failures) == 1 and "ValueError" in failures[0].getMessage()
    assert any("recovered" in r.getMessage() for r in caplog.records)
    no_canary(caplog)


async def test_a_failing_file_is_retried_until_it_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "audit.jsonl"
    sink = ChainedFileSink(path, KEY)
    disk_full = [True]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fd == sink._fd and disk_full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    emitter = AuditEmitter(sink, batch_size=3, sleep=recording_sleep([]))
    await emitter.start()
    for n in range(8):
        emitter.emit(event(n, ssn=CANARY))
    await until(lambda: emitter.stats.write_failures >= 3)
    assert not emitter.accepting
    disk_full[0] = False
    await emitter.stop()
    report = verify_chain(path, KEY)
    assert (report.ok, report.records) == (True, 8)
    assert [orjson.loads(line)["event"]["n"] for line in lines_of(path)] == list(range(8))
    assert "No space left on device" in caplog.text
    no_canary(caplog)


async def test_drop_mode_counts_drops_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sink = FlakySink()
    emitter = AuditEmitter(sink, max_queue=4, on_failure="drop")
    results = [emitter.emit(event(n, ssn=CANARY)) for n in range(7)]
    assert results == [True] * 4 + [False] * 3
    stats = emitter.stats
    assert (stats.emitted, stats.dropped, stats.queue_depth) == (7, 3, 4)
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    await emitter.stop()
    assert [e["n"] for e in sink.events] == [0, 1, 2, 3]
    no_canary(caplog)


async def test_block_mode_keeps_headroom_for_requests_already_admitted() -> None:
    sink = GateSink()
    emitter = AuditEmitter(sink, max_queue=3, batch_size=1)
    await emitter.start()
    emitter.emit(event(0))
    await until(lambda: sink.calls == 1)  # the drain holds event 0 in a write that waits
    assert emitter.emit(event(1)) and emitter.emit(event(2))
    assert not emitter.accepting  # 3 pending: new PHI requests get 503
    assert all(emitter.emit(event(n)) for n in range(3, 6))  # ...those already admitted still record
    assert not emitter.emit(event(6))  # past twice max_queue, only a caller ignoring accepting
    assert emitter.stats.dropped == 1
    sink.gate.set()
    await emitter.stop()
    assert [e["n"] for e in sink.events] == list(range(6))


async def test_stop_drains_without_start_and_then_refuses() -> None:
    sink = FlakySink()
    emitter = AuditEmitter(sink, batch_size=8)
    for n in range(50):
        emitter.emit(event(n))
    await emitter.stop()
    await emitter.stop()
    assert [e["n"] for e in sink.events] == list(range(50)) and sink.closed
    assert not emitter.accepting
    assert not emitter.emit(event(50))
    assert emitter.stats.dropped == 1 and emitter.stats.written == 50
    with pytest.raises(RuntimeError):
        await emitter.start()


async def test_a_cancelled_stop_counts_what_it_gave_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sink = FlakySink(broken=True)
    emitter = AuditEmitter(sink, sleep=recording_sleep([]))
    await emitter.start()
    for n in range(5):
        emitter.emit(event(n, ssn=CANARY))
    stopping = asyncio.ensure_future(emitter.stop())
    await until(lambda: emitter.stats.write_failures >= 2)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    stats = emitter.stats
    assert (stats.written, stats.dropped, stats.queue_depth) == (0, 5, 0)
    assert sink.closed
    assert "5 events unwritten" in caplog.text
    no_canary(caplog)


async def test_events_that_are_not_json_objects_are_refused_without_content() -> None:
    emitter = AuditEmitter(FlakySink())
    bad_events: list[Any] = [{"ssn": CANARY, "odd": {CANARY, 1}}, {"ssn": CANARY, 1: "x"}]
    for bad in bad_events:
        with pytest.raises(AuditError) as caught:
            emitter.emit(bad)
        shown = str(caught.value) + repr(caught.value) + "".join(traceback.format_exception(caught.value))
        assert CANARY not in shown
    with pytest.raises(AuditError, match="JSON object"):
        emitter.emit([CANARY])  # type: ignore[arg-type]
    assert emitter.stats.emitted == 0


async def test_chained_sink_errors_carry_no_content(tmp_path: Path) -> None:
    sink = ChainedFileSink(tmp_path / "audit.jsonl", KEY)
    with pytest.raises(AuditError) as caught:
        await sink.write([{"ssn": CANARY, "odd": {1}}])
    await sink.close()
    assert CANARY not in "".join(traceback.format_exception(caught.value))
    assert isinstance(caught.value, PHIGatewayError)


def test_bad_emitter_options_are_refused() -> None:
    for options in ({"max_queue": 0}, {"batch_size": 0}, {"on_failure": "ignore"}, {"retry_initial": 0}):
        with pytest.raises(ValueError, match="must"):
            AuditEmitter(FlakySink(), **options)


# Chain key files and the CLI


def test_key_file_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "chain.key"
    create_chain_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and len(text.strip()) == 43
    assert load_chain_key(path) == base64.urlsafe_b64decode(text.strip() + "=")
    with pytest.raises(AuditError, match="refusing to overwrite"):
        create_chain_key_file(path)
    path.chmod(0o644)
    with pytest.raises(AuditError, match="readable by others"):
        load_chain_key(path)
    for content, problem in [
        (b"not base64url!\n", "not base64url"),
        (base64.urlsafe_b64encode(b"k" * 31), "shorter than 32"),
    ]:
        bad = tmp_path / f"bad{len(content)}.key"
        bad.write_bytes(content)
        bad.chmod(0o600)
        with pytest.raises(AuditError, match=problem):
            load_chain_key(bad)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "chain.key"
    path.write_bytes(base64.urlsafe_b64encode(KEY).rstrip(b"=") + b"\n")
    path.chmod(0o600)
    return path


def run_cli(*args: str | Path) -> Any:
    return CliRunner().invoke(audit, [str(a) for a in args])


async def test_cli_verify_ok_and_torn(chain: Path, key_file: Path) -> None:
    result = run_cli("verify", chain, "--chain-key-file", key_file)
    assert (result.exit_code, result.stdout) == (0, "ok: 5 records\n")
    with chain.open("ab") as f:
        f.write(b'{"seq":6')
    result = run_cli("verify", chain, "--chain-key-file", key_file, "--expected-last-seq", "5")
    assert (result.exit_code, result.stdout) == (0, "ok: 5 records; torn last line ignored\n")


async def test_cli_verify_failures(chain: Path, key_file: Path, tmp_path: Path) -> None:
    result = run_cli("verify", chain, "--chain-key-file", key_file, "--expected-last-seq", "7")
    assert result.exit_code == 1
    assert result.stdout.startswith("FAIL at seq 6: file ends at seq 5")
    put_lines(chain, _swapped(lines_of(chain)))
    result = run_cli("verify", chain, "--chain-key-file", key_file)
    assert result.exit_code == 1
    assert result.stdout == "FAIL at seq 3: found seq 4 (records deleted, inserted or reordered)\n"
    other = tmp_path / "other.key"
    create_chain_key_file(other)
    result = run_cli("verify", chain, "--chain-key-file", other)
    assert result.exit_code == 1 and result.stdout.startswith("FAIL at seq 1: ")


async def test_cli_verify_cannot_check(chain: Path, key_file: Path, tmp_path: Path) -> None:
    result = run_cli("verify", tmp_path / "missing.jsonl", "--chain-key-file", key_file)
    assert result.exit_code == 2 and "cannot read audit file" in result.stderr
    key_file.chmod(0o640)
    result = run_cli("verify", chain, "--chain-key-file", key_file)
    assert result.exit_code == 2 and "readable by others" in result.stderr


def test_cli_init_key_creates_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "chain.key"
    result = run_cli("init-key", path)
    assert result.exit_code == 0 and result.stdout == f"created {path}\n"
    assert len(load_chain_key(path)) == 32
    before = path.read_bytes()
    result = run_cli("init-key", path)
    assert result.exit_code == 1 and "refusing to overwrite" in result.stderr
    assert path.read_bytes() == before


def test_the_documented_example_verifies(tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "docs" / "audit.md").read_text()
    example = [line for line in text.splitlines() if re.match(r'\{"seq":\d', line)]
    assert len(example) == 2
    path = tmp_path / "example.jsonl"
    path.write_text("".join(line + "\n" for line in example))
    key = bytes(range(32))
    assert verify_chain(path, key).records == 2
    first = orjson.loads(example[0])
    assert example[0].encode() == doc_line(key, 1, ZERO, first["event"])
    assert base64.urlsafe_b64encode(key).rstrip(b"=").decode() in text


async def test_admitted_events_survive_a_flood_of_refusals(tmp_path: Path) -> None:
    class Stuck:
        def __init__(self) -> None:
            self.written: list[Mapping[str, Any]] = []
            self.broken = True

        async def write(self, events: Sequence[Mapping[str, Any]]) -> None:
            if self.broken:
                raise OSError("disk full")
            self.written.extend(events)

        async def close(self) -> None:
            return None

    sink = Stuck()
    emitter = AuditEmitter(sink, max_queue=3, retry_initial=0.001, retry_max=0.002)
    await emitter.start()
    assert all(emitter.admit() for _ in range(3))  # three requests admitted before anything failed
    assert not emitter.admit()  # full: a fourth would be refused with 503
    for n in range(50):
        emitter.emit({"kind": "refusal", "n": n})  # events of refused requests: droppable
    for n in range(3):
        assert emitter.emit({"kind": "admitted", "n": n}, admitted=True)
    sink.broken = False
    await emitter.stop()
    assert [e["n"] for e in sink.written if e["kind"] == "admitted"] == [0, 1, 2]
    assert emitter.stats.dropped > 0 and emitter.stats.emitted == 53


# A request's events: the main event and the continuations that carry the rest of its records


def listing_events(contexts: list[dict[str, str]]) -> list[dict[str, Any]]:
    report = Report(audit_contexts=contexts)
    report.decrypted["$.ssn"] = len(contexts)
    main = {
        "time": "2026-01-05T14:03:22.000Z",
        "request_id": "r-1",
        "principal": "dr-who",
        "method": "GET",
        "route": "/patients",
        "policy": "patients",
        "outcome": "ok",
    }
    return request_events(main, [("response", report)])


async def test_every_record_of_a_large_listing_reaches_the_trail_in_bounded_events(tmp_path: Path) -> None:
    contexts = [{"ResourceId": f"p1.{n:024d}", "Purpose": "PHI_Storage"} for n in range(2500)]
    contexts[7]["ResourceId"] = "x" * 300_000  # a client can send any id in a body
    events = listing_events(contexts)
    main, parts = events[0], events[1:]
    assert main["kind"] == "request" and main["record_parts"] == len(parts) == 3
    assert len(main["response"]["records"]) == MAIN_RECORDS
    assert main["response"]["records_total"] == 2500
    assert [(p["kind"], p["part"], p["parts"], p["side"]) for p in parts] == [
        ("records", n, 3, "response") for n in (1, 2, 3)
    ]
    assert all(p["request_id"] == "r-1" and p["principal"] == "dr-who" for p in parts)
    # each part within PART_RECORDS and PART_BYTES (about 1,000 contexts of this size)
    assert [p["first"] for p in parts] == [100 + sum(len(q["records"]) for q in parts[:n]) for n in range(3)]
    assert all(len(orjson.dumps(p["records"])) <= PART_BYTES + PART_RECORDS for p in parts)
    path = tmp_path / "audit.jsonl"
    emitter = AuditEmitter(ChainedFileSink(path, KEY))
    await emitter.start()
    assert emitter.admit()
    assert emitter.emit_all(events, admitted=True)
    await emitter.stop()
    assert verify_chain(path, KEY).records == 4
    written = [orjson.loads(line)["event"] for line in lines_of(path)]
    assert all(len(orjson.dumps(e)) <= MAX_EVENT_BYTES for e in written)
    records = written[0]["response"]["records"] + [r for e in written[1:] for r in e["records"]]
    assert len(records) == 2500
    assert [r["ResourceId"] for n, r in enumerate(records) if n != 7] == [
        c["ResourceId"] for n, c in enumerate(contexts) if n != 7
    ]
    long_id = records[7]["ResourceId"]
    assert long_id == "x" * 64 + "...sha256:" + hashlib.sha256(b"x" * 300_000).hexdigest()


def test_few_records_need_no_continuation() -> None:
    (main,) = listing_events([{"ResourceId": "p1.a"}])
    assert main["record_parts"] == 0 and main["response"]["records"] == [{"ResourceId": "p1.a"}]


async def test_a_requests_events_are_kept_or_dropped_as_a_unit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sink = FlakySink()
    emitter = AuditEmitter(sink, max_queue=4, on_failure="drop")
    assert all(emitter.emit(event(n)) for n in range(3))
    assert emitter.emit_all([event(3), event(4), event(5)])  # room for the first: all go in
    assert not emitter.emit_all([event(6), event(7)])  # none for either
    stats = emitter.stats
    assert (stats.emitted, stats.dropped, stats.queue_depth) == (8, 2, 6)
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    await emitter.stop()
    assert [e["n"] for e in sink.events] == list(range(6))


async def test_an_event_no_sink_would_take_is_refused_with_its_group() -> None:
    sink = FlakySink()
    emitter = AuditEmitter(sink)
    with pytest.raises(AuditError) as refused:
        emitter.emit_all([event(0), event(1, notes=CANARY * 30_000)])
    assert CANARY not in str(refused.value) and "over the" in str(refused.value)
    assert emitter.stats.emitted == 0
    await emitter.stop()
    assert sink.events == []
