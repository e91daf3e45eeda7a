"""Bounded retry (``tokenguard.Retry``): what is retried and what never is, Retry-After and
backoff, the deadline and per-attempt timeouts, budgets re-checked on every attempt, the
retry budget, the circuit breaker, streams, async cancellation, the idempotency key and the
retry-count header, no multiplication with the SDKs' own retries, configuration errors, and
``judge()`` / ``retry_after()`` on the vendors' own exceptions.

Every wait is tiny (milliseconds): timing asserts hold lower bounds strictly (a sleep is
never shorter than asked) and upper bounds loosely (a busy 2-core machine oversleeps).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletion

import tokenguard
import tokenguard._retry
from tokenguard import Budget, BudgetExceeded, CircuitBreaker, CircuitOpen, ConfigurationError, Guard, Retry
from tokenguard._retry import Attempts, Retrier, Verdict, bounded_timeout, judge, reached_vendor, retry_after
from tokenguard.providers.anthropic import MESSAGES, AnthropicAdapter
from tokenguard.providers.openai import CHAT, OpenAIAdapter
from tokenguard.testing import FakeLLM, Reply

MODEL = "tg-retry-model"  # priced on every guard below: $1 / M input tokens, $4 / M output tokens
OTHER_MODEL = "tg-retry-other"
IN_RATE = Decimal("0.000001")
OUT_RATE = Decimal("0.000004")
MSGS = [{"role": "user", "content": "hello"}]
MAX = 20  # the max_tokens of every call
TEXT = Reply().text
EPS = 0.002  # a sleep is never shorter than asked; this only absorbs clock granularity
OPENAI_BASE = "http://fake-openai.test/v1"
ANTHROPIC_BASE = "http://fake-anthropic.test"
VENDORS = ["openai", "anthropic"]
SYNC_ASYNC = pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
BOTH_VENDORS = pytest.mark.parametrize("vendor", VENDORS)


def usd(input_tokens: int, output_tokens: int) -> Decimal:
    """What MODEL charges for this usage."""
    return input_tokens * IN_RATE + output_tokens * OUT_RATE


def bound(vendor: str) -> int:
    """The input upper bound tokenguard reserves for the usual call's messages."""
    if vendor == "openai":
        return OpenAIAdapter().input_bound(CHAT, {"model": MODEL, "messages": MSGS, "max_tokens": MAX})
    return AnthropicAdapter().input_bound(MESSAGES, {"model": MODEL, "messages": MSGS, "max_tokens": MAX})


WORST = usd(bound("openai"), MAX)  # what the usual openai call reserves
ACTUAL = usd(40, 15)  # what the budget tests' replies cost


# -- helpers -----------------------------------------------------------------------------------


def fast(**kw: Any) -> Retry:
    """A Retry with millisecond backoff (the deadline and retry budget stay at their defaults
    unless given)."""
    kw.setdefault("initial_delay_s", 0.001)
    kw.setdefault("max_delay_s", 0.05)
    return Retry(**kw)


def make_guard(retry: bool | Retry | None = None, **kw: Any) -> Guard:
    """A memory-store guard with MODEL and OTHER_MODEL priced."""
    g = Guard(store="memory://", retry=fast() if retry is None else retry, **kw)
    for model in (MODEL, OTHER_MODEL):
        g.register_price(model, input_mtok="1", output_mtok="4")
    return g


def client_for(fake: FakeLLM, guard: Guard, vendor: str, async_: bool = False, **kw: Any) -> Any:
    factory = fake.openai if vendor == "openai" else fake.anthropic
    return factory(guard=guard, async_=async_, **kw)


def spend(client: Any, model: str = MODEL, **kw: Any) -> Any:
    """One money-spending call (a coroutine for an async client)."""
    if isinstance(client, anthropic.Anthropic | anthropic.AsyncAnthropic):
        return client.messages.create(model=model, max_tokens=MAX, messages=MSGS, **kw)
    return client.chat.completions.create(model=model, messages=MSGS, max_tokens=MAX, **kw)


async def resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def call(client: Any, **kw: Any) -> Any:
    """``spend()`` and wait for it, whatever the client."""
    return await resolve(spend(client, **kw))


def text_of(result: Any) -> str:
    if isinstance(result, ChatCompletion):
        return result.choices[0].message.content or ""
    return "".join(block.text for block in result.content)


def rows(guard: Guard) -> list[tokenguard.LedgerRow]:
    return list(guard.store.rows())


def only_row(guard: Guard) -> tokenguard.LedgerRow:
    got = rows(guard)
    assert len(got) == 1, got
    return got[0]


def held_and_spent(guard: Guard) -> tuple[Decimal, Decimal]:
    statuses = guard.budget_status()
    assert len(statuses) == 1, statuses
    return statuses[0].held_usd, statuses[0].spent_usd


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def vendor_error(
    vendor: str,
    status: int,
    *,
    message: str = "fake error",
    headers: dict[str, str] | None = None,
    error_type: str | None = None,
    code: str | None = None,
    error_code: str | None = None,
) -> Callable[[httpx2.Request], httpx2.Response]:
    """A responder answering with an error in the vendor's own shape (``code`` is OpenAI's
    ``error.code``; ``error_code`` is Anthropic's ``error.details.error_code``)."""
    if vendor == "openai":
        body: dict[str, Any] = {
            "error": {"message": message, "type": error_type or "error", "param": None, "code": code}
        }
    else:
        error: dict[str, Any] = {"type": error_type or "api_error", "message": message}
        if error_code is not None:
            error["details"] = {"error_code": error_code}
        body = {"type": "error", "error": error}
    return lambda request: httpx2.Response(status, json=body, headers=headers or {})


class Scripted:
    """An httpx2 transport that answers from a script (raw responders, exceptions), then from a
    ``FakeLLM``; it records every request it receives and when."""

    def __init__(self, *script: Any, fake: FakeLLM | None = None) -> None:
        self.script = list(script)
        self.fake = fake or FakeLLM()
        self.requests: list[httpx2.Request] = []
        self.at: list[float] = []

    def _scripted(self, request: httpx2.Request) -> Any:
        self.requests.append(request)
        self.at.append(time.monotonic())
        if not self.script:
            return None
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item(request)

    def sync(self) -> httpx2.MockTransport:
        inner = self.fake.transport()

        def handle(request: httpx2.Request) -> httpx2.Response:
            answer = self._scripted(request)
            return answer if answer is not None else inner.handle_request(request)

        return httpx2.MockTransport(handle)

    def async_(self) -> httpx2.MockTransport:
        inner = self.fake.transport(async_=True)

        async def handle(request: httpx2.Request) -> httpx2.Response:
            answer = await resolve(self._scripted(request))
            return answer if answer is not None else await inner.handle_async_request(request)

        return httpx2.MockTransport(handle)

    def client(self, guard: Guard | None, vendor: str, async_: bool = False, **kw: Any) -> Any:
        """A guarded client (or, with ``guard=None``, a plain vendor client with its retries off)
        over this transport."""
        http = httpx2.AsyncClient(transport=self.async_()) if async_ else httpx2.Client(transport=self.sync())
        if vendor == "openai":
            kw.setdefault("base_url", OPENAI_BASE)
            kw.setdefault("api_key", "sk-test")
            guarded: Any = tokenguard.AsyncOpenAI if async_ else tokenguard.OpenAI
            plain: Any = openai.AsyncOpenAI if async_ else openai.OpenAI
        else:
            kw.setdefault("base_url", ANTHROPIC_BASE)
            kw.setdefault("api_key", "sk-ant-test")
            guarded = tokenguard.AsyncAnthropic if async_ else tokenguard.Anthropic
            plain = anthropic.AsyncAnthropic if async_ else anthropic.Anthropic
        if guard is None:
            return plain(http_client=http, max_retries=0, **kw)
        return guarded(http_client=http, guard=guard, **kw)


@functools.cache
def _sdk(vendor: str) -> Any:
    """A plain vendor client, only to build the vendor's exceptions (it never sends)."""
    if vendor == "openai":
        return openai.OpenAI(api_key="sk-test", base_url=OPENAI_BASE)
    return anthropic.Anthropic(api_key="sk-ant-test", base_url=ANTHROPIC_BASE)


def vendor_exc(vendor: str, status: int, *, headers: dict[str, str] | None = None, body: Any = None) -> Exception:
    """The exception the vendor's SDK builds for this error response (its own class choice)."""
    request = httpx2.Request("POST", "http://fake.test/v1/chat/completions")
    response = httpx2.Response(status, headers=headers or {}, json=body, request=request)
    return _sdk(vendor)._make_status_error_from_response(response)


def transport_exc(vendor: str, cause: BaseException) -> Exception:
    """What the SDK raises when the transport raised ``cause`` (``APITimeoutError`` for a
    timeout, else ``APIConnectionError``), chained the way the SDK chains it."""
    module: Any = openai if vendor == "openai" else anthropic
    request = httpx2.Request("POST", "http://fake.test/v1/chat/completions")
    if isinstance(cause, httpx2.TimeoutException):
        exc = module.APITimeoutError(request=request)
    else:
        exc = module.APIConnectionError(request=request)
    exc.__cause__ = cause
    return exc


# -- 1. Retry-After: 429, 429, 200 -------------------------------------------------------------

RETRY_AFTER_HEADERS = [
    pytest.param({"retry-after-ms": "80"}, id="retry-after-ms"),
    pytest.param({"retry-after": "0.08"}, id="retry-after-seconds"),
]


