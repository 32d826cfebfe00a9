"""Policy files: loading the shipped examples, every problem a security team can make, matching."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from textwrap import dedent, indent
from typing import Any

import pytest
import yaml

from phi_gateway.exceptions import PolicyError
from phi_gateway.policy import load_policies
from phi_gateway.policy_file import Problem, policy_schema
from phi_gateway.rules import ContextEntry, PolicySet, Route

ROOT = Path(__file__).parents[1]
POLICIES = ROOT / "policies"
BROKEN = ROOT / "tests" / "policies" / "broken"

# Every problem in tests/policies/broken: (file, line of the offending key, part of the message).
BROKEN_PROBLEMS = [
    ("mistakes.yaml", 2, "policy name 'broken' is already used by"),
    ("mistakes.yaml", 7, "path parameter {patientid} is not declared by '/patients/{patient_id}'"),
    ("mistakes.yaml", 9, "encrypt[2]: invalid JSONPath '$.notes['"),
    ("mistakes.yaml", 9, "encrypt[3]: a field path must select something inside the record"),
    ("mistakes.yaml", 9, "encrypt[1]: \"$['ssn']\" selects the same field as an earlier entry"),
    ("mistakes.yaml", 11, "into: 'ssn' is also encrypted"),
    ("mistakes.yaml", 13, "route POST|PUT /patients/{id}"),
    ("mistakes.yaml", 18, "index 'dob_bidx' is defined differently at line 12"),
    ("mistakes.yaml", 21, "no blind_index of this policy is written into 'ssn_bidx'"),
    ("mistakes.yaml", 22, "index 'dob_bidx' takes 1 value(s), 2 given"),
    ("mistakes.yaml", 27, "reveal names a field that decrypt does not list"),
    ("mistakes.yaml", 28, "segment 'x{b}': a parameter must be a whole segment"),
    ("not-yaml.yaml", 3, "not valid YAML/JSON"),
    ("schema.yaml", 4, "'FETCH' is not one of"),
    ("schema.yaml", 4, "'patients' does not match '^/'"),
    ("schema.yaml", 6, "give exactly one of: literal, param, path, header"),
    ("schema.yaml", 8, "'ignore' is not one of ['fail', 'redact']"),
    (
        "schema.yaml",
        9,
        "unknown key 'colour' (allowed: context, decrypt, on_error, on_plaintext, records, reveal)",
    ),
    ("schema.yaml", 14, "bits: 4 is less than the minimum of 8"),
    ("schema.yaml", 14, "'digitz' is not one of"),
    # A route the schema accepts is compiled beside one it refuses.
    ("schema.yaml", 18, "path parameter {idd} is not declared by '/schema-errors/{id}'"),
]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(dedent(text), encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of the only line of ``path`` containing ``needle``."""
    found = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if needle in line]
    assert len(found) == 1, (needle, found)
    return found[0]


def problems_of(*paths: Path) -> list[Problem]:
    with pytest.raises(PolicyError) as info:
        load_policies(paths)
    problems = [p for p in info.value.problems if isinstance(p, Problem)]
    assert len(problems) == len(info.value.problems)
    return problems


def one_problem(*paths: Path) -> Problem:
    problems = problems_of(*paths)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def simple_policy(name: str = "p", methods: str = "GET", path: str = "/things/{id}", extra: str = "") -> str:
    return f"""\
version: 1
name: {name}
{extra}routes:
  - match: {{methods: [{methods}], path: "{path}"}}
    response:
      context: {{Purpose: test}}
      decrypt: ["$.ssn"]
"""


def routes_policy(routes: str, *, header: str = "") -> str:
    """A policy named p with ``routes``, a YAML list of routes."""
    return f"version: 1\nname: p\n{header}routes:\n" + indent(dedent(routes).strip("\n"), "  ") + "\n"


def only_route(policies: PolicySet) -> Route:
    assert len(policies.routes) == 1
    return policies.routes[0]


# --- the shipped examples ---------------------------------------------------------------------


