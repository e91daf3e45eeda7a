"""The response cache (issue 4): keys, backends, overrides, what is never cached, single-flight,
accounting of hits, harmless failure and the security of the cache directory.

Streams are in test_cache_streams.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import diskcache
import httpx2
import openai
import platformdirs
import pytest

import tokenguard
from tokenguard import _cache
from tokenguard.testing import FakeLLM, Reply

OA = "gpt-4o"
AN = "claude-haiku-4-5"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]
OPENAI_BASE = "http://fake-openai.test/v1"
ANTHROPIC_BASE = "http://fake-anthropic.test"
BACKENDS = ["memory", "disk"]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# -- helpers ---------------------------------------------------------------------------------------


def make_cache(kind: str, tmp_path: Path, **kw: Any) -> tokenguard.Cache:
    if kind == "memory":
        return tokenguard.Cache("memory", **kw)
    return tokenguard.Cache("disk", path=tmp_path / "responses", **kw)


@pytest.fixture(params=BACKENDS)
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tokenguard.Cache]:
    """A response cache, once in memory and once on disk (under tmp_path)."""
    made = make_cache(request.param, tmp_path)
    yield made
    made.close()


@pytest.fixture
def cguard(cache: tokenguard.Cache) -> tokenguard.Guard:
    """A guard with an in-memory ledger and the parametrized response cache."""
    return tokenguard.Guard(store="memory://", cache=cache, retry=False)


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


def stored_keys(cache: tokenguard.Cache) -> list[str]:
    """The keys the cache's backend holds right now."""
    store: Any = cache._store
    if isinstance(store, _cache._MemoryBackend):
        return list(store._data)
    return [str(k) for k in store._cache.iterkeys()]


def tokenguard_warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "tokenguard" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


class Scripted:
    """A minimal fake API answering every money request with one fixed JSON body, counting requests."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.requests: list[Any] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(json.loads(request.content) if request.content else None)
        return httpx2.Response(200, json=self.payload)

    def openai(self, guard: tokenguard.Guard) -> tokenguard.OpenAI:
        return tokenguard.OpenAI(
            base_url=OPENAI_BASE,
            api_key="sk-scripted",
            guard=guard,
            http_client=httpx2.Client(transport=httpx2.MockTransport(self.handle)),
        )

    def anthropic(self, guard: tokenguard.Guard) -> tokenguard.Anthropic:
        return tokenguard.Anthropic(
            base_url=ANTHROPIC_BASE,
            api_key="sk-ant-scripted",
            guard=guard,
            http_client=httpx2.Client(transport=httpx2.MockTransport(self.handle)),
        )


USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def chat_payload(*, content: str | None = "Paris.", refusal: str | None = None, finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 0,
        "model": OA,
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "logprobs": None,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
            }
        ],
        "usage": USAGE,
    }


def responses_payload(content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "resp_scripted",
        "object": "response",
        "created_at": 0,
        "model": OA,
        "status": "completed",
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "output": [{"type": "message", "id": "msg_s", "status": "completed", "role": "assistant", "content": content}],
        "usage": {
            "input_tokens": 9,
            "output_tokens": 5,
            "total_tokens": 14,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def anthropic_payload(stop_reason: str) -> dict[str, Any]:
    return {
        "id": "msg_scripted",
        "type": "message",
        "role": "assistant",
        "model": AN,
        "content": [],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 5},
    }


# -- 1. hits ---------------------------------------------------------------------------------------


def test_repeat_deterministic_chat_is_answered_from_cache(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A repeated temperature=0 chat call is answered without a second request, with an equal result."""
    client = fake.openai(guard=cguard)
    first = chat(client)
    second = chat(client)
    assert sent(fake) == 1
    assert second.model_dump() == first.model_dump()
    assert second.choices[0].message.content == "Hello from the fake LLM!"


OPENAI_KINDS: dict[str, Callable[[Any], Any]] = {
    "chat": lambda c: chat(c),
    "chat-seed": lambda c: c.chat.completions.create(model=OA, messages=MSGS, seed=7),
    "responses": lambda c: c.responses.create(model=OA, input="Hi", temperature=0),
    "embeddings": lambda c: c.embeddings.create(model="text-embedding-3-small", input=["a", "b"]),
    "completions": lambda c: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", temperature=0),
}


@pytest.mark.parametrize("kind", list(OPENAI_KINDS))
def test_openai_hit_returns_the_vendor_type(fake: FakeLLM, cguard: tokenguard.Guard, kind: str) -> None:
    """An OpenAI hit is the same SDK type with the same content as the live answer."""
    client = fake.openai(guard=cguard)
    live = OPENAI_KINDS[kind](client)
    hit = OPENAI_KINDS[kind](client)
    assert sent(fake) == 1
    assert type(hit) is type(live)
    assert hit.model_dump() == live.model_dump()


