"""The compiled form of policies: routes with their request, query and response rules, the
encryption-context specs, and ``PolicySet.match``. Built by ``policy.load_policies``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from phi_gateway.blindindex import BlindIndex
from phi_gateway.jsonpath import JsonPath

POLICY_CONTEXT_KEY = "phi:policy"  # reserved: context names in files cannot contain ':'
Source = Literal["literal", "param", "path", "header"]
KmsUse = Literal["plain", "pseudonymize", "omit"]
PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class ContextEntry:
    name: str
    source: Source
    value: str  # the literal, parameter name, header name (lower case) or path text
    kms: KmsUse = "plain"
    path: JsonPath | None = None


@dataclass(frozen=True, slots=True)
class ContextSpec:
    """How each record's encryption context is built, and which part KMS sees."""

    policy: str
    entries: tuple[ContextEntry, ...]
    per_policy_key: bool

    @property
    def kms_entries(self) -> tuple[ContextEntry, ...]:
        if self.per_policy_key:  # one data key for the policy: only constants may reach KMS
            return tuple(e for e in self.entries if e.source == "literal" and e.kms != "omit")
        return tuple(e for e in self.entries if e.kms != "omit")


@dataclass(frozen=True, slots=True)
class FieldIndex:
    """A blind index written into the record (request) from one or more fields."""

    index: BlindIndex
    fields: tuple[JsonPath, ...]


@dataclass(frozen=True, slots=True)
class RequestRule:
    records: JsonPath
    context: ContextSpec | None  # required by the schema when anything is encrypted
    encrypt: tuple[JsonPath, ...]
    blind_indexes: tuple[FieldIndex, ...]
    criteria: tuple[FieldIndex, ...]  # fields replaced by their index (search bodies)
    # Member names no request key may spell in another case (see jsonvalue.loads_strict), and
    # that a body whose records select nothing must not hold (transform: records_missing).
    protected: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class QueryRule:
    params: tuple[str, ...]
    index: BlindIndex


@dataclass(frozen=True, slots=True)
class Reveal:
    roles: frozenset[str]
    otherwise: Literal["mask_last4", "mask", "remove", "token"]


@dataclass(frozen=True, slots=True)
class ResponseRule:
    records: JsonPath
    context: ContextSpec
    decrypt: tuple[JsonPath, ...]
    reveal: Mapping[str, Reveal]  # by canonical field path
    on_error: Literal["fail", "redact"]
    status: frozenset[int] | None  # None: every 2xx
    on_plaintext: Literal["pass", "redact", "fail"] = "pass"  # non-token values at decrypt paths

    def applies_to(self, status: int) -> bool:
        return status in self.status if self.status is not None else 200 <= status < 300


@dataclass(frozen=True, slots=True)
class PathTemplate:
    text: str
    pattern: re.Pattern[str]
    params: tuple[str, ...]
    shape: tuple[str | None, ...]  # literal segments, None for parameters

    @classmethod
    def compile(cls, text: str) -> PathTemplate:
        segments = text.strip("/").split("/") if text.strip("/") else []
        regex, params, shape = "", [], []  # type: str, list[str], list[str | None]
        for segment in segments:
            param = PATH_PARAM.fullmatch(segment)
            if param:
                if param.group(1) in params:
                    raise ValueError(f"path parameter {{{param.group(1)}}} appears twice")
                params.append(param.group(1))
                shape.append(None)
                regex += f"/(?P<{param.group(1)}>[^/]+)"
            elif segment.startswith("{") and segment.endswith("}"):
                raise ValueError(f"segment {segment!r}: parameter names are letters, digits and '_'")
            elif "{" in segment or "}" in segment:
                raise ValueError(f"segment {segment!r}: a parameter must be a whole segment, like {{name}}")
            else:
                shape.append(segment)
                regex += "/" + re.escape(segment)
        # Literal segments match whatever their case: an upstream that ignores case must not
        # be reachable around the policy by spelling a path differently.
        pattern = re.compile(regex + "/?" if regex else "/", re.IGNORECASE)
        return cls(text, pattern, tuple(params), tuple(shape))

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.fullmatch(path)
        return found.groupdict() if found else None

    @property
    def precedence(self) -> tuple[int, ...]:
        """Literal segments win over parameters, left to right."""
        return tuple(1 if s is None else 0 for s in self.shape)


@dataclass(frozen=True, slots=True)
class Route:
    policy: str
    key: str | None
    require_principal: bool
    methods: frozenset[str]
    template: PathTemplate
    request: RequestRule | None
    query: tuple[QueryRule, ...]
    response: ResponseRule | None
    file: str
    line: int
    # The headers its encryption contexts read (lower case): each must appear once.
    context_headers: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return f"{'|'.join(sorted(self.methods))} {self.template.text} ({self.file}:{self.line})"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    params: dict[str, str]


@dataclass(frozen=True)
class PolicySet:
    """Every loaded policy's routes, most specific first."""

    routes: tuple[Route, ...]
    unmatched: Literal["pass", "deny"] = "pass"
    names: tuple[str, ...] = field(default=())

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The route for this request; HEAD is served by the GET route when none names HEAD."""
        method = method.upper()
        found = self._match(method, path)
        if found is None and method == "HEAD":
            found = self._match("GET", path)
        return found

    def claims(self, path: str) -> bool:
        """Whether some route names this path, for any method."""
        return any(route.template.match(path) is not None for route in self.routes)

    def _match(self, method: str, path: str) -> RouteMatch | None:
        for route in self.routes:
            if method in route.methods:
                params = route.template.match(path)
                if params is not None:
                    return RouteMatch(route, params)
        return None