@SYNC_ASYNC
@BOTH_VENDORS
@pytest.mark.parametrize("headers", RETRY_AFTER_HEADERS)
async def test_rate_limited_twice_then_answered_waits_as_asked(
    fake: FakeLLM, vendor: str, async_: bool, headers: dict[str, str]
) -> None:
    """429, 429, 200 with an 80 ms Retry-After: the caller gets the completion after exactly 3
    requests, each retry sent no sooner than the server asked; one ledger row, ok, 3 attempts."""
    guard = make_guard(fast(max_delay_s=1.0))
    fake.fail(429, headers=headers, times=2)
    started = time.monotonic()
    result = await call(client_for(fake, guard, vendor, async_))
    elapsed = time.monotonic() - started
    assert text_of(result) == TEXT
    assert len(fake.requests) == 3
    assert all(gap >= 0.08 - EPS for gap in gaps([r.at for r in fake.requests]))
    assert elapsed >= 0.16 - EPS
    assert elapsed < 2.0
    row = only_row(guard)
    assert (row.outcome, row.attempts, row.error) == ("ok", 3, None)
    assert not row.estimated
    assert row.cost_usd == usd(9, 5)  # the answered attempt only: rejected attempts cost nothing
    stats = guard.stats()
    assert (stats.retries, stats.attempts, stats.calls) == (2, 3, 1)


@SYNC_ASYNC
async def test_http_date_retry_after_is_honoured_and_capped_by_max_delay(fake: FakeLLM, async_: bool) -> None:
    """A Retry-After given as an HTTP date a couple of seconds ahead is read (the waits are the
    50 ms cap, not the 1 ms backoff) and capped by max_delay_s (far less than the date asks)."""
    guard = make_guard(fast(initial_delay_s=0.001, max_delay_s=0.05))
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    fake.fail(429, headers={"retry-after": when}, times=2)
    started = time.monotonic()
    result = await call(client_for(fake, guard, "openai", async_))
    elapsed = time.monotonic() - started
    assert text_of(result) == TEXT
    assert len(fake.requests) == 3
    assert all(gap >= 0.05 - EPS for gap in gaps([r.at for r in fake.requests]))
    assert elapsed < 1.0  # two uncapped waits would take 2 s or more
    assert only_row(guard).attempts == 3
    assert guard.stats().retries == 2


def test_retry_after_longer_than_max_delay_is_capped(fake: FakeLLM) -> None:
    """retry-after-ms: 3000 with max_delay_s=0.06: the retry goes after ~60 ms, not 3 s."""
    guard = make_guard(fast(max_delay_s=0.06))
    fake.fail(503, headers={"retry-after-ms": "3000"})
    started = time.monotonic()
    assert text_of(spend(client_for(fake, guard, "openai"))) == TEXT
    assert 0.06 - EPS <= time.monotonic() - started < 1.5
    assert len(fake.requests) == 2


# -- 2. what is retried and what never is ------------------------------------------------------


def _non_retryable(vendor: str) -> list[Any]:
    cases = [
        pytest.param(vendor, vendor_error(vendor, status), id=f"{vendor}-{status}")
        for status in (400, 401, 403, 404, 413, 422, 402)
    ]
    cases += [
        pytest.param(
            vendor,
            vendor_error(vendor, 429, message="Budget has been exceeded! Current cost: 10.2, Max budget: 10.0"),
            id=f"{vendor}-429-gateway-budget-exceeded",
        ),
        pytest.param(
            vendor,
            vendor_error(vendor, 500, headers={"x-should-retry": "false"}),
            id=f"{vendor}-500-x-should-retry-false",
        ),
    ]
    return cases


NON_RETRYABLE = [
    *_non_retryable("openai"),
    *_non_retryable("anthropic"),
    pytest.param(
        "openai",
        vendor_error(
            "openai",
            429,
            message="You exceeded your current quota, please check your plan and billing details.",
            error_type="insufficient_quota",
            code="insufficient_quota",
        ),
        id="openai-429-insufficient-quota",
    ),
    pytest.param(
        "openai",
        vendor_error("openai", 429, message="no", code="insufficient_quota", headers={"x-should-retry": "true"}),
        id="openai-429-insufficient-quota-despite-x-should-retry-true",
    ),
    pytest.param(
        "anthropic",
        vendor_error(
            "anthropic",
            429,
            message="Your organization has reached its monthly spend limit.",
            error_type="rate_limit_error",
            error_code="enforced_spend_limit_reached",
        ),
        id="anthropic-429-enforced-spend-limit",
    ),
    pytest.param(
        "anthropic",
        vendor_error(
            "anthropic",
            402,
            message="The linked organization reached its spend limit.",
            error_code="linked_organization_spend_limit_reached",
        ),
        id="anthropic-402-linked-organization-spend-limit",
    ),
]


@SYNC_ASYNC
@pytest.mark.parametrize(("vendor", "responder"), NON_RETRYABLE)
async def test_non_retryable_error_is_sent_once_and_raised_as_the_vendor_class(
    vendor: str, responder: Callable[[httpx2.Request], httpx2.Response], async_: bool
) -> None:
    """A non-retryable error is raised after exactly one request, as the very class the vendor's
    own client raises for it; the row has outcome error and 1 attempt."""
    # the class the unguarded vendor client raises for the same answer
    plain = Scripted(responder)
    with pytest.raises(openai.APIStatusError if vendor == "openai" else anthropic.APIStatusError) as expected:
        await call(plain.client(None, vendor, async_))
    guard = make_guard(fast(attempts=4))
    transport = Scripted(responder, responder, responder)
    with pytest.raises(type(expected.value)) as info:
        await call(transport.client(guard, vendor, async_))
    assert type(info.value) is type(expected.value)
    assert not isinstance(info.value, tokenguard.TokenguardError)
    assert len(transport.requests) == 1
    row = only_row(guard)
    assert (row.outcome, row.error, row.attempts) == ("error", type(expected.value).__name__, 1)
    assert guard.stats().retries == 0


def test_anthropic_spend_limit_body_selects_the_sdk_spend_limit_class() -> None:
    """The scripted Anthropic spend-limit answer really is the SDK's EnforcedSpendLimitReachedError
    (so the case above tests what it claims to), and judge() says why it is not retried."""
    transport = Scripted(vendor_error("anthropic", 429, error_code="enforced_spend_limit_reached"))
    with pytest.raises(anthropic.RateLimitError) as info:
        spend(transport.client(None, "anthropic"))
    assert type(info.value).__name__ == "EnforcedSpendLimitReachedError"
    verdict = judge(info.value)
    assert not verdict.retry
    assert verdict.reason == "EnforcedSpendLimitReachedError"


RETRYABLE_STATUSES = [408, 409, 429, 500, 502, 503, 504, 529]


@SYNC_ASYNC
@BOTH_VENDORS
@pytest.mark.parametrize("status", RETRYABLE_STATUSES)
async def test_retryable_status_is_retried(fake: FakeLLM, vendor: str, status: int, async_: bool) -> None:
    """Each retryable status, once, then an answer: the caller gets it; 2 requests, 2 attempts."""
    guard = make_guard()
    fake.fail(status)
    result = await call(client_for(fake, guard, vendor, async_))
    assert text_of(result) == TEXT
    assert len(fake.requests) == 2
    assert only_row(guard).attempts == 2


@SYNC_ASYNC
@BOTH_VENDORS
async def test_400_with_x_should_retry_true_is_retried(fake: FakeLLM, vendor: str, async_: bool) -> None:
    """The server's x-should-retry: true wins over a status that is otherwise never retried."""
    guard = make_guard()
    fake.fail(400, headers={"x-should-retry": "true"})
    assert text_of(await call(client_for(fake, guard, vendor, async_))) == TEXT
    assert len(fake.requests) == 2


@SYNC_ASYNC
@BOTH_VENDORS
async def test_connection_errors_and_timeouts_are_retried(fake: FakeLLM, vendor: str, async_: bool) -> None:
    """A refused connection, a connect timeout and a read timeout, then an answer: 4 requests."""
    guard = make_guard(fast(attempts=4))
    fake.queue(httpx2.ConnectError("refused"), httpx2.ConnectTimeout("slow"), httpx2.ReadTimeout("slow"))
    assert text_of(await call(client_for(fake, guard, vendor, async_))) == TEXT
    assert len(fake.requests) == 4
    row = only_row(guard)
    assert (row.outcome, row.attempts) == ("ok", 4)


@BOTH_VENDORS
def test_exhausted_attempts_raise_the_last_vendor_error(fake: FakeLLM, vendor: str) -> None:
    """Always 503 with attempts=3: the caller gets the vendor's 503 error after 3 requests; the
    row is an error row with 3 attempts and no charge."""
    guard = make_guard(fast(attempts=3))
    fake.fail(503, times=10)
    expected = openai.InternalServerError if vendor == "openai" else anthropic.ServiceUnavailableError
    with pytest.raises(expected) as info:
        spend(client_for(fake, guard, vendor))
    assert info.value.status_code == 503
    assert len(fake.requests) == 3
    row = only_row(guard)
    assert (row.outcome, row.error, row.attempts, row.cost_usd) == ("error", expected.__name__, 3, 0)
    assert (guard.stats().retries, guard.stats().attempts) == (2, 3)


# -- 3. no multiplication with the SDKs' own retries -------------------------------------------


def build_client(vendor: str, how: str, http: Any, guard: Guard, async_: bool) -> Any:
    """A guarded client built ``how``: "default" (the SDK's default max_retries=2), "wrap" (of a
    vendor client made with max_retries=5) or "with_options" (a max_retries=7 copy)."""
    if vendor == "openai":
        kw: dict[str, Any] = {"api_key": "sk-test", "base_url": OPENAI_BASE, "http_client": http}
        plain: Any = openai.AsyncOpenAI if async_ else openai.OpenAI
        guarded: Any = tokenguard.AsyncOpenAI if async_ else tokenguard.OpenAI
    else:
        kw = {"api_key": "sk-ant-test", "base_url": ANTHROPIC_BASE, "http_client": http}
        plain = anthropic.AsyncAnthropic if async_ else anthropic.Anthropic
        guarded = tokenguard.AsyncAnthropic if async_ else tokenguard.Anthropic
    if how == "wrap":
        return tokenguard.wrap(plain(max_retries=5, **kw), guard=guard)
    client = guarded(guard=guard, **kw)
    return client.with_options(max_retries=7) if how == "with_options" else client


