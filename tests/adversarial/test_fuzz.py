"""Property tests (hypothesis) for the two parsers that read input from outside the code: the
token decoder (anything the upstream's database holds) and the policy loader (whatever a
policy file says). Neither may raise anything but its own error, nor return half a result:
``envelope.parse`` gives a whole ``Token`` or raises ``InvalidToken``; ``load_policies``
gives a ``PolicySet`` with every route of every file, or raises ``PolicyError``."""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from phi_gateway import b64url, envelope
from phi_gateway.exceptions import InvalidToken, PolicyError
from phi_gateway.keys import DataKey
from phi_gateway.policy import load_policies
from phi_gateway.policy_file import Problem, read_policy_file
from phi_gateway.rules import PolicySet

ROOT = Path(__file__).parents[2]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_FILES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A token made with a fixed data key, wrapped-key bytes and IV (the known-answer path).
KEY = DataKey("local:00112233445566aa", bytes(range(61)), bytes(range(32)))
CONTEXT = {"ResourceId": "p-1", "Purpose": "PHI_Storage"}
VALUE = {"ssn": "123-45-6789", "n": [1, 2.5, None, True]}
TOKEN = envelope._encrypt_from_parts(KEY, VALUE, CONTEXT, "$.profile", bytes(12))
RAW = b64url.decode(TOKEN.removeprefix(envelope.PREFIX))
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def parsed_or_refused(text: Any) -> envelope.Token | None:
    """The decoder's whole contract: a Token, or InvalidToken and nothing else."""
    try:
        token = envelope.parse(text)
    except InvalidToken:
        return None
    assert isinstance(token, envelope.Token)
    assert token.serialize() == text  # one text per token: what parses is canonical
    assert envelope.parse(token.serialize()).to_bytes() == token.to_bytes()
    return token


# -- the token decoder -----------------------------------------------------------------------


def test_the_fixture_token_parses_and_decrypts() -> None:
    token = parsed_or_refused(TOKEN)
    assert token is not None
    assert envelope.decrypt(KEY, token, context=CONTEXT, field="$.profile") == VALUE


@FUZZ
@given(st.text())
@example("phi:")
@example("phi:" + "A" * 41)
@example("phi:AQE")
def test_parse_any_text(text: str) -> None:
    parsed_or_refused(text)
    parsed_or_refused(envelope.PREFIX + text)


@FUZZ
@given(st.text(alphabet=ALPHABET + "=+/. \n\x00é"))
def test_parse_any_text_in_and_around_the_alphabet(text: str) -> None:
    parsed_or_refused(envelope.PREFIX + text)


@FUZZ
@given(st.one_of(st.binary(), st.integers(), st.none(), st.lists(st.text()), st.floats()))
def test_parse_refuses_what_is_not_a_string(value: Any) -> None:
    with pytest.raises(InvalidToken):
        envelope.parse(value)


@FUZZ
@given(st.binary(max_size=512))
@example(bytes([1, 1, 1, 65, 0, 1, 0]) + bytes(29))  # the shortest well-formed token
@example(bytes([1, 1, 0, 0, 1, 0]) + bytes(40))  # empty key reference
@example(bytes([1, 1, 1, 65, 0, 0]) + bytes(40))  # empty wrapped key
@example(bytes([1, 1, 1, 0xFF, 0, 1, 0]) + bytes(29))  # key reference not UTF-8
def test_parse_the_encoding_of_any_bytes(raw: bytes) -> None:
    text = envelope.PREFIX + b64url.encode(raw)
    token = parsed_or_refused(text)
    if token is not None:
        assert token.to_bytes() == raw
        assert (raw[0], raw[1]) == (envelope.VERSION, envelope.ALG_AES256_GCM_JSON)
        assert len(token.iv) == 12 and token.ciphertext_length >= 1


MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
        st.tuples(st.just("cut"), st.integers(0, 10_000), st.integers(0, 0)),
        st.tuples(st.just("drop"), st.integers(0, 10_000), st.integers(1, 40)),
        st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
        st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, where, arg in ops:
        at = where % (len(out) + 1)
        if op == "flip" and at < len(out):
            out[at] ^= arg
        elif op == "cut":
            del out[at:]
        elif op == "drop":
            del out[at : at + arg]
        elif op == "insert":
            out.insert(at, arg)
        elif op == "set" and at < len(out):
            out[at] = arg
    return bytes(out)


@FUZZ
@given(MUTATIONS)
def test_mutations_of_a_valid_token_never_open_to_anything_else(ops: list[tuple[str, int, int]]) -> None:
    """Changed bytes parse or not; when they parse, GCM opens them only if the IV, ciphertext
    and tag are the original ones (key reference and wrapped key are the key service's to
    authenticate: here the data key is given directly), and then to the original value."""
    mutated = _mutate(RAW, ops)
    token = parsed_or_refused(envelope.PREFIX + b64url.encode(mutated))
    if token is None:
        return
    original = envelope.parse(TOKEN)
    try:
        value = envelope.decrypt(KEY, token, context=CONTEXT, field="$.profile")
    except InvalidToken:
        assert (token.iv, token.sealed) != (original.iv, original.sealed)
        return
    assert (token.iv, token.sealed) == (original.iv, original.sealed)
    assert value == VALUE


@FUZZ
@given(MUTATIONS)
def test_mutations_of_a_valid_tokens_text(ops: list[tuple[str, int, int]]) -> None:
    text = _mutate(TOKEN.encode(), ops).decode("latin-1")
    token = parsed_or_refused(text)
    if token is None:
        return
    with contextlib.suppress(InvalidToken):  # it may not authenticate; if it does, it is the value
        assert envelope.decrypt(KEY, token, context=CONTEXT, field="$.profile") == VALUE


def test_a_second_spelling_of_the_same_bytes_is_refused() -> None:
    # 3k+1 bytes: the last character carries 2 bits and 4 spare ones, so "...Q" and "...R"
    # would decode to the same bytes.
    raw = RAW[: len(RAW) - len(RAW) % 3 - 2]
    assert len(raw) % 3 == 1
    text = b64url.encode(raw)
    assert parsed_or_refused(envelope.PREFIX + text) is not None
    spare = ALPHABET[ALPHABET.index(text[-1]) + 1]
    assert parsed_or_refused(envelope.PREFIX + text[:-1] + spare) is None


# -- the policy loader -----------------------------------------------------------------------

