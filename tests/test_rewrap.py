"""Key rotation: ``phi-gateway rewrap`` run as a real process against the moto KMS server and
local keyrings, on data sets made by the gateway's own engine."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from phi_gateway import b64url, envelope
from phi_gateway.aws import AwsSettings
from phi_gateway.cache import DataKeyCache
from phi_gateway.exceptions import KeyringError
from phi_gateway.keyring import LocalKeyring, create_keyring, rotate_keyring
from phi_gateway.keys import KeyProvider
from phi_gateway.kms import KmsKeyProvider
from phi_gateway.pepper import Pepper, new_pepper_document
from phi_gateway.policy import load_policies
from phi_gateway.rewrap import Rewrapper, Target, rewrap_document
from phi_gateway.rules import PolicySet
from phi_gateway.secretfile import create_private_file
from phi_gateway.transform import Scope, decrypt_response, encrypt_request
from tests.conftest import REGION

T = TypeVar("T")
CANARY = "CANARY-987-65-4321"
FIELDS = '["$.ssn", "$.dob", "$.profile", "$.diagnoses[*].code"]'
PATIENTS_POLICY = f"""
version: 1
name: patients
routes:
  - match: {{methods: [PUT], path: "/patients/{{patient_id}}"}}
    request:
      context: {{ResourceId: {{param: patient_id, kms: pseudonymize}}, Purpose: PHI_Storage}}
      encrypt: {FIELDS}
  - match: {{methods: [GET], path: "/patients"}}
    response:
      records: "$[*]"
      context: {{ResourceId: {{path: "$.id", kms: pseudonymize}}, Purpose: PHI_Storage}}
      decrypt: {FIELDS}
  - match: {{methods: [GET], path: "/patients/{{patient_id}}"}}
    response:
      context: {{ResourceId: {{path: "$.id", kms: pseudonymize}}, Purpose: PHI_Storage}}
      decrypt: {FIELDS}
"""
NOTES_POLICY = """
version: 1
name: notes
data_key: per_policy
routes:
  - match: {methods: [POST], path: "/notes"}
    request:
      records: "$[*]"
      context: {NoteId: "$.id", Purpose: Notes}
      encrypt: ["$.text"]
  - match: {methods: [GET], path: "/notes"}
    response:
      records: "$[*]"
      context: {NoteId: "$.id", Purpose: Notes}
      decrypt: ["$.text"]
  - match: {methods: [GET], path: "/notes/{note_id}"}
    response:
      context: {NoteId: "{note_id}", Purpose: Notes}
      decrypt: ["$.text"]