@SYNC_ASYNC
@pytest.mark.parametrize("attempts", [1, 3])
@pytest.mark.parametrize("how", ["default", "wrap", "with_options"])
@BOTH_VENDORS
async def test_attempts_never_multiply_with_sdk_retries(
    fake: FakeLLM, vendor: str, how: str, attempts: int, async_: bool
) -> None:
    """A call failing with 500 forever, through a client built with the SDK's default retries,
    a wrapped client with max_retries=5, or a with_options(max_retries=7) copy, sends exactly
    Retry.attempts requests."""
    guard = make_guard(fast(attempts=attempts))
    fake.fail(500, headers={"retry-after-ms": "1"}, times=50)  # 1 ms SDK sleeps, if it did retry
    client = build_client(vendor, how, fake.http_client(async_=async_), guard, async_)
    assert client.max_retries == 0
    with pytest.raises((openai.InternalServerError, anthropic.InternalServerError)):
        await call(client)
    assert len(fake.requests) == attempts
    assert only_row(guard).attempts == attempts


@SYNC_ASYNC
@BOTH_VENDORS
async def test_retry_false_sends_once_even_with_sdk_retries_asked(fake: FakeLLM, vendor: str, async_: bool) -> None:
    """Guard(retry=False): a failing call is sent exactly once, max_retries=5 or not."""
    guard = make_guard(False)
    assert guard.pipeline.retrier is None
    fake.fail(503, headers={"retry-after-ms": "1"}, times=10)
    with pytest.raises((openai.InternalServerError, anthropic.ServiceUnavailableError)):
        await call(client_for(fake, guard, vendor, async_, max_retries=5))
    assert len(fake.requests) == 1
    assert only_row(guard).attempts == 1


def test_per_request_max_retries_does_not_multiply_attempts(fake: FakeLLM) -> None:
    """client.post() with a per-request options={"max_retries": 3} still sends Retry.attempts
    requests: the SDK's retries stay off for every request, not only for the client's default."""
    guard = make_guard(fast(attempts=2))
    fake.fail(500, headers={"retry-after-ms": "1"}, times=50)  # 1 ms SDK sleeps, if it does retry
    client = fake.openai(guard=guard)
    body = {"model": MODEL, "messages": MSGS, "max_tokens": MAX}
    with pytest.raises(openai.InternalServerError):
        client.post("/chat/completions", cast_to=ChatCompletion, body=body, options={"max_retries": 3})
    assert len(fake.requests) == 2


# -- 4. backoff: exponential, capped, jittered (real sleeps and a recorded clock) --------------


def test_backoff_doubles_up_to_max_delay(fake: FakeLLM) -> None:
    """No Retry-After: the waits are 50, 100, then 100 ms again and again (capped), not 200, 400, 800."""
    guard = make_guard(Retry(attempts=6, initial_delay_s=0.05, max_delay_s=0.1, jitter=False))
    fake.fail(502, times=10)
    with pytest.raises(openai.InternalServerError):
        spend(fake.openai(guard=guard))
    waits = gaps([r.at for r in fake.requests])
    assert len(waits) == 5
    for wait, asked in zip(waits, [0.05, 0.1, 0.1, 0.1, 0.1], strict=True):
        assert wait >= asked - EPS
    assert waits[-1] < 0.4  # uncapped it would be 0.8 s


class _FakeTime:
    """Stands in for the ``time`` module inside ``tokenguard._retry``: sleeps advance a clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def time(self) -> float:
        return time.time()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _FakeTime:
    """Retrier sleeps recorded, not slept, on a clock they advance."""
    fake_time = _FakeTime()
    monkeypatch.setattr(tokenguard._retry, "time", fake_time)
    return fake_time


def attempts_of(vendor: str, base_url: str, model: str) -> Attempts:
    """The identity of one chat call, with hooks that do nothing."""
    return Attempts(
        vendor=vendor,
        base_url=base_url,
        model=model,
        endpoint="chat.completions",
        before_attempt=lambda number, left: None,
        after_failure=lambda exc, verdict: None,
    )


def run_failing(
    config: Retry, clock: _FakeTime, errors: Callable[[int], BaseException], *, succeed_at: int | None = None
) -> tuple[list[tuple[int, float | None]], BaseException | None]:
    """Run one call through a Retrier whose attempts raise ``errors(n)`` (until ``succeed_at``);
    return the (attempt, seconds left) pairs it was sent with, and what it raised."""
    retrier = Retrier(config, clock=clock.monotonic)
    sent: list[tuple[int, float | None]] = []

    def send(number: int, left: float | None) -> str:
        sent.append((number, left))
        if succeed_at is not None and number >= succeed_at:
            return "ok"
        raise errors(number)

    attempts = attempts_of("openai", OPENAI_BASE, MODEL)
    try:
        retrier.run(attempts, send)
    except BaseException as exc:
        return sent, exc
    return sent, None


def test_backoff_schedule_without_jitter(clock: _FakeTime) -> None:
    """initial 0.5 s, max 3 s: sleeps 0.5, 1, 2, 3, 3 — exactly, with no jitter."""
    config = Retry(attempts=6, initial_delay_s=0.5, max_delay_s=3, deadline_s=None, jitter=False, retry_budget=None)
    sent, exc = run_failing(config, clock, lambda n: vendor_exc("openai", 503))
    assert isinstance(exc, openai.InternalServerError)
    assert [n for n, _ in sent] == [1, 2, 3, 4, 5, 6]
    assert clock.sleeps == pytest.approx([0.5, 1, 2, 3, 3])


@pytest.mark.parametrize(("draw", "factor"), [(0.0, 1.0), (1.0, 0.75), (0.5, 0.875)])
def test_jitter_scales_each_backoff_into_three_quarters_to_one(
    clock: _FakeTime, monkeypatch: pytest.MonkeyPatch, draw: float, factor: float
) -> None:
    """With jitter, each backoff is multiplied by 1 - 0.25 * random(): within [0.75, 1]."""
    monkeypatch.setattr(tokenguard._retry.random, "random", lambda: draw)
    config = Retry(attempts=4, initial_delay_s=1, max_delay_s=10, deadline_s=None, retry_budget=None)
    run_failing(config, clock, lambda n: vendor_exc("openai", 500))
    assert clock.sleeps == pytest.approx([1 * factor, 2 * factor, 4 * factor])


def test_retry_after_replaces_the_backoff_and_jitter(clock: _FakeTime) -> None:
    """A server's Retry-After is slept as asked (no jitter), capped by max_delay_s."""
    config = Retry(attempts=4, initial_delay_s=0.5, max_delay_s=5, deadline_s=None, retry_budget=None)
    waits = iter(["1500", "9000", "250"])
    run_failing(config, clock, lambda n: vendor_exc("openai", 429, headers={"retry-after-ms": next(waits)}))
    assert clock.sleeps == pytest.approx([1.5, 5.0, 0.25])


def test_attempts_one_never_retries(clock: _FakeTime) -> None:
    """Retry(attempts=1): one attempt, no sleep, the vendor error raised."""
    config = Retry(attempts=1, deadline_s=None, retry_budget=None)
    sent, exc = run_failing(config, clock, lambda n: vendor_exc("openai", 503))
    assert [n for n, _ in sent] == [1]
    assert clock.sleeps == []
    assert isinstance(exc, openai.InternalServerError)


# -- 5. the deadline ---------------------------------------------------------------------------


def test_deadline_stops_when_the_next_backoff_would_end_past_it(clock: _FakeTime) -> None:
    """deadline 3.5 s, 1 s backoffs: attempts at 0, 1, 2, 3 s, each told what is left (3.5, 2.5,
    1.5, 0.5 s); the 5th is not tried, as its sleep would end past the deadline."""
    config = Retry(attempts=10, initial_delay_s=1, max_delay_s=1, deadline_s=3.5, jitter=False, retry_budget=None)
    sent, exc = run_failing(config, clock, lambda n: vendor_exc("openai", 503))
    assert isinstance(exc, openai.InternalServerError)
    assert [n for n, _ in sent] == [1, 2, 3, 4]
    assert [left for _, left in sent] == pytest.approx([3.5, 2.5, 1.5, 0.5])
    assert sum(clock.sleeps) <= 3.5


def test_deadline_none_gives_attempts_no_time_limit(clock: _FakeTime) -> None:
    """deadline_s=None: each attempt is told None (no cut to its timeouts)."""
    config = Retry(attempts=3, deadline_s=None, retry_budget=None)
    sent, _ = run_failing(config, clock, lambda n: vendor_exc("openai", 503))
    assert [left for _, left in sent] == [None, None, None]


def test_retry_after_past_the_deadline_gives_up_at_once_unit(clock: _FakeTime) -> None:
    """A Retry-After of 5 s with 3 s of deadline left: the vendor error at once, no sleep at all
    (even though the capped sleep, 1 s, would fit)."""
    config = Retry(attempts=5, max_delay_s=1, deadline_s=3, retry_budget=None)
    sent, exc = run_failing(config, clock, lambda n: vendor_exc("openai", 429, headers={"retry-after": "5"}))
    assert isinstance(exc, openai.RateLimitError)
    assert len(sent) == 1
    assert clock.sleeps == []


@SYNC_ASYNC
async def test_call_that_keeps_failing_stops_before_the_deadline(fake: FakeLLM, async_: bool) -> None:
    """Always 503, 100 ms backoff, 0.45 s deadline, 20 attempts allowed: the call gives up with the
    vendor error before the deadline, after a handful of requests, none sent past the deadline."""
    guard = make_guard(Retry(attempts=20, initial_delay_s=0.1, max_delay_s=0.1, deadline_s=0.45, jitter=False))
    fake.fail(503, times=50)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        await call(client_for(fake, guard, "openai", async_))
    elapsed = time.monotonic() - started
    assert 2 <= len(fake.requests) <= 5
    assert elapsed < 0.45 + 0.3
    assert all(r.at - started < 0.45 + 0.05 for r in fake.requests)
    assert only_row(guard).attempts == len(fake.requests)


