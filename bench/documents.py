"""Part 2: a whole ~100 KB document of 100 patients (500 PHI fields), encrypted on the way in
and decrypted on the way out, against the floor of parsing and writing it with orjson.

Keys come from a warm ``DataKeyCache`` over a ``LocalKeyring``: no key service is involved
(part 3 measures KMS). The policy is bench-local: the patients policy's POST rule, adapted
to a list of records.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson

from bench.common import Section, interleaved, interleaved_prepared, ms, ratio
from bench.profile import count_calls, describe, top_costs
from phi_gateway.cache import DataKeyCache
from phi_gateway.context import Pseudonymizer, encode_context
from phi_gateway.jsonvalue import loads_strict
from phi_gateway.keyring import LocalKeyring, new_master_key_id
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.rules import RequestRule, ResponseRule
from phi_gateway.transform import Scope, decrypt_response, encrypt_request, exact_context, kms_context

PATIENTS = 100
TARGET_BYTES = 100_000
PHI_FIELDS = ("first_name", "last_name", "ssn", "dob", "notes")
FIELDS_PER_DOC = PATIENTS * len(PHI_FIELDS)
INDEXES = ("ssn_bidx", "phone_bidx", "name_dob_bidx")

_PATHS = "[" + ", ".join(f'"$.{name}"' for name in PHI_FIELDS) + "]"
_BLIND_INDEXES = """
      blind_index:
        - {field: "$.ssn", into: ssn_bidx, normalize: digits, bits: 32}
        - {field: "$.phone", into: phone_bidx, normalize: e164, bits: 24}
        - {fields: ["$.last_name", "$.dob"], into: name_dob_bidx, normalize: [trim, lowercase], bits: 24}"""


def _policy(data_key: str) -> str:
    # per_policy: record values never reach KMS, so the id is bound (AAD) but not sent.
    resource = '"$.id"' if data_key == "per_policy" else '{path: "$.id", kms: pseudonymize}'
    context = f"""
      context:
        ResourceId: {resource}
        Purpose: PHI_Storage"""
    routes = []
    for path, indexes in (("/patients/batch", ""), ("/patients/batch-indexed", _BLIND_INDEXES)):
        routes.append(f"""
  - match: {{methods: [POST], path: "{path}"}}
    request:
      records: "$[*]"{context}
      encrypt: {_PATHS}{indexes}
    response:
      records: "$[*]"{context}
      decrypt: {_PATHS}""")
    return f"version: 1\nname: bench_{data_key}\ndata_key: {data_key}\nroutes:{''.join(routes)}\n"


def _rules(data_key: str, directory: Path) -> dict[str, Any]:
    """The bench policy's rules: ``plain`` and ``indexed`` requests, and the response."""
    path = directory / f"bench_{data_key}.yaml"
    path.write_text(_policy(data_key), encoding="utf-8")
    policies = load_policies([path])
    plain = policies.match("POST", "/patients/batch")
    indexed = policies.match("POST", "/patients/batch-indexed")
    assert plain is not None
    assert indexed is not None
    assert plain.route.request is not None
    assert indexed.route.request is not None
    assert plain.route.response is not None
    return {"plain": plain.route.request, "indexed": indexed.route.request, "response": plain.route.response}


FIRST = ("Maria", "James", "Aisha", "Wei", "Olga", "Mateo", "Priya", "Kwame", "Hannah", "Lucas")
LAST = ("Garcia", "Smith", "Okafor", "Chen", "Ivanova", "Rossi", "Patel", "Mensah", "Müller", "Silva")
CODES = (
    ("E11.9", "Type 2 diabetes mellitus without complications"),
    ("I10", "Essential (primary) hypertension"),
    ("J45.909", "Unspecified asthma, uncomplicated"),
    ("M54.5", "Low back pain"),
    ("F41.1", "Generalized anxiety disorder"),
)