"""


def patient(n: int) -> dict[str, Any]:
    return {
        "id": f"p-{n}",
        "name_initial": "J",
        "ssn": CANARY if n == 0 else f"123-45-{n:04d}",
        "dob": f"19{50 + n}-01-0{1 + n % 9}",
        "profile": {"allergies": ["latex"], "weight_kg": 70.5 + n, "smoker": False, "note": None},
        "diagnoses": [{"code": f"E11.{n}"}, {"code": "I10"}],
    }


PATIENTS = [patient(n) for n in range(6)]


@pytest.fixture
def policies_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "patients.yaml").write_text(PATIENTS_POLICY)
    (directory / "notes.yaml").write_text(NOTES_POLICY)
    return directory


@pytest.fixture
def policies(policies_dir: Path) -> PolicySet:
    return load_policies([policies_dir])


def write_pepper(path: Path, versions: dict[int, bytes], current: int) -> Pepper:
    peppers = {str(v): b64url.encode(secret) for v, secret in versions.items()}
    doc = {"format": "phi-gateway/pepper", "current": str(current), "peppers": peppers}
    create_private_file(path, orjson.dumps(doc), "pepper file")
    return Pepper.load(path)


@pytest.fixture
def pepper_v1(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "pepper-1.json"
    create_private_file(path, new_pepper_document(1), "pepper file")
    return path, b64url.decode(orjson.loads(path.read_bytes())["peppers"]["1"])


def settings(moto_url: str) -> AwsSettings:
    return AwsSettings(region=REGION, endpoint_url=moto_url)


async def with_kms(keys: list[str], moto_url: str, work: Any) -> Any:
    async with KmsKeyProvider(keys, settings(moto_url)) as kms:
        return await work(kms)


async def store(
    provider: KeyProvider, policies: PolicySet, patients: list[dict[str, Any]], pepper: Pepper | None
) -> list[dict[str, Any]]:
    """What the upstream stores: each patient as the gateway encrypted its PUT."""
    cache = DataKeyCache(provider)
    stored = []
    for record in patients:
        doc = copy.deepcopy(record)
        found = policies.match("PUT", f"/patients/{record['id']}")
        assert found is not None and found.route.request is not None
        await encrypt_request(doc, found.route.request, Scope(found.params, {}), keys=cache, pepper=pepper)
        stored.append(doc)
    return stored


async def read_back(
    provider: KeyProvider, policies: PolicySet, docs: list[dict[str, Any]], pepper: Pepper | None
) -> list[dict[str, Any]]:
    """What a GET through the gateway returns; every token must authenticate."""
    cache = DataKeyCache(provider)
    out = []
    for doc in docs:
        plain = copy.deepcopy(doc)
        found = policies.match("GET", f"/patients/{doc['id']}")
        assert found is not None and found.route.response is not None
        report = await decrypt_response(
            plain, found.route.response, Scope(found.params, {}), keys=cache, pepper=pepper, roles=None
        )
        assert not report.redacted
        out.append(plain)
    return out


def tokens(doc: Any) -> list[str]:
    if isinstance(doc, dict):
        return [t for value in doc.values() for t in tokens(value)]
    if isinstance(doc, list):
        return [t for value in doc for t in tokens(value)]
    return [doc] if envelope.is_token(doc) else []


def key_refs(docs: list[Any]) -> Counter[str]:
    return Counter(envelope.parse(t).key_ref for doc in docs for t in tokens(doc))


def sealed_parts(docs: list[Any]) -> list[tuple[bytes, bytes]]:
    return [(p.iv, p.sealed) for doc in docs for p in map(envelope.parse, tokens(doc))]


def jsonl(docs: list[Any]) -> str:
    return "".join(json.dumps(doc) + "\n" for doc in docs)


def cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_GATEWAY_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "phi_gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def rewrap(
    policies_dir: Path, route: str, summary: Path, *args: str, **kwargs: Any
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = cli(
        "rewrap",
        "--policies",
        str(policies_dir),
        "--route",
        route,
        "--summary-json",
        str(summary),
        *args,
        **kwargs,
    )
    report = json.loads(summary.read_text()) if summary.exists() else {}
    if summary.exists():
        summary.unlink()
    return done, report


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """Independent CLI runs side by side: each process spends most of its time starting."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def kms_args(moto_url: str, *keys: str) -> list[str]:
    return ["--endpoint-url", moto_url, "--region", REGION, *(a for k in keys for a in ("--kms-key-id", k))]


def assert_no_plaintext(*texts: str) -> None:
    for text in texts:
        assert CANARY not in text
        assert "123-45-" not in text and "E11." not in text


