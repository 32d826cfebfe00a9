"""Applying policy rules to parsed JSON: encrypt and index request bodies (indexes and
search criteria: ``indexing.py``), decrypt response bodies. Query strings are rewritten
in ``search.py``.

Each document is done in two phases: first everything is located and serialized and
the data keys it needs are fetched (concurrently, through the shared cache); then every
field is transformed synchronously, with one random-source call for all of its IVs.
Documents are changed in place: they are the gateway's own freshly parsed copies.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from phi_gateway import envelope, reveal
from phi_gateway.aead import IV_BYTES
from phi_gateway.cache import DataKeyCache
from phi_gateway.context import context_digest, encode_context
from phi_gateway.exceptions import DocumentError, InvalidToken, UnknownMasterKey, ValueNotEncryptable
from phi_gateway.indexing import index_record
from phi_gateway.jsonpath import JsonPath
from phi_gateway.keys import DataKey
from phi_gateway.pepper import Pepper
from phi_gateway.rules import (
    POLICY_CONTEXT_KEY,
    ContextSpec,
    RequestRule,
    ResponseRule,
)

T = TypeVar("T")


@dataclass
class Report:
    """What a transform did, for the audit trail: paths, counts and contexts, never values."""

    records: int = 0
    contexts: list[dict[str, str]] = field(default_factory=list)  # exact: for tests and callers, not logs
    audit_contexts: list[dict[str, str]] = field(default_factory=list)
    encrypted: Counter[str] = field(default_factory=Counter)
    decrypted: Counter[str] = field(default_factory=Counter)
    indexed: Counter[str] = field(default_factory=Counter)
    redacted: Counter[str] = field(default_factory=Counter)
    plaintext_seen: Counter[str] = field(default_factory=Counter)  # non-token values at decrypt paths
    withheld: Counter[str] = field(default_factory=Counter)  # masked, removed or left as token by reveal
    decrypted_for_mask: Counter[str] = field(default_factory=Counter)  # of withheld: opened by mask_last4
    key_refs: set[str] = field(default_factory=set)
    # Data keys that opened only under an older pepper version's KMS context: wrapped before
    # a pepper rotation, and due for `phi-gateway rewrap`.
    stale_pepper: int = 0


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a document came from: the route's path parameters and the request headers."""

    params: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names


@dataclass(slots=True)
class _Record:
    exact: dict[str, str]
    kms: dict[str, str]
    context_bytes: bytes
    audit: dict[str, str]  # as the audit trail may show it: pseudonyms where the policy says so


def _records(doc: Any, path: JsonPath) -> list[dict[str, Any]]:
    found = path.find(doc)
    if any(not isinstance(record, dict) for record in found):
        raise DocumentError("record_not_object", f"records at {path.source} must be JSON objects")
    return found


def _context(spec: ContextSpec, record: Mapping[str, Any], scope: Scope, pepper: Pepper | None) -> _Record:
    exact = exact_context(spec, record, scope)
    kms = kms_context(spec, exact, pepper)
    # The audit trail shows request-derived values as pseudonyms unless the policy says
    # kms: plain, whatever reaches KMS (per_policy and omit entries never do).
    audit = {}
    for entry in spec.entries:
        if entry.source == "literal" or entry.kms == "plain" or pepper is None:
            audit[entry.name] = exact[entry.name]
        else:
            audit[entry.name] = kms.get(entry.name) or pepper.pseudonymizer(spec.policy).pseudonym(
                entry.name, exact[entry.name]
            )
    return _Record(exact, kms, encode_context(exact), audit)


def exact_context(spec: ContextSpec, record: Mapping[str, Any], scope: Scope) -> dict[str, str]:
    """A record's encryption context with its exact values, as bound into its tokens' AAD."""
    exact = {POLICY_CONTEXT_KEY: spec.policy}
    for entry in spec.entries:
        value: Any
        if entry.source == "literal":
            value = entry.value
        elif entry.source == "param":
            value = scope.params.get(entry.value)
        elif entry.source == "header":
            value = scope.headers.get(entry.value)
        else:
            assert entry.path is not None
            matches = entry.path.find(record)
            value = matches[0] if len(matches) == 1 else None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise DocumentError(
                "context_missing", f"encryption context entry {entry.name!r} has no single value"
            )
        exact[entry.name] = value
    return exact