@SYNC_ASYNC
@BOTH_VENDORS
async def test_retry_after_longer_than_the_deadline_left_raises_at_once(
    fake: FakeLLM, vendor: str, async_: bool
) -> None:
    """retry-after-ms: 5000 with a 1 s deadline: the 429 reaches the caller at once (no sleep):
    one request, elapsed far below the asked wait."""
    guard = make_guard(fast(max_delay_s=0.05, deadline_s=1.0))
    fake.fail(429, headers={"retry-after-ms": "5000"}, times=3)
    started = time.monotonic()
    with pytest.raises((openai.RateLimitError, anthropic.RateLimitError)):
        await call(client_for(fake, guard, vendor, async_))
    assert time.monotonic() - started < 0.5
    assert len(fake.requests) == 1
    assert only_row(guard).attempts == 1


def _timeouts(transport: Scripted) -> list[dict[str, float]]:
    return [request.extensions["timeout"] for request in transport.requests]


@SYNC_ASYNC
@BOTH_VENDORS
async def test_each_attempt_timeout_is_cut_to_what_the_deadline_leaves(vendor: str, async_: bool) -> None:
    """With a 0.5 s deadline, the SDK's 600 s read / 5 s connect timeouts are cut: attempt 1 uses at
    most 0.5 s for every part, attempt 2 (after a 100 ms sleep) at most 0.4 s; the SDK's
    x-stainless-read-timeout header says the same."""
    guard = make_guard(Retry(attempts=3, initial_delay_s=0.1, max_delay_s=0.1, deadline_s=0.5, jitter=False))
    transport = Scripted(vendor_error(vendor, 503))
    assert text_of(await call(transport.client(guard, vendor, async_))) == TEXT
    first, second = _timeouts(transport)
    assert set(first) == {"connect", "read", "write", "pool"}
    assert all(0 < value <= 0.5 for value in first.values())
    assert all(0 < value <= 0.4 + EPS for value in second.values())
    assert float(transport.requests[0].headers["x-stainless-read-timeout"]) <= 0.5
    assert float(transport.requests[1].headers["x-stainless-read-timeout"]) <= 0.4 + EPS


@BOTH_VENDORS
def test_a_shorter_timeout_of_the_caller_is_kept(vendor: str) -> None:
    """A client timeout of 0.2 s under a 120 s deadline stays 0.2 s."""
    guard = make_guard(fast(deadline_s=120))
    transport = Scripted()
    client = transport.client(guard, vendor).with_options(timeout=0.2)
    spend(client)
    assert _timeouts(transport)[0] == {"connect": 0.2, "read": 0.2, "write": 0.2, "pool": 0.2}


@BOTH_VENDORS
def test_without_a_deadline_the_sdk_timeouts_are_untouched(vendor: str) -> None:
    """deadline_s=None: the SDK's own 600 s read and 5 s connect timeouts go out unchanged."""
    guard = make_guard(fast(deadline_s=None))
    transport = Scripted(vendor_error(vendor, 503))
    spend(transport.client(guard, vendor))
    for timeout in _timeouts(transport):
        assert (timeout["read"], timeout["connect"]) == (600, 5.0)


def _model_page(model_id: str, *, more: bool) -> Callable[[httpx2.Request], httpx2.Response]:
    page = {
        "data": [{"type": "model", "id": model_id, "display_name": model_id, "created_at": "2025-01-01T00:00:00Z"}],
        "has_more": more,
        "first_id": model_id,
        "last_id": model_id,
    }
    return lambda request: httpx2.Response(200, json=page)


def test_next_page_gets_its_own_deadline_not_the_last_pages_cut_timeout() -> None:
    """Page 1 of a listing needs a retry (its 2nd attempt has ~0.2 s of its 0.5 s deadline
    left); page 2 is a new call and starts with the whole 0.5 s again."""
    guard = make_guard(Retry(attempts=3, initial_delay_s=0.3, max_delay_s=0.3, deadline_s=0.5, jitter=False))
    transport = Scripted(vendor_error("anthropic", 503), _model_page("m1", more=True), _model_page("m2", more=False))
    ids = [m.id for m in transport.client(guard, "anthropic").models.list(limit=1)]
    assert ids == ["m1", "m2"]
    first, retried, next_page = (t["read"] for t in _timeouts(transport))
    assert first > 0.4
    assert retried <= 0.2 + EPS
    assert next_page > 0.4


# -- 6. budgets are checked on every attempt ---------------------------------------------------


@pytest.fixture
def billed_fake() -> FakeLLM:
    """A fake whose replies report 40 input and 15 output tokens (ACTUAL)."""
    return FakeLLM(Reply(input_tokens=40, output_tokens=15))


def budget_guard(limit: Decimal, retry: Retry | None = None) -> Guard:
    return make_guard(retry or fast(), budgets=[Budget(limit_usd=limit, period="total", alerts=(1.0,))])


@SYNC_ASYNC
async def test_rate_limited_attempt_releases_its_hold_under_a_one_call_cap(billed_fake: FakeLLM, async_: bool) -> None:
    """Under a cap of exactly one worst case, 429 then 200 succeeds (the 429's reservation was
    released before the retry reserved again), and nothing stays held: spent == the answer's cost."""
    guard = budget_guard(WORST)
    billed_fake.fail(429, headers={"retry-after-ms": "5"})
    result = await call(billed_fake.openai(guard=guard, async_=async_))
    assert text_of(result) == TEXT
    assert len(billed_fake.requests) == 2
    assert held_and_spent(guard) == (0, ACTUAL)
    assert guard.spent() == ACTUAL
    row = only_row(guard)
    assert (row.outcome, row.attempts, row.cost_usd, row.estimated) == ("ok", 2, ACTUAL, False)


@SYNC_ASYNC
async def test_timed_out_attempt_is_charged_its_reservation(billed_fake: FakeLLM, async_: bool) -> None:
    """A read timeout (the request had been sent: the vendor may bill it), then 200: the row is
    estimated and charges the timed-out attempt's worst case on top of the answer's real cost."""
    guard = budget_guard(WORST * 3)
    billed_fake.queue(httpx2.ReadTimeout("the server took too long"))
    assert text_of(await call(billed_fake.openai(guard=guard, async_=async_))) == TEXT
    row = only_row(guard)
    assert (row.outcome, row.attempts) == ("ok", 2)
    assert row.estimated
    assert row.cost_usd == WORST + ACTUAL
    assert row.usage.input_tokens == bound("openai") + 40
    assert row.usage.output_tokens == MAX + 15
    assert held_and_spent(guard) == (0, WORST + ACTUAL)
    assert guard.spent() == WORST + ACTUAL


def test_timed_out_attempt_is_charged_without_budgets_too(billed_fake: FakeLLM) -> None:
    """No budget, so nothing was reserved: the timed-out attempt is still charged its worst case."""
    guard = make_guard()
    billed_fake.queue(httpx2.ReadTimeout("slow"))
    spend(billed_fake.openai(guard=guard))
    row = only_row(guard)
    assert row.estimated
    assert row.cost_usd == WORST + ACTUAL


def test_anthropic_timed_out_attempt_is_charged_its_reservation(billed_fake: FakeLLM) -> None:
    """The same for Anthropic: its own worst case (its input bound, max_tokens) is carried."""
    guard = budget_guard(WORST * 10)
    billed_fake.queue(httpx2.ReadTimeout("slow"))
    spend(billed_fake.anthropic(guard=guard))
    row = only_row(guard)
    assert row.estimated
    assert row.cost_usd == usd(bound("anthropic"), MAX) + ACTUAL
    assert held_and_spent(guard)[0] == 0


@SYNC_ASYNC
async def test_retry_after_a_timeout_is_refused_when_the_cap_cannot_hold_another_worst_case(
    billed_fake: FakeLLM, async_: bool
) -> None:
    """Cap = 1.5 worst cases: a read timeout is charged one worst case, so the retry cannot
    reserve another: BudgetExceeded, no second request, a blocked row carrying the charge."""
    guard = budget_guard(WORST + WORST / 2)
    billed_fake.queue(httpx2.ReadTimeout("slow"))
    with pytest.raises(BudgetExceeded) as info:
        await call(billed_fake.openai(guard=guard, async_=async_))
    assert "This retry was not sent (1 attempt(s) were)" in str(info.value)  # not "Nothing was sent"
    assert len(billed_fake.requests) == 1
    row = only_row(guard)
    assert (row.outcome, row.error, row.attempts) == ("blocked", "budget", 1)
    assert row.estimated
    assert row.cost_usd == WORST
    assert held_and_spent(guard) == (0, WORST)


@pytest.mark.parametrize(
    "cause",
    [httpx2.ConnectError("refused"), httpx2.ConnectTimeout("no route")],
    ids=["connect-error", "connect-timeout"],
)
@SYNC_ASYNC
async def test_attempt_that_never_connected_is_not_charged(
    billed_fake: FakeLLM, cause: Exception, async_: bool
) -> None:
    """A connection that was never made cannot be billed: under a one-call cap the retry is
    admitted, and the row charges the answer only (exact, not estimated)."""
    guard = budget_guard(WORST)
    billed_fake.queue(cause)
    assert text_of(await call(billed_fake.openai(guard=guard, async_=async_))) == TEXT
    row = only_row(guard)
    assert (row.outcome, row.attempts, row.cost_usd, row.estimated) == ("ok", 2, ACTUAL, False)
    assert held_and_spent(guard) == (0, ACTUAL)


def test_pool_timeout_is_not_charged(billed_fake: FakeLLM) -> None:
    """A pool timeout (waiting for a free connection) sent nothing: it must not be charged, so
    under a one-call cap the retry is admitted."""
    guard = budget_guard(WORST)
    billed_fake.queue(httpx2.PoolTimeout("no free connection"))
    spend(billed_fake.openai(guard=guard))
    row = only_row(guard)
    assert (row.outcome, row.cost_usd, row.estimated) == ("ok", ACTUAL, False)


