"""The document engine: encrypt, index, decrypt and rewrite, on small policies."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest

from phi_gateway import envelope
from phi_gateway.cache import DataKeyCache
from phi_gateway.exceptions import DocumentError, InvalidToken, KeyUnavailable
from phi_gateway.keys import KeyProvider
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.rules import PolicySet
from phi_gateway.search import rewrite_query
from phi_gateway.transform import Scope, decrypt_response, encrypt_request

POLICY = """
version: 1
name: clinic
routes:
  - match: {methods: [PUT], path: "/patients/{pid}"}
    request:
      context: {ResourceId: "{pid}", Tenant: {header: X-Tenant}, Purpose: PHI_Storage}
      encrypt: ["$.ssn", "$.profile", "$.codes[*]"]
      blind_index:
        - {field: "$.ssn", into: ssn_bidx, normalize: digits, bits: 32}
        - {fields: ["$.last", "$.dob"], into: last_dob_bidx, normalize: [trim, lowercase], bits: 24}
  - match: {methods: [POST], path: "/patients"}
    request:
      records: "$.items[*]"
      context: {ResourceId: "$.id", Purpose: PHI_Storage}
      encrypt: ["$.ssn"]
  - match: {methods: [GET], path: "/patients"}
    query:
      - {param: ssn, blind_index: ssn_bidx}
      - {params: [last, dob], blind_index: last_dob_bidx}
    response:
      records: "$[*]"
      context: {ResourceId: "$.id", Purpose: PHI_Storage}
      decrypt: ["$.ssn"]
  - match: {methods: [GET], path: "/patients/{pid}"}
    response:
      context: {ResourceId: "{pid}", Tenant: {header: X-Tenant}, Purpose: PHI_Storage}
      decrypt: ["$.ssn", "$.profile", "$.codes[*]"]
  - match: {methods: [GET], path: "/lenient/{pid}"}
    response:
      context: {ResourceId: "{pid}", Tenant: {header: X-Tenant}, Purpose: PHI_Storage}
      decrypt: ["$.ssn", "$.profile", "$.codes[*]"]
      on_error: redact
  - match: {methods: [POST], path: "/patients/search"}
    request:
      criteria:
        - {field: "$.ssn", blind_index: ssn_bidx}
        - {fields: ["$.last", "$.dob"], blind_index: last_dob_bidx}
"""
SHARED = """
version: 1
name: shared
data_key: per_policy
routes:
  - match: {methods: [POST], path: "/notes"}
    request:
      records: "$[*]"
      context: {ResourceId: "$.patient", Purpose: Notes}
      encrypt: ["$.text"]
  - match: {methods: [GET], path: "/notes"}
    response:
      records: "$[*]"
      context: {ResourceId: "$.patient", Purpose: Notes}
      decrypt: ["$.text"]