def test_shipped_policies_load() -> None:
    policies = load_policies([POLICIES])
    assert policies.names == ("fhir-patient", "patients")
    assert len(policies.routes) == 9
    assert Counter(r.policy for r in policies.routes) == {"patients": 5, "fhir-patient": 4}
    assert policies.unmatched == "pass"


def test_published_schema_equals_the_packaged_copy() -> None:
    published = json.loads((POLICIES / "schema.json").read_text(encoding="utf-8"))
    packaged = json.loads((ROOT / "phi_gateway" / "policy_schema.json").read_text(encoding="utf-8"))
    assert published == packaged
    assert policy_schema() == published


def test_schema_json_in_a_policy_directory_is_not_read_as_a_policy(tmp_path: Path) -> None:
    write(tmp_path, "schema.json", "not a policy")
    write(tmp_path, "p.yaml", simple_policy())
    assert load_policies([tmp_path]).names == ("p",)


# --- the broken set ---------------------------------------------------------------------------


def test_every_problem_of_the_broken_set_is_reported_at_its_line() -> None:
    problems = problems_of(BROKEN)
    unclaimed = list(problems)
    for file, line, text in BROKEN_PROBLEMS:
        hits = [p for p in unclaimed if Path(p.file).name == file and p.line == line and text in p.message]
        assert hits, f"missing {file}:{line}: ...{text}... in\n" + "\n".join(map(str, problems))
        unclaimed.remove(hits[0])
    assert unclaimed == []
    assert len(problems) == len(BROKEN_PROBLEMS)


def test_problems_are_sorted_by_file_and_line() -> None:
    problems = problems_of(BROKEN)
    assert [(p.file, p.line) for p in problems] == sorted((p.file, p.line) for p in problems)
    assert len({p.file for p in problems}) == 3


def test_policy_error_message_lists_every_problem() -> None:
    with pytest.raises(PolicyError) as info:
        load_policies([BROKEN])
    assert str(info.value).splitlines() == [str(p) for p in info.value.problems]


def test_no_policy_files_is_a_problem(tmp_path: Path) -> None:
    assert "no policy files found" in one_problem(tmp_path).message


# --- each semantic error alone ----------------------------------------------------------------


def test_undeclared_path_parameter(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [GET], path: "/things/{id}"}
              response:
                context:
                  Purpose: test
                  ResourceId: "{thing_id}"
                decrypt: ["$.ssn"]
        """),
    )
    problem = one_problem(path)
    assert problem.file == str(path)
    assert problem.line == line_of(path, "ResourceId")
    assert "path parameter {thing_id} is not declared by '/things/{id}'" in problem.message


def test_invalid_jsonpath(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [GET], path: "/things/{id}"}
              response:
                context: {Purpose: test}
                decrypt:
                  - "$.ssn"
                  - "$.notes[?"
        """),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, "$.notes[?")
    assert "decrypt[1]: invalid JSONPath '$.notes[?'" in problem.message


def test_field_path_that_is_the_record_itself(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [PUT], path: "/things/{id}"}
              request:
                context: {Purpose: test}
                encrypt:
                  - "$.ssn"
                  - "$"
        """),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, '- "$"')
    assert "encrypt[1]: a field path must select something inside the record" in problem.message


def test_same_field_under_two_spellings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [PUT], path: "/things/{id}"}
              request:
                context: {Purpose: test}
                encrypt:
                  - "$.ssn"
                  - "$['ssn']"
        """),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, "$['ssn']")
    assert "encrypt[1]" in problem.message
    assert "selects the same field as an earlier entry" in problem.message