def test_budget_blocked_before_the_first_attempt_sends_nothing(billed_fake: FakeLLM) -> None:
    """A cap below one worst case: BudgetExceeded before any request; the row has 0 attempts."""
    guard = budget_guard(WORST / 2)
    with pytest.raises(BudgetExceeded):
        spend(billed_fake.openai(guard=guard))
    assert billed_fake.requests == []
    row = only_row(guard)
    assert (row.outcome, row.error, row.attempts) == ("blocked", "budget", 0)


# -- 7. the retry budget -----------------------------------------------------------------------


def per_call_requests(fake: FakeLLM, client: Any, calls: int) -> list[int]:
    """Make ``calls`` failing calls one after another; the requests each one sent."""
    counts = []
    for _ in range(calls):
        before = len(fake.requests)
        with pytest.raises(openai.InternalServerError):
            spend(client)
        counts.append(len(fake.requests) - before)
    return counts


def test_retry_budget_caps_retries_in_a_burst_of_failures(fake: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    """20 calls failing with 503, 4 attempts each, retry budget 0.2 with min 2: at most
    max(2, 0.2 x calls started) retries at any time. The first call spends the 2 free retries,
    calls 2-14 fail at once (1 request each: budget spent), the 15th and 20th calls get the 3rd and
    4th retries as the calls started grow: 24 requests in all, not 80. One WARNING says why."""
    guard = make_guard(fast(attempts=4, retry_budget=0.2, min_retries=2, max_delay_s=0.001))
    fake.fail(503, times=200)
    caplog.set_level(logging.WARNING, logger="tokenguard")
    counts = per_call_requests(fake, fake.openai(guard=guard), 20)
    assert sum(counts) == 20 + max(2, int(0.2 * 20)) == 24
    assert counts == [3] + [1] * 13 + [2] + [1] * 4 + [2]
    warnings = [r for r in caplog.records if r.name == "tokenguard" and "retry budget" in r.getMessage()]
    assert len(warnings) == 1  # once per window, not once per refused retry
    assert warnings[0].levelno == logging.WARNING
    stats = guard.stats()
    assert (stats.calls, stats.attempts, stats.retries) == (20, 24, 4)


async def test_retry_budget_caps_a_concurrent_burst(fake: FakeLLM) -> None:
    """20 concurrent async calls all failing: at most 20 + max(2, 0.2 x 20) requests."""
    guard = make_guard(fast(attempts=4, retry_budget=0.2, min_retries=2, max_delay_s=0.001))
    fake.fail(503, times=200)
    client = fake.openai(guard=guard, async_=True)
    results = await asyncio.gather(*(spend(client) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, openai.InternalServerError) for r in results)
    assert 20 + 2 <= len(fake.requests) <= 24


def test_no_retry_budget_lets_every_call_retry(fake: FakeLLM) -> None:
    """retry_budget=None: 5 failing calls with 3 attempts each send 15 requests."""
    guard = make_guard(fast(attempts=3, retry_budget=None, min_retries=0))
    fake.fail(503, times=100)
    assert per_call_requests(fake, fake.openai(guard=guard), 5) == [3] * 5


def test_retry_budget_window_slides() -> None:
    """Retries spent age out of the window: with a fake clock, the 3rd retry is refused at once
    but allowed again 61 s later."""
    now = [5000.0]
    budget = tokenguard._retry._RetryBudget(0.2, 60.0, 2, lambda: now[0])
    for _ in range(5):
        budget.note_call()
    assert budget.take()
    assert budget.take()
    assert not budget.take()  # max(2, 0.2 * 5 = 1) = 2 spent
    now[0] += 30
    assert not budget.take()
    now[0] += 31
    assert budget.take()


# -- 8. the circuit breaker --------------------------------------------------------------------


def breaker_guard(failures: int = 3, cool_down_s: float = 0.2, attempts: int = 1) -> Guard:
    return make_guard(
        fast(attempts=attempts, circuit_breaker=CircuitBreaker(failures=failures, cool_down_s=cool_down_s))
    )


@SYNC_ASYNC
@BOTH_VENDORS
async def test_circuit_opens_after_consecutive_failures_and_fails_fast(
    fake: FakeLLM, vendor: str, async_: bool
) -> None:
    """3 failing calls open the circuit: the 4th raises CircuitOpen with no request sent, and is
    recorded as a blocked row (error circuit_open, 0 attempts)."""
    guard = breaker_guard()
    client = client_for(fake, guard, vendor, async_)
    fake.fail(503, times=3)
    for _ in range(3):
        with pytest.raises((openai.InternalServerError, anthropic.ServiceUnavailableError)):
            await call(client)
    assert len(fake.requests) == 3
    with pytest.raises(CircuitOpen) as info:
        await call(client)
    assert len(fake.requests) == 3
    err = info.value
    assert isinstance(err, tokenguard.TokenguardError)
    base = OPENAI_BASE if vendor == "openai" else ANTHROPIC_BASE
    assert err.target == (vendor, base, MODEL)
    assert err.failures == 3
    assert 0 < err.retry_in_s <= 0.2
    assert err.last_error == ("InternalServerError" if vendor == "openai" else "ServiceUnavailableError")
    blocked = rows(guard)[-1]
    assert (blocked.outcome, blocked.error, blocked.attempts) == ("blocked", "circuit_open", 0)


def test_open_circuit_leaves_other_models_alone(fake: FakeLLM) -> None:
    """The circuit is per (vendor, base URL, model): another model on the same server is sent."""
    guard = breaker_guard()
    client = fake.openai(guard=guard)
    fake.fail(500, times=3)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            spend(client)
    with pytest.raises(CircuitOpen):
        spend(client)
    assert text_of(spend(client, model=OTHER_MODEL)) == TEXT
    assert len(fake.requests) == 4


def test_circuit_half_opens_after_cool_down_and_a_success_closes_it(fake: FakeLLM) -> None:
    """After the cool-down one trial call is sent; its success closes the circuit: the failure
    count starts again (one more failure does not re-open it)."""
    guard = breaker_guard(failures=3, cool_down_s=0.2)
    client = fake.openai(guard=guard)
    fake.fail(500, times=3)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            spend(client)
    with pytest.raises(CircuitOpen):
        spend(client)
    time.sleep(0.25)
    assert text_of(spend(client)) == TEXT  # the trial
    fake.fail(500)
    with pytest.raises(openai.InternalServerError):
        spend(client)
    assert text_of(spend(client)) == TEXT  # still closed: 1 failure of 3
    assert len(fake.requests) == 6


def test_failed_trial_reopens_the_circuit(fake: FakeLLM) -> None:
    """A trial that fails re-opens the circuit for another cool-down at once."""
    guard = breaker_guard(failures=2, cool_down_s=0.1)
    client = fake.openai(guard=guard)
    fake.fail(503, times=3)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            spend(client)
    time.sleep(0.15)
    with pytest.raises(openai.InternalServerError):
        spend(client)  # the trial, sent and failed
    with pytest.raises(CircuitOpen) as info:
        spend(client)
    assert info.value.failures == 3
    assert info.value.retry_in_s > 0.05
    assert len(fake.requests) == 3


async def test_only_one_trial_goes_through_while_half_open() -> None:
    """While the trial call is in flight, other calls to the same target still fail fast; once
    it succeeds, calls go through."""
    guard = breaker_guard(failures=1, cool_down_s=0.05)
    release = asyncio.Event()

    async def slow_ok(request: httpx2.Request) -> None:
        await release.wait()  # None: the FakeLLM answers

    transport = Scripted(vendor_error("openai", 503), slow_ok)
    client = transport.client(guard, "openai", async_=True)
    with pytest.raises(openai.InternalServerError):
        await call(client)
    await asyncio.sleep(0.1)
    trial = asyncio.create_task(call(client))
    while len(transport.requests) < 2:
        await asyncio.sleep(0.005)
    with pytest.raises(CircuitOpen) as info:
        await call(client)
    assert info.value.retry_in_s == 0
    release.set()
    assert text_of(await trial) == TEXT
    assert text_of(await call(client)) == TEXT
    assert len(transport.requests) == 3


@BOTH_VENDORS
def test_rejected_requests_do_not_open_the_circuit(fake: FakeLLM, vendor: str) -> None:
    """400s are the caller's fault, not the vendor's: 5 of them with failures=3 are all sent."""
    guard = breaker_guard(failures=3)
    client = client_for(fake, guard, vendor)
    fake.fail(400, times=5)
    for _ in range(5):
        with pytest.raises((openai.BadRequestError, anthropic.BadRequestError)):
            spend(client)
    assert text_of(spend(client)) == TEXT
    assert len(fake.requests) == 6


def test_a_circuit_opening_mid_call_stops_its_retries(fake: FakeLLM) -> None:
    """failures=1 with attempts=3: the first failure opens the circuit, so the call's retries
    are not sent (the vendor is resting); only 1 request reaches the server."""
    guard = breaker_guard(failures=1, cool_down_s=5, attempts=3)
    fake.fail(503, times=5)
    with pytest.raises((CircuitOpen, openai.InternalServerError)):
        spend(fake.openai(guard=guard))
    assert len(fake.requests) == 1


def test_circuit_target_and_message_carry_no_credentials() -> None:
    """A base URL with user:password in it appears in CircuitOpen without them."""
    guard = breaker_guard(failures=1, cool_down_s=5)
    transport = Scripted(vendor_error("openai", 503))
    client = transport.client(guard, "openai", base_url="http://user:hunter2@fake-openai.test:8080/v1")
    with pytest.raises(openai.InternalServerError):
        spend(client)
    with pytest.raises(CircuitOpen) as info:
        spend(client)
    assert info.value.target == ("openai", "http://***@fake-openai.test:8080/v1", MODEL)
    assert "hunter2" not in str(info.value)
    assert "user" not in info.value.target[1]


def test_circuit_log_names_the_model_and_the_url(fake: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    """The WARNING logged when a circuit opens names the model as the model and the URL as the URL."""
    guard = breaker_guard(failures=1, cool_down_s=5)
    fake.fail(503)
    caplog.set_level(logging.WARNING, logger="tokenguard")
    with pytest.raises(openai.InternalServerError):
        spend(fake.openai(guard=guard))
    opened = [r.getMessage() for r in caplog.records if "circuit" in r.getMessage()]
    assert len(opened) == 1
    assert f"model {MODEL!r} at {OPENAI_BASE}" in opened[0]


def test_trial_refused_before_sending_does_not_wedge_the_circuit() -> None:
    """A half-open trial that is refused before it is sent (a retry's budget re-check raises in
    before_attempt) gives its trial slot back: the next call is the trial, not CircuitOpen forever."""
    now = [0.0]
    retrier = tokenguard._retry.Retrier(
        Retry(attempts=1, circuit_breaker=CircuitBreaker(failures=1, cool_down_s=10)), clock=lambda: now[0]
    )

    def attempts(before: Any) -> Any:
        return tokenguard._retry.Attempts("openai", OPENAI_BASE, MODEL, "chat.completions", before, lambda e, v: None)

    def fail(number: int, left: float | None) -> Any:
        raise openai.APIConnectionError(request=httpx2.Request("POST", OPENAI_BASE))

    with pytest.raises(openai.APIConnectionError):
        retrier.run(attempts(lambda n, left: None), fail)  # opens the circuit
    with pytest.raises(CircuitOpen):
        retrier.run(attempts(lambda n, left: None), fail)
    now[0] += 10

    def refuse(number: int, left: float | None) -> None:
        raise RuntimeError("refused before sending")

    with pytest.raises(RuntimeError):
        retrier.run(attempts(refuse), fail)  # took the trial slot, then was refused
    assert retrier.run(attempts(lambda n, left: None), lambda n, left: "answered") == "answered"


def test_circuit_opened_by_a_calls_own_failure_stops_its_retries_with_the_vendor_error(fake: FakeLLM) -> None:
    """When a call's failed attempt opens the circuit, the call gives up at once with the
    vendor's error (not CircuitOpen: something was sent), without sleeping."""
    guard = make_guard(fast(attempts=4, circuit_breaker=CircuitBreaker(failures=1, cool_down_s=30)))
    fake.fail(503, headers={"retry-after-ms": "1"}, times=5)
    client = fake.openai(guard=guard)
    with pytest.raises(openai.InternalServerError):
        spend(client)
    assert len(fake.requests) == 1
    with pytest.raises(CircuitOpen):
        spend(client)
    assert len(fake.requests) == 1


def test_breaker_unit_half_open_admits_one_trial() -> None:
    """With a fake clock: open until the cool-down ends, then exactly one trial; a call that says
    nothing about the vendor (released) frees the trial slot for the next caller."""
    now = [100.0]
    breakers = tokenguard._retry._Breakers(CircuitBreaker(failures=2, cool_down_s=10), lambda: now[0])
    target = ("openai", OPENAI_BASE, MODEL)
    breakers.failed(target, "InternalServerError")
    breakers.admit(target)  # 1 failure of 2: still closed
    breakers.failed(target, "InternalServerError")
    with pytest.raises(CircuitOpen) as info:
        breakers.admit(target)
    assert info.value.retry_in_s == pytest.approx(10)
    now[0] += 10
    breakers.admit(target)  # the trial
    with pytest.raises(CircuitOpen):
        breakers.admit(target)
    breakers.released(target)
    breakers.admit(target)  # a new trial
    breakers.succeeded(target)
    breakers.admit(target)
    breakers.admit(target)


# -- 9. streams --------------------------------------------------------------------------------


async def stream_text(client: Any, **kw: Any) -> str:
    """Stream one call and return the text it carried."""
    stream = await resolve(spend(client, stream=True, **kw))
    chunks = [c async for c in stream] if hasattr(stream, "__aiter__") else list(stream)
    if isinstance(client, anthropic.Anthropic | anthropic.AsyncAnthropic):
        return "".join(e.delta.text for e in chunks if e.type == "content_block_delta")
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@SYNC_ASYNC
@BOTH_VENDORS
async def test_rate_limit_before_a_stream_starts_is_retried(fake: FakeLLM, vendor: str, async_: bool) -> None:
    """A 429 answered before any event: the call is retried and the stream then yields the full text."""
    guard = make_guard()
    fake.fail(429, headers={"retry-after-ms": "10"})
    assert await stream_text(client_for(fake, guard, vendor, async_)) == TEXT
    assert len(fake.requests) == 2
    row = only_row(guard)
    assert (row.outcome, row.attempts, row.stream) == ("ok", 2, True)


@SYNC_ASYNC
@BOTH_VENDORS
async def test_stream_broken_mid_way_is_not_restarted(fake: FakeLLM, vendor: str, async_: bool) -> None:
    """A stream whose connection breaks after 3 events raises to the caller and is not sent again
    (its events were already handed out): exactly 1 request, 1 attempt."""
    guard = make_guard()
    fake.queue(Reply(stream_error_after=3))
    with pytest.raises((openai.APIError, anthropic.APIError, httpx2.TransportError)):
        await stream_text(client_for(fake, guard, vendor, async_))
    assert len(fake.requests) == 1
    assert only_row(guard).attempts == 1


# -- 10. async cancellation --------------------------------------------------------------------


@BOTH_VENDORS
async def test_cancelled_while_sleeping_between_attempts(billed_fake: FakeLLM, vendor: str) -> None:
    """A task cancelled 50 ms into a 2 s Retry-After wait raises CancelledError at once, sends no
    retry, holds nothing and charges nothing (the 429 was not billed)."""
    guard = make_guard(fast(max_delay_s=5), budgets=[Budget(limit_usd=WORST * 100, period="total")])
    billed_fake.fail(429, headers={"retry-after-ms": "2000"}, times=3)
    started = time.monotonic()
    task = asyncio.create_task(call(client_for(billed_fake, guard, vendor, async_=True)))
    while not billed_fake.requests:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    assert held_and_spent(guard) == (0, 0)  # while sleeping, nothing is in flight and nothing is held
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - cancelled_at < 0.5
    assert time.monotonic() - started < 1.5  # the 2 s wait was cut short (and the loop never blocked)
    await asyncio.sleep(0.05)
    assert len(billed_fake.requests) == 1
    assert held_and_spent(guard) == (0, 0)
    row = only_row(guard)
    assert (row.outcome, row.error, row.attempts, row.cost_usd) == ("error", "CancelledError", 1, 0)


# -- 11. the idempotency key and the retry-count header ----------------------------------------


@SYNC_ASYNC
@BOTH_VENDORS
async def test_attempt_n_says_retry_count_n_minus_1(vendor: str, async_: bool) -> None:
    """x-stainless-retry-count is 0, 1, 2 on attempts 1, 2, 3; the caller's own headers ride every
    attempt; and if the SDK sends an idempotency key, every attempt sends the same one."""
    guard = make_guard()
    transport = Scripted(vendor_error(vendor, 500), vendor_error(vendor, 529))
    client = transport.client(guard, vendor, async_)
    await call(client, extra_headers={"X-Caller": "kept"})
    assert [r.headers["x-stainless-retry-count"] for r in transport.requests] == ["0", "1", "2"]
    assert [r.headers["x-caller"] for r in transport.requests] == ["kept"] * 3
    header = client._idempotency_header  # None in both SDKs today: they send no key
    if header is not None:
        keys = {r.headers.get(header) for r in transport.requests}
        assert len(keys) == 1
        assert None not in keys


# -- 12. configuration -------------------------------------------------------------------------

BAD_RETRY = [
    pytest.param({"attempts": 0}, "Retry.attempts", id="attempts=0"),
    pytest.param({"attempts": True}, "Retry.attempts", id="attempts=True"),
    pytest.param({"attempts": 2.0}, "Retry.attempts", id="attempts=2.0"),
    pytest.param({"attempts": 101}, "Retry.attempts", id="attempts=101"),
    pytest.param({"initial_delay_s": -0.1}, "Retry.initial_delay_s", id="initial_delay_s<0"),
    pytest.param({"initial_delay_s": "0.5"}, "Retry.initial_delay_s", id="initial_delay_s=str"),
    pytest.param({"max_delay_s": -1}, "Retry.max_delay_s", id="max_delay_s<0"),
    pytest.param({"initial_delay_s": 2, "max_delay_s": 1}, "Retry.max_delay_s", id="max_delay_s<initial_delay_s"),
    pytest.param({"max_delay_s": float("inf")}, "Retry.max_delay_s", id="max_delay_s=inf"),
    pytest.param({"deadline_s": 0}, "Retry.deadline_s", id="deadline_s=0"),
    pytest.param({"deadline_s": -5}, "Retry.deadline_s", id="deadline_s<0"),
    pytest.param({"deadline_s": float("nan")}, "Retry.deadline_s", id="deadline_s=nan"),
    pytest.param({"jitter": "yes"}, "Retry.jitter", id="jitter=str"),
    pytest.param({"retry_budget": 1.5}, "Retry.retry_budget", id="retry_budget=1.5"),
    pytest.param({"retry_budget": -0.1}, "Retry.retry_budget", id="retry_budget<0"),
    pytest.param({"retry_budget_window_s": 0}, "Retry.retry_budget_window_s", id="window=0"),
    pytest.param({"min_retries": -1}, "Retry.min_retries", id="min_retries<0"),
    pytest.param({"min_retries": 1.5}, "Retry.min_retries", id="min_retries=1.5"),
    pytest.param({"circuit_breaker": "x"}, "Retry.circuit_breaker", id="circuit_breaker=str"),
    pytest.param({"circuit_breaker": True}, "Retry.circuit_breaker", id="circuit_breaker=True"),
]


@pytest.mark.parametrize(("kwargs", "setting"), BAD_RETRY)
def test_bad_retry_settings_are_refused_by_name(kwargs: dict[str, Any], setting: str) -> None:
    """Each bad Retry setting raises ConfigurationError (a ValueError) naming the setting."""
    with pytest.raises(ConfigurationError) as info:
        Retry(**kwargs)
    assert info.value.setting == setting
    assert str(info.value).startswith(setting)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"failures": 0}, "CircuitBreaker.failures"),
        ({"failures": True}, "CircuitBreaker.failures"),
        ({"failures": 2.5}, "CircuitBreaker.failures"),
        ({"cool_down_s": 0}, "CircuitBreaker.cool_down_s"),
        ({"cool_down_s": -1}, "CircuitBreaker.cool_down_s"),
    ],
)
def test_bad_circuit_breaker_settings_are_refused_by_name(kwargs: dict[str, Any], setting: str) -> None:
    """Each bad CircuitBreaker setting raises ConfigurationError naming the setting."""
    with pytest.raises(ConfigurationError) as info:
        CircuitBreaker(**kwargs)
    assert info.value.setting == setting


