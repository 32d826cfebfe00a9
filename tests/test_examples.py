"""The shipped example policies round-trip their sample payloads exactly, under both providers."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import Receive, Send
from starlette.types import Scope as AsgiScope

from phi_gateway import envelope
from phi_gateway.cache import DataKeyCache
from phi_gateway.exceptions import InvalidToken
from phi_gateway.keys import KeyProvider
from phi_gateway.middleware import PHIMiddleware
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.rules import PolicySet
from phi_gateway.transform import Scope, decrypt_response, encrypt_request
from tests.recording_keys import RecordingKeys

ROOT = Path(__file__).parents[1]
SAMPLES = Path(__file__).parent / "samples"
PHI_KEYS = {
    "ssn",
    "dob",
    "phone",
    "notes",
    "code",
    "family",
    "given",
    "birthDate",
    "line",
    "city",
    "postalCode",
}


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text())


def phi_strings(doc: Any, inside: bool = False) -> set[str]:
    """Every string under a PHI key (FHIR identifier values and telecom values included)."""
    found: set[str] = set()
    if isinstance(doc, dict):
        for key, value in doc.items():
            phi = (
                inside
                or key in PHI_KEYS
                or (key == "value" and doc.get("system") != "urn:oid:1.2.36.146.595.217.0.1")
            )
            found |= phi_strings(value, phi)
    elif isinstance(doc, list):
        for item in doc:
            found |= phi_strings(item, inside)
    elif isinstance(doc, str) and inside and len(doc) >= 3:
        found.add(doc)
    return found


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policies([ROOT / "policies"])


@pytest.fixture
def pepper() -> Pepper:
    return Pepper({1: b"example pepper, 32 bytes or more!"}, current=1)


async def transform(
    policies: PolicySet,
    method: str,
    target: str,
    doc: Any,
    provider: KeyProvider,
    pepper: Pepper,
    *,
    response: bool,
) -> Any:
    found = policies.match(method, target)
    assert found is not None, target
    scope = Scope(found.params, {})
    cache = DataKeyCache(provider)
    if response:
        assert found.route.response is not None
        await decrypt_response(doc, found.route.response, scope, keys=cache, pepper=pepper, roles=None)
    else:
        assert found.route.request is not None
        await encrypt_request(doc, found.route.request, scope, keys=cache, pepper=pepper)
    return doc


def without_indexes(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: without_indexes(v) for k, v in doc.items() if not k.endswith("_bidx")}
    if isinstance(doc, list):
        return [without_indexes(v) for v in doc]
    return doc


def assert_no_plaintext(stored: Any, original: Any) -> None:
    text = orjson.dumps(stored).decode()
    secrets = phi_strings(original)
    assert secrets, "the sample has PHI to look for"
    for secret in secrets:
        assert secret not in text, secret


async def test_patient_put_then_get(policies: PolicySet, provider: KeyProvider, pepper: Pepper) -> None:
    original = sample("patient.json")
    recording = RecordingKeys(provider)
    stored = await transform(
        policies, "PUT", "/patients/p-1001", copy.deepcopy(original), recording, pepper, response=False
    )
    assert_no_plaintext(stored, original)
    assert {"ssn_bidx", "phone_bidx", "name_dob_bidx"} <= stored.keys()
    assert all(envelope.is_token(d["code"]) for d in stored["diagnoses"])
    assert not any(
        "p-1001" in value for ctx in recording.generated + recording.unwrapped for value in ctx.values()
    )  # pseudonymized
    back = await transform(
        policies, "GET", "/patients/p-1001", copy.deepcopy(stored), recording, pepper, response=True
    )
    assert without_indexes(back) == original
    assert orjson.dumps(without_indexes(back)) == orjson.dumps(original)


async def test_patient_list_round_trips(policies: PolicySet, provider: KeyProvider, pepper: Pepper) -> None:
    original = sample("patients.json")
    stored = [
        await transform(policies, "POST", "/patients", copy.deepcopy(p), provider, pepper, response=False)
        for p in original
    ]
    assert_no_plaintext(stored, original)
    back = await transform(
        policies, "GET", "/patients", copy.deepcopy(stored), provider, pepper, response=True
    )
    assert without_indexes(back) == original
    assert stored[0]["ssn_bidx"] != stored[1]["ssn_bidx"]


async def test_fhir_patient_put_then_get(policies: PolicySet, provider: KeyProvider, pepper: Pepper) -> None:
    original = sample("fhir-patient.json")
    stored = await transform(
        policies, "PUT", "/fhir/Patient/example-42", copy.deepcopy(original), provider, pepper, response=False
    )
    assert_no_plaintext(stored, original)
    assert stored["identifier"][0]["value"] == "MRN-12345"  # not the SSN system: left alone
    assert stored["name"][0]["use"] == "official" and stored["resourceType"] == "Patient"
    back = await transform(
        policies, "GET", "/fhir/Patient/example-42", copy.deepcopy(stored), provider, pepper, response=True
    )
    assert without_indexes(back) == original


async def test_fhir_bundle_in_searchset_out(
    policies: PolicySet, provider: KeyProvider, pepper: Pepper
) -> None:
    original = sample("fhir-bundle.json")
    stored = await transform(
        policies, "POST", "/fhir", copy.deepcopy(original), provider, pepper, response=False
    )
    assert_no_plaintext(stored, original)
    assert "ssn_bidx" in stored["entry"][0]["resource"] and "ssn_bidx" not in stored["entry"][1]["resource"]
    searchset = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": e["resource"]} for e in stored["entry"]],
    }
    back = await transform(policies, "GET", "/fhir/Patient", searchset, provider, pepper, response=True)
    assert [without_indexes(e["resource"]) for e in back["entry"]] == [
        e["resource"] for e in original["entry"]
    ]


async def test_fhir_read_binds_the_requested_id_not_the_returned_one(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper
) -> None:
    """GET /fhir/Patient/{id} takes the patient from the path: an upstream answering this
    path with another patient's intact resource (its own id included) does not decrypt."""
    stored = await transform(
        policies,
        "PUT",
        "/fhir/Patient/example-42",
        sample("fhir-patient.json"),
        keyring,
        pepper,
        response=False,
    )
    with pytest.raises(InvalidToken):
        await transform(
            policies,
            "GET",
            "/fhir/Patient/someone-else",
            copy.deepcopy(stored),
            keyring,
            pepper,
            response=True,
        )


