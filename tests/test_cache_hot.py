"""The cache's hot path (src/tokenguard/_hot.py): a repeat of a cached ``create`` call is
answered before the SDK builds a request — and must answer exactly what the ordinary path would.

The first call is a miss, the second a hit through the ``request()`` seam (which teaches the
hot path), the third and later take the hot path. Each test checks the hot path was really
taken (the SDK's request path was not entered) where that matters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from anthropic.types import Message
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

import tokenguard
from tokenguard import _hot
from tokenguard.testing import FakeLLM, Reply

OA = "gpt-4o"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(params=["memory", "disk"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tokenguard.Cache]:
    made = tokenguard.Cache(request.param, path=tmp_path / "responses")
    yield made
    made.close()


@pytest.fixture
def guard(cache: tokenguard.Cache) -> Iterator[tokenguard.Guard]:
    made = tokenguard.Guard(store="memory://", cache=cache)
    yield made
    made.close()


class Counting:
    """Counts how often the SDK's request path is entered on a client (the hot path skips it)."""

    def __init__(self, client: Any) -> None:
        self.entered = 0
        original = client.request

        def request(*args: Any, **kwargs: Any) -> Any:
            self.entered += 1
            return original(*args, **kwargs)

        client.request = request


def chat(client: Any, **kw: Any) -> Any:
    return client.chat.completions.create(**{"model": OA, "messages": MSGS, "temperature": 0, **kw})


def sent(fake: FakeLLM) -> int:
    return len(fake.money_requests)


def test_third_call_takes_the_hot_path_and_answers_like_a_hit(guard: tokenguard.Guard) -> None:
    """Miss, hit, then hot: no HTTP request, the SDK's request path not entered, an equal
    ChatCompletion, and a cache_hit ledger row with the saving."""
    fake = FakeLLM(Reply(text="Paris.", input_tokens=1000, output_tokens=10))
    client = fake.openai(guard=guard)
    miss, hit = chat(client), chat(client)
    counting = Counting(client)
    hot = chat(client)
    assert counting.entered == 0
    assert sent(fake) == 1
    assert type(hot) is ChatCompletion
    assert hot.model_dump() == hit.model_dump() == miss.model_dump()
    assert hot.choices[0].message.content == "Paris."
    guard.flush()
    rows = list(guard.store.rows())
    assert [r.outcome for r in rows] == ["ok", "cache_hit", "cache_hit"]
    assert rows[2].cost_usd == Decimal(0)
    assert rows[2].saved_usd == rows[0].cost_usd > 0
    assert rows[2].model == rows[0].model
    stats = guard.stats()
    assert stats.cache_hits == 2
    assert stats.saved_usd == 2 * rows[0].cost_usd


def test_each_answer_is_a_private_copy(guard: tokenguard.Guard) -> None:
    """A caller mutating its answer does not change what the next repeat gets."""
    fake = FakeLLM(Reply(text="Paris."))
    client = fake.openai(guard=guard)
    chat(client), chat(client)
    first = chat(client)
    first.choices[0].message.content = "vandalised"
    first.choices.clear()
    again = chat(client)
    assert again.choices[0].message.content == "Paris."
    assert again is not first


def test_different_arguments_are_not_confused(guard: tokenguard.Guard) -> None:
    """A call differing in any argument (or in a whole-float spelling of one) is its own entry."""
    fake = FakeLLM(Reply(text="A"))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client)
    fake.queue(Reply(text="B"), Reply(text="C"), Reply(text="D"))
    assert chat(client, messages=[{"role": "user", "content": "Another question"}]).choices[0].message.content == "B"
    assert chat(client, max_tokens=5).choices[0].message.content == "C"
    assert chat(client, extra_body={"top_k": 3}).choices[0].message.content == "D"
    assert chat(client).choices[0].message.content == "A"
    assert sent(fake) == 4


