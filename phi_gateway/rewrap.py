"""Key rotation for stored documents (``phi-gateway rewrap``, ``docs/rotation.md``).

A token's GCM associated data binds its field path and its record's exact context, not
its key reference or wrapped data key, so a token moves to another master key by
swapping those two (``Token.with_key``): the key service's ReEncrypt re-wraps the data
key without it, or the value, leaving KMS, and IV, ciphertext and tag stay as they were.
``reencrypt`` mode instead decrypts each value and seals it again under a fresh data key.

Where the tokens are, and the KMS context each data key was wrapped under, come from a
policy route's response rule: the context is not stored in the token but recomputed per
record. Pseudonymized entries depend on the pepper version, so the source context is
tried under the current version first, then older ones (newest first), and the new
wrapping always uses the current version. Each distinct (master key, wrapped key,
context) is asked for once, with at most ``concurrency`` key-service calls in flight.

Documents are changed in place. Nothing here reads files or prints: ``cli_rewrap`` does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from phi_gateway import envelope, reveal
from phi_gateway.aead import IV_BYTES
from phi_gateway.cache import DataKeyCache
from phi_gateway.context import context_digest, encode_context
from phi_gateway.exceptions import DocumentError, InvalidToken, UnknownMasterKey
from phi_gateway.jsonpath import JsonPath
from phi_gateway.jsonvalue import loads_strict
from phi_gateway.keys import DataKey, KeyProvider
from phi_gateway.pepper import Pepper
from phi_gateway.rules import ResponseRule
from phi_gateway.transform import Scope, exact_context, kms_context

UNREADABLE: Any = object()  # stands for a document that is not JSON
_REMEMBERED = 100_000  # outcomes kept per distinct data key, so later batches reuse them
LISTED = 10_000  # failures and outside locations listed at most; the counts stay exact
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Target:
    """The master key tokens move to: as the provider takes it, and as tokens name it."""

    master_key: str
    key_ref: str


@dataclass(frozen=True, slots=True)
class Failure:
    """Something left untouched, located by document, record and field, never by value.

    ``error``: ``invalid_token`` (does not parse, or its data key does not open under the
    record's context), ``unknown_master_key``, ``context_missing``, ``record_not_object``,
    ``invalid_json``.
    """

    location: str  # "line 3" or "document"
    record: int | None
    field: str | None
    error: str
    ordinal: int = 0  # the document's place in the run, to list failures in input order

    def __str__(self) -> str:
        parts = [self.location]
        if self.record is not None:
            parts.append(f"record {self.record}")
        if self.field is not None:
            parts.append(self.field)
        return f"{', '.join(parts)}: {self.error}"


@dataclass
class Summary:
    """What a run found and did: counts, key references and locations, never values."""

    mode: str  # "rewrap" or "reencrypt"
    target: str  # key_ref tokens move to
    documents: int = 0
    records: int = 0
    before: Counter[str] = field(default_factory=Counter)  # tokens at decrypt paths, by key_ref
    after: Counter[str] = field(default_factory=Counter)
    rewrapped: int = 0
    reencrypted: int = 0
    current: int = 0  # already under the target key (and, as far as checked, the current pepper)
    failed: int = 0  # tokens left as they were; ``failures`` says where and why
    plaintext: int = 0  # non-null values at decrypt paths that are not tokens
    outside: Counter[str] = field(default_factory=Counter)  # tokens elsewhere, by key_ref
    outside_at: list[str] = field(default_factory=list)
    source_pepper_versions: Counter[int] = field(default_factory=Counter)  # of the tokens moved
    calls: Counter[str] = field(default_factory=Counter)  # key service: rewrap, unwrap, generate
    failures: list[Failure] = field(default_factory=list)
    unlisted: int = 0  # failures beyond the first ``LISTED``

    @property
    def found(self) -> int:
        return self.rewrapped + self.reencrypted + self.current + self.failed

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "target_key": self.target,
            "documents": self.documents,
            "records": self.records,
            "tokens": {
                "found": self.found,
                "rewrapped": self.rewrapped,
                "reencrypted": self.reencrypted,
                "current": self.current,
                "failed": self.failed,
            },
            "before": dict(sorted(self.before.items())),
            "after": dict(sorted(self.after.items())),
            "plaintext_values": self.plaintext,
            "outside": {
                "count": sum(self.outside.values()),
                "by_key": dict(sorted(self.outside.items())),
                "at": self.outside_at,
            },
            "source_pepper_versions": {str(v): n for v, n in sorted(self.source_pepper_versions.items())},
            "key_service_calls": {name: n for name, n in sorted(self.calls.items()) if n},
            "failures": [
                {"location": f.location, "record": f.record, "field": f.field, "error": f.error}
                for f in self.failures
            ],
            "failures_unlisted": self.unlisted,
        }


@dataclass(slots=True)
class _Place:
    parent: Any
    key: Any
    field: str
    token: envelope.Token
    exact: bytes  # the record's exact context, encoded: the second half of the AAD
    location: str
    record: int
    doc: int  # index in the batch
    ordinal: int  # index in the run


@dataclass(slots=True)
class _Slot:
    """One wrapped data key as one record context sees it, and every token that uses it."""

    key_ref: str
    wrapped: bytes
    contexts: list[tuple[int | None, dict[str, str]]]  # (pepper version, KMS context), current first
    places: list[_Place]

    @property
    def destination(self) -> dict[str, str]:
        return self.contexts[0][1]


@dataclass(frozen=True, slots=True)
class _Moved:
    key_ref: str | None  # None: already current, the token stays as it is
    wrapped: bytes = b""
    version: int | None = None  # pepper version of the context it opened under


_CURRENT = _Moved(None)


class Rewrapper:
    """Moves the tokens of batches of documents to ``target``; keeps a ``Summary``.

    ``trust_current``: a token already under the target key counts as current without
    asking the key service. Without it, and only when the pepper has several versions and
    the context pseudonymizes, each such data key is checked with one ReEncrypt to itself
    under the current pepper's context (the result is discarded when it opens).
    """

    def __init__(
        self,
        provider: KeyProvider,
        rule: ResponseRule,
        scope: Scope,
        target: Target,
        *,
        pepper: Pepper | None = None,
        reencrypt: bool = False,
        trust_current: bool = False,
        concurrency: int = 16,
        cache: DataKeyCache | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1.")
        pseudonymized = any(e.kms == "pseudonymize" for e in rule.context.kms_entries)
        if pseudonymized and pepper is None:
            raise DocumentError("configuration", "the route's KMS context is pseudonymized: give the pepper")
        self.provider = provider
        self.rule = rule
        self.scope = scope
        self.target = target
        self.pepper = pepper
        self.reencrypt = reencrypt
        self.summary = Summary("reencrypt" if reencrypt else "rewrap", target.key_ref)
        self._keys = cache if cache is not None else DataKeyCache(provider)  # an empty cache is falsy
        self._limit = asyncio.Semaphore(concurrency)
        self._actions = reveal.plan(rule, None)
        # Pepper versions to make source contexts with, current first; [None] when the context
        # cannot depend on the version (None: the current one).
        self._versions: list[int | None] = [None]
        if pepper is not None and pseudonymized and len(pepper.versions) > 1:
            self._versions = list(pepper.search_order())
        self._check_current = len(self._versions) > 1 and not trust_current
        self._outcomes: OrderedDict[tuple[str, bytes, bytes], _Moved | str] = OrderedDict()

    async def run(self, docs: Sequence[tuple[str, Any]]) -> list[bool]:
        """Process (location, document) pairs in place; returns which documents changed.
        A document given as ``UNREADABLE`` (not JSON) is only reported."""
        changed = [False] * len(docs)
        slots: dict[tuple[str, bytes, bytes], _Slot] = {}
        first_failure = len(self.summary.failures)
        for n, (location, doc) in enumerate(docs):
            self.summary.documents += 1
            if doc is UNREADABLE:
                self._report(Failure(location, None, None, "invalid_json", self.summary.documents))
            else:
                self._collect(n, location, doc, slots)
        if self.reencrypt:
            await self._reencrypt(list(slots.values()), changed)
        else:
            await self._rewrap(slots, changed)
        self.summary.failures[first_failure:] = sorted(
            self.summary.failures[first_failure:],
            key=lambda f: (f.ordinal, -1 if f.record is None else f.record),
        )
        self.summary.calls["unwrap"] = self._keys.stats.decrypt_calls
        self.summary.calls["generate"] = self._keys.stats.generate_calls
        return changed

    def _report(self, failure: Failure) -> None:
        if len(self.summary.failures) < LISTED:
            self.summary.failures.append(failure)
        else:
            self.summary.unlisted += 1

    # Finding the tokens

    def _collect(self, n: int, location: str, doc: Any, slots: dict[tuple[str, bytes, bytes], _Slot]) -> None:
        summary = self.summary
        claimed: set[tuple[int, Any]] = set()
        records = self.rule.records.find(doc)
        if any(not isinstance(record, dict) for record in records):
            # No record can be trusted to be what the policy means: every token stays.
            self._report(Failure(location, None, None, "record_not_object", summary.documents))
            for parent, key, _ in _token_places(doc):
                self._failed(_parse(parent[key] if parent is not None else doc), seen=False)
            return
        summary.records += len(records)
        for r, record in enumerate(records):
            found: list[tuple[Any, Any, str, envelope.Token]] = []
            for parent, key, canonical, _ in reveal.per_place(self.rule, self._actions, record, _locate):
                claimed.add((id(parent), key))
                value = parent[key]
                if not envelope.is_token(value):
                    summary.plaintext += value is not None
                    continue
                token = _parse(value)
                if token is None:
                    self._report(Failure(location, r, canonical, "invalid_token", summary.documents))
                    self._failed(None)
                    continue
                summary.before[token.key_ref] += 1
                found.append((parent, key, canonical, token))
            if not found:
                continue
            try:
                exact = exact_context(self.rule.context, record, self.scope)
            except DocumentError as exc:
                self._report(Failure(location, r, None, exc.code, summary.documents))
                for *_, token in found:
                    self._failed(token)
                continue
            contexts = self._contexts(exact)
            ident = context_digest(contexts[0][1])
            exact_bytes = encode_context(exact)
            for parent, key, canonical, token in found:
                slot = slots.get((token.key_ref, token.wrapped_key, ident))
                if slot is None:
                    slot = slots[(token.key_ref, token.wrapped_key, ident)] = _Slot(
                        token.key_ref, token.wrapped_key, contexts, []
                    )
                place = _Place(parent, key, canonical, token, exact_bytes, location, r, n, summary.documents)
                slot.places.append(place)
        for parent, key, path in _token_places(doc):
            if parent is None or (id(parent), key) not in claimed:
                token = _parse(parent[key] if parent is not None else doc)
                summary.outside[token.key_ref if token is not None else "invalid"] += 1
                if len(summary.outside_at) < LISTED:
                    summary.outside_at.append(f"{location}, {_spell(path)}")

    def _contexts(self, exact: dict[str, str]) -> list[tuple[int | None, dict[str, str]]]:
        spec = self.rule.context
        contexts: list[tuple[int | None, dict[str, str]]] = []
        for version in self._versions:
            context = kms_context(spec, exact, self.pepper, version)
            if all(context != known for _, known in contexts):
                contexts.append((version, context))
        return contexts

    def _failed(self, token: envelope.Token | None, *, seen: bool = True) -> None:
        """Count a token left as it was (None: one that does not parse); ``seen``: already
        counted in ``before``."""
        self.summary.failed += 1
        if token is not None:
            self.summary.before[token.key_ref] += not seen
            self.summary.after[token.key_ref] += 1

    def _place_failed(self, place: _Place, error: str) -> None:
        self._report(Failure(place.location, place.record, place.field, error, place.ordinal))
        self._failed(place.token)

    # Re-wrapping

    async def _rewrap(self, slots: dict[tuple[str, bytes, bytes], _Slot], changed: list[bool]) -> None:
        outcomes = await asyncio.gather(*(self._remembered(ident, slot) for ident, slot in slots.items()))
        summary = self.summary
        for slot, outcome in zip(slots.values(), outcomes, strict=True):
            for place in slot.places:
                if isinstance(outcome, str):
                    self._place_failed(place, outcome)
                elif outcome.key_ref is None:
                    summary.current += 1
                    summary.after[slot.key_ref] += 1
                else:
                    place.parent[place.key] = place.token.with_key(
                        outcome.key_ref, outcome.wrapped
                    ).serialize()
                    changed[place.doc] = True
                    summary.rewrapped += 1
                    summary.after[outcome.key_ref] += 1
                    if outcome.version is not None:
                        summary.source_pepper_versions[outcome.version] += 1

    async def _remembered(self, ident: tuple[str, bytes, bytes], slot: _Slot) -> _Moved | str:
        outcome = self._outcomes.get(ident)
        if outcome is None:
            outcome = self._outcomes[ident] = await self._move(slot)
            if len(self._outcomes) > _REMEMBERED:
                self._outcomes.popitem(last=False)
        else:
            self._outcomes.move_to_end(ident)
        return outcome

    async def _move(self, slot: _Slot) -> _Moved | str:
        """The slot's new wrapping, ``_CURRENT``, or why it cannot move."""
        current = slot.key_ref == self.target.key_ref
        if current and not self._check_current:
            return _CURRENT
        for n, (version, context) in enumerate(slot.contexts):
            try:
                async with self._limit:
                    self.summary.calls["rewrap"] += 1
                    key_ref, wrapped = await self.provider.rewrap(
                        slot.key_ref,
                        slot.wrapped,
                        context,
                        master_key=self.target.master_key,
                        new_context=slot.destination,
                    )
            except InvalidToken:
                continue  # not this pepper version's context (or not this record's key at all)
            except UnknownMasterKey:
                return "unknown_master_key"
            if current and n == 0:
                return _CURRENT  # asked only to learn that it opens under the current context
            return _Moved(key_ref, wrapped, version)
        return "invalid_token"

    # Re-encrypting

    async def _reencrypt(self, slots: list[_Slot], changed: list[bool]) -> None:
        unwrapped = await asyncio.gather(*(self._unwrap(slot) for slot in slots))
        opened: dict[bytes, list[tuple[_Place, bytes]]] = {}  # by destination context
        destinations: dict[bytes, dict[str, str]] = {}
        for slot, result in zip(slots, unwrapped, strict=True):
            if isinstance(result, str):
                for place in slot.places:
                    self._place_failed(place, result)
                continue
            data_key, version = result
            ident = context_digest(slot.destination)
            destinations[ident] = slot.destination
            for place in slot.places:
                aad = envelope.field_prefix(place.field) + place.exact
                try:
                    plaintext = data_key.aead.open(place.token.iv, place.token.sealed, aad)
                except InvalidToken:
                    self._place_failed(place, "invalid_token")
                    continue
                opened.setdefault(ident, []).append((place, plaintext))
                if version is not None:
                    self.summary.source_pepper_versions[version] += 1
        runs = [
            (ident, start, end)
            for ident, items in opened.items()
            for start, end in _runs([len(p) for _, p in items], self._keys.max_uses, self._keys.max_bytes)
        ]
        fresh = await asyncio.gather(*(self._fresh(destinations[i], opened[i][s:e]) for i, s, e in runs))
        for (ident, start, end), key in zip(runs, fresh, strict=True):
            header = envelope.key_header(key.key_ref, key.wrapped)
            ivs = os.urandom(IV_BYTES * (end - start))
            for n, (place, plaintext) in enumerate(opened[ident][start:end]):
                aad = envelope.field_prefix(place.field) + place.exact
                iv = ivs[n * IV_BYTES : (n + 1) * IV_BYTES]
                place.parent[place.key] = envelope.seal(key, header, plaintext, aad, iv)
                changed[place.doc] = True
                self.summary.reencrypted += 1
                self.summary.after[key.key_ref] += 1

    async def _unwrap(self, slot: _Slot) -> tuple[DataKey, int | None] | str:
        for version, context in slot.contexts:
            try:
                async with self._limit:
                    return await self._keys.decryption_key(slot.key_ref, slot.wrapped, context), version
            except InvalidToken:
                continue
            except UnknownMasterKey:
                return "unknown_master_key"
        return "invalid_token"

    async def _fresh(self, context: dict[str, str], items: Sequence[tuple[_Place, bytes]]) -> DataKey:
        async with self._limit:
            return await self._keys.encryption_key(
                context,
                master_key=self.target.master_key,
                uses=len(items),
                nbytes=sum(len(p) for _, p in items),
            )


def _locate(path: JsonPath, record: Any) -> list[tuple[Any, Any]]:
    return list(path.locate(record))


def _parse(value: Any) -> envelope.Token | None:
    try:
        return envelope.parse(value)
    except InvalidToken:
        return None


def _runs(sizes: Sequence[int], max_uses: int, max_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, end) runs of values that one data key may encrypt within the cache's limits."""
    start, total = 0, 0
    for n, size in enumerate(sizes):
        if n > start and (n - start >= max_uses or total + size > max_bytes):
            yield start, n
            start, total = n, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def _token_places(doc: Any) -> Iterator[tuple[Any, Any, tuple[str | int, ...]]]:
    """Every string in ``doc`` that looks like a token, as (parent, key, path); the document
    itself when it is one, with parent None."""
    if envelope.is_token(doc):
        yield None, None, ()
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(doc, ())]
    while stack:
        node, path = stack.pop()
        items: Iterable[tuple[Any, Any]] = (
            node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        )
        children = []
        for key, value in items:
            if isinstance(value, dict | list):
                children.append((value, (*path, key)))
            elif envelope.is_token(value):
                yield node, key, (*path, key)
        stack.extend(reversed(children))


