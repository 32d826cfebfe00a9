from __future__ import annotations

import base64
import hashlib
import hmac
import math
import random
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest

from phi_gateway.blindindex import NORMALIZERS, BlindIndex, NormalizeError
from phi_gateway.exceptions import PepperError
from phi_gateway.pepper import Pepper

SECRET_V1 = hashlib.sha256(b"test pepper version 1").digest()
SECRET_V2 = hashlib.sha256(b"test pepper version 2").digest()
CANARY = "CANARY7319"


def _doc(versions: dict[int, bytes], current: int) -> bytes:
    peppers = {str(v): base64.urlsafe_b64encode(s).rstrip(b"=").decode() for v, s in versions.items()}
    return orjson.dumps({"format": "phi-gateway/pepper", "current": str(current), "peppers": peppers})


def _index(
    normalize: Sequence[str] = (), bits: int = 256, *, policy: str = "patients", name: str = "ssn_bidx"
) -> BlindIndex:
    return BlindIndex(policy=policy, name=name, normalize=tuple(normalize), bits=bits)


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _length_prefixed(values: Sequence[str]) -> bytes:
    out = struct.pack(">H", len(values))
    for value in values:
        raw = value.encode("utf-8")
        out += struct.pack(">I", len(raw)) + raw
    return out


def _expected_mac(secret: bytes, policy: str, name: str, values: Sequence[str]) -> bytes:
    key = _hkdf_sha256(secret, b"phi-gateway/pepper/v1", f"blind-index/{policy}/{name}".encode())
    return hmac.new(key, _length_prefixed(values), hashlib.sha256).digest()


def _hex(index: str) -> str:
    return index.split(":", 1)[1]


@pytest.fixture
def pepper() -> Pepper:
    return Pepper({1: SECRET_V1}, current=1)


@pytest.fixture
def rotated() -> Pepper:
    return Pepper({1: SECRET_V1, 2: SECRET_V2}, current=2)


@pytest.mark.parametrize(
    ("normalizer", "raw", "expected"),
    [
        ("trim", "  Jane \t  Q.\n Public  ", "Jane Q. Public"),
        ("trim", "\u00a0Doe\u00a0", "Doe"),
        ("lowercase", "Jane.DOE@Example.ORG", "jane.doe@example.org"),
        ("uppercase", "ab12cd", "AB12CD"),
        ("nfkc", "１２３", "123"),
        ("nfkc", "ﬁle", "file"),
        ("digits", "123-45-6789", "123456789"),
        ("digits", "12٣4", "124"),
        ("alnum", "MRN: 00-7731/b", "MRN007731b"),
        ("e164", "(555) 123-4567", "+15551234567"),
        ("e164", "1-555-123-4567", "+15551234567"),
        ("e164", "+44 20 7946 0958", "+442079460958"),
        ("e164", "0044 20 7946 0958", "+442079460958"),
        ("last4", "123-45-6789", "6789"),
        ("last4", "4111 1111 1111 1234", "1234"),
    ],
)
def test_normalizer_on_realistic_input(normalizer: str, raw: str, expected: str) -> None:
    assert NORMALIZERS[normalizer](raw) == expected
    assert _index([normalizer]).normalized(raw) == expected


@pytest.mark.parametrize(
    ("normalizer", "raw"),
    [
        ("e164", "555-1234"),
        ("e164", "+1 555 123 4567 8901 23"),
        ("e164", "020 7946 0958"),
        ("last4", "12"),
        ("last4", "ab-1-2-3"),
    ],
)
def test_normalizer_refuses_unusable_input(normalizer: str, raw: str) -> None:
    with pytest.raises(NormalizeError):
        NORMALIZERS[normalizer](raw)


def test_normalizers_apply_in_the_order_given() -> None:
    assert _index(["trim", "lowercase"]).normalized("  Jane   DOE ") == "jane doe"
    assert _index(["nfkc", "digits"]).normalized("ＳＳＮ １２３-４５-６７８９") == "123456789"
    with pytest.raises(NormalizeError):
        _index(["digits", "nfkc"]).normalized("１２３")


