"""Bounded retry end to end against llmock on loopback: injected 429 / 503 / 529 faults with a
Retry-After, a quota error that must not be retried, and a server that hangs past the deadline —
the SDKs' own HTTP stack over real sockets, counted by the server's request journal."""

from __future__ import annotations

import itertools
import time
from typing import Any

import anthropic
import openai
import pytest

import tokenguard
from llmock_clients import ant, oai, only_row
from llmock_clients import close_clients as _close_clients  # noqa: F401  (an autouse fixture)

PROMPT = [{"role": "user", "content": "Summarise the quarterly report in one line, please."}]
OA = "gpt-4o-mini"
AN = "claude-haiku-4-5"


def retrying_guard(**kw: Any) -> tokenguard.Guard:
    kw.setdefault("initial_delay_s", 0.001)
    kw.setdefault("max_delay_s", 1.0)
    return tokenguard.Guard(store="memory://", retry=tokenguard.Retry(**kw))


def test_rate_limited_twice_then_answered_over_loopback(llmock: Any) -> None:
    """Two injected 429s with a 50 ms Retry-After, then the answer: 3 requests seen by the server,
    spaced by at least the asked wait, the SDK retry counter 0, 1, 2; one ok row with 3 attempts
    and the server's usage."""
    guard = retrying_guard(attempts=4)
    llmock.rate_limit(times=2, retry_after=0.05)
    r = oai(llmock, guard).chat.completions.create(model=OA, messages=PROMPT)
    records = llmock.requests
    assert [rec.status for rec in records] == [429, 429, 200]
    assert [rec.sdk_retry_count for rec in records] == [0, 1, 2]
    assert all(b.started_at - a.started_at >= 0.05 for a, b in itertools.pairwise(records))
    row = only_row(guard)
    assert (row.outcome, row.attempts) == ("ok", 3)
    assert r.usage is not None
    assert (row.usage.input_tokens, row.usage.output_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    assert guard.stats().retries == 2
    llmock.assert_resilient()


async def test_async_service_unavailable_then_answered_over_loopback(llmock: Any) -> None:
    """Two 503s with a Retry-After, async: answered on the 3rd request."""
    guard = retrying_guard(attempts=3)
    llmock.fail(503, times=2, retry_after=0.02)
    r = await oai(llmock, guard, async_=True).chat.completions.create(model=OA, messages=PROMPT)
    assert r.choices[0].message.content
    assert [rec.status for rec in llmock.requests] == [503, 503, 200]
    assert only_row(guard).attempts == 3


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
async def test_anthropic_overloaded_then_answered_over_loopback(llmock: Any, async_: bool) -> None:
    """Anthropic's 529 (overloaded), then the answer: 2 requests, one ok row with 2 attempts."""
    guard = retrying_guard(attempts=3)
    llmock.fail(529, times=1, provider="anthropic", retry_after=0.02)
    result = ant(llmock, guard, async_=async_).messages.create(model=AN, max_tokens=32, messages=PROMPT)
    msg = await result if async_ else result
    assert msg.content
    assert [rec.status for rec in llmock.requests] == [529, 200]
    row = only_row(guard)
    assert (row.outcome, row.attempts, row.vendor) == ("ok", 2, "anthropic")


def test_stream_rate_limited_then_streamed_over_loopback(llmock: Any) -> None:
    """A stream refused with 429 before its first event is retried and then streams in full."""
    guard = retrying_guard(attempts=3)
    llmock.rate_limit(times=1, retry_after=0.02)
    chunks = list(
        oai(llmock, guard).chat.completions.create(
            model=OA, messages=PROMPT, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [rec.status for rec in llmock.requests] == [429, 200]
    row = only_row(guard)
    assert (row.outcome, row.attempts, row.estimated) == ("ok", 2, False)


def test_insufficient_quota_is_not_retried_over_loopback(llmock: Any) -> None:
    """A 429 whose code says the quota is gone reaches the caller after one request."""
    guard = retrying_guard(attempts=4)
    llmock.fail(429, times=3, retry_after=0.01, code="insufficient_quota", message="You exceeded your current quota.")
    with pytest.raises(openai.RateLimitError) as info:
        oai(llmock, guard).chat.completions.create(model=OA, messages=PROMPT)
    assert info.value.code == "insufficient_quota"
    assert [rec.status for rec in llmock.requests] == [429]
    assert only_row(guard).attempts == 1


def test_permanent_outage_sends_exactly_the_attempts(llmock: Any) -> None:
    """An outage (every request 503): exactly Retry.attempts requests reach the server — the
    SDK's own retries (2 by default) never multiply them."""
    guard = retrying_guard(attempts=3, max_delay_s=0.01)
    llmock.outage(status=503)
    with pytest.raises(anthropic.ServiceUnavailableError):
        ant(llmock, guard).messages.create(model=AN, max_tokens=32, messages=PROMPT)
    assert [rec.status for rec in llmock.requests] == [503, 503, 503]


def test_server_hanging_past_the_deadline_times_out_at_the_deadline(llmock: Any) -> None:
    """The server holds its answer for 1 s; with a 0.3 s deadline the SDK's 600 s timeout is cut to
    what is left, so the caller gets the SDK's timeout error after ~0.3 s, with no retry; the
    attempt (sent, maybe billed) is charged as an estimate."""
    guard = retrying_guard(attempts=4, deadline_s=0.3)
    llmock.delay(1.0, times=None)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oai(llmock, guard).chat.completions.create(model=OA, messages=PROMPT, max_tokens=16)
    elapsed = time.monotonic() - started
    assert 0.3 - 0.01 <= elapsed < 0.9
    row = only_row(guard)
    assert (row.outcome, row.error, row.attempts) == ("error", "APITimeoutError", 1)
    assert row.estimated
    assert row.cost_usd is not None
    assert row.cost_usd > 0
    assert len(llmock.requests) == 1  # waits for the held answer to finish on the server
