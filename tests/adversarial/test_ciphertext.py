"""Ciphertext attacks, end to end: records are stored through a gateway, changed at rest as
someone with write access to the upstream's database would change them, and read back
through the gateway. A token that does not authenticate where it is read is redacted
(``on_error: redact``, ``GET /patients/{patient_id}``) or fails the whole response
(``on_error: fail``, the default, ``GET /patients``), exactly as the policy says; no
response ever carries the original plaintext, or another patient's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

from phi_gateway import b64url, envelope
from phi_gateway.aws import AwsSettings
from phi_gateway.demo_upstream import create_upstream
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.rewrap import Rewrapper, Target, rewrap_document
from phi_gateway.transform import Scope as DocScope
from tests.conftest import REGION
from tests.e2e.conftest import (
    PHI_CANARIES,
    POLICIES,
    Deployment,
    ThreadServer,
    Upstream,
    assert_no_phi,
    proxy_deployment,
)

PATIENT: dict[str, Any] = json.loads((Path(__file__).parents[1] / "samples" / "patient.json").read_text())
PHI_FIELDS = ("first_name", "last_name", "ssn", "dob", "phone", "notes")
# Patient B: values of their own, to prove they never reach a response about patient A.
OTHER = {
    **PATIENT,
    "first_name": "Bartholomew",
    "last_name": "Okonkwo-Zed",
    "ssn": "987-65-4320",
    "dob": "1975-07-04",
    "phone": "(555) 777-0199",
    "notes": "B-only note: latex anaphylaxis",
    "diagnoses": [{"code": "J45.909", "system": "ICD-10", "active": True}],
}
OTHER_CANARIES = (
    "Bartholomew",
    "Okonkwo-Zed",
    "987-65-4320",
    "987654320",
    "1975-07-04",
    "777-0199",
    "J45.909",
)


def assert_clean(response: httpx.Response, canaries: tuple[str, ...] = PHI_CANARIES) -> None:
    for canary in canaries:
        assert canary not in response.text, f"{canary!r} in a response"


def assert_redacted(response: httpx.Response, fields: tuple[str, ...]) -> None:
    """``on_error: redact``: exactly ``fields`` are null, and their plaintext is nowhere in the
    response; every other PHI field decrypts."""
    assert response.status_code == 200, response.text
    body = response.json()
    for name in PHI_FIELDS:
        if name in fields:
            assert body[name] is None, name
            assert PATIENT[name] not in response.text, name
        else:
            assert body[name] == PATIENT[name], name
    if "ssn" in fields:
        assert "123456789" not in response.text


def assert_failed(response: httpx.Response) -> None:
    """``on_error: fail``: the whole response is refused, nothing partial."""
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "integrity_error"
    assert_clean(response)
    assert_clean(response, OTHER_CANARIES)
    assert "phi:" not in response.text


def with_ssn(record: dict[str, Any], token: str) -> dict[str, Any]:
    return {**record, "ssn": token}


@dataclass
class Stage:
    """A gateway in front of the recording upstream, and direct access to the upstream's store."""

    gateway: Deployment
    client: httpx.Client  # to the gateway, as a clinician (sees every field)
    store: httpx.Client  # to the upstream, around the gateway: the attacker's access

    def put(self, pid: str, record: dict[str, Any] = PATIENT) -> dict[str, Any]:
        response = self.client.put(f"/patients/{pid}", json=record)
        assert response.status_code == 200, response.text
        return self.at_rest(pid)

    def at_rest(self, pid: str) -> dict[str, Any]:
        return self.store.get(f"/patients/{pid}").json()  # type: ignore[no-any-return]

    def tamper(self, record: dict[str, Any]) -> None:
        self.store.put(f"/patients/{record['id']}", json=record).raise_for_status()

    def read(self, pid: str) -> httpx.Response:
        return self.client.get(f"/patients/{pid}")

    def listing(self) -> httpx.Response:
        return self.client.get("/patients")


@contextlib.contextmanager
def stage(gateway: Deployment) -> Iterator[Stage]:
    with gateway.client() as client, httpx.Client(base_url=gateway.upstream.url, timeout=20) as store:
        yield Stage(gateway, client, store)


