"""Every money path, sync and async, streaming and not: recorded tokens equal what the server
reported, and the recorded cost equals genai-prices' price for that usage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import calc_price, extract_usage
from pydantic import BaseModel

import tokenguard
from tokenguard._pricing import genai_usage
from tokenguard.testing import FakeLLM, Reply, _anthropic_message, _chat, _responses

MSGS = [{"role": "user", "content": "Summarise the quarterly report in one line."}]
REPLY = Reply(
    text='{"answer": "Revenue rose."}',
    input_tokens=1200,
    output_tokens=340,
    cache_read_tokens=400,
    cache_write_tokens=300,
    cache_write_1h_tokens=100,
    reasoning_tokens=60,
)


class Answer(BaseModel):
    answer: str


@dataclass(frozen=True)
class Case:
    id: str
    vendor: str  # the ledger's vendor, also the genai-prices provider id
    endpoint: str
    model: str
    stream: bool
    sync: Callable[[Any], Any]
    async_: Callable[[Any], Awaitable[Any]]
    azure: bool = False


def _drain(stream: Any) -> list[Any]:
    return list(stream)


async def _adrain(stream: Any) -> list[Any]:
    return [item async for item in stream]


USAGE_ON = {"include_usage": True}
OA = "gpt-4o"
R = "gpt-5"
AN = "claude-haiku-4-5"


async def _a_chat_stream_helper(c: Any) -> Any:
    async with c.chat.completions.stream(model=OA, messages=MSGS, stream_options=USAGE_ON) as s:
        return await s.get_final_completion()


async def _a_responses_stream_helper(c: Any) -> Any:
    async with c.responses.stream(model=R, input="hi") as s:
        return await s.get_final_response()


async def _a_messages_stream_helper(c: Any) -> Any:
    async with c.messages.stream(model=AN, max_tokens=500, messages=MSGS) as s:
        return await s.get_final_message()


async def _a_beta_messages_stream_helper(c: Any) -> Any:
    async with c.beta.messages.stream(model=AN, max_tokens=500, messages=MSGS, betas=["x-test"]) as s:
        return await s.get_final_message()


async def _a_raw(c: Any) -> Any:
    raw = await c.chat.completions.with_raw_response.create(model=OA, messages=MSGS)
    return raw.parse()


async def _a_streaming_response(c: Any) -> Any:
    async with c.chat.completions.with_streaming_response.create(model=OA, messages=MSGS) as r:
        return await r.parse()


async def _a_anthropic_raw(c: Any) -> Any:
    raw = await c.messages.with_raw_response.create(model=AN, max_tokens=500, messages=MSGS)
    return await raw.parse()


async def _a_anthropic_streaming_response(c: Any) -> Any:
    async with c.messages.with_streaming_response.create(model=AN, max_tokens=500, messages=MSGS) as r:
        return await r.parse()


def _sync_chat_stream_helper(c: Any) -> Any:
    with c.chat.completions.stream(model=OA, messages=MSGS, stream_options=USAGE_ON) as s:
        return s.get_final_completion()


def _sync_responses_stream_helper(c: Any) -> Any:
    with c.responses.stream(model=R, input="hi") as s:
        return s.get_final_response()


def _sync_messages_stream_helper(c: Any) -> Any:
    with c.messages.stream(model=AN, max_tokens=500, messages=MSGS) as s:
        return s.get_final_message()


def _sync_beta_messages_stream_helper(c: Any) -> Any:
    with c.beta.messages.stream(model=AN, max_tokens=500, messages=MSGS, betas=["x-test"]) as s:
        return s.get_final_message()


def _sync_streaming_response(c: Any) -> Any:
    with c.chat.completions.with_streaming_response.create(model=OA, messages=MSGS) as r:
        return r.parse()


def _sync_anthropic_streaming_response(c: Any) -> Any:
    with c.messages.with_streaming_response.create(model=AN, max_tokens=500, messages=MSGS) as r:
        return r.parse()


async def _a_chat_stream(c: Any) -> Any:
    return await _adrain(await c.chat.completions.create(model=OA, messages=MSGS, stream=True, stream_options=USAGE_ON))


async def _a_responses_stream(c: Any) -> Any:
    return await _adrain(await c.responses.create(model=R, input="hi", stream=True))


async def _a_completions_stream(c: Any) -> Any:
    return await _adrain(
        await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True, stream_options=USAGE_ON)
    )


async def _a_messages_stream(c: Any) -> Any:
    return await _adrain(await c.messages.create(model=AN, max_tokens=500, messages=MSGS, stream=True))


CASES = [
    Case(
        "chat.create",
        "openai",
        "chat.completions",
        OA,
        False,
        lambda c: c.chat.completions.create(model=OA, messages=MSGS),
        lambda c: c.chat.completions.create(model=OA, messages=MSGS),
    ),
    Case(
        "chat.create-stream",
        "openai",
        "chat.completions",
        OA,
        True,
        lambda c: _drain(c.chat.completions.create(model=OA, messages=MSGS, stream=True, stream_options=USAGE_ON)),
        _a_chat_stream,
    ),
    Case(
        "chat.parse",
        "openai",
        "chat.completions",
        OA,
        False,
        lambda c: c.chat.completions.parse(model=OA, messages=MSGS, response_format=Answer),
        lambda c: c.chat.completions.parse(model=OA, messages=MSGS, response_format=Answer),
    ),
    Case(
        "beta.chat.parse",
        "openai",
        "chat.completions",
        OA,
        False,
        lambda c: c.beta.chat.completions.parse(model=OA, messages=MSGS, response_format=Answer),
        lambda c: c.beta.chat.completions.parse(model=OA, messages=MSGS, response_format=Answer),
    ),
    Case(
        "chat.stream",
        "openai",
        "chat.completions",
        OA,
        True,
        _sync_chat_stream_helper,
        _a_chat_stream_helper,
    ),
    Case(
        "chat.with_raw_response",
        "openai",
        "chat.completions",
        OA,
        False,
        lambda c: c.chat.completions.with_raw_response.create(model=OA, messages=MSGS).parse(),
        _a_raw,
    ),
    Case(
        "chat.with_streaming_response",
        "openai",
        "chat.completions",
        OA,
        False,
        _sync_streaming_response,
        _a_streaming_response,
    ),
    Case(
        "responses.create",
        "openai",
        "responses",
        R,
        False,
        lambda c: c.responses.create(model=R, input="hi"),
        lambda c: c.responses.create(model=R, input="hi"),
    ),
    Case(
        "responses.create-stream",
        "openai",
        "responses",
        R,
        True,
        lambda c: _drain(c.responses.create(model=R, input="hi", stream=True)),
        _a_responses_stream,
    ),
    Case(
        "responses.parse",
        "openai",
        "responses",
        R,
        False,
        lambda c: c.responses.parse(model=R, input="hi", text_format=Answer),
        lambda c: c.responses.parse(model=R, input="hi", text_format=Answer),
    ),
    Case(
        "responses.stream",
        "openai",
        "responses",
        R,
        True,
        _sync_responses_stream_helper,
        _a_responses_stream_helper,
    ),
    Case(
        "embeddings.create",
        "openai",
        "embeddings",
        "text-embedding-3-small",
        False,
        lambda c: c.embeddings.create(model="text-embedding-3-small", input=["a", "b"]),
        lambda c: c.embeddings.create(model="text-embedding-3-small", input=["a", "b"]),
    ),
    Case(
        "completions.create",
        "openai",
        "completions",
        "gpt-3.5-turbo-instruct",
        False,
        lambda c: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi"),
        lambda c: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi"),
    ),
    Case(
        "completions.create-stream",
        "openai",
        "completions",
        "gpt-3.5-turbo-instruct",
        True,
        lambda c: _drain(
            c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True, stream_options=USAGE_ON)
        ),
        _a_completions_stream,
    ),
    Case(
        "azure.chat.create",
        "azure",
        "chat.completions",
        OA,
        False,
        lambda c: c.chat.completions.create(model=OA, messages=MSGS),
        lambda c: c.chat.completions.create(model=OA, messages=MSGS),
        azure=True,
    ),
    Case(
        "messages.create",
        "anthropic",
        "messages",
        AN,
        False,
        lambda c: c.messages.create(model=AN, max_tokens=500, messages=MSGS),
        lambda c: c.messages.create(model=AN, max_tokens=500, messages=MSGS),
    ),
    Case(
        "messages.create-stream",
        "anthropic",
        "messages",
        AN,
        True,
        lambda c: _drain(c.messages.create(model=AN, max_tokens=500, messages=MSGS, stream=True)),
        _a_messages_stream,
    ),
    Case(
        "messages.parse",
        "anthropic",
        "messages",
        AN,
        False,
        lambda c: c.messages.parse(model=AN, max_tokens=500, messages=MSGS, output_format=Answer),
        lambda c: c.messages.parse(model=AN, max_tokens=500, messages=MSGS, output_format=Answer),
    ),
    Case(
        "messages.stream",
        "anthropic",
        "messages",
        AN,
        True,
        _sync_messages_stream_helper,
        _a_messages_stream_helper,
    ),
    Case(
        "beta.messages.create",
        "anthropic",
        "messages",
        AN,
        False,
        lambda c: c.beta.messages.create(model=AN, max_tokens=500, messages=MSGS, betas=["x-test"]),
        lambda c: c.beta.messages.create(model=AN, max_tokens=500, messages=MSGS, betas=["x-test"]),
    ),
    Case(
        "beta.messages.stream",
        "anthropic",
        "messages",
        AN,
        True,
        _sync_beta_messages_stream_helper,
        _a_beta_messages_stream_helper,
    ),
    Case(
        "beta.messages.parse",
        "anthropic",
        "messages",
        AN,
        False,
        lambda c: c.beta.messages.parse(model=AN, max_tokens=500, messages=MSGS, output_format=Answer),
        lambda c: c.beta.messages.parse(model=AN, max_tokens=500, messages=MSGS, output_format=Answer),
    ),
    Case(
        "messages.with_raw_response",
        "anthropic",
        "messages",
        AN,
        False,
        lambda c: c.messages.with_raw_response.create(model=AN, max_tokens=500, messages=MSGS).parse(),
        _a_anthropic_raw,
    ),
    Case(
        "messages.with_streaming_response",
        "anthropic",
        "messages",
        AN,
        False,
        _sync_anthropic_streaming_response,
        _a_anthropic_streaming_response,
    ),
]


def _client(fake: FakeLLM, guard: tokenguard.Guard, case: Case, *, async_: bool) -> Any:
    if case.vendor == "anthropic":
        return fake.anthropic(guard=guard, async_=async_)
    return fake.openai(guard=guard, async_=async_, azure=case.azure)


def _expected(case: Case) -> tokenguard.Usage:
    r = REPLY
    if case.endpoint == "embeddings":
        return tokenguard.Usage(input_tokens=r.input_tokens)
    if case.vendor == "anthropic":
        return tokenguard.Usage(
            r.input_tokens,
            r.output_tokens,
            r.cache_read_tokens,
            r.cache_write_tokens,
            r.cache_write_1h_tokens,
            r.reasoning_tokens,
        )
    if case.endpoint == "completions":
        return tokenguard.Usage(input_tokens=r.input_tokens, output_tokens=r.output_tokens)
    return tokenguard.Usage(
        r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens, 0, r.reasoning_tokens
    )


def _check(guard: tokenguard.Guard, fake: FakeLLM, case: Case) -> None:
    rows = list(guard.store.rows())
    assert len(rows) == 1, rows
    row = rows[0]
    assert len(fake.money_requests) == 1
    assert (row.vendor, row.endpoint, row.model, row.outcome) == (case.vendor, case.endpoint, case.model, "ok")
    assert row.stream is case.stream
    assert row.estimated is False
    assert row.usage == _expected(case)
    price = calc_price(genai_usage(row.usage), case.model, provider_id=case.vendor).total_price
    assert row.cost_usd == price
    assert row.cost_usd > 0
    assert dict(row.scope) == {"user": "alice"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sync_call_is_recorded_exactly(case: Case, guard: tokenguard.Guard) -> None:
    """A sync call records the server's usage and genai-prices' price for it."""
    fake = FakeLLM(REPLY)
    client = _client(fake, guard, case, async_=False)
    with tokenguard.scope(user="alice"):
        result = case.sync(client)
    assert result is not None
    _check(guard, fake, case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_async_call_is_recorded_exactly(case: Case, guard: tokenguard.Guard) -> None:
    """An async call records the server's usage and genai-prices' price for it."""
    fake = FakeLLM(REPLY)
    client = _client(fake, guard, case, async_=True)
    async with tokenguard.scope(user="alice"):
        result = await case.async_(client)
    assert result is not None
    _check(guard, fake, case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_vendor_return_types_are_unchanged(case: Case, guard: tokenguard.Guard) -> None:
    """What a guarded client returns has the same type as what the bare SDK returns."""
    fake = FakeLLM(REPLY)
    guarded = case.sync(_client(fake, guard, case, async_=False))
    if case.vendor == "anthropic":
        bare_client = fake.vendor_anthropic()
    elif case.azure:
        import openai

        bare_client = openai.AzureOpenAI(
            api_key="k",
            azure_endpoint="http://fake-azure.test",
            api_version="2024-10-21",
            http_client=fake.http_client(),
        )
    else:
        bare_client = fake.vendor_openai()
    bare = case.sync(bare_client)
    if isinstance(bare, list):
        assert [type(x) for x in guarded] == [type(x) for x in bare]
        assert [x.model_dump(warnings=False) for x in guarded] == [x.model_dump(warnings=False) for x in bare]
    else:
        assert type(guarded) is type(bare)
        assert guarded.model_dump(warnings=False) == bare.model_dump(warnings=False)


def test_openai_chat_mapping_agrees_with_genai_prices_extractor(guard: tokenguard.Guard) -> None:
    """OpenAI chat usage is mapped as genai-prices' own extractor maps it (same price)."""
    fake = FakeLLM(REPLY)
    fake.openai(guard=guard).chat.completions.create(model=OA, messages=MSGS)
    _, payload = _chat(REPLY, OA, {})
    want = extract_usage(payload, provider_id="openai", api_flavor="chat").calc_price().total_price
    assert next(guard.store.rows()).cost_usd == want


