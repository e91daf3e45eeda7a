"""Budgets in one process: worst-case reservation before sending, settling after, periods,
per-scope keys, token limits, holds that expire, alerts and their sinks, spend-rate trips,
``BudgetExceeded`` and configuration errors — on the memory and the SQLite store."""

from __future__ import annotations

import gc
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

import tokenguard
from tokenguard import Alert, Budget, BudgetExceeded, ConfigurationError, Guard, SpendRate
from tokenguard.providers.anthropic import MESSAGES, AnthropicAdapter
from tokenguard.providers.openai import CHAT, RESPONSES, OpenAIAdapter
from tokenguard.testing import ErrorReply, FakeLLM, Reply

MODEL = "tg-budget-model"  # priced on every guard below: $1 / M input tokens, $4 / M output tokens
IN_RATE = Decimal("0.000001")
OUT_RATE = Decimal("0.000004")
MSGS = [{"role": "user", "content": "hello"}]
T0 = datetime(2026, 3, 18, 12, 0, 10, tzinfo=UTC)  # a Wednesday
DAY0 = datetime(2026, 3, 18, tzinfo=UTC)


def usd(input_tokens: int, output_tokens: int) -> Decimal:
    """What MODEL charges for this usage."""
    return input_tokens * IN_RATE + output_tokens * OUT_RATE


BOUND = OpenAIAdapter().input_bound(CHAT, {"messages": MSGS})  # input upper bound of MSGS (54 tokens)
MAX = 20  # the max_tokens of the usual call
ACTUAL = usd(40, 15)  # what the usual reply costs: $0.000100
WORST = usd(BOUND, MAX)  # what the usual call reserves: $0.000134