@pytest.fixture(scope="module")
def keyring_gateway(upstream_process: Upstream, secrets_dir: Path) -> Iterator[Deployment]:
    with proxy_deployment(upstream_process, secrets_dir) as gateway:
        yield gateway


@pytest.fixture
def keyring_stage(keyring_gateway: Deployment) -> Iterator[Stage]:
    """The keyring gateway over an empty store, so ``GET /patients`` lists only this test's records."""
    keyring_gateway.upstream.reset(data=True)
    with stage(keyring_gateway) as s:
        yield s
    assert_no_phi(keyring_gateway.upstream.received())


# -- every byte of the envelope ------------------------------------------------------------


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF], ids=["low-bit", "high-bit", "whole-byte"])
def test_every_single_byte_flip_of_a_stored_token_is_caught(keyring_stage: Stage, mask: int) -> None:
    """Every offset of the binary token: version, algorithm, key reference and its length,
    wrapped key and its length, IV, ciphertext, tag."""
    stored = keyring_stage.put("ct-flip")
    raw = b64url.decode(stored["ssn"].removeprefix(envelope.PREFIX))
    assert len(raw) == 33 + 22 + 61 + len(b'"123-45-6789"')  # docs/envelope.md, local keyring
    for offset in range(len(raw)):
        flipped = bytearray(raw)
        flipped[offset] ^= mask
        keyring_stage.tamper(with_ssn(stored, envelope.PREFIX + b64url.encode(bytes(flipped))))
        assert_redacted(keyring_stage.read("ct-flip"), ("ssn",))
        assert_failed(keyring_stage.listing())


def test_every_truncation_and_extension_of_a_stored_token_is_caught(keyring_stage: Stage) -> None:
    stored = keyring_stage.put("ct-cut")
    token = stored["ssn"]
    raw = b64url.decode(token.removeprefix(envelope.PREFIX))
    binary = [envelope.PREFIX + b64url.encode(raw[:n]) for n in range(len(raw))]
    text = [token[:n] for n in range(len(envelope.PREFIX), len(token))]  # cut anywhere after the prefix
    longer = [envelope.PREFIX + b64url.encode(raw + extra) for extra in (b"\0", b"\xff" * 16, raw)]
    for mutated in [*binary, *text, *longer]:
        keyring_stage.tamper(with_ssn(stored, mutated))
        assert_redacted(keyring_stage.read("ct-cut"), ("ssn",))
        assert_failed(keyring_stage.listing())
    assert len(binary) + len(text) + len(longer) == 129 + 172 + 3


def _text_mutations(token: str, rng: random.Random) -> list[str]:
    """A sample of edits to the token's text that keep its ``phi:`` prefix."""
    body = token.removeprefix(envelope.PREFIX)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    strangers = ["=", "+", "/", ".", " ", "\n", "\t", "%", "é", "\u0430", "\x00", "A=", "=="]
    out = []
    for pos in sorted(rng.sample(range(len(body)), 40)):
        other = rng.choice(alphabet.replace(body[pos], ""))
        out.append(body[:pos] + other + body[pos + 1 :])  # another base64url character
        out.append(body[:pos] + rng.choice(strangers) + body[pos + 1 :])  # outside the alphabet
        out.append(body[:pos] + body[pos + 1 :])  # a character dropped
        out.append(body[:pos] + body[pos] + body[pos:])  # a character doubled
    out += [body + "=", body + "==", body.upper(), body.lower(), body[::-1], body + body]
    return [envelope.PREFIX + m for m in out]


def test_a_sample_of_text_level_edits_is_caught(keyring_stage: Stage) -> None:
    stored = keyring_stage.put("ct-text")
    mutations = _text_mutations(stored["ssn"], random.Random(8))
    assert len(mutations) == 40 * 4 + 6
    for mutated in mutations:
        keyring_stage.tamper(with_ssn(stored, mutated))
        assert_redacted(keyring_stage.read("ct-text"), ("ssn",))
        assert_failed(keyring_stage.listing())


