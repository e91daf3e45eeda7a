"""The Anthropic adapter: ``messages`` and ``beta.messages`` (create, parse, stream).

Anthropic's ``input_tokens`` does **not** include cache tokens, so the whole input is
``input_tokens + cache_creation_input_tokens + cache_read_input_tokens`` (the SDK's own
telemetry adds them the same way). In a stream, ``message_start`` carries the input and
cache counts and ``message_delta`` the cumulative output (and, when present, corrected
input) counts. Beta ``usage.iterations`` entries of type ``compaction`` are not in the
top-level usage and are added on top.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from .._usage import Usage
from ._base import (
    Endpoint,
    Observed,
    SSEEvent,
    bound_of,
    dig,
    field_of,
    gather_texts,
    int_at,
    loads_object,
    positive_int,
    trusted,
)

__all__ = ["AnthropicAdapter"]

MESSAGES: Final = Endpoint("messages")
_TYPE: Final = re.compile(r'"type"\s*:\s*"([^"]+)"')
_REFUSAL_BYTES: Final = re.compile(rb'"stop_reason"\s*:\s*"refusal"')
_DECODED: Final = frozenset({"message_start", "message_delta", "content_block_delta", "error"})
_COUNTS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


_ITERATION_COUNTS: Final = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")


def _usage(u: Any) -> Usage | None:
    """The usage the vendor reported, or ``None`` when it cannot be trusted (the call is then
    estimated): the input or output count missing, or any count not a non-negative int."""
    # on every call's path: direct field reads, the nested details only when present
    base, output = field_of(u, "input_tokens"), field_of(u, "output_tokens")
    written, read = field_of(u, "cache_creation_input_tokens"), field_of(u, "cache_read_input_tokens")
    written_1h = dig(u, "cache_creation", "ephemeral_1h_input_tokens")
    iterations = field_of(u, "iterations")
    if base is None or output is None or not trusted(base, output, written, read, written_1h):
        return None
    if iterations is not None and not isinstance(iterations, list):
        return None
    written, read, written_1h = written or 0, read or 0, (written_1h or 0) if written else 0
    details = field_of(u, "output_tokens_details")
    reasoning = int_at(details, "thinking_tokens") if details is not None else 0
    for item in iterations or ():
        if field_of(item, "type") == "compaction":
            counts = [field_of(item, name) for name in _ITERATION_COUNTS]
            item_1h = dig(item, "cache_creation", "ephemeral_1h_input_tokens")
            if not trusted(*counts, item_1h):
                return None
            base += counts[0] or 0
            written += counts[1] or 0
            read += counts[2] or 0
            output += counts[3] or 0
            written_1h += item_1h or 0
    return Usage(
        input_tokens=base + written + read,
        output_tokens=output,
        cache_read_tokens=read,
        cache_write_tokens=written,
        cache_write_1h_tokens=min(written_1h, written),
        reasoning_tokens=min(reasoning, output),
    )


def _context(u: Any) -> dict[str, str]:
    ctx: dict[str, str] = {}
    tier = field_of(u, "service_tier")
    if tier == "batch":
        ctx["processing"] = "batch"
    elif isinstance(tier, str) and tier and tier != "standard":
        ctx["service_tier"] = tier
    if field_of(u, "speed") == "fast":
        ctx["speed"] = "fast"
    return ctx


class AnthropicAdapter:
    """Translation rules for ``anthropic.Anthropic``."""

    vendor = "anthropic"

    def endpoint(self, method: str, url: str) -> Endpoint | None:
        """Only ``POST /v1/messages`` spends; ``count_tokens``, models, files ... pass through."""
        if method.lower() == "post" and url.rstrip("/") in ("/v1/messages", "/messages"):
            return MESSAGES
        return None

    def request_model(self, body: Mapping[str, Any]) -> str:
        """The ``model`` field."""
        model = body.get("model")
        return model if isinstance(model, str) else ""

    def input_texts(self, endpoint: Endpoint, body: Mapping[str, Any]) -> tuple[list[str], int]:
        """System prompt, messages and tool definitions."""
        texts = gather_texts(body.get("system"))
        messages = body.get("messages") or []
        gather_texts(messages, texts)
        gather_texts(body.get("tools"), texts)
        return texts, len(messages) if isinstance(messages, list) else 1

    def input_bound(self, endpoint: Endpoint, body: Mapping[str, Any]) -> int:
        """Bytes of the system prompt, messages and tools, plus framing and media allowances."""
        messages = body.get("messages") or []
        payload = [body.get("system"), messages, body.get("tools"), body.get("output_config")]
        return bound_of(payload, len(messages) if isinstance(messages, list) else 1)

    def output_bound(self, endpoint: Endpoint, body: Mapping[str, Any]) -> int | None:
        """``max_tokens`` (required by the API)."""
        return positive_int(body.get("max_tokens"))

    def may_refuse(self, body: bytes) -> bool:
        """A refusal is a ``stop_reason`` of ``"refusal"``: without those bytes the stream holds none."""
        return _REFUSAL_BYTES.search(body) is not None

    def from_json(self, endpoint: Endpoint, data: Any) -> Observed:
        """Usage of a non-streamed message (its JSON, or the SDK's parsed model)."""
        raw = field_of(data, "usage")
        model = field_of(data, "model")
        return Observed(
            usage=_usage(raw) if raw is not None else None,
            model=model if isinstance(model, str) else None,
            price_context=_context(raw) if raw is not None else {},
            finished=True,
            refused=field_of(data, "stop_reason") == "refusal",
        )

    def from_events(self, endpoint: Endpoint, events: Sequence[SSEEvent], *, want_text: bool) -> Observed:
        """Merge ``message_start`` and ``message_delta`` usage; collect the text deltas if wanted."""
        seen = Observed()
        merged: dict[str, Any] = {}
        for name, data in events:
            kind = name or _type_of(data)
            if kind == "message_stop":
                seen.finished = True
                continue
            if kind == "content_block_delta" and not want_text:
                continue
            if kind not in _DECODED:
                continue
            event = loads_object(data)
            if event is None:
                continue
            if kind == "message_start":
                message = event.get("message")
                if isinstance(message, dict):
                    if isinstance(message.get("model"), str):
                        seen.model = message["model"]
                    if isinstance(message.get("usage"), dict):
                        merged.update(message["usage"])
            elif kind == "message_delta":
                if dig(event, "delta", "stop_reason") == "refusal":
                    seen.refused = True
                usage = event.get("usage")
                if isinstance(usage, dict):
                    # cumulative counts; a null field means "unchanged"
                    merged.update({k: v for k, v in usage.items() if v is not None})
            elif kind == "content_block_delta":
                delta = event.get("delta")
                if isinstance(delta, dict):
                    for key in ("text", "thinking", "partial_json"):
                        if isinstance(delta.get(key), str):
                            seen.text_parts.append(delta[key])
            elif kind == "error":
                seen.error = str(dig(event, "error", "type") or "stream_error")
        if any(k in merged for k in _COUNTS):
            seen.usage = _usage(merged)
            seen.price_context = _context(merged)
        return seen


def _type_of(data: str) -> str | None:
    """The ``type`` of an event whose ``event:`` line was missing."""
    found = _TYPE.search(data)
    return found.group(1) if found else None