@pytest.mark.parametrize("value", ["yes", 1, 0.5, Retry], ids=["str", "int", "float", "the-class"])
def test_guard_retry_must_be_a_bool_or_a_retry(value: Any) -> None:
    """Guard(retry=...) takes True, False or a Retry; anything else is refused naming "retry"."""
    with pytest.raises(ConfigurationError) as info:
        Guard(store="memory://", retry=value)
    assert info.value.setting == "retry"
    assert "retry" in str(info.value)


def test_edge_values_are_accepted() -> None:
    """The limits of each range are valid: 1 attempt, no sleeps, no deadline, budgets 0 and 1."""
    assert Retry(attempts=1).attempts == 1
    assert Retry(attempts=100).attempts == 100
    assert Retry(initial_delay_s=0, max_delay_s=0).max_delay_s == 0
    assert Retry(deadline_s=None).deadline_s is None
    assert Retry(retry_budget=None).retry_budget is None
    assert Retry(retry_budget=0).retry_budget == 0
    assert Retry(retry_budget=1).retry_budget == 1
    assert Retry(min_retries=0).min_retries == 0
    breaker = CircuitBreaker(failures=1, cool_down_s=0.01)
    assert Retry(circuit_breaker=breaker).circuit_breaker is breaker


def test_guard_retry_defaults() -> None:
    """Guard() retries by default with Retry(): 4 attempts, 0.5-30 s backoff, 120 s deadline, 20%
    retry budget, no breaker; retry=False builds no retrier; a given Retry is used as is."""
    default = Guard(store="memory://").retry
    assert isinstance(default, Retry)
    assert (default.attempts, default.initial_delay_s, default.max_delay_s, default.deadline_s) == (4, 0.5, 30, 120)
    assert (default.retry_budget, default.min_retries, default.circuit_breaker) == (0.2, 10, None)
    assert default.jitter is True
    assert Guard(store="memory://", retry=False).pipeline.retrier is None
    mine = Retry(attempts=2)
    guard = Guard(store="memory://", retry=mine)
    assert guard.retry is mine
    assert guard.pipeline.retrier is not None
    assert guard.pipeline.retrier.config is mine
    assert "attempts=2" in repr(mine)


