"""``phi-gateway policy``: commands for the security team that owns the policy files."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click
import orjson

from phi_gateway.cache import DataKeyCache
from phi_gateway.cli import fail, parse_headers, read_stdin, run
from phi_gateway.exceptions import PHIGatewayError, PolicyError
from phi_gateway.jsonpath import JsonPath
from phi_gateway.jsonvalue import loads_strict
from phi_gateway.keyring import LocalKeyring
from phi_gateway.pepper import Pepper
from phi_gateway.policy import load_policies
from phi_gateway.policy_file import policy_schema
from phi_gateway.rules import ContextSpec, PolicySet, RequestRule, ResponseRule, Route
from phi_gateway.search import rewrite_query
from phi_gateway.transform import Scope, decrypt_response, encrypt_request

_POLICIES = click.option(
    "--policies",
    "policy_paths",
    envvar="PHI_GATEWAY_POLICIES",
    multiple=True,
    default=["policies"],
    show_default=True,
    type=click.Path(exists=True),
    help="Policy files or directories.",
)


@click.group()
def policy() -> None:
    """Check and preview policy files."""


@policy.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
def check(paths: tuple[str, ...]) -> None:
    """Validate policy files (or directories of them); list every problem as file:line.

    Schema problems and the checks beyond the schema are listed in one run, with one
    limit: a route the schema refuses, or a whole file whose version, name, key,
    data_key, unmatched, require_principal or routes it refuses, gets no further
    checks until that is fixed.
    """
    try:
        policies = load_policies(paths)
    except PolicyError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        click.echo(f"{len(exc.problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo(
        f"ok: {len(policies.names)} policies, {len(policies.routes)} routes ({', '.join(policies.names)})"
    )


@policy.command()
def schema() -> None:
    """Print the JSON Schema of policy files (for editors and CI)."""
    click.echo(json.dumps(policy_schema(), indent=2))


def _shape(value: Any) -> str:
    """A value as its type and size only: previews never show PHI."""
    if isinstance(value, str):
        return f"string ({len(value)} chars)"
    if isinstance(value, bool) or value is None:
        return type(value).__name__ if value is not None else "null"
    if isinstance(value, int | float):
        return type(value).__name__
    if isinstance(value, dict):
        return f"object ({len(value)} members)"
    return f"array ({len(value)} items)"


def _context_lines(spec: ContextSpec) -> list[str]:
    lines = []
    for entry in spec.entries:
        shown = f"{entry.value!r}" if entry.source == "literal" else f"<{entry.source} {entry.value}>"
        kms = "not sent to KMS" if entry not in spec.kms_entries else f"KMS: {entry.kms}"
        lines.append(f"    context {entry.name} = {shown} ({kms})")
    return lines


def _present(paths: Sequence[JsonPath], record: Any) -> list[bool]:
    """Whether each path has a non-null value in ``record`` (an index needs every one)."""
    return [any(value is not None for value in path.find(record)) for path in paths]


def _hide_decrypted(doc: Any, rule: ResponseRule) -> None:
    """Replace each value at a decrypt path by its type and size, as the description shows it."""
    for record in rule.records.find(doc):
        for path in rule.decrypt:
            places: list[tuple[Any, Any]] = path.locate(record)
            for parent, key in places:
                parent[key] = f"<{_shape(parent[key])}>"


def _describe(route: Route, doc: Any, response: bool) -> list[str]:
    lines = [f"route: {route}", f"policy: {route.policy}"]
    rule: RequestRule | ResponseRule | None = route.response if response else route.request
    if rule is None:
        return [*lines, f"no {'response' if response else 'request'} rule: the body passes through unchanged"]
    request = rule if isinstance(rule, RequestRule) else None
    paths, verb = (rule.encrypt, "encrypt") if isinstance(rule, RequestRule) else (rule.decrypt, "decrypt")
    records, context = rule.records.find(doc), rule.context
    lines.append(f"records: {len(records)} at {rule.records.source}")
    lines += _context_lines(context) if context is not None else []
    for n, record in enumerate(records):
        lines.append(f"  record {n}:")
        for path in paths:
            for value in path.find(record):
                what = verb
                if isinstance(rule, ResponseRule) and path.canonical in rule.reveal:
                    reveal = rule.reveal[path.canonical]
                    what += f", reveal to {sorted(reveal.roles)} else {reveal.otherwise}"
                lines.append(f"    {what} {path.canonical}: {_shape(value)}")
        if request is not None:
            for index in request.blind_indexes:
                if not all(_present(index.fields, record)):
                    continue  # no index is written, and a client's own is removed
                sources = ", ".join(p.canonical for p in index.fields)
                how = ", ".join(index.index.normalize) or "as is"
                lines.append(f"    index {index.index.name} <- {sources} ({how}, {index.index.bits} bits)")
            for criteria in request.criteria:
                present = _present(criteria.fields, record)
                sources = ", ".join(p.canonical for p in criteria.fields)
                if all(present):
                    lines.append(f"    search {sources} -> replaced by index {criteria.index.name}")
                elif any(present):
                    lines.append(f"    search {sources}: incomplete, refused (search_incomplete)")
    for query in route.query:
        lines.append(f"query: {', '.join(query.params)} -> replaced by index {query.index.name}")
    return lines


@policy.command()
@_POLICIES
@click.option(
    "--route", "route_text", required=True, metavar='"METHOD /path?query"', help="The request to preview."
)
@click.option("--response", is_flag=True, help="Preview the response rule instead of the request rule.")
@click.option("--status", type=int, default=200, show_default=True, help="Response status, with --response.")
@click.option(
    "--keyring",
    envvar="PHI_GATEWAY_KEYRING",
    type=click.Path(dir_okay=False),
    help="Also run the transform with this local keyring and print the result.",
)
@click.option(
    "--show-plaintext",
    is_flag=True,
    help="With --keyring and --response: print decrypted values themselves, not their types and "
    "lengths. A development aid for sample data under a local keyring; never use it on real PHI.",
)
@click.option(
    "--pepper",
    envvar="PHI_GATEWAY_PEPPER",
    type=click.Path(dir_okay=False),
    help="Pepper file for blind indexes, with --keyring.",
)
@click.option(
    "--header",
    "headers",
    multiple=True,
    metavar="NAME:VALUE",
    help="Request header, for context entries taken from headers.",
)
def preview(
    policy_paths: tuple[str, ...],
    route_text: str,
    response: bool,
    status: int,
    keyring: str | None,
    show_plaintext: bool,
    pepper: str | None,
    headers: tuple[str, ...],
) -> None:
    """Show what the policies would do to a sample JSON body read from stdin.

    Values are shown as types and lengths. With --keyring the transformed body is printed
    too: a request's fields as tokens, a response's decrypted fields again as types and
    lengths unless --show-plaintext is given.
    """  # fmt: skip
    if show_plaintext and not (keyring and response):
        fail("--show-plaintext only applies with --keyring and --response")
    method, _, target = route_text.strip().partition(" ")
    path, _, query = target.strip().partition("?")
    try:
        policies: PolicySet = load_policies(policy_paths)
    except PolicyError as exc:
        fail(f"policies do not load:\n{exc}")
    found = policies.match(method.upper(), path)
    if found is None:
        click.echo(f"no policy route matches {method.upper()} {path}: unmatched routes {policies.unmatched}")
        return
    raw = read_stdin()
    try:
        doc = loads_strict(raw) if raw.strip() else None
    except PHIGatewayError as exc:
        fail(str(exc))
    click.echo("\n".join(_describe(found.route, doc, response)))
    if keyring is None:
        return
    if response and not (found.route.response and found.route.response.applies_to(status)):
        click.echo(f"status {status}: the response rule does not apply")
        return
    scope = Scope(found.params, parse_headers(headers))

    async def go() -> str:
        cache = DataKeyCache(LocalKeyring.load(keyring))
        peppers = Pepper.load(pepper) if pepper else None
        out = []
        if query and not response:
            new_query, _ = rewrite_query(query, found.route.query, peppers)
            out.append(f"query sent upstream: {new_query}")
        if doc is not None:
            if response and found.route.response:
                await decrypt_response(
                    doc, found.route.response, scope, keys=cache, pepper=peppers, roles=None
                )
                if not show_plaintext:
                    _hide_decrypted(doc, found.route.response)
            elif found.route.request:
                await encrypt_request(doc, found.route.request, scope, keys=cache, pepper=peppers)
            out.append(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return "\n".join(out)

    click.echo(run(go))