def test_expired_entry_is_not_served(tmp_path: Path) -> None:
    """When the entry's TTL has passed, the hot path does not answer: the repeat goes upstream."""
    now = [1_000_000.0]
    cache = tokenguard.Cache("memory", ttl_s=60, clock=lambda: now[0])
    guard = tokenguard.Guard(store="memory://", cache=cache)
    fake = FakeLLM(Reply(text="old"))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client)
    assert sent(fake) == 1
    now[0] += 61
    fake.reply(text="new")
    assert chat(client).choices[0].message.content == "new"
    assert sent(fake) == 2


def test_cleared_cache_is_not_served(guard: tokenguard.Guard, cache: tokenguard.Cache) -> None:
    fake = FakeLLM(Reply(text="old"))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client)
    cache.clear()
    fake.reply(text="new")
    assert chat(client).choices[0].message.content == "new"
    assert sent(fake) == 2


def test_refreshed_entry_replaces_the_hot_answer(guard: tokenguard.Guard) -> None:
    """A refresh stores a new answer; the next repeat gets the new one, not the remembered one."""
    fake = FakeLLM(Reply(text="old"))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client)
    fake.reply(text="new")
    with tokenguard.cache_control(refresh=True):
        assert chat(client).choices[0].message.content == "new"
    assert chat(client).choices[0].message.content == "new"
    assert chat(client).choices[0].message.content == "new"
    assert sent(fake) == 2


def test_entry_replaced_by_another_process_is_noticed(tmp_path: Path) -> None:
    """A second Cache on the same directory (another process) stores a different answer under
    the same key: the hot path sees the stored bytes changed and does not serve its copy."""
    path = tmp_path / "shared"
    fake = FakeLLM(Reply(text="old"))
    guard = tokenguard.Guard(store="memory://", cache=tokenguard.Cache("disk", path=path))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client)
    other = tokenguard.Guard(store="memory://", cache=tokenguard.Cache("disk", path=path))
    fake.reply(text="new")
    with tokenguard.cache_control(refresh=True):
        chat(fake.openai(guard=other))
    assert chat(client).choices[0].message.content == "new"
    other.close()
    guard.close()


def test_bypass_and_refresh_blocks_skip_the_hot_path(guard: tokenguard.Guard) -> None:
    fake = FakeLLM(Reply(text="A"))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client)
    with tokenguard.cache_control(bypass=True):
        chat(client)
    assert sent(fake) == 2
    with tokenguard.cache_control(refresh=True):
        chat(client)
    assert sent(fake) == 3


def test_a_changed_api_key_is_another_tenant(guard: tokenguard.Guard) -> None:
    """Tenant isolation holds on the hot path: after the client's key changes, the repeat is
    not answered from the old key's entry."""
    fake = FakeLLM(Reply(text="A"))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client)
    client.api_key = "sk-someone-else"
    chat(client)
    assert sent(fake) == 2
    assert fake.money_requests[-1].headers["authorization"] == "Bearer sk-someone-else"


def test_another_guard_does_not_see_this_guards_answers(cache: tokenguard.Cache) -> None:
    """The hot path belongs to the guard's cache: a client reporting to the default guard is
    not answered from memory once the default guard (and its cache) changed."""
    fake = FakeLLM(Reply(text="A"))
    cached = tokenguard.Guard(store="memory://", cache=cache)
    uncached = tokenguard.Guard(store="memory://", cache=tokenguard.Cache("memory"))
    client = fake.openai()  # the default guard
    previous = tokenguard.set_default_guard(cached)
    try:
        for _ in range(3):
            chat(client)
        assert sent(fake) == 1
        tokenguard.set_default_guard(uncached)
        chat(client)
        assert sent(fake) == 2
    finally:
        tokenguard.set_default_guard(previous)
        cached.close()
        uncached.close()


def test_arguments_that_are_not_plain_json_take_the_ordinary_path(guard: tokenguard.Guard) -> None:
    """A timeout object or a tuple of messages: still answered from the cache (by the ordinary
    path), never mistaken for another call."""
    fake = FakeLLM(Reply(text="A"))
    client = fake.openai(guard=guard)
    for _ in range(4):
        reply = chat(client, timeout=httpx2.Timeout(5.0))
    assert reply.choices[0].message.content == "A"
    assert sent(fake) == 1
    counting = Counting(client)
    chat(client, timeout=httpx2.Timeout(5.0))
    assert counting.entered == 1  # the ordinary path answered it