def test_json_lines_move_from_key_a_to_key_b_and_still_decrypt(
    tmp_path: Path,
    policies_dir: Path,
    policies: PolicySet,
    pepper_v1: tuple[Path, bytes],
    kms_key: str,
    other_kms_key: str,
    moto_url: str,
) -> None:
    key_a, key_b = kms_key, other_kms_key
    pepper = Pepper.load(pepper_v1[0])
    stored = asyncio.run(with_kms([key_a], moto_url, lambda kms: store(kms, policies, PATIENTS, pepper)))
    # Failures to report, each left exactly as it was: a wrapped key tampered with, a record
    # whose context cannot be built, a line that is not JSON.
    tampered = envelope.parse(stored[1]["ssn"])
    stored[1]["ssn"] = tampered.with_key(tampered.key_ref, tampered.wrapped_key[:-1] + b"\0").serialize()
    del stored[2]["id"]
    lines = jsonl(stored[:3]).splitlines(keepends=True)
    text = "".join([*lines, "\n", "not json\n", jsonl(stored[3:])])

    done, summary = rewrap(
        policies_dir,
        "GET /patients/{patient_id}",
        tmp_path / "s.json",
        "--pepper",
        str(pepper_v1[0]),
        *kms_args(moto_url, key_b, key_a),
        stdin=text,
    )

    assert done.returncode == 1, done.stderr
    out = done.stdout.splitlines(keepends=True)
    assert len(out) == 8 and out[3] == "\n" and out[4] == "not json\n"
    moved = [json.loads(line) for n, line in enumerate(out) if n not in (3, 4)]
    assert moved[2] == stored[2] and moved[0]["ssn"] != stored[0]["ssn"]
    assert moved[1]["ssn"] == stored[1]["ssn"]  # the tampered token, untouched
    good = [moved[0], *moved[3:]]
    assert key_refs(good) == {key_b: 4 * 5}
    assert sealed_parts(good) == sealed_parts([stored[0], *stored[3:]])  # IV, ciphertext, tag
    back = asyncio.run(with_kms([key_b], moto_url, lambda kms: read_back(kms, policies, good, pepper)))
    assert back == [PATIENTS[0], *PATIENTS[3:]]

    tokens_found = 6 * 5
    assert summary["tokens"] == {
        "found": tokens_found,
        "rewrapped": 4 * 5 + 4,
        "reencrypted": 0,
        "current": 0,
        "failed": 6,
    }
    assert summary["before"] == {key_a: tokens_found}
    assert summary["after"] == {key_a: 6, key_b: 24}
    assert summary["documents"] == 7 and summary["outside"]["count"] == 0
    assert summary["key_service_calls"]["rewrap"] == 6  # one per data key: 5 patients, 1 forged
    assert [(f["location"], f["record"], f["field"], f["error"]) for f in summary["failures"]] == [
        ("line 2", 0, "$.ssn", "invalid_token"),
        ("line 3", 0, None, "context_missing"),
        ("line 5", None, None, "invalid_json"),
    ]
    assert key_a in done.stderr and "failed: line 3, record 0: context_missing" in done.stderr
    assert "phi:" not in done.stderr and "phi:" not in json.dumps(summary)  # no token, no key material
    assert_no_plaintext(done.stdout, done.stderr, json.dumps(summary))


def test_a_json_document_file_moves_once_and_a_second_run_changes_nothing(
    tmp_path: Path,
    policies_dir: Path,
    policies: PolicySet,
    pepper_v1: tuple[Path, bytes],
    kms_key: str,
    other_kms_key: str,
    moto_url: str,
) -> None:
    key_a, key_b = kms_key, other_kms_key
    pepper = Pepper.load(pepper_v1[0])
    stored = asyncio.run(with_kms([key_a], moto_url, lambda kms: store(kms, policies, PATIENTS, pepper)))
    source = tmp_path / "patients.json"
    source.write_text(json.dumps(stored, indent=2))
    args = ["--pepper", str(pepper_v1[0]), *kms_args(moto_url, key_b, key_a)]
    first, moved_path, again_path = tmp_path / "s.json", tmp_path / "moved.json", tmp_path / "again.json"

    done, summary = rewrap(policies_dir, "GET /patients", first, str(source), "-o", str(moved_path), *args)

    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and oct(moved_path.stat().st_mode & 0o777) == "0o600"
    assert moved_path.read_text().startswith("[\n  {")  # indented like its input
    moved = json.loads(moved_path.read_text())
    assert key_refs(moved) == {key_b: 30} and sealed_parts(moved) == sealed_parts(stored)
    back = asyncio.run(with_kms([key_b], moto_url, lambda kms: read_back(kms, policies, moved, pepper)))
    assert back == PATIENTS
    assert summary["tokens"]["rewrapped"] == 30 and summary["key_service_calls"]["rewrap"] == 6

    again, summary = rewrap(
        policies_dir, "GET /patients", first, str(moved_path), "-o", str(again_path), *args
    )

    assert again.returncode == 0, again.stderr
    assert again_path.read_bytes() == moved_path.read_bytes()
    assert summary["tokens"] == {"found": 30, "rewrapped": 0, "reencrypted": 0, "current": 30, "failed": 0}
    assert summary["before"] == summary["after"] == {key_b: 30}
    assert "rewrap" not in summary["key_service_calls"]
    assert "key service calls: none" in again.stderr
    assert_no_plaintext(done.stderr, again.stderr, moved_path.read_text())


