"""Search rewriting: query parameters that name a protected field are replaced by their blind
indexes before the request leaves the gateway, so the plaintext never reaches the upstream.
(JSON search criteria are rewritten with the request body: ``indexing.index_record``.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode

from phi_gateway.blindindex import NormalizeError
from phi_gateway.exceptions import DocumentError
from phi_gateway.pepper import Pepper
from phi_gateway.rules import QueryRule


def _fold(name: str) -> str:
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def rewrite_query(query: str, rules: Sequence[QueryRule], pepper: Pepper | None) -> tuple[str, Counter[str]]:
    """Replace searched query parameters with their blind indexes; the plaintext never leaves.

    ``query`` is the raw (percent-encoded) query string. Returns the new one and the count
    of values searched, by index name. Each value becomes one index parameter per pepper
    version, current first (``ssn_bidx=2:..&ssn_bidx=1:..`` during an overlap), which the
    upstream must match as OR.
    """
    counts: Counter[str] = Counter()
    if not rules:
        return query, counts
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise DocumentError("query_invalid", "query string is not valid UTF-8 form encoding") from None
    # Upstream frameworks read "SSN", "ssn[]" or "ssn%00" as "ssn": such a spelling would
    # carry the plaintext past the rewrite, so it is refused.
    protected = {name for rule in rules for name in rule.params}
    folded = {_fold(name): name for name in protected}
    for name, _ in pairs:
        if name not in protected and _fold(name) in folded:
            raise DocumentError("query_ambiguous", f"query parameter spelled like {folded[_fold(name)]!r}")
    for rule in rules:
        present = [name for name in rule.params if any(k == name for k, _ in pairs)]
        if not present:
            continue
        if pepper is None:
            raise DocumentError("configuration", "blind indexes need a pepper")
        values = [[v for k, v in pairs if k == name] for name in rule.params]
        if len(rule.params) > 1 and any(len(v) != 1 for v in values):
            raise DocumentError(
                "search_incomplete",
                f"search by {rule.index.name} needs each of {', '.join(rule.params)} once",
            )
        versions = pepper.search_order()
        try:
            indexes = [
                rule.index.compute(pepper, list(combo), version)
                for combo in zip(*values, strict=True)
                for version in versions
            ]
        except NormalizeError as exc:
            raise DocumentError(
                "index_value_invalid", f"cannot index query {rule.params[0]!r}: {exc}"
            ) from None
        first = next(i for i, (k, _) in enumerate(pairs) if k in rule.params)
        pairs = [(k, v) for k, v in pairs if k not in rule.params]
        pairs[first:first] = [(rule.index.name, index) for index in indexes]
        counts[rule.index.name] += len(values[0])
    return urlencode(pairs), counts