def _spell(path: tuple[str | int, ...]) -> str:
    out = "$"
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        elif _NAME.fullmatch(step):
            out += f".{step}"
        else:
            out += "['" + step.replace("\\", "\\\\").replace("'", "\\'") + "']"
    return out


def dumps(doc: Any, *, indent: bool = False) -> bytes:
    """A document as JSON text (compact, or indented by two spaces)."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 if indent else 0)
    except orjson.JSONEncodeError:  # a lone surrogate, which the strict parser lets through
        text = json.dumps(doc, indent=2 if indent else None, separators=None if indent else (",", ":"))
        return text.encode("ascii")


async def rewrap_document(raw: bytes, rewrapper: Rewrapper) -> bytes:
    """One JSON document: the same bytes when nothing moved, else the changed document
    (indented when the input spanned lines)."""
    doc = loads_strict(raw)
    (changed,) = await rewrapper.run([("document", doc)])
    if not changed:
        return raw
    return dumps(doc, indent=b"\n" in raw.strip()) + b"\n"


async def rewrap_lines(
    lines: Iterable[bytes],
    write: Callable[[bytes], object],
    rewrapper: Rewrapper,
    *,
    batch: int = 256,
    progress: Callable[[int, int], object] | None = None,
) -> None:
    """JSON Lines, ``batch`` documents at a time. Lines that do not change (blank ones,
    ones that are not JSON, ones with nothing to move) are written back byte for byte.
    ``progress(documents, bytes)`` is told the running totals after each batch."""
    pending: list[tuple[bytes, str, Any]] = []  # raw line, location, document (or _BLANK)
    documents = consumed = 0

    async def flush() -> None:
        nonlocal documents
        readable = [n for n, (_, _, doc) in enumerate(pending) if doc is not _BLANK]
        changed = await rewrapper.run([pending[n][1:] for n in readable])
        moved = {n for n, did in zip(readable, changed, strict=True) if did}
        for n, (raw, _, doc) in enumerate(pending):
            if n in moved:
                write(dumps(doc) + (raw[len(raw.rstrip(b"\r\n")) :] or b"\n"))
            else:
                write(raw)
        documents += len(readable)
        pending.clear()
        if progress is not None:
            progress(documents, consumed)

    for number, raw in enumerate(lines, 1):
        consumed += len(raw)
        location = f"line {number}"
        if not raw.strip():
            pending.append((raw, location, _BLANK))
            continue
        try:
            pending.append((raw, location, loads_strict(raw)))
        except DocumentError:
            pending.append((raw, location, UNREADABLE))
        if len(pending) >= batch:
            await flush()
    if pending:
        await flush()


_BLANK: Any = object()
