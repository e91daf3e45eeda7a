"""``@tokenguard.guarded`` (issue 8, item 1): scope attribution, the function-level cache, loop
detection on the arguments, retry without multiplying attempts, and cost attribution — for sync
and async functions and methods."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx2
import openai
import pytest

import tokenguard
from tokenguard.testing import ErrorReply, FakeLLM, Reply

OA = "gpt-4o"


@pytest.fixture
def fake() -> FakeLLM:
    return FakeLLM(Reply(text="Paris", input_tokens=1000, output_tokens=100))


@pytest.fixture
def guard() -> Iterator[tokenguard.Guard]:
    made = tokenguard.Guard(
        store="memory://",
        cache=tokenguard.Cache("memory"),
        retry=tokenguard.Retry(initial_delay_s=0.001, max_delay_s=0.01),
        settle_delay_s=0,
    )
    yield made
    made.close()


def rows(guard: tokenguard.Guard) -> list[tokenguard.LedgerRow]:
    return list(guard.store.rows())


def question(client: Any, q: str) -> str:
    reply = client.chat.completions.create(model=OA, messages=[{"role": "user", "content": q}])
    return str(reply.choices[0].message.content)


def rate_limited() -> openai.RateLimitError:
    response = httpx2.Response(429, request=httpx2.Request("POST", "http://fake.test/v1/chat/completions"))
    return openai.RateLimitError("slow down", response=response, body=None)


# -- bare and with options, sync and async ---------------------------------------------------------


def test_bare_decorator_uses_the_default_guard(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """@guarded with no parentheses: the default guard's cache answers the repeat."""
    tokenguard.set_default_guard(guard)
    client = fake.openai()

    @tokenguard.guarded
    def ask(q: str) -> str:
        return question(client, q)

    assert ask("capital of France?") == ask("capital of France?") == "Paris"
    assert len(fake.money_requests) == 1
    assert ask.__name__ == "ask"  # functools.wraps