def test_per_policy_data_keys_are_rewrapped_once_and_reencrypt_makes_fresh_ones(
    tmp_path: Path, policies_dir: Path, policies: PolicySet, kms_key: str, other_kms_key: str, moto_url: str
) -> None:
    key_a, key_b = kms_key, other_kms_key
    notes = [{"id": f"n-{n}", "text": CANARY if n == 3 else f"note {n}"} for n in range(12)]
    found = policies.match("POST", "/notes")
    assert found is not None and found.route.request is not None
    rule = found.route.request

    async def write(kms: KeyProvider) -> list[dict[str, Any]]:
        doc = copy.deepcopy(notes)
        await encrypt_request(doc, rule, Scope({}, {}), keys=DataKeyCache(kms), pepper=None)
        return doc

    stored = asyncio.run(with_kms([key_a], moto_url, write))
    assert len({envelope.parse(t).wrapped_key for t in tokens(stored)}) == 1  # one data key for all
    args = kms_args(moto_url, key_b, key_a)

    done, summary = rewrap(policies_dir, "GET /notes", tmp_path / "s.json", *args, stdin=json.dumps(stored))

    assert done.returncode == 0, done.stderr
    moved = json.loads(done.stdout)
    assert key_refs(moved) == {key_b: 12} and sealed_parts(moved) == sealed_parts(stored)
    assert summary["key_service_calls"]["rewrap"] == 1
    # A ciphertext changed in place: re-wrapping cannot see it (it never reads values);
    # re-encrypting authenticates every value and leaves that one alone.
    forged = envelope.parse(moved[5]["text"])
    moved[5]["text"] = envelope.Token(
        forged.key_ref, forged.wrapped_key, forged.iv, bytes([forged.sealed[0] ^ 1]) + forged.sealed[1:]
    ).serialize()

    again, summary = rewrap(
        policies_dir, "GET /notes", tmp_path / "s.json", "--reencrypt", *args, stdin=json.dumps(moved)
    )

    assert again.returncode == 1
    fresh = json.loads(again.stdout)
    assert fresh[5] == moved[5]
    assert summary["tokens"] == {"found": 12, "rewrapped": 0, "reencrypted": 11, "current": 0, "failed": 1}
    assert summary["failures"] == [
        {"location": "line 1", "record": 5, "field": "$.text", "error": "invalid_token"}
    ]
    assert summary["key_service_calls"] == {"generate": 1, "unwrap": 1}
    others = [n for n in range(12) if n != 5]
    before, after = sealed_parts([moved[n] for n in others]), sealed_parts([fresh[n] for n in others])
    assert all(b[0] != a[0] and b[1] != a[1] for b, a in zip(before, after, strict=True))
    assert key_refs(fresh) == {key_b: 12}

    async def read(kms: KeyProvider) -> list[dict[str, Any]]:
        response = policies.match("GET", "/notes")
        assert response is not None and response.route.response is not None
        doc = [fresh[n] for n in others]
        await decrypt_response(
            doc, response.route.response, Scope({}, {}), keys=DataKeyCache(kms), pepper=None, roles=None
        )
        return doc

    assert asyncio.run(with_kms([key_b], moto_url, read)) == [notes[n] for n in others]
    assert_no_plaintext(done.stdout, done.stderr, again.stdout, again.stderr)