def test_blind_index_into_an_encrypted_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [PUT], path: "/things/{id}"}
              request:
                context: {Purpose: test}
                encrypt: ["$.ssn", "$.ssn_bidx"]
                blind_index:
                  - field: "$.ssn"
                    into: ssn_bidx
                    bits: 32
        """),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, "into: ssn_bidx")
    assert "into: 'ssn_bidx' is also encrypted" in problem.message


def test_index_defined_twice_differently(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [PUT], path: "/things/{id}"}
              request:
                blind_index:
                  - {field: "$.ssn", into: ssn_bidx, normalize: digits, bits: 32}
            - match: {methods: [POST], path: "/things"}
              request:
                blind_index:
                  - {field: "$.ssn", into: ssn_bidx, normalize: digits, bits: 24}
        """),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, "bits: 24")
    assert f"index 'ssn_bidx' is defined differently at line {line_of(path, 'bits: 32')}" in problem.message


def test_index_defined_twice_the_same_way_is_one_index(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [PUT], path: "/things/{id}"}
              request:
                blind_index:
                  - {field: "$.ssn", into: ssn_bidx, normalize: [digits], bits: 32}
            - match: {methods: [POST], path: "/things"}
              request:
                blind_index:
                  - {field: "$.ssn", into: ssn_bidx, normalize: digits, bits: 32}
        """),
    )
    routes = load_policies([path]).routes
    indexes = [r.request.blind_indexes[0].index for r in routes if r.request is not None]
    assert len(indexes) == 2
    assert indexes[0] == indexes[1]


def test_two_indexes_into_the_same_field_of_one_request(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [PUT], path: "/things/{id}"}
              request:
                blind_index:
                  - {field: "$.ssn", into: ssn_bidx, normalize: digits, bits: 32}
                  - {field: "$.phone", into: ssn_bidx, normalize: digits, bits: 32}
        """),
    )
    assert one_problem(path).line == line_of(path, "$.phone")


INDEX_ROUTES = """\
- match: {methods: [PUT], path: "/things/{id}"}
  request:
    blind_index:
      - {field: "$.ssn", into: ssn_bidx, normalize: digits, bits: 32}
- match: {methods: [%s], path: "%s"}
"""


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "query:\n    - {param: ssn, blind_index: nope}",
            "no blind_index of this policy is written into 'nope'",
        ),
        (
            "query:\n    - {params: [ssn, dob], blind_index: ssn_bidx}",
            "index 'ssn_bidx' takes 1 value(s), 2 given",
        ),
        (
            'request:\n    criteria:\n      - {field: "$.ssn", blind_index: nope}',
            "no blind_index of this policy is written into 'nope'",
        ),
        (
            'request:\n    criteria:\n      - {fields: ["$.ssn", "$.dob"], blind_index: ssn_bidx}',
            "index 'ssn_bidx' takes 1 value(s), 2 given",
        ),
    ],
    ids=["query-unknown", "query-arity", "criteria-unknown", "criteria-arity"],
)
def test_query_and_criteria_must_fit_a_known_index(tmp_path: Path, entry: str, message: str) -> None:
    method = "GET" if entry.startswith("query") else "POST"
    path = write(tmp_path, "p.yaml", routes_policy(INDEX_ROUTES % (method, "/things") + "  " + entry))
    problem = one_problem(path)
    assert problem.line == line_of(path, "blind_index: ")
    assert message in problem.message


def test_query_normalize_must_equal_the_index_normalize(tmp_path: Path) -> None:
    queries = """\
  query:
    - {param: ssn, blind_index: ssn_bidx, normalize: digits}
    - {param: ssn_ok, blind_index: ssn_bidx, normalize: [digits]}
    - {param: ssn_bad, blind_index: ssn_bidx, normalize: [trim, digits]}
"""
    path = write(tmp_path, "p.yaml", routes_policy(INDEX_ROUTES % ("GET", "/things") + queries))
    problem = one_problem(path)
    assert problem.line == line_of(path, "ssn_bad")
    assert "query[2].normalize: differs from index 'ssn_bidx'" in problem.message
    assert "['digits']" in problem.message


