from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonpath_ng.exceptions import JsonPathParserError
from jsonpath_ng.ext.parser import parse as ext_parse
from jsonpath_ng.parser import parse as base_parse

from phi_gateway.exceptions import PHIGatewayError
from phi_gateway.jsonpath import InvalidPath, JsonPath, compile_path

SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "example",
    "identifier": [
        {"system": "http://hospital.example.org/mrn", "value": "MRN-0042"},
        {"system": SSN_SYSTEM, "value": "123-45-6789"},
    ],
    "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
    "birthDate": "1974-12-25",
}


def ids(values: list[Any]) -> list[int]:
    return [id(v) for v in values]


# --- steps --------------------------------------------------------------------------------


def test_root_is_found_but_has_no_place() -> None:
    doc = {"a": 1}
    path = compile_path("$")
    assert path.is_simple
    assert path.canonical == "$"
    assert path.find(doc) == [doc]
    assert path.find(doc)[0] is doc
    assert path.locate(doc) == []


@pytest.mark.parametrize("text", ["$.ssn", "$['ssn']", '$["ssn"]', "$[ 'ssn' ]", "  $.ssn\n"])
def test_spellings_of_a_member_are_one_path(text: str) -> None:
    path = compile_path(text)
    assert path.is_simple
    assert path.source == text
    assert path.canonical == "$.ssn"
    assert path == compile_path("$.ssn")
    assert hash(path) == hash(compile_path("$.ssn"))
    assert path.find({"ssn": "123-45-6789", "name": "x"}) == ["123-45-6789"]


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("$.a.*.b", "$.a[*].b"),
        ("$['odd key'][0]", "$['odd key'][0]"),
        ("$.x-ray_2", "$.x-ray_2"),  # "-" after the first character is an identifier char
        ("$['-x']", "$['-x']"),  # but not the first
        ("$['0']", "$['0']"),  # a member named "0" is not index 0
        ("$['it\\'s']", "$['it\\'s']"),
        ('$["it\'s"]', "$['it\\'s']"),
        ('$["say \\"hi\\""]', "$['say \"hi\"']"),
        ("$['back\\\\slash']", "$['back\\\\slash']"),
        ("$['*']", "$['*']"),  # a member named "*", not the wildcard
        ("$['naïve']", "$['naïve']"),  # non-ASCII names need brackets
        ("$[-01]", "$[-1]"),
        ("$.where", "$.where"),  # an ordinary name here; see the property test below
    ],
)
def test_canonical_spelling(text: str, canonical: str) -> None:
    path = compile_path(text)
    assert path.is_simple
    assert path.canonical == canonical
    assert compile_path(canonical).canonical == canonical
    assert repr(path) == f"JsonPath({canonical!r})"


def test_quoted_names_unescape() -> None:
    doc = {"it's": 1, 'say "hi"': 2, "back\\slash": 3, "*": 4, "0": 5, "other": 6}
    assert compile_path("$['it\\'s']").find(doc) == [1]
    assert compile_path('$["say \\"hi\\""]').find(doc) == [2]
    assert compile_path("$['back\\\\slash']").find(doc) == [3]
    assert compile_path("$['*']").find(doc) == [4]
    assert compile_path("$['0']").find(doc) == [5]


def test_index_counts_from_either_end() -> None:
    doc = {"l": [10, 20, 30]}
    assert compile_path("$.l[0]").find(doc) == [10]
    assert compile_path("$.l[2]").find(doc) == [30]
    assert compile_path("$.l[-1]").find(doc) == [30]
    assert compile_path("$.l[-3]").find(doc) == [10]
    assert compile_path("$.l[3]").find(doc) == []
    assert compile_path("$.l[-4]").find(doc) == []
    # Places are reported with the non-negative index they stand at.
    assert compile_path("$.l[-1]").locate(doc) == [(doc["l"], 2)]


def test_wildcard_takes_elements_in_order_and_members_in_insertion_order() -> None:
    doc = {"l": [3, 1, 2], "d": {"z": 1, "a": 2, "m": 3}, "s": "text", "n": None}
    for spelling in ("[*]", ".*"):
        assert compile_path(f"$.l{spelling}").find(doc) == [3, 1, 2]
        assert compile_path(f"$.d{spelling}").find(doc) == [1, 2, 3]
        assert compile_path(f"$.d{spelling}").locate(doc) == [
            (doc["d"], "z"),
            (doc["d"], "a"),
            (doc["d"], "m"),
        ]
        assert compile_path(f"$.s{spelling}").find(doc) == []
        assert compile_path(f"$.n{spelling}").find(doc) == []
    assert compile_path("$[*][*]").find([[1, 2], {"k": 3}, 4, [], [5]]) == [1, 2, 3, 5]