# -- 13. judge() and retry_after() on the vendors' own exceptions ------------------------------


def _status_cases(vendor: str) -> list[Any]:
    never = [(s, False, False) for s in (400, 401, 403, 404, 413, 422)]
    retried = [(408, True, False), (409, True, False), (429, True, True)]
    retried += [(s, True, True) for s in (500, 502, 503, 504, 529)]
    return [
        pytest.param(vendor, status, retry, upstream, id=f"{vendor}-{status}")
        for status, retry, upstream in never + retried
    ]


@pytest.mark.parametrize(
    ("vendor", "status", "retry", "upstream"), _status_cases("openai") + _status_cases("anthropic")
)
def test_judge_by_status(vendor: str, status: int, retry: bool, upstream: bool) -> None:
    """Each status: retried or not, and whether it is the vendor's fault (counts for the breaker)."""
    verdict = judge(vendor_exc(vendor, status, body={"error": {"message": "x"}}))
    assert verdict == Verdict(retry, str(status), None, billed=False, upstream=upstream)


def test_judge_501_is_neither_retried_nor_the_vendors_fault() -> None:
    verdict = judge(vendor_exc("openai", 501))
    assert (verdict.retry, verdict.upstream) == (False, False)


@BOTH_VENDORS
def test_judge_402_is_never_retried(vendor: str) -> None:
    verdict = judge(vendor_exc(vendor, 402, headers={"x-should-retry": "true"}))
    assert (verdict.retry, verdict.reason) == (False, "payment_required")


@pytest.mark.parametrize(
    ("vendor", "status", "should", "retry"),
    [
        ("openai", 400, "true", True),
        ("anthropic", 404, "TRUE", True),
        ("openai", 503, "false", False),
        ("anthropic", 529, " False ", False),
        ("openai", 429, "false", False),
        ("anthropic", 500, "maybe", True),
    ],
)
def test_judge_honours_x_should_retry(vendor: str, status: int, should: str, retry: bool) -> None:
    """x-should-retry: true / false (any case, trimmed) overrides the status; other values don't."""
    verdict = judge(vendor_exc(vendor, status, headers={"x-should-retry": should}))
    assert verdict.retry is retry
    if should.strip().lower() == "false":
        assert "x-should-retry" in verdict.reason


def anthropic_body(error_code: str) -> dict[str, Any]:
    """An Anthropic error body whose details name ``error_code``."""
    return {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "x", "details": {"error_code": error_code}},
    }


MONEY_GONE = [
    pytest.param(
        "openai",
        429,
        {"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota", "code": None}},
        id="openai-type-insufficient_quota",
    ),
    pytest.param(
        "openai",
        429,
        {"error": {"message": "no", "type": "requests", "code": "insufficient_quota"}},
        id="openai-code-insufficient_quota",
    ),
    pytest.param(
        "openai",
        429,
        {"error": {"message": "hard limit", "type": "x", "code": "billing_hard_limit_reached"}},
        id="openai-billing_hard_limit_reached",
    ),
    pytest.param(
        "openai",
        429,
        {"error": {"message": "Budget has been exceeded! Current cost: 3, Max budget: 2", "type": None}},
        id="gateway-429-budget-has-been-exceeded",
    ),
    pytest.param(
        "openai",
        400,
        {"error": {"message": "ExceededBudget", "type": "budget_exceeded", "code": "400"}},
        id="gateway-400-type-budget_exceeded",
    ),
    pytest.param(
        "anthropic",
        429,
        {"type": "error", "error": {"type": "rate_limit_error", "message": "Your credit balance is too low."}},
        id="anthropic-429-credit-balance",
    ),
    pytest.param(
        "anthropic",
        429,
        anthropic_body("enforced_spend_limit_reached"),
        id="anthropic-EnforcedSpendLimitReachedError",
    ),
    pytest.param(
        "anthropic",
        429,
        anthropic_body("contract_spend_limit_reached"),
        id="anthropic-ContractSpendLimitReachedError",
    ),
    pytest.param(
        "anthropic",
        402,
        anthropic_body("linked_organization_spend_limit_reached"),
        id="anthropic-LinkedOrganizationSpendLimitReachedError",
    ),
]


@pytest.mark.parametrize(("vendor", "status", "body"), MONEY_GONE)
def test_judge_never_retries_when_the_money_is_gone(vendor: str, status: int, body: Any) -> None:
    """Quota, billing and spend-limit errors are not retried, even with x-should-retry: true."""
    verdict = judge(vendor_exc(vendor, status, headers={"x-should-retry": "true"}, body=body))
    assert not verdict.retry
    assert not verdict.upstream
    assert verdict.reason not in ("429", "400", "402")


@pytest.mark.parametrize(
    ("vendor", "message"),
    [
        (
            "openai",
            "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
            "Used 29000, Requested 1500. Please try again in 1.2s. Visit https://platform.openai.com/account/"
            "rate-limits to learn more.",
        ),
        (
            "anthropic",
            "This request would exceed the rate limit for your organization of 50,000 input tokens per minute. "
            "Please reduce the prompt length or the maximum tokens requested, or try again later. You may also "
            "contact sales to discuss your options for a rate limit increase.",
        ),
    ],
)
def test_judge_retries_plain_rate_limits(vendor: str, message: str) -> None:
    """The vendors' ordinary rate-limit wording is not mistaken for money being gone."""
    body = {"error": {"message": message, "type": "rate_limit_error" if vendor == "anthropic" else "tokens"}}
    verdict = judge(vendor_exc(vendor, 429, headers={"retry-after-ms": "1200"}, body=body))
    assert verdict == Verdict(True, "429", 1.2, billed=False, upstream=True)


def test_judge_500_mentioning_billing_is_still_retried() -> None:
    """The money words only matter on a 429: a 500 from a billing service is a server fault."""
    body = {"error": {"message": "billing service unavailable", "type": "server_error"}}
    assert judge(vendor_exc("openai", 500, body=body)).retry


TRANSPORT_FAILURES = [
    pytest.param(httpx2.ConnectError("refused"), "connection", False, id="connect-error"),
    pytest.param(httpx2.ConnectTimeout("no answer"), "timeout", False, id="connect-timeout"),
    pytest.param(httpx2.ReadTimeout("slow"), "timeout", True, id="read-timeout"),
    pytest.param(httpx2.WriteTimeout("slow"), "timeout", False, id="write-timeout"),  # the body never got there
    pytest.param(httpx2.RemoteProtocolError("closed"), "connection", True, id="remote-protocol-error"),
    pytest.param(httpx2.ReadError("reset"), "connection", True, id="read-error"),
]


