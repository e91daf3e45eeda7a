"""Canonical JSON text of a request or a part of one, for the cache key and the loop detector's
fingerprints: dict keys sorted, compact, the same text for the same meaning."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(value: Any) -> str:
    """``value`` as compact JSON with its dict keys sorted; anything JSON cannot hold as text
    (``default=str``). A dict whose keys mix types (``{1: 0, "2": 0}``: JSON, and the SDK, send
    both as strings) is keyed by those strings: sorting the mix would raise ``TypeError`` in
    the caller's call."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    except TypeError:
        return json.dumps(_string_keys(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _json_key(key: Any) -> str:
    """A dict key as ``json.dumps`` writes it."""
    if isinstance(key, str):
        return key
    if key is True or key is False or key is None or isinstance(key, int | float):
        return json.dumps(key)
    return str(key)


def _string_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {_json_key(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_string_keys(v) for v in value]
    return value