@pytest.mark.parametrize(
    ("text", "doc"),
    [
        ("$.a", [{"a": 1}]),  # a member of an array
        ("$[0]", {"0": "zero", "a": 1}),  # an index of an object, even one with a member "0"
        ("$.missing", {"a": 1}),
        ("$.a.b.c", {"a": {"x": 1}}),
        ("$[5]", [1, 2]),
        ("$[-3]", [1, 2]),
        ("$[0]", []),
        ("$[0]", "string"),  # strings are not arrays
        ("$.a", "string"),
        ("$.a[0]", {"a": None}),
        ("$.a.b", {"a": 5}),
        ("$.a[*]", {"a": True}),
        ("$[*]", 3.5),
        ("$.a", None),
    ],
)
def test_steps_that_do_not_apply_select_nothing(text: str, doc: Any) -> None:
    path = compile_path(text)
    assert path.is_simple
    assert path.find(doc) == []
    assert path.locate(doc) == []


def test_locate_lets_a_caller_replace_values_in_place() -> None:
    doc = {
        "patients": [
            {"name": "A", "ssn": "111", "contacts": {"home": "555-1", "work": "555-2"}},
            {"name": "B"},
            {"name": "C", "ssn": "333", "contacts": {}},
        ],
        "count": 3,
    }
    for text in ("$.patients[*].ssn", "$.patients[*].contacts.*", "$.patients[-1].name"):
        for parent, key in compile_path(text).locate(doc):
            parent[key] = "X"  # type: ignore[index]
    assert doc == {
        "patients": [
            {"name": "A", "ssn": "X", "contacts": {"home": "X", "work": "X"}},
            {"name": "B"},
            {"name": "X", "ssn": "X", "contacts": {}},
        ],
        "count": 3,
    }


def test_locate_in_document_order_lets_a_caller_delete_from_the_end() -> None:
    doc = {"l": ["a", "b", "c", "d"]}
    for parent, key in reversed(compile_path("$.l[*]").locate(doc)):
        if key != 1:
            del parent[key]  # type: ignore[arg-type]
    assert doc == {"l": ["b"]}


# --- jsonpath-ng paths --------------------------------------------------------------------


def test_filter_path_finds_and_replaces_the_ssn_of_a_patient() -> None:
    doc = copy.deepcopy(PATIENT)
    path = compile_path(f"$.identifier[?(@.system == '{SSN_SYSTEM}')].value")
    assert not path.is_simple
    assert path.canonical == path.source  # bound into tokens: never jsonpath-ng's own spelling
    assert path.find(doc) == ["123-45-6789"]
    places = path.locate(doc)
    assert places == [(doc["identifier"][1], "value")]
    for parent, key in places:
        parent[key] = "phi:token"  # type: ignore[index]
    expected = copy.deepcopy(PATIENT)
    expected["identifier"][1]["value"] = "phi:token"
    assert doc == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$..given[*]", ["Peter", "James"]),
        ("$.name[0].given[0:5]", ["Peter", "James"]),
        ("$['birthDate','id']", ["example", "1974-12-25"]),  # document order, not the union's
    ],
)
def test_other_jsonpath_ng_paths(text: str, expected: list[Any]) -> None:
    path = compile_path(text)
    assert not path.is_simple
    assert path.find(PATIENT) == expected
    assert path.find(PATIENT) == [p[k] for p, k in path.locate(PATIENT)]  # type: ignore[index]


def test_jsonpath_ng_places_are_reported_once_in_document_order() -> None:
    doc = {"l": ["a", "b", "c"], "m": {"x": 1, "y": 2}}
    repeated = compile_path("$.l[2,0,2,-1]")
    assert repeated.locate(doc) == [(doc["l"], 0), (doc["l"], 2)]
    assert repeated.find(doc) == ["a", "c"]
    union = compile_path("$.m['y','x','y']")
    assert union.locate(doc) == [(doc["m"], "x"), (doc["m"], "y")]
    nested = {"b": [{"v": 1}, {"v": 2}], "v": 0, "a": {"v": 3}}
    assert compile_path("$..v").find(nested) == [1, 2, 0, 3]


def test_jsonpath_ng_values_that_are_computed_are_not_places() -> None:
    doc = {"a": [1, 2, 3]}
    path = compile_path("$.a.`len`")
    assert path.find(doc) == []
    assert path.locate(doc) == []


def test_where_is_a_member_name_not_a_keyword() -> None:
    # jsonpath-ng reserves `where`/`wherenot` for its own operator and cannot parse
    # `$.where`; a policy naming such a member means the member.
    assert compile_path("$.where.wherenot").find({"where": {"wherenot": 1}}) == [1]
    with pytest.raises(JsonPathParserError):
        base_parse("$.where")


# --- errors and value semantics -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the path is empty"),
        ("   ", "the path is empty"),
        ("ssn", "must start with '$'"),
        ("a.b", "must start with '$'"),
        ("@.a", "must start with '$'"),
        ("$.a[", "end of string"),
        ("$.a b", "near token b"),
        ("$['a]", "Unexpected EOF"),
        ("$..", "end of string"),
        ("$.a.", "end of string"),
        ("$[?(@.system ==)]", "near token"),
        ("$foo", "near token foo"),
        ("$.naïve", "Unexpected character"),
    ],
)
def test_invalid_paths_name_the_problem_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(InvalidPath) as info:
        compile_path(text)
    message = str(info.value)
    assert message.startswith(f"invalid JSONPath {text!r}: ")
    assert problem in message
    assert "\n" not in message
    assert len(message) < 200
    # No parser traceback chained underneath.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_invalid_path_is_a_value_error_of_the_one_tree() -> None:
    assert issubclass(InvalidPath, ValueError)
    assert issubclass(InvalidPath, PHIGatewayError)