def test_after_a_pepper_rotation_every_token_opens_under_the_current_key_and_pepper(
    tmp_path: Path,
    policies_dir: Path,
    policies: PolicySet,
    pepper_v1: tuple[Path, bytes],
    kms_key: str,
    other_kms_key: str,
    moto_url: str,
) -> None:
    key_a, key_b = kms_key, other_kms_key
    old_pepper = Pepper.load(pepper_v1[0])
    second = os.urandom(32)
    rotated_path = tmp_path / "pepper-2.json"
    rotated = write_pepper(rotated_path, {1: pepper_v1[1], 2: second}, 2)

    async def write() -> list[dict[str, Any]]:
        async with (
            KmsKeyProvider([key_a], settings(moto_url)) as a,
            KmsKeyProvider([key_b], settings(moto_url)) as b,
        ):
            return [
                *await store(a, policies, PATIENTS[:3], old_pepper),  # old key, old pepper
                *await store(b, policies, PATIENTS[3:5], old_pepper),  # current key, old pepper
                *await store(b, policies, PATIENTS[5:], rotated),  # current key, current pepper
            ]

    stored = asyncio.run(write())
    source, moved_path = tmp_path / "stored.jsonl", tmp_path / "moved.jsonl"
    source.write_text(jsonl(stored))
    args = ["--pepper", str(rotated_path), *kms_args(moto_url, key_b, key_a)]
    route = "GET /patients/{patient_id}"

    done, summary = rewrap(
        policies_dir, route, tmp_path / "s.json", str(source), "-o", str(moved_path), "--progress", *args
    )

    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("rewrap: 6 documents (100%)\n")
    moved = [json.loads(line) for line in moved_path.read_text().splitlines()]
    assert key_refs(moved) == {key_b: 30} and sealed_parts(moved) == sealed_parts(stored)
    only_current = Pepper({2: second}, 2)
    back = asyncio.run(with_kms([key_b], moto_url, lambda kms: read_back(kms, policies, moved, only_current)))
    assert back == PATIENTS
    assert summary["tokens"]["rewrapped"] == 25 and summary["tokens"]["current"] == 5
    assert summary["source_pepper_versions"] == {"1": 25}
    # Old pepper first costs a failed try each (6 + 4); the current patient is one check.
    assert summary["key_service_calls"]["rewrap"] == 11

    (again, summary), (trusted, trusted_summary) = concurrently(
        lambda: rewrap(policies_dir, route, tmp_path / "s1.json", str(moved_path), *args),
        lambda: rewrap(policies_dir, route, tmp_path / "s2.json", str(moved_path), "--trust-current", *args),
    )

    assert again.returncode == 0, again.stderr
    assert again.stdout == moved_path.read_text()
    assert summary["tokens"]["current"] == 30 and summary["key_service_calls"]["rewrap"] == 6  # checks
    assert trusted.returncode == 0 and trusted.stdout == moved_path.read_text()
    assert trusted_summary["tokens"]["current"] == 30 and "rewrap" not in trusted_summary["key_service_calls"]


