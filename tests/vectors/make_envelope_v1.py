"""Regenerate envelope_v1.json. Run only when the format changes on purpose: the vectors
pin the token format, so a change here is a format change and needs a new version byte."""

from __future__ import annotations

import json
from pathlib import Path

from phi_gateway import envelope
from phi_gateway.keys import DataKey

CASES = [
    (
        "SSN string, local key reference",
        "local:0123456789abcdef",
        "$.ssn",
        {"ResourceId": "patient-123", "Purpose": "PHI_Storage"},
        "123-45-6789",
    ),
    (
        "integer, KMS ARN reference",
        "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "$.weight_g",
        {"ResourceId": "patient-123"},
        71500,
    ),
    ("boolean, empty context", "local:0123456789abcdef", "$.consent", {}, True),
    ("null", "local:0123456789abcdef", "$.notes", {"ResourceId": "p"}, None),
    (
        "object with unicode and array",
        "local:0123456789abcdef",
        "$.diagnoses[*]",
        {"ResourceId": "patient-ü", "Purpose": "Treatment"},
        {"code": "E11.9", "text": "Diabetes ✓", "tags": [1, 2.5]},
    ),
    ("empty string", "local:0123456789abcdef", "$.middle_name", {"ResourceId": "p"}, ""),
]


def main() -> None:
    vectors = []
    for number, (description, key_ref, field, context, value) in enumerate(CASES, start=1):
        data_key = bytes((number * 17 + i) % 256 for i in range(32))
        wrapped = bytes((number * 31 + i) % 256 for i in range(40 + number))
        iv = bytes((number * 7 + i) % 256 for i in range(12))
        token = envelope._encrypt_from_parts(DataKey(key_ref, wrapped, data_key), value, context, field, iv)
        vectors.append(
            {
                "description": description,
                "data_key": data_key.hex(),
                "key_ref": key_ref,
                "wrapped_key": wrapped.hex(),
                "iv": iv.hex(),
                "field": field,
                "context": context,
                "value": value,
                "token": token,
            }
        )
    out = Path(__file__).with_name("envelope_v1.json")
    out.write_text(json.dumps(vectors, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