def test_equal_after_normalization_means_equal_index(pepper: Pepper) -> None:
    index = _index(["digits"])
    assert index.compute(pepper, ["123-45-6789"]) == index.compute(pepper, ["123 45 6789"])
    phone = _index(["e164"])
    assert phone.compute(pepper, ["(555) 123-4567"]) == phone.compute(pepper, ["+1 555 123 4567"])


def test_distinct_values_never_collide_at_full_length(pepper: Pepper) -> None:
    rng = random.Random(20240611)
    ssns = [f"{n:09d}" for n in rng.sample(range(10**9), 400)]
    index = _index(["digits"], bits=256)
    indexes = {index.compute(pepper, [f"{s[:3]}-{s[3:5]}-{s[5:]}"]) for s in ssns}
    assert len(indexes) == len(ssns)


def test_integers_are_indexed_as_decimal_text(pepper: Pepper) -> None:
    index = _index()
    assert index.compute(pepper, [12345]) == index.compute(pepper, ["12345"])
    assert index.compute(pepper, [-7]) == index.compute(pepper, ["-7"])


@pytest.mark.parametrize("value", [True, False, 3.5, None, {CANARY: 1}, [CANARY], b"123"])
def test_non_text_values_are_refused(pepper: Pepper, value: Any) -> None:
    with pytest.raises(NormalizeError) as caught:
        _index().compute(pepper, [value])
    assert CANARY not in str(caught.value)
    assert "3.5" not in str(caught.value)


@pytest.mark.parametrize(
    ("normalize", "value"),
    [
        (["trim"], "   \t "),
        (["digits"], "no digits here"),
        (["digits"], "٣٤٥"),
        (["alnum"], "--//--"),
        ([], ""),
    ],
)
def test_a_value_empty_after_normalization_is_refused(
    pepper: Pepper, normalize: list[str], value: str
) -> None:
    with pytest.raises(NormalizeError, match="empty"):
        _index(normalize).compute(pepper, [value])


@pytest.mark.parametrize(
    ("normalize", "value"),
    [
        (["e164"], f"{CANARY} 555-1234"),
        (["e164"], f"+{CANARY}"),
        (["e164"], "+1 555 123 4567 8901 23"),
        (["last4"], f"{CANARY[:-2]}"),
        (["digits"], "CANARY"),
        (["digits", "last4"], "SSN 12"),
    ],
)
def test_normalize_errors_never_quote_the_value(pepper: Pepper, normalize: list[str], value: str) -> None:
    with pytest.raises(NormalizeError) as caught:
        _index(normalize).compute(pepper, [value])
    message = str(caught.value)
    assert CANARY[:6] not in message
    assert "555" not in message and "12" not in message


@pytest.mark.parametrize("bits", [8, 12, 31, 64, 100, 128, 255, 256])
def test_index_is_version_then_hex_of_the_leading_bits(pepper: Pepper, bits: int) -> None:
    index = _index(["digits"], bits=bits)
    full = _index(["digits"], bits=256)
    spare = math.ceil(bits / 8) * 8 - bits
    for n in range(40):
        value = f"123-45-{n:04d}"
        version, hexed = index.compute(pepper, [value]).split(":")
        assert version == "1"
        assert len(hexed) == math.ceil(bits / 8) * 2
        assert int(hexed, 16) & ((1 << spare) - 1) == 0
        assert int(hexed, 16) >> spare == int(_hex(full.compute(pepper, [value])), 16) >> (256 - bits)


def test_full_length_index_is_hmac_sha256_under_an_hkdf_key(pepper: Pepper) -> None:
    index = _index(["digits"], bits=256)
    expected = _expected_mac(SECRET_V1, "patients", "ssn_bidx", ["123456789"])
    assert index.compute(pepper, ["123-45-6789"]) == "1:" + expected.hex()