@pytest.mark.parametrize("edit", ["PHI:", "phi;", " phi:", "", "phi:phi:"])
def test_a_value_without_the_token_prefix_is_not_a_token(keyring_stage: Stage, edit: str) -> None:
    """A value that does not start with ``phi:`` is not a token: it passes as legacy plaintext
    (docs/policy.md: counted, and logged), so it is shown as stored. It never decrypts to
    anything; what the client sees is the attacker's own text."""
    stored = keyring_stage.put("ct-prefix")
    mutated = edit + stored["ssn"].removeprefix(envelope.PREFIX)
    keyring_stage.tamper(with_ssn(stored, mutated))
    single = keyring_stage.read("ct-prefix")
    if envelope.is_token(mutated):
        assert_redacted(single, ("ssn",))
        assert_failed(keyring_stage.listing())
    else:
        assert single.status_code == 200 and single.json()["ssn"] == mutated
        assert keyring_stage.listing().json()[0]["ssn"] == mutated


# -- tokens moved ------------------------------------------------------------------------


def test_tokens_swapped_between_fields_of_one_record(keyring_stage: Stage) -> None:
    stored = keyring_stage.put("ct-fields")
    keyring_stage.tamper({**stored, "ssn": stored["dob"], "dob": stored["ssn"], "phone": stored["last_name"]})
    assert_redacted(keyring_stage.read("ct-fields"), ("ssn", "dob", "phone"))
    assert_failed(keyring_stage.listing())


def test_a_token_copied_to_a_field_no_rule_decrypts_stays_a_token(keyring_stage: Stage) -> None:
    stored = keyring_stage.put("ct-outside")
    keyring_stage.tamper({**stored, "insurance": stored["ssn"], "ssn_was": stored["ssn"]})
    single = keyring_stage.read("ct-outside").json()
    assert single["ssn"] == PATIENT["ssn"]  # where it belongs, it decrypts
    assert single["insurance"] == single["ssn_was"] == stored["ssn"]  # elsewhere it is only ciphertext


def test_diagnosis_codes_swapped_within_one_array_still_decrypt(keyring_stage: Stage) -> None:
    """A known limit: the AAD binds the policy path (``$.diagnoses[*].code``), not the array
    index, so elements of one array of one record can be reordered (the patient's own values)."""
    stored = keyring_stage.put("ct-array")
    first, second = stored["diagnoses"]
    keyring_stage.tamper(
        {**stored, "diagnoses": [{**first, "code": second["code"]}, {**second, "code": first["code"]}]}
    )
    codes = [d["code"] for d in keyring_stage.read("ct-array").json()["diagnoses"]]
    assert codes == [PATIENT["diagnoses"][1]["code"], PATIENT["diagnoses"][0]["code"]]


def test_a_token_moved_to_another_patient(keyring_stage: Stage) -> None:
    keyring_stage.put("ct-a")
    other = keyring_stage.put("ct-b", OTHER)
    keyring_stage.tamper(with_ssn(keyring_stage.at_rest("ct-a"), other["ssn"]))
    single = keyring_stage.read("ct-a")
    assert_clean(single, OTHER_CANARIES)
    assert_redacted(single, ("ssn",))
    listing = keyring_stage.listing()
    assert_clean(listing, OTHER_CANARIES)
    assert_failed(listing)


def test_a_whole_record_moved_to_another_patient_id(keyring_stage: Stage) -> None:
    """B's stored record written over A's (the store keys it by A's id): every field is bound to B."""
    keyring_stage.put("ct-a")
    other = keyring_stage.put("ct-b", OTHER)
    keyring_stage.tamper({**other, "id": "ct-a"})
    single = keyring_stage.read("ct-a")
    assert_clean(single, OTHER_CANARIES)
    assert single.status_code == 200
    body = single.json()
    assert all(body[name] is None for name in PHI_FIELDS)
    assert [d["code"] for d in body["diagnoses"]] == [None]
    listing = keyring_stage.listing()
    assert_clean(listing, OTHER_CANARIES)
    assert_failed(listing)


def test_tokens_swapped_between_records_of_a_list(keyring_stage: Stage) -> None:
    a = keyring_stage.put("ct-a")
    b = keyring_stage.put("ct-b", OTHER)
    keyring_stage.tamper({**a, "notes": b["notes"]})
    keyring_stage.tamper({**b, "notes": a["notes"]})
    listing = keyring_stage.listing()
    assert_clean(listing, OTHER_CANARIES)
    assert_failed(listing)


