"""Chaos suite: hundreds of guarded calls — sync on threads and async on one event loop,
concurrent, across chat completions, the Responses API and Anthropic messages, streamed and
not — against llmock's random fault injection: 429 / 500 / 503 / 529 (and a 400 that must
never be retried) with a Retry-After, latency, and streams that are truncated, disconnected,
corrupted or stalled. Whatever the dice say:

1. every call ends in the vendor's response, the vendor's own error, a tokenguard error, or
   the raw error the *bare* SDK raises for that very fault (the control tests measure which);
2. the server never sees more requests than calls x attempts; each call's ledger row counts
   exactly the requests the server saw for it; nothing is sent again after an answer that
   cannot succeed (a 400) or after a stream started;
3. no reservation is left behind;
4. a call that succeeded is recorded at the usage the server reported, priced by
   genai-prices, not estimated; a stream the server broke is never recorded as an exact
   success nor charged $0;
5. caps hold at every moment, shared and per user.

The random faults are drawn from Python's global ``random`` (llmock's choice), seeded per
test; thread interleaving still varies, so the assertions are invariants, never counts of
faults — except that faults did happen (else the run proves nothing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import random
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price
from llmock.chaos import ChaosSettings, StreamChaos
from llmock.journal import RequestRecord
from llmock.scenarios import StreamFault
from llmock.simulation import MockResponseSettings
from llmock.testing import LLMockServer
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

import tokenguard

OA_MODEL = "gpt-4o-mini"
AN_MODEL = "claude-haiku-4-5"
MAX_TOKENS = 64  # llmock's echo reply is at most ~35 tokens: the vendor honours the output limit
ATTEMPTS = 3

# a third of requests answered with an error; llmock sends Retry-After: 1 s with them, which
# tokenguard caps at max_delay_s (10 ms here)
ERROR_RATES = {429: 0.10, 500: 0.05, 503: 0.06, 529: 0.07, 400: 0.05}
RETRYABLE = frozenset({429, 500, 503, 529})
# half the streams the server answers are broken (45%) or stalled (4%)
STREAM_FAULTS = (("truncate", 0.15), ("disconnect", 0.15), ("malformed", 0.15), ("stall", 0.04))
BREAKING = ("truncate", "disconnect", "malformed")  # a short stall only slows a stream down
STALL_S = 0.05
MAX_AFTER = 4  # a random stream fault hits one of the first MAX_AFTER chunks (llmock: 1..max)
LATENCY_MS = 2
CALL_TIMEOUT_S = 60.0  # a run not finished by then has hung

SURFACES = ("chat", "chat_stream", "responses", "responses_stream", "messages", "messages_stream", "messages_events")
STREAMED = ("chat_stream", "responses_stream", "messages_stream", "messages_events")
VENDOR = {s: ("anthropic" if s.startswith("messages") else "openai") for s in SURFACES}
VENDOR_ERROR: dict[str, type[Exception]] = {"openai": openai.APIError, "anthropic": anthropic.APIError}
STATUS_ERROR: dict[str, type[Exception]] = {"openai": openai.APIStatusError, "anthropic": anthropic.APIStatusError}
# the class each SDK raises for each injected status (mock-servers.md §2): tokenguard must not change it
STATUS_CLASS: dict[tuple[str, int], type[Exception]] = {
    ("openai", 400): openai.BadRequestError,
    ("openai", 429): openai.RateLimitError,
    ("openai", 500): openai.InternalServerError,
    ("openai", 503): openai.InternalServerError,
    ("openai", 529): openai.InternalServerError,
    ("anthropic", 400): anthropic.BadRequestError,
    ("anthropic", 429): anthropic.RateLimitError,
    ("anthropic", 500): anthropic.InternalServerError,
    ("anthropic", 503): anthropic.ServiceUnavailableError,
    ("anthropic", 529): anthropic.OverloadedError,
}

TAG = re.compile(r"<(c[a-z]\d{4})>")


# -- the server ---------------------------------------------------------------------------------


@contextlib.contextmanager
def llmock_server(*, chaos: bool) -> Iterator[LLMockServer]:
    """An in-process llmock on a free loopback port: with ``chaos``, random error statuses,
    latency and random stream faults; without, well behaved (faults are then scripted)."""
    server = LLMockServer(
        chaos=ChaosSettings(latency_ms=LATENCY_MS, error_rates=dict(ERROR_RATES)) if chaos else ChaosSettings(),
        responses=MockResponseSettings(response_style="echo", tool_mode="off"),
    )
    server.state.stream_chaos = StreamChaos(
        fault_rates=STREAM_FAULTS if chaos else (), stall_seconds=STALL_S, max_after_chunks=MAX_AFTER
    ).validated()
    with server:
        yield server


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """llmock draws its faults from the global ``random``: seed it, and put it back after."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def fault_kind(record: RequestRecord) -> str | None:
    """``"truncate"`` for ``stream:truncate@3``; ``None`` for no fault or an error status."""
    if record.fault and record.fault.startswith("stream:"):
        return record.fault.removeprefix("stream:").split("@")[0]
    return None