def test_raw_and_streaming_responses_after_hot_repeats(guard: tokenguard.Guard) -> None:
    """with_raw_response and stream=True keep their own types after the hot path has learned
    the call."""
    fake = FakeLLM(Reply(text="A"))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client)
    raw = client.chat.completions.with_raw_response.create(model=OA, messages=MSGS, temperature=0)
    assert raw.headers.get("x-tokenguard-cache") == "hit"
    assert type(raw.parse()) is ChatCompletion
    stream = chat(client, stream=True)
    assert isinstance(stream, openai.Stream)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "A"


def test_uncacheable_requests_never_take_the_hot_path(guard: tokenguard.Guard) -> None:
    fake = FakeLLM(Reply(text="A"))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client, temperature=0.7)
    assert sent(fake) == 3


def test_every_plain_create_method_has_a_hot_path(guard: tokenguard.Guard) -> None:
    """responses, embeddings, legacy completions and (with cache_all) anthropic messages."""
    fake = FakeLLM(Reply(text="A"))
    oa = fake.openai(guard=guard)
    calls: list[tuple[Any, Any, type]] = [
        (oa, lambda: oa.responses.create(model=OA, input="hi", temperature=0), Response),
        (oa, lambda: oa.embeddings.create(model="text-embedding-3-small", input="hi"), CreateEmbeddingResponse),
        (oa, lambda: oa.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", temperature=0), None),
    ]
    all_guard = tokenguard.Guard(store="memory://", cache=tokenguard.Cache("memory", cache_all=True))
    an = fake.anthropic(guard=all_guard)
    calls.append((an, lambda: an.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MSGS), Message))
    for client, call, kind in calls:
        before = sent(fake)
        first, second = call(), call()
        counting = Counting(client)
        third = call()
        assert counting.entered == 0, call
        assert sent(fake) == before + 1
        assert third.model_dump() == second.model_dump() == first.model_dump()
        if kind is not None:
            assert type(third) is kind
    all_guard.close()


def test_copies_and_wrapped_clients_have_their_own_hot_path(guard: tokenguard.Guard) -> None:
    fake = FakeLLM(Reply(text="A"))
    client = fake.openai(guard=guard)
    for _ in range(3):
        chat(client)
    copy = client.with_options(timeout=30)
    wrapped = tokenguard.wrap(fake.vendor_openai(), guard=guard)
    for other in (copy, wrapped):
        for _ in range(3):
            assert chat(other).choices[0].message.content == "A"
        counting = Counting(other)
        chat(other)
        assert counting.entered == 0
    assert sent(fake) == 1


def test_the_hot_memory_is_bounded(guard: tokenguard.Guard, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_hot, "_MAX_ENTRIES", 4)
    fake = FakeLLM(Reply(text="A"))
    client = fake.openai(guard=guard)
    for i in range(10):
        for _ in range(2):
            chat(client, seed=i)
    assert len(client._tg_hot._known) == 4


async def test_async_hot_path(guard: tokenguard.Guard) -> None:
    fake = FakeLLM(Reply(text="A"))
    client = fake.openai(guard=guard, async_=True)
    results = [await chat(client) for _ in range(2)]
    counting = Counting(client)

    async def request(*args: Any, **kwargs: Any) -> Any:
        counting.entered += 1
        raise AssertionError("the hot path should have answered")

    client.request = request
    results.append(await chat(client))
    assert counting.entered == 0
    assert type(results[2]) is ChatCompletion
    assert results[2].model_dump() == results[0].model_dump()
    assert sent(fake) == 1
    # tasks at once, all hot
    many = await asyncio.gather(*(chat(client) for _ in range(20)))
    assert {m.choices[0].message.content for m in many} == {"A"}
    guard.flush()
    assert guard.stats().cache_hits == 22
