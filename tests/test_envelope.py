from __future__ import annotations

import base64
import datetime
import enum
import json
import math
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from phi_gateway import envelope
from phi_gateway.cache import DataKeyCache
from phi_gateway.context import encode_context
from phi_gateway.exceptions import (
    InvalidToken,
    KeyAccessDenied,
    PHIGatewayError,
    UnknownMasterKey,
    ValueNotEncryptable,
)
from phi_gateway.keys import DataKey, KeyProvider
from phi_gateway.kms import KmsKeyProvider

VECTORS = Path(__file__).parent / "vectors" / "envelope_v1.json"
DOC = Path(__file__).parent.parent / "docs" / "envelope.md"
CONTEXT = {"ResourceId": "patient-123", "Purpose": "PHI_Storage"}
FIELD = "$.ssn"

JSON_VALUES: list[Any] = [
    "123-45-6789",
    "",
    "ünïcødé ✓ 𝄞",
    0,
    -17,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    3.141592653589793,
    -0.0,
    1e-300,
    True,
    False,
    None,
    {},
    [],
    {
        "dob": "1980-02-29",
        "allergies": ["penicillin", None],
        "weight": 71.5,
        "nested": {"a": [1, {"b": True}]},
    },
    [1, "two", 3.0, [], {}],
]


async def seal(
    provider: KeyProvider, value: Any, context: dict[str, str] = CONTEXT, field: str = FIELD
) -> str:
    key = await DataKeyCache(provider).encryption_key(context)
    return envelope.encrypt(key, value, context=context, field=field)


async def open_token(
    provider: KeyProvider, text: str, context: dict[str, str] = CONTEXT, field: str = FIELD
) -> Any:
    """Decrypt with no cache in between, so every attempt reaches the provider."""
    token = envelope.parse(text)
    key = await provider.decrypt_data_key(token.key_ref, token.wrapped_key, context)
    return envelope.decrypt(key, token, context=context, field=field)


def raw(text: str) -> bytes:
    body = text.removeprefix(envelope.PREFIX)
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def text_of(data: bytes) -> str:
    return envelope.PREFIX + base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("value", JSON_VALUES, ids=lambda v: type(v).__name__)
async def test_every_json_type_round_trips_exactly(provider: KeyProvider, value: Any) -> None:
    token = await seal(provider, value)
    assert token.startswith("phi:") and envelope.is_token(token)
    back = await open_token(provider, token)
    assert back == value
    assert type(back) is type(value)
    assert json.dumps(back) == json.dumps(value)


async def test_same_value_encrypts_differently_each_time(keyring: KeyProvider) -> None:
    assert await seal(keyring, "123-45-6789") != await seal(keyring, "123-45-6789")


@pytest.mark.parametrize(
    ("context", "field"),
    [
        ({**CONTEXT, "ResourceId": "patient-124"}, FIELD),
        ({**CONTEXT, "Purpose": "Billing"}, FIELD),
        ({"ResourceId": "patient-123"}, FIELD),
        ({**CONTEXT, "Extra": ""}, FIELD),
        (CONTEXT, "$.dob"),
        (CONTEXT, "$.ssn "),
    ],
)
async def test_token_is_bound_to_its_context_and_field(
    provider: KeyProvider, context: dict[str, str], field: str
) -> None:
    token = await seal(provider, "123-45-6789")
    with pytest.raises(InvalidToken):
        await open_token(provider, token, context, field)


async def test_aad_alone_binds_patient_when_the_data_key_is_shared(keyring: KeyProvider) -> None:
    # Policy-wide data key (KMS context without the patient): the patient is still in the AAD.
    key = await DataKeyCache(keyring).encryption_key({"Purpose": "PHI_Storage"})
    token = envelope.parse(envelope.encrypt(key, "x", context=CONTEXT, field=FIELD))
    with pytest.raises(InvalidToken):
        envelope.decrypt(key, token, context={**CONTEXT, "ResourceId": "patient-999"}, field=FIELD)
    assert envelope.decrypt(key, token, context=CONTEXT, field=FIELD) == "x"


async def test_swapped_wrapped_key_is_rejected(provider: KeyProvider) -> None:
    victim = envelope.parse(await seal(provider, "123-45-6789"))
    donor = envelope.parse(await seal(provider, "000-00-0000"))  # same context, another data key
    forged = victim.with_key(donor.key_ref, donor.wrapped_key).serialize()
    with pytest.raises(InvalidToken):
        await open_token(provider, forged)