def test_reveal_of_a_field_that_is_not_decrypted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [GET], path: "/things/{id}"}
              response:
                context: {Purpose: test}
                decrypt: ["$.ssn"]
                reveal:
                  "$['ssn']": {roles: [clinician]}
                  "$.dob": {roles: [clinician], otherwise: mask}
        """),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, '"$.dob"')
    assert "reveal names a field that decrypt does not list" in problem.message


def test_status_without_a_response_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match:
                methods: [PUT]
                path: "/things/{id}"
                status: [200]
              request:
                context: {Purpose: test}
                encrypt: ["$.ssn"]
        """),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, "status:")
    assert "status only applies to a response section" in problem.message


def test_routes_of_the_same_shape_and_a_shared_method_are_ambiguous(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", simple_policy("a", "GET", "/things/{id}"))
    second = write(tmp_path, "b.yaml", simple_policy("b", "PUT, GET", "/things/{thing}/"))
    problem = one_problem(tmp_path)
    assert (problem.file, problem.line) == (str(second), line_of(second, "match:"))
    assert "route GET|PUT /things/{thing}/" in problem.message
    assert f"matches the same requests as GET /things/{{id}} ({first}:4)" in problem.message


@pytest.mark.parametrize(
    ("methods", "path"),
    [("PUT", "/things/{thing}"), ("GET", "/things/search"), ("GET", "/things/{id}/more")],
)
def test_routes_are_not_ambiguous_when_a_method_or_a_segment_differs(
    tmp_path: Path, methods: str, path: str
) -> None:
    write(tmp_path, "a.yaml", simple_policy("a", "GET", "/things/{id}"))
    write(tmp_path, "b.yaml", simple_policy("b", methods, path))
    assert len(load_policies([tmp_path]).routes) == 2


def test_duplicate_policy_names_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", simple_policy("same", path="/a"))
    second = write(tmp_path, "b.yaml", simple_policy("same", path="/b"))
    problem = one_problem(tmp_path)
    assert (problem.file, problem.line) == (str(second), 2)
    assert f"policy name 'same' is already used by {first}" in problem.message


def test_files_disagreeing_on_unmatched(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", simple_policy("a", path="/a", extra="unmatched: deny\n"))
    second = write(tmp_path, "b.yaml", simple_policy("b", path="/b", extra="unmatched: pass\n"))
    with pytest.raises(PolicyError) as info:
        load_policies([tmp_path])
    assert [p.file for p in info.value.problems] == [str(first), str(second)]  # one at each file's key
    for problem in info.value.problems:
        assert "unmatched: files disagree" in problem.message
        assert f"{first} says deny" in problem.message and f"{second} says pass" in problem.message


def test_files_disagreeing_on_unmatched_point_at_the_key(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", simple_policy("a", path="/a", extra="unmatched: deny\n"))
    write(tmp_path, "b.yaml", simple_policy("b", path="/b", extra="unmatched: pass\n"))
    with pytest.raises(PolicyError) as info:
        load_policies([tmp_path])
    assert [p.line for p in info.value.problems] == [3, 3]


def test_files_agreeing_on_unmatched(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", simple_policy("a", path="/a", extra="unmatched: deny\n"))
    write(tmp_path, "b.yaml", simple_policy("b", path="/b", extra="unmatched: deny\n"))
    write(tmp_path, "c.yaml", simple_policy("c", path="/c"))
    assert load_policies([tmp_path]).unmatched == "deny"


# Each text repeats one key: (text, a needle on the repetition's line, the key's location).
DUPLICATE_KEYS = {
    "top level": (simple_policy() + "name: q\n", "name: q", "name"),
    "response": (simple_policy() + '      decrypt: ["$.dob"]\n', "$.dob", "routes[0].response.decrypt"),
    "context": (
        routes_policy("""
            - match: {methods: [GET], path: "/things/{id}"}
              response:
                context:
                  Purpose: test
                  Purpose: other
                decrypt: ["$.ssn"]
        """),
        "Purpose: other",
        "routes[0].response.context.Purpose",
    ),
    "reveal": (
        routes_policy("""
            - match: {methods: [GET], path: "/things/{id}"}
              response:
                context: {Purpose: test}
                decrypt: ["$.ssn"]
                reveal:
                  "$.ssn": {roles: [clinician]}
                  "$.ssn": {roles: [billing]}
        """),
        "billing",
        "routes[0].response.reveal.$.ssn",
    ),
    "flow mapping": (
        routes_policy("""
            - match: {methods: [GET], path: "/things/{id}", methods: [PUT]}
              response:
                context: {Purpose: test}
                decrypt: ["$.ssn"]
        """),
        "methods: [PUT]",
        "routes[0].match.methods",
    ),
}


@pytest.mark.parametrize(
    ("text", "location"), [(t, k) for t, _, k in DUPLICATE_KEYS.values()], ids=DUPLICATE_KEYS
)
def test_duplicate_keys_at_any_depth(tmp_path: Path, text: str, location: str) -> None:
    path = write(tmp_path, "p.yaml", text)
    problem = one_problem(path)
    assert problem.file == str(path)
    assert problem.message == f"{location}: duplicate key"


@pytest.mark.parametrize(
    ("text", "needle"),
    [(t, n) for k, (t, n, _) in DUPLICATE_KEYS.items() if k != "flow mapping"],
    ids=[k for k in DUPLICATE_KEYS if k != "flow mapping"],
)
def test_duplicate_key_is_reported_at_the_repetition(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, "p.yaml", text)
    assert one_problem(path).line == line_of(path, needle)


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "p.yaml", text)
    assert one_problem(path) == Problem(str(path), 1, "policy file is empty")


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("version: 1\nname: p\n\troutes: []\n", 3, "found character '\\t' that cannot start any token"),
        ("version: 1\nname: p: q\n", 2, "mapping values are not allowed here"),
        ('{"version": 1,\n "name": "p"\n "routes": []}\n', 3, "expected ',' or '}'"),
        ("version: 1\n---\nname: p\n", 2, "but found another document"),
    ],
    ids=["tab", "colon", "json-comma", "two-documents"],
)
def test_file_that_is_not_yaml(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = write(tmp_path, "p.yaml", text)
    problem = one_problem(path)
    assert (problem.file, problem.line) == (str(path), line)
    assert problem.message.startswith("not valid YAML/JSON: ")
    assert reason in problem.message


@pytest.mark.parametrize("text", ["hello\n", "- a\n- b\n", "42\n"])
def test_file_that_is_yaml_but_not_a_mapping(tmp_path: Path, text: str) -> None:
    assert "is not of type 'object'" in one_problem(write(tmp_path, "p.yaml", text)).message


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xff\xfeversion: 1\n")
    assert one_problem(path) == Problem(str(path), 1, "cannot read policy file: not UTF-8")


def test_file_with_a_control_character_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"version: 1\x00\n")
    assert "not valid YAML/JSON" in one_problem(path).message


@pytest.mark.parametrize(("key", "shown"), [("1", "1"), ("true", "True"), ("No", "False"), ("null", "None")])
def test_non_string_key(tmp_path: Path, key: str, shown: str) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy(f"""
            - match: {{methods: [GET], path: "/things/{{id}}"}}
              response:
                context:
                  Purpose: test
                  {key}: x
                decrypt: ["$.ssn"]
        """),
    )
    assert one_problem(path) == Problem(str(path), line_of(path, f"{key}: x"), f"key {shown} is not a string")