def _patient(n: int, rng: random.Random, encounters: int) -> dict[str, Any]:
    note = (
        f"Seen for follow-up of {rng.choice(CODES)[1].lower()}. Reports adherence to medication,"
        f" no new symptoms. BP {rng.randint(110, 150)}/{rng.randint(70, 95)}. Continue plan and"
        " review labs at next visit in three months."
    )
    return {
        "id": f"p-{n:06d}",
        "first_name": rng.choice(FIRST),
        "last_name": rng.choice(LAST),
        "ssn": f"{rng.randint(100, 899)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
        "dob": f"{rng.randint(1940, 2010)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "phone": f"+1 617 555 {rng.randint(0, 9999):04d}",
        "notes": note[:200],
        "diagnoses": [{"code": c, "description": d} for c, d in rng.sample(CODES, 2)],
        # Not PHI under this policy: status, bookkeeping, scheduling and billing metadata.
        "status": rng.choice(("active", "inactive", "pending")),
        "clinic_id": f"clinic-{rng.randint(1, 40):03d}",
        "created_at": "2024-01-15T09:30:00Z",
        "updated_at": "2025-06-02T14:05:00Z",
        "version": rng.randint(1, 20),
        "preferences": {"language": "en", "contact": "sms", "portal": True, "reminders_days": 2},
        "insurance": {"plan": "PPO-Gold", "tier": rng.randint(1, 3), "copay_cents": 2500, "active": True},
        "encounters": [
            {
                "id": f"enc-{n:06d}-{k:02d}",
                "kind": rng.choice(("office", "telehealth", "lab", "imaging")),
                "status": "completed",
                "minutes": rng.randint(10, 60),
                "department": rng.choice(("cardiology", "primary-care", "endocrinology")),
                "billing": {
                    "cpt": f"992{rng.randint(11, 15)}",
                    "units": 1,
                    "amount_cents": rng.randint(5000, 30000),
                },
            }
            for k in range(encounters)
        ],
    }


def _document() -> list[dict[str, Any]]:
    """100 patients, grown with encounters until the compact JSON reaches ~100 KB."""
    for encounters in range(1, 20):
        doc = [_patient(n, random.Random(n), encounters) for n in range(PATIENTS)]
        if len(orjson.dumps(doc)) >= TARGET_BYTES * 0.95:
            return doc
    raise AssertionError("document never reached its target size")


# Newer ``loads_strict`` takes the member names a request rule protects and refuses keys that
# spell them in another case; the gateway passes them on requests, and so does the bench.
GUARDED = "protected" in inspect.signature(loads_strict).parameters


def _loads_for_gateway(protected: set[str]) -> Callable[[bytes], Any]:
    """``loads_strict`` as the gateway calls it on requests."""
    if GUARDED:
        return lambda raw: loads_strict(raw, protected=protected)
    return loads_strict


def run(context: dict[str, Any]) -> Section:
    quick = bool(context.get("quick"))
    rounds, min_time, profile_seconds = (5, 0.02, 0.5) if quick else (15, 0.1, 2.0)
    loop = asyncio.new_event_loop()
    try:
        return _run(loop, rounds, min_time, profile_seconds, context.get("crypto"))
    finally:
        loop.close()


