"""Fake OpenAI and Anthropic APIs for tests: the real SDK clients over ``httpx2.MockTransport``.

A ``FakeLLM`` answers like the vendor's API — JSON bodies and server-sent-event streams
with the usage you script, in the shapes the official SDKs parse (chat completions,
Responses, embeddings, legacy completions, Anthropic messages, plus the free
``models`` / ``count_tokens`` endpoints) — and records every request it receives:

    from tokenguard.testing import FakeLLM, Reply

    fake = FakeLLM(Reply(text="Hi!", input_tokens=12, output_tokens=3))
    client = fake.openai(guard=guard)           # a tokenguard.OpenAI; fake.anthropic(), async_=True ...
    fake.fail(429, headers={"retry-after": "1"})  # the next request gets a 429
    client.chat.completions.create(model="gpt-4o", messages=[...])
    assert len(fake.requests) == 1

``FakeServer(fake)`` serves the same fake over real HTTP on a loopback port, for code that
needs a URL rather than an ``http_client`` (a FastAPI app, a subprocess, another library):

    with FakeServer(fake) as server:
        client = tokenguard.OpenAI(api_key="sk-test", base_url=server.openai_base_url)

Streams are sent one event per chunk, so a test can abandon, cut (``stream_cut_after``)
or break (``stream_error_after``) them part-way, as a real network would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2

from ._fakeserver import Exchange, FakeServer
from ._guard import Guard

__all__ = ["ErrorReply", "Exchange", "FakeLLM", "FakeServer", "Recorded", "Reply", "sse"]

_OPENAI_BASE = "http://fake-openai.test/v1"
_ANTHROPIC_BASE = "http://fake-anthropic.test"
_AZURE_ENDPOINT = "http://fake-azure.test"


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer. Token counts use tokenguard's meanings: ``input_tokens`` is the
    whole input, cache reads and writes included (the fake converts to each vendor's shape).

    ``model`` defaults to the model the request named. ``usage=False`` leaves usage out
    entirely (OpenAI shapes only: Anthropic always reports usage). ``stream_cut_after=N`` ends a stream cleanly after N events (no final
    event, no usage); ``stream_error_after=N`` breaks the connection after N events.
    """

    text: str = "Hello from the fake LLM!"
    input_tokens: int = 9
    output_tokens: int = 5
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    service_tier: str | None = None
    usage: bool = True
    stream_cut_after: int | None = None
    stream_error_after: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error answer: the status, a message, and headers such as ``retry-after``."""

    status: int
    message: str = "fake error"
    headers: Mapping[str, str] = field(default_factory=dict)
    error_type: str | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """A request the fake received."""

    method: str
    path: str
    headers: Mapping[str, str]
    json: Any
    at: float


def sse(events: list[tuple[str | None, Any]]) -> list[bytes]:
    """Encode ``(event_name, data)`` pairs as server-sent events, one ``bytes`` per event."""
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        out.append(((f"event: {name}\n" if name else "") + f"data: {text}\n\n").encode())
    return out


def _pieces(text: str) -> list[str]:
    """Split text into a few deltas, as a streaming API would."""
    if len(text) < 3:
        return [text] if text else []
    third = max(1, len(text) // 3)
    return [text[:third], text[third : 2 * third], text[2 * third :]]


class FakeLLM:
    """A scripted fake of both vendors' APIs. Thread-safe; share one per test.

    Queued replies (``queue``, ``fail``, ``reply``) answer the next money-spending requests
    in order; after the queue is empty every request gets ``default``.
    """

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply()
        self.requests: list[Recorded] = []
        self._queue: list[Reply | ErrorReply | BaseException] = []
        self._lock = threading.Lock()

    # -- scripting ---------------------------------------------------------------------------

    def queue(self, *replies: Reply | ErrorReply | BaseException) -> FakeLLM:
        """Answer the next requests with these, in order (an exception is raised by the transport)."""
        with self._lock:
            self._queue.extend(replies)
        return self

    def reply(self, **fields: Any) -> FakeLLM:
        """Queue one ``Reply(**fields)``."""
        return self.queue(Reply(**fields))

    def fail(
        self,
        status: int,
        *,
        message: str = "fake error",
        headers: Mapping[str, str] | None = None,
        error_type: str | None = None,
        times: int = 1,
    ) -> FakeLLM:
        """Queue ``times`` error answers with this status and headers."""
        return self.queue(*[ErrorReply(status, message, dict(headers or {}), error_type)] * times)

    @property
    def money_requests(self) -> list[Recorded]:
        """The received requests to endpoints that cost money."""
        return [r for r in self.requests if _is_money_path(r.method, r.path)]

    # -- clients -----------------------------------------------------------------------------

    def transport(self, *, async_: bool = False) -> httpx2.MockTransport:
        """An ``httpx2.MockTransport`` answering from this fake."""
        if async_:

            async def handle_async(request: httpx2.Request) -> httpx2.Response:
                return self._handle(request, async_=True)

            return httpx2.MockTransport(handle_async)
        return httpx2.MockTransport(lambda request: self._handle(request, async_=False))

    def http_client(self, *, async_: bool = False) -> httpx2.Client | httpx2.AsyncClient:
        """An ``httpx2`` client over ``transport()``."""
        if async_:
            return httpx2.AsyncClient(transport=self.transport(async_=True))
        return httpx2.Client(transport=self.transport())

    def openai(self, *, guard: Guard | None = None, async_: bool = False, azure: bool = False, **kw: Any) -> Any:
        """A guarded ``tokenguard.OpenAI`` (or Async / Azure variant) talking to this fake."""
        # the SDKs are imported when a client of theirs is asked for (seconds each, and a
        # test suite of an OpenAI-only app should not pay for anthropic)
        from ._openai_clients import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI

        cls: Any
        if azure:
            cls = AsyncAzureOpenAI if async_ else AzureOpenAI
            kw.setdefault("azure_endpoint", _AZURE_ENDPOINT)
            kw.setdefault("api_version", "2024-10-21")
        else:
            cls = AsyncOpenAI if async_ else OpenAI
            kw.setdefault("base_url", _OPENAI_BASE)
        kw.setdefault("api_key", "sk-fake-test-key")
        return cls(guard=guard, http_client=self.http_client(async_=async_), **kw)

    def anthropic(self, *, guard: Guard | None = None, async_: bool = False, **kw: Any) -> Any:
        """A guarded ``tokenguard.Anthropic`` (or ``AsyncAnthropic``) talking to this fake."""
        from ._anthropic_clients import Anthropic, AsyncAnthropic

        cls: Any = AsyncAnthropic if async_ else Anthropic
        kw.setdefault("base_url", _ANTHROPIC_BASE)
        kw.setdefault("api_key", "sk-ant-fake-test-key")
        return cls(guard=guard, http_client=self.http_client(async_=async_), **kw)

    def vendor_openai(self, *, async_: bool = False, **kw: Any) -> Any:
        """A plain, unguarded ``openai.OpenAI`` (or ``AsyncOpenAI``) talking to this fake."""
        import openai

        cls: Any = openai.AsyncOpenAI if async_ else openai.OpenAI
        kw.setdefault("base_url", _OPENAI_BASE)
        kw.setdefault("api_key", "sk-fake-test-key")
        return cls(http_client=self.http_client(async_=async_), **kw)

    def vendor_anthropic(self, *, async_: bool = False, **kw: Any) -> Any:
        """A plain, unguarded ``anthropic.Anthropic`` (or ``AsyncAnthropic``) talking to this fake."""
        import anthropic

        cls: Any = anthropic.AsyncAnthropic if async_ else anthropic.Anthropic
        kw.setdefault("base_url", _ANTHROPIC_BASE)
        kw.setdefault("api_key", "sk-ant-fake-test-key")
        return cls(http_client=self.http_client(async_=async_), **kw)

    # -- serving -----------------------------------------------------------------------------

    def _handle(self, request: httpx2.Request, *, async_: bool) -> httpx2.Response:
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        with self._lock:
            self.requests.append(Recorded(request.method, path, dict(request.headers), body, time.monotonic()))
            scripted = self._queue.pop(0) if self._queue and _is_money_path(request.method, path) else None
        if not _is_money_path(request.method, path):
            return _free_endpoint(request, path, body)
        answer = scripted if scripted is not None else self.default
        if isinstance(answer, BaseException):
            raise answer
        anthropic_api = path.endswith("/messages")
        if isinstance(answer, ErrorReply):
            return _error(answer, anthropic_api=anthropic_api)
        assert isinstance(body, dict)
        model = answer.model or body.get("model") or _azure_deployment(path) or "unknown"
        if anthropic_api:
            events, payload = _anthropic_message(answer, model)
        elif path.endswith("/chat/completions"):
            events, payload = _chat(answer, model, body)
        elif path.endswith("/responses"):
            events, payload = _responses(answer, model)
        elif path.endswith("/embeddings"):
            return _json(_embeddings(answer, model, body), answer.headers)
        else:
            events, payload = _completions(answer, model, body)
        if not body.get("stream"):
            return _json(payload, answer.headers)
        chunks = sse(events)
        if answer.stream_cut_after is not None:
            chunks = chunks[: answer.stream_cut_after]
        error_after = answer.stream_error_after
        headers = {"content-type": "text/event-stream", **answer.headers}
        if async_:
            return httpx2.Response(200, headers=headers, content=_agen(chunks, error_after))
        return httpx2.Response(200, headers=headers, content=_gen(chunks, error_after))


def _is_money_path(method: str, path: str) -> bool:
    return method == "POST" and path.endswith(
        ("/chat/completions", "/responses", "/embeddings", "/completions", "/messages")
    )


def _azure_deployment(path: str) -> str | None:
    parts = path.split("/")
    if "deployments" in parts:
        i = parts.index("deployments")
        return parts[i + 1] if i + 1 < len(parts) else None
    return None


def _gen(chunks: list[bytes], error_after: int | None) -> Iterator[bytes]:
    for i, chunk in enumerate(chunks):
        if error_after is not None and i >= error_after:
            raise httpx2.RemoteProtocolError("peer closed connection without sending complete message body")
        yield chunk


async def _agen(chunks: list[bytes], error_after: int | None) -> AsyncIterator[bytes]:
    for chunk in _gen(chunks, error_after):
        yield chunk


def _json(payload: Any, headers: Mapping[str, str]) -> httpx2.Response:
    return httpx2.Response(200, json=payload, headers={"x-request-id": "req_fake", **headers})


def _error(answer: ErrorReply, *, anthropic_api: bool) -> httpx2.Response:
    if anthropic_api:
        kind = answer.error_type or {429: "rate_limit_error", 529: "overloaded_error"}.get(answer.status, "api_error")
        payload: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": answer.message}}
    else:
        payload = {
            "error": {
                "message": answer.message,
                "type": answer.error_type or "error",
                "param": None,
                "code": None,
            }
        }
    return httpx2.Response(answer.status, json=payload, headers=dict(answer.headers))


def _free_endpoint(request: httpx2.Request, path: str, body: Any) -> httpx2.Response:
    if path.endswith(("/count_tokens", "/input_tokens")):
        return httpx2.Response(200, json={"input_tokens": 9, "object": "response.input_tokens"})
    if path.endswith("/models"):
        return httpx2.Response(
            200, json={"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
        )
    return httpx2.Response(404, json={"error": {"message": f"fake has no {request.method} {path}"}})


def _chat_usage(r: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": r.input_tokens,
        "completion_tokens": r.output_tokens,
        "total_tokens": r.input_tokens + r.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": r.cache_read_tokens,
            "cache_write_tokens": r.cache_write_tokens,
        },
        "completion_tokens_details": {"reasoning_tokens": r.reasoning_tokens},
    }


def _chat(r: Reply, model: str, body: Mapping[str, Any]) -> tuple[list[tuple[str | None, Any]], dict[str, Any]]:
    base: dict[str, Any] = {"id": "chatcmpl-fake", "created": 0, "model": model}
    if r.service_tier:
        base["service_tier"] = r.service_tier
    payload = {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": r.text, "refusal": None},
            }
        ],
    }
    if r.usage:
        payload["usage"] = _chat_usage(r)
    chunk = {**base, "object": "chat.completion.chunk"}
    events: list[tuple[str | None, Any]] = [
        (None, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    ]
    events += [(None, {**chunk, "choices": [{"index": 0, "delta": {"content": p}}]}) for p in _pieces(r.text)]
    events.append((None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if r.usage and (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {**chunk, "choices": [], "usage": _chat_usage(r)}))
    events.append((None, "[DONE]"))
    return events, payload


def _completions(r: Reply, model: str, body: Mapping[str, Any]) -> tuple[list[tuple[str | None, Any]], dict[str, Any]]:
    base = {"id": "cmpl-fake", "created": 0, "model": model, "object": "text_completion"}
    usage = {k: v for k, v in _chat_usage(r).items() if not k.endswith("details")}
    payload: dict[str, Any] = {
        **base,
        "choices": [{"index": 0, "text": r.text, "finish_reason": "stop", "logprobs": None}],
    }
    if r.usage:
        payload["usage"] = usage
    events: list[tuple[str | None, Any]] = [
        (None, {**base, "choices": [{"index": 0, "text": p, "finish_reason": None, "logprobs": None}]})
        for p in _pieces(r.text)
    ]
    events.append((None, {**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]}))
    if r.usage and (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {**base, "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return events, payload


def _responses(r: Reply, model: str) -> tuple[list[tuple[str | None, Any]], dict[str, Any]]:
    message = {
        "type": "message",
        "id": "msg_fake",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": r.text, "annotations": []}],
    }
    resp: dict[str, Any] = {
        "id": "resp_fake",
        "object": "response",
        "created_at": 0,
        "model": model,
        "status": "completed",
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "output": [message],
        "usage": {
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "total_tokens": r.input_tokens + r.output_tokens,
            "input_tokens_details": {
                "cached_tokens": r.cache_read_tokens,
                "cache_write_tokens": r.cache_write_tokens,
            },
            "output_tokens_details": {"reasoning_tokens": r.reasoning_tokens},
        }
        if r.usage
        else None,
    }
    if r.service_tier:
        resp["service_tier"] = r.service_tier
    started = {**resp, "status": "in_progress", "output": [], "usage": None}
    seq = iter(range(10_000))
    events: list[tuple[str | None, Any]] = [
        ("response.created", {"type": "response.created", "sequence_number": next(seq), "response": started}),
        (
            "response.in_progress",
            {"type": "response.in_progress", "sequence_number": next(seq), "response": started},
        ),
        (
            "response.output_item.added",
            {
                "type": "response.output_item.added",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": {**message, "status": "in_progress", "content": []},
            },
        ),
        (
            "response.content_part.added",
            {
                "type": "response.content_part.added",
                "sequence_number": next(seq),
                "item_id": "msg_fake",
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
        ),
    ]
    for piece in _pieces(r.text):
        events.append(
            (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "sequence_number": next(seq),
                    "item_id": "msg_fake",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": [],
                },
            )
        )
    events += [
        (
            "response.output_text.done",
            {
                "type": "response.output_text.done",
                "sequence_number": next(seq),
                "item_id": "msg_fake",
                "output_index": 0,
                "content_index": 0,
                "text": r.text,
                "logprobs": [],
            },
        ),
        (
            "response.content_part.done",
            {
                "type": "response.content_part.done",
                "sequence_number": next(seq),
                "item_id": "msg_fake",
                "output_index": 0,
                "content_index": 0,
                "part": message["content"][0],
            },
        ),
        (
            "response.output_item.done",
            {
                "type": "response.output_item.done",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": message,
            },
        ),
        (
            "response.completed",
            {"type": "response.completed", "sequence_number": next(seq), "response": resp},
        ),
    ]
    return events, resp


def _embeddings(r: Reply, model: str, body: Mapping[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    payload: dict[str, Any] = {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": [0.25, -0.5, 0.125]} for i in range(count)],
    }
    if r.usage:
        payload["usage"] = {"prompt_tokens": r.input_tokens, "total_tokens": r.input_tokens}
    return payload


def _anthropic_usage(r: Reply, *, output: int) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": r.input_tokens - r.cache_read_tokens - r.cache_write_tokens,
        "output_tokens": output,
        "cache_creation_input_tokens": r.cache_write_tokens,
        "cache_read_input_tokens": r.cache_read_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": r.cache_write_tokens - r.cache_write_1h_tokens,
            "ephemeral_1h_input_tokens": r.cache_write_1h_tokens,
        },
        "service_tier": r.service_tier or "standard",
    }
    if r.reasoning_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": r.reasoning_tokens}
    return usage


def _anthropic_message(r: Reply, model: str) -> tuple[list[tuple[str | None, Any]], dict[str, Any]]:
    message: dict[str, Any] = {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": r.text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(r, output=r.output_tokens),
    }
    start_usage = _anthropic_usage(r, output=min(1, r.output_tokens))
    events: list[tuple[str | None, Any]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {**message, "content": [], "stop_reason": None, "usage": start_usage},
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
    ]
    events += [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
        )
        for p in _pieces(r.text)
    ]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": r.output_tokens},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events, message
