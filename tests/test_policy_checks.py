"""Policy checks beyond exact spellings: index names selected by any encrypt path, reveal
keys spelling one field twice, routes differing only in case, the schema's stated
defaults against the compiler's, and compile problems listed beside schema problems."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from phi_gateway.policy import load_policies
from phi_gateway.policy_file import policy_schema
from phi_gateway.rules import PolicySet
from tests.test_policy import line_of, one_problem, problems_of, routes_policy, simple_policy, write

# --- an index written into a member some encrypt path selects ---------------------------------


def indexed_policy(encrypt: str) -> str:
    """One route encrypting ``encrypt`` and writing a blind index into ``ssn_bidx``."""
    return routes_policy(f"""
        - match: {{methods: [PUT], path: "/things/{{id}}"}}
          request:
            context: {{Purpose: test}}
            encrypt: ["{encrypt}"]
            blind_index:
              - field: "$.ssn"
                into: ssn_bidx
                bits: 32
    """)


@pytest.mark.parametrize("encrypt", ["$.*", "$[*]", "$..ssn_bidx", "$['ssn_bidx']", "$.ssn_bidx[*]"])
def test_blind_index_into_a_member_any_encrypt_path_selects(tmp_path: Path, encrypt: str) -> None:
    path = write(tmp_path, "p.yaml", indexed_policy(encrypt))
    problem = one_problem(path)
    assert problem.line == line_of(path, "into: ssn_bidx")
    assert f"into: 'ssn_bidx' is also encrypted (by {encrypt!r})" in problem.message


@pytest.mark.parametrize("encrypt", ["$.ssn", "$.ssn_bidx_old", "$.*.ssn_bidx", "$[?(@.ssn_bidx)].x"])
def test_encrypt_paths_beside_the_index_member_are_accepted(tmp_path: Path, encrypt: str) -> None:
    write(tmp_path, "p.yaml", indexed_policy(encrypt))
    assert len(load_policies([tmp_path]).routes) == 1


def test_criteria_index_into_a_member_an_encrypt_path_selects(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [PUT], path: "/things/{id}"}
              request:
                context: {Purpose: test}
                encrypt: ["$.notes"]
                blind_index:
                  - {field: "$.ssn", into: ssn_bidx, bits: 32}
            - match: {methods: [POST], path: "/things/search"}
              request:
                context: {Purpose: test}
                encrypt: ["$.*"]
                criteria:
                  - {field: "$.ssn", blind_index: ssn_bidx}
        """),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, '- {field: "$.ssn", blind_index: ssn_bidx}')
    assert "criteria[0].blind_index: 'ssn_bidx' is also encrypted (by '$.*')" in problem.message


# --- reveal keys ------------------------------------------------------------------------------


def test_two_reveal_keys_spelling_one_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [GET], path: "/things/{id}"}
              response:
                context: {Purpose: test}
                decrypt: ["$.ssn"]
                reveal:
                  "$.ssn": {roles: [clinician], otherwise: mask_last4}
                  "$['ssn']": {roles: [billing], otherwise: remove}
        """),
    )
    problem = one_problem(path)
    assert problem.line == line_of(path, "\"$['ssn']\": {roles")
    assert "selects the same field as an earlier entry" in problem.message


# --- routes differing only in the case of a literal segment -----------------------------------


@pytest.mark.parametrize("spelling", ["/Patients", "/PATIENTS/", "/patients"])
def test_routes_differing_only_in_case_are_ambiguous(tmp_path: Path, spelling: str) -> None:
    write(tmp_path, "a.yaml", simple_policy("a", "GET", "/patients"))
    second = write(tmp_path, "b.yaml", simple_policy("b", "GET", spelling))
    problem = one_problem(tmp_path)
    assert (problem.file, problem.line) == (str(second), line_of(second, "match:"))
    assert "matches the same requests as GET /patients" in problem.message


def test_case_matters_only_where_the_shape_is_the_same(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", simple_policy("a", "GET", "/patients/{id}"))
    write(tmp_path, "b.yaml", simple_policy("b", "GET", "/Patients/Search"))
    assert len(load_policies([tmp_path]).routes) == 2


# --- the schema's stated defaults are the compiler's ------------------------------------------

DEFAULTS_POLICY = """\
version: 1
name: p
routes:
  - match: {methods: [PUT], path: "/things/{id}"}
    request:
      context: {L: {literal: x}, P: {param: id}, R: {path: "$.id"}, H: {header: X-H}}
      encrypt: ["$.ssn"]
  - match: {methods: [GET], path: "/things/{id}"}
    response:
      context: {L: {literal: x}}
      decrypt: ["$.ssn"]
      reveal: {"$.ssn": {roles: [r]}}
"""


def _defaults(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``default`` the schema states, by the JSON pointer of the schema node holding it."""
    if isinstance(node, dict):
        if "default" in node:
            yield pointer, node["default"]
        for key, value in node.items():
            yield from _defaults(value, f"{pointer}/{key}")
    elif isinstance(node, list):
        for n, value in enumerate(node):
            yield from _defaults(value, f"{pointer}/{n}")