@pytest.mark.parametrize(
    "entry",
    ["{param: id, kms: pseudonymize}", '{path: "$.id", kms: pseudonymize}', "{header: X-Tenant, kms: plain}"],
)
def test_per_policy_rejects_kms_use_of_non_literal_entries(tmp_path: Path, entry: str) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy(
            f"""
            - match: {{methods: [GET], path: "/things/{{id}}"}}
              response:
                context:
                  Purpose: test
                  ResourceId: {entry}
                decrypt: ["$.ssn"]
            """,
            header="data_key: per_policy\n",
        ),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, "ResourceId")
    assert "with data_key: per_policy only literal entries reach KMS; drop 'kms'" in problem.message


def test_per_policy_accepts_kms_use_of_literals_and_per_record_of_anything(tmp_path: Path) -> None:
    route = """
        - match: {methods: [GET], path: "/things/{id}"}
          response:
            context:
              Purpose: {literal: test, kms: pseudonymize}
              ResourceId: %s
            decrypt: ["$.ssn"]
    """
    per_policy = write(tmp_path, "a.yaml", routes_policy(route % '"{id}"', header="data_key: per_policy\n"))
    per_record = write(tmp_path, "b.yaml", routes_policy(route % "{param: id, kms: pseudonymize}"))
    assert len(load_policies([per_policy]).routes) == 1
    assert len(load_policies([per_record]).routes) == 1