def test_openai_responses_mapping_agrees_with_genai_prices_extractor(guard: tokenguard.Guard) -> None:
    """Responses API usage is mapped as genai-prices' extractor maps it (same price)."""
    fake = FakeLLM(REPLY)
    fake.openai(guard=guard).responses.create(model=R, input="hi")
    _, payload = _responses(REPLY, R)
    want = extract_usage(payload, provider_id="openai", api_flavor="responses").calc_price().total_price
    assert next(guard.store.rows()).cost_usd == want


def test_anthropic_mapping_agrees_with_genai_prices_extractor(guard: tokenguard.Guard) -> None:
    """Anthropic usage (input excludes cache; 1h writes; thinking) prices as genai-prices' extractor does."""
    fake = FakeLLM(REPLY)
    fake.anthropic(guard=guard).messages.create(model=AN, max_tokens=500, messages=MSGS)
    _, payload = _anthropic_message(REPLY, AN)
    want = extract_usage(payload, provider_id="anthropic").calc_price().total_price
    assert next(guard.store.rows()).cost_usd == want


def test_service_tier_changes_the_price(guard: tokenguard.Guard) -> None:
    """A response served on the flex tier is priced at the flex price genai-prices gives."""
    fake = FakeLLM(Reply(input_tokens=1000, output_tokens=1000, service_tier="flex"))
    fake.openai(guard=guard).chat.completions.create(model="gpt-5", messages=MSGS)
    row = next(guard.store.rows())
    flex = calc_price(
        genai_usage(row.usage), "gpt-5", provider_id="openai", price_context={"service_tier": "flex"}
    ).total_price
    standard = calc_price(genai_usage(row.usage), "gpt-5", provider_id="openai").total_price
    assert row.cost_usd == flex
    assert flex < standard