def _kms_default(branch: int) -> tuple[str, Callable[[PolicySet], Any]]:
    """A context entry of the source that ``branch`` of the object form requires, without kms."""
    (source,) = policy_schema()["$defs"]["context_value"]["oneOf"][1]["oneOf"][branch]["required"]
    name = {"literal": "L", "param": "P", "path": "R", "header": "H"}[source]

    def compiled(policies: PolicySet) -> Any:
        request = policies.routes[0].request
        assert request is not None and request.context is not None
        (entry,) = [e for e in request.context.entries if e.name == name]
        assert entry.source == source
        return entry.kms

    return f"/$defs/context_value/oneOf/1/oneOf/{branch}/properties/kms", compiled


def _request(policies: PolicySet) -> Any:
    return policies.routes[0].request


def _response(policies: PolicySet) -> Any:
    return policies.routes[1].response


# Each default the schema states, and what the compiler made of a file that leaves it out.
COMPILED: dict[str, Callable[[PolicySet], Any]] = {
    "/properties/data_key": lambda p: "per_policy" if _request(p).context.per_policy_key else "per_record",
    "/properties/require_principal": lambda p: p.routes[0].require_principal,
    "/$defs/request/properties/records": lambda p: _request(p).records.canonical,
    "/$defs/response/properties/records": lambda p: _response(p).records.canonical,
    "/$defs/reveal/properties/otherwise": lambda p: _response(p).reveal["$.ssn"].otherwise,
    "/$defs/response/properties/on_error": lambda p: _response(p).on_error,
    "/$defs/response/properties/on_plaintext": lambda p: _response(p).on_plaintext,
    **dict(_kms_default(branch) for branch in range(4)),
}


def test_every_default_the_schema_states_is_the_compilers(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", DEFAULTS_POLICY)
    policies = load_policies([tmp_path])
    assert [r.template.text for r in policies.routes] == ["/things/{id}", "/things/{id}"]
    stated = dict(_defaults(policy_schema()))
    assert set(stated) == set(COMPILED), "a default the schema states needs its check here"
    for pointer, default in stated.items():
        assert COMPILED[pointer](policies) == default, pointer


def test_the_object_form_states_no_single_kms_default() -> None:
    """Which default applies depends on the source: only its oneOf branches may state one."""
    kms = policy_schema()["$defs"]["context_value"]["oneOf"][1]["properties"]["kms"]
    assert "default" not in kms and "pseudonymize for a param, path or header" in kms["description"]


# --- compile problems listed beside schema problems -------------------------------------------


def test_a_schema_problem_does_not_hide_another_routes_compile_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [GET], path: "/things"}
              response:
                context: {Purpose: test}
                decrypt: ["$.ssn"]
                on_error: ignore
            - match: {methods: [GET], path: "/things/{id}"}
              response:
                context: {ResourceId: "{idd}"}
                decrypt: ["$.ssn"]
        """),
    )
    problems = problems_of(path)
    assert [(p.line, p.message.split(": ", 1)[0]) for p in problems] == [
        (line_of(path, "on_error: ignore"), "routes[0].response.on_error"),
        (line_of(path, "{idd}"), "routes[1].response.context.ResourceId"),
    ]
    assert "path parameter {idd} is not declared by '/things/{id}'" in problems[1].message


def test_a_route_the_schema_refuses_is_not_compiled(tmp_path: Path) -> None:
    """Its own compile problem ({idd}) shows once the schema problem is fixed; an index it
    defines is not reported missing where another route uses it."""
    path = write(
        tmp_path,
        "p.yaml",
        routes_policy("""
            - match: {methods: [PUT], path: "/things/{id}"}
              request:
                context: {ResourceId: "{idd}"}
                encrypt: ["$.ssn"]
                blind_index:
                  - {field: "$.ssn", into: ssn_bidx, bits: 4}
            - match: {methods: [GET], path: "/things"}
              query:
                - {param: ssn, blind_index: ssn_bidx}
        """),
    )
    problem = one_problem(path)
    assert "bits: 4 is less than the minimum of 8" in problem.message


@pytest.mark.parametrize(
    ("old", "new"),
    [("name: p\n", "name: p\ndata_key: sometimes\n"), ("version: 1\n", "version: 2\n")],
)
def test_a_file_whose_top_level_the_schema_refuses_is_not_compiled(
    tmp_path: Path, old: str, new: str
) -> None:
    text = simple_policy(path="/things/{id}").replace("Purpose: test", 'ResourceId: "{idd}"')
    path = write(tmp_path, "p.yaml", text.replace(old, new))
    problem = one_problem(path)
    assert problem.message.startswith(new.splitlines()[-1].split(":")[0] + ": ")


def test_an_unknown_top_level_key_does_not_stop_the_compilation(tmp_path: Path) -> None:
    text = simple_policy(path="/things/{id}", extra="colour: blue\n").replace("Purpose: test", 'R: "{idd}"')
    path = write(tmp_path, "p.yaml", text)
    messages = sorted(p.message for p in problems_of(path))
    assert len(messages) == 2
    assert messages[0].startswith("colour: unknown key 'colour'")
    assert "path parameter {idd} is not declared" in messages[1]