def test_unknown_top_level_key_lists_the_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", simple_policy() + "owner: security-team\n")
    problem = one_problem(path)
    assert problem.line == line_of(path, "owner:")
    assert problem.message == (
        "owner: unknown key 'owner' (allowed: data_key, description, key, name, require_principal, routes, "
        "unmatched, version)"
    )


def test_unknown_key_with_a_block_value_is_reported_at_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", simple_policy() + "owner:\n  team: security\n")
    assert one_problem(path).line == line_of(path, "owner:")


# --- JSON policy files ------------------------------------------------------------------------


def _summary(route: Route) -> tuple[Any, ...]:
    request, response = route.request, route.response
    return (
        route.policy,
        sorted(route.methods),
        route.template.text,
        [p.canonical for p in request.encrypt] if request else None,
        [(i.index, [p.canonical for p in i.fields]) for i in request.blind_indexes] if request else None,
        [(i.index, [p.canonical for p in i.fields]) for i in request.criteria] if request else None,
        route.query,
        [p.canonical for p in response.decrypt] if response else None,
        (response.records.canonical, response.context.entries[0].value, dict(response.reveal))
        if response
        else None,
    )


def _as_json(tmp_path: Path, source: Path, **dumps: Any) -> Path:
    target = tmp_path / source.with_suffix(".json").name
    target.write_text(
        json.dumps(yaml.safe_load(source.read_text(encoding="utf-8")), **dumps), encoding="utf-8"
    )
    return target


@pytest.mark.parametrize(
    "dumps", [{"indent": 2}, {}, {"separators": (",", ":")}], ids=["indented", "line", "compact"]
)
def test_json_policy_compiles_like_its_yaml(tmp_path: Path, dumps: dict[str, Any]) -> None:
    for source in ("patients.yaml", "fhir-patient.yaml"):
        from_yaml = load_policies([POLICIES / source])
        from_json = load_policies([_as_json(tmp_path, POLICIES / source, **dumps)])
        assert list(map(_summary, from_json.routes)) == list(map(_summary, from_yaml.routes))


def test_json_policy_errors_carry_line_numbers(tmp_path: Path) -> None:
    data = yaml.safe_load((POLICIES / "patients.yaml").read_text(encoding="utf-8"))
    data["routes"][2]["response"]["reveal"]["$.nope"] = {"roles": ["clinician"]}
    data["routes"][0]["request"]["context"]["ResourceId"] = "{patientid}"
    path = tmp_path / "patients.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    problems = problems_of(path)
    assert [(p.line, p.message.split(": ", 1)[0]) for p in problems] == [
        (line_of(path, '"{patientid}"'), "routes[0].request.context.ResourceId"),
        (line_of(path, '"$.nope"'), "routes[2].response.reveal.$.nope"),
    ]


def test_json_policy_with_a_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(
        '{\n  "version": 1,\n  "version": 1,\n  "name": "p",\n  "routes": []\n}\n', encoding="utf-8"
    )
    assert one_problem(path).message == "version: duplicate key"


def test_json_policy_indented_with_tabs(tmp_path: Path) -> None:
    path = _as_json(tmp_path, POLICIES / "patients.yaml", indent="\t")
    assert load_policies([path]).names == ("patients",)


# --- route matching ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> PolicySet:
    return load_policies([POLICIES])