def test_anthropic_batch_tier_is_half_price(guard: tokenguard.Guard) -> None:
    """Anthropic usage reporting service_tier=batch is priced with genai-prices' batch prices."""
    fake = FakeLLM(Reply(input_tokens=1000, output_tokens=1000, service_tier="batch"))
    fake.anthropic(guard=guard).messages.create(model=AN, max_tokens=10, messages=MSGS)
    row = next(guard.store.rows())
    standard = calc_price(genai_usage(row.usage), AN, provider_id="anthropic").total_price
    assert row.cost_usd == standard / 2


def test_dated_response_model_is_priced_and_recorded(guard: tokenguard.Guard) -> None:
    """The model the server says answered (a dated snapshot) is recorded and priced."""
    fake = FakeLLM(Reply(model="gpt-4o-2024-08-06", input_tokens=100, output_tokens=10))
    fake.openai(guard=guard).chat.completions.create(model="gpt-4o", messages=MSGS)
    row = next(guard.store.rows())
    assert row.model == "gpt-4o-2024-08-06"
    assert row.cost_usd == Decimal("0.00035")


def test_long_context_tier_is_priced_by_genai_prices(guard: tokenguard.Guard) -> None:
    """Above the 200k-token boundary the whole request moves to the long-context price."""
    fake = FakeLLM(Reply(input_tokens=250_000, output_tokens=1_000))
    fake.anthropic(guard=guard).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MSGS)
    row = next(guard.store.rows())
    assert row.cost_usd == calc_price(genai_usage(row.usage), "claude-sonnet-4-6", provider_id="anthropic").total_price


def test_anthropic_compaction_iterations_are_added() -> None:
    """Beta compaction iterations, which the top-level usage leaves out, are added on top."""
    from tokenguard.providers import AnthropicAdapter
    from tokenguard.providers.anthropic import MESSAGES

    seen = AnthropicAdapter().from_json(
        MESSAGES,
        {
            "model": AN,
            "usage": {
                "input_tokens": 100,
                "output_tokens": 20,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
                "iterations": [
                    {"type": "message", "input_tokens": 100, "output_tokens": 20},
                    {
                        "type": "compaction",
                        "input_tokens": 50,
                        "output_tokens": 7,
                        "cache_read_input_tokens": 5,
                        "cache_creation_input_tokens": 0,
                    },
                ],
            },
        },
    )
    assert seen.usage == tokenguard.Usage(input_tokens=155, output_tokens=27, cache_read_tokens=5)
