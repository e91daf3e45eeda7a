"""The adapter contract: what the pipeline needs to know about a vendor, and nothing more.

An adapter translates vendor requests and responses into vendor-neutral values: which
endpoint a request is (and whether it can cost money at all), the model, the text of
the input (for estimates), and the usage a JSON body or an SSE stream reports. It does
no I/O, keeps no state and knows nothing of budgets, caches or stores. Adding a vendor
means adding one adapter module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pydantic

from .._usage import Usage

__all__ = ["Adapter", "Endpoint", "Observed", "SSEEvent", "dig", "gather_texts", "int_at"]

SSEEvent = tuple[str | None, str]
"""One server-sent event: its ``event:`` name (or ``None``) and its ``data:`` text."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A money-spending endpoint: ``name`` is what the ledger shows (``"chat.completions"``)."""

    name: str


@dataclass(slots=True)
class Observed:
    """What a response told us: reported usage (``None`` if it reported none), the model
    that answered, the output text seen (for estimates), the price context (service
    tier, batch ...), whether the response reached its proper end, and an error it
    carried in-band."""

    usage: Usage | None = None
    model: str | None = None
    # finished: the response reached its terminal event ([DONE], message_stop, response.completed)
    text_parts: list[str] = field(default_factory=list)
    price_context: dict[str, str] = field(default_factory=dict)
    finished: bool = False
    error: str | None = None
    # the model declined to answer (a refusal, a content filter): never cached
    refused: bool = False


class Adapter(Protocol):
    """One vendor's translation rules."""

    vendor: str

    def endpoint(self, method: str, url: str) -> Endpoint | None:
        """The endpoint for a request, or ``None`` when it costs nothing (models, files, counts ...)."""

    def request_model(self, body: Mapping[str, Any]) -> str:
        """The model the request names (``""`` if none)."""

    def input_texts(self, endpoint: Endpoint, body: Mapping[str, Any]) -> tuple[list[str], int]:
        """The input's texts and how many chat messages frame them (for estimates)."""

    def input_bound(self, endpoint: Endpoint, body: Mapping[str, Any]) -> int:
        """An upper bound on the input tokens the vendor can bill for this request (see ``bound_of``)."""

    def output_bound(self, endpoint: Endpoint, body: Mapping[str, Any]) -> int | None:
        """The most output tokens the request allows (its ``max_tokens`` ..., times ``n``), or ``None``."""

    def from_json(self, endpoint: Endpoint, data: Any) -> Observed:
        """What a complete response reports: its JSON body, or the SDK's parsed model of it."""

    def may_refuse(self, body: bytes) -> bool:
        """Whether a finished stream's bytes may hold a refusal anywhere (then every event is
        read before it is cached); ``False`` only when a byte scan rules one out."""

    def from_events(self, endpoint: Endpoint, events: Sequence[SSEEvent], *, want_text: bool) -> Observed:
        """What a (possibly cut-short) event stream reported.

        Decoding every event would double the SDK's work, so only the events that carry
        usage, the model, the end or an error are decoded; the output text (``text_parts``)
        is collected only when ``want_text`` — the pipeline asks again with it when the
        usage is missing or incomplete.
        """


def field_of(obj: Any, key: str) -> Any:
    """``obj[key]`` of a JSON object, or ``obj.key`` of a vendor's parsed (pydantic) model;
    ``None`` where absent. One accessor lets adapters read JSON bodies and parsed responses
    alike, so a response the SDK already parsed is never decoded twice."""
    if type(obj) is dict:
        return obj.get(key)
    if isinstance(obj, pydantic.BaseModel):  # checked before Mapping: an ABC check costs more
        return getattr(obj, key, None)
    if isinstance(obj, Mapping):
        return obj.get(key)
    return None


def dig(data: Any, *path: str) -> Any:
    """``data[p0][p1]...`` (or attributes of a parsed model), ``None`` where a step is missing."""
    for key in path:
        data = field_of(data, key)
        if data is None:
            return None
    return data


def trusted(*counts: Any) -> bool:
    """Whether a vendor's usage counts can be recorded as exact: each a non-negative int, or
    absent (``None``) where the vendor may leave it out. A count that is there but negative,
    fractional, a string or a bool means the report is broken, and the call is estimated."""
    return all(value is None or (type(value) is int and value >= 0) for value in counts)


def int_at(data: Any, *path: str) -> int:
    """A non-negative int found at ``path``, else 0 (vendors send ``null`` for absent details)."""
    value = dig(data, *path)
    return value if type(value) is int and value >= 0 else 0


# keys whose strings are not prose the model reads as tokens of text (ids, enums, binary)
_SKIP_KEYS = frozenset(
    {
        "role",
        "type",
        "id",
        "tool_call_id",
        "tool_use_id",
        "image_url",
        "source",
        "data",
        "file_id",
        "cache_control",
    }
)


def gather_texts(value: Any, out: list[str] | None = None) -> list[str]:
    """Every string the model would read as text inside a JSON value (images and ids skipped)."""
    if out is None:
        out = []
    if isinstance(value, str):
        if not value.startswith("data:"):
            out.append(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key not in _SKIP_KEYS:
                gather_texts(item, out)
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            # pre-tokenized input: one placeholder character per token keeps the count honest
            out.append("\x00" * len(value))
        else:
            for item in value:
                gather_texts(item, out)
    return out


IMAGE_TOKENS = 6_000
"""Input tokens reserved per image or file part: a URL costs a few bytes but the vendor bills
the picture (OpenAI high detail and Claude images stay under ~2,000 tokens today; PDFs by page
can be more — see docs/budgets.md)."""

_MEDIA_TYPES = frozenset({"image_url", "image", "input_image", "document", "file", "input_file", "input_audio"})


def bound_of(payload: Any, messages: int) -> int:
    """An upper bound on the tokens of ``payload`` as the vendor bills it.

    Byte-level BPE tokenizers never produce more tokens than the UTF-8 bytes they encode,
    and the JSON text of the payload contains every byte the model reads (plus quotes and
    keys); each chat message adds its framing tokens, and each image or file part a fixed
    allowance, since a URL's bytes say nothing about the picture's tokens.
    """
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)
    return len(text.encode()) + 4 * messages + 3 + IMAGE_TOKENS * media_parts(payload)


def media_parts(value: Any) -> int:
    """How many image / file / audio parts ``value`` holds."""
    if isinstance(value, dict):
        own = 1 if value.get("type") in _MEDIA_TYPES else 0
        return own + sum(media_parts(v) for v in value.values() if isinstance(v, dict | list))
    if isinstance(value, list):
        return sum(media_parts(v) for v in value if isinstance(v, dict | list))
    return 0


def positive_int(value: Any) -> int | None:
    """``value`` if it is a positive int, else ``None``."""
    return value if type(value) is int and value > 0 else None


def loads_object(data: str) -> dict[str, Any] | None:
    """``data`` decoded as a JSON object, or ``None`` (``[DONE]``, a corrupted chunk, a list ...)."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
