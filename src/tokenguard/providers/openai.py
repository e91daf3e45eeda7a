"""The OpenAI adapter (also Azure OpenAI): chat completions, Responses, embeddings, legacy completions.

Usage fields (``openai/types/completion_usage.py``, ``responses/response_usage.py``):
``cached_tokens`` and ``cache_write_tokens`` are parts of the prompt / input count;
``reasoning_tokens`` is part of the completion / output count — the same meaning as
tokenguard's ``Usage``, so they map one to one. A chat stream reports usage only when
the caller asked for ``stream_options.include_usage``; tokenguard never adds it.
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
    loads_object,
    positive_int,
    trusted,
)

__all__ = ["OpenAIAdapter"]

CHAT: Final = Endpoint("chat.completions")
RESPONSES: Final = Endpoint("responses")
EMBEDDINGS: Final = Endpoint("embeddings")
COMPLETIONS: Final = Endpoint("completions")
_BY_URL: Final = {
    "/chat/completions": CHAT,
    "/responses": RESPONSES,
    "/embeddings": EMBEDDINGS,
    "/completions": COMPLETIONS,
}
_HAS_USAGE: Final = re.compile(r'"usage"\s*:\s*\{')
_TYPE: Final = re.compile(r'"type"\s*:\s*"([^"]+)"')
# what a refusal anywhere in a stream looks like: a non-null refusal text, a content filter, a
# Responses refusal event
_REFUSAL_BYTES: Final = re.compile(rb'"refusal"\s*:\s*"|content_filter|response\.refusal\.')
_TEXT_EVENTS: Final = frozenset(
    {
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.refusal.delta",
        "response.reasoning_summary_text.delta",
    }
)
_TERMINAL_RESPONSE_EVENTS: Final = {
    "response.completed": None,
    "response.incomplete": None,
    "response.failed": "response.failed",
}


def _usage(u: Any, inp: str, out: str, inp_details: str, out_details: str, *, output: bool = True) -> Usage | None:
    """The usage the vendor reported, or ``None`` when it cannot be trusted (the call is then
    estimated): the input count (or, unless ``output=False``, the output count) missing; a
    count that is not a non-negative int; cached parts larger than the input."""
    # on every call's path: direct field reads, no generic walking
    details_in = field_of(u, inp_details)
    details_out = field_of(u, out_details)
    inputs, outputs = field_of(u, inp), field_of(u, out)
    read, written = field_of(details_in, "cached_tokens"), field_of(details_in, "cache_write_tokens")
    reasoning = field_of(details_out, "reasoning_tokens")
    if inputs is None or (outputs is None and output) or not trusted(inputs, outputs, read, written, reasoning):
        return None
    outputs, read, written, reasoning = outputs or 0, read or 0, written or 0, reasoning or 0
    if read + written > inputs or reasoning > outputs:
        return None
    return Usage(inputs, outputs, read, written, 0, reasoning)


def _chat_usage(u: Any, *, output: bool = True) -> Usage | None:
    return _usage(
        u, "prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details", output=output
    )


def _responses_usage(u: Any) -> Usage | None:
    return _usage(u, "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")


def _refused(endpoint: Endpoint, data: Any) -> bool:
    """Whether the answer is a refusal or was cut by a content filter (never cached)."""
    if endpoint is RESPONSES:
        for item in field_of(data, "output") or ():
            for part in field_of(item, "content") or ():
                if field_of(part, "type") == "refusal":
                    return True
        return False
    for choice in field_of(data, "choices") or ():
        if field_of(choice, "finish_reason") == "content_filter" or field_of(field_of(choice, "message"), "refusal"):
            return True
    return False


def _tier(data: Any) -> dict[str, str]:
    tier = dig(data, "service_tier")
    return {"service_tier": tier} if isinstance(tier, str) and tier else {}


class OpenAIAdapter:
    """Translation rules for ``openai.OpenAI`` and its Azure variant (``vendor="azure"``)."""

    def __init__(self, vendor: str = "openai") -> None:
        self.vendor = vendor

    def endpoint(self, method: str, url: str) -> Endpoint | None:
        """Money paths are the four POST endpoints; everything else passes through."""
        if method.lower() != "post":
            return None
        return _BY_URL.get(url)

    def request_model(self, body: Mapping[str, Any]) -> str:
        """The ``model`` field."""
        model = body.get("model")
        return model if isinstance(model, str) else ""

    def input_texts(self, endpoint: Endpoint, body: Mapping[str, Any]) -> tuple[list[str], int]:
        """Messages, tools, instructions, prompts or embedding inputs."""
        if endpoint is CHAT:
            messages = body.get("messages") or []
            texts = gather_texts(messages)
            gather_texts(body.get("tools"), texts)
            return texts, len(messages) if isinstance(messages, list) else 1
        if endpoint is RESPONSES:
            texts = gather_texts(body.get("instructions"))
            gather_texts(body.get("input"), texts)
            gather_texts(body.get("tools"), texts)
            items = body.get("input")
            return texts, len(items) if isinstance(items, list) else 1
        if endpoint is EMBEDDINGS:
            return gather_texts(body.get("input")), 0
        return gather_texts(body.get("prompt")), 0

    def input_bound(self, endpoint: Endpoint, body: Mapping[str, Any]) -> int:
        """Bytes of everything the model reads, plus framing and media allowances."""
        if endpoint is CHAT:
            messages = body.get("messages") or []
            payload: Any = [messages, body.get("tools"), body.get("response_format")]
            return bound_of(payload, len(messages) if isinstance(messages, list) else 1)
        if endpoint is RESPONSES:
            items = body.get("input")
            payload = [body.get("instructions"), items, body.get("tools"), body.get("text")]
            return bound_of(payload, len(items) if isinstance(items, list) else 1)
        key = "input" if endpoint is EMBEDDINGS else "prompt"
        value = body.get(key)
        if isinstance(value, list) and value and all(type(v) is int for v in value):
            return len(value)  # already tokens
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return sum(len(v) if all(type(t) is int for t in v) else bound_of(v, 0) for v in value)
        return bound_of(value, 0)

    def output_bound(self, endpoint: Endpoint, body: Mapping[str, Any]) -> int | None:
        """``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens``, times ``n`` choices."""
        if endpoint is EMBEDDINGS:
            return 0
        if endpoint is RESPONSES:
            return positive_int(body.get("max_output_tokens"))
        limit = positive_int(body.get("max_completion_tokens")) or positive_int(body.get("max_tokens"))
        if endpoint is COMPLETIONS and limit is None:
            limit = 16  # the legacy endpoint's documented default
        choices = max(positive_int(body.get("n")) or 1, positive_int(body.get("best_of")) or 1)
        return None if limit is None else limit * choices

    def may_refuse(self, body: bytes) -> bool:
        """A refusal is a non-null ``refusal`` string, a ``content_filter`` finish or a
        Responses refusal event: without those bytes the stream holds none."""
        return _REFUSAL_BYTES.search(body) is not None

    def from_json(self, endpoint: Endpoint, data: Any) -> Observed:
        """Usage of a non-streamed response (its JSON, or the SDK's parsed model)."""
        raw = field_of(data, "usage")
        usage = None
        if raw is not None:
            # embeddings report no output count
            usage = (
                _responses_usage(raw) if endpoint is RESPONSES else _chat_usage(raw, output=endpoint is not EMBEDDINGS)
            )
        model = field_of(data, "model")
        error = "response.failed" if endpoint is RESPONSES and field_of(data, "status") == "failed" else None
        return Observed(
            usage=usage,
            model=model if isinstance(model, str) else None,
            price_context=_tier(data),
            finished=True,
            error=error,
            refused=_refused(endpoint, data),
        )

    def from_events(self, endpoint: Endpoint, events: Sequence[SSEEvent], *, want_text: bool) -> Observed:
        """Usage and (if wanted) text of a chat / completions / Responses event stream."""
        if endpoint is RESPONSES:
            return self._responses_events(events, want_text)
        seen = Observed()
        for index, (_, data) in enumerate(events):
            if data == "[DONE]":
                seen.finished = True
                continue
            # decode only what can matter: the first chunk (model), usage, errors, text if wanted
            if not (want_text or index == 0 or _HAS_USAGE.search(data) or '"error"' in data):
                continue
            chunk = loads_object(data)
            if chunk is None:
                continue
            if chunk.get("error"):
                seen.error = "stream_error"
                continue
            if isinstance(chunk.get("model"), str):
                seen.model = chunk["model"]
            seen.price_context.update(_tier(chunk))
            if isinstance(chunk.get("usage"), dict):
                seen.usage = _chat_usage(chunk["usage"])
            if want_text:
                for choice in chunk.get("choices") or ():
                    if not isinstance(choice, dict):
                        continue
                    if choice.get("finish_reason") == "content_filter" or dig(choice, "delta", "refusal"):
                        seen.refused = True
                    if endpoint is COMPLETIONS:
                        if isinstance(choice.get("text"), str):
                            seen.text_parts.append(choice["text"])
                    else:
                        gather_texts(choice.get("delta"), seen.text_parts)
        return seen

    def _responses_events(self, events: Sequence[SSEEvent], want_text: bool) -> Observed:
        seen = Observed()
        for name, data in events:
            kind = name or _type_of(data)
            if kind == "response.refusal.delta":
                seen.refused = True
            if kind in _TEXT_EVENTS:
                if want_text:
                    delta = dig(loads_object(data), "delta")
                    if isinstance(delta, str):
                        seen.text_parts.append(delta)
                continue
            if kind == "error":
                seen.error = "stream_error"
                continue
            if kind not in _TERMINAL_RESPONSE_EVENTS and kind != "response.created":
                continue
            response = dig(loads_object(data), "response")
            if isinstance(response, dict):
                if isinstance(response.get("model"), str):
                    seen.model = response["model"]
                seen.price_context.update(_tier(response))
                if isinstance(response.get("usage"), dict):
                    seen.usage = _responses_usage(response["usage"])
            if kind in _TERMINAL_RESPONSE_EVENTS:
                seen.finished = True
                seen.error = _TERMINAL_RESPONSE_EVENTS[kind] or seen.error
        return seen


def _type_of(data: str) -> str | None:
    """The ``type`` of a Responses event whose ``event:`` line was missing."""
    found = _TYPE.search(data)
    return found.group(1) if found else None