"""
PATIENT = {
    "ssn": "123-45-6789",
    "last": " García ",
    "dob": "1980-02-29",
    "profile": {"allergies": ["penicillin"], "weight": 71.5, "smoker": False},
    "codes": ["E11.9", 42, None],
    "name": "not PHI here",
}
SCOPE = Scope({"pid": "p-1"}, {"x-tenant": "north"})


@pytest.fixture
def policies(tmp_path: Path) -> PolicySet:
    (tmp_path / "clinic.yaml").write_text(POLICY)
    (tmp_path / "shared.yaml").write_text(SHARED)
    return load_policies([tmp_path])


@pytest.fixture
def pepper() -> Pepper:
    return Pepper({1: b"p" * 32, 2: b"q" * 32}, current=2)


def rule(policies: PolicySet, method: str, path: str, part: str) -> Any:
    found = policies.match(method, path)
    assert found is not None
    return getattr(found.route, part)


async def put_patient(policies: PolicySet, cache: DataKeyCache, pepper: Pepper, doc: Any) -> Any:
    await encrypt_request(
        doc, rule(policies, "PUT", "/patients/p-1", "request"), SCOPE, keys=cache, pepper=pepper
    )
    return doc


async def test_round_trip_preserves_every_value_and_type(
    policies: PolicySet, provider: KeyProvider, pepper: Pepper
) -> None:
    cache = DataKeyCache(provider)
    stored = await put_patient(policies, cache, pepper, copy.deepcopy(PATIENT))
    text = orjson.dumps(stored).decode()
    for secret in ("123-45-6789", "penicillin", "E11.9", "71.5"):
        assert secret not in text
    assert stored["name"] == "not PHI here" and stored["last"] == " García "
    assert all(envelope.is_token(stored["codes"][i]) for i in range(3))
    response = copy.deepcopy(stored)
    report = await decrypt_response(
        response,
        rule(policies, "GET", "/patients/p-1", "response"),
        SCOPE,
        keys=DataKeyCache(provider),
        pepper=pepper,
        roles=None,
    )
    assert {k: v for k, v in response.items() if not k.endswith("_bidx")} == PATIENT
    assert orjson.dumps(response["profile"]) == orjson.dumps(PATIENT["profile"])
    assert report.decrypted == {"$.ssn": 1, "$.profile": 1, "$.codes[*]": 3}


async def test_one_data_key_and_one_random_call_per_document(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        return real(n)

    cache = DataKeyCache(keyring)
    monkeypatch.setattr(os, "urandom", counting)
    report = await encrypt_request(
        copy.deepcopy(PATIENT),
        rule(policies, "PUT", "/patients/p-1", "request"),
        SCOPE,
        keys=cache,
        pepper=pepper,
    )
    assert calls == [12 * 5]  # ssn, profile, three codes
    assert cache.stats.generate_calls == 1 and len(report.key_refs) == 1


async def test_token_moved_to_another_patient_tenant_or_field_fails(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper
) -> None:
    stored = await put_patient(policies, DataKeyCache(keyring), pepper, copy.deepcopy(PATIENT))
    get = rule(policies, "GET", "/patients/p-1", "response")
    for scope in (Scope({"pid": "p-2"}, {"x-tenant": "north"}), Scope({"pid": "p-1"}, {"x-tenant": "south"})):
        with pytest.raises(InvalidToken):
            await decrypt_response(
                copy.deepcopy(stored), get, scope, keys=DataKeyCache(keyring), pepper=pepper, roles=None
            )
    swapped = copy.deepcopy(stored)
    swapped["ssn"], swapped["profile"] = swapped["profile"], swapped["ssn"]
    with pytest.raises(InvalidToken):
        await decrypt_response(swapped, get, SCOPE, keys=DataKeyCache(keyring), pepper=pepper, roles=None)


async def test_on_error_redact_nulls_only_the_bad_field(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper
) -> None:
    stored = await put_patient(policies, DataKeyCache(keyring), pepper, copy.deepcopy(PATIENT))
    stored["ssn"] = stored["ssn"][:-4] + ("AAAA" if not stored["ssn"].endswith("AAAA") else "BBBB")
    stored["codes"][0] = "phi:garbage"
    lenient = rule(policies, "GET", "/lenient/p-1", "response")
    report = await decrypt_response(
        stored, lenient, SCOPE, keys=DataKeyCache(keyring), pepper=pepper, roles=None
    )
    assert stored["ssn"] is None and stored["codes"] == [None, 42, None]
    assert stored["profile"] == PATIENT["profile"]
    assert report.redacted == {"$.ssn": 1, "$.codes[*]": 1}


async def test_records_each_get_their_own_context(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper
) -> None:
    doc = {"items": [{"id": "a", "ssn": "1"}, {"id": 7, "ssn": "2"}, {"id": "c", "ssn": "3"}]}
    cache = DataKeyCache(keyring)
    report = await encrypt_request(
        doc, rule(policies, "POST", "/patients", "request"), SCOPE, keys=cache, pepper=pepper
    )
    assert [c["ResourceId"] for c in report.contexts] == ["a", "7", "c"]
    assert cache.stats.generate_calls == 3  # per_record: one data key per patient
    stored = copy.deepcopy(doc["items"])
    listing = [stored[2], stored[0], stored[1]]  # the upstream may reorder
    await decrypt_response(
        listing,
        rule(policies, "GET", "/patients", "response"),
        SCOPE,
        keys=DataKeyCache(keyring),
        pepper=pepper,
        roles=None,
    )
    assert [r["ssn"] for r in listing] == ["3", "1", "2"]
    moved = [{"id": "a", "ssn": doc["items"][2]["ssn"]}]  # patient c's token under patient a's id
    assert envelope.is_token(moved[0]["ssn"])
    with pytest.raises(InvalidToken):
        await decrypt_response(
            moved,
            rule(policies, "GET", "/patients", "response"),
            SCOPE,
            keys=DataKeyCache(keyring),
            pepper=pepper,
            roles=None,
        )


async def test_per_policy_data_key_serves_many_patients_but_binds_each(
    policies: PolicySet, keyring: KeyProvider
) -> None:
    notes = [{"patient": f"p-{i}", "text": f"note {i}"} for i in range(50)]
    cache = DataKeyCache(keyring)
    await encrypt_request(notes, rule(policies, "POST", "/notes", "request"), SCOPE, keys=cache, pepper=None)
    assert cache.stats.generate_calls == 1
    notes[0]["text"], notes[1]["text"] = notes[1]["text"], notes[0]["text"]
    with pytest.raises(InvalidToken):
        await decrypt_response(
            notes,
            rule(policies, "GET", "/notes", "response"),
            SCOPE,
            keys=DataKeyCache(keyring),
            pepper=None,
            roles=None,
        )


async def test_missing_context_is_refused_before_any_key_is_fetched(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper
) -> None:
    cache = DataKeyCache(keyring)
    doc = copy.deepcopy(PATIENT)
    with pytest.raises(DocumentError) as failure:
        await encrypt_request(
            doc,
            rule(policies, "PUT", "/patients/p-1", "request"),
            Scope({"pid": "p-1"}, {}),
            keys=cache,
            pepper=pepper,
        )
    assert failure.value.code == "context_missing" and "Tenant" in str(failure.value)
    assert cache.stats.generate_calls == 0


async def test_key_service_failure_leaves_no_field_encrypted_and_raises(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper
) -> None:
    class Down:
        default_master_key = keyring.default_master_key

        async def generate_data_key(self, *args: Any) -> Any:
            raise KeyUnavailable("KMS GenerateDataKey unreachable (test)")

    doc = copy.deepcopy(PATIENT)
    with pytest.raises(KeyUnavailable):
        await encrypt_request(
            doc,
            rule(policies, "PUT", "/patients/p-1", "request"),
            SCOPE,
            keys=DataKeyCache(Down()),
            pepper=pepper,
        )  # type: ignore[arg-type]
    assert doc["ssn"] == PATIENT["ssn"]  # untouched: the caller must not forward it


async def test_blind_indexes_are_written_and_a_client_cannot_forge_one(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper
) -> None:
    doc = {**copy.deepcopy(PATIENT), "ssn_bidx": "forged", "last_dob_bidx": "forged"}
    del doc["dob"]
    await put_patient(policies, DataKeyCache(keyring), pepper, doc)
    assert doc["ssn_bidx"].startswith("2:") and len(doc["ssn_bidx"]) == 2 + 8
    assert "last_dob_bidx" not in doc  # one of its fields is missing: no index, and no forgery
    same = await put_patient(policies, DataKeyCache(keyring), pepper, {**PATIENT, "ssn": "123 45 6789"})
    assert same["ssn_bidx"] == doc["ssn_bidx"]
    assert same["last_dob_bidx"] != same["ssn_bidx"]


async def test_search_criteria_are_replaced_by_their_index(policies: PolicySet, pepper: Pepper) -> None:
    doc = {"ssn": "123-45-6789", "limit": 10}
    await encrypt_request(
        doc,
        rule(policies, "POST", "/patients/search", "request"),
        SCOPE,
        keys=None,
        pepper=pepper,  # type: ignore[arg-type]
    )
    index = rule(policies, "GET", "/patients", "query")[0].index
    # The fixture pepper is mid-rotation: one index per version, current first.
    assert doc == {
        "limit": 10,
        "ssn_bidx": [index.compute(pepper, ["123456789"], 2), index.compute(pepper, ["123456789"], 1)],
    }


async def test_compound_criteria_are_replaced_by_their_index(policies: PolicySet, pepper: Pepper) -> None:
    doc = {"last": " García ", "dob": "1980-02-29", "limit": 10}
    search = rule(policies, "POST", "/patients/search", "request")
    await encrypt_request(doc, search, SCOPE, keys=None, pepper=pepper)  # type: ignore[arg-type]
    index = search.criteria[1].index
    values = [" García ", "1980-02-29"]
    assert doc == {
        "limit": 10,
        "last_dob_bidx": [index.compute(pepper, values, 2), index.compute(pepper, values, 1)],
    }


@pytest.mark.parametrize(
    "criteria",
    [
        {"last": "García"},
        {"dob": "1980-02-29"},
        {"last": "García", "dob": None},
        {"ssn": None},
        {"ssn": "123-45-6789", "last": "García"},
    ],
)
async def test_partial_criteria_are_refused_not_widened(
    policies: PolicySet, pepper: Pepper, criteria: dict[str, Any]
) -> None:
    """Forwarded without the incomplete criterion, the search would match every record."""
    with pytest.raises(DocumentError) as failure:
        await encrypt_request(
            {**criteria, "limit": 10},
            rule(policies, "POST", "/patients/search", "request"),
            SCOPE,
            keys=None,  # type: ignore[arg-type]
            pepper=pepper,
        )
    assert failure.value.code == "search_incomplete"
    assert "García" not in str(failure.value) and "1980" not in str(failure.value)


async def test_search_without_any_criteria_passes(policies: PolicySet, pepper: Pepper) -> None:
    doc = {"limit": 10}
    search = rule(policies, "POST", "/patients/search", "request")
    await encrypt_request(doc, search, SCOPE, keys=None, pepper=pepper)  # type: ignore[arg-type]
    assert doc == {"limit": 10}


@pytest.mark.parametrize(
    "body",
    [
        {"id": "p-1", "ssn": "123-45-6789"},  # one record sent where a list of them was expected
        {"id": "p-1", "SSN": "123-45-6789"},  # in another case, as an upstream may read it
        {"data": [{"patient": {"ssn": "123-45-6789"}}]},  # anywhere in the body
        {"Items": [{"id": "p-1", "ssn": "123-45-6789"}]},  # the records' member in another case
    ],
)
async def test_a_body_whose_records_select_nothing_is_refused_if_it_holds_protected_fields(
    policies: PolicySet, keyring: KeyProvider, body: dict[str, Any]
) -> None:
    request = rule(policies, "POST", "/patients", "request")
    with pytest.raises(DocumentError) as failure:
        await encrypt_request(body, request, SCOPE, keys=DataKeyCache(keyring), pepper=None)
    assert failure.value.code == "records_missing"
    assert "$.items[*]" in str(failure.value) and "123" not in str(failure.value)


@pytest.mark.parametrize("body", [{}, {"items": []}, {"items": [], "note": "none"}, [], "text", None])
async def test_a_body_whose_records_select_nothing_passes_when_there_is_nothing_to_protect(
    policies: PolicySet, keyring: KeyProvider, body: Any
) -> None:
    forwarded = copy.deepcopy(body)
    report = await encrypt_request(
        forwarded,
        rule(policies, "POST", "/patients", "request"),
        SCOPE,
        keys=DataKeyCache(keyring),
        pepper=None,
    )
    assert forwarded == body and report.records == 0 and not report.encrypted


def test_query_rewriting_leaves_no_plaintext(policies: PolicySet, pepper: Pepper) -> None:
    rules = rule(policies, "GET", "/patients", "query")
    query = "limit=5&ssn=123-45-6789&last=Garc%C3%ADa&dob=1980-02-29&ssn=987-65-4320"
    rewritten, counts = rewrite_query(query, rules, pepper)
    pairs = parse_qsl(rewritten)
    # The fixture pepper is mid-rotation: every searched value asks for both versions.
    assert [k for k, _ in pairs] == ["limit", *["ssn_bidx"] * 4, *["last_dob_bidx"] * 2]
    for secret in ("123", "987", "Garc", "1980", "%C3%AD"):
        assert secret not in rewritten.replace("ssn_bidx", "").replace("last_dob_bidx", "").split("=", 1)[1]
    assert counts == {"ssn_bidx": 2, "last_dob_bidx": 1}
    assert rewrite_query("limit=5", rules, pepper) == ("limit=5", {})


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("last=x", "search_incomplete"),
        ("last=x&dob=1&dob=2", "search_incomplete"),
        ("ssn=%FF", "query_invalid"),
        ("ssn=abc", "index_value_invalid"),
    ],
)
def test_bad_search_queries_are_refused(policies: PolicySet, pepper: Pepper, query: str, code: str) -> None:
    with pytest.raises(DocumentError) as failure:
        rewrite_query(query, rule(policies, "GET", "/patients", "query"), pepper)
    assert failure.value.code == code


async def test_records_that_are_not_objects_are_refused(policies: PolicySet, keyring: KeyProvider) -> None:
    with pytest.raises(DocumentError) as failure:
        await encrypt_request(
            {"items": ["x"]},
            rule(policies, "POST", "/patients", "request"),
            SCOPE,
            keys=DataKeyCache(keyring),
            pepper=None,
        )
    assert failure.value.code == "record_not_object"


async def test_legacy_plaintext_at_a_decrypt_path_is_counted_not_touched(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper
) -> None:
    doc = [{"id": "a", "ssn": "123-45-6789"}, {"id": "b", "ssn": None}]
    report = await decrypt_response(
        doc,
        rule(policies, "GET", "/patients", "response"),
        SCOPE,
        keys=DataKeyCache(keyring),
        pepper=pepper,
        roles=None,
    )
    assert doc[0]["ssn"] == "123-45-6789" and report.plaintext_seen == {"$.ssn": 1}


@pytest.mark.parametrize("on_plaintext", ["redact", "fail"])
async def test_on_plaintext_refuses_values_that_are_not_tokens(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper, on_plaintext: str
) -> None:
    # A token whose "phi:" prefix was altered in the database is plain text to the gateway:
    # where the policy says every value must be a token, it is not shown as PHI.
    cache = DataKeyCache(keyring)
    stored = await put_patient(policies, cache, pepper, {"ssn": "123-45-6789", "dob": "1970-01-01"})
    stored["ssn"] = "PHI:" + stored["ssn"][4:]
    strict = dataclasses.replace(
        rule(policies, "GET", "/patients/{id}", "response"), on_plaintext=on_plaintext
    )
    if on_plaintext == "fail":
        with pytest.raises(InvalidToken):
            await decrypt_response(stored, strict, SCOPE, keys=cache, pepper=pepper, roles=None)
        return
    report = await decrypt_response(stored, strict, SCOPE, keys=cache, pepper=pepper, roles=None)
    assert stored["ssn"] is None and stored["dob"] == "1970-01-01"
    assert report.redacted == {"$.ssn": 1} and report.plaintext_seen == {"$.ssn": 1}


async def test_pseudonymized_context_without_a_pepper_is_refused(
    policies: PolicySet, keyring: KeyProvider
) -> None:
    cache = DataKeyCache(keyring)
    doc = {"items": [{"id": "a", "ssn": "1"}]}
    with pytest.raises(DocumentError) as failure:
        await encrypt_request(
            doc, rule(policies, "POST", "/patients", "request"), SCOPE, keys=cache, pepper=None
        )
    assert failure.value.code == "configuration" and cache.stats.generate_calls == 0
    assert doc["items"][0]["ssn"] == "1"


REVEAL_POLICY = """
version: 1
name: reveal
routes:
  - match: {methods: [PUT], path: "/r/{pid}"}
    request:
      context: {ResourceId: {param: pid, kms: plain}}
      encrypt: ["$.ssn", "$.notes", "$.codes[*]", "$.dob"]
  - match: {methods: [GET], path: "/r/{pid}"}
    response:
      context: {ResourceId: {param: pid, kms: plain}}
      decrypt: ["$.ssn", "$.notes", "$.codes[*]", "$.dob"]
      reveal:
        "$.ssn": {roles: [clinician], otherwise: mask_last4}
        "$.notes": {roles: [clinician], otherwise: remove}
        "$.codes[*]": {roles: [clinician], otherwise: mask}
        "$.dob": {roles: [clinician], otherwise: token}