def kms_context(
    spec: ContextSpec, exact: Mapping[str, str], pepper: Pepper | None, version: int | None = None
) -> dict[str, str]:
    """The context KMS sees for a record's exact context; pseudonyms are made under pepper
    ``version`` (default: current, as new data keys are)."""
    kms = {POLICY_CONTEXT_KEY: spec.policy}
    for entry in spec.kms_entries:
        if entry.kms == "pseudonymize":
            if pepper is None:
                raise DocumentError("configuration", "pseudonymized context needs a pepper")
            kms[entry.name] = pepper.pseudonymizer(spec.policy, version).pseudonym(
                entry.name, exact[entry.name]
            )
        else:
            kms[entry.name] = exact[entry.name]
    return kms


def _places(path: JsonPath, record: Any) -> list[tuple[Any, Any]]:
    """Where ``path`` matches in ``record``, as (container, key) to read and write in place."""
    return path.locate(record)


def _refuse_unselected(doc: Any, rule: RequestRule) -> None:
    """Called when ``rule.records`` selects nothing, so nothing would be encrypted: refuse a
    body holding a member named like a field the rule protects (a bare resource sent where a
    Bundle was expected), which would otherwise reach the upstream in plaintext. Bodies
    with nothing to protect (``{"entry": []}``, ``[]``) pass."""
    folded = {name.casefold() for name in rule.protected}
    nodes = [doc]
    while nodes:
        node = nodes.pop()
        if isinstance(node, dict):
            if any(key.casefold() in folded for key in node):
                raise DocumentError(
                    "records_missing",
                    f"records at {rule.records.source} select nothing, but the body holds a field "
                    "this route protects",
                )
            nodes.extend(node.values())
        elif isinstance(node, list):
            nodes.extend(node)


async def encrypt_request(
    doc: Any,
    rule: RequestRule,
    scope: Scope,
    *,
    keys: DataKeyCache,
    pepper: Pepper | None,
    master_key: str | None = None,
) -> Report:
    """Index, then encrypt, every PHI field of ``doc`` in place. Nothing is changed on failure
    to fetch keys, and the caller must not forward ``doc`` if this raises."""
    report = Report()
    pending: list[tuple[Any, Any, str, bytes, bytes, int]] = []  # parent, key, field, plaintext, ctx, slot
    slots: dict[bytes, int] = {}
    kms_contexts: list[dict[str, str]] = []
    usage: list[list[int]] = []  # per slot: [uses, bytes]
    prefixes = {path.canonical: envelope.field_prefix(path.canonical) for path in rule.encrypt}
    records = _records(doc, rule.records)
    if not records:
        _refuse_unselected(doc, rule)
    for record in records:
        if rule.blind_indexes or rule.criteria:
            if pepper is None:
                raise DocumentError("configuration", "blind indexes need a pepper")
            index_record(record, rule, pepper, report.indexed)
        if rule.context is None:
            continue
        ctx = _context(rule.context, record, scope, pepper)
        report.contexts.append(ctx.exact)
        report.audit_contexts.append(ctx.audit)
        digest = context_digest(ctx.kms)
        slot = slots.get(digest)
        for path in rule.encrypt:
            for parent, key in _places(path, record):
                try:
                    plaintext = envelope.serialize_value(parent[key])
                except ValueNotEncryptable as exc:
                    raise DocumentError("value_not_encryptable", f"{path.source}: {exc}") from None
                if slot is None:
                    slot = slots[digest] = len(kms_contexts)
                    kms_contexts.append(ctx.kms)
                    usage.append([0, 0])
                usage[slot][0] += 1
                usage[slot][1] += len(plaintext)
                pending.append((parent, key, path.canonical, plaintext, ctx.context_bytes, slot))
    report.records = len(records)
    if not pending:
        return report
    # Cache hits synchronously; only misses become concurrent key-service calls.
    found = [
        keys.cached_encryption_key(kms, master_key=master_key, uses=used[0], nbytes=used[1])
        for kms, used in zip(kms_contexts, usage, strict=True)
    ]
    missing = [n for n, key in enumerate(found) if key is None]
    fetched = await _gather(
        [
            keys.encryption_key(kms_contexts[n], master_key=master_key, uses=usage[n][0], nbytes=usage[n][1])
            for n in missing
        ]
    )
    for n, key in zip(missing, fetched, strict=True):
        found[n] = key
    data_keys = [key for key in found if key is not None]
    headers = [envelope.key_header(k.key_ref, k.wrapped) for k in data_keys]
    report.key_refs.update(k.key_ref for k in data_keys)
    ivs = os.urandom(IV_BYTES * len(pending))
    for n, (parent, key, canonical, plaintext, context_bytes, slot) in enumerate(pending):
        iv = ivs[n * IV_BYTES : (n + 1) * IV_BYTES]
        aad = prefixes[canonical] + context_bytes
        parent[key] = envelope.seal(data_keys[slot], headers[slot], plaintext, aad, iv)
        report.encrypted[canonical] += 1
    return report