PATIENTS = yaml.safe_load((ROOT / "policies" / "patients.yaml").read_text(encoding="utf-8"))
OTHER_POLICY = """\
version: 1
name: notes
routes:
  - match: {methods: [GET], path: "/notes/{note_id}"}
    response:
      context: {NoteId: {param: note_id}}
      decrypt: ["$.text"]
"""

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["$.ssn", "$", "$[*]", "{patient_id}", "/patients/{patient_id}", "GET", "PUT", "redact"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        (path / "notes.yaml").write_text(OTHER_POLICY)
        yield path


def loaded_or_refused(scratch: Path, text: str, name: str = "fuzzed.yaml") -> PolicySet | None:
    """The loader's whole contract, next to a valid policy file."""
    (scratch / name).write_text(text, encoding="utf-8")
    refused: PolicyError | None
    try:
        found = load_policies([scratch / name, scratch / "notes.yaml"])
    except PolicyError as exc:
        refused = exc
    else:
        refused = None
    finally:
        (scratch / name).unlink()
    if refused is not None:
        assert refused.problems and all(isinstance(p, Problem) and p.line >= 1 for p in refused.problems)
        return None
    assert isinstance(found, PolicySet)
    assert "notes" in found.names and len(found.names) == 2
    return found


@FUZZ_FILES
@given(st.text(), st.sampled_from([".yaml", ".json"]))
@example("version: 1\nname: x\nroutes: [{match: {methods: [GET], path: /x}}]\n", ".yaml")
@example("{}", ".json")
@example("[1, 2", ".json")
@example("a: !!python/object:os.system x\n", ".yaml")
@example("a: &a [x, x]\nb: [*a, *a]\n", ".yaml")
def test_read_policy_file_on_any_text(scratch: Path, text: str, suffix: str) -> None:
    path = scratch / f"any{suffix}"
    path.write_text(text, encoding="utf-8")
    doc, problems = read_policy_file(path)
    assert all(isinstance(p, Problem) and p.line >= 1 for p in problems)
    assert doc is not None or problems


@FUZZ_FILES
@given(st.binary(max_size=200))
def test_read_policy_file_on_any_bytes(scratch: Path, data: bytes) -> None:
    path = scratch / "bytes.yaml"
    path.write_bytes(data)
    doc, problems = read_policy_file(path)
    assert doc is not None or problems


@FUZZ_FILES
@given(VALUES)
def test_load_policies_on_any_yaml_document(scratch: Path, data: Any) -> None:
    loaded = loaded_or_refused(scratch, yaml.safe_dump(data, allow_unicode=True))
    assert loaded is None or isinstance(data, dict)


# A path into the patients policy, and what to do there.
EDITS = st.lists(
    st.tuples(
        st.lists(st.one_of(st.integers(0, 8), st.text(max_size=10)), max_size=6),
        st.sampled_from(["replace", "delete", "add"]),
        VALUES,
    ),
    min_size=1,
    max_size=3,
)


def _edit(doc: Any, edits: list[tuple[list[Any], str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for steps, action, value in edits:
        parent: Any = None
        key: Any = None
        node = doc
        for step in steps:  # walk while the steps fit; keys are chosen by position when they do not
            if isinstance(node, dict) and node:
                key = step if step in node else list(node)[len(str(step)) % len(node)]
            elif isinstance(node, list) and node:
                key = step % len(node) if isinstance(step, int) else len(str(step)) % len(node)
            else:
                break
            parent, node = node, node[key]
        if parent is None:
            continue
        if action == "replace":
            parent[key] = value
        elif action == "delete":
            del parent[key]
        elif isinstance(node, dict):
            node[str(value)[:10]] = value
        elif isinstance(node, list):
            node.append(value)
        else:
            parent[key] = value
    return doc


@FUZZ_FILES
@given(EDITS)
@example([(["routes", 0, "request", "context", "ResourceId"], "replace", "{nope}")])
@example([(["routes", 3], "delete", None)])
@example([(["name"], "replace", "notes")])
@example([(["routes", 2, "response", "on_error"], "replace", "ignore")])
def test_load_policies_on_edited_policies(scratch: Path, edits: list[tuple[list[Any], str, Any]]) -> None:
    """Never a partial set: whatever loads has every route of the edited file."""
    doc = _edit(PATIENTS, edits)
    loaded = loaded_or_refused(scratch, yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    if loaded is not None:
        assert len([r for r in loaded.routes if r.policy == doc["name"]]) == len(doc["routes"])
        assert len(loaded.routes) == len(doc["routes"]) + 1


def test_the_unedited_policy_loads_whole(scratch: Path) -> None:
    loaded = loaded_or_refused(scratch, yaml.safe_dump(PATIENTS, sort_keys=False))
    assert loaded is not None and len(loaded.routes) == len(PATIENTS["routes"]) + 1


NESTED = {
    "a YAML alias that contains itself": ("routes: &r [*r]\n", ".yaml"),
    "YAML nested 5 000 deep": ("[" * 5_000 + "]" * 5_000, ".yaml"),
    "JSON nested 5 000 deep": ("[" * 5_000 + "]" * 5_000, ".json"),
}


@pytest.mark.parametrize("case", list(NESTED))
def test_self_referencing_or_deeply_nested_policy_files(scratch: Path, case: str) -> None:
    text, suffix = NESTED[case]
    assert loaded_or_refused(scratch, text, f"nested{suffix}") is None


def test_an_alias_bomb_is_refused_quickly(scratch: Path) -> None:
    # Nine levels of nine aliases each: 9**9 values if expanded ("billion laughs").
    lines = ['a0: &a0 ["x"]']
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 10)]
    started = time.monotonic()
    assert loaded_or_refused(scratch, "\n".join(lines) + "\n", "bomb.yaml") is None
    assert time.monotonic() - started < 5