def journal(server: LLMockServer) -> list[RequestRecord]:
    """Every request the server saw, once none is still being served."""
    records = server.state.journal.records(wait=10.0)
    assert server.state.journal.in_flight == 0, "requests still in flight on the server"
    return records


def tag_of(record: RequestRecord) -> str | None:
    found = TAG.search(json.dumps(record.body))
    return found.group(1) if found else None


# -- the calls ----------------------------------------------------------------------------------

Pair = tuple[int, int] | None  # (input, output) tokens as the server reported them to the caller


def prompt_of(tag: str) -> str:
    return f"Chaos call <{tag}>: summarise the quarterly report in one short line, please."


def _user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _pair(usage: Any, inp: str, out: str) -> Pair:
    return None if usage is None else (getattr(usage, inp), getattr(usage, out))


def _chunks_usage(chunks: list[ChatCompletionChunk]) -> Pair:
    return next((_pair(c.usage, "prompt_tokens", "completion_tokens") for c in reversed(chunks) if c.usage), None)


def _events_usage(events: list[Any]) -> Pair:
    start = next((e for e in events if e.type == "message_start"), None)
    delta = next((e for e in reversed(events) if e.type == "message_delta"), None)
    if start is None or delta is None:
        return None
    inp = delta.usage.input_tokens if delta.usage.input_tokens is not None else start.message.usage.input_tokens
    return inp, delta.usage.output_tokens


