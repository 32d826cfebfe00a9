"""``phi-gateway policy``, run as a real process from the repository root. Previews never show PHI."""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import pytest

from phi_gateway.exceptions import PolicyError
from phi_gateway.policy import load_policies

ROOT = Path(__file__).parents[1]
PATIENT = ROOT / "tests" / "samples" / "patient.json"
PATIENTS = ROOT / "tests" / "samples" / "patients.json"
PHI_KEYS = ("ssn", "dob", "phone", "notes", "last_name")
SSN = "123-45-6789"
# Characters of a token or a blind index: a short PHI value made only of these could occur there by chance.
TOKEN_ALPHABET = set(string.ascii_letters + string.digits + "-_:")


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "phi_gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


def preview(route: str, sample: Path | None = None, *options: str) -> subprocess.CompletedProcess[str]:
    stdin = sample.read_text(encoding="utf-8") if sample else ""
    return cli("policy", "preview", "--policies", "policies", "--route", route, *options, stdin=stdin)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def phi_values(sample: Path, keys: Iterable[str] = PHI_KEYS) -> set[str]:
    """Every string under a PHI key of each record, and every diagnosis code, non-empty."""
    data = json.loads(sample.read_text(encoding="utf-8"))
    values: set[str] = set()
    for record in data if isinstance(data, list) else [data]:
        for key in keys:
            values.update(_strings(record.get(key)))
        values.update(d["code"] for d in record.get("diagnoses", []))
    return {v for v in values if v}


def assert_no_phi(output: str, values: Iterable[str]) -> None:
    values = set(values)
    assert values
    for value in values:
        assert json.dumps(value) not in output
        assert json.dumps(value, ensure_ascii=False) not in output
        if len(value) >= 8 or not set(value) <= TOKEN_ALPHABET:
            assert value not in output


def _transformed(stdout: str) -> Any:
    """The JSON document the preview prints after its description."""
    start = stdout.index("\n{") + 1
    return json.loads(stdout[start:])


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    directory = tmp_path_factory.mktemp("keys")
    keyring, pepper = directory / "keyring.json", directory / "pepper"
    made_keyring = cli("keys", "init", str(keyring))
    made_pepper = cli("pepper", "init", str(pepper))
    assert made_keyring.returncode == 0, made_keyring.stderr
    assert made_pepper.returncode == 0, made_pepper.stderr
    return ("--keyring", str(keyring), "--pepper", str(pepper))


# --- check and schema -------------------------------------------------------------------------


def test_check_accepts_the_shipped_policies() -> None:
    done = cli("policy", "check", "policies")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: 2 policies, 9 routes (fhir-patient, patients)")
    assert done.stderr == ""


def test_check_lists_every_problem_of_the_broken_set() -> None:
    done = cli("policy", "check", "tests/policies/broken")
    assert done.returncode == 1
    assert done.stdout == ""
    with pytest.raises(PolicyError) as info:
        load_policies([ROOT / "tests" / "policies" / "broken"])
    expected = [str(p).replace(f"{ROOT}{os.sep}", "") for p in info.value.problems]
    *lines, count = done.stderr.splitlines()
    assert lines == expected
    assert count == f"{len(expected)} problem(s)"
    assert len(lines) == 21
    assert all(re.fullmatch(r"tests/policies/broken/[a-z-]+\.yaml:[0-9]+: \S.*", line) for line in lines)
    assert (
        "tests/policies/broken/mistakes.yaml:7: routes[0].request.context.ResourceId: "
        "path parameter {patientid} is not declared by '/patients/{patient_id}'"
    ) in lines


def test_check_of_a_missing_file() -> None:
    done = cli("policy", "check", "policies/missing.yaml")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "policies/missing.yaml:1: cannot read policy file: No such file or directory",
        "1 problem(s)",
    ]


def test_schema_prints_the_published_schema() -> None:
    done = cli("policy", "schema")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(
        (ROOT / "policies" / "schema.json").read_text(encoding="utf-8")
    )


# --- preview without keys: shapes only --------------------------------------------------------