def test_a_rotated_local_keyring_moves_its_tokens_and_strangers_are_reported(
    tmp_path: Path, policies_dir: Path, policies: PolicySet, pepper_v1: tuple[Path, bytes]
) -> None:
    ring, stranger = tmp_path / "ring.json", tmp_path / "stranger.json"
    old_id, _ = create_keyring(ring), create_keyring(stranger)
    pepper = Pepper.load(pepper_v1[0])
    stored = asyncio.run(store(LocalKeyring.load(ring), policies, PATIENTS, pepper))
    stored += asyncio.run(store(LocalKeyring.load(stranger), policies, [patient(9)], pepper))

    rotated = cli("keys", "rotate", str(ring))

    assert rotated.returncode == 0, rotated.stderr
    doc = orjson.loads(ring.read_bytes())
    new_id = doc["current"]
    assert new_id != old_id and new_id in rotated.stdout and set(doc["master_keys"]) == {old_id, new_id}
    assert oct(ring.stat().st_mode & 0o777) == "0o600"

    args = ["--keyring", str(ring), "--pepper", str(pepper_v1[0])]

    done, summary = rewrap(
        policies_dir, "GET /patients", tmp_path / "s.json", *args, stdin=json.dumps(stored)
    )

    assert done.returncode == 1
    moved = json.loads(done.stdout)
    assert moved[-1] == stored[-1] and key_refs(moved[:-1]) == {new_id: 30}
    assert sealed_parts(moved) == sealed_parts(stored)
    only_new = LocalKeyring({new_id: b64url.decode(doc["master_keys"][new_id])}, new_id)
    assert asyncio.run(read_back(only_new, policies, moved[:-1], pepper)) == PATIENTS
    assert {(f["record"], f["error"]) for f in summary["failures"]} == {(6, "unknown_master_key")}
    assert summary["tokens"]["failed"] == 5 and summary["key_service_calls"]["rewrap"] == 7
    assert_no_plaintext(done.stdout, done.stderr)


def test_tokens_outside_the_decrypt_paths_are_counted_and_left_alone(
    tmp_path: Path, policies_dir: Path, policies: PolicySet, pepper_v1: tuple[Path, bytes], keyring_path: Path
) -> None:
    pepper = Pepper.load(pepper_v1[0])
    stored = asyncio.run(store(LocalKeyring.load(keyring_path), policies, PATIENTS[:2], pepper))
    old_ref = envelope.parse(stored[0]["ssn"]).key_ref
    stored[1]["history"] = [{"ssn_was": stored[1]["ssn"]}]
    rotate_keyring(keyring_path)
    args = ["--keyring", str(keyring_path), "--pepper", str(pepper_v1[0]), "--format", "jsonl"]

    route = "GET /patients/{patient_id}"

    (done, summary), (allowed, _) = concurrently(
        lambda: rewrap(policies_dir, route, tmp_path / "s1.json", *args, stdin=jsonl(stored)),
        lambda: rewrap(
            policies_dir, route, tmp_path / "s2.json", "--allow-outside", *args, stdin=jsonl(stored)
        ),
    )

    assert done.returncode == 1, done.stderr
    assert summary["outside"] == {"count": 1, "by_key": {old_ref: 1}, "at": ["line 2, $.history[0].ssn_was"]}
    assert json.loads(done.stdout.splitlines()[1])["history"] == stored[1]["history"]
    assert summary["tokens"]["rewrapped"] == 10 and not summary["failures"]
    assert "tokens outside the route's decrypt paths" in done.stderr

    assert allowed.returncode == 0
    assert [json.loads(line).get("history") for line in allowed.stdout.splitlines()] == [
        None,
        stored[1]["history"],
    ]