@pytest.mark.parametrize(
    ("method", "path", "template", "params"),
    [
        ("PUT", "/patients/p-1001", "/patients/{patient_id}", {"patient_id": "p-1001"}),
        ("PUT", "/patients/p-1001/", "/patients/{patient_id}", {"patient_id": "p-1001"}),
        ("GET", "/patients", "/patients", {}),
        ("GET", "/patients/", "/patients", {}),
        ("POST", "/patients/search", "/patients/search", {}),
        ("GET", "/fhir/Patient/abc", "/fhir/Patient/{id}", {"id": "abc"}),
        ("POST", "/fhir", "/fhir", {}),
    ],
)
def test_match_extracts_parameters(
    shipped: PolicySet, method: str, path: str, template: str, params: dict[str, str]
) -> None:
    found = shipped.match(method, path)
    assert found is not None
    assert found.route.template.text == template
    assert method in found.route.methods
    assert found.params == params


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/patients/p-1"),
        ("POST", "/patients/p-1"),
        ("PUT", "/patients"),
        ("GET", "/nothing"),
        ("GET", "/patients/a/b"),
        ("GET", "/patients//"),
        ("GET", "/patientsX"),
        ("GET", "/"),
    ],
)
def test_no_match_is_none(shipped: PolicySet, method: str, path: str) -> None:
    assert shipped.match(method, path) is None


@pytest.mark.parametrize("order", [("a.yaml", "b.yaml"), ("b.yaml", "a.yaml")])
def test_literal_segment_wins_over_a_parameter_in_any_file_order(
    tmp_path: Path, order: tuple[str, str]
) -> None:
    write(tmp_path, order[0], simple_policy("by-id", "POST", "/patients/{id}"))
    write(tmp_path, order[1], simple_policy("search", "POST", "/patients/search"))
    policies = load_policies([tmp_path])
    search = policies.match("POST", "/patients/search")
    by_id = policies.match("POST", "/patients/p-1")
    assert search is not None
    assert (search.route.policy, search.params) == ("search", {})
    assert by_id is not None
    assert (by_id.route.policy, by_id.params) == ("by-id", {"id": "p-1"})