async def decrypt_response(
    doc: Any,
    rule: ResponseRule,
    scope: Scope,
    *,
    keys: DataKeyCache,
    pepper: Pepper | None,
    roles: frozenset[str] | None,
) -> Report:
    """Decrypt every token at the rule's paths in place, as far as ``roles`` may see it
    (``reveal.plan``). ``roles=None`` reveals everything; there is no default, so no caller
    reveals all by omission. ``on_error`` decides what a token that does not authenticate
    becomes (``fail`` raises ``InvalidToken``, ``redact`` → null). A data key wrapped before
    a pepper rotation opens under an older version's pseudonyms (``docs/pepper.md``),
    counted in ``stale_pepper``."""
    report = Report()
    actions = reveal.plan(rule, roles)
    pending: list[tuple[Any, Any, str, envelope.Token, bytes, tuple[str, bytes, bytes]]] = []
    unwrap: dict[tuple[str, bytes, bytes], _Record] = {}
    removals: list[tuple[Any, Any]] = []
    records = _records(doc, rule.records)
    for record in records:
        ctx = _context(rule.context, record, scope, pepper)
        report.contexts.append(ctx.exact)
        report.audit_contexts.append(ctx.audit)
        digest = context_digest(ctx.kms)
        for parent, key, canonical, action in reveal.per_place(rule, actions, record, _places):
            value = parent[key]
            if action in ("remove", "mask", "token"):  # decided without decrypting
                report.withheld[canonical] += 1
                if action == "remove":
                    removals.append((parent, key))
                elif action == "mask" or not envelope.is_token(value):
                    parent[key] = reveal.MASK
                continue
            if not envelope.is_token(value):
                if value is not None:
                    report.plaintext_seen[canonical] += 1
                    if rule.on_plaintext != "pass":
                        # Where every value must be a token, a plaintext one was written around
                        # the gateway (or a token's prefix was altered): not shown as PHI.
                        _integrity_failure(rule, parent, key, canonical, report, rule.on_plaintext)
                    elif action == "mask_last4":  # stored in the clear: still shown only as its mask
                        parent[key] = reveal.mask_last4(value)
                        report.withheld[canonical] += 1
                continue
            try:
                token = envelope.parse(value)
            except InvalidToken:
                _integrity_failure(rule, parent, key, canonical, report)
                continue
            slot = (token.key_ref, token.wrapped_key, digest)
            unwrap.setdefault(slot, ctx)
            pending.append((parent, key, canonical, token, ctx.context_bytes, slot))
    report.records = len(records)
    unwrapped: dict[tuple[str, bytes, bytes], DataKey | None] = {}
    pseudonymized = any(e.kms == "pseudonymize" for e in rule.context.kms_entries)
    older = pepper.search_order()[1:] if pepper is not None and pseudonymized else []
    for slot, ctx in unwrap.items():  # cache hits synchronously, without a task each
        ref, wrapped, _ = slot
        cached = keys.cached_decryption_key(ref, wrapped, ctx.kms)
        # During a pepper overlap a key wrapped before the rotation is cached under an older
        # version's context: look there before asking KMS, which would refuse the current one.
        for version in older:
            if cached is not None:
                break
            assert pepper is not None
            older_context = kms_context(rule.context, ctx.exact, pepper, version)
            cached = keys.cached_decryption_key(ref, wrapped, older_context)
            report.stale_pepper += cached is not None
        if cached is not None:
            unwrapped[slot] = cached
    slots = [slot for slot in unwrap if slot not in unwrapped]
    results = await _gather(
        [keys.decryption_key(ref, wrapped, unwrap[(ref, wrapped, d)].kms) for ref, wrapped, d in slots],
        return_exceptions=True,
    )
    stale: list[tuple[str, bytes, bytes]] = []
    for slot, result in zip(slots, results, strict=True):
        if isinstance(result, InvalidToken):
            unwrapped[slot] = None  # does not open under this record's context (yet: see below)
            stale.append(slot)
        elif isinstance(result, UnknownMasterKey):
            unwrapped[slot] = None  # names a stranger key: no context can help
        elif isinstance(result, BaseException):
            raise result  # key service trouble: the whole response fails, nothing partial
        else:
            unwrapped[slot] = result
    if stale and older:
        # Wrapped before a pepper rotation: the KMS context held another version's pseudonyms.
        # The exact context still binds every token through its AAD, so this opens nothing new.
        assert pepper is not None
        retried = await asyncio.gather(
            *(_unwrap_older(keys, slot, rule.context, unwrap[slot].exact, pepper, older) for slot in stale),
            return_exceptions=True,
        )
        for slot, older_key in zip(stale, retried, strict=True):
            if isinstance(older_key, BaseException):
                raise older_key
            if older_key is not None:
                unwrapped[slot] = older_key
                report.stale_pepper += 1
    report.key_refs.update(k.key_ref for k in unwrapped.values() if k is not None)
    prefixes = {path.canonical: envelope.field_prefix(path.canonical) for path in rule.decrypt}
    for parent, key, canonical, token, context_bytes, slot in pending:
        data_key = unwrapped[slot]
        try:
            if data_key is None:
                raise InvalidToken()
            plaintext = data_key.aead.open(token.iv, token.sealed, prefixes[canonical] + context_bytes)
            value = envelope.load_value(plaintext)
        except InvalidToken:
            _integrity_failure(rule, parent, key, canonical, report)
            continue
        if actions[canonical] == "mask_last4":
            parent[key] = reveal.mask_last4(value)
            report.withheld[canonical] += 1
            report.decrypted_for_mask[canonical] += 1
        else:
            parent[key] = value
            report.decrypted[canonical] += 1
    reveal.remove_all(removals)
    return report