class Clock:
    """A settable UTC clock for ``Guard(clock=...)``."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def fake() -> FakeLLM:
    """A fake API whose replies report 40 input and 15 output tokens (ACTUAL)."""
    return FakeLLM(Reply(input_tokens=40, output_tokens=15))


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
def make_guard(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Guard]]:
    """Builds guards on the parametrized store, with MODEL priced and a fixed clock by default."""
    made: list[Guard] = []

    def make(**kw: Any) -> Guard:
        if request.param in ("redis", "redis-cluster"):
            servers = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
            store = servers.fresh_url()
        else:
            store = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / f'ledger{len(made)}.db'}"
        kw.setdefault("clock", Clock())
        kw.setdefault("retry", False)  # one scripted failure is one failed call (retries: test_retry.py)
        g = Guard(store=store, **kw)
        g.register_price(MODEL, input_mtok="1", output_mtok="4")
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def plain_guard(**kw: Any) -> Guard:
    """A memory-store guard with MODEL priced and a fixed clock."""
    kw.setdefault("clock", Clock())
    g = Guard(store="memory://", **kw)
    g.register_price(MODEL, input_mtok="1", output_mtok="4")
    return g


def chat(client: Any, *, max_tokens: int | None = MAX, **kw: Any) -> Any:
    """One chat completion of MODEL (``max_tokens=None`` sends none)."""
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", MSGS)
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    return client.chat.completions.create(**kw)


def spend_until_refused(client: Any, limit: int = 100) -> tuple[int, BudgetExceeded]:
    """Make calls until one is refused; return how many were admitted and the refusal."""
    for admitted in range(limit):
        try:
            chat(client)
        except BudgetExceeded as err:
            return admitted, err
    raise AssertionError(f"{limit} calls and none was refused")


def only_status(g: Guard, **scope: str) -> tokenguard.BudgetStatus:
    statuses = g.budget_status(**scope)
    assert len(statuses) == 1, statuses
    return statuses[0]


def blocked_rows(g: Guard) -> list[tokenguard.LedgerRow]:
    return [r for r in g.store.rows() if r.outcome == "blocked"]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# -- 1. configuration ---------------------------------------------------------------------------


def test_float_limit_is_exact_decimal() -> None:
    """A float limit is read as the decimal it prints as: 0.1 is exactly Decimal("0.1")."""
    assert Budget(limit_usd=0.1).limit_usd == Decimal("0.1")
    assert Budget(limit_usd=0.1).usd == Decimal("0.1")


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"limit_usd": -1}, "Budget.limit_usd"),
        ({"limit_usd": "lots"}, "Budget.limit_usd"),
        ({"limit_usd": float("inf")}, "Budget.limit_usd"),
        ({"limit_usd": True}, "Budget.limit_usd"),
        ({"limit_usd": 1, "period": "fortnight"}, "Budget.period"),
        ({"limit_usd": 1, "alerts": (0, 0.5)}, "Budget.alerts"),
        ({"limit_usd": 1, "alerts": (1.5,)}, "Budget.alerts"),
        ({"limit_usd": 1, "alerts": (-0.25,)}, "Budget.alerts"),
        ({}, "Budget.limit_usd"),
        ({"limit_usd": 1, "per": "not an identifier"}, "Budget.per"),
        ({"limit_usd": 1, "action": "warn"}, "Budget.action"),
        ({"limit_tokens": -5}, "Budget.limit_tokens"),
        ({"limit_tokens": 1.5}, "Budget.limit_tokens"),
    ],
)
def test_bad_budget_is_a_configuration_error_naming_the_setting(kwargs: dict[str, Any], setting: str) -> None:
    """Each bad Budget setting raises ConfigurationError at construction, naming that setting."""
    with pytest.raises(ConfigurationError) as info:
        Budget(**kwargs)
    assert info.value.setting == setting
    assert setting in str(info.value)
    assert isinstance(info.value, ValueError)


def test_threshold_of_one_and_token_only_budget_are_valid() -> None:
    """A threshold of exactly 1 is inside (0, 1], and limit_tokens alone is a limit."""
    assert Budget(limit_usd=1, alerts=(1.0, 0.5)).alerts == (0.5, 1.0)
    assert Budget(limit_tokens=10).usd is None


@pytest.mark.parametrize(
    ("build", "setting"),
    [
        (lambda: SpendRate(max_usd_per_minute=-1), "SpendRate.max_usd_per_minute"),
        (lambda: SpendRate(max_usd_per_minute=1, action="warn"), "SpendRate.action"),  # type: ignore[arg-type]
        (lambda: SpendRate(max_usd_per_minute=1, per="no such attr"), "SpendRate.per"),
    ],
)
def test_bad_spend_rate_names_its_own_setting(build: Callable[[], SpendRate], setting: str) -> None:
    """A bad SpendRate is refused by the time the Guard is built, naming the SpendRate setting."""
    with pytest.raises(ConfigurationError) as info:
        Guard(store="memory://", budgets=[build()])
    assert info.value.setting == setting


def test_duplicate_budgets_are_refused() -> None:
    """The same Budget twice (or two with identical settings) in one Guard is a ConfigurationError."""
    b = Budget(limit_usd=5)
    with pytest.raises(ConfigurationError) as info:
        Guard(store="memory://", budgets=[b, b])
    assert info.value.setting == "budgets"
    with pytest.raises(ConfigurationError) as info:
        Guard(store="memory://", budgets=[Budget(limit_usd=5), Budget(limit_usd="5")])
    assert info.value.setting == "budgets"
    # names make identical settings two distinct budgets
    g = Guard(store="memory://", budgets=[Budget(limit_usd=5, name="a"), Budget(limit_usd=5, name="b")])
    assert len(g.budgets) == 2


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"budgets": ["$5/day"]}, "budgets"),
        ({"budgets": [Budget(limit_usd=1)], "on_alert": [print, "not callable"]}, "on_alert"),
        ({"budget_hold_s": 0}, "budget_hold_s"),
        ({"budget_hold_s": -5}, "budget_hold_s"),
        ({"default_max_output_tokens": 0}, "default_max_output_tokens"),
    ],
)
def test_bad_guard_budget_settings_are_refused(kwargs: dict[str, Any], setting: str) -> None:
    """The Guard's budget-related settings are checked at construction and named."""
    with pytest.raises(ConfigurationError) as info:
        Guard(store="memory://", **kwargs)
    assert info.value.setting == setting


def test_unpriced_model_under_usd_budget_is_refused_before_sending(fake: FakeLLM) -> None:
    """A model with no price under a USD budget raises UnpricedModelError; nothing is sent; one blocked row."""
    g = plain_guard(budgets=[Budget(limit_usd=10)])
    with pytest.raises(tokenguard.UnpricedModelError) as info:
        chat(fake.openai(guard=g), model="tg-no-price-anywhere")
    assert info.value.model == "tg-no-price-anywhere"
    assert fake.requests == []
    [row] = g.store.rows()
    assert (row.outcome, row.error, row.model) == ("blocked", "unpriced", "tg-no-price-anywhere")
    assert only_status(g).held_usd == 0


# -- 2. reservation: the worst case, held while in flight, settled or released after -------------