@BOTH_VENDORS
@pytest.mark.parametrize(("cause", "reason", "billed"), TRANSPORT_FAILURES)
def test_judge_transport_failures(vendor: str, cause: Exception, reason: str, billed: bool) -> None:
    """Connection errors and timeouts are retried and the vendor's fault; they are billed only if
    the request had been sent (a read, not a connect, failed)."""
    exc = transport_exc(vendor, cause)
    assert judge(exc) == Verdict(True, reason, None, billed=billed, upstream=True)
    assert reached_vendor(exc) is billed


@pytest.mark.parametrize(
    "exc",
    [
        BudgetExceeded(budget=None, scope={}, spent_usd=Decimal(1), limit_usd=Decimal(1), needed_usd=Decimal("0.1")),
        tokenguard.LoopDetected(repeats=5, window_s=60, fingerprint="f" * 32),
        tokenguard.UnpricedModelError("openai", "mystery-model"),
        CircuitOpen(target=("openai", OPENAI_BASE, MODEL), failures=5, retry_in_s=3, last_error="x"),
        ValueError("a bug in the caller's code"),
        httpx2.ReadTimeout("raw, mid-stream"),
    ],
    ids=["BudgetExceeded", "LoopDetected", "UnpricedModelError", "CircuitOpen", "ValueError", "raw-ReadTimeout"],
)
def test_judge_never_retries_tokenguards_own_refusals_nor_other_errors(exc: Exception) -> None:
    verdict = judge(exc)
    assert not verdict.retry
    assert not verdict.upstream
    assert verdict.reason == type(exc).__name__


def test_judge_retries_anthropic_retryable_error() -> None:
    """anthropic.RetryableError (raised by middleware to ask for a retry) is retried."""
    assert judge(anthropic.RetryableError("again")).retry


def test_judge_carries_the_retry_after() -> None:
    verdict = judge(vendor_exc("anthropic", 529, headers={"retry-after": "3"}))
    assert (verdict.retry, verdict.retry_after_s, verdict.upstream) == (True, 3.0, True)


def _in(seconds: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "80"}, 0.08),
        ({"retry-after-ms": "1500.5"}, 1.5005),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "100", "retry-after": "9"}, 0.1),
        ({"Retry-After-Ms": "40"}, 0.04),
        ({}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after-ms": "-5"}, None),
        ({"retry-after": "0"}, None),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),  # in the past
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={x}" for k, x in v.items()) or "none",
)
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    """ms first, then seconds or an HTTP date; absent, unreadable, negative, zero, infinite or
    past values give None."""
    got = retry_after(httpx2.Headers(headers))
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_retry_after_http_date_in_the_future() -> None:
    """An HTTP date 30 s ahead reads as about 30 s (the date has whole-second resolution)."""
    got = retry_after(httpx2.Headers({"retry-after": _in(30)}))
    assert got is not None
    assert 28.5 < got <= 30.0


def test_bounded_timeout_cuts_every_part() -> None:
    """Each of connect / read / write / pool is cut to what is left; None (no limit) becomes it."""
    cut = bounded_timeout(httpx2.Timeout(600, connect=5.0), 2.0)
    assert cut.as_dict() == {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}
    assert bounded_timeout(httpx2.Timeout(1.0, read=None), 3.0).as_dict() == {
        "connect": 1.0,
        "read": 3.0,
        "write": 1.0,
        "pool": 1.0,
    }
    assert bounded_timeout(0.5, 3.0).as_dict() == dict.fromkeys(("connect", "read", "write", "pool"), 0.5)
    assert bounded_timeout(None, 4.0).as_dict() == dict.fromkeys(("connect", "read", "write", "pool"), 4.0)


def test_circuit_target_url_has_no_credentials() -> None:
    """The breaker's key (and so CircuitOpen and the logs) never holds a password from the URL."""
    assert attempts_of("openai", "https://k:s@proxy.example:8443/v1/", "m").target == (
        "openai",
        "https://***@proxy.example:8443/v1",
        "m",
    )
    assert attempts_of("anthropic", "https://api.anthropic.com/", "claude").target == (
        "anthropic",
        "https://api.anthropic.com",
        "claude",
    )


# -- 14. free endpoints and uploads ------------------------------------------------------------


@SYNC_ASYNC
@BOTH_VENDORS
async def test_free_endpoint_is_retried_and_not_recorded(vendor: str, async_: bool) -> None:
    """models.list() (no cost): a 429 then the list; 2 requests, no ledger row."""
    guard = make_guard()
    transport = Scripted(vendor_error(vendor, 429, headers={"retry-after-ms": "5"}))
    client = transport.client(guard, vendor, async_)
    page = await resolve(client.models.list())
    assert page.data == []
    assert [r.url.path.rsplit("/", 1)[-1] for r in transport.requests] == ["models", "models"]
    assert [r.headers["x-stainless-retry-count"] for r in transport.requests] == ["0", "1"]
    assert rows(guard) == []


@BOTH_VENDORS
def test_free_endpoint_rejection_is_not_retried(vendor: str) -> None:
    guard = make_guard()
    transport = Scripted(*[vendor_error(vendor, 404)] * 3)
    with pytest.raises((openai.NotFoundError, anthropic.NotFoundError)):
        transport.client(guard, vendor).models.list()
    assert len(transport.requests) == 1


def test_file_upload_is_not_retried() -> None:
    """A multipart upload (its body may not be replayable) is sent once even on a 503."""
    guard = make_guard()
    transport = Scripted(*[vendor_error("openai", 503)] * 5)
    with pytest.raises(openai.InternalServerError):
        transport.client(guard, "openai").files.create(file=("batch.jsonl", b"{}\n"), purpose="batch")
    assert len(transport.requests) == 1


# -- 15. the guard's bookkeeping across calls --------------------------------------------------


def test_stats_add_up_attempts_and_retries_over_calls(fake: FakeLLM) -> None:
    """Three calls with attempts=2: answered at once, answered on the 2nd attempt, failed after 2:
    5 attempts and 2 retries in all; each row has its own attempts."""
    guard = make_guard(fast(attempts=2))
    client = fake.openai(guard=guard)
    spend(client)
    fake.fail(503)
    spend(client)
    fake.fail(503, times=2)
    with pytest.raises(openai.InternalServerError):
        spend(client)
    assert [r.attempts for r in rows(guard)] == [1, 2, 2]
    assert [r.outcome for r in rows(guard)] == ["ok", "ok", "error"]
    stats = guard.stats()
    assert (stats.calls, stats.attempts, stats.retries, stats.errors) == (3, 5, 2, 1)


@BOTH_VENDORS
def test_retries_are_not_loop_repeats_and_a_loop_is_not_retried(fake: FakeLLM, vendor: str) -> None:
    """Under a loop detector with max_repeats=2, a call sent 4 times (3 retries) counts once: it
    and the next identical call both go through. When the loop is finally refused, LoopDetected
    is raised with nothing sent and no retry."""
    guard = make_guard(fast(attempts=4), loops=tokenguard.LoopDetector(max_repeats=2))
    client = client_for(fake, guard, vendor)
    fake.fail(503, times=3)
    assert text_of(spend(client)) == TEXT
    assert len(fake.requests) == 4
    assert text_of(spend(client)) == TEXT
    sent = len(fake.requests)
    with pytest.raises(tokenguard.LoopDetected):  # noqa: PT012 - calls until the detector refuses one
        for _ in range(5):
            spend(client)
            sent = len(fake.requests)
    assert len(fake.requests) == sent  # the refused call sent nothing
    last = rows(guard)[-1]
    assert (last.outcome, last.error, last.attempts) == ("blocked", "loop", 0)
    assert rows(guard)[0].attempts == 4


def test_circuit_open_rows_are_not_counted_as_answered_in_the_cache_hit_rate() -> None:
    """ok + cache hit + a call refused by an open circuit: 1 hit of 2 answered calls."""
    ts = datetime.now(UTC)
    ledger = [
        tokenguard.LedgerRow(ts=ts, vendor="openai", endpoint="chat.completions", model=MODEL, outcome="ok"),
        tokenguard.LedgerRow(
            ts=ts, vendor="openai", endpoint="chat.completions", model=MODEL, outcome="cache_hit", attempts=0
        ),
        tokenguard.LedgerRow(
            ts=ts,
            vendor="openai",
            endpoint="chat.completions",
            model=MODEL,
            outcome="blocked",
            error="circuit_open",
            attempts=0,
            cost_usd=None,
        ),
    ]
    assert tokenguard.Stats.of(ledger).cache_hit_rate == 0.5


def test_retries_are_logged_at_info(fake: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    """Each retry is logged (INFO, logger "tokenguard") with the reason and the wait."""
    guard = make_guard()
    fake.fail(503)
    caplog.set_level(logging.INFO, logger="tokenguard")
    spend(fake.openai(guard=guard))
    retried = [r.getMessage() for r in caplog.records if r.name == "tokenguard" and "retry 1 of" in r.getMessage()]
    assert len(retried) == 1
    assert "503" in retried[0]
    assert MODEL in retried[0]


def test_retry_module_api_is_exported() -> None:
    """Retry, CircuitBreaker and CircuitOpen are public names of the package."""
    assert {"Retry", "CircuitBreaker", "CircuitOpen"} <= set(tokenguard.__all__)
    assert tokenguard.Retry is Retry
    assert issubclass(CircuitOpen, tokenguard.TokenguardError)


def test_cut_timeouts_are_reused_and_never_longer_than_what_is_left(fake: FakeLLM) -> None:
    """The first attempts of many calls share one cut timeout per whole second left (rounded
    down: never longer than the deadline allows); another original timeout gets its own."""
    client = fake.openai(guard=make_guard(fast(deadline_s=120)))
    first = client._tg_cut(client.timeout, 119.9993)
    assert client._tg_cut(client.timeout, 119.2) is first
    assert max(first.connect or 0, first.read or 0, first.write or 0, first.pool or 0) <= 119
    assert first.original is client.timeout
    other = httpx2.Timeout(30.0)
    assert client._tg_cut(other, 119.5).original is other
    short = client._tg_cut(client.timeout, 0.25)
    assert short.read == pytest.approx(0.25)