def test_scope_attribution_and_the_cache(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Guarded clients inside are attributed to the decorator's scope; a repeat is a $0 cache_hit
    row of the function that saved what its first run spent."""
    client = fake.openai(guard=guard)

    @tokenguard.guarded(guard=guard, scope_from=lambda q, team: {"team": team}, user="batch")
    def ask(q: str, team: str) -> str:
        return question(client, q)

    ask("capital?", team="geo")
    ask("capital?", "geo")  # the same call, however its arguments are given
    first, hit = rows(guard)
    assert dict(first.scope) == {"function": f"{__name__}.{ask.__qualname__}", "user": "batch", "team": "geo"}
    assert first.vendor == "openai"
    assert hit.outcome == "cache_hit"
    assert hit.vendor == "function"
    assert hit.endpoint.endswith("ask")
    assert hit.cost_usd == 0
    assert hit.saved_usd == first.cost_usd > 0
    assert len(fake.money_requests) == 1
    ask("capital?", team="history")  # another argument: another call
    assert len(fake.money_requests) == 2


async def test_async_function(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    client = fake.openai(guard=guard, async_=True)

    @tokenguard.guarded(guard=guard, project="search")
    async def ask(q: str) -> str:
        reply = await client.chat.completions.create(model=OA, messages=[{"role": "user", "content": q}])
        return str(reply.choices[0].message.content)

    assert await ask("capital?") == await ask("capital?") == "Paris"
    assert len(fake.money_requests) == 1
    assert {dict(r.scope)["project"] for r in rows(guard)} == {"search"}
    results = await asyncio.gather(*(ask(f"q{i}") for i in range(5)))
    assert results == ["Paris"] * 5


def test_methods_leave_self_out_of_the_key(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Two instances asking the same question share the cached answer (self is not in the key)."""
    client = fake.openai(guard=guard)

    class Bot:
        @tokenguard.guarded(guard=guard)
        def reply(self, q: str) -> str:
            return question(client, q)

    assert Bot().reply("hello") == Bot().reply("hello") == "Paris"
    assert len(fake.money_requests) == 1


def test_results_that_are_not_json_are_returned_but_not_cached(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    client = fake.openai(guard=guard)

    @tokenguard.guarded(guard=guard)
    def ask(q: str) -> Any:
        return client.chat.completions.create(model=OA, messages=[{"role": "user", "content": q}])

    assert ask("x").choices[0].message.content == "Paris"
    ask("x")  # the inner client's own cache key does not apply (temperature unset): sent again
    assert len(fake.money_requests) == 2


# -- arguments that are not JSON -------------------------------------------------------------------


def test_arguments_that_are_not_json_are_a_clear_error(guard: tokenguard.Guard) -> None:
    @tokenguard.guarded(guard=guard)
    def work(thing: object) -> int:
        return 1

    with pytest.raises(tokenguard.ConfigurationError, match=r"thing.*object.*key=") as info:
        work(object())
    assert "work" in str(info.value)


def test_key_and_cache_false_are_the_opt_outs(guard: tokenguard.Guard) -> None:
    runs: list[int] = []

    @tokenguard.guarded(guard=guard, key=lambda thing: thing.name)
    def keyed(thing: Any) -> int:
        runs.append(1)
        return 1

    class Named:
        name = "same"

    keyed(Named())
    keyed(Named())
    assert len(runs) == 1  # the key made both the same call

    @tokenguard.guarded(guard=guard, cache=False, loops=False)
    def plain(thing: object) -> int:
        runs.append(2)
        return 2

    plain(object())
    plain(object())
    assert runs.count(2) == 2


# -- loops -----------------------------------------------------------------------------------------


def test_loop_detection_on_the_arguments(fake: FakeLLM) -> None:
    """The same function with the same arguments, max_repeats + 1 times: refused before it runs."""
    guard = tokenguard.Guard(store="memory://", loops=tokenguard.LoopDetector(max_repeats=2), settle_delay_s=0)
    runs: list[str] = []

    @tokenguard.guarded(guard=guard, cache=False)
    def job(item: str) -> str:
        runs.append(item)
        return item

    job("a")
    job("a")
    with pytest.raises(tokenguard.LoopDetected):
        job("a")
    job("b")  # other arguments: another request
    assert runs == ["a", "a", "b"]
    assert guard.stats().loops_blocked == 1
    blocked = [r for r in rows(guard) if r.outcome == "blocked"]
    assert blocked[0].error == "loop"
    assert blocked[0].endpoint.endswith("job")


# -- retry -----------------------------------------------------------------------------------------


def test_vendor_errors_from_unguarded_code_are_retried(guard: tokenguard.Guard) -> None:
    calls: list[int] = []

    @tokenguard.guarded(guard=guard, cache=False)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise rate_limited()
        return "ok"

    assert flaky() == "ok"
    assert len(calls) == 3


def test_errors_that_cannot_succeed_are_not_retried(guard: tokenguard.Guard) -> None:
    calls: list[int] = []

    @tokenguard.guarded(guard=guard, cache=False)
    def broken() -> str:
        calls.append(1)
        raise ValueError("a bug, not a rate limit")

    with pytest.raises(ValueError, match="a bug"):
        broken()
    assert len(calls) == 1


def test_attempts_never_multiply_with_guarded_clients_inside(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """A guarded client inside already retried: the decorator does not retry its error again."""
    fake.fail(503, times=20)
    client = fake.openai(guard=guard)

    @tokenguard.guarded(guard=guard, cache=False)
    def ask() -> str:
        return question(client, "x")

    with pytest.raises(openai.InternalServerError):
        ask()
    assert len(fake.money_requests) == 4  # the client's Retry(attempts=4), once


async def test_async_retry(guard: tokenguard.Guard) -> None:
    calls: list[int] = []

    @tokenguard.guarded(guard=guard, cache=False)
    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise rate_limited()
        return "ok"

    assert await flaky() == "ok"
    assert len(calls) == 2


def test_retry_false(guard: tokenguard.Guard) -> None:
    calls: list[int] = []

    @tokenguard.guarded(guard=guard, cache=False, retry=False)
    def flaky() -> str:
        calls.append(1)
        raise rate_limited()

    with pytest.raises(openai.RateLimitError):
        flaky()
    assert len(calls) == 1


# -- cost ------------------------------------------------------------------------------------------


def test_a_vendor_response_from_an_unguarded_client_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    bare = fake.vendor_openai()

    @tokenguard.guarded(guard=guard, cache=False, user="legacy")
    def legacy(q: str) -> Any:
        return bare.chat.completions.create(model=OA, messages=[{"role": "user", "content": q}])

    legacy("x")
    (row,) = rows(guard)
    assert row.vendor == "openai"
    assert row.usage.input_tokens == 1000
    assert row.usage.output_tokens == 100
    assert row.cost_usd is not None
    assert row.cost_usd > 0
    assert dict(row.scope) == {"function": f"{__name__}.{legacy.__qualname__}", "user": "legacy"}


def test_a_response_from_a_guarded_client_is_not_charged_twice(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    client = fake.openai(guard=guard)

    @tokenguard.guarded(guard=guard, cache=False)
    def ask(q: str) -> Any:
        return client.chat.completions.create(model=OA, messages=[{"role": "user", "content": q}])

    ask("x")
    assert len(rows(guard)) == 1


def test_cost_callable_for_calls_tokenguard_cannot_see(guard: tokenguard.Guard) -> None:
    guard_with_budget = tokenguard.Guard(
        store="memory://", budgets=[tokenguard.Budget(limit_usd=1, per="user")], settle_delay_s=0
    )

    @tokenguard.guarded(guard=guard_with_budget, cost=lambda result: Decimal("0.25"), user="ann")
    def other_vendor(q: str) -> str:
        return "answer"

    other_vendor("q1")
    other_vendor("q2")
    assert guard_with_budget.spent(user="ann") == Decimal("0.5")
    (status,) = guard_with_budget.budget_status(user="ann")
    assert status.spent_usd == Decimal("0.5")  # the spend counts against the budget too

    @tokenguard.guarded(guard=guard, cost=lambda result: "-1")
    def negative() -> str:
        return "x"

    with pytest.raises(tokenguard.ConfigurationError, match="cost"):
        negative()


def test_outcomes_from_the_result(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """outcome= names an outcome from the result (a cached answer counts too); the report then
    shows the cost per outcome."""
    client = fake.openai(guard=guard)

    @tokenguard.guarded(guard=guard, user="bob", outcome=lambda answer: "answered" if answer else None)
    def ask(q: str) -> str:
        return question(client, q)

    ask("a")
    ask("a")
    outcomes = list(guard.store.outcomes())  # type: ignore[attr-defined]
    expected = {"function": f"{__name__}.{ask.__qualname__}", "user": "bob"}
    assert [(o.name, dict(o.scope)) for o in outcomes] == [("answered", expected)] * 2


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"guard": "default"}, "guarded.guard"),
        ({"cache": "yes"}, "guarded.cache"),
        ({"retry": 3}, "guarded.retry"),
        ({"cost": 0.1}, "guarded.cost"),
        ({"scope_from": "user"}, "guarded.scope_from"),
        ({"user": ["a"]}, "guarded.user"),
    ],
)
def test_bad_settings_name_the_setting(kwargs: dict[str, Any], setting: str) -> None:
    with pytest.raises(tokenguard.ConfigurationError, match=setting.replace(".", r"\.")):

        @tokenguard.guarded(**kwargs)
        def f() -> None:
            return None


def test_a_failed_inner_call_is_recorded_and_raised(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    fake.queue(ErrorReply(400))
    client = fake.openai(guard=guard)

    @tokenguard.guarded(guard=guard, cache=False)
    def ask() -> str:
        return question(client, "x")

    with pytest.raises(openai.BadRequestError):
        ask()
    assert [r.outcome for r in rows(guard)] == ["error"]


def test_the_cache_never_hands_one_users_answer_to_another(guard: tokenguard.Guard) -> None:
    """A function that reads the current user's data inside: the same arguments under another
    user's scope run the function again (the scope is part of the key)."""
    runs: list[str] = []

    @tokenguard.guarded(guard=guard)
    def my_balance(question: str) -> str:
        user = tokenguard.current_scope()["user"]
        runs.append(user)
        return f"{user}'s balance"

    with tokenguard.scope(user="alice"):
        assert my_balance("balance?") == "alice's balance"
        assert my_balance("balance?") == "alice's balance"
    with tokenguard.scope(user="bob"):
        assert my_balance("balance?") == "bob's balance"
    assert runs == ["alice", "bob"]
