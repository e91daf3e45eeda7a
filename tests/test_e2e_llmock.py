"""End to end against a real fake server on loopback (llmock): the SDKs' own HTTP stack, real
sockets, real SSE framing. The usage the server reports is what the ledger records."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest
from genai_prices import calc_price

import tokenguard
from llmock_clients import ant, oai, only_row
from llmock_clients import close_clients as _close_clients  # noqa: F401  (an autouse fixture)
from tokenguard._pricing import genai_usage

PROMPT = [{"role": "user", "content": "Summarise the quarterly report in one line, please."}]


def priced(row: tokenguard.LedgerRow, provider: str) -> Any:
    return calc_price(genai_usage(row.usage), row.model, provider_id=provider).total_price


def test_chat_completion_usage_matches_server(llmock: Any, guard: tokenguard.Guard) -> None:
    """A chat completion over a real socket records the server's usage and its genai-prices price."""
    r = oai(llmock, guard).chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    row = only_row(guard)
    assert r.usage is not None
    assert (row.usage.input_tokens, row.usage.output_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    assert row.usage.input_tokens > 0
    assert row.cost_usd == priced(row, "openai")
    assert not row.estimated
    assert len(llmock.requests) == 1


def test_chat_stream_with_usage_matches_server(llmock: Any, guard: tokenguard.Guard) -> None:
    """A streamed chat completion with include_usage records the usage chunk's counts exactly."""
    chunks = list(
        oai(llmock, guard).chat.completions.create(
            model="gpt-4o-mini", messages=PROMPT, stream=True, stream_options={"include_usage": True}
        )
    )
    usage = next(c.usage for c in chunks if c.usage)
    row = only_row(guard)
    assert (row.usage.input_tokens, row.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert row.outcome == "ok"
    assert not row.estimated
    assert row.cost_usd == priced(row, "openai")


def test_responses_stream_matches_server(llmock: Any, guard: tokenguard.Guard) -> None:
    """The Responses API stream helper records the usage of response.completed."""
    with oai(llmock, guard).responses.stream(model="gpt-4o-mini", input="Say something short.") as s:
        final = s.get_final_response()
    row = only_row(guard)
    assert final.usage is not None
    assert (row.usage.input_tokens, row.usage.output_tokens) == (final.usage.input_tokens, final.usage.output_tokens)
    assert not row.estimated


def test_anthropic_stream_matches_server(llmock: Any, guard: tokenguard.Guard) -> None:
    """An Anthropic messages.stream() records message_start + message_delta usage exactly."""
    with ant(llmock, guard).messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=PROMPT) as s:
        final = s.get_final_message()
    row = only_row(guard)
    assert (row.usage.input_tokens, row.usage.output_tokens) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
    )
    assert row.cost_usd == priced(row, "anthropic")
    assert not row.estimated


async def test_async_anthropic_create_matches_server(llmock: Any, guard: tokenguard.Guard) -> None:
    """An async Anthropic call over a real socket records the server's usage."""
    msg = await ant(llmock, guard, async_=True).messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=PROMPT
    )
    row = only_row(guard)
    assert row.usage.output_tokens == msg.usage.output_tokens
    assert row.cost_usd == priced(row, "anthropic")


def test_rate_limit_reaches_caller_as_vendor_error_without_sdk_retries(llmock: Any, guard: tokenguard.Guard) -> None:
    """A 429 surfaces as openai.RateLimitError after exactly one request: the SDK retries are off."""
    llmock.rate_limit(times=3, retry_after=0.01)
    with pytest.raises(openai.RateLimitError):
        oai(llmock, guard).chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    assert [r.status for r in llmock.requests] == [429]
    row = only_row(guard)
    assert (row.outcome, row.error, row.cost_usd) == ("error", "RateLimitError", 0)


def test_anthropic_overloaded_keeps_its_class(llmock: Any, guard: tokenguard.Guard) -> None:
    """Anthropic's 529 arrives as anthropic.OverloadedError, unwrapped."""
    llmock.fail(529, times=1, provider="anthropic")
    with pytest.raises(anthropic.OverloadedError):
        ant(llmock, guard).messages.create(model="claude-haiku-4-5", max_tokens=16, messages=PROMPT)
    assert only_row(guard).error == "OverloadedError"


def test_truncated_stream_is_charged_as_estimated(llmock: Any, guard: tokenguard.Guard) -> None:
    """A stream the server ends early (no finish, no usage) is still charged, estimated and incomplete."""
    llmock.truncate(after_chunks=3)
    received = list(
        oai(llmock, guard).chat.completions.create(
            model="gpt-4o-mini", messages=PROMPT, stream=True, stream_options={"include_usage": True}
        )
    )
    assert received  # the SDK itself raises nothing here
    row = only_row(guard)
    assert row.outcome == "incomplete"
    assert row.estimated
    assert row.usage.input_tokens > 0
    assert row.cost_usd is not None
    assert row.cost_usd > 0


def test_disconnected_stream_is_charged_and_error_passes_through(llmock: Any, guard: tokenguard.Guard) -> None:
    """A connection dropped mid-stream raises the SDK's own error and the output received is charged."""
    llmock.disconnect(after_chunks=3)
    received = []
    with pytest.raises(Exception) as info:  # noqa: PT011 - the class is the SDK's choice; checked below
        received.extend(oai(llmock, guard).chat.completions.create(model="gpt-4o-mini", messages=PROMPT, stream=True))
    assert not isinstance(info.value, tokenguard.TokenguardError)
    row = only_row(guard)
    assert row.outcome == "error"
    assert row.estimated
    assert row.cost_usd is not None
    assert row.cost_usd > 0