def test_refusals_are_one_line_and_an_aborted_run_writes_nothing(
    tmp_path: Path, policies_dir: Path, keyring_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    ring = ["--keyring", str(keyring_path)]
    base = ["rewrap", "--policies", str(policies_dir), *ring, "--route"]
    no_rule, no_pepper, template, broken = concurrently(
        lambda: cli(*base, "PUT /patients/p-1", stdin="{}"),
        lambda: cli(*base, "GET /patients", stdin="[]"),
        lambda: cli(*base, "GET /notes/{note_id}"),
        lambda: cli(
            *base, "GET /notes", "--format", "json", "-o", str(out), stdin=f'[{{"text": "{CANARY}"}}'
        ),
    )
    assert no_rule.returncode == 1 and "no policy route with a response rule" in no_rule.stderr
    assert no_pepper.returncode == 1 and no_pepper.stderr.strip().endswith("give the pepper")
    assert template.returncode == 2 and "takes {note_id} from the path" in template.stderr
    assert broken.returncode == 1 and "not valid JSON" in broken.stderr
    assert not out.exists() and list(tmp_path.glob(".rewrap-*")) == []
    assert_no_plaintext(broken.stdout, broken.stderr)


async def test_the_library_splits_one_large_re_encryption_over_data_keys_within_the_cache_limits(
    policies: PolicySet, keyring: LocalKeyring
) -> None:
    notes = [{"id": f"n-{n}", "text": f"note {n}"} for n in range(10)]
    write, read = policies.match("POST", "/notes"), policies.match("GET", "/notes")
    assert write is not None and write.route.request and read is not None and read.route.response
    doc = copy.deepcopy(notes)
    await encrypt_request(doc, write.route.request, Scope({}, {}), keys=DataKeyCache(keyring), pepper=None)
    target = Target(keyring.default_master_key, keyring.default_master_key)
    rewrapper = Rewrapper(
        keyring,
        read.route.response,
        Scope({}, {}),
        target,
        reencrypt=True,
        cache=DataKeyCache(keyring, max_uses=3),
    )

    out = await rewrap_document(json.dumps(doc, indent=1).encode(), rewrapper)

    assert out.startswith(b"[\n  {")
    fresh = json.loads(out)
    assert len({envelope.parse(t).wrapped_key for t in tokens(fresh)}) == 4  # 3 + 3 + 3 + 1
    assert rewrapper.summary.reencrypted == 10 and dict(rewrapper.summary.calls) == {
        "generate": 4,
        "unwrap": 1,
    }
    await decrypt_response(
        fresh, read.route.response, Scope({}, {}), keys=DataKeyCache(keyring), pepper=None, roles=None
    )
    assert fresh == notes
    unchanged = json.dumps(doc).encode()
    again = Rewrapper(keyring, read.route.response, Scope({}, {}), target)
    assert await rewrap_document(unchanged, again) is unchanged  # nothing to move: the same bytes
    assert again.summary.current == 10 and not again.summary.calls["rewrap"]


async def test_keyring_rotation_keeps_every_key_and_refuses_what_load_refuses(
    tmp_path: Path, keyring_path: Path
) -> None:
    keyring = LocalKeyring.load(keyring_path)
    old_id = keyring.default_master_key
    data_key = await keyring.generate_data_key(old_id, {"ResourceId": "p-1"})
    new_id = rotate_keyring(keyring_path)
    newer_id = rotate_keyring(keyring_path)
    rotated = LocalKeyring.load(keyring_path)
    assert rotated.default_master_key == newer_id and len({old_id, new_id, newer_id}) == 3
    assert list(orjson.loads(keyring_path.read_bytes())["master_keys"]) == [old_id, new_id, newer_id]
    await rotated.decrypt_data_key(old_id, data_key.wrapped, {"ResourceId": "p-1"})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    os.chmod(keyring_path, 0o644)
    with pytest.raises(KeyringError, match="chmod 600"):
        rotate_keyring(keyring_path)
    link = tmp_path / "link.json"
    link.symlink_to(keyring_path)
    os.chmod(keyring_path, 0o600)
    content = keyring_path.read_bytes()
    with pytest.raises(KeyringError):
        rotate_keyring(link)
    broken = tmp_path / "broken.json"
    create_private_file(broken, b'{"format": "phi-gateway/local-keyring"}', "keyring")
    with pytest.raises(KeyringError, match="not a valid"):
        rotate_keyring(broken)
    assert keyring_path.read_bytes() == content and link.is_symlink()
    with pytest.raises(KeyringError):
        rotate_keyring(tmp_path / "missing.json")