async def test_every_byte_flip_truncation_and_extension_is_rejected(provider: KeyProvider) -> None:
    token = await seal(provider, "123-45-6789")
    data = raw(token)
    parsed = envelope.parse(token)
    ref_start, ref_end = 3, 3 + len(parsed.key_ref)
    wrapped_start, wrapped_end = ref_end + 2, ref_end + 2 + len(parsed.wrapped_key)
    cases = [
        (i, data[:i] + bytes([data[i] ^ bit]) + data[i + 1 :])
        for i in range(len(data))
        for bit in (0x01, 0x80)
    ]
    cases += [(n, data[:n]) for n in range(len(data))]
    cases += [(len(data), data + b"\x00"), (len(data), data + data[-16:])]
    for where, forged in cases:
        expected: tuple[type[Exception], ...] = (InvalidToken,)
        if ref_start <= where < ref_end:
            expected = (InvalidToken, UnknownMasterKey)  # names a key this gateway does not trust
        elif wrapped_start <= where < wrapped_end and isinstance(provider, KmsKeyProvider):
            # moto's blob starts with its key id: a flip there reads to moto as another key,
            # which it refuses as AccessDenied where real KMS says InvalidCiphertext.
            expected = (InvalidToken, KeyAccessDenied)
        with pytest.raises(expected):
            await open_token(provider, text_of(forged))
    assert await open_token(provider, token) == "123-45-6789"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.replace("phi:", "PHI:"),
        lambda t: t[4:],
        lambda t: t + "=",
        lambda t: t[:10] + " " + t[10:],
        lambda t: t[:10] + "+" + t[11:],
        lambda t: "",
        lambda t: "phi:" + "A" * 30,
    ],
)
async def test_malformed_text_is_rejected_before_any_key_is_fetched(mangle: Any) -> None:
    # No provider at all: parse alone must refuse.
    key = DataKey("local:x", b"w", bytes(32))
    text = envelope._encrypt_from_parts(key, "v", CONTEXT, FIELD, bytes(12))
    with pytest.raises(InvalidToken):
        envelope.parse(mangle(text))


def test_non_canonical_base64_spelling_is_rejected() -> None:
    key = DataKey("local:x", b"w", bytes(32))
    text = envelope._encrypt_from_parts(key, "v", CONTEXT, FIELD, bytes(12))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(text[-1])
    siblings = [c for i, c in enumerate(alphabet) if i != last and raw(text[:-1] + c) == raw(text)]
    assert siblings, "this token length has spare bits in its last character"
    for sibling in siblings:
        with pytest.raises(InvalidToken):
            envelope.parse(text[:-1] + sibling)


def _reference_b64decode(text: str) -> bytes | None:
    """The plain definition: the URL-safe alphabet, and the one spelling that encoding gives."""
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    if set(text) - alphabet or len(text) % 4 == 1:
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return data if base64.urlsafe_b64encode(data).rstrip(b"=").decode() == text else None


@settings(max_examples=3000, deadline=None)
@given(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=é \n", max_size=12)
)
def test_the_fast_base64_decoder_agrees_with_the_plain_definition(text: str) -> None:
    try:
        decoded: bytes | None = envelope._b64decode(text)
    except InvalidToken:
        decoded = None
    assert decoded == _reference_b64decode(text)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version_or_algorithm_is_rejected_at_parse(version: int) -> None:
    key = DataKey("local:x", b"w", bytes(32))
    data = bytearray(raw(envelope._encrypt_from_parts(key, "v", CONTEXT, FIELD, bytes(12))))
    for index in (0, 1):
        forged = bytearray(data)
        forged[index] = version
        with pytest.raises(InvalidToken):
            envelope.parse(text_of(bytes(forged)))


class Color(enum.IntEnum):
    RED = 1


DEEP: list[Any] = []
for _ in range(5000):
    DEEP = [DEEP]


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        [1, float("-inf")],
        (float("nan"),),
        {"a": (1.0,)},
        2**64,
        -(2**63) - 1,
        {1: "a"},
        b"x",
        Color.RED,
        uuid.UUID(int=1),
        datetime.date(2020, 1, 1),
        {"nested": [{"deep": {1, 2}}]},
        DEEP,
    ],
    ids=lambda v: type(v).__name__,
)
def test_values_that_would_not_round_trip_are_refused(value: Any) -> None:
    key = DataKey("local:x", b"w", bytes(32))
    with pytest.raises(ValueNotEncryptable):
        envelope.encrypt(key, value, context=CONTEXT, field=FIELD)


def test_known_answer_vectors_both_ways() -> None:
    vectors = json.loads(VECTORS.read_text())
    assert len(vectors) >= 5
    for vector in vectors:
        key = DataKey(
            vector["key_ref"], bytes.fromhex(vector["wrapped_key"]), bytes.fromhex(vector["data_key"])
        )
        iv = bytes.fromhex(vector["iv"])
        made = envelope._encrypt_from_parts(key, vector["value"], vector["context"], vector["field"], iv)
        assert made == vector["token"], vector["description"]
        parsed = envelope.parse(vector["token"])
        back = envelope.decrypt(key, parsed, context=vector["context"], field=vector["field"])
        assert back == vector["value"] and type(back) is type(vector["value"])