def test_stream_holds_the_worst_case_until_it_settles(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """An open stream holds input bound x input price + max_tokens x output price; then its actual cost."""
    g = make_guard(budgets=[Budget(limit_usd=1)])
    stream = chat(fake.openai(guard=g), max_tokens=100, stream=True, stream_options={"include_usage": True})
    during = only_status(g)
    assert during.held_usd == usd(BOUND, 100)
    assert during.held_usd == g.pipeline.prices.card("openai", MODEL).worst_case(BOUND, 100)  # type: ignore[union-attr]
    assert during.spent_usd == 0
    assert len(list(stream)) > 0
    after = only_status(g)
    assert after.held_usd == 0
    assert after.spent_usd == ACTUAL
    assert g.spent() == ACTUAL


def test_n_choices_multiply_the_output_bound(fake: FakeLLM) -> None:
    """n=3 reserves three times max_tokens of output."""
    g = plain_guard(budgets=[Budget(limit_usd="0.000001")])
    client = fake.openai(guard=g)
    with pytest.raises(BudgetExceeded) as one:
        chat(client, max_tokens=100)
    with pytest.raises(BudgetExceeded) as three:
        chat(client, max_tokens=100, n=3)
    assert one.value.needed_usd == usd(BOUND, 100)
    assert three.value.needed_usd == usd(BOUND, 300)
    assert fake.money_requests == []


_OUTPUT_LIMITS: dict[str, tuple[int, Callable[[FakeLLM, Guard], Any]]] = {
    "max_completion_tokens": (
        BOUND,
        lambda fake, g: chat(fake.openai(guard=g), max_tokens=None, max_completion_tokens=70),
    ),
    "responses": (
        OpenAIAdapter().input_bound(RESPONSES, {"input": "hello"}),
        lambda fake, g: fake.openai(guard=g).responses.create(model=MODEL, input="hello", max_output_tokens=70),
    ),
    "anthropic": (
        AnthropicAdapter().input_bound(MESSAGES, {"messages": MSGS}),
        lambda fake, g: fake.anthropic(guard=g).messages.create(model=MODEL, messages=MSGS, max_tokens=70),
    ),
}


@pytest.mark.parametrize("api", list(_OUTPUT_LIMITS))
def test_each_api_output_limit_is_the_output_bound(fake: FakeLLM, api: str) -> None:
    """max_completion_tokens, Responses' max_output_tokens and Anthropic's max_tokens bound the output."""
    bound, call = _OUTPUT_LIMITS[api]
    g = plain_guard(budgets=[Budget(limit_usd="0.000001")])
    with pytest.raises(BudgetExceeded) as info:
        call(fake, g)
    assert info.value.needed_usd == usd(bound, 70)
    assert fake.money_requests == []


def test_no_max_tokens_reserves_the_context_window(fake: FakeLLM) -> None:
    """With no max_tokens the output bound is the model's context window, so a small cap refuses a tiny prompt."""
    g = Guard(store="memory://", budgets=[Budget(limit_usd="0.05")], clock=Clock())
    client = fake.openai(guard=g)
    card = g.pipeline.prices.card("openai", "gpt-4o-mini")
    assert card is not None
    assert card.context_window == 128_000
    with pytest.raises(BudgetExceeded) as info:
        chat(client, model="gpt-4o-mini", max_tokens=None)
    assert info.value.needed_usd == card.worst_case(BOUND, 128_000)
    assert info.value.needed_usd > Decimal("0.05")
    assert fake.money_requests == []
    chat(client, model="gpt-4o-mini", max_tokens=100)  # the same prompt with a limit fits
    assert len(fake.money_requests) == 1


def test_default_max_output_tokens_without_limit_or_window(fake: FakeLLM) -> None:
    """A model with no known context window and no max_tokens reserves default_max_output_tokens of output."""
    g = plain_guard(budgets=[Budget(limit_usd="0.000001")], default_max_output_tokens=1000)
    with pytest.raises(BudgetExceeded) as info:
        chat(fake.openai(guard=g), max_tokens=None)
    assert info.value.needed_usd == usd(BOUND, 1000)


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (ErrorReply(500), openai.InternalServerError),
        (ErrorReply(429), openai.RateLimitError),
        (httpx2.ConnectError("connection refused"), openai.APIConnectionError),
    ],
    ids=["500", "429", "connect-error"],
)
def test_failed_call_releases_its_hold(
    make_guard: Callable[..., Guard], fake: FakeLLM, failure: Any, error: type[Exception]
) -> None:
    """A call the vendor does not bill (an error status, no connection) leaves nothing held and nothing spent."""
    g = make_guard(budgets=[Budget(limit_usd=WORST)])
    fake.queue(failure)
    client = fake.openai(guard=g)
    with pytest.raises(error):
        chat(client)
    status = only_status(g)
    assert (status.spent_usd, status.held_usd, status.spent_tokens, status.held_tokens) == (0, 0, 0, 0)
    chat(client)  # the whole cap is still there for the next call
    assert only_status(g).spent_usd == ACTUAL