# -- a malicious upstream ------------------------------------------------------------------


class Swapping:
    """A malicious upstream: the demo API, except that it answers ``GET /patients/{a}`` with
    the record of ``swap[a]``, intact, id and all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.swap: dict[str, str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in self.swap:
            path = self.swap[scope["path"]]
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


def test_an_upstream_answering_with_another_patients_record(secrets_dir: Path, tmp_path: Path) -> None:
    """``GET /patients/{patient_id}`` binds its context to the requested id (the path
    parameter), so B's intact record, returned for A, does not decrypt. Lists have only
    each record's own ``$.id`` to go by: there each record decrypts under its own id."""
    inner = create_upstream(str(tmp_path / "evil.sqlite"), record=True)
    evil = Swapping(inner)
    with (
        ThreadServer(evil) as server,
        proxy_deployment(Upstream(server.url), secrets_dir) as gateway,
        stage(gateway) as s,
    ):
        s.put("mu-a")
        s.put("mu-b", OTHER)
        post = s.client.post("/patients", json={**PATIENT, "id": "mu-c"})  # POST: the id in the body
        assert post.status_code == 201 and post.json()["ssn"] == PATIENT["ssn"]
        assert s.read("mu-c").json()["ssn"] == PATIENT["ssn"]  # read back under the path's id
        evil.swap["/patients/mu-a"] = "/patients/mu-b"
        swapped = s.read("mu-a")
        assert_clean(swapped, OTHER_CANARIES)
        assert swapped.status_code == 200
        body = swapped.json()
        assert body["id"] == "mu-b"  # the upstream's answer, bound to nobody the caller asked for
        assert all(body[name] is None for name in PHI_FIELDS)
        assert s.read("mu-b").json()["ssn"] == OTHER["ssn"]  # asked for B, B decrypts
        listing = s.client.get("/patients")
        assert listing.status_code == 200
        assert [(r["id"], r["ssn"]) for r in listing.json()] == [
            ("mu-a", PATIENT["ssn"]),
            ("mu-b", OTHER["ssn"]),
            ("mu-c", PATIENT["ssn"]),
        ]
    assert_no_phi(inner.state.received)
    assert_no_phi(inner.state.received, OTHER_CANARIES)


# -- key material swapped, with AWS KMS (moto) ----------------------------------------------


async def _create_key(moto_url: str) -> str:
    session = aioboto3.Session(region_name=REGION)
    async with session.client("kms", endpoint_url=moto_url) as kms:
        created = await kms.create_key(Description="phi-gateway adversarial key")
        return str(created["KeyMetadata"]["Arn"])


@dataclass
class Keys:
    moto_url: str
    current: str  # A: the gateway's current master key
    other: str  # B: another master key


@pytest.fixture(scope="module")
def keys(moto_url: str) -> Keys:
    return Keys(moto_url, asyncio.run(_create_key(moto_url)), asyncio.run(_create_key(moto_url)))


@contextlib.contextmanager
def kms_stage(keys: Keys, upstream: Upstream, secrets: Path, master_keys: list[str]) -> Iterator[Stage]:
    with (
        proxy_deployment(
            upstream, secrets, keyring=None, kms_key_ids=master_keys, aws_endpoint_url=keys.moto_url
        ) as gateway,
        stage(gateway) as s,
    ):
        yield s


@pytest.fixture(scope="module")
def current_only(keys: Keys, upstream_process: Upstream, secrets_dir: Path) -> Iterator[Deployment]:
    """A KMS gateway that knows only the current master key."""
    with proxy_deployment(
        upstream_process,
        secrets_dir,
        keyring=None,
        kms_key_ids=[keys.current],
        aws_endpoint_url=keys.moto_url,
    ) as gateway:
        yield gateway


def kms_calls(gateway: Deployment) -> Counter[str]:
    """KMS operations the gateway made so far, from its ``/metrics`` on the admin port."""
    assert gateway.admin_url is not None
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{gateway.admin_url}/metrics").text):
        if family.name == "phi_gateway_aws_calls":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["service"] == "KMS":
                    counts[sample.labels["operation"]] += int(sample.value)
    return counts


