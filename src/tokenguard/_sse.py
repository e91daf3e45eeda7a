"""Splitting a server-sent-events body into events (the subset of the SSE spec LLM APIs use).

Works on a body that may be cut off anywhere: a trailing event without its blank line
is still returned, since its data did reach the caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from .providers._base import SSEEvent

__all__ = ["head_and_tail", "iter_sse"]

_LINES = re.compile(r"\r\n|\r|\n")


def iter_sse(body: bytes) -> Iterator[SSEEvent]:
    """Yield ``(event_name, data)`` for each event in ``body``."""
    name: str | None = None
    data: list[str] = []
    # only CR, LF and CRLF end lines (str.splitlines() would also split at U+2028 inside JSON)
    for raw in _LINES.split(body.decode("utf-8", "replace")):
        if not raw:
            if data:
                yield name, "\n".join(data)
            name, data = None, []
            continue
        if raw.startswith(":"):
            continue
        field, _, value = raw.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
    if data:
        yield name, "\n".join(data)


def _counts(events: list[SSEEvent]) -> int:
    """How many of ``events`` say something: a keep-alive ping or an empty event does not."""
    return sum(1 for name, data in events if name != "ping" and data.strip() and '"type":"ping"' not in data)


def head_and_tail(body: bytes, tail: int = 4) -> list[SSEEvent]:
    """The first event and the last ``tail`` events of ``body``, without reading the middle.

    Everything a stream says about its cost sits at its ends: the model and (Anthropic)
    the input usage in the first event; the usage, the end marker and any error in the
    last few. Reading only the ends keeps settling a long stream as cheap as a short one.
    Keep-alives (comments, pings, empty events) before the first event or after the last
    ones are read past, not counted. Bodies with CR line endings, or too few events to have
    a middle, are read whole.
    """
    if b"\r" in body:
        return list(iter_sse(body))
    head: list[SSEEvent] = []
    head_end = 0
    while not _counts(head):
        cut = body.find(b"\n\n", head_end)
        if cut < 0:
            return list(iter_sse(body))
        head += iter_sse(body[head_end : cut + 2])
        head_end = cut + 2
    end = len(body.rstrip(b"\n"))
    back: list[SSEEvent] = []
    start = end
    while _counts(back) < tail:
        start = body.rfind(b"\n\n", 0, start)
        if start + 2 < head_end:
            return list(iter_sse(body))
        back[:0] = iter_sse(body[start + 2 : end])
        end = start
    if start + 2 <= head_end:
        return list(iter_sse(body))
    return [*head, *back]