def test_leftmost_literal_segment_wins(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", simple_policy("a", "GET", "/x/{p}/c"))
    write(tmp_path, "b.yaml", simple_policy("b", "GET", "/x/b/{q}"))
    found = load_policies([tmp_path]).match("GET", "/x/b/c")
    assert found is not None
    assert (found.route.policy, found.params) == ("b", {"q": "c"})


def test_unmatched_defaults_to_pass_and_reads_deny(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", simple_policy("a", path="/a"))
    assert load_policies([first]).unmatched == "pass"
    second = write(tmp_path, "b.yaml", simple_policy("b", path="/b", extra="unmatched: deny\n"))
    assert load_policies([second]).unmatched == "deny"
    assert load_policies([tmp_path]).unmatched == "deny"


STATUSES = (100, 199, 200, 201, 204, 299, 300, 304, 404, 500)


def test_response_rule_applies_to_every_2xx_by_default(shipped: PolicySet) -> None:
    found = shipped.match("GET", "/patients/p-1")
    assert found is not None
    response = found.route.response
    assert response is not None
    assert response.status is None
    assert [s for s in STATUSES if response.applies_to(s)] == [200, 201, 204, 299]


def test_response_rule_applies_to_its_explicit_statuses(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [GET], path: "/things/{id}", status: [200, 404]}
              response:
                context: {Purpose: test}
                decrypt: ["$.ssn"]
        """),
    )
    response = only_route(load_policies([path])).response
    assert response is not None
    assert response.status == frozenset({200, 404})
    assert [s for s in STATUSES if response.applies_to(s)] == [200, 404]


# --- context ----------------------------------------------------------------------------------


CONTEXT_ROUTE = """
    - match: {methods: [GET], path: "/things/{id}"}
      response:
        context:
          FromParam: "{id}"
          FromPath: "$.record.id"
          Literal: PHI_Storage
          DollarLiteral: {literal: "$.x"}
          Tenant: {header: X-Tenant-ID, kms: omit}
          Pseudonym: {param: id, kms: pseudonymize}
        decrypt: ["$.ssn"]
"""


def _entries(entries: tuple[ContextEntry, ...]) -> list[tuple[str, str, str, str]]:
    return [(e.name, e.source, e.value, e.kms) for e in entries]


def test_context_shorthands_and_header_names(tmp_path: Path) -> None:
    response = only_route(load_policies([write(tmp_path, "p.yaml", routes_policy(CONTEXT_ROUTE))])).response
    assert response is not None
    spec = response.context
    assert spec.policy == "p"
    assert _entries(spec.entries) == [
        ("FromParam", "param", "id", "pseudonymize"),  # record values default to pseudonyms
        ("FromPath", "path", "$.record.id", "pseudonymize"),
        ("Literal", "literal", "PHI_Storage", "plain"),
        ("DollarLiteral", "literal", "$.x", "plain"),
        ("Tenant", "header", "x-tenant-id", "omit"),
        ("Pseudonym", "param", "id", "pseudonymize"),
    ]
    from_path = spec.entries[1].path
    assert from_path is not None
    assert from_path.find({"record": {"id": "r-1"}}) == ["r-1"]
    assert all(e.path is None for e in spec.entries if e.source != "path")


def test_a_mistyped_param_shorthand_is_an_error_not_a_constant(tmp_path: Path) -> None:
    route = CONTEXT_ROUTE.replace("Literal: PHI_Storage", 'Typo: "{ id}"')
    problem = one_problem(write(tmp_path, "p.yaml", routes_policy(route)))
    assert "mistyped {param}" in problem.message and problem.message.startswith(
        "routes[0].response.context.Typo"
    )


def test_kms_entries_per_record_omit_only_the_omitted(tmp_path: Path) -> None:
    response = only_route(load_policies([write(tmp_path, "p.yaml", routes_policy(CONTEXT_ROUTE))])).response
    assert response is not None
    assert not response.context.per_policy_key
    assert [e.name for e in response.context.kms_entries] == [
        "FromParam",
        "FromPath",
        "Literal",
        "DollarLiteral",
        "Pseudonym",
    ]


def test_kms_entries_per_policy_are_only_the_literals(tmp_path: Path) -> None:
    route = """
        - match: {methods: [GET], path: "/things/{id}"}
          response:
            context:
              ResourceId: "{id}"
              Record: "$.id"
              Tenant: {header: X-Tenant}
              Purpose: PHI_Storage
              Hidden: {literal: internal, kms: omit}
              Masked: {literal: constant, kms: pseudonymize}
            decrypt: ["$.ssn"]
    """
    path = write(tmp_path, "p.yaml", routes_policy(route, header="data_key: per_policy\n"))
    response = only_route(load_policies([path])).response
    assert response is not None
    assert response.context.per_policy_key
    assert _entries(response.context.kms_entries) == [
        ("Purpose", "literal", "PHI_Storage", "plain"),
        ("Masked", "literal", "constant", "pseudonymize"),
    ]
    assert len(response.context.entries) == 6


def test_shipped_fhir_policy_keeps_the_patient_away_from_kms(shipped: PolicySet) -> None:
    found = shipped.match("PUT", "/fhir/Patient/abc")
    assert found is not None
    assert found.route.request is not None
    context = found.route.request.context
    assert context is not None
    assert _entries(context.kms_entries) == [("ResourceType", "literal", "Patient", "plain")]


def test_packaged_demo_copies_match_their_sources() -> None:
    package = ROOT / "phi_gateway"
    assert (package / "demo_policies" / "patients.yaml").read_text() == (
        ROOT / "policies" / "patients.yaml"
    ).read_text()
    assert json.loads((package / "demo_patient.json").read_text()) == json.loads(
        (ROOT / "tests" / "samples" / "patient.json").read_text()
    )