"""


async def test_withheld_fields_are_never_decrypted(tmp_path: Path, keyring: KeyProvider) -> None:
    (tmp_path / "reveal.yaml").write_text(REVEAL_POLICY)
    policies = load_policies([tmp_path / "reveal.yaml"])
    scope = Scope({"pid": "p-1"}, {})
    doc = {"ssn": "123-45-6789", "notes": "private", "codes": ["A", "B"], "dob": "1980-02-29"}
    await encrypt_request(
        doc, rule(policies, "PUT", "/r/p-1", "request"), scope, keys=DataKeyCache(keyring), pepper=None
    )
    stored = copy.deepcopy(doc)
    stored["notes"] = "phi:garbage-that-would-fail-integrity"  # on_error is fail: decrypting it would raise
    stored["codes"][0] = "phi:garbage"
    get = rule(policies, "GET", "/r/p-1", "response")
    viewer = copy.deepcopy(stored)
    report = await decrypt_response(
        viewer, get, scope, keys=DataKeyCache(keyring), pepper=None, roles=frozenset({"x"})
    )
    assert viewer == {"ssn": "*******6789", "codes": ["****", "****"], "dob": stored["dob"]}
    assert report.decrypted == {} and report.withheld == {
        "$.ssn": 1,
        "$.notes": 1,
        "$.codes[*]": 2,
        "$.dob": 1,
    }
    with pytest.raises(InvalidToken):  # a clinician does decrypt, and meets the tampered token
        await decrypt_response(
            copy.deepcopy(stored),
            get,
            scope,
            keys=DataKeyCache(keyring),
            pepper=None,
            roles=frozenset({"clinician"}),
        )


OVERLAP_POLICY = """
version: 1
name: overlap
routes:
  - match: {methods: [GET], path: "/o/{pid}"}
    response:
      context: {ResourceId: {param: pid, kms: plain}}
      decrypt: ["$.ids[*]", "$.ssn", "$.ids[0]"]
      reveal:
        "$.ids[0]": {roles: [clinician], otherwise: mask}
        "$.ssn": {roles: [clinician], otherwise: mask_last4}