async def _unwrap_older(
    keys: DataKeyCache,
    slot: tuple[str, bytes, bytes],
    spec: ContextSpec,
    exact: Mapping[str, str],
    pepper: Pepper,
    versions: Sequence[int],
) -> DataKey | None:
    """The slot's data key under the first of ``versions`` whose KMS context opens it."""
    key_ref, wrapped, _ = slot
    for version in versions:
        try:
            return await keys.decryption_key(key_ref, wrapped, kms_context(spec, exact, pepper, version))
        except InvalidToken:
            continue
    return None


async def _gather(calls: list[Awaitable[T]], *, return_exceptions: bool = False) -> list[Any]:
    """``asyncio.gather`` without a task per call when there is one call, the common case
    (one record, or one shared data key): a task costs more than a cached key lookup."""
    if len(calls) != 1:
        return list(await asyncio.gather(*calls, return_exceptions=return_exceptions))
    try:
        return [await calls[0]]
    except Exception as exc:
        if not return_exceptions:
            raise
        return [exc]


def _integrity_failure(
    rule: ResponseRule, parent: Any, key: Any, canonical: str, report: Report, action: str | None = None
) -> None:
    if (action or rule.on_error) == "fail":
        raise InvalidToken()
    parent[key] = None
    report.redacted[canonical] += 1