def graft(token: str, donor: str) -> str:
    """``token``'s IV, ciphertext and tag under ``donor``'s key reference and wrapped key."""
    parsed, giving = envelope.parse(token), envelope.parse(donor)
    return parsed.with_key(giving.key_ref, giving.wrapped_key).serialize()


@pytest.fixture
def fresh_store(upstream_process: Upstream) -> Iterator[Upstream]:
    upstream_process.reset(data=True)
    yield upstream_process
    assert_no_phi(upstream_process.received())
    assert_no_phi(upstream_process.received(), OTHER_CANARIES)


def test_wrapped_keys_from_another_context_or_master_key(
    keys: Keys, fresh_store: Upstream, secrets_dir: Path, current_only: Deployment
) -> None:
    with kms_stage(keys, fresh_store, secrets_dir, [keys.other, keys.current]) as s:
        under_other = s.put("kw-a")["ssn"]  # A's SSN, data key wrapped under B for A's context
    with kms_stage(keys, fresh_store, secrets_dir, [keys.current, keys.other]) as s:
        a = s.put("kw-a")
        b = s.put("kw-b", OTHER)
        assert envelope.parse(a["ssn"]).key_ref == keys.current
        assert envelope.parse(under_other).key_ref == keys.other
        s.gateway.keys.clear()

        # B's data key (another KMS context): KMS refuses to unwrap it under A's context.
        s.tamper(with_ssn(a, graft(a["ssn"], b["ssn"])))
        assert_redacted(s.read("kw-a"), ("ssn",))
        assert_failed(s.listing())

        # A data key for A's own context, but under the other (configured) master key: it
        # unwraps, and it is not the data key this ciphertext was sealed with: GCM fails.
        s.tamper(with_ssn(a, graft(a["ssn"], under_other)))
        assert_redacted(s.read("kw-a"), ("ssn",))
        assert_failed(s.listing())

        # The genuine token under the other master key: both keys are configured, so it reads.
        s.tamper(with_ssn(a, under_other))
        assert s.read("kw-a").json()["ssn"] == PATIENT["ssn"]

        # The other master key's wrapped key, claiming to be under the current key: Decrypt pins
        # KeyId to the claimed key. Real KMS answers IncorrectKeyException (-> invalid token,
        # redacted); moto answers AccessDeniedException, which the gateway reports as the key
        # service refusing it: 503, nothing decrypted.
        liar = envelope.parse(a["ssn"]).with_key(keys.current, envelope.parse(under_other).wrapped_key)
        s.tamper(with_ssn(a, liar.serialize()))
        refused = s.read("kw-a")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "key_access_denied"
        assert "phi:" not in refused.text

    # A gateway that knows only the current key: a token naming another master key is refused
    # without asking KMS (keys are pinned to kms_key_ids).
    with stage(current_only) as s:
        s.tamper(with_ssn(a, under_other))
        s.gateway.keys.clear()
        before = kms_calls(s.gateway)
        assert_redacted(s.read("kw-a"), ("ssn",))
        assert kms_calls(s.gateway) - before == Counter({"Decrypt": 1})  # the other fields' key only


def _set_byte(offset: int, value: int) -> Callable[[str], str]:
    def edit(token: str) -> str:
        raw = bytearray(b64url.decode(token.removeprefix(envelope.PREFIX)))
        raw[offset] = value
        return envelope.PREFIX + b64url.encode(bytes(raw))

    return edit


def _with_key(key_ref: str | None, wrapped: bytes | None) -> Callable[[str], str]:
    def edit(token: str) -> str:
        parsed = envelope.parse(token)
        return parsed.with_key(key_ref or parsed.key_ref, wrapped or parsed.wrapped_key).serialize()

    return edit


BEFORE_ANY_KMS_CALL = {
    "version-2": _set_byte(0, 0x02),
    "version-0": _set_byte(0, 0x00),
    "version-255": _set_byte(0, 0xFF),
    "algorithm-2": _set_byte(1, 0x02),
    "algorithm-0": _set_byte(1, 0x00),
    "algorithm-255": _set_byte(1, 0xFF),
    # KMS takes at most 6144 bytes: a longer "wrapped key" is forged, and must not turn into a
    # KMS error that looks like an outage.
    "wrapped-key-over-kms-limit": _with_key(None, bytes(6145)),
    "master-key-not-configured": _with_key("arn:aws:kms:us-east-1:123456789012:key/not-ours", None),
    "master-key-by-another-name": _with_key("alias/aws/s3", None),
}