def test_anthropic_hit_returns_a_message(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """An Anthropic hit (cache_control(always=True)) is an anthropic Message equal to the live one."""
    client = fake.anthropic(guard=cguard)
    with tokenguard.cache_control(always=True):
        live = message(client)
        hit = message(client)
    assert sent(fake) == 1
    assert isinstance(hit, anthropic.types.Message)
    assert hit.model_dump() == live.model_dump()


def test_raw_response_hit_is_marked_and_parses(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """with_raw_response on a hit gives the SDK's raw response, marked as a hit, that parses to the vendor type."""
    client = fake.openai(guard=cguard)
    live = client.chat.completions.with_raw_response.create(model=OA, messages=MSGS, temperature=0)
    hit = client.chat.completions.with_raw_response.create(model=OA, messages=MSGS, temperature=0)
    assert sent(fake) == 1
    assert live.headers.get("x-tokenguard-cache") is None
    assert hit.headers.get("x-tokenguard-cache") == "hit"
    assert type(hit) is type(live)
    assert hit.parse().model_dump() == live.parse().model_dump()


def test_parse_helper_hit_returns_the_parsed_model(cguard: tokenguard.Guard) -> None:
    """chat.completions.parse() on a hit gives a ParsedChatCompletion with the same parsed object."""
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        city: str

    api = Scripted(chat_payload(content='{"city": "Paris"}'))
    client = api.openai(cguard)
    live = client.chat.completions.parse(model=OA, messages=MSGS, temperature=0, response_format=City)
    hit = client.chat.completions.parse(model=OA, messages=MSGS, temperature=0, response_format=City)
    assert len(api.requests) == 1
    assert type(hit) is type(live)
    assert hit.choices[0].message.parsed == City(city="Paris")


def test_azure_hit_and_api_version_in_the_key(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Azure calls are cached, and another api-version (a query parameter) is another key."""
    first = fake.openai(guard=cguard, azure=True)
    chat(first)
    chat(first)
    assert sent(fake) == 1
    chat(fake.openai(guard=cguard, azure=True, api_version="2025-01-01-preview"))
    assert sent(fake) == 2


async def test_async_openai_hit(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """An AsyncOpenAI repeat is answered from the cache as a ChatCompletion."""
    client = fake.openai(guard=cguard, async_=True)
    live = await chat(client)
    hit = await chat(client)
    assert sent(fake) == 1
    assert isinstance(hit, openai.types.chat.ChatCompletion)
    assert hit.model_dump() == live.model_dump()


def test_nondeterministic_openai_call_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A chat call without temperature=0 or a seed is sent every time."""
    client = fake.openai(guard=cguard)
    client.chat.completions.create(model=OA, messages=MSGS)
    client.chat.completions.create(model=OA, messages=MSGS)
    chat(client, temperature=0.7)
    chat(client, temperature=0.7)
    assert sent(fake) == 4
    assert stored_keys(cguard.cache) == []  # type: ignore[arg-type]


def test_anthropic_is_not_cached_by_default(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Anthropic calls (no temperature/seed to ask for repeatability) are sent every time by default."""
    client = fake.anthropic(guard=cguard)
    message(client)
    message(client)
    assert sent(fake) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_all_caches_anthropic_and_nondeterministic_calls(fake: FakeLLM, tmp_path: Path, backend: str) -> None:
    """Cache(cache_all=True) caches calls that do not ask for a repeatable answer."""
    cache = make_cache(backend, tmp_path, cache_all=True)
    guard = tokenguard.Guard(store="memory://", cache=cache)
    message(fake.anthropic(guard=guard))
    message(fake.anthropic(guard=guard))
    fake.openai(guard=guard).chat.completions.create(model=OA, messages=MSGS)
    fake.openai(guard=guard).chat.completions.create(model=OA, messages=MSGS)
    assert sent(fake) == 2
    cache.close()


def test_guard_without_cache_sends_every_call(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Guard(cache=False), the default, never answers from a cache."""
    client = fake.openai(guard=guard)
    chat(client)
    chat(client)
    assert guard.cache is None
    assert sent(fake) == 2


def test_guard_cache_true_uses_disk_in_user_cache_dir(
    fake: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard(cache=True) opens a disk cache in the user cache directory and serves hits from it."""
    monkeypatch.setattr(platformdirs, "user_cache_path", lambda *a, **k: tmp_path / "user-cache")
    guard = tokenguard.Guard(store="memory://", cache=True)
    assert guard.cache is not None
    assert guard.cache.backend_name == "disk"
    assert guard.cache.path == tmp_path / "user-cache" / "responses"
    client = fake.openai(guard=guard)
    chat(client)
    chat(client)
    assert sent(fake) == 1
    assert (tmp_path / "user-cache" / "responses" / "cache.db").exists()
    guard.cache.close()


def test_disk_cache_is_shared_by_two_cache_objects_on_one_directory(fake: FakeLLM, tmp_path: Path) -> None:
    """An entry written by one disk Cache is served by another opened on the same directory (another process)."""
    first = make_cache("disk", tmp_path)
    chat(fake.openai(guard=tokenguard.Guard(store="memory://", cache=first)))
    second = make_cache("disk", tmp_path)
    chat(fake.openai(guard=tokenguard.Guard(store="memory://", cache=second)))
    assert sent(fake) == 1
    first.close()
    second.close()


@pytest.mark.parametrize(
    ("kw", "error_name"),
    [
        ({"backend": "nosql"}, "Cache.backend"),
        ({"backend": "redis://localhost:6379/0?timeout=soon"}, "Cache.backend"),
        ({"backend": "memory", "ttl_s": 0}, "Cache.ttl_s"),
        ({"backend": "memory", "max_entry_kb": -1}, "Cache.max_entry_kb"),
        ({"backend": "memory", "max_size_mb": True}, "Cache.max_size_mb"),
    ],
)
def test_cache_rejects_bad_configuration(kw: dict[str, Any], error_name: str) -> None:
    """Cache(...) refuses an unknown backend, the unreleased Redis one, and non-positive limits."""
    with pytest.raises(tokenguard.ConfigurationError, match=error_name.replace(".", r"\.")):
        tokenguard.Cache(**kw)


def test_guard_rejects_a_non_cache_value() -> None:
    """Guard(cache=...) takes only True, False or a Cache."""
    with pytest.raises(tokenguard.ConfigurationError, match="cache"):
        tokenguard.Guard(store="memory://", cache="memory")  # type: ignore[arg-type]


def test_redis_url_error_does_not_echo_credentials() -> None:
    """Neither an error about a Redis cache URL nor the cache's repr repeats a password from it."""
    with pytest.raises(tokenguard.ConfigurationError) as info:
        tokenguard.Cache("redis://user:hunter2@localhost:6379/0?timeout=soon")
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(tokenguard.Cache("redis://user:hunter2@localhost:6379/0"))


# -- 2. the key --------------------------------------------------------------------------------------

# (base fields, variant fields): the variant differs from the base in one semantic parameter
SEMANTIC_OPENAI: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "messages": ({}, {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]}),
    "message-role": ({}, {"messages": [{"role": "system", "content": MSGS[0]["content"]}]}),
    "model": ({}, {"model": "gpt-4o-mini"}),
    "tools": ({}, {"tools": [TOOL]}),
    "tool_choice": ({"tools": [TOOL], "tool_choice": "auto"}, {"tools": [TOOL], "tool_choice": "required"}),
    "response_format": ({}, {"response_format": {"type": "json_object"}}),
    "temperature": ({"seed": 1, "temperature": 0.2}, {"seed": 1, "temperature": 0.9}),
    "seed": ({"seed": 1}, {"seed": 2}),
    "max_tokens": ({"max_tokens": 50}, {"max_tokens": 60}),
    "max_completion_tokens": ({}, {"max_completion_tokens": 60}),
    "top_p": ({}, {"top_p": 0.5}),
    "stop": ({}, {"stop": ["\n"]}),
    "n": ({}, {"n": 2}),
    "logprobs": ({}, {"logprobs": True}),
    "reasoning_effort": ({}, {"reasoning_effort": "low"}),
    "extra_body-new-field": ({}, {"extra_body": {"future_knob": 1}}),
    "extra_body-value": ({"extra_body": {"future_knob": 1}}, {"extra_body": {"future_knob": 2}}),
}


@pytest.mark.parametrize("case", list(SEMANTIC_OPENAI))
def test_semantic_openai_parameter_changes_the_key(fake: FakeLLM, cguard: tokenguard.Guard, case: str) -> None:
    """Changing a parameter that can change the answer misses the cache (and both versions are cached)."""
    base, variant = SEMANTIC_OPENAI[case]
    client = fake.openai(guard=cguard)
    chat(client, **base)
    chat(client, **base)
    assert sent(fake) == 1
    chat(client, **variant)
    assert sent(fake) == 2
    chat(client, **variant)
    assert sent(fake) == 2


def test_extra_query_parameter_changes_the_key(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """An unknown query parameter (extra_query) is part of the request, so it is part of the key."""
    client = fake.openai(guard=cguard)
    chat(client)
    chat(client, extra_query={"future_knob": "1"})
    assert sent(fake) == 2


def test_semantic_header_changes_the_key(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """An anthropic-beta header (it can change the answer) is part of the key."""
    client = fake.anthropic(guard=cguard)
    with tokenguard.cache_control(always=True):
        message(client)
        message(client, extra_headers={"anthropic-beta": "some-beta-2025-01-01"})
        message(client, extra_headers={"anthropic-beta": "some-beta-2025-01-01"})
    assert sent(fake) == 2


@pytest.mark.parametrize(
    ("base", "variant"),
    [
        ({"system": "You are terse."}, {"system": "You are verbose."}),
        ({}, {"messages": [{"role": "user", "content": "What is the capital of Spain?"}]}),
        ({}, {"model": "claude-sonnet-4-6"}),
        ({}, {"max_tokens": 101}),
        ({}, {"stop_sequences": ["END"]}),
        ({}, {"tools": [{"name": "t", "description": "d", "input_schema": {"type": "object"}}]}),
        ({}, {"extra_body": {"future_knob": True}}),
    ],
    ids=["system", "messages", "model", "max_tokens", "stop_sequences", "tools", "extra_body"],
)
def test_semantic_anthropic_parameter_changes_the_key(
    fake: FakeLLM, cguard: tokenguard.Guard, base: dict[str, Any], variant: dict[str, Any]
) -> None:
    """Changing an Anthropic parameter that can change the answer misses the cache."""
    client = fake.anthropic(guard=cguard)
    with tokenguard.cache_control(always=True):
        message(client, **base)
        message(client, **base)
        assert sent(fake) == 1
        message(client, **variant)
        assert sent(fake) == 2


NON_SEMANTIC_OPENAI: dict[str, Callable[[Any], Any]] = {
    "with_options-timeout": lambda c: chat(c.with_options(timeout=12.5)),
    "timeout-kwarg": lambda c: chat(c, timeout=7),
    "user": lambda c: chat(c, user="alice"),
    "metadata": lambda c: chat(c, metadata={"run": "42"}),
    "service_tier": lambda c: chat(c, service_tier="auto"),
    "store": lambda c: chat(c, store=True),
    "safety_identifier": lambda c: chat(c, safety_identifier="user-hash"),
    "prompt_cache_key": lambda c: chat(c, prompt_cache_key="k1"),
    "x-stainless-header": lambda c: chat(c, extra_headers={"x-stainless-foo": "bar"}),
    "max_retries": lambda c: chat(c.with_options(max_retries=3)),
}


@pytest.mark.parametrize("case", list(NON_SEMANTIC_OPENAI))
def test_non_semantic_openai_parameter_keeps_the_key(fake: FakeLLM, cguard: tokenguard.Guard, case: str) -> None:
    """A parameter that cannot change the answer still hits the entry stored without it."""
    client = fake.openai(guard=cguard)
    first = chat(client)
    hit = NON_SEMANTIC_OPENAI[case](client)
    assert sent(fake) == 1
    assert hit.model_dump() == first.model_dump()


def test_anthropic_metadata_and_timeout_keep_the_key(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Anthropic metadata, a timeout and x-stainless headers do not change the key."""
    client = fake.anthropic(guard=cguard)
    with tokenguard.cache_control(always=True):
        message(client)
        message(client, metadata={"user_id": "u-1"})
        message(client.with_options(timeout=9))
        message(client, extra_headers={"x-stainless-retry-count": "1"})
    assert sent(fake) == 1


def test_dict_key_order_does_not_change_the_key(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """The same messages and tool schema with their dict keys in another order hit the same entry."""
    client = fake.openai(guard=cguard)
    chat(client, messages=[{"role": "user", "content": "Hi"}], tools=[TOOL])
    reordered_tool = {
        "function": {
            "parameters": {"required": ["city"], "properties": {"city": {"type": "string"}}, "type": "object"},
            "description": "The weather in a city.",
            "name": "get_weather",
        },
        "type": "function",
    }
    chat(client, messages=[{"content": "Hi", "role": "user"}], tools=[reordered_tool])
    assert sent(fake) == 1


def test_temperature_zero_int_and_float_share_an_entry(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """temperature=0 and temperature=0.0 are the same JSON number, so the same canonical request."""
    client = fake.openai(guard=cguard)
    chat(client, temperature=0)
    chat(client, temperature=0.0)
    assert sent(fake) == 1


def test_stream_and_non_stream_do_not_share(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A streamed request is not answered by a non-streamed entry (nor the reverse)."""
    client = fake.openai(guard=cguard)
    chat(client)
    stream = chat(client, stream=True, stream_options={"include_usage": True})
    assert isinstance(stream, openai.Stream)
    list(stream)
    assert sent(fake) == 2


def test_different_base_url_does_not_share(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """The same request to another base URL (another deployment or proxy) is a different key."""
    chat(fake.openai(guard=cguard))
    chat(fake.openai(guard=cguard, base_url="http://other-proxy.test/v1"))
    chat(fake.openai(guard=cguard, base_url="http://fake-openai.test/v1/"))  # a trailing slash is the same URL
    assert sent(fake) == 2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"api_key": "sk-tenant-a"}, {"api_key": "sk-tenant-b"}),
        ({"organization": "org-a"}, {"organization": "org-b"}),
        ({"project": "proj_a"}, {"project": "proj_b"}),
    ],
    ids=["api_key", "organization", "project"],
)
def test_entries_are_not_shared_across_credentials(
    fake: FakeLLM, cguard: tokenguard.Guard, first: dict[str, str], second: dict[str, str]
) -> None:
    """Clients with different API keys / organizations / projects do not share entries."""
    a = fake.openai(guard=cguard, **first)
    b = fake.openai(guard=cguard, **second)
    chat(a)
    chat(b)
    assert sent(fake) == 2
    chat(a)
    chat(b)
    assert sent(fake) == 2


def test_anthropic_entries_are_not_shared_across_api_keys(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Two Anthropic clients with different API keys do not share entries."""
    with tokenguard.cache_control(always=True):
        message(fake.anthropic(guard=cguard, api_key="sk-ant-a"))
        message(fake.anthropic(guard=cguard, api_key="sk-ant-b"))
    assert sent(fake) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_share_across_keys_shares_entries(fake: FakeLLM, tmp_path: Path, backend: str) -> None:
    """Cache(share_across_keys=True) serves one key's entry to another key and organization."""
    cache = make_cache(backend, tmp_path, share_across_keys=True)
    guard = tokenguard.Guard(store="memory://", cache=cache)
    chat(fake.openai(guard=guard, api_key="sk-tenant-a", organization="org-a"))
    hit = chat(fake.openai(guard=guard, api_key="sk-tenant-b", organization="org-b"))
    assert sent(fake) == 1
    assert hit.choices[0].message.content == "Hello from the fake LLM!"
    cache.close()


def test_cache_key_ignores_dict_order_and_includes_schema_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """cache_key(): key order is irrelevant, every input matters, and the key-schema version is in it."""
    base: dict[str, Any] = {
        "vendor": "openai",
        "base_url": OPENAI_BASE,
        "method": "post",
        "url": "/chat/completions",
        "body": {"model": OA, "messages": MSGS, "temperature": 0},
        "headers": {},
        "tenant": "t1",
    }
    key = _cache.cache_key(**base)
    assert len(key) == 64
    assert _cache.cache_key(**{**base, "body": {"temperature": 0, "messages": MSGS, "model": OA}}) == key
    for field, other in [("vendor", "anthropic"), ("url", "/responses"), ("tenant", "t2"), ("base_url", "http://x")]:
        assert _cache.cache_key(**{**base, field: other}) != key, field
    monkeypatch.setattr(_cache, "KEY_SCHEMA", _cache.KEY_SCHEMA + 1)
    assert _cache.cache_key(**base) != key


def test_tenant_fingerprint_is_not_the_key() -> None:
    """The tenant fingerprint differs per credential and does not contain the credential."""
    one = _cache.tenant_of("sk-secret-one", "org-1")
    assert one != _cache.tenant_of("sk-secret-two", "org-1")
    assert one != _cache.tenant_of("sk-secret-one", "org-2")
    assert "sk-secret-one" not in one
    assert "secret" not in one


# -- 3. backends: bounds, TTL, JSON values --------------------------------------------------------------


def test_memory_backend_evicts_least_recently_used() -> None:
    """The memory backend keeps within max_size_mb by dropping the least recently used entry."""
    store = _cache._MemoryBackend(max_bytes=250, clock=lambda: 0.0)
    store.set("a", b"x" * 100, 60)
    store.set("b", b"y" * 100, 60)
    assert store.get("a") == b"x" * 100  # a is now the most recently used
    store.set("c", b"z" * 100, 60)
    assert store.get("b") is None
    assert store.get("a") == b"x" * 100
    assert store.get("c") == b"z" * 100


def test_memory_cache_size_bound_through_a_guard(fake: FakeLLM) -> None:
    """A memory cache too small for two entries keeps only the most recent one."""
    probe = tokenguard.Cache("memory")
    chat(fake.openai(guard=tokenguard.Guard(store="memory://", cache=probe)))
    entry_size = len(probe._store._data[stored_keys(probe)[0]][0])  # type: ignore[union-attr]
    cache = tokenguard.Cache("memory", max_size_mb=(entry_size * 1.5) / (1024 * 1024))
    client = fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache))
    chat(client, seed=1)
    chat(client, seed=2)
    assert len(stored_keys(cache)) == 1
    before = sent(fake)
    chat(client, seed=2)
    assert sent(fake) == before
    chat(client, seed=1)
    assert sent(fake) == before + 1


def test_disk_cache_stays_within_max_size_mb(tmp_path: Path) -> None:
    """The disk backend evicts the least recently stored entries to stay within max_size_mb
    (reads do not reorder: a read must not be a write transaction)."""
    cache = tokenguard.Cache("disk", path=tmp_path / "c", max_size_mb=1)
    disk: Any = cache._store

    def save(i: int) -> None:
        body = os.urandom(40 * 1024)  # incompressible: ~55 kB stored each
        cache.save(f"key-{i}", _cache.CacheEntry(200, "application/json", body, tokenguard.Usage(), None, OA, 0.0))

    for i in range(12):
        save(i)
    assert cache.lookup("key-0") is not None
    for i in range(12, 60):  # ~3 MB in all
        save(i)
        assert cache.lookup("key-0") is not None or i >= 18  # the oldest goes once ~1 MB is exceeded
    kept = stored_keys(cache)
    assert "key-59" in kept
    assert len(kept) < 30
    assert "key-0" not in kept  # read often, but stored first
    assert "key-1" not in kept
    assert disk._cache.volume() <= 1024 * 1024
    cache.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_entry_larger_than_max_entry_kb_is_not_stored(fake: FakeLLM, tmp_path: Path, backend: str) -> None:
    """A response bigger than max_entry_kb is returned but not stored; a small one is."""
    cache = make_cache(backend, tmp_path, max_entry_kb=2)
    client = fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache))
    fake.queue(Reply(text="x" * 4096), Reply(text="x" * 4096))
    big = chat(client, seed=1)
    assert big.choices[0].message.content == "x" * 4096
    chat(client, seed=1)
    assert sent(fake) == 2
    chat(client, seed=2)
    chat(client, seed=2)
    assert sent(fake) == 3
    cache.close()