def test_broken_stream_settles_its_hold(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A stream whose connection breaks part-way gives back its hold and is charged what it cost."""
    g = make_guard(budgets=[Budget(limit_usd=1)])
    fake.reply(input_tokens=40, output_tokens=15, stream_error_after=2)
    stream = chat(fake.openai(guard=g), stream=True)
    with pytest.raises(openai.APIConnectionError):
        list(stream)
    status = only_status(g)
    assert status.held_usd == 0
    [row] = g.store.rows()
    assert row.cost_usd is not None
    assert 0 < row.cost_usd <= WORST
    assert status.spent_usd == row.cost_usd


async def test_async_client_reserves_and_settles(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """An AsyncOpenAI client is admitted, settled and refused exactly like a sync one."""
    g = make_guard(budgets=[Budget(limit_usd="0.0003")])
    client = fake.openai(guard=g, async_=True)
    for _ in range(2):
        await chat(client)
    with pytest.raises(BudgetExceeded):
        await chat(client)
    status = only_status(g)
    assert (status.spent_usd, status.held_usd) == (2 * ACTUAL, 0)
    assert len(fake.money_requests) == 2


def test_abandoned_stream_settles_its_hold(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A stream dropped unread (del + gc) gives back its hold and is charged what it cost."""
    g = make_guard(budgets=[Budget(limit_usd=1)])
    stream = chat(fake.openai(guard=g), stream=True)
    assert only_status(g).held_usd == WORST
    del stream
    gc.collect()
    status = only_status(g)
    assert status.held_usd == 0
    [row] = g.store.rows()
    assert row.cost_usd is not None
    assert 0 < row.cost_usd <= WORST
    assert status.spent_usd == row.cost_usd


def test_refused_call_sends_nothing_and_is_recorded_blocked(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A call whose worst case does not fit raises BudgetExceeded, reaches no server and leaves a blocked row."""
    g = make_guard(budgets=[Budget(limit_usd=WORST - Decimal("0.000001"))])
    with pytest.raises(BudgetExceeded):
        chat(fake.openai(guard=g))
    assert fake.requests == []
    [row] = blocked_rows(g)
    assert row.error == "budget"
    assert only_status(g).held_usd == 0
    assert g.stats().budget_blocks == 1


def test_settled_spend_stays_under_the_cap(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """Calls are admitted while their worst case fits: spend ends at most the cap and within one worst case of it."""
    cap = Decimal("0.001")
    g = make_guard(budgets=[Budget(limit_usd=cap)])
    admitted, err = spend_until_refused(fake.openai(guard=g))
    assert admitted == 9  # 9 x $0.0001; a 10th could cost $0.000134 > $0.0001 left
    assert len(fake.money_requests) == admitted
    spent = only_status(g).spent_usd
    assert spent == admitted * ACTUAL
    assert cap - WORST < spent <= cap
    assert err.spent_usd == spent
    assert only_status(g).remaining_usd == cap - spent


# -- 3. which budgets apply: per-scope keys, "(none)", several at once ------------------------------


def test_per_user_budgets_are_independent(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """Alice exhausting her per-user budget does not touch Bob's."""
    g = make_guard(budgets=[Budget(limit_usd="0.0003", per="user")])
    client = fake.openai(guard=g)
    with tokenguard.scope(user="alice"):
        admitted, err = spend_until_refused(client)
    assert admitted == 2
    assert err.scope == {"user": "alice"}
    with tokenguard.scope(user="bob"):
        chat(client)
    alice, bob = only_status(g, user="alice"), only_status(g, user="bob")
    assert (alice.key, alice.spent_usd) == ("alice", 2 * ACTUAL)
    assert (bob.key, bob.spent_usd) == ("bob", ACTUAL)


def test_calls_without_the_attribute_share_the_none_key(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """Calls with no value for per= share one budget under the key "(none)"."""
    g = make_guard(budgets=[Budget(limit_usd="0.0003", per="user")])
    client = fake.openai(guard=g)
    chat(client)
    with tokenguard.scope(team="search"):  # a scope, but no user
        chat(client)
    status = only_status(g)
    assert (status.key, status.spent_usd) == ("(none)", 2 * ACTUAL)
    with pytest.raises(BudgetExceeded) as info:
        chat(client)
    assert info.value.scope == {"user": "(none)"}
    with tokenguard.scope(user="carol"):
        chat(client)  # a named user is not held back by the unattributed calls
    assert only_status(g, user="carol").spent_usd == ACTUAL


def test_refusal_by_one_budget_holds_nothing_in_the_others(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A call must fit every budget; when the per-user one refuses, the shared one holds nothing for it."""
    shared = Budget(limit_usd=1, period="month")
    per_user = Budget(limit_usd="0.0003", per="user")
    g = make_guard(budgets=[shared, per_user])
    client = fake.openai(guard=g)
    with tokenguard.scope(user="alice"):
        admitted, err = spend_until_refused(client)
    assert admitted == 2
    assert err.budget == per_user
    by_budget = {s.budget: s for s in g.budget_status(user="alice")}
    assert by_budget[shared].held_usd == 0
    assert by_budget[shared].spent_usd == 2 * ACTUAL
    assert by_budget[per_user].held_usd == 0
    assert by_budget[per_user].spent_usd == 2 * ACTUAL


def test_shared_budget_refuses_even_when_the_per_user_one_has_room(
    make_guard: Callable[..., Guard], fake: FakeLLM
) -> None:
    """A fresh user with room in a per-user budget is refused once the shared budget is spent."""
    shared = Budget(limit_usd="0.0003")
    per_user = Budget(limit_usd=1, per="user", period="week")
    g = make_guard(budgets=[per_user, shared])
    client = fake.openai(guard=g)
    for user in ("alice", "bob"):
        with tokenguard.scope(user=user):
            chat(client)
    with tokenguard.scope(user="carol"), pytest.raises(BudgetExceeded) as info:
        chat(client)
    assert info.value.budget == shared
    assert len(fake.money_requests) == 2
    carol = {s.budget: s for s in g.budget_status(user="carol")}
    assert (carol[per_user].held_usd, carol[per_user].spent_usd) == (0, 0)
    assert carol[shared].spent_usd == 2 * ACTUAL


# -- 4. token budgets ---------------------------------------------------------------------------


def test_token_budget_counts_input_plus_output(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A limit_tokens budget counts input + output tokens and refuses in tokens."""
    g = make_guard(budgets=[Budget(limit_tokens=200)])
    client = fake.openai(guard=g)
    chat(client)
    status = only_status(g)
    assert (status.spent_tokens, status.held_tokens, status.spent_usd) == (55, 0, 0)
    assert status.remaining_usd is None
    admitted, err = spend_until_refused(client)
    assert admitted == 2  # 3 x 55 = 165 settled; 165 + (54 + 20) > 200
    assert err.unit == "tokens"
    assert (err.spent_usd, err.limit_usd, err.needed_usd) == (165, 200, BOUND + MAX)
    assert "tokens" in str(err)
    assert len(fake.money_requests) == 3


@pytest.mark.filterwarnings("ignore::tokenguard.UnpricedModelWarning")
def test_token_budget_needs_no_price(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A model with no price runs under a token-only budget (no UnpricedModelError) and is capped in tokens."""
    g = make_guard(budgets=[Budget(limit_tokens=130)])
    client = fake.openai(guard=g)
    model = "tg-model-with-no-price"
    chat(client, model=model)
    assert only_status(g).spent_tokens == 55
    chat(client, model=model)  # 55 + 74 fits 130
    with pytest.raises(BudgetExceeded) as info:
        chat(client, model=model)  # 110 + 74 does not
    assert info.value.unit == "tokens"
    assert len(fake.money_requests) == 2
    assert only_status(g).spent_tokens == 110


def test_usd_and_token_limits_together(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A budget with both limits refuses when either would be exceeded."""
    g = make_guard(budgets=[Budget(limit_usd=1, limit_tokens=100)])
    client = fake.openai(guard=g)
    chat(client)
    with pytest.raises(BudgetExceeded) as info:
        chat(client)  # $ fits easily; 55 + 74 tokens do not
    assert info.value.unit == "tokens"
    assert (info.value.spent_usd, info.value.limit_usd, info.value.needed_usd) == (55, 100, BOUND + MAX)
    assert "tokens" in str(info.value)
    status = only_status(g)
    assert (status.spent_usd, status.spent_tokens) == (ACTUAL, 55)


# -- 5. holds that expire, periods that roll over ----------------------------------------------


def test_expired_hold_no_longer_counts(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A hold older than budget_hold_s stops counting against the budget."""
    clock = Clock()
    g = make_guard(budgets=[Budget(limit_usd=WORST + WORST / 2)], budget_hold_s=60, clock=clock)
    client = fake.openai(guard=g)
    stuck = chat(client, stream=True)  # holds WORST and is never read
    with pytest.raises(BudgetExceeded) as info:
        chat(client)
    assert info.value.held_usd == WORST
    clock.advance(seconds=59)
    assert only_status(g).held_usd == WORST
    clock.advance(seconds=2)
    assert only_status(g).held_usd == 0
    chat(client)  # fits now that the stale hold has expired
    assert only_status(g).spent_usd == ACTUAL
    stuck.close()


def test_day_budget_rolls_over_at_utc_midnight(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A day budget spent on day 1 admits again on day 2; status, spent() and alerts follow the new period."""
    clock = Clock(datetime(2026, 3, 18, 23, 59, 0, tzinfo=UTC))
    alerts: list[Alert] = []
    g = make_guard(budgets=[Budget(limit_usd="0.0003", period="day")], clock=clock, on_alert=alerts.append)
    client = fake.openai(guard=g)
    assert spend_until_refused(client)[0] == 2
    clock.now = datetime(2026, 3, 19, 0, 0, 30, tzinfo=UTC)
    fresh = only_status(g)
    assert (fresh.spent_usd, fresh.held_usd) == (0, 0)
    assert fresh.period_start == datetime(2026, 3, 19, tzinfo=UTC)
    assert fresh.resets_at == datetime(2026, 3, 20, tzinfo=UTC)
    assert g.spent(period="day") == 0
    assert spend_until_refused(client)[0] == 2
    assert only_status(g).spent_usd == 2 * ACTUAL
    assert g.spent(period="day") == 2 * ACTUAL
    assert g.spent() == 4 * ACTUAL
    day1, day2 = datetime(2026, 3, 18, tzinfo=UTC), datetime(2026, 3, 19, tzinfo=UTC)
    assert [(a.kind, a.threshold, a.period_start) for a in alerts] == [
        ("threshold", 0.5, day1),
        ("blocked", 1.0, day1),
        ("threshold", 0.5, day2),
        ("blocked", 1.0, day2),
    ]


# -- 6. BudgetExceeded --------------------------------------------------------------------------


def test_budget_exceeded_carries_the_numbers(fake: FakeLLM) -> None:
    """BudgetExceeded names the budget, scope, spent, limit, needed, held and the next UTC midnight."""
    budget = Budget(limit_usd="0.0003", period="day", per="user")
    g = plain_guard(budgets=[budget])
    with tokenguard.scope(user="alice", project="x"):
        admitted, err = spend_until_refused(fake.openai(guard=g))
    assert admitted == 2
    assert isinstance(err, tokenguard.TokenguardError)
    assert err.budget == budget
    assert err.scope == {"user": "alice"}
    assert err.spent_usd == Decimal("0.0002")
    assert err.limit_usd == Decimal("0.0003")
    assert err.needed_usd == WORST
    assert err.held_usd == 0
    assert err.resets_at == datetime(2026, 3, 19, tzinfo=UTC)
    message = str(err)
    assert "per user" in message
    assert "user=alice" in message
    assert "0.0001 left" in message
    assert "resets at 2026-03-19 00:00 UTC" in message


@pytest.mark.parametrize(
    ("period", "start", "resets"),
    [
        ("minute", datetime(2026, 3, 18, 12, 0, tzinfo=UTC), datetime(2026, 3, 18, 12, 1, tzinfo=UTC)),
        ("hour", datetime(2026, 3, 18, 12, tzinfo=UTC), datetime(2026, 3, 18, 13, tzinfo=UTC)),
        ("day", DAY0, datetime(2026, 3, 19, tzinfo=UTC)),
        ("week", datetime(2026, 3, 16, tzinfo=UTC), datetime(2026, 3, 23, tzinfo=UTC)),
        ("month", datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),
    ],
)
def test_calendar_periods_are_utc(fake: FakeLLM, period: str, start: datetime, resets: datetime) -> None:
    """Each calendar period starts and resets on UTC boundaries (weeks on Monday), in status and refusals."""
    g = plain_guard(budgets=[Budget(limit_usd="0.0001", period=period)])
    status = only_status(g)
    assert (status.period_start, status.resets_at) == (start, resets)
    with pytest.raises(BudgetExceeded) as info:
        chat(fake.openai(guard=g))
    assert info.value.resets_at == resets


def test_budget_exceeded_for_a_total_budget_never_resets(fake: FakeLLM) -> None:
    """A "total" budget's refusal has resets_at None and says it never resets."""
    g = plain_guard(budgets=[Budget(limit_usd="0.0001", period="total")])
    with pytest.raises(BudgetExceeded) as info:
        chat(fake.openai(guard=g))
    assert info.value.resets_at is None
    assert info.value.scope == {}
    assert "never resets" in str(info.value)
    assert "0.0001 left" in str(info.value)


# -- 7. alerts ---------------------------------------------------------------------------------


def test_thresholds_fire_once_each(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """50/75/90% each fire once, as kind "threshold", with the key, spend and period start."""
    alerts: list[Alert] = []
    budget = Budget(limit_usd="0.001", per="user")
    g = make_guard(budgets=[budget], on_alert=alerts.append)
    with tokenguard.scope(user="alice"):
        admitted, _ = spend_until_refused(fake.openai(guard=g))
    assert admitted == 9
    thresholds = [a for a in alerts if a.kind == "threshold"]
    assert [(a.threshold, a.spent_usd) for a in thresholds] == [
        (0.5, Decimal("0.0005")),
        (0.75, Decimal("0.0008")),
        (0.9, Decimal("0.0009")),
    ]
    for a in thresholds:
        assert (a.budget, a.key, a.limit_usd, a.period_start) == (budget, "alice", Decimal("0.001"), DAY0)
        assert "alice" in a.message


def test_one_call_crossing_several_thresholds_fires_each(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """A single settle that jumps from 0 to 100% fires 50, 75 and 90% once each, in order."""
    alerts: list[Alert] = []
    g = make_guard(budgets=[Budget(limit_usd=WORST)], on_alert=alerts.append)
    fake.reply(input_tokens=BOUND, output_tokens=MAX)  # costs exactly the worst case, i.e. the whole cap
    chat(fake.openai(guard=g))
    g.flush()  # alerts come from settling, which runs off the caller's path
    assert [(a.kind, a.threshold, a.spent_usd) for a in alerts] == [
        ("threshold", 0.5, WORST),
        ("threshold", 0.75, WORST),
        ("threshold", 0.9, WORST),
    ]
    assert only_status(g).remaining_usd == 0


def test_blocked_alert_fires_once_per_period_and_key(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """Many refusals of one key in one period raise one "blocked" alert; another key gets its own."""
    alerts: list[Alert] = []
    g = make_guard(budgets=[Budget(limit_usd="0.0001", per="user", alerts=())], on_alert=alerts.append)
    client = fake.openai(guard=g)
    for user in ("alice", "alice", "alice", "bob", "bob"):
        with tokenguard.scope(user=user), pytest.raises(BudgetExceeded):
            chat(client)
    assert [(a.kind, a.key, a.threshold) for a in alerts] == [("blocked", "alice", 1.0), ("blocked", "bob", 1.0)]
    assert alerts[0].period_start == DAY0
    assert len(blocked_rows(g)) == 5


def test_custom_thresholds(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """alerts=(0.2,) fires at 20% only, not at the default 50/75/90%."""
    alerts: list[Alert] = []
    g = make_guard(budgets=[Budget(limit_usd="0.001", alerts=(0.2,))], on_alert=alerts.append)
    client = fake.openai(guard=g)
    chat(client)
    g.flush()
    assert alerts == []
    for _ in range(7):
        chat(client)
    g.flush()
    assert [(a.kind, a.threshold, a.key) for a in alerts] == [("threshold", 0.2, None)]


def test_failing_sink_does_not_fail_the_call(fake: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    """A sink that raises is logged; the call returns and the other sinks still get the alert."""
    got: list[Alert] = []

    def broken(alert: Alert) -> None:
        raise RuntimeError("sink down")

    g = plain_guard(budgets=[Budget(limit_usd="0.0002")], on_alert=[broken, got.append])
    with caplog.at_level(logging.ERROR, logger="tokenguard"):
        reply = chat(fake.openai(guard=g))
        g.flush()
    assert reply.choices[0].message.content
    assert [(a.kind, a.threshold) for a in got] == [("threshold", 0.5)]
    assert any("alert sink" in r.getMessage() and r.exc_info for r in caplog.records)


def test_default_sink_logs_a_warning(fake: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    """With no on_alert, alerts are warnings on the "tokenguard" logger with structured fields."""
    g = plain_guard(budgets=[Budget(limit_usd="0.0002")])
    with caplog.at_level(logging.WARNING, logger="tokenguard"):
        chat(fake.openai(guard=g))
        g.flush()
    [record] = [r for r in caplog.records if getattr(r, "tokenguard_event", None) == "budget_alert"]
    assert record.name == "tokenguard"
    assert record.levelno == logging.WARNING
    assert (record.kind, record.threshold, record.limit_usd) == ("threshold", 0.5, "0.0002")  # type: ignore[attr-defined]
    assert "50%" in record.getMessage()


class _Hook(BaseHTTPRequestHandler):
    """Records each POSTed JSON body; answers once the server's gate opens."""

    server: Any

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.received.append((self.headers.get("content-type"), json.loads(body)))
        self.server.gate.wait(5)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook_server() -> Iterator[Any]:
    """A loopback HTTP server recording webhook POSTs (open gate by default)."""
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received = []
    server.gate = threading.Event()
    server.gate.set()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.gate.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_webhook_posts_slack_compatible_json(fake: FakeLLM, webhook_server: Any) -> None:
    """WebhookAlerts POSTs each alert as JSON with a "text" field, from a background thread."""
    webhook_server.gate.clear()  # the webhook will not answer until the call has returned
    url = f"http://127.0.0.1:{webhook_server.server_address[1]}/hook"
    g = plain_guard(budgets=[Budget(limit_usd="0.0002", per="user")], on_alert=tokenguard.WebhookAlerts(url))
    started = time.monotonic()
    with tokenguard.scope(user="alice"):
        chat(fake.openai(guard=g))
    assert time.monotonic() - started < 2  # the call did not wait for the webhook
    assert wait_for(lambda: len(webhook_server.received) == 1)
    webhook_server.gate.set()
    content_type, body = webhook_server.received[0]
    assert content_type == "application/json"
    assert "50%" in body["text"]
    assert "alice" in body["text"]
    assert (body["kind"], body["key"], body["threshold"], body["limit_usd"]) == ("threshold", "alice", 0.5, "0.0002")


def test_failing_webhook_does_not_fail_the_call(fake: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    """A webhook to a closed port is logged as an error; the call still returns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = plain_guard(
        budgets=[Budget(limit_usd="0.0002")], on_alert=tokenguard.WebhookAlerts(f"http://127.0.0.1:{port}/hook")
    )
    with caplog.at_level(logging.ERROR, logger="tokenguard"):
        reply = chat(fake.openai(guard=g))
        assert reply.choices[0].message.content
        assert wait_for(lambda: any("webhook alert" in r.getMessage() for r in caplog.records))
    assert len(fake.money_requests) == 1


def test_webhook_url_is_checked() -> None:
    """WebhookAlerts refuses a URL that is not http(s)."""
    with pytest.raises(ConfigurationError) as info:
        tokenguard.WebhookAlerts("ftp://example.invalid/hook")
    assert info.value.setting == "WebhookAlerts.url"


# -- 8. spend-rate trip ------------------------------------------------------------------------


def test_spend_rate_blocks_within_the_minute_and_admits_the_next(
    make_guard: Callable[..., Guard], fake: FakeLLM
) -> None:
    """SpendRate blocks a job spending too fast in a calendar minute and admits it again the next minute."""
    clock = Clock()
    g = make_guard(budgets=[SpendRate(max_usd_per_minute="0.0003", per="job")], clock=clock)
    client = fake.openai(guard=g)
    with tokenguard.scope(job="crawler"):
        admitted, err = spend_until_refused(client)
        assert admitted == 2
        assert err.budget.period == "minute"
        assert err.resets_at == datetime(2026, 3, 18, 12, 1, tzinfo=UTC)
        clock.now = datetime(2026, 3, 18, 12, 1, tzinfo=UTC)
        chat(client)
    with tokenguard.scope(job="other"):
        chat(client)  # another job has its own rate
    assert len(fake.money_requests) == 4


def test_spend_rate_alert_only_never_blocks(make_guard: Callable[..., Guard], fake: FakeLLM) -> None:
    """action="alert" admits every call and fires one "exceeded" alert once the rate is passed."""
    alerts: list[Alert] = []
    g = make_guard(budgets=[SpendRate(max_usd_per_minute="0.0003", action="alert")], on_alert=alerts.append)
    client = fake.openai(guard=g)
    for _ in range(6):
        chat(client)
    g.flush()
    assert len(fake.money_requests) == 6
    assert [(a.kind, a.spent_usd) for a in alerts] == [("exceeded", 3 * ACTUAL)]
    assert alerts[0].period_start == datetime(2026, 3, 18, 12, 0, tzinfo=UTC)
    assert blocked_rows(g) == []