"""


async def test_restricted_fields_stay_masked_even_in_plaintext_or_selected_twice(
    tmp_path: Path, keyring: KeyProvider
) -> None:
    (tmp_path / "overlap.yaml").write_text(OVERLAP_POLICY)
    get = rule(load_policies([tmp_path / "overlap.yaml"]), "GET", "/o/p-1", "response")
    doc = {"ssn": "123-45-6789", "ids": ["SECRET-ID-1", "public-2"]}  # stored before the gateway
    report = await decrypt_response(
        doc,
        get,
        Scope({"pid": "p-1"}, {}),
        keys=DataKeyCache(keyring),
        pepper=None,
        roles=frozenset({"billing"}),
    )
    assert doc == {"ssn": "*******6789", "ids": ["****", "public-2"]}
    assert report.plaintext_seen == {"$.ssn": 1, "$.ids[*]": 1}


async def test_no_caller_reveals_everything_by_leaving_roles_out(
    policies: PolicySet, provider: KeyProvider, pepper: Pepper
) -> None:
    """``roles=None`` (everything) must be said: left out, the call does not run."""
    cache = DataKeyCache(provider)
    stored = await put_patient(policies, cache, pepper, copy.deepcopy(PATIENT))
    get = rule(policies, "GET", "/patients/p-1", "response")
    with pytest.raises(TypeError, match="roles"):
        await decrypt_response(stored, get, SCOPE, keys=cache, pepper=pepper)  # type: ignore[call-arg]
    assert envelope.is_token(stored["ssn"])  # nothing was decrypted