def test_memory_ttl_uses_the_injected_clock(fake: FakeLLM) -> None:
    """A memory entry is served until ttl_s passes on Cache(clock=...), then the call is sent again."""
    now = [1_000.0]
    cache = tokenguard.Cache("memory", ttl_s=60, clock=lambda: now[0])
    client = fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache))
    chat(client)
    now[0] += 59
    chat(client)
    assert sent(fake) == 1
    now[0] += 2
    chat(client)
    assert sent(fake) == 2
    chat(client)
    assert sent(fake) == 2


def test_disk_ttl_expires(fake: FakeLLM, tmp_path: Path) -> None:
    """A disk entry expires after ttl_s of real time."""
    cache = tokenguard.Cache("disk", path=tmp_path / "c", ttl_s=0.3)
    client = fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache))
    chat(client)
    chat(client)
    assert sent(fake) == 1
    time.sleep(0.4)
    chat(client)
    assert sent(fake) == 2
    cache.close()


def test_cache_control_ttl_overrides_the_cache_ttl(fake: FakeLLM) -> None:
    """cache_control(ttl_s=...) sets how long the entries stored inside the block live."""
    now = [1_000.0]
    cache = tokenguard.Cache("memory", ttl_s=3_600, clock=lambda: now[0])
    client = fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache))
    with tokenguard.cache_control(ttl_s=10):
        chat(client)
    chat(client, seed=1)
    now[0] += 11
    chat(client)
    assert sent(fake) == 3
    chat(client, seed=1)
    assert sent(fake) == 3