def test_known_answer_vectors_match_the_documented_layout() -> None:
    """Rebuild each vector from docs/envelope.md with raw AESGCM, independent of envelope.py."""
    for vector in json.loads(VECTORS.read_text()):
        ref = vector["key_ref"].encode()
        wrapped = bytes.fromhex(vector["wrapped_key"])
        iv = bytes.fromhex(vector["iv"])
        field = vector["field"].encode()
        aad = b"\x01\x01" + len(field).to_bytes(2, "big") + field + encode_context(vector["context"])
        plaintext = json.dumps(vector["value"], separators=(",", ":"), ensure_ascii=False).encode()
        sealed = AESGCM(bytes.fromhex(vector["data_key"])).encrypt(iv, plaintext, aad)
        layout = (
            b"\x01\x01" + bytes([len(ref)]) + ref + len(wrapped).to_bytes(2, "big") + wrapped + iv + sealed
        )
        assert raw(vector["token"]) == layout, vector["description"]


def test_messages_and_reprs_never_carry_secrets() -> None:
    secret_key = bytes(range(32))
    key = DataKey("local:x", b"wrapped-canary", secret_key)
    text = envelope._encrypt_from_parts(key, "CANARY-SSN-999", CONTEXT, FIELD, b"\xaa" * 12)
    token = envelope.parse(text)
    shown = repr(key) + str(key) + repr(token) + repr(key.aead)
    for secret in (secret_key.hex(), "CANARY", token.iv.hex(), token.sealed.hex(), "wrapped-canary"):
        assert secret not in shown
    with pytest.raises(PHIGatewayError) as failure:
        envelope.decrypt(key, token, context={}, field=FIELD)
    assert str(failure.value) == "invalid token"


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("\ud800", "lone surrogate"),
        ({"\udc00": "x"}, "lone surrogate"),
        ([1, {"a": ["ok", "\ud83d"]}], "lone surrogate"),
        (2**64, "beyond 64 bits"),
        (DEEP, "nesting too deep"),
    ],
    ids=["string", "key", "nested", "integer", "depth"],
)
def test_a_refusal_names_the_problem_and_never_the_value(value: Any, kind: str) -> None:
    with pytest.raises(ValueNotEncryptable) as failure:
        envelope.serialize_value(value)
    message = str(failure.value)
    assert kind in message
    for shown in ("\ud800", "\\ud800", "udc00", "ud83d", str(2**64)):
        assert shown not in message


def test_the_documented_example_token_is_vector_one() -> None:
    doc = DOC.read_text(encoding="utf-8")
    example = re.search(r"^(phi:\S+)…$", doc, re.MULTILINE)
    assert example is not None
    first = json.loads(VECTORS.read_text())[0]
    assert first["token"].startswith(example.group(1))
    assert len(bytes.fromhex(first["wrapped_key"])) == 41 and "synthetic 41-byte wrapped key" in doc


def _size_row(doc: str, label: str) -> list[int]:
    """The numbers of one row of docs/envelope.md's size table: key reference, wrapped
    key, binary, token text (the number each cell starts with, "≈" allowed)."""
    row = next(line for line in doc.splitlines() if line.startswith(f"| {label} "))
    cells = row.strip().strip("|").split("|")[1:]
    return [int(re.fullmatch(r"\s*≈?(\d+) .*", cell).group(1)) for cell in cells]  # type: ignore[union-attr]


def _sizes(token: str) -> list[int]:
    parsed = envelope.parse(token)
    return [len(parsed.key_ref.encode()), len(parsed.wrapped_key), len(raw(token)), len(token)]


async def test_the_size_table_is_what_the_code_makes(keyring: KeyProvider, kms: KmsKeyProvider) -> None:
    ssn = "123-45-6789"
    doc = DOC.read_text(encoding="utf-8")
    assert len(envelope.serialize_value(ssn)) == 13 and "13 bytes of JSON" in doc
    measured = {}
    for label, provider in (("local keyring", keyring), ("AWS KMS via moto's server", kms)):
        measured[label] = _sizes(await seal(provider, ssn))
        assert _size_row(doc, label) == measured[label], label

    def formula(key_ref: int, wrapped: int) -> list[int]:
        binary = 33 + key_ref + wrapped + 13
        return [key_ref, wrapped, binary, 4 + math.ceil(binary * 4 / 3)]

    for label, sizes in measured.items():
        assert formula(*sizes[:2]) == sizes, label  # the documented formula is the code's
    real = _size_row(doc, "AWS KMS, real service")
    assert real == formula(measured["AWS KMS via moto's server"][0], 184)
