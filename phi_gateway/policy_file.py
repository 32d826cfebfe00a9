"""Reading policy files: YAML or JSON text to plain data, every node's line remembered,
then checked against ``policies/schema.json``. Errors are ``file:line: message``."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

Location = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a policy file."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(slots=True)
class PolicyDocument:
    """A policy file's data and the line of every node in it."""

    file: str
    data: Any
    lines: dict[Location, int] = field(default_factory=dict)
    refused: list[Location] = field(default_factory=list)  # where the schema found a problem

    def line(self, location: Iterable[str | int]) -> int:
        """The line of ``location``, or of its nearest ancestor that has one."""
        loc = tuple(location)
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc, 1)

    def problem(self, location: Iterable[str | int], message: str) -> Problem:
        loc = tuple(location)
        where = _describe(loc)
        return Problem(self.file, self.line(loc), f"{where}: {message}" if where else message)


def _describe(location: Location) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")


def read_policy_file(path: str | Path) -> tuple[PolicyDocument | None, list[Problem]]:
    """Parse one file. Returns the document (None if unreadable) and its problems."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        return None, [Problem(name, 1, f"cannot read policy file: {reason}")]
    return parse_policy_text(text, name)


def parse_policy_text(text: str, name: str) -> tuple[PolicyDocument | None, list[Problem]]:
    if name.endswith(".json"):
        # JSON is read through the YAML parser for its line numbers, but checked as strict
        # JSON first (YAML would take trailing commas); JSON allows tabs where YAML does not.
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return None, [Problem(name, exc.lineno, f"not valid JSON: {exc.msg}")]
        except RecursionError:
            return None, [Problem(name, 1, f"nested deeper than {_MAX_DEPTH} levels")]
        text = text.replace("\t", " ")  # a raw tab can only be whitespace in valid JSON
    document = PolicyDocument(name, None)
    problems: list[Problem] = []
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return None, [Problem(name, 1, "policy file is empty")]
        document.data = _build(loader, node, (), document, problems, [_MAX_NODES])
    except _TooLarge as exc:
        return None, [Problem(name, exc.line, str(exc))]
    except RecursionError:  # the YAML composer and json.loads recurse on nesting
        return None, [Problem(name, 1, f"nested deeper than {_MAX_DEPTH} levels")]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        return None, [Problem(name, line, f"not valid YAML/JSON: {exc.problem or exc.context}")]
    except yaml.YAMLError as exc:
        return None, [Problem(name, 1, f"not valid YAML/JSON: {type(exc).__name__}")]
    finally:
        if loader is not None:
            loader.dispose()
    if problems:
        return None, problems
    return document, _schema_problems(document)


# Far beyond any real policy; YAML aliases can make a small file expand without end (an
# alias inside itself) or exponentially ("billion laughs"), so the expansion is bounded.
_MAX_DEPTH = 64
_MAX_NODES = 100_000


class _TooLarge(Exception):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def _build(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    location: Location,
    doc: PolicyDocument,
    problems: list[Problem],
    budget: list[int],
) -> Any:
    line = node.start_mark.line + 1
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge(f"more than {_MAX_NODES} values (aliases expanding?)", line)
    if len(location) > _MAX_DEPTH:
        raise _TooLarge(f"nested deeper than {_MAX_DEPTH} levels (an alias inside itself?)", line)
    doc.lines.setdefault(location, line)  # a member's line is its key's
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                problems.append(
                    Problem(doc.file, key_node.start_mark.line + 1, f"key {key!r} is not a string")
                )
                continue
            if key in out:  # YAML and JSON parsers keep the last one silently; a policy must not
                where = _describe((*location, key))
                problems.append(Problem(doc.file, key_node.start_mark.line + 1, f"{where}: duplicate key"))
                continue
            doc.lines[(*location, key)] = key_node.start_mark.line + 1
            out[key] = _build(loader, value_node, (*location, key), doc, problems, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(loader, item, (*location, i), doc, problems, budget) for i, item in enumerate(node.value)
        ]
    return loader.construct_object(node, deep=True)


@functools.cache
def policy_schema() -> dict[str, Any]:
    """The published JSON Schema (``policies/schema.json``), shipped inside the package too."""
    text = resources.files("phi_gateway").joinpath("policy_schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(policy_schema())
    return cls(policy_schema())


def _schema_problems(document: PolicyDocument) -> list[Problem]:
    problems = []
    for error in sorted(
        _validator().iter_errors(document.data), key=lambda e: list(map(str, e.absolute_path))
    ):
        for location, message in _explain(error):
            document.refused.append(location)
            problems.append(document.problem(location, message))
    return problems


def _explain(error: jsonschema.ValidationError) -> list[tuple[Location, str]]:
    location = tuple(error.absolute_path)
    schema: Any = error.schema
    rule: Any = error.validator_value
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(schema.get("properties", {}))
        return [
            ((*location, key), f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
            for key in error.instance
            if key not in allowed
        ]
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        exclusive = [next(iter(b["required"])) for b in rule if "required" in b]
        present = [key for key in exclusive if key in error.instance]
        if exclusive and len(present) != 1:
            return [(location, f"give exactly one of: {', '.join(exclusive)}")]
    if error.context:  # oneOf/anyOf: explain the branch that got furthest
        # A branch of the wrong type says least about what the author meant.
        typed = [e for e in error.context if e.validator != "type"] or error.context
        best = jsonschema.exceptions.best_match(typed)
        if best is not None:
            return _explain(best)
    return [(location, error.message)]
