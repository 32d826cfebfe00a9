"""Who sees which decrypted field: the policy's ``reveal`` rules applied to the caller's
roles. A field the caller may not see in full is never decrypted unless its mask needs
the plaintext (``mask_last4``); ``mask`` and ``remove`` never touch the key service, and
``token`` leaves the ciphertext as it is."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from phi_gateway.jsonpath import JsonPath
from phi_gateway.rules import ResponseRule

Action = Literal["decrypt", "mask_last4", "mask", "remove", "token"]
MASK = "****"


def plan(rule: ResponseRule, roles: frozenset[str] | None) -> dict[str, Action]:
    """What to do with each decrypt path. ``roles=None`` reveals everything (break-glass,
    or a library caller with no notion of identity)."""
    actions: dict[str, Action] = {}
    for path in rule.decrypt:
        reveal = rule.reveal.get(path.canonical)
        if reveal is None or roles is None or reveal.roles & roles:
            actions[path.canonical] = "decrypt"
        else:
            actions[path.canonical] = reveal.otherwise
    return actions


# When two decrypt paths select one place, the more restrictive action wins.
_STRICTNESS: dict[Action, int] = {"decrypt": 0, "mask_last4": 1, "token": 2, "mask": 3, "remove": 4}


def per_place(
    rule: ResponseRule,
    actions: Mapping[str, Action],
    record: Any,
    places: Callable[[JsonPath, Any], list[tuple[Any, Any]]],
) -> list[tuple[Any, Any, str, Action]]:
    """Every place the rule's decrypt paths select in ``record``, once, with its action."""
    chosen: dict[tuple[int, Any], tuple[Any, Any, str, Action]] = {}
    for path in rule.decrypt:
        action = actions[path.canonical]
        for parent, key in places(path, record):
            slot = (id(parent), key)
            known = chosen.get(slot)
            if known is None or _STRICTNESS[action] > _STRICTNESS[known[3]]:
                chosen[slot] = (parent, key, path.canonical, action)
    return list(chosen.values())


def mask_last4(value: Any) -> str:
    """All but the last four characters of a string replaced; anything else fully masked."""
    if isinstance(value, str) and len(value) > 4:
        return "*" * (len(value) - 4) + value[-4:]
    return MASK


def remove_all(places: Iterable[tuple[Any, Any]]) -> None:
    """Drop members from objects and elements from arrays (from the end, so indices hold)."""
    for parent, key in sorted(
        places, key=lambda place: place[1] if isinstance(place[1], int) else -1, reverse=True
    ):
        del parent[key]