def _run(
    loop: asyncio.AbstractEventLoop,
    rounds: int,
    min_time: float,
    profile_seconds: float,
    crypto: dict[str, Any] | None,
) -> Section:
    def wait(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return loop.run_until_complete(coroutine)

    with tempfile.TemporaryDirectory() as directory:
        per_record = _rules("per_record", Path(directory))
        per_policy = _rules("per_policy", Path(directory))
    master = new_master_key_id()
    keys = DataKeyCache(LocalKeyring({master: os.urandom(32)}, master), ttl=86_400)
    pepper = Pepper({1: os.urandom(32)}, 1)
    scope = Scope(params={}, headers={})
    plain_body = orjson.dumps(_document())
    parse_request = _loads_for_gateway(set(PHI_FIELDS))
    parse_indexed = _loads_for_gateway(set(PHI_FIELDS) | set(INDEXES))

    def encrypt(doc: Any, rule: RequestRule) -> Any:
        wait(encrypt_request(doc, rule, scope, keys=keys, pepper=pepper))
        return doc

    def decrypt(doc: Any, rule: ResponseRule) -> Any:
        wait(decrypt_response(doc, rule, scope, keys=keys, pepper=pepper, roles=None))
        return doc

    # Warm the cache (100 data keys per_record, 1 per_policy; the decrypt side is filled by the
    # read-back of every key this process wrapped) and make the upstream's stored bodies.
    encrypted_body = orjson.dumps(encrypt(orjson.loads(plain_body), per_record["plain"]))
    encrypted_policy_body = orjson.dumps(encrypt(orjson.loads(plain_body), per_policy["plain"]))
    indexed_body = orjson.dumps(encrypt(orjson.loads(plain_body), per_record["indexed"]))
    assert decrypt(orjson.loads(encrypted_body), per_record["response"]) == orjson.loads(plain_body)
    assert decrypt(orjson.loads(encrypted_policy_body), per_policy["response"]) == orjson.loads(plain_body)
    misses = keys.stats.encrypt_misses + keys.stats.decrypt_misses

    def fresh(body: bytes) -> Callable[[], Any]:
        return lambda: orjson.loads(body)

    def none() -> None:
        return None

    def full_encrypt(rules: dict[str, Any], kind: str = "plain") -> Callable[[Any], bytes]:
        parse = parse_indexed if kind == "indexed" else parse_request
        return lambda _: orjson.dumps(encrypt(parse(plain_body), rules[kind]))

    def full_decrypt(rules: dict[str, Any], body: bytes) -> Callable[[Any], bytes]:
        return lambda _: orjson.dumps(decrypt(loads_strict(body), rules["response"]))

    cases: dict[str, tuple[Callable[[], Any], Callable[[Any], object]]] = {
        "floor": (none, lambda _: orjson.dumps(orjson.loads(plain_body))),
        "parse": (none, lambda _: parse_request(plain_body)),
        "enc_transform": (fresh(plain_body), lambda doc: encrypt(doc, per_record["plain"])),
        "enc_full": (none, full_encrypt(per_record)),
        "enc_indexed": (none, full_encrypt(per_record, "indexed")),
        "enc_policy": (none, full_encrypt(per_policy)),
        "parse_encrypted": (none, lambda _: loads_strict(encrypted_body)),
        "dec_transform": (fresh(encrypted_body), lambda doc: decrypt(doc, per_record["response"])),
        "dec_full": (none, full_decrypt(per_record, encrypted_body)),
        "dec_policy": (none, full_decrypt(per_policy, encrypted_policy_body)),
        "loop": (none, lambda _: wait(asyncio.sleep(0))),
    }
    timed = interleaved_prepared(cases, rounds=rounds, min_time=min_time)
    assert keys.stats.encrypt_misses + keys.stats.decrypt_misses == misses, "the cache went cold"
    encrypt_once, decrypt_once = (lambda: cases["enc_full"][1](None)), (lambda: cases["dec_full"][1](None))
    profiles = {
        "encrypt": top_costs(encrypt_once, seconds=profile_seconds),
        "encrypt_modules": top_costs(encrypt_once, seconds=profile_seconds, by="module"),
        "decrypt": top_costs(decrypt_once, seconds=profile_seconds),
        "decrypt_modules": top_costs(decrypt_once, seconds=profile_seconds, by="module"),
    }
    spec = per_record["plain"].context
    exacts = [exact_context(spec, record, scope) for record in orjson.loads(plain_body)]
    kms_contexts = [kms_context(spec, exact, pepper) for exact in exacts]
    pseudonymizer = pepper.pseudonymizer(spec.policy)

    async def gathered() -> list[Any]:  # as the transform fetches several data keys
        return list(await asyncio.gather(*(keys.encryption_key(kms, uses=5) for kms in kms_contexts)))

    async def one_by_one() -> list[Any]:
        return [await keys.encryption_key(kms, uses=5) for kms in kms_contexts]

    alone = interleaved(
        {
            "encode_context": lambda: encode_context(exacts[0]),
            "pseudonym": lambda: pseudonymizer.pseudonym("ResourceId", exacts[0]["ResourceId"]),
            "gather": lambda: wait(gathered()),
            "one_by_one": lambda: wait(one_by_one()),
        },
        rounds=rounds,
        min_time=min_time / 4,
    )
    facts = {
        "encode_encrypt": count_calls(encrypt_once, encode_context) / PATIENTS,
        "encode_decrypt": count_calls(decrypt_once, encode_context) / PATIENTS,
        "pseudonym_encrypt": count_calls(encrypt_once, Pseudonymizer.pseudonym) / PATIENTS,
        "pseudonym_decrypt": count_calls(decrypt_once, Pseudonymizer.pseudonym) / PATIENTS,
        "objects": _objects(orjson.loads(plain_body)),
        **alone,
    }
    sizes = {
        "plain": len(plain_body),
        "per_record": len(encrypted_body),
        "per_policy": len(encrypted_policy_body),
        "indexed": len(indexed_body),
    }
    return _section(timed, sizes, profiles, facts, crypto)


def _objects(value: Any) -> int:
    """JSON objects in a document: how often a parser's object hook runs."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += 1
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


ROWS = {
    "floor": "floor: `orjson.loads` + `orjson.dumps` of the plaintext document",
    "parse": "`loads_strict` alone, plaintext document (request side"
    + (", with the protected names" if GUARDED else "")
    + ")",
    "enc_transform": "encrypt: `encrypt_request` alone (per_record)",
    "enc_full": "**encrypt: `loads_strict` → `encrypt_request` → `orjson.dumps`** (per_record)",
    "enc_indexed": "encrypt, full path, + 3 blind indexes per patient (per_record)",
    "enc_policy": "encrypt, full path, `data_key: per_policy`",
    "parse_encrypted": "`loads_strict` alone, encrypted document (response side)",
    "dec_transform": "decrypt: `decrypt_response` alone (per_record)",
    "dec_full": "**decrypt: `loads_strict` → `decrypt_response` → `orjson.dumps`** (per_record)",
    "dec_policy": "decrypt, full path, `data_key: per_policy`",
}


def _section(
    timed: dict[str, float],
    sizes: dict[str, int],
    profiles: dict[str, list[tuple[str, float]]],
    facts: dict[str, float],
    crypto: dict[str, Any] | None,
) -> Section:
    floor = timed["floor"]
    section = Section("2. Whole documents")
    section.add(
        f"A list of {PATIENTS} patient records, {sizes['plain']:,} bytes of compact JSON (id, names,"
        " SSN, date of birth, phone, a 200-character note, two diagnoses, and non-PHI status,"
        " insurance and encounter metadata), with"
        f" {len(PHI_FIELDS)} PHI fields encrypted per patient ({', '.join(PHI_FIELDS)}):"
        f" {FIELDS_PER_DOC} tokens per document. The policy is the patients policy's `POST /patients`"
        ' rule with `records: "$[*]"`, context `ResourceId` (the record\'s `$.id`, pseudonymized'
        " for KMS) and `Purpose`; blind indexes **off** unless the row says otherwise (then the"
        " patients policy's three: SSN, phone, last name + date of birth). Data keys come from a"
        " warm `DataKeyCache` over a `LocalKeyring`: **no key service call is timed** (part 3"
        " measures KMS); the bench checks that the cache never missed. Decrypt runs with no"
        " reveal rules (every field revealed, as for `roles=None`).",
        "",
        "The transform-alone rows get a freshly parsed document for each call, untimed; the full"
        " rows are the gateway's body path (`loads_strict` as the gateway calls it on requests,"
        " then the transform, then `orjson.dumps`). Each call enters an asyncio event loop once,"
        f" which alone costs {timed['loop'] * 1e6:,.0f} µs.",
        "",
    )
    section.table(
        ["case", "ms / document", "× floor", "µs / PHI field"],
        [
            [label, ms(timed[key]), ratio(timed[key], floor), f"{timed[key] * 1e6 / FIELDS_PER_DOC:,.1f}"]
            for key, label in ROWS.items()
        ],
    )
    same = sizes["per_policy"] == sizes["per_record"]
    section.add(
        f"Sizes: plaintext {sizes['plain']:,} B; encrypted {sizes['per_record']:,} B"
        f" ({sizes['per_record'] / sizes['plain']:.2f}×"
        + (", the same with per_policy keys" if same else f"; per_policy {sizes['per_policy']:,} B")
        + f"), {sizes['indexed']:,} B with blind indexes; local keyring tokens (KMS-wrapped keys"
        " make each token longer, see part 1).",
        "",
        "Profile (pyinstrument, full paths; time charged to the innermost phi_gateway function,"
        " `→` names the library call that dominates it):",
        "",
        f"- encrypt, per_record: {describe(profiles['encrypt'])}; by module:"
        f" {describe(profiles['encrypt_modules'])}",
        f"- decrypt, per_record: {describe(profiles['decrypt'])}; by module:"
        f" {describe(profiles['decrypt_modules'])}",
        "",
    )
    per_record_us = (timed["enc_full"] - timed["enc_policy"]) * 1e6 / PATIENTS
    encode_saving = (facts["encode_encrypt"] - 1) * facts["encode_context"] * PATIENTS
    indexes = PATIENTS * len(INDEXES)
    doc_field_us = timed["enc_transform"] * 1e6 / FIELDS_PER_DOC
    crypto_field = ""
    if crypto:
        ssn_doc = crypto["encrypt"][0]["ours_doc"]
        crypto_field = (
            f" (the crypto of one field inside a document is {ssn_doc * 1e6:,.1f} µs for an SSN,"
            " part 1; the rest is locating fields and building each record's context)"
        )
    section.add(
        f"**Where we stand.** Through the whole body path, encrypting the document takes"
        f" {ratio(timed['enc_full'], floor)} the orjson floor and decrypting it"
        f" {ratio(timed['dec_full'], floor)}; the transform alone costs {doc_field_us:,.1f} µs per"
        f" field{crypto_field}.",
        "",
        f"- **The strict parser** is {ratio(timed['parse'], floor)} the floor on its own"
        f" ({timed['parse'] / timed['enc_full']:.0%} of the encrypt path,"
        f" {timed['parse_encrypted'] / timed['dec_full']:.0%} of decrypt): stdlib `json` calls a"
        f" Python `object_pairs_hook` for each of the document's {facts['objects']:,.0f} objects"
        " (duplicate keys), then `_check` walks every value again (depth, finite floats, 64-bit"
        " integers). orjson keeps the last of duplicate keys silently and turns integers beyond 64"
        " bits into floats, so it cannot replace the strict parser as it is. An orjson-first path"
        " that detects duplicates by counting members outside strings (a regex) and walks for"
        " depth, big integers and case variants was tried and measured slower than the strict"
        " parser on a quiet machine (Python walks cost as much as the hook). What would close the"
        f" {(timed['parse'] - floor) * 1e3:,.1f} ms is a C parser that reports duplicate keys and"
        " raw integer literals, which orjson and the standard library do not.",
        f"- **Per record**, `context.encode_context` runs {facts['encode_encrypt']:.0f} times on"
        f" encrypt and {facts['encode_decrypt']:.0f} on decrypt ({facts['encode_context'] * 1e6:,.1f}"
        " µs each alone): the exact context for the AAD, again for the KMS context's digest, inside"
        " the pseudonym HMAC and in the cache's slot keys; the patient id's HMAC"
        f" pseudonym is made {facts['pseudonym_encrypt']:.0f}× per record on encrypt and"
        f" {facts['pseudonym_decrypt']:.0f}× on decrypt ({facts['pseudonym'] * 1e6:,.1f} µs each,"
        " `hmac.new` + base64). Encoding each context once and handing its bytes and digest"
        f" down would save ≈{encode_saving * 1e3:,.1f} ms per document on"
        " encrypt. A task per data key would cost more than the keys: `asyncio.gather` of 100"
        f" cache hits takes {facts['gather'] * 1e3:,.2f} ms per document, awaiting them one by one"
        f" {facts['one_by_one'] * 1e3:,.2f} ms; so the transform looks cache hits up synchronously"
        " (`DataKeyCache.cached_encryption_key`) and gathers only the misses (this bench's first"
        " runs found it). In all, per_policy data keys (one"
        f" KMS context for the whole document) are {per_record_us:,.1f} µs per record cheaper than"
        " per_record.",
        f"- **Blind indexes** add {(timed['enc_indexed'] - timed['enc_full']) * 1e3:,.2f} ms for"
        f" {indexes} indexes, {(timed['enc_indexed'] - timed['enc_full']) * 1e6 / indexes:,.1f} µs"
        " each (normalize, then HMAC-SHA256).",
    )
    return section