def test_a_long_invalid_path_is_shortened_in_the_message() -> None:
    text = "$" + "[?(@.system == 'x'" * 200
    with pytest.raises(InvalidPath) as info:
        compile_path(text)
    assert len(str(info.value)) < 200
    assert "..." in str(info.value)


def test_a_path_must_be_a_string() -> None:
    with pytest.raises(InvalidPath, match="must be a string, not int"):
        compile_path(5)  # type: ignore[arg-type]


def test_compiled_path_is_immutable() -> None:
    path = compile_path("$.a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        path.canonical = "$.b"  # type: ignore[misc]
    assert path != "$.a"
    assert path != compile_path("$.b")


# --- properties ---------------------------------------------------------------------------

NAMES = ["a", "b", "c", "x-y", "a b", "it's", 'say "hi"', "back\\slash", "*", "0", "where"]
DOCS = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.sampled_from(["", "s"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(NAMES), children, max_size=5)
    ),
    max_leaves=30,
)
STEPS = st.sampled_from(NAMES) | st.integers(-5, 5) | st.none()  # a member, an index, or None for "*"


def spell(step: str | int | None, style: int) -> str:
    """A path step in one of the spellings authors use (dot, single or double quotes)."""
    if step is None:
        return ".*" if style == 0 else "[*]"
    if isinstance(step, int):
        return f"[{step}]"
    # jsonpath-ng cannot parse its keywords as dot names; quoted, it reads them as names.
    if style == 0 and step.replace("-", "_").isidentifier() and step not in ("where", "wherenot"):
        return "." + step
    quote = '"' if style == 2 else "'"
    return "[" + quote + step.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote + "]"


SIMPLE_PATHS = st.lists(st.tuples(STEPS, st.integers(0, 2)), max_size=4).map(
    lambda steps: "$" + "".join(spell(step, style) for step, style in steps)
)


def served_by_jsonpath_ng(text: str) -> JsonPath:
    # The same expression through the fallback engine, to check one engine against the other.
    return JsonPath(
        source=text,
        canonical=text,
        is_simple=False,
        _steps=(),
        _head=(),
        _last=None,
        _expression=ext_parse(text),
    )


@given(DOCS, SIMPLE_PATHS)
def test_walker_finds_what_jsonpath_ng_finds(doc: Any, text: str) -> None:
    """The walker agrees with jsonpath-ng on every simple path.

    The only case excluded is `$.where` / `$.wherenot` in dot spelling, which jsonpath-ng
    cannot parse (reserved words); `spell` quotes those names instead. The dependency floor
    is jsonpath-ng 1.16 because older releases differ where our semantics are the sensible
    ones, and this test fails on them:

    - before 1.9, `[0]` on an object and `[-5]` on a short array raise instead of matching
      nothing;
    - before 1.11, `[0]` on a string selects a character, `[*]` on an object or scalar
      selects that value itself as if it were a one-element array, and `.*` on an array
      selects nothing; JSON has no such coercions, and a policy must not encrypt the
      whole record because `[*]` met an object;
    - before 1.16, `['*']` is the wildcard, so a member named "*" cannot be named.
    """
    path = compile_path(text)
    assert path.is_simple
    expected = [match.value for match in base_parse(text).find(doc)]
    assert ids(path.find(doc)) == ids(expected)
    assert ids(path.find(doc)) == ids([match.value for match in ext_parse(text).find(doc)])


@given(DOCS, SIMPLE_PATHS)
def test_locate_and_find_agree(doc: Any, text: str) -> None:
    path = compile_path(text)
    places = path.locate(doc)
    if path.canonical == "$":
        assert places == []
        return
    assert ids([parent[key] for parent, key in places]) == ids(path.find(doc))  # type: ignore[index]
    for parent, key in places:
        assert isinstance(parent, dict) if isinstance(key, str) else isinstance(parent, list)
        assert isinstance(key, str) or 0 <= key < len(parent)


@given(DOCS, SIMPLE_PATHS)
def test_both_engines_locate_the_same_places(doc: Any, text: str) -> None:
    walker = compile_path(text).locate(doc)
    fallback = served_by_jsonpath_ng(text).locate(doc)
    assert [(id(parent), key) for parent, key in walker] == [(id(parent), key) for parent, key in fallback]


@given(SIMPLE_PATHS)
def test_canonical_spelling_is_a_fixed_point(text: str) -> None:
    path = compile_path(text)
    again = compile_path(path.canonical)
    assert again.is_simple
    assert again.canonical == path.canonical
    assert again == path
