"""The response cache and streams (issue 4): a streamed hit replays as the vendor's own stream type
(helpers included), a streamed miss is stored only once complete, and cut, broken, abandoned or
refused streams are never stored."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

import tokenguard
from tokenguard import _cache, _clients
from tokenguard.testing import FakeLLM, Reply, sse

OA = "gpt-4o"
AN = "claude-haiku-4-5"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]
OPENAI_BASE = "http://fake-openai.test/v1"
ANTHROPIC_BASE = "http://fake-anthropic.test"
BACKENDS = ["memory", "disk"]

INCLUDE_USAGE = {"include_usage": True}
TEXT = "Hello from the fake LLM!"


def make_cache(kind: str, tmp_path: Path, **kw: Any) -> tokenguard.Cache:
    if kind == "memory":
        return tokenguard.Cache("memory", **kw)
    return tokenguard.Cache("disk", path=tmp_path / "responses", **kw)


def chat(client: Any, **kw: Any) -> Any:
    """A deterministic (temperature 0) chat completion; ``kw`` overrides or adds fields."""
    params: dict[str, Any] = {"model": OA, "messages": MSGS, "temperature": 0, **kw}
    return client.chat.completions.create(**params)


def message(client: Any, **kw: Any) -> Any:
    params: dict[str, Any] = {"model": AN, "max_tokens": 100, "messages": MSGS, **kw}
    return client.messages.create(**params)


def sent(fake: FakeLLM) -> int:
    """Money-spending requests that reached the fake API."""
    return len(fake.money_requests)


def rows(guard: tokenguard.Guard) -> list[tokenguard.LedgerRow]:
    return list(guard.store.rows())


def stored_keys(cache: tokenguard.Cache | None) -> list[str]:
    """The keys the cache's backend holds right now."""
    assert cache is not None
    store: Any = cache._store
    if isinstance(store, _cache._MemoryBackend):
        return list(store._data)
    return [str(k) for k in store._cache.iterkeys()]


def slow_openai(fake: FakeLLM, guard: tokenguard.Guard, delay_s: float = 0.2) -> tokenguard.OpenAI:
    """A guarded OpenAI client whose every request takes ``delay_s`` at the fake API."""
    inner = fake.transport()

    def slow(request: httpx2.Request) -> httpx2.Response:
        time.sleep(delay_s)
        return inner.handle_request(request)

    return tokenguard.OpenAI(
        base_url=OPENAI_BASE,
        api_key="sk-fake-test-key",
        guard=guard,
        http_client=httpx2.Client(transport=httpx2.MockTransport(slow)),
    )


@pytest.fixture(params=BACKENDS)
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tokenguard.Cache]:
    """A response cache, once in memory and once on disk (under tmp_path)."""
    made = make_cache(request.param, tmp_path)
    yield made
    made.close()


@pytest.fixture
def cguard(cache: tokenguard.Cache) -> tokenguard.Guard:
    """A guard with an in-memory ledger and the parametrized response cache."""
    return tokenguard.Guard(store="memory://", cache=cache)


def chat_stream(client: Any, **kw: Any) -> Any:
    """A deterministic chat stream that reports its usage."""
    return chat(client, stream=True, stream_options=INCLUDE_USAGE, **kw)


def dumps(events: Any) -> list[dict[str, Any]]:
    return [e.model_dump() for e in events]


def chat_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- 3. same types on a hit ---------------------------------------------------------------------------