def test_full_length_compound_index_matches_the_documented_encoding(pepper: Pepper) -> None:
    index = BlindIndex(policy="patients", name="name_dob_bidx", normalize=("trim",), bits=256, arity=2)
    expected = _expected_mac(SECRET_V1, "patients", "name_dob_bidx", ["Zoë Ångström", "1970-01-01"])
    assert index.compute(pepper, [" Zoë  Ångström ", "1970-01-01"]) == "1:" + expected.hex()


def test_index_is_separated_by_index_name(pepper: Pepper) -> None:
    a = _index(name="ssn_bidx").compute(pepper, ["123456789"])
    b = _index(name="ssn2_bidx").compute(pepper, ["123456789"])
    assert _hex(a) != _hex(b)


def test_index_is_separated_by_policy(pepper: Pepper) -> None:
    a = _index(policy="patients").compute(pepper, ["123456789"])
    b = _index(policy="claims").compute(pepper, ["123456789"])
    assert _hex(a) != _hex(b)


def test_index_is_separated_by_pepper_version(rotated: Pepper) -> None:
    index = _index()
    current = index.compute(rotated, ["123456789"])
    old = index.compute(rotated, ["123456789"], version=1)
    assert current.startswith("2:") and old.startswith("1:")
    assert _hex(current) != _hex(old)


def test_an_older_version_reproduces_its_own_index(pepper: Pepper, rotated: Pepper) -> None:
    index = _index(["digits"])
    written_before_rotation = index.compute(pepper, ["123-45-6789"])
    assert index.compute(rotated, ["123456789"], version=1) == written_before_rotation


def test_an_unknown_version_is_refused(rotated: Pepper) -> None:
    with pytest.raises(PepperError):
        _index().compute(rotated, ["123456789"], version=3)


def test_compound_index_depends_on_order_and_boundaries(pepper: Pepper) -> None:
    index = BlindIndex(policy="patients", name="pair_bidx", normalize=(), bits=256, arity=2)
    ab_c = index.compute(pepper, ["ab", "c"])
    assert ab_c != index.compute(pepper, ["c", "ab"])
    assert ab_c != index.compute(pepper, ["a", "bc"])
    assert ab_c == index.compute(pepper, ["ab", "c"])


@pytest.mark.parametrize("values", [[], ["only one"], ["a", "b", "c"]])
def test_compound_index_needs_exactly_its_arity(pepper: Pepper, values: list[str]) -> None:
    index = BlindIndex(policy="patients", name="pair_bidx", normalize=(), bits=64, arity=2)
    with pytest.raises(ValueError, match="takes 2 value"):
        index.compute(pepper, values)


_CHILD = """
import sys
from phi_gateway.blindindex import BlindIndex
from phi_gateway.pepper import Pepper

pepper = Pepper.from_json(sys.stdin.buffer.read(), "stdin")
index = BlindIndex(policy="patients", name="ssn_bidx", normalize=("digits",), bits=100)
print(index.compute(pepper, ["123-45-6789"]))
"""


def test_index_is_stable_across_processes(rotated: Pepper) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=_doc({1: SECRET_V1, 2: SECRET_V2}, current=2),
        capture_output=True,
        check=True,
        timeout=60,
    )
    here = _index(["digits"], bits=100).compute(rotated, ["123-45-6789"])
    assert child.stdout.decode().strip() == here


@pytest.mark.parametrize(
    "make",
    [
        lambda: _index(["digits", "soundex"]),
        lambda: _index(["Lowercase"]),
    ],
)
def test_unknown_normalizers_are_refused(make: Callable[[], BlindIndex]) -> None:
    with pytest.raises(ValueError, match="unknown normalizer"):
        make()


@pytest.mark.parametrize("bits", [0, 7, 257, 512, -8])
def test_bits_outside_8_to_256_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="between 8 and 256"):
        _index(bits=bits)
