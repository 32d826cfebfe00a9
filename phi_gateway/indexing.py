"""Blind indexes inside request records: the indexes written beside the fields they index,
and JSON search criteria replaced by theirs. (Query strings: ``search.rewrite_query``.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from phi_gateway.blindindex import NormalizeError
from phi_gateway.exceptions import DocumentError
from phi_gateway.pepper import Pepper
from phi_gateway.rules import FieldIndex, RequestRule

_ABSENT = object()


def index_record(record: dict[str, Any], rule: RequestRule, pepper: Pepper, counts: Counter[str]) -> None:
    """Write ``rule``'s blind indexes into ``record`` and replace its search criteria by
    their indexes, in place; ``counts`` gets one per index written, by index name."""
    versions = pepper.search_order()
    for written in rule.blind_indexes:
        values = _values(written, record)
        record.pop(written.index.name, None)  # a client cannot supply its own index
        if not any(v is _ABSENT or v is None for v in values):
            record[written.index.name] = _compute(written, values, pepper, versions[:1])[0]  # current only
            counts[written.index.name] += 1
    for criteria in rule.criteria:
        values = _values(criteria, record)
        if all(v is _ABSENT for v in values):
            continue  # not searched by this index
        if any(v is _ABSENT or v is None for v in values):
            # Forwarded without this criterion, the search would widen to every record.
            fields = ", ".join(path.source for path in criteria.fields)
            raise DocumentError(
                "search_incomplete", f"search by {criteria.index.name} needs a value for each of {fields}"
            )
        searched = _compute(criteria, values, pepper, versions)
        for path in criteria.fields:
            places: list[tuple[Any, Any]] = path.locate(record)
            for parent, key in reversed(places):
                del parent[key]
        # During a pepper overlap stored records carry either version's index: the upstream
        # gets a list (current first) to match as OR; otherwise one string.
        record[criteria.index.name] = searched if len(searched) > 1 else searched[0]
        counts[criteria.index.name] += 1


def _values(rule: FieldIndex, record: dict[str, Any]) -> list[Any]:
    """The value of each of the index's fields in ``record``, ``_ABSENT`` where there is none."""
    values = []
    for path in rule.fields:
        found = path.find(record)
        if len(found) > 1:
            raise DocumentError(
                "index_field_ambiguous", f"{path.source} selects more than one value to index"
            )
        values.append(found[0] if found else _ABSENT)
    return values


def _compute(rule: FieldIndex, values: list[Any], pepper: Pepper, versions: Sequence[int]) -> list[str]:
    """The index of ``values`` under each of ``versions``."""
    try:
        return [rule.index.compute(pepper, values, version) for version in versions]
    except NormalizeError as exc:
        raise DocumentError("index_value_invalid", f"cannot index {rule.fields[0].source}: {exc}") from None