def test_chat_stream_hit_replays_as_a_stream(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A repeated chat stream is replayed, without a request, as an openai.Stream of the same chunks."""
    client = fake.openai(guard=cguard)
    live = chat_stream(client)
    live_chunks = list(live)
    hit = chat_stream(client)
    assert type(hit) is type(live)
    assert isinstance(hit, openai.Stream)
    hit_chunks = list(hit)
    assert sent(fake) == 1
    assert dumps(hit_chunks) == dumps(live_chunks)
    assert chat_text(hit_chunks) == TEXT


def test_responses_stream_hit_replays_as_a_stream(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A repeated Responses stream is replayed as an openai.Stream of the same events."""
    client = fake.openai(guard=cguard)
    live = dumps(client.responses.create(model=OA, input="Hi", temperature=0, stream=True))
    hit = client.responses.create(model=OA, input="Hi", temperature=0, stream=True)
    assert isinstance(hit, openai.Stream)
    assert dumps(hit) == live
    assert sent(fake) == 1
    assert live[-1]["type"] == "response.completed"


def test_legacy_completions_stream_hit(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A repeated legacy completions stream is replayed with the same chunks."""
    client = fake.openai(guard=cguard)
    kw: dict[str, Any] = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "temperature": 0, "stream": True}
    live = dumps(client.completions.create(**kw, stream_options=INCLUDE_USAGE))
    hit = dumps(client.completions.create(**kw, stream_options=INCLUDE_USAGE))
    assert hit == live
    assert sent(fake) == 1


def test_anthropic_stream_hit_replays_as_a_stream(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A repeated Anthropic stream (always=True) is replayed as an anthropic.Stream of the same events."""
    client = fake.anthropic(guard=cguard)
    with tokenguard.cache_control(always=True):
        live = dumps(message(client, stream=True))
        hit = message(client, stream=True)
        assert isinstance(hit, anthropic.Stream)
        assert dumps(hit) == live
    assert sent(fake) == 1
    assert live[-1]["type"] == "message_stop"


def test_chat_stream_helper_on_a_hit(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """chat.completions.stream() on a hit yields the same events and get_final_completion()."""
    client = fake.openai(guard=cguard)
    finals = []
    events = []
    for _ in range(2):
        with client.chat.completions.stream(
            model=OA, messages=MSGS, temperature=0, stream_options=INCLUDE_USAGE
        ) as stream:
            events.append([e.type for e in stream])
            finals.append(stream.get_final_completion())
    assert sent(fake) == 1
    assert events[0] == events[1]
    assert "content.done" in events[1]
    assert finals[1].model_dump() == finals[0].model_dump()
    assert finals[1].choices[0].message.content == TEXT


def test_responses_stream_helper_on_a_hit(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """responses.stream() on a hit gives the same events and get_final_response()."""
    client = fake.openai(guard=cguard)
    finals = []
    for _ in range(2):
        with client.responses.stream(model=OA, input="Hi", temperature=0) as stream:
            assert [e.type for e in stream][-1] == "response.completed"
            finals.append(stream.get_final_response())
    assert sent(fake) == 1
    assert finals[1].output_text == TEXT
    assert finals[1].model_dump() == finals[0].model_dump()


def test_anthropic_stream_helper_on_a_hit(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """messages.stream() on a hit gives the same text_stream, get_final_message() and get_final_text()."""
    client = fake.anthropic(guard=cguard)
    results = []
    with tokenguard.cache_control(always=True):
        for _ in range(2):
            with client.messages.stream(model=AN, max_tokens=100, messages=MSGS) as stream:
                texts = list(stream.text_stream)
                results.append((texts, stream.get_final_message().model_dump(), stream.get_final_text()))
    assert sent(fake) == 1
    assert results[1] == results[0]
    assert "".join(results[1][0]) == TEXT
    assert results[1][2] == TEXT


async def test_async_openai_stream_hit(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """An AsyncOpenAI streamed hit is an openai.AsyncStream of the same chunks."""
    client = fake.openai(guard=cguard, async_=True)
    live = [c.model_dump() async for c in await chat_stream(client)]
    hit = await chat_stream(client)
    assert isinstance(hit, openai.AsyncStream)
    assert [c.model_dump() async for c in hit] == live
    assert sent(fake) == 1


async def test_async_anthropic_stream_helper_on_a_hit(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """AsyncAnthropic messages.stream() on a hit gives the same text and final message."""
    client = fake.anthropic(guard=cguard, async_=True)
    results = []
    with tokenguard.cache_control(always=True):
        for _ in range(2):
            async with client.messages.stream(model=AN, max_tokens=100, messages=MSGS) as stream:
                texts = [t async for t in stream.text_stream]
                final = await stream.get_final_message()
                results.append((texts, final.model_dump()))
    assert sent(fake) == 1
    assert results[1] == results[0]


def test_stream_hit_is_a_free_row_marked_stream(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A streamed hit is recorded as a $0 cache_hit stream row saving the original stream's cost."""
    client = fake.openai(guard=cguard)
    list(chat_stream(client))
    list(chat_stream(client))
    live, hit = rows(cguard)
    assert live.outcome == "ok"
    assert live.estimated is False
    assert hit.outcome == "cache_hit"
    assert hit.stream is True
    assert hit.cost_usd == 0
    assert hit.saved_usd == live.cost_usd


def test_chat_stream_without_usage_is_cached_once_complete(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A complete chat stream that carried no usage is still stored, and a hit saves its (estimated) cost."""
    client = fake.openai(guard=cguard)
    live = dumps(chat(client, stream=True))
    hit = dumps(chat(client, stream=True))
    assert sent(fake) == 1
    assert hit == live
    assert all(c["choices"] for c in hit)
    first, second = rows(cguard)
    assert first.estimated is True
    assert second.outcome == "cache_hit"
    assert second.saved_usd == first.cost_usd


def test_stream_options_do_not_change_the_key(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Two streams differing only in stream_options share one entry."""
    client = fake.openai(guard=cguard)
    list(chat_stream(client))
    list(chat(client, stream=True, stream_options={"include_usage": True, "include_obfuscation": False}))
    assert sent(fake) == 1


def test_replay_without_include_usage_has_no_usage_only_chunk(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A caller who did not ask for include_usage gets the chunks a live stream would give: each with a choice."""
    client = fake.openai(guard=cguard)
    list(chat_stream(client))
    expected = dumps(fake.vendor_openai().chat.completions.create(model=OA, messages=MSGS, temperature=0, stream=True))
    requests_before = sent(fake)
    replayed = dumps(chat(client, stream=True))
    if sent(fake) == requests_before:  # answered from the cache: it must look like the live stream
        assert [len(c["choices"]) for c in replayed] == [len(c["choices"]) for c in expected]
        assert all(c["choices"] for c in replayed)


# -- streamed misses: stored only when complete ------------------------------------------------------------


def test_streamed_miss_is_stored_only_once_complete(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Nothing is stored while a stream is being read; the entry appears once it completes."""
    client = fake.openai(guard=cguard)
    stream = chat_stream(client)
    iterator = iter(stream)
    next(iterator)
    next(iterator)
    assert stored_keys(cguard.cache) == []
    rest = list(iterator)
    assert rest
    assert len(stored_keys(cguard.cache)) == 1


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_cut_openai_stream_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard, cut: int) -> None:
    """A chat stream that ends early without its final events (stream_cut_after) is never stored."""
    client = fake.openai(guard=cguard)
    fake.queue(Reply(stream_cut_after=cut))
    list(chat_stream(client))
    assert stored_keys(cguard.cache) == []
    assert chat_text(list(chat_stream(client))) == TEXT
    assert sent(fake) == 2


def test_stream_cut_right_before_done_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A chat stream that delivered its usage chunk but not [DONE] is not stored."""
    client = fake.openai(guard=cguard)
    fake.queue(Reply(stream_cut_after=6))  # role, 3 deltas, finish, usage: no [DONE]
    list(chat_stream(client))
    list(chat_stream(client))
    assert sent(fake) == 2


@pytest.mark.parametrize("cut", [2, 6])
def test_cut_anthropic_stream_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard, cut: int) -> None:
    """An Anthropic stream cut before message_stop is never stored."""
    client = fake.anthropic(guard=cguard)
    fake.queue(Reply(stream_cut_after=cut))
    with tokenguard.cache_control(always=True):
        list(message(client, stream=True))
        assert stored_keys(cguard.cache) == []
        list(message(client, stream=True))
        list(message(client, stream=True))
    assert sent(fake) == 2


def test_cut_responses_stream_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A Responses stream cut before response.completed is never stored."""
    client = fake.openai(guard=cguard)
    fake.queue(Reply(stream_cut_after=5))
    list(client.responses.create(model=OA, input="Hi", temperature=0, stream=True))
    list(client.responses.create(model=OA, input="Hi", temperature=0, stream=True))
    assert sent(fake) == 2


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
def test_broken_stream_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard, vendor: str) -> None:
    """A stream whose connection breaks (stream_error_after) raises and is never stored."""
    fake.queue(Reply(stream_error_after=3))
    with tokenguard.cache_control(always=True):
        client = fake.openai(guard=cguard) if vendor == "openai" else fake.anthropic(guard=cguard)
        make = (lambda: chat_stream(client)) if vendor == "openai" else (lambda: message(client, stream=True))
        with pytest.raises((httpx2.RemoteProtocolError, openai.APIError, anthropic.APIError)):
            list(make())
        assert stored_keys(cguard.cache) == []
        list(make())
        list(make())
    assert sent(fake) == 2


def test_closed_stream_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A stream the caller closes after one chunk is not stored; the next identical call is sent."""
    client = fake.openai(guard=cguard)
    stream = chat_stream(client)
    next(iter(stream))
    stream.close()
    assert stored_keys(cguard.cache) == []
    assert chat_text(list(chat_stream(client))) == TEXT
    assert sent(fake) == 2


def test_abandoned_stream_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A stream dropped mid-way (break, del, gc) is not stored."""
    client = fake.openai(guard=cguard)
    stream = chat_stream(client)
    for _ in stream:
        break
    del stream
    gc.collect()
    assert stored_keys(cguard.cache) == []
    list(chat_stream(client))
    assert sent(fake) == 2


def test_anthropic_helper_closed_early_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Leaving a messages.stream() block after the first text is not stored."""
    client = fake.anthropic(guard=cguard)
    with tokenguard.cache_control(always=True):
        with client.messages.stream(model=AN, max_tokens=100, messages=MSGS) as stream:
            for _ in stream.text_stream:
                break
        assert stored_keys(cguard.cache) == []
        with client.messages.stream(model=AN, max_tokens=100, messages=MSGS) as stream:
            assert stream.get_final_text() == TEXT
    assert sent(fake) == 2


async def test_async_stream_closed_early_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """An async stream closed after its first chunk is not stored."""
    client = fake.openai(guard=cguard, async_=True)
    stream = await chat_stream(client)
    async for _ in stream:
        break
    await stream.close()
    assert stored_keys(cguard.cache) == []
    async for _ in await chat_stream(client):
        pass
    assert sent(fake) == 2


# -- refusals in streams ---------------------------------------------------------------------------------


class ScriptedSSE:
    """A fake API answering every request with one fixed event stream, counting requests."""

    def __init__(self, events: list[tuple[str | None, Any]]) -> None:
        self.chunks = sse(events)
        self.requests = 0

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests += 1
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=iter(list(self.chunks)))

    def http_client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle))


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": OA, "choices": choices, **extra}


USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}

CHAT_REFUSAL = [
    (None, _chunk([{"index": 0, "delta": {"role": "assistant", "content": None}}])),
    (None, _chunk([{"index": 0, "delta": {"refusal": "I can't help "}}])),
    (None, _chunk([{"index": 0, "delta": {"refusal": "with that."}}])),
    (None, _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])),
    (None, _chunk([], usage=USAGE)),
    (None, "[DONE]"),
]
CHAT_CONTENT_FILTER = [
    (None, _chunk([{"index": 0, "delta": {"role": "assistant", "content": "The answer"}}])),
    (None, _chunk([{"index": 0, "delta": {}, "finish_reason": "content_filter"}])),
    (None, _chunk([], usage=USAGE)),
    (None, "[DONE]"),
]
CHAT_LENGTH = [
    (None, _chunk([{"index": 0, "delta": {"role": "assistant", "content": "Paris is"}}])),
    (None, _chunk([{"index": 0, "delta": {}, "finish_reason": "length"}])),
    (None, _chunk([], usage=USAGE)),
    (None, "[DONE]"),
]


@pytest.mark.parametrize(
    ("events", "cached"),
    [(CHAT_REFUSAL, False), (CHAT_CONTENT_FILTER, False), (CHAT_LENGTH, True)],
    ids=["refusal", "content_filter", "length"],
)
def test_chat_stream_refusal_is_not_cached_but_length_is(
    cguard: tokenguard.Guard, events: list[Any], cached: bool
) -> None:
    """A streamed refusal or content-filter stop is never stored; a stream stopped by max_tokens is."""
    api = ScriptedSSE(events)
    client = tokenguard.OpenAI(base_url=OPENAI_BASE, api_key="sk-x", guard=cguard, http_client=api.http_client())
    list(chat_stream(client))
    list(chat_stream(client))
    assert api.requests == (1 if cached else 2)


def test_responses_stream_refusal_is_not_cached(cguard: tokenguard.Guard) -> None:
    """A Responses stream carrying a refusal is never stored."""
    response = {
        "id": "resp_s",
        "object": "response",
        "created_at": 0,
        "model": OA,
        "status": "completed",
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "output": [
            {
                "type": "message",
                "id": "msg_s",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "refusal", "refusal": "I can't help."}],
            }
        ],
        "usage": {
            "input_tokens": 9,
            "output_tokens": 5,
            "total_tokens": 14,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    delta = {"item_id": "msg_s", "output_index": 0, "content_index": 0}
    events: list[tuple[str | None, Any]] = [
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": started}),
        ("response.refusal.delta", {"type": "response.refusal.delta", "sequence_number": 1, **delta, "delta": "No"}),
        ("response.completed", {"type": "response.completed", "sequence_number": 2, "response": response}),
    ]
    api = ScriptedSSE(events)
    client = tokenguard.OpenAI(base_url=OPENAI_BASE, api_key="sk-x", guard=cguard, http_client=api.http_client())
    list(client.responses.create(model=OA, input="Hi", temperature=0, stream=True))
    list(client.responses.create(model=OA, input="Hi", temperature=0, stream=True))
    assert api.requests == 2


def test_anthropic_stream_refusal_is_not_cached(cguard: tokenguard.Guard) -> None:
    """An Anthropic stream ending with stop_reason "refusal" is never stored."""
    start = {
        "id": "msg_s",
        "type": "message",
        "role": "assistant",
        "model": AN,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 1},
    }
    events: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "refusal", "stop_sequence": None},
                "usage": {"output_tokens": 5},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    api = ScriptedSSE(events)
    client = tokenguard.Anthropic(base_url=ANTHROPIC_BASE, api_key="sk-x", guard=cguard, http_client=api.http_client())
    with tokenguard.cache_control(always=True):
        with client.messages.stream(model=AN, max_tokens=100, messages=MSGS) as stream:
            assert stream.get_final_message().stop_reason == "refusal"
        list(message(client, stream=True))
    assert api.requests == 2


# -- single-flight and streams ---------------------------------------------------------------------------


def test_concurrent_identical_streams_make_one_request(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Six threads opening the same stream at once cause one request; each reads the whole answer."""
    client = slow_openai(fake, cguard)
    barrier = threading.Barrier(6)

    def read(_: int) -> str:
        barrier.wait(5)
        return chat_text(list(chat_stream(client)))

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(read, range(6)))
    assert texts == [TEXT] * 6
    assert sent(fake) == 1


def lazy_openai(fake: FakeLLM, guard: tokenguard.Guard) -> tokenguard.OpenAI:
    """A guarded OpenAI client over the fake whose response bodies are read only when the caller reads them."""
    inner = fake.transport()

    def lazy(request: httpx2.Request) -> httpx2.Response:
        answer = inner.handle_request(request)
        return httpx2.Response(answer.status_code, headers=answer.headers, content=iter([answer.read()]))

    return tokenguard.OpenAI(
        base_url=OPENAI_BASE,
        api_key="sk-fake-test-key",
        guard=guard,
        http_client=httpx2.Client(transport=httpx2.MockTransport(lazy)),
    )


def open_and_hold(client: Any, kind: str) -> Callable[[], None]:
    """Start a call whose answer stays unread (an open stream, or an unread with_streaming_response);
    return what closes it."""
    if kind == "stream":
        held = chat_stream(client)
        next(iter(held))
        return held.close
    manager = client.chat.completions.with_streaming_response.create(model=OA, messages=MSGS, temperature=0)
    manager.__enter__()
    return lambda: manager.__exit__(None, None, None)


def identical_call(client: Any, kind: str) -> str:
    """The same request as ``open_and_hold`` made, read to its end; its text."""
    if kind == "stream":
        return chat_text(list(chat_stream(client)))
    return str(chat(client).choices[0].message.content)


HELD = ["stream", "with_streaming_response"]


@pytest.mark.parametrize("kind", HELD)
def test_flight_that_never_lands_delays_others_at_most_the_wait_bound(
    fake: FakeLLM, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """An identical call waits at most the flight-wait bound for an answer held unread elsewhere, then is sent."""
    monkeypatch.setattr(_clients, "_FLIGHT_WAIT_S", 0.2)
    client = lazy_openai(fake, tokenguard.Guard(store="memory://", cache=tokenguard.Cache("memory")))
    close = open_and_hold(client, kind)
    done = threading.Event()
    got: list[str] = []

    def identical() -> None:
        got.append(identical_call(client, kind))
        done.set()

    worker = threading.Thread(target=identical, daemon=True)
    worker.start()
    try:
        finished = done.wait(2)
    finally:
        close()  # release a stuck worker either way
        worker.join(5)
    assert finished, "the identical call waited far past the flight-wait bound"
    assert got == [TEXT]


@pytest.mark.parametrize("kind", HELD)
def test_identical_call_in_the_same_thread_does_not_deadlock(fake: FakeLLM, kind: str) -> None:
    """Repeating a call in the thread that still holds the first one's unread answer does not block."""
    client = lazy_openai(fake, tokenguard.Guard(store="memory://", cache=tokenguard.Cache("memory")))
    done = threading.Event()
    got: list[str] = []
    closers: list[Callable[[], None]] = []

    def same_thread_twice() -> None:
        closers.append(open_and_hold(client, kind))
        got.append(identical_call(client, kind))
        done.set()

    worker = threading.Thread(target=same_thread_twice, daemon=True)
    worker.start()
    try:
        finished = done.wait(2)
    finally:
        deadline = time.monotonic() + 2
        while not closers and time.monotonic() < deadline:
            time.sleep(0.01)
        if closers:
            closers[0]()  # release a stuck worker
        worker.join(5)
    assert finished, "the identical call in the same thread blocked"
    assert got == [TEXT]