def test_cache_control_ttl_on_disk(fake: FakeLLM, tmp_path: Path) -> None:
    """cache_control(ttl_s=...) applies to the disk backend too."""
    cache = tokenguard.Cache("disk", path=tmp_path / "c", ttl_s=3_600)
    client = fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache))
    with tokenguard.cache_control(ttl_s=0.3):
        chat(client)
    time.sleep(0.4)
    chat(client)
    assert sent(fake) == 2
    cache.close()


@pytest.mark.parametrize("ttl", [0, -1, True, "10"])
def test_cache_control_rejects_a_bad_ttl(ttl: Any) -> None:
    """cache_control(ttl_s=...) takes only a positive number of seconds."""
    with pytest.raises(tokenguard.ConfigurationError, match="ttl_s"):  # noqa: SIM117
        with tokenguard.cache_control(ttl_s=ttl):
            pass


def test_disk_entries_are_json_not_pickle(fake: FakeLLM, tmp_path: Path) -> None:
    """Every row diskcache holds has a str key and a bytes value that decodes as a tokenguard JSON entry."""
    cache = tokenguard.Cache("disk", path=tmp_path / "c")
    guard = tokenguard.Guard(store="memory://", cache=cache)
    client = fake.openai(guard=guard)
    chat(client)
    client.embeddings.create(model="text-embedding-3-small", input="hi")
    with tokenguard.cache_control(always=True):
        message(fake.anthropic(guard=guard))
    cache.close()
    db = sqlite3.connect(tmp_path / "c" / "cache.db")
    try:
        found = db.execute("SELECT key, raw, mode, filename, value FROM Cache").fetchall()
    finally:
        db.close()
    assert len(found) == 3
    for key, raw, mode, filename, value in found:
        assert raw == 1
        assert isinstance(key, str)
        assert mode != diskcache.core.MODE_PICKLE
        data = (tmp_path / "c" / filename).read_bytes() if filename else value
        doc = json.loads(_cache.unpack(data))
        assert doc["v"] == _cache.KEY_SCHEMA
        entry = _cache.CacheEntry.from_json(data)
        assert entry.status == 200
        assert entry.cost_usd is not None