def test_preview_of_a_request_lists_fields_and_indexes_but_no_phi() -> None:
    done = preview("PUT /patients/p-1001", PATIENT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == [
        "route: PUT /patients/{patient_id} (policies/patients.yaml:10)",
        "policy: patients",
        "records: 1 at $",
    ]
    for line in [
        "    context ResourceId = <param patient_id> (KMS: pseudonymize)",
        "    context Purpose = 'PHI_Storage' (KMS: plain)",
        "    encrypt $.ssn: string (11 chars)",
        "    encrypt $.dob: string (10 chars)",
        "    encrypt $.phone: string (14 chars)",
        "    encrypt $.notes: string (45 chars)",
        "    encrypt $.diagnoses[*].code: string (5 chars)",
        "    encrypt $.diagnoses[*].code: string (3 chars)",
        "    index ssn_bidx <- $.ssn (digits, 32 bits)",
        "    index phone_bidx <- $.phone (e164, 24 bits)",
        "    index name_dob_bidx <- $.last_name, $.dob (trim, lowercase, 24 bits)",
    ]:
        assert line in lines
    assert_no_phi(done.stdout + done.stderr, phi_values(PATIENT) | {"Maria", "123456789", "5552013344"})


def test_preview_of_a_response_lists_decrypt_and_reveal_but_no_phi() -> None:
    done = preview("GET /patients", PATIENTS, "--response")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "records: 3 at $[*]" in lines
    assert [line.strip() for line in lines if line.startswith("  record ")] == [
        "record 0:",
        "record 1:",
        "record 2:",
    ]
    for line in [
        "    decrypt, reveal to ['billing', 'clinician'] else mask_last4 $.ssn: string (11 chars)",
        "    decrypt, reveal to ['clinician'] else remove $.notes: string (23 chars)",
        "    decrypt, reveal to ['clinician'] else remove $.notes: object (2 members)",
        "    decrypt $.dob: string (10 chars)",
        "    decrypt $.phone: null",
        "    decrypt $.diagnoses[*].code: string (7 chars)",
        "query: ssn -> replaced by index ssn_bidx",
        "query: last_name, dob -> replaced by index name_dob_bidx",
    ]:
        assert line in lines
    assert not any(line.lstrip().startswith("encrypt ") for line in lines)
    assert_no_phi(done.stdout + done.stderr, phi_values(PATIENTS) | {"asthma"})


def test_preview_of_a_response_route_without_a_response_rule() -> None:
    done = preview("POST /fhir", ROOT / "tests" / "samples" / "fhir-bundle.json", "--response")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("no response rule: ")
    assert "decrypt" not in done.stdout


@pytest.mark.parametrize("route", ["GET /nowhere", "DELETE /patients/p-1001", "PATCH /patients/p-1001"])
def test_preview_of_a_route_no_policy_matches(route: str) -> None:
    done = preview(route, PATIENT)
    assert done.returncode == 0, done.stderr
    path = route.split(" ")[1]
    assert done.stdout == f"no policy route matches {route.split(' ')[0]} {path}: unmatched routes pass\n"


def test_preview_with_policies_that_do_not_load() -> None:
    done = cli(
        "policy", "preview", "--policies", "tests/policies/broken", "--route", "GET /patients", stdin="{}"
    )
    assert done.returncode == 1
    assert "policies do not load" in done.stderr
    assert "mistakes.yaml:7:" in done.stderr


# --- preview with keys: the transformed body --------------------------------------------------


def test_preview_with_keys_prints_tokens_and_indexes_but_no_phi(keys: tuple[str, ...]) -> None:
    done = preview("PUT /patients/p-1001", PATIENT, *keys)
    assert done.returncode == 0, done.stderr
    body = _transformed(done.stdout)
    for key in ("ssn", "dob", "phone", "notes"):
        assert body[key].startswith("phi:"), key
    assert [d["code"][:4] for d in body["diagnoses"]] == ["phi:", "phi:"]
    assert [d["system"] for d in body["diagnoses"]] == ["ICD-10", "ICD-10"]
    for index, bits in (("ssn_bidx", 32), ("phone_bidx", 24), ("name_dob_bidx", 24)):
        assert re.fullmatch(rf"[0-9]+:[0-9a-f]{{{bits // 4}}}", body[index]), (index, body[index])
    assert (body["id"], body["weight_kg"], body["smoker"], body["insurance"]) == ("p-1001", 71.5, False, None)
    phi = phi_values(PATIENT, ("ssn", "dob", "phone", "notes"))
    assert_no_phi(done.stdout + done.stderr, phi | {"123456789", "5552013344", "+15552013344", "19800229"})


def test_preview_with_keys_hides_the_last_name(keys: tuple[str, ...]) -> None:
    done = preview("PUT /patients/p-1001", PATIENT, *keys)
    assert done.returncode == 0, done.stderr
    assert _transformed(done.stdout)["last_name"].startswith("phi:")
    assert_no_phi(done.stdout, {"García"})


def test_preview_with_keys_rewrites_the_query_without_the_ssn(keys: tuple[str, ...]) -> None:
    done = preview(f"GET /patients?ssn={SSN}&x=1", None, *keys)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("query sent upstream: ")]
    query = parse_qs(line.removeprefix("query sent upstream: "), strict_parsing=True)
    assert set(query) == {"ssn_bidx", "x"}
    assert query["x"] == ["1"]
    assert re.fullmatch(r"[0-9]+:[0-9a-f]{8}", query["ssn_bidx"][0])
    assert "ssn_bidx=" in done.stdout
    assert "x=1" in done.stdout
    output = done.stdout + done.stderr
    for form in (SSN, SSN.replace("-", ""), quote(SSN, safe=""), SSN.replace("-", "%2D"), "ssn="):
        assert form not in output


