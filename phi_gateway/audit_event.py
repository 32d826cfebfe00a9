"""The audit events of one request on a policy route: a main event (``"kind": "request"``)
and, when its record contexts do not fit in it, continuation events (``"kind": "records"``)
carrying the rest. Every record a request wrote or disclosed is on the trail, and no event
grows past what a sink takes (CloudWatch Logs: 256 KiB). Field reference: ``docs/audit.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from phi_gateway.transform import Report

MAIN_RECORDS = 100  # record contexts per side in the main event, so it stays quick to read
PART_RECORDS = 1000  # record contexts in one continuation event
PART_BYTES = 64 * 1024  # JSON size of the record contexts in one event, per side
MAX_VALUE = 256  # characters of a context value; a longer one is cut and named by its digest
# Fields a continuation event repeats from its main event, so it can be found on its own.
_REPEATED = ("time", "request_id", "principal", "method", "route", "policy")


def request_events(event: dict[str, Any], reports: Sequence[tuple[str, Report]]) -> list[dict[str, Any]]:
    """The main event (``event``, completed with one section per side of the request) and
    its continuations, in order."""
    event["kind"] = "request"
    rest: list[tuple[str, int, list[dict[str, str]]]] = []  # side, index of first record, records
    for side, report in reports:
        contexts = [_bounded(c) for c in report.audit_contexts]
        chunks = _chunks(contexts)
        event[side] = {
            "records": chunks[0],
            "records_total": len(contexts),
            "fields": _fields(report),
            "key_refs": sorted(report.key_refs),
        }
        if report.stale_pepper:  # keys wrapped before a pepper rotation: rewrap is due
            event[side]["stale_pepper_keys"] = report.stale_pepper
        first = len(chunks[0])
        for chunk in chunks[1:]:
            rest.append((side, first, chunk))
            first += len(chunk)
    event["record_parts"] = len(rest)
    parts = [
        {
            "kind": "records",
            **{name: event[name] for name in _REPEATED},
            "part": n,
            "parts": len(rest),
            "side": side,
            "first": first,
            "records": chunk,
        }
        for n, (side, first, chunk) in enumerate(rest, 1)
    ]
    return [event, *parts]


def _fields(report: Report) -> dict[str, dict[str, int]]:
    return {
        action: dict(counter)
        for action, counter in (
            ("encrypted", report.encrypted),
            ("indexed", report.indexed),
            ("decrypted", report.decrypted),
            ("withheld", report.withheld),
            ("decrypted_for_mask", report.decrypted_for_mask),
            ("redacted", report.redacted),
            ("plaintext_seen", report.plaintext_seen),
        )
        if counter
    }


def _bounded(context: Mapping[str, str]) -> dict[str, str]:
    """A record context whose values fit an event: an over-long one (a client can send any
    id in a body) keeps its start and is named by its SHA-256."""
    return {
        name: value
        if len(value) <= MAX_VALUE
        else f"{value[:64]}...sha256:{hashlib.sha256(value.encode()).hexdigest()}"
        for name, value in context.items()
    }


def _chunks(contexts: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The contexts in order, cut into the main event's share and then continuation parts,
    each within its record count and ``PART_BYTES``; always at least one (maybe empty) chunk."""
    chunks: list[list[dict[str, str]]] = [[]]
    size, limit = 0, MAIN_RECORDS
    for context in contexts:
        cost = len(orjson.dumps(context)) + 1
        if chunks[-1] and (len(chunks[-1]) >= limit or size + cost > PART_BYTES):
            chunks.append([])
            size, limit = 0, PART_RECORDS
        chunks[-1].append(context)
        size += cost
    return chunks
