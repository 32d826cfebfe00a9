"""Policies: validated policy files compiled into routes, rules and indexes.

``load_policies(paths)`` reads every file, checks it against the schema and then against
the rules a schema cannot say (declared path parameters, JSONPath syntax, index
definitions, reveal paths, ambiguous routes), and returns a ``PolicySet`` (``rules.py``) or
raises ``PolicyError`` listing every problem as ``file:line: message``. Routes the schema
refuses are not compiled; the rest of their file is, so one run lists both kinds of
problem. Reference: docs/policy.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from phi_gateway.blindindex import BlindIndex
from phi_gateway.exceptions import PolicyError
from phi_gateway.jsonpath import InvalidPath, JsonPath, compile_path
from phi_gateway.policy_file import PolicyDocument, Problem, read_policy_file
from phi_gateway.rules import (
    PATH_PARAM,
    ContextEntry,
    ContextSpec,
    FieldIndex,
    KmsUse,
    PathTemplate,
    PolicySet,
    QueryRule,
    RequestRule,
    ResponseRule,
    Reveal,
    Route,
    Source,
)


class _Compiler:
    """Turns one checked document into routes, collecting every problem instead of stopping."""

    def __init__(self, doc: PolicyDocument) -> None:
        self.doc = doc
        self.problems: list[Problem] = []
        data = doc.data
        self.name: str = data["name"]
        self.per_policy = data.get("data_key", "per_record") == "per_policy"
        self.indexes: dict[str, BlindIndex] = {}
        self.claims: list[_Claim] = []  # every route's (methods, template), broken ones too
        self.index_lines: dict[str, tuple[str | int, ...]] = {}
        # Routes the schema refused are left out; an index they define is then unknown here,
        # which is not worth a second, misleading problem.
        self.refused_routes = {loc[1] for loc in doc.refused if len(loc) > 1 and loc[0] == "routes"}

    def fail(self, location: Iterable[str | int], message: str) -> None:
        self.problems.append(self.doc.problem(location, message))

    def path(self, text: str, location: tuple[str | int, ...], *, field: bool = False) -> JsonPath | None:
        try:
            compiled = compile_path(text)
        except InvalidPath as exc:
            self.fail(location, str(exc))
            return None
        if field and compiled.canonical == "$":
            self.fail(location, "a field path must select something inside the record, not the record itself")
            return None
        return compiled

    def compile(self) -> list[Route]:
        routes = [(r, raw) for r, raw in enumerate(self.doc.data["routes"]) if r not in self.refused_routes]
        # Index definitions first: query and criteria entries of any route may refer to them.
        for r, raw in routes:
            for i, entry in enumerate(raw.get("request", {}).get("blind_index", [])):
                self.define_index(entry, ("routes", r, "request", "blind_index", i))
        return [route for r, raw in routes if (route := self.route(raw, ("routes", r)))]

    def define_index(self, entry: Mapping[str, Any], location: tuple[str | int, ...]) -> None:
        normalize = entry.get("normalize", [])
        index = BlindIndex(
            policy=self.name,
            name=entry["into"],
            normalize=tuple([normalize] if isinstance(normalize, str) else normalize),
            bits=entry["bits"],
            arity=len(entry.get("fields", [entry.get("field")])),
        )
        known = self.indexes.get(index.name)
        if known is None:
            self.indexes[index.name] = index
            self.index_lines[index.name] = location
        elif known != index:
            first = self.doc.line(self.index_lines[index.name])
            self.fail(location, f"index {index.name!r} is defined differently at line {first}")

    def index(self, name: str, location: tuple[str | int, ...], arity: int) -> BlindIndex | None:
        index = self.indexes.get(name)
        if index is None:
            if not self.refused_routes:
                self.fail(location, f"no blind_index of this policy is written into {name!r}")
        elif index.arity != arity:
            self.fail(location, f"index {name!r} takes {index.arity} value(s), {arity} given")
            return None
        return index

    def route(self, raw: Mapping[str, Any], loc: tuple[str | int, ...]) -> Route | None:
        before = len(self.problems)
        match = raw["match"]
        try:
            template = PathTemplate.compile(match["path"])
        except ValueError as exc:
            self.fail((*loc, "match", "path"), str(exc))
            return None
        self.claims.append(_Claim(frozenset(match["methods"]), template, self.doc.file, self.doc.line(loc)))
        request = self.request(raw["request"], template, (*loc, "request")) if "request" in raw else None
        response = (
            self.response(raw["response"], template, match, (*loc, "response")) if "response" in raw else None
        )
        if "status" in match and "response" not in raw:
            self.fail((*loc, "match", "status"), "status only applies to a response section")
        query = tuple(
            rule
            for q, entry in enumerate(raw.get("query", []))
            if (rule := self.query(entry, (*loc, "query", q))) is not None
        )
        if len(self.problems) > before:
            return None
        return Route(
            policy=self.name,
            key=self.doc.data.get("key"),
            require_principal=self.doc.data.get("require_principal", True),
            methods=frozenset(match["methods"]),
            template=template,
            request=request,
            query=query,
            response=response,
            file=self.doc.file,
            line=self.doc.line(loc),
            context_headers=frozenset(
                e.value
                for spec in (request and request.context, response and response.context)
                if spec
                for e in spec.entries
                if e.source == "header"
            ),
        )

    def context(
        self, raw: Mapping[str, Any], template: PathTemplate, loc: tuple[str | int, ...]
    ) -> ContextSpec:
        entries = []
        for name, value in raw.items():
            where = (*loc, name)
            spec: dict[str, Any] = {"literal": value} if isinstance(value, str) else dict(value)
            if isinstance(value, str):
                if PATH_PARAM.fullmatch(value):
                    spec = {"param": value[1:-1]}
                elif value.startswith("$"):
                    spec = {"path": value}
                elif "{" in value or "}" in value:
                    self.fail(
                        where,
                        "looks like a mistyped {param}; write {literal: ...} for a constant with braces",
                    )
            explicit_kms = spec.pop("kms", None)
            ((source, text),) = spec.items()
            # Record values (patient ids) reach KMS, and so CloudTrail, only as pseudonyms
            # unless the policy says otherwise; constants go as they are.
            kms: KmsUse = explicit_kms or ("plain" if source == "literal" else "pseudonymize")
            path = None
            if source == "param" and text not in template.params:
                self.fail(where, f"path parameter {{{text}}} is not declared by {template.text!r}")
            elif source == "path":
                path = self.path(text, where, field=True)
            elif source == "header":
                text = text.lower()
            if self.per_policy and source != "literal" and explicit_kms in ("plain", "pseudonymize"):
                self.fail(where, "with data_key: per_policy only literal entries reach KMS; drop 'kms'")
            entries.append(ContextEntry(name, cast(Source, source), text, kms, path))
        return ContextSpec(self.name, tuple(entries), self.per_policy)

    def field_index(
        self, entry: Mapping[str, Any], name: str, loc: tuple[str | int, ...]
    ) -> FieldIndex | None:
        texts = entry.get("fields") or [entry["field"]]
        key = "fields" if "fields" in entry else "field"
        paths = [self.path(t, (*loc, key), field=True) for t in texts]
        index = self.index(name, loc, len(texts))
        if index is None or any(p is None for p in paths):
            return None
        return FieldIndex(index, tuple(p for p in paths if p is not None))

    def request(
        self, raw: Mapping[str, Any], template: PathTemplate, loc: tuple[str | int, ...]
    ) -> RequestRule:
        records = self.path(raw.get("records", "$"), (*loc, "records"))
        encrypt = [path for _, path in self.field_paths(enumerate(raw.get("encrypt", [])), (*loc, "encrypt"))]
        indexes = []
        written: set[str] = set()
        for i, entry in enumerate(raw.get("blind_index", [])):
            where = (*loc, "blind_index", i)
            into = entry["into"]
            self.not_encrypted(into, encrypt, (*where, "into"))
            if into in written:
                self.fail((*where, "into"), f"another blind_index of this request already writes {into!r}")
            written.add(into)
            indexes.append(self.field_index(entry, into, where))
        criteria = []
        for i, entry in enumerate(raw.get("criteria", [])):
            self.not_encrypted(entry["blind_index"], encrypt, (*loc, "criteria", i, "blind_index"))
            criteria.append(self.field_index(entry, entry["blind_index"], (*loc, "criteria", i)))
        rule = RequestRule(
            records=records or compile_path("$"),
            context=self.context(raw["context"], template, (*loc, "context")) if "context" in raw else None,
            encrypt=tuple(encrypt),
            blind_indexes=tuple(i for i in indexes if i is not None),
            criteria=tuple(c for c in criteria if c is not None),
        )
        return dataclasses.replace(rule, protected=_protected_names(rule))

    def response(
        self,
        raw: Mapping[str, Any],
        template: PathTemplate,
        match: Mapping[str, Any],
        loc: tuple[str | int, ...],
    ) -> ResponseRule:
        records = self.path(raw.get("records", "$"), (*loc, "records"))
        decrypt = [path for _, path in self.field_paths(enumerate(raw["decrypt"]), (*loc, "decrypt"))]
        decrypted = {p.canonical for p in decrypt}
        reveal = {}
        reveals = raw.get("reveal", {})
        for text, path in self.field_paths(((text, text) for text in reveals), (*loc, "reveal")):
            if path.canonical not in decrypted:
                self.fail((*loc, "reveal", text), "reveal names a field that decrypt does not list")
            else:
                rule = reveals[text]
                reveal[path.canonical] = Reveal(frozenset(rule["roles"]), rule.get("otherwise", "mask"))
        status = match.get("status")
        return ResponseRule(
            records=records or compile_path("$"),
            context=self.context(raw["context"], template, (*loc, "context")),
            decrypt=tuple(decrypt),
            reveal=reveal,
            on_error=raw.get("on_error", "fail"),
            status=frozenset(status) if status else None,
            on_plaintext=raw.get("on_plaintext", "pass"),
        )

    def query(self, raw: Mapping[str, Any], loc: tuple[str | int, ...]) -> QueryRule | None:
        params = tuple(raw.get("params") or [raw["param"]])
        index = self.index(raw["blind_index"], (*loc, "blind_index"), len(params))
        if index is None:
            return None
        normalize = raw.get("normalize")
        if normalize is not None:
            given = tuple([normalize] if isinstance(normalize, str) else normalize)
            if given != index.normalize:
                self.fail(
                    (*loc, "normalize"),
                    f"differs from index {index.name!r}'s normalize {list(index.normalize)}",
                )
        return QueryRule(params, index)

    def field_paths(
        self, entries: Iterable[tuple[str | int, str]], loc: tuple[str | int, ...]
    ) -> list[tuple[str | int, JsonPath]]:
        """Compile the field paths of a list (keyed by index) or mapping (keyed by the path
        text), refusing a second spelling of a field (``$.ssn`` and ``$['ssn']``): with two
        rules for one field, which one applies would depend on their order."""
        found: list[tuple[str | int, JsonPath]] = []
        seen: set[str] = set()
        for key, text in entries:
            path = self.path(text, (*loc, key), field=True)
            if path is None:
                continue
            if path.canonical in seen:
                self.fail((*loc, key), f"{path.source!r} selects the same field as an earlier entry")
                continue
            seen.add(path.canonical)
            found.append((key, path))
        return found

    def not_encrypted(self, name: str, encrypt: Sequence[JsonPath], location: tuple[str | int, ...]) -> None:
        """An index is written into the record member ``name`` before the record is encrypted:
        no encrypt path may select that member, however spelled (``$.*``, ``$..name``), or the
        index would be sealed into a token. Each path is tried on records holding only the
        index, as a string and (criteria during a pepper overlap) as a list."""
        for path in encrypt:
            if any(path.locate(probe) for probe in ({name: "0"}, {name: ["0"]})):
                self.fail(
                    location, f"{name!r} is also encrypted (by {path.source!r}): an index needs its own field"
                )
                return


# A path's last member name, before any trailing [*], [n] or .* steps.
_LAST_MEMBER = re.compile(
    r"""(?:\.([A-Za-z_][A-Za-z0-9_-]*)|\['((?:[^'\\]|\\.)*)'\])(?:\[(?:\*|-?[0-9]+)\]|\.\*)*$"""
)


