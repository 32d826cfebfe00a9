"""Who sees what: every role × every field × every ``otherwise`` mode, through the public
document engine (``encrypt_request``, ``decrypt_response``) and the caller's identity as the
gateway resolves it.

Each cell asserts the exact value the caller gets and how many data keys were unwrapped for
it. ``mask``, ``remove`` and ``token`` never decrypt: given a token moved in from another
patient, which fails if anything tries to open it, they answer exactly as they do for the real
one, with no key-service call. ``mask_last4`` and plaintext do decrypt, and refuse that token.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from phi_gateway.cache import DataKeyCache
from phi_gateway.exceptions import InvalidToken
from phi_gateway.identity import Identity, IdentitySettings
from phi_gateway.keyring import LocalKeyring
from phi_gateway.policy import load_policies
from phi_gateway.rules import PolicySet
from phi_gateway.transform import Scope, decrypt_response, encrypt_request
from tests.recording_keys import RecordingKeys

# Field → (member, value). Every field but $.dob has a reveal rule; $.codes[*] selects each
# element of an array.
FIELDS: dict[str, tuple[str, Any]] = {
    "$.ssn": ("ssn", "123-45-6789"),
    "$.initials": ("initials", "MG"),
    "$.weight": ("weight", 71.5),
    "$.allergy": ("allergy", {"drug": "penicillin", "severe": True}),
    "$.codes[*]": ("codes", ["E11.9", "I10"]),
    "$.dob": ("dob", "1980-02-29"),
}
RESTRICTED = [path for path in FIELDS if path != "$.dob"]
MODES = ("mask_last4", "mask", "remove", "token")

# What a caller the rule does not name gets, exactly. TOKEN: the stored token, as it is;
# ABSENT: no such member.
TOKEN, ABSENT = object(), object()
WITHHELD: dict[str, dict[str, Any]] = {
    "mask_last4": {
        "$.ssn": "*******6789",
        "$.initials": "****",
        "$.weight": "****",
        "$.allergy": "****",
        "$.codes[*]": ["*11.9", "****"],
    },
    "mask": {
        "$.ssn": "****",
        "$.initials": "****",
        "$.weight": "****",
        "$.allergy": "****",
        "$.codes[*]": ["****", "****"],
    },
    "remove": {
        "$.ssn": ABSENT,
        "$.initials": ABSENT,
        "$.weight": ABSENT,
        "$.allergy": ABSENT,
        "$.codes[*]": [],
    },
    "token": dict.fromkeys(RESTRICTED, TOKEN),
}

# Role headers as the trusted proxy sends them → whether the rule's roles (clinician, billing)
# let the caller see plaintext. Break-glass (the emergency role with a reason) sees everything;
# without a reason it is refused before any response (tests/test_identity.py).
ROLES: dict[str, tuple[dict[str, str], bool]] = {
    "clinician": ({"x-roles": "clinician"}, True),
    "billing": ({"x-roles": "billing"}, True),
    "nurse and clinician": ({"x-roles": "nurse,clinician"}, True),
    "break-glass": ({"x-roles": "emergency", "x-break-glass-reason": "cardiac arrest, bay 4"}, True),
    "nurse": ({"x-roles": "nurse"}, False),
    "no role": ({"x-roles": ""}, False),
}


def policy(mode: str) -> str:
    paths = ", ".join(f'"{path}"' for path in FIELDS)
    reveal = "".join(
        f'\n        "{path}": {{roles: [clinician, billing], otherwise: {mode}}}' for path in RESTRICTED
    )
    return f"""version: 1
name: matrix
routes:
  - match: {{methods: [PUT], path: "/m/{{pid}}"}}
    request:
      context: {{ResourceId: {{param: pid, kms: plain}}}}
      encrypt: [{paths}]
  - match: {{methods: [GET], path: "/m/{{pid}}"}}
    response:
      context: {{ResourceId: {{param: pid, kms: plain}}}}
      decrypt: [{paths}]
      reveal:{reveal}
"""


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PolicySet]:
    directory = tmp_path_factory.mktemp("reveal-matrix")
    loaded = {}
    for mode in MODES:
        (directory / f"{mode}.yaml").write_text(policy(mode))
        loaded[mode] = load_policies([directory / f"{mode}.yaml"])
    return loaded


IDENTITY = Identity(
    IdentitySettings(
        principal_header="x-user",
        roles_header="x-roles",
        trusted_proxies=("127.0.0.1",),
        break_glass_role="emergency",
    )
)


def roles_of(headers: dict[str, str]) -> frozenset[str] | None:
    """What the gateway hands the reveal rules for this caller: None (everything) for break-glass."""
    principal = IDENTITY.resolve({"x-user": "someone", **headers}, "127.0.0.1")
    assert principal is not None
    return None if principal.break_glass else principal.roles


async def stored(policies: PolicySet, keyring: LocalKeyring, pid: str, member: str, value: Any) -> Any:
    """``{member: value}`` as the gateway writes it for patient ``pid``: tokens."""
    doc = {member: copy.deepcopy(value)}
    found = policies.match("PUT", f"/m/{pid}")
    assert found is not None and found.route.request is not None
    await encrypt_request(
        doc, found.route.request, Scope({"pid": pid}, {}), keys=DataKeyCache(keyring), pepper=None
    )
    return doc


def withheld(mode: str, field: str, stored: dict[str, Any]) -> dict[str, Any]:
    """The stored document as a caller the rule does not name reads it."""
    member, _ = FIELDS[field]
    shown = WITHHELD[mode][field]
    if shown is ABSENT:
        return {}
    return {member: stored[member] if shown is TOKEN else shown}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("role", ROLES)
async def test_reveal_matrix(
    policies: dict[str, PolicySet], keyring: LocalKeyring, role: str, field: str, mode: str
) -> None:
    headers, allowed = ROLES[role]
    member, value = FIELDS[field]
    roles = roles_of(headers)
    assert (roles is None) == (role == "break-glass")
    rules = policies[mode]
    found = rules.match("GET", "/m/p-1")
    assert found is not None and found.route.response is not None
    get = found.route.response
    genuine = await stored(rules, keyring, "p-1", member, value)
    moved = await stored(rules, keyring, "p-2", member, value)  # valid tokens, another patient's
    places = len(value) if isinstance(value, list) else 1
    plaintext = allowed or field == "$.dob"

    async def read(doc: dict[str, Any]) -> tuple[dict[str, Any], Any, int]:
        keys = RecordingKeys(keyring)
        doc = copy.deepcopy(doc)
        report = await decrypt_response(
            doc, get, Scope({"pid": "p-1"}, {}), keys=DataKeyCache(keys), pepper=None, roles=roles
        )
        assert keys.rewraps == 0  # reading never re-wraps
        return doc, report, len(keys.unwrapped)

    shown, report, unwrapped = await read(genuine)
    if plaintext:
        assert shown == {member: value}
        assert (report.decrypted, report.withheld, unwrapped) == ({field: places}, {}, 1)
    else:
        assert shown == withheld(mode, field, genuine)
        assert report.decrypted == {} and report.withheld == {field: places}
        assert unwrapped == (1 if mode == "mask_last4" else 0)  # mask_last4 must read what it shows

    if plaintext or mode == "mask_last4":
        with pytest.raises(InvalidToken):  # what decrypts refuses the moved token
            await read(moved)
    else:  # never opened: the moved token is answered exactly as the genuine one
        shown, _, unwrapped = await read(moved)
        assert shown == withheld(mode, field, moved)
        assert unwrapped == 0