def test_cache_entry_round_trips() -> None:
    """CacheEntry survives to_json/from_json exactly, and from_json refuses another schema version."""
    entry = _cache.CacheEntry(
        200, "application/json", b'{"a": 1}', tokenguard.Usage(10, 5, 2, 1, 0, 3), Decimal("0.0001234"), OA, 12.5
    )
    assert _cache.CacheEntry.from_json(entry.to_json()) == entry
    other = zlib.compress(json.dumps({"v": _cache.KEY_SCHEMA + 1}).encode())
    with pytest.raises(ValueError, match="version"):
        _cache.CacheEntry.from_json(other)


def test_clear_drops_every_entry(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Cache.clear() empties the cache, so the next call is sent."""
    client = fake.openai(guard=cguard)
    chat(client)
    assert cguard.cache is not None
    cguard.cache.clear()
    assert stored_keys(cguard.cache) == []
    chat(client)
    assert sent(fake) == 2


# -- 4. never cached: errors, refusals; overrides -------------------------------------------------------


@pytest.mark.parametrize("status", [400, 429, 500])
def test_errors_are_not_cached(fake: FakeLLM, cguard: tokenguard.Guard, status: int) -> None:
    """An error answer is raised, never stored: the next identical call is sent and then cached."""
    client = fake.openai(guard=cguard)
    fake.fail(status)
    with pytest.raises(openai.APIStatusError) as info:
        chat(client)
    assert info.value.status_code == status
    ok = chat(client)
    assert ok.choices[0].message.content == "Hello from the fake LLM!"
    chat(client)
    assert sent(fake) == 2


def test_transport_error_is_not_cached(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A connection failure is raised and not stored."""
    client = fake.openai(guard=cguard)
    fake.queue(httpx2.ConnectError("boom"))
    with pytest.raises(openai.APIConnectionError):
        chat(client)
    chat(client)
    chat(client)
    assert sent(fake) == 2


@pytest.mark.parametrize(
    "payload",
    [
        chat_payload(content=None, refusal="I can't help with that."),
        chat_payload(content="The answer is", finish="content_filter"),
    ],
    ids=["message.refusal", "content_filter"],
)
def test_openai_chat_refusals_are_not_cached(cguard: tokenguard.Guard, payload: dict[str, Any]) -> None:
    """A refusal or content-filtered chat answer is returned but never stored."""
    api = Scripted(payload)
    client = api.openai(cguard)
    first = chat(client)
    assert first.choices[0].finish_reason == payload["choices"][0]["finish_reason"]
    chat(client)
    assert len(api.requests) == 2
    assert stored_keys(cguard.cache) == []  # type: ignore[arg-type]


def test_openai_responses_refusal_is_not_cached(cguard: tokenguard.Guard) -> None:
    """A Responses answer with a refusal content part is never stored."""
    api = Scripted(responses_payload([{"type": "refusal", "refusal": "I can't help with that."}]))
    client = api.openai(cguard)
    client.responses.create(model=OA, input="Hi", temperature=0)
    client.responses.create(model=OA, input="Hi", temperature=0)
    assert len(api.requests) == 2


def test_anthropic_refusal_is_not_cached(cguard: tokenguard.Guard) -> None:
    """An Anthropic message with stop_reason "refusal" is never stored."""
    api = Scripted(anthropic_payload("refusal"))
    client = api.anthropic(cguard)
    with tokenguard.cache_control(always=True):
        assert message(client).stop_reason == "refusal"
        message(client)
    assert len(api.requests) == 2


def test_finish_reason_length_is_cached(cguard: tokenguard.Guard) -> None:
    """A chat answer that stopped at max_tokens (finish_reason "length") is complete, so it is cached."""
    api = Scripted(chat_payload(content="Paris is the", finish="length"))
    client = api.openai(cguard)
    chat(client, max_tokens=3)
    hit = chat(client, max_tokens=3)
    assert len(api.requests) == 1
    assert hit.choices[0].finish_reason == "length"


def test_anthropic_max_tokens_stop_is_cached(cguard: tokenguard.Guard) -> None:
    """An Anthropic message that stopped at max_tokens is complete, so it is cached."""
    api = Scripted(anthropic_payload("max_tokens"))
    client = api.anthropic(cguard)
    with tokenguard.cache_control(always=True):
        message(client)
        assert message(client).stop_reason == "max_tokens"
    assert len(api.requests) == 1


def test_bypass_neither_reads_nor_writes(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """cache_control(bypass=True): the call is sent even with an entry, and its answer is not stored."""
    client = fake.openai(guard=cguard)
    with tokenguard.cache_control(bypass=True):
        chat(client, seed=1)
    assert stored_keys(cguard.cache) == []  # type: ignore[arg-type]
    chat(client)
    with tokenguard.cache_control(bypass=True):
        chat(client)
    assert sent(fake) == 3
    assert [r.outcome for r in rows(cguard)] == ["ok", "ok", "ok"]


def test_refresh_skips_the_read_and_stores_the_new_answer(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """cache_control(refresh=True) sends the call and replaces the entry with the fresh answer."""
    client = fake.openai(guard=cguard)
    fake.queue(Reply(text="old answer"), Reply(text="new answer"))
    assert chat(client).choices[0].message.content == "old answer"
    with tokenguard.cache_control(refresh=True):
        assert chat(client).choices[0].message.content == "new answer"
    assert chat(client).choices[0].message.content == "new answer"
    assert sent(fake) == 2


def test_cache_control_is_scoped_to_the_block(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Outside the cache_control block the default applies again."""
    client = fake.anthropic(guard=cguard)
    with tokenguard.cache_control(always=True):
        message(client)
    message(client)
    assert sent(fake) == 2
    assert _cache.current_cache_control() == _cache.CacheControl()


def test_cache_control_does_not_leak_across_threads(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A bypass block in one thread does not affect calls in another thread."""
    client = fake.openai(guard=cguard)
    chat(client)
    inside = threading.Event()
    release = threading.Event()

    def bypassing() -> None:
        with tokenguard.cache_control(bypass=True):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=bypassing)
    t.start()
    assert inside.wait(5)
    chat(client)
    release.set()
    t.join(5)
    assert sent(fake) == 1


# -- 5. single-flight ---------------------------------------------------------------------------------


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


def slow_async_openai(fake: FakeLLM, guard: tokenguard.Guard, delay_s: float = 0.2) -> tokenguard.AsyncOpenAI:
    inner = fake.transport(async_=True)

    async def slow(request: httpx2.Request) -> httpx2.Response:
        await asyncio.sleep(delay_s)
        return await inner.handle_async_request(request)

    return tokenguard.AsyncOpenAI(
        base_url=OPENAI_BASE,
        api_key="sk-fake-test-key",
        guard=guard,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(slow)),
    )


def run_together(n: int, work: Callable[[], Any]) -> list[Any]:
    """Run ``work`` in ``n`` threads released at once; return results or the exceptions raised."""
    barrier = threading.Barrier(n)

    def one(_: int) -> Any:
        barrier.wait(5)
        try:
            return work()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_identical_misses_make_one_request(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Eight threads making the same uncached call at once cause one request; all get the answer."""
    client = slow_openai(fake, cguard)
    results = run_together(8, lambda: chat(client))
    assert sent(fake) == 1
    assert all(isinstance(r, openai.types.chat.ChatCompletion) for r in results), results
    assert {r.choices[0].message.content for r in results} == {"Hello from the fake LLM!"}
    outcomes = sorted(r.outcome for r in rows(cguard))
    assert outcomes == ["cache_hit"] * 7 + ["ok"]


def test_concurrent_different_calls_are_not_serialized(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Concurrent calls with different keys all go upstream in parallel (no global lock)."""
    client = slow_openai(fake, cguard, delay_s=0.3)
    counter = iter(range(100))
    lock = threading.Lock()

    def distinct() -> Any:
        with lock:
            seed = next(counter)
        return chat(client, seed=seed)

    started = time.perf_counter()
    results = run_together(6, distinct)
    elapsed = time.perf_counter() - started
    assert not [r for r in results if isinstance(r, Exception)]
    assert sent(fake) == 6
    assert elapsed < 1.2


def test_followers_of_a_failed_flight_are_not_failed_with_it(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """When the one request in flight fails, only its caller gets the error; the others retry once between them."""
    client = slow_openai(fake, cguard)
    fake.fail(500)
    results = run_together(6, lambda: chat(client))
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1
    assert isinstance(errors[0], openai.InternalServerError)
    assert sent(fake) == 2
    assert {r.choices[0].message.content for r in results if not isinstance(r, Exception)} == {
        "Hello from the fake LLM!"
    }


async def test_concurrent_identical_async_misses_make_one_request(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """Eight asyncio tasks making the same uncached call at once cause one request; all get the answer."""
    client = slow_async_openai(fake, cguard)
    results = await asyncio.gather(*(chat(client) for _ in range(8)))
    assert sent(fake) == 1
    assert {r.choices[0].message.content for r in results} == {"Hello from the fake LLM!"}
    assert all(isinstance(r, openai.types.chat.ChatCompletion) for r in results)
    assert sorted(r.outcome for r in rows(cguard)) == ["cache_hit"] * 7 + ["ok"]


async def test_async_waiting_does_not_block_the_event_loop(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """While tasks wait for an identical call in flight, other tasks on the loop keep running."""
    client = slow_async_openai(fake, cguard, delay_s=0.3)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1

    await asyncio.gather(*(chat(client) for _ in range(4)), ticker())
    assert ticks == 20
    assert sent(fake) == 1


# -- 6. accounting --------------------------------------------------------------------------------------


def test_hit_is_a_free_ledger_row_with_the_saving(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A hit is recorded at $0 with outcome cache_hit and saved_usd equal to the original call's cost."""
    client = fake.openai(guard=cguard)
    chat(client)
    chat(client)
    cguard.flush()
    live, hit = rows(cguard)
    assert live.outcome == "ok"
    assert live.cost_usd is not None
    assert live.cost_usd > 0
    assert hit.outcome == "cache_hit"
    assert hit.cost_usd == 0
    assert hit.saved_usd == live.cost_usd
    assert hit.usage == tokenguard.Usage()
    assert hit.model == live.model
    assert hit.vendor == "openai"
    assert hit.endpoint == live.endpoint


def test_stats_report_hits_savings_and_rate(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """guard.stats() counts hits, sums the savings and gives the hit rate; spent excludes hits."""
    client = fake.openai(guard=cguard)
    chat(client)
    chat(client)
    chat(client)
    stats = cguard.stats()
    cost = rows(cguard)[0].cost_usd
    assert cost is not None
    assert stats.calls == 3
    assert stats.cache_hits == 2
    assert stats.saved_usd == 2 * cost
    assert stats.spent_usd == cost
    assert stats.cache_hit_rate == pytest.approx(2 / 3)
    assert cguard.spent() == cost


def test_hit_is_attributed_to_its_scope(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """A hit row carries the scope it was made in, so per-user savings add up."""
    client = fake.openai(guard=cguard)
    with tokenguard.scope(user="alice"):
        chat(client)
    with tokenguard.scope(user="bob"):
        chat(client)
    bob = cguard.stats(user="bob")
    assert bob.cache_hits == 1
    assert bob.saved_usd > 0
    assert bob.spent_usd == 0
    assert cguard.stats(user="alice").cache_hits == 0


def test_anthropic_hit_saving_matches_its_cost(fake: FakeLLM, cguard: tokenguard.Guard) -> None:
    """An Anthropic hit saves exactly what the original Anthropic call cost."""
    client = fake.anthropic(guard=cguard)
    with tokenguard.cache_control(always=True):
        message(client)
        message(client)
    live, hit = rows(cguard)
    assert live.cost_usd is not None
    assert live.cost_usd > 0
    assert hit.saved_usd == live.cost_usd
    assert hit.vendor == "anthropic"


def test_hits_do_not_consume_budget() -> None:
    """After a miss that leaves too little budget for another live call, identical calls still hit for free."""
    fake = FakeLLM(Reply(output_tokens=1_000))
    cache = tokenguard.Cache("memory")
    guard = tokenguard.Guard(store="memory://", cache=cache, budgets=[tokenguard.Budget(limit_usd="0.015")])
    client = fake.openai(guard=guard)
    chat(client, max_tokens=1_000)
    spent_after_miss = guard.budget_status()[0].spent_usd
    assert spent_after_miss > 0
    with pytest.raises(tokenguard.BudgetExceeded):  # the premise: no room for another live call
        chat(client, max_tokens=1_000, seed=99)
    for _ in range(3):
        hit = chat(client, max_tokens=1_000)
        assert hit.choices[0].message.content == "Hello from the fake LLM!"
    assert sent(fake) == 1
    status = guard.budget_status()[0]
    assert status.spent_usd == spent_after_miss
    assert status.held_usd == 0
    assert guard.stats().cache_hits == 3


# -- 7. failure is harmless --------------------------------------------------------------------------


def test_corrupt_entry_goes_to_the_provider_and_warns_once(
    fake: FakeLLM, cguard: tokenguard.Guard, caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt stored entry is skipped (the call is sent and succeeds), replaced, and warned about once."""
    cache = cguard.cache
    assert cache is not None
    client = fake.openai(guard=cguard)
    caplog.set_level(logging.WARNING, logger="tokenguard")
    chat(client)
    for garbage in (b"\x00not zlib at all", zlib.compress(b"{not json"), zlib.compress(b'{"v": 1}')):
        for key in stored_keys(cache):
            cache._store.set(key, garbage, 3_600)  # type: ignore[union-attr]
        answer = chat(client)
        assert answer.choices[0].message.content == "Hello from the fake LLM!"
    assert sent(fake) == 4
    chat(client)  # the fresh answer replaced the corrupt entry
    assert sent(fake) == 4
    assert len(tokenguard_warnings(caplog, "could not be read")) == 1


@pytest.mark.parametrize("method", ["get", "set"])
def test_failing_backend_never_fails_the_call(
    fake: FakeLLM,
    cguard: tokenguard.Guard,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    """A backend whose get/set raises: every call still succeeds (sent to the provider) and one warning is logged."""
    cache = cguard.cache
    assert cache is not None

    def broken(*args: Any, **kw: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(cache._store, method, broken)
    caplog.set_level(logging.WARNING, logger="tokenguard")
    client = fake.openai(guard=cguard)
    for _ in range(3):
        assert chat(client).choices[0].message.content == "Hello from the fake LLM!"
    assert sent(fake) == 3
    logged = [r for r in caplog.records if r.name == "tokenguard" and r.levelno >= logging.WARNING]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "disk on fire" in logged[0].getMessage()


def test_failing_backend_never_fails_a_stream(
    fake: FakeLLM, cguard: tokenguard.Guard, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend whose set raises does not break a streamed call."""
    cache = cguard.cache
    assert cache is not None

    def broken(*args: Any, **kw: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(cache._store, "set", broken)
    caplog.set_level(logging.WARNING, logger="tokenguard")
    client = fake.openai(guard=cguard)
    for _ in range(2):
        chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake LLM!"
    assert sent(fake) == 2
    assert len(tokenguard_warnings(caplog, "disk on fire")) == 1


def test_unwritable_directory_runs_uncached(fake: FakeLLM, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A disk cache whose directory cannot be created warns once and every call goes to the provider."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    caplog.set_level(logging.WARNING, logger="tokenguard")
    cache = tokenguard.Cache("disk", path=blocker / "cache")
    client = fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache))
    for _ in range(3):
        assert chat(client).choices[0].message.content == "Hello from the fake LLM!"
    assert sent(fake) == 3
    assert len(tokenguard_warnings(caplog, "cannot be opened")) == 1
    with pytest.raises(tokenguard.StoreUnavailable, match="cannot be started afresh"):
        cache.clear()  # asked to empty it, the cache says it cannot (it does not claim success)
    cache.close()


async def test_async_call_survives_a_failing_backend(
    fake: FakeLLM, cguard: tokenguard.Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async call with a backend that raises on get still succeeds."""
    cache = cguard.cache
    assert cache is not None

    def broken(*args: Any, **kw: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(cache._store, "get", broken)
    client = fake.openai(guard=cguard, async_=True)
    answer = await chat(client)
    assert answer.choices[0].message.content == "Hello from the fake LLM!"


# -- 8. security: planted pickles ------------------------------------------------------------------------


class Planted:
    """Unpickling this creates ``marker``: proof that a planted pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_planted_pickle_value_is_never_loaded(fake: FakeLLM, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pickle planted under the real key is not unpickled: the call goes to the provider and succeeds."""
    path = tmp_path / "shared-cache"
    marker = tmp_path / "pwned"
    cache = tokenguard.Cache("disk", path=path)
    client = fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache))
    caplog.set_level(logging.WARNING, logger="tokenguard")
    chat(client)
    raw = diskcache.Cache(str(path))  # the default Disk: it pickles
    keys = list(raw.iterkeys())
    assert len(keys) == 1
    for key in keys:
        raw.set(key, Planted(marker))
    raw.close()
    answer = chat(client)
    assert answer.choices[0].message.content == "Hello from the fake LLM!"
    assert sent(fake) == 2
    assert not marker.exists()
    chat(client)  # the planted entry was replaced by a JSON one
    assert sent(fake) == 2
    assert not marker.exists()
    assert len(tokenguard_warnings(caplog, "could not be read")) == 1
    cache.close()


def test_planted_pickled_key_is_never_loaded(fake: FakeLLM, tmp_path: Path) -> None:
    """Pickled keys planted in the directory are never unpickled, by calls, clear() or close()."""
    path = tmp_path / "shared-cache"
    marker = tmp_path / "pwned"
    cache = tokenguard.Cache("disk", path=path)
    raw = diskcache.Cache(str(path))
    raw.set(Planted(marker), b"some bytes")
    raw.set(("tuple", "key"), Planted(marker))
    raw.close()
    client = fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache))
    chat(client)
    chat(client)
    assert sent(fake) == 1
    cache.clear()
    cache.close()
    reopened = tokenguard.Cache("disk", path=path)
    chat(fake.openai(guard=tokenguard.Guard(store="memory://", cache=reopened)))
    reopened.close()
    assert not marker.exists()


def test_planted_pickle_before_first_open_is_never_loaded(fake: FakeLLM, tmp_path: Path) -> None:
    """A pickle planted under the real key before tokenguard ever opened the directory is not unpickled."""
    path = tmp_path / "shared-cache"
    marker = tmp_path / "pwned"
    # learn the key the client will use, in a separate directory
    probe = tokenguard.Cache("disk", path=tmp_path / "probe")
    chat(fake.openai(guard=tokenguard.Guard(store="memory://", cache=probe)))
    key = stored_keys(probe)[0]
    probe.close()
    raw = diskcache.Cache(str(path))
    raw.set(key, Planted(marker))
    raw.close()
    cache = tokenguard.Cache("disk", path=path)
    answer = chat(fake.openai(guard=tokenguard.Guard(store="memory://", cache=cache)))
    assert answer.choices[0].message.content == "Hello from the fake LLM!"
    assert sent(fake) == 2
    assert not marker.exists()
    cache.close()


# -- 9. no secrets in the cache directory ------------------------------------------------------------------


def test_api_keys_never_reach_the_cache_directory(fake: FakeLLM, tmp_path: Path) -> None:
    """No file in the cache directory (nor any decoded entry) contains an API key, organization or project."""
    secrets = ["sk-proj-SECRET0123456789abcdef", "org-SECRETORG42", "proj_SECRETPROJ42", "sk-ant-SECRET9876543210"]
    path = tmp_path / "c"
    cache = tokenguard.Cache("disk", path=path)
    guard = tokenguard.Guard(store="memory://", cache=cache)
    oa = fake.openai(guard=guard, api_key=secrets[0], organization=secrets[1], project=secrets[2])
    chat(oa)
    list(chat(oa, stream=True, stream_options={"include_usage": True}))
    oa.embeddings.create(model="text-embedding-3-small", input="hi")
    with tokenguard.cache_control(always=True):
        message(fake.anthropic(guard=guard, api_key=secrets[3]))
        list(message(fake.anthropic(guard=guard, api_key=secrets[3]), stream=True))
    guard.flush()
    keys = stored_keys(cache)
    assert len(keys) == 5
    decoded = b"".join(_cache.unpack(cache._store.get(k)) for k in keys)  # type: ignore[union-attr]
    files = [p for p in path.rglob("*") if p.is_file()]
    assert files
    everything = b"".join(p.read_bytes() for p in files)
    cache.close()
    everything += b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())
    for secret in secrets:
        assert secret.encode() not in everything, secret
        assert secret.encode() not in decoded, secret
        assert secret.encode() not in " ".join(keys).encode(), secret