@pytest.mark.parametrize("edit", list(BEFORE_ANY_KMS_CALL))
def test_an_unknown_version_algorithm_or_key_is_refused_before_any_kms_call(
    current_only: Deployment, fresh_store: Upstream, edit: str
) -> None:
    with stage(current_only) as s:
        stored = s.put("kv-a")
        # Only this one token in the record, so any KMS call could only be made for it.
        s.tamper({"id": "kv-a", "ssn": BEFORE_ANY_KMS_CALL[edit](stored["ssn"])})
        s.gateway.keys.clear()
        before = kms_calls(s.gateway)
        single = s.read("kv-a")
        assert single.status_code == 200 and single.json()["ssn"] is None
        assert_failed(s.listing())
        assert kms_calls(s.gateway) == before  # not one call
        # The control: the intact token, after the same cache flush, costs exactly one Decrypt.
        s.tamper({"id": "kv-a", "ssn": stored["ssn"]})
        s.gateway.keys.clear()
        assert s.read("kv-a").json()["ssn"] == PATIENT["ssn"]
        assert kms_calls(s.gateway) - before == Counter({"Decrypt": 1})


async def _rewrap(record: dict[str, Any], keys: Keys, secrets: Path) -> dict[str, Any]:
    """``phi-gateway rewrap`` (the library under it) of one stored record, to the other key."""
    route = load_policies([POLICIES]).match("GET", f"/patients/{record['id']}")
    assert route is not None and route.route.response is not None
    settings = AwsSettings(region=REGION, endpoint_url=keys.moto_url)
    async with KmsKeyProvider([keys.other, keys.current], settings) as kms:
        rewrapper = Rewrapper(
            kms,
            route.route.response,
            DocScope(route.params, {}),
            Target(keys.other, keys.other),
            pepper=Pepper.load(secrets / "pepper.json"),
        )
        moved = await rewrap_document(orjson.dumps(record), rewrapper)
    assert rewrapper.summary.rewrapped == 8 and rewrapper.summary.failed == 0
    return orjson.loads(moved)  # type: ignore[no-any-return]


def test_an_old_token_restored_after_rotation(keys: Keys, fresh_store: Upstream, secrets_dir: Path) -> None:
    """Binding gives integrity and placement, not freshness (README, threat model): a token
    restored from before a rotation reads as long as its old master key is configured, and
    stops reading once the old key is removed."""
    with kms_stage(keys, fresh_store, secrets_dir, [keys.current]) as s:
        old = s.put("kr-a")
    rewrapped = asyncio.run(_rewrap(old, keys, secrets_dir))
    assert {envelope.parse(rewrapped[f]).key_ref for f in PHI_FIELDS} == {keys.other}
    with kms_stage(keys, fresh_store, secrets_dir, [keys.other, keys.current]) as s:
        s.tamper(rewrapped)
        assert s.read("kr-a").json()["ssn"] == PATIENT["ssn"]
        # The patient's notes change after the rotation (written under the new key) ...
        s.put("kr-a", {**PATIENT, "notes": "updated after rotation"})
        assert s.read("kr-a").json()["notes"] == "updated after rotation"
        # ... and the attacker restores the record from before it: it reads, old notes and all.
        s.tamper(old)
        assert s.read("kr-a").json()["notes"] == PATIENT["notes"]
    with kms_stage(keys, fresh_store, secrets_dir, [keys.other]) as s:
        s.tamper(old)  # the old key is retired: the restored tokens name a key no longer trusted
        restored = s.read("kr-a")
        assert restored.status_code == 200
        assert all(restored.json()[name] is None for name in PHI_FIELDS)
        assert_failed(s.listing())
        s.tamper(rewrapped)  # what rewrap wrote still reads under the new key alone
        assert s.read("kr-a").json()["ssn"] == PATIENT["ssn"]