def _protected_names(rule: RequestRule) -> frozenset[str]:
    """The names a request rule protects: each path's last member, and the index names (a
    client must not pass ``SSN`` or ``SSN_BIDX`` to an upstream that ignores case)."""
    indexes = (*rule.blind_indexes, *rule.criteria)
    names = {index.index.name for index in indexes}
    for path in (*rule.encrypt, *(path for index in indexes for path in index.fields)):
        found = _LAST_MEMBER.search(path.canonical)
        if found:
            names.add(found.group(1) or found.group(2))
    return frozenset(names)


def policy_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files ``load_policies`` reads: files as given, and a directory's policy files."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(
                p
                for p in path.iterdir()
                if p.suffix in (".yaml", ".yml", ".json") and p.name != "schema.json"
            )
        else:
            files.append(path)
    return files


@dataclass(frozen=True, slots=True)
class _Claim:
    methods: frozenset[str]
    template: PathTemplate
    file: str
    line: int

    def __str__(self) -> str:
        return f"{'|'.join(sorted(self.methods))} {self.template.text} ({self.file}:{self.line})"


def _folded(shape: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """A template's shape as matching sees it: literal segments match whatever their case."""
    return tuple(segment and segment.casefold() for segment in shape)


def _ambiguities(claims: Sequence[_Claim]) -> list[Problem]:
    """Two routes whose templates have the same shape and share a method match the same requests."""
    problems = []
    for i, a in enumerate(claims):
        for b in claims[i + 1 :]:
            if _folded(a.template.shape) == _folded(b.template.shape) and a.methods & b.methods:
                problems.append(Problem(b.file, b.line, f"route {b} matches the same requests as {a}"))
    return problems


# What the compiler reads outside routes: a schema problem there stops the file's compilation.
_FILE_KEYS = frozenset({"version", "name", "key", "data_key", "unmatched", "require_principal", "routes"})


def _compilable(doc: PolicyDocument) -> bool:
    """Whether every schema problem of ``doc`` is inside one route (that route is left out)
    or an unknown top-level key, so the rest can be compiled for its own problems."""
    return all(
        (len(loc) > 1 and loc[0] == "routes") or (len(loc) == 1 and loc[0] not in _FILE_KEYS)
        for loc in doc.refused
    )


def load_policies(paths: Iterable[str | Path]) -> PolicySet:
    """Read, check and compile policy files (directories: every .yaml/.yml/.json inside)."""
    problems: list[Problem] = []
    routes: list[Route] = []
    claims: list[_Claim] = []
    names: dict[str, str] = {}
    unmatched: dict[str, str] = {}
    unmatched_at: list[Problem] = []
    files = policy_files(paths)
    if not files:
        raise PolicyError([Problem("<policies>", 1, "no policy files found")])
    for file in files:
        doc, found = read_policy_file(file)
        problems += found
        if doc is None or not _compilable(doc):
            continue
        compiler = _Compiler(doc)
        compiled = compiler.compile()
        problems += compiler.problems
        claims += compiler.claims
        name = doc.data["name"]
        if name in names:
            problems.append(doc.problem(("name",), f"policy name {name!r} is already used by {names[name]}"))
        names[name] = doc.file
        if "unmatched" in doc.data:
            unmatched[doc.file] = doc.data["unmatched"]
            unmatched_at.append(doc.problem(("unmatched",), ""))
        routes += compiled
    if len(set(unmatched.values())) > 1:
        said = ", ".join(f"{file} says {value}" for file, value in unmatched.items())
        problems += [Problem(at.file, at.line, f"unmatched: files disagree ({said})") for at in unmatched_at]
    problems += _ambiguities(claims)
    if problems:
        problems.sort(key=lambda p: (p.file, p.line))
        raise PolicyError(problems)
    routes.sort(key=lambda r: r.template.precedence)
    return PolicySet(tuple(routes), next(iter(unmatched.values()), "pass"), tuple(sorted(names)))  # type: ignore[arg-type]