def _chat(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    r = o.chat.completions.create(model=OA_MODEL, messages=_user(prompt), max_tokens=MAX_TOKENS)
    return r, _pair(r.usage, "prompt_tokens", "completion_tokens")


def _chat_stream(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    with o.chat.completions.create(
        model=OA_MODEL,
        messages=_user(prompt),
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    return chunks, _chunks_usage(chunks)


def _responses(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    r = o.responses.create(model=OA_MODEL, input=prompt, max_output_tokens=MAX_TOKENS)
    return r, _pair(r.usage, "input_tokens", "output_tokens")


def _responses_stream(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    with o.responses.stream(model=OA_MODEL, input=prompt, max_output_tokens=MAX_TOKENS) as stream:
        final = stream.get_final_response()
    return final, _pair(final.usage, "input_tokens", "output_tokens")


def _messages(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    m = a.messages.create(model=AN_MODEL, max_tokens=MAX_TOKENS, messages=_user(prompt))
    return m, _pair(m.usage, "input_tokens", "output_tokens")


def _messages_stream(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    with a.messages.stream(model=AN_MODEL, max_tokens=MAX_TOKENS, messages=_user(prompt)) as stream:
        final = stream.get_final_message()
    return final, _pair(final.usage, "input_tokens", "output_tokens")


def _messages_events(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    with a.messages.create(model=AN_MODEL, max_tokens=MAX_TOKENS, messages=_user(prompt), stream=True) as stream:
        events = list(stream)
    return events, _events_usage(events)


async def _a_chat(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    r = await o.chat.completions.create(model=OA_MODEL, messages=_user(prompt), max_tokens=MAX_TOKENS)
    return r, _pair(r.usage, "prompt_tokens", "completion_tokens")


async def _a_chat_stream(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    stream = await o.chat.completions.create(
        model=OA_MODEL,
        messages=_user(prompt),
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    async with stream:
        chunks = [c async for c in stream]
    return chunks, _chunks_usage(chunks)


async def _a_responses(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    r = await o.responses.create(model=OA_MODEL, input=prompt, max_output_tokens=MAX_TOKENS)
    return r, _pair(r.usage, "input_tokens", "output_tokens")


async def _a_responses_stream(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    async with o.responses.stream(model=OA_MODEL, input=prompt, max_output_tokens=MAX_TOKENS) as stream:
        final = await stream.get_final_response()
    return final, _pair(final.usage, "input_tokens", "output_tokens")


async def _a_messages(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    m = await a.messages.create(model=AN_MODEL, max_tokens=MAX_TOKENS, messages=_user(prompt))
    return m, _pair(m.usage, "input_tokens", "output_tokens")


async def _a_messages_stream(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    async with a.messages.stream(model=AN_MODEL, max_tokens=MAX_TOKENS, messages=_user(prompt)) as stream:
        final = await stream.get_final_message()
    return final, _pair(final.usage, "input_tokens", "output_tokens")


async def _a_messages_events(o: Any, a: Any, prompt: str) -> tuple[Any, Pair]:
    stream = await a.messages.create(model=AN_MODEL, max_tokens=MAX_TOKENS, messages=_user(prompt), stream=True)
    async with stream:
        events = [e async for e in stream]
    return events, _events_usage(events)


SyncOp = Callable[[Any, Any, str], tuple[Any, Pair]]
AsyncOp = Callable[[Any, Any, str], Awaitable[tuple[Any, Pair]]]
SYNC_OPS: dict[str, SyncOp] = {
    "chat": _chat,
    "chat_stream": _chat_stream,
    "responses": _responses,
    "responses_stream": _responses_stream,
    "messages": _messages,
    "messages_stream": _messages_stream,
    "messages_events": _messages_events,
}
ASYNC_OPS: dict[str, AsyncOp] = {
    "chat": _a_chat,
    "chat_stream": _a_chat_stream,
    "responses": _a_responses,
    "responses_stream": _a_responses_stream,
    "messages": _a_messages,
    "messages_stream": _a_messages_stream,
    "messages_events": _a_messages_events,
}


def well_typed(surface: str, response: Any) -> bool:
    """Whether ``response`` is what the vendor's SDK returns for this surface."""
    if surface == "chat":
        return isinstance(response, ChatCompletion)
    if surface == "chat_stream":
        return isinstance(response, list) and all(isinstance(c, ChatCompletionChunk) for c in response)
    if surface in ("responses", "responses_stream"):
        return isinstance(response, Response)
    if surface in ("messages", "messages_stream"):
        return isinstance(response, anthropic.types.Message)
    return isinstance(response, list) and all(isinstance(e, anthropic.BaseModel) for e in response)


# -- clients ------------------------------------------------------------------------------------


def _client_pair(server: LLMockServer, guard: tokenguard.Guard | None, async_: bool, **kw: Any) -> tuple[Any, Any]:
    """An OpenAI and an Anthropic client on the server: guarded by ``guard``, or bare (the
    SDKs' own, their retries off) when it is ``None``."""
    if guard is None:
        kinds: tuple[Any, Any] = (
            (openai.AsyncOpenAI, anthropic.AsyncAnthropic) if async_ else (openai.OpenAI, anthropic.Anthropic)
        )
        kw["max_retries"] = 0
    else:
        kinds = (
            (tokenguard.AsyncOpenAI, tokenguard.AsyncAnthropic) if async_ else (tokenguard.OpenAI, tokenguard.Anthropic)
        )
        kw["guard"] = guard
    return (
        kinds[0](base_url=server.base_url("openai"), api_key="sk-chaos", **kw),
        kinds[1](base_url=server.base_url("anthropic"), api_key="sk-ant-chaos", **kw),
    )


@contextlib.contextmanager
def clients(server: LLMockServer, guard: tokenguard.Guard | None = None, **kw: Any) -> Iterator[tuple[Any, Any]]:
    o, a = _client_pair(server, guard, False, **kw)
    try:
        yield o, a
    finally:
        o.close()
        a.close()


@contextlib.asynccontextmanager
async def async_clients(
    server: LLMockServer, guard: tokenguard.Guard | None = None, **kw: Any
) -> AsyncIterator[tuple[Any, Any]]:
    o, a = _client_pair(server, guard, True, **kw)
    try:
        yield o, a
    finally:
        await o.close()
        await a.close()


def fast_retry(*, retry_budget: float | None = None) -> tokenguard.Retry:
    return tokenguard.Retry(
        attempts=ATTEMPTS, initial_delay_s=0.001, max_delay_s=0.01, deadline_s=30, retry_budget=retry_budget
    )


# -- running many calls -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    tag: str
    surface: str
    user: str


@dataclass(slots=True)
class Done:
    planned: Planned
    response: Any = None
    usage: Pair = None
    error: Exception | None = None


def plan(run: str, n: int, users: tuple[str, ...]) -> list[Planned]:
    """``n`` distinct calls, the surfaces and users interleaved."""
    return [Planned(f"c{run}{i:04d}", SURFACES[i % len(SURFACES)], users[(i // 3) % len(users)]) for i in range(n)]


def run_threads(o: Any, a: Any, calls: list[Planned], workers: int) -> list[Done]:
    def one(p: Planned) -> Done:
        with tokenguard.scope(user=p.user, call=p.tag):
            try:
                response, usage = SYNC_OPS[p.surface](o, a, prompt_of(p.tag))
            except Exception as exc:
                return Done(p, error=exc)
        return Done(p, response, usage)

    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="chaos")
    futures = [pool.submit(one, p) for p in calls]
    _, hung = concurrent.futures.wait(futures, timeout=CALL_TIMEOUT_S)
    pool.shutdown(wait=not hung, cancel_futures=True)
    assert not hung, f"{len(hung)} call(s) still running after {CALL_TIMEOUT_S}s: a hang"
    return [f.result() for f in futures]


async def run_tasks(o: Any, a: Any, calls: list[Planned], concurrency: int) -> list[Done]:
    gate = asyncio.Semaphore(concurrency)

    async def one(p: Planned) -> Done:
        async with gate:
            with tokenguard.scope(user=p.user, call=p.tag):
                try:
                    response, usage = await ASYNC_OPS[p.surface](o, a, prompt_of(p.tag))
                except Exception as exc:
                    return Done(p, error=exc)
            return Done(p, response, usage)

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in calls)), CALL_TIMEOUT_S)
    except TimeoutError:
        pytest.fail(f"calls still running after {CALL_TIMEOUT_S}s: a hang")


# -- the invariants -----------------------------------------------------------------------------


def price(vendor: str, model: str, usage: tuple[int, int]) -> Decimal:
    """What genai-prices charges for the usage the server reported."""
    return calc_price(PriceUsage(input_tokens=usage[0], output_tokens=usage[1]), model, provider_id=vendor).total_price


def name_of(error: BaseException | None) -> str:
    return "ok" if error is None else f"{type(error).__module__}.{type(error).__qualname__}"


@dataclass(slots=True)
class Mix:
    """What happened in a run, for the fault-happened assertions and the report."""

    statuses: Counter[int]
    faults: Counter[str]
    outcomes: Counter[str]
    retried_calls: int
    retries: int  # requests beyond each call's first
    requests: int


def check_run(
    guard: tokenguard.Guard,
    server: LLMockServer,
    done: list[Done],
    *,
    mode: str,
    raw_allowed: dict[tuple[str, str, str], set[str]],
    retry_budget: bool,
) -> Mix:
    """Every invariant of the suite, per call and overall; returns the fault mix seen."""
    guard.flush()
    records = journal(server)
    by_tag: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        tag = tag_of(record)
        assert tag is not None, f"a request the test did not make: {record.path} {record.body!r}"
        by_tag[tag].append(record)
    rows: dict[str, list[tokenguard.LedgerRow]] = defaultdict(list)
    for row in guard.store.rows():
        rows[row.scope["call"]].append(row)

    tags = {d.planned.tag for d in done}
    assert set(by_tag) <= tags
    assert set(rows) == tags, "a call with no ledger row, or a row of no call"
    # (2) attempts within the bound, overall
    assert len(records) <= len(done) * ATTEMPTS

    outcomes: Counter[str] = Counter()
    for d in done:
        p = d.planned
        assert len(rows[p.tag]) == 1, (p, rows[p.tag])
        outcomes[check_call(d, rows[p.tag][0], by_tag.get(p.tag, []), mode, raw_allowed, retry_budget)] += 1

    # (3) no reservation left behind, in any budget, any key
    statuses = guard.budget_overview()
    assert statuses, "the guard has no budgets: nothing was reserved"
    for status in statuses:
        assert (status.held_usd, status.held_tokens) == (0, 0), status

    return Mix(
        statuses=Counter(r.status for r in records),
        faults=Counter(k for r in records if (k := fault_kind(r)) is not None),
        outcomes=outcomes,
        retried_calls=sum(1 for rs in by_tag.values() if len(rs) > 1),
        retries=sum(len(rs) - 1 for rs in by_tag.values()),
        requests=len(records),
    )


def check_call(
    d: Done,
    row: tokenguard.LedgerRow,
    sent: list[RequestRecord],
    mode: str,
    raw_allowed: dict[tuple[str, str, str], set[str]],
    retry_budget: bool,
) -> str:
    """The invariants of one call; returns how it ended ("ok", "budget_exceeded", "vendor_4xx",
    "vendor_retryable_exhausted", "raw_sdk_error_estimated", ...), for the run's mix."""
    p = d.planned
    vendor = VENDOR[p.surface]
    where = f"{p} ended {name_of(d.error)}; row {row}; server saw {[(r.status, r.fault) for r in sent]}"
    assert row.vendor == vendor, where
    assert row.stream == (p.surface in STREAMED), where
    # (2) the row counts exactly the requests the server saw, within the bound; nothing was
    # sent again after an answer that cannot succeed, nor after a stream had started
    assert row.attempts == len(sent) <= ATTEMPTS, where
    assert all(r.status in RETRYABLE for r in sent[:-1]), where
    last = sent[-1] if sent else None
    kind = fault_kind(last) if last is not None else None
    broken = kind in BREAKING

    if d.error is None:  # (1) the vendor's response
        assert well_typed(p.surface, d.response), where
        assert last is not None, where
        assert last.status == 200, where
        if not broken:
            # (4) an answer the server sent whole: the server's usage, priced, exact
            assert d.usage is not None, where
            assert (row.outcome, row.error, row.estimated) == ("ok", None, False), where
            assert (row.usage.input_tokens, row.usage.output_tokens) == d.usage, where
            assert row.usage.input_tokens > 0, where
            assert row.cost_usd == price(vendor, row.model, d.usage), where
            return "ok"
        return "ok_broken_stream_" + check_broken_stream(d, row, where)

    error = d.error
    if isinstance(error, tokenguard.TokenguardError):
        # the only tokenguard decision this suite can provoke: a cap (first attempt or a retry)
        assert isinstance(error, tokenguard.BudgetExceeded), where
        assert (row.outcome, row.error, row.estimated) == ("blocked", "budget", False), where
        assert not row.cost_usd, where
        assert last is None or last.status in RETRYABLE, where
        return "budget_exceeded"
    if isinstance(error, STATUS_ERROR[vendor]):  # (1) the vendor's own status error, unchanged
        assert last is not None, where
        assert error.status_code == last.status, where  # type: ignore[attr-defined]
        assert type(error) is STATUS_CLASS[(vendor, last.status)], where
        # an error status is not billed: released, recorded at $0, never estimated
        assert (row.outcome, row.error, row.estimated) == ("error", type(error).__name__, False), where
        assert row.cost_usd == 0, where
        if last.status not in RETRYABLE:
            return "vendor_4xx"
        if not retry_budget:  # nothing but the attempt bound stops a retryable error
            assert len(sent) == ATTEMPTS, where
        return "vendor_retryable_exhausted"
    # what is left must be a broken stream: the vendor's connection error, or the raw error
    # the bare SDK raises for the same fault
    unexplained = f"neither the vendor's error, nor tokenguard's, nor a broken stream's: {where}"
    assert last is not None, unexplained
    assert last.status == 200, unexplained
    assert broken, unexplained
    assert p.surface in STREAMED, unexplained
    if isinstance(error, VENDOR_ERROR[vendor]):
        assert isinstance(error, openai.APIConnectionError if vendor == "openai" else anthropic.APIConnectionError)
        result = "vendor_connection"
    else:
        allowed = raw_allowed.get((mode, p.surface, kind or ""), set())
        assert name_of(error) in allowed, f"{where}; the bare SDK raises only {allowed}"
        result = "raw_sdk_error"
    return f"{result}_{check_broken_stream(d, row, where)}"


def check_broken_stream(d: Done, row: tokenguard.LedgerRow, where: str) -> str:
    """(4) A stream the server truncated, cut or corrupted: never recorded as an exact success
    unless what the caller received carried that very usage; never a free call."""
    vendor = VENDOR[d.planned.surface]
    if not row.estimated:
        # exact only when the break missed everything that counts (a corrupted ping event,
        # which the SDK skips): the caller got the server's usage, and the row has it
        assert row.outcome == "ok", where
        assert d.error is None, where
        assert d.usage is not None, where
        assert (row.usage.input_tokens, row.usage.output_tokens) == d.usage, where
        assert row.cost_usd == price(vendor, row.model, d.usage), where
        return "exact"
    assert row.outcome in ("ok", "error", "incomplete"), where
    assert row.cost_usd is not None, where
    assert row.cost_usd > 0, where
    if d.usage is not None:  # an estimate never charges less than what the server reported
        assert row.cost_usd >= price(vendor, row.model, d.usage), where
    return "estimated"


def assert_faults_happened(mix: Mix) -> None:
    """A full run (~250 calls, ~300 requests) met every fault it was meant to meet. The
    expected count of each is 15 or more, so none of these fails by chance (P < 1e-6)."""
    assert mix.statuses[429] >= 1, mix
    assert min(mix.statuses[500], mix.statuses[503], mix.statuses[529]) >= 1, mix
    assert mix.statuses[400] >= 1, mix
    assert min(mix.faults[k] for k in BREAKING) >= 1, mix
    assert mix.retried_calls >= 10, mix
    assert mix.outcomes["ok"] >= 100, mix


# -- control: what the bare SDK raises for each stream fault --------------------------------------

FaultTable = dict[tuple[str, str, str, int], str]


def _control_cases() -> list[tuple[str, str, int]]:
    return [(s, k, after) for s in STREAMED for k in BREAKING for after in range(MAX_AFTER + 1)]


def _sync_outcomes(server: LLMockServer, o: Any, a: Any) -> dict[tuple[str, str, int], str]:
    out = {}
    for i, (surface, kind, after) in enumerate(_control_cases()):
        server.state.scenarios.add(StreamFault(kind, after_chunks=after))
        try:
            SYNC_OPS[surface](o, a, prompt_of(f"cs{i:04d}"))
        except Exception as exc:
            out[(surface, kind, after)] = name_of(exc)
        else:
            out[(surface, kind, after)] = "ok"
        assert not server.state.scenarios.pending(), "the scripted fault did not reach a request"
    return out


async def _async_outcomes(server: LLMockServer, o: Any, a: Any) -> dict[tuple[str, str, int], str]:
    out = {}
    for i, (surface, kind, after) in enumerate(_control_cases()):
        server.state.scenarios.add(StreamFault(kind, after_chunks=after))
        try:
            await ASYNC_OPS[surface](o, a, prompt_of(f"ca{i:04d}"))
        except Exception as exc:
            out[(surface, kind, after)] = name_of(exc)
        else:
            out[(surface, kind, after)] = "ok"
        assert not server.state.scenarios.pending(), "the scripted fault did not reach a request"
    return out


@pytest.fixture(scope="module")
def bare_faults() -> FaultTable:
    """What the bare SDKs (max_retries=0, no tokenguard) do on each scripted stream fault, at
    each chunk a random fault can hit: ``(mode, surface, kind, after) -> "ok" | error class``."""

    async def async_part(server: LLMockServer) -> dict[tuple[str, str, int], str]:
        async with async_clients(server) as (o, a):
            return await _async_outcomes(server, o, a)

    table: FaultTable = {}
    with llmock_server(chaos=False) as server:
        with clients(server) as (o, a):
            table.update({("sync", *k): v for k, v in _sync_outcomes(server, o, a).items()})
        table.update({("async", *k): v for k, v in asyncio.run(async_part(server)).items()})
    return table


@pytest.fixture(scope="module")
def raw_allowed(bare_faults: FaultTable) -> dict[tuple[str, str, str], set[str]]:
    """Per (mode, surface, fault kind): the non-vendor errors the bare SDK itself raises."""
    allowed: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for (mode, surface, kind, _), outcome in bare_faults.items():
        if outcome != "ok" and not outcome.startswith(("openai.", "anthropic.")):
            allowed[(mode, surface, kind)].add(outcome)
    return dict(allowed)


def test_bare_sdk_raises_raw_errors_on_broken_streams(bare_faults: FaultTable) -> None:
    """The premise of the raw-error category, measured: the bare SDKs themselves raise errors
    that are not theirs on broken streams (anthropic: httpx2.RemoteProtocolError on a
    disconnect; both: json.JSONDecodeError on a corrupted chunk)."""
    assert bare_faults[("sync", "messages_stream", "disconnect", 2)] == "httpx2.RemoteProtocolError"
    assert bare_faults[("async", "messages_events", "disconnect", 2)] == "httpx2.RemoteProtocolError"
    assert bare_faults[("sync", "chat_stream", "disconnect", 2)] == "openai.APIConnectionError"
    assert bare_faults[("sync", "chat_stream", "malformed", 1)] == "json.decoder.JSONDecodeError"
    assert bare_faults[("async", "messages_stream", "malformed", 0)] == "json.decoder.JSONDecodeError"
    assert bare_faults[("sync", "chat_stream", "truncate", 2)] == "ok"  # silently short


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_guarded_stream_faults_raise_what_the_bare_sdk_raises(mode: str, bare_faults: FaultTable) -> None:
    """Each scripted stream fault (truncate / disconnect / corrupt, at each of the first
    chunks), on each streamed surface, through a guarded client: the caller gets exactly what
    the bare SDK gives (the same error class, or a result) — tokenguard never changes a
    vendor's error class; the broken stream is never re-sent; the ledger marks it (estimated
    and charged > $0 — exact only when the corrupted chunk was a ping, which the SDK skips);
    and no reservation is left behind."""
    guard = tokenguard.Guard(
        store="memory://",
        budgets=[tokenguard.Budget(limit_usd=5, period="total")],
        retry=fast_retry(),
    )
    with llmock_server(chaos=False) as server:
        if mode == "sync":
            with clients(server, guard) as (o, a):
                got = _sync_outcomes(server, o, a)
        else:
            async with async_clients(server, guard) as (o, a):
                got = await _async_outcomes(server, o, a)
        records = journal(server)
    expected = {k[1:]: v for k, v in bare_faults.items() if k[0] == mode}
    assert got == expected
    rows = list(guard.store.rows())
    assert len(rows) == len(records) == len(got)  # one request per call: a broken stream is never re-sent
    for row in rows:
        where = f"{row}"
        assert row.attempts == 1, where
        if row.estimated:
            assert row.cost_usd is not None, where
            assert row.cost_usd > 0, where
        else:  # only the corrupted ping (the SDK skips it) leaves an answer whole
            assert row.outcome == "ok", where
    assert [s.held_usd for s in guard.budget_overview()] == [0]
    guard.close()


def test_stalled_stream_times_out_with_the_bare_sdk_error_class() -> None:
    """A stream that stalls past the read timeout: the guarded caller gets the class the bare
    SDK raises (openai.APITimeoutError; anthropic's raw httpx2.ReadTimeout), the stream is not
    re-sent, and the attempt is charged as possibly billed."""
    guard = tokenguard.Guard(store="memory://", budgets=[tokenguard.Budget(limit_usd=5, period="total")])
    surfaces = ("chat_stream", "messages_stream")
    outcomes: dict[str, list[str]] = defaultdict(list)
    timeout = 0.5  # far longer than a chunk takes, even on a loaded machine; far shorter than the stall
    with llmock_server(chaos=False) as server:
        with clients(server, timeout=timeout) as bare, clients(server, guard, timeout=timeout) as guarded:
            for label, (o, a) in (("bare", bare), ("guarded", guarded)):
                for i, surface in enumerate(surfaces):
                    server.state.scenarios.add(StreamFault("stall", after_chunks=1, stall_seconds=1.0))
                    try:
                        SYNC_OPS[surface](o, a, prompt_of(f"c{label[0]}{i:04d}"))
                    except Exception as exc:
                        outcomes[label].append(name_of(exc))
                    else:
                        outcomes[label].append("ok")
        records = journal(server)
    assert outcomes["bare"] == ["openai.APITimeoutError", "httpx2.ReadTimeout"]
    assert outcomes["guarded"] == outcomes["bare"]
    assert len(records) == 4
    rows = list(guard.store.rows())
    assert len(rows) == 2
    for row in rows:
        assert row.attempts == 1, row
        assert row.estimated, row
        assert row.outcome in ("error", "incomplete"), row
        assert row.cost_usd is not None
        assert row.cost_usd > 0, row
    assert [s.held_usd for s in guard.budget_overview()] == [0]
    guard.close()


# -- the chaos runs -----------------------------------------------------------------------------

USERS = ("alice", "bob", "carol", "dave", "erin")


def _generous_budgets() -> list[tokenguard.Budget]:
    # never binding: every call reserves under both, so a hold left behind shows up
    return [
        tokenguard.Budget(limit_usd=50, period="total"),
        tokenguard.Budget(limit_usd=10, period="total", per="user"),
    ]


def _store(kind: str, tmp_path: Path) -> str:
    return "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/ledger.db"


@pytest.mark.parametrize(
    ("mode", "store", "retry_budget", "seed"),
    [
        ("threads", "memory", None, 101),
        ("threads", "sqlite", 0.2, 202),
        ("asyncio", "sqlite", None, 303),
        ("asyncio", "memory", 0.2, 404),
    ],
    ids=["threads-memory", "threads-sqlite-retry-budget", "asyncio-sqlite", "asyncio-memory-retry-budget"],
)
async def test_chaos(
    mode: str,
    store: str,
    retry_budget: float | None,
    seed: int,
    tmp_path: Path,
    raw_allowed: dict[tuple[str, str, str], set[str]],
) -> None:
    """252 calls over the seven surfaces and five users — on 8 threads, or on one event loop
    16 at a time — under random errors, latency and stream faults: every invariant of the
    suite holds for every call (module docstring), and the faults did happen. With the retry
    budget on (20% of calls), the retries stay within it; with it off, a retryable error that
    reaches the caller has used every attempt."""
    guard = tokenguard.Guard(
        store=_store(store, tmp_path), budgets=_generous_budgets(), retry=fast_retry(retry_budget=retry_budget)
    )
    calls = plan(mode[0], 252, USERS)
    started = time.monotonic()
    with seeded(seed), llmock_server(chaos=True) as server:
        if mode == "threads":
            with clients(server, guard) as (o, a):
                done = await asyncio.to_thread(run_threads, o, a, calls, 8)
        else:
            async with async_clients(server, guard) as (o, a):
                done = await run_tasks(o, a, calls, concurrency=16)
        elapsed = time.monotonic() - started
        mix = check_run(
            guard,
            server,
            done,
            mode="sync" if mode == "threads" else "async",
            raw_allowed=raw_allowed,
            retry_budget=retry_budget is not None,
        )
    print(f"\n{mode}/{store}/retry_budget={retry_budget}: {mix} in {elapsed:.1f}s")
    assert_faults_happened(mix)
    assert mix.outcomes["budget_exceeded"] == 0  # the budgets here never bind
    if retry_budget is not None and elapsed < 55:  # every call started inside the budget's 60 s window
        assert mix.retries <= max(10, retry_budget * len(calls)), mix
    guard.close()


# -- caps under chaos ---------------------------------------------------------------------------

NOON = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)  # a pinned clock: the "day" cannot end mid-run
CAP = Decimal("0.004")
USER_CAP = Decimal("0.0015")
# "heavy" makes half the calls, far more than its cap allows; twelve light users share the
# other half, each well under its own cap but together well over the shared one
CAP_USERS = tuple(user for i in range(12) for user in ("heavy", f"light{i:02d}"))


class CapWatch:
    """Reads every budget key while the calls run: settled + held must never pass a limit."""

    def __init__(self, guard: tokenguard.Guard) -> None:
        self.guard = guard
        self.violations: list[tokenguard.BudgetStatus] = []
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cap-watch", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            for status in self.guard.budget_overview():
                limit = status.budget.usd
                if limit is not None and status.spent_usd + status.held_usd > limit:
                    self.violations.append(status)
            self.reads += 1

    def __enter__(self) -> CapWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize(("mode", "store", "seed"), [("threads", "sqlite", 505), ("asyncio", "memory", 606)])
async def test_caps_hold_under_chaos(
    mode: str,
    store: str,
    seed: int,
    tmp_path: Path,
    raw_allowed: dict[tuple[str, str, str], set[str]],
) -> None:
    """A tight shared day cap and a tighter per-user cap, ~170 concurrent calls under the same
    chaos: settled + held never passes either cap at any moment (watched while the calls run);
    afterwards guard.spent(), the ledger's sum and the budget counters are all within the caps;
    calls were refused by both caps and others answered; and every per-call invariant holds."""
    guard = tokenguard.Guard(
        store=_store(store, tmp_path),
        budgets=[
            tokenguard.Budget(limit_usd=CAP, period="day"),
            tokenguard.Budget(limit_usd=USER_CAP, period="day", per="user"),
        ],
        retry=fast_retry(),
        clock=lambda: NOON,
    )
    calls = plan("b" if mode == "threads" else "d", 168, CAP_USERS)
    with seeded(seed), llmock_server(chaos=True) as server:
        with CapWatch(guard) as watch:
            if mode == "threads":
                with clients(server, guard) as (o, a):
                    done = await asyncio.to_thread(run_threads, o, a, calls, 6)
            else:
                async with async_clients(server, guard) as (o, a):
                    done = await run_tasks(o, a, calls, concurrency=6)
        mix = check_run(
            guard,
            server,
            done,
            mode="sync" if mode == "threads" else "async",
            raw_allowed=raw_allowed,
            retry_budget=False,
        )
    print(f"\ncaps/{mode}/{store}: {mix}, watched {watch.reads} times")
    assert watch.reads >= 3
    assert not watch.violations, watch.violations[:3]

    rows = list(guard.store.rows())
    ledger = sum((r.cost_usd or Decimal(0) for r in rows), Decimal(0))
    assert guard.spent(period="day") == ledger
    assert ledger <= CAP
    for user in set(CAP_USERS):
        spent = guard.spent(period="day", user=user)
        assert spent == sum((r.cost_usd or Decimal(0) for r in rows if r.scope["user"] == user), Decimal(0))
        assert spent <= USER_CAP, user
    for status in guard.budget_overview():
        assert status.budget.usd is not None
        assert (status.held_usd, status.held_tokens) == (0, 0), status
        assert status.spent_usd <= status.budget.usd, status
    shared = next(s for s in guard.budget_overview() if s.budget.per is None)
    assert shared.spent_usd >= ledger  # counters round each amount up: never below the ledger

    refused = [d.error for d in done if isinstance(d.error, tokenguard.BudgetExceeded)]
    print(
        f"refused by the shared cap: {sum(e.budget.per is None for e in refused)}, by a user cap: "
        f"{Counter(e.scope.get('user') for e in refused if e.budget.per == 'user')}"
    )
    assert any(e.budget.per is None for e in refused), "the shared cap never refused a call"
    assert any(e.budget.per == "user" and e.scope == {"user": "heavy"} for e in refused), "the user cap never bit"
    assert mix.outcomes["ok"] >= len(SURFACES)
    # fewer requests here (refused calls send none): errors and broken streams still expected by the dozen
    assert sum(n for status, n in mix.statuses.items() if status >= 400) >= 5, mix
    assert sum(mix.faults[k] for k in BREAKING) >= 1, mix
    guard.close()