async def test_indexes_differ_between_fields_for_the_same_value(
    policies: PolicySet, keyring: KeyProvider, pepper: Pepper
) -> None:
    """Only the per-index key (HKDF over the policy and index names) tells these indexes
    apart: each is fed the same normalized value, with the same normalizers and bits."""
    patients = policies.match("PUT", "/patients/p-1")
    fhir = policies.match("PUT", "/fhir/Patient/x")
    assert patients is not None and patients.route.request is not None
    assert fhir is not None and fhir.route.request is not None
    by_name = {i.index.name: i.index for i in patients.route.request.blind_indexes}
    ssn = by_name["ssn_bidx"]
    # Another field of the same policy, alike in everything but its name.
    phone = dataclasses.replace(by_name["phone_bidx"], normalize=ssn.normalize, bits=ssn.bits)
    # The same index name and definition in another policy.
    (fhir_ssn,) = [i.index for i in fhir.route.request.blind_indexes if i.index.name == "ssn_bidx"]
    assert (fhir_ssn.normalize, fhir_ssn.bits) == (ssn.normalize, ssn.bits)
    value = "123-45-6789"
    assert len({index.normalized(value) for index in (ssn, phone, fhir_ssn)}) == 1
    assert len({index.compute(pepper, [value]) for index in (ssn, phone, fhir_ssn)}) == 3
    # And through the transform, as the upstream stores them.
    stored = await transform(
        policies, "PUT", "/patients/p-1", {"ssn": value}, keyring, pepper, response=False
    )
    resource = {"identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": value}]}
    fhir_stored = await transform(
        policies, "PUT", "/fhir/Patient/x", resource, keyring, pepper, response=False
    )
    assert stored["ssn_bidx"] == ssn.compute(pepper, [value])
    assert fhir_stored["ssn_bidx"] == fhir_ssn.compute(pepper, [value]) != stored["ssn_bidx"]


class Upstream:
    """An ASGI upstream that writes down every request it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.received.append((scope["path"], body))
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})


async def test_a_bare_patient_posted_where_a_bundle_is_expected_never_reaches_the_upstream(
    tmp_path: Path, keyring: KeyProvider, pepper: Pepper
) -> None:
    """POST /fhir selects the records of a Bundle (``$.entry[*].resource``): a bare Patient
    selects none, and would be forwarded as it is, PHI in plaintext, were it not refused."""
    text = (ROOT / "policies" / "fhir-patient.yaml").read_text(encoding="utf-8")
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "fhir-patient.yaml").write_text(
        text.replace("\nroutes:\n", "\nrequire_principal: false\nroutes:\n")
    )
    upstream = Upstream()
    app = PHIMiddleware(
        upstream, policies=load_policies([tmp_path / "policies"]), keys=DataKeyCache(keyring), pepper=pepper
    )
    patient = sample("fhir-patient.json")
    fhir_json = {"content-type": "application/fhir+json"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        refused = await client.post("/fhir", content=json.dumps(patient), headers=fhir_json)
        empty = await client.post(
            "/fhir", content=json.dumps({"resourceType": "Bundle", "entry": []}), headers=fhir_json
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "records_missing"
    for secret in phi_strings(patient):
        assert secret not in refused.text
    assert empty.status_code == 200  # nothing to protect: forwarded
    assert upstream.received == [("/fhir", orjson.dumps({"resourceType": "Bundle", "entry": []}))]