def test_preview_with_keys_gives_the_same_index_to_the_query_and_the_record(keys: tuple[str, ...]) -> None:
    stored = _transformed(preview("PUT /patients/p-1001", PATIENT, *keys).stdout)
    searched = preview(f"GET /patients?ssn={SSN.replace('-', '')}", None, *keys)
    assert searched.returncode == 0, searched.stderr
    assert (
        f"query sent upstream: ssn_bidx={quote(stored['ssn_bidx'], safe='')}" in searched.stdout.splitlines()
    )


def _stored_patient(keys: tuple[str, ...]) -> Path:
    """The sample patient as the upstream stores it, written next to the keys."""
    done = preview("PUT /patients/p-1001", PATIENT, *keys)
    assert done.returncode == 0, done.stderr
    stored = Path(keys[1]).parent / "stored-patient.json"
    stored.write_text(json.dumps(_transformed(done.stdout)), encoding="utf-8")
    return stored


def test_preview_of_a_response_with_keys_shows_decrypted_fields_as_types_and_lengths(
    keys: tuple[str, ...],
) -> None:
    done = preview("GET /patients/p-1001", _stored_patient(keys), "--response", *keys)
    assert done.returncode == 0, done.stderr
    body = _transformed(done.stdout)
    assert (body["ssn"], body["dob"], body["notes"]) == (
        "<string (11 chars)>",
        "<string (10 chars)>",
        "<string (45 chars)>",
    )
    assert [d["code"] for d in body["diagnoses"]] == ["<string (5 chars)>", "<string (3 chars)>"]
    assert (body["id"], body["weight_kg"], body["insurance"]) == ("p-1001", 71.5, None)
    assert_no_phi(done.stdout + done.stderr, phi_values(PATIENT) | {"123456789", "5552013344"})


def test_preview_of_a_response_shows_plaintext_only_when_asked(keys: tuple[str, ...]) -> None:
    done = preview("GET /patients/p-1001", _stored_patient(keys), "--response", "--show-plaintext", *keys)
    assert done.returncode == 0, done.stderr
    body = _transformed(done.stdout)
    original = json.loads(PATIENT.read_text(encoding="utf-8"))
    assert {k: v for k, v in body.items() if not k.endswith("_bidx")} == original


@pytest.mark.parametrize("options", [("--show-plaintext",), ("--show-plaintext", "--response")])
def test_show_plaintext_needs_a_keyring_and_a_response(options: tuple[str, ...]) -> None:
    done = preview("GET /patients/p-1001", PATIENT, *options)
    assert done.returncode == 1
    assert "--show-plaintext only applies with --keyring and --response" in done.stderr


def test_show_plaintext_does_not_apply_to_a_request(keys: tuple[str, ...]) -> None:
    done = preview("PUT /patients/p-1001", PATIENT, "--show-plaintext", *keys)
    assert done.returncode == 1
    assert_no_phi(done.stdout + done.stderr, phi_values(PATIENT))


def test_preview_lists_an_index_only_where_its_fields_are_present(tmp_path: Path) -> None:
    patient = json.loads(PATIENT.read_text(encoding="utf-8"))
    del patient["dob"]
    patient["phone"] = None
    sample = tmp_path / "patient.json"
    sample.write_text(json.dumps(patient), encoding="utf-8")
    done = preview("PUT /patients/p-1001", sample)
    assert done.returncode == 0, done.stderr
    indexes = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("index ")]
    assert indexes == ["index ssn_bidx <- $.ssn (digits, 32 bits)"]


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [
        ({"ssn": SSN}, ["search $.ssn -> replaced by index ssn_bidx"]),
        (
            {"last_name": "García", "dob": "1980-02-29"},
            ["search $.last_name, $.dob -> replaced by index name_dob_bidx"],
        ),
        ({"last_name": "García"}, ["search $.last_name, $.dob: incomplete, refused (search_incomplete)"]),
        ({"limit": 5}, []),
    ],
)
def test_preview_of_search_criteria(tmp_path: Path, criteria: dict[str, Any], expected: list[str]) -> None:
    sample = tmp_path / "criteria.json"
    sample.write_text(json.dumps(criteria), encoding="utf-8")
    done = preview("POST /patients/search", sample)
    assert done.returncode == 0, done.stderr
    assert [
        line.strip() for line in done.stdout.splitlines() if line.strip().startswith("search ")
    ] == expected
