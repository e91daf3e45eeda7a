"""The pytest plugin (tokenguard.pytest_plugin), used as an application would use it.

The first part is the example of docs/testing.md as real code: a framework-free handler
that answers 402 over budget, tested through the plugin's fixtures. Then each fixture,
marker option and helper (failure messages included), the interception of clients the
application builds itself, and, in fresh pytest processes, that the entry point loads the
plugin and that docs/testing.md runs as written.
"""

from __future__ import annotations

import functools
import os
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

import tokenguard
from tokenguard import pytest_plugin
from tokenguard.pytest_plugin import TokenguardHarness, intercept
from tokenguard.testing import ErrorReply, FakeLLM, Reply

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
FRIDAY = datetime(2025, 3, 14, 15, 0, tzinfo=UTC)
ONE_DEFAULT_CALL = Decimal("0.00000435")  # gpt-4o-mini: 9 x $0.15/M + 5 x $0.60/M
# what a fresh run needs to be quiet: pytest-asyncio warns when its loop scope is left unset
_INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
# hypothesis's plugin costs a fresh run about a second (two in-process) and plays no part here
_QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


# -- the application of docs/testing.md --------------------------------------------------------

GUARD_SETTINGS: dict[str, Any] = {
    "budgets": [tokenguard.Budget(limit_usd="0.05", period="day", per="user")],
    "cache": True,
    "loops": True,
}


@functools.cache
def llm() -> tokenguard.OpenAI:
    # built once, by whichever test comes first, with no guard=: each call asks for the default guard
    return tokenguard.OpenAI()


def answer(user: str, question: str) -> str:
    with tokenguard.scope(user=user):
        completion = llm().chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": question}],
            max_tokens=200,
            temperature=0,
        )
    return completion.choices[0].message.content or ""


def handle_ask(user: str, question: str) -> tuple[int, dict[str, Any]]:
    try:
        return 200, {"answer": answer(user, question)}
    except tokenguard.BudgetExceeded as exc:
        return 402, {
            "error": "You have used today's AI budget.",
            "detail": str(exc),
            "resets_at": exc.resets_at.isoformat() if exc.resets_at else None,
        }
    except tokenguard.LoopDetected as exc:
        return 429, {"error": "This question keeps coming back; try again later.", "detail": str(exc)}


app_marker = pytest.mark.tokenguard(**GUARD_SETTINGS, clock=lambda: FRIDAY)


@app_marker
def test_app_under_budget_the_user_gets_an_answer(tokenguard_harness: TokenguardHarness) -> None:
    tokenguard_harness.reply(text="Paris.", input_tokens=20, output_tokens=2)

    assert handle_ask("alice", "Capital of France?") == (200, {"answer": "Paris."})

    tokenguard_harness.assert_spent("0.0000042", user="alice")
    tokenguard_harness.assert_spent(0, user="bob")
    tokenguard_harness.assert_sent(1)
    tokenguard_harness.assert_calls(1, user="alice")
    tokenguard_harness.assert_blocked(0)
    (request,) = tokenguard_harness.sent
    assert request.path == "/v1/chat/completions"  # the real base URL's path, answered by the fake
    assert request.headers["authorization"] == "Bearer sk-fake-test-key"


@app_marker
def test_app_over_budget_the_user_gets_a_402_and_nothing_is_sent(tokenguard_harness: TokenguardHarness) -> None:
    tokenguard_harness.reply(input_tokens=400_000, output_tokens=1_000)
    assert handle_ask("alice", "Summarise this contract: ...")[0] == 200
    tokenguard_harness.assert_spent("0.0606", user="alice")

    status, body = handle_ask("alice", "And this one?")

    assert status == 402
    assert "budget $0.05/day per user for user=alice exceeded" in body["detail"]
    assert body["resets_at"] == "2025-03-15T00:00:00+00:00"
    tokenguard_harness.assert_blocked(1, reason="budget", user="alice")
    tokenguard_harness.assert_blocked(reason="budget")
    tokenguard_harness.assert_sent(1)
    assert handle_ask("bob", "Hello?")[0] == 200
    tokenguard_harness.assert_sent(2)
    assert tokenguard_harness.stats().budget_blocks == 1


@app_marker
def test_app_a_repeated_question_is_answered_from_the_cache_at_no_cost(tokenguard_harness: TokenguardHarness) -> None:
    first = handle_ask("alice", "What is tokenguard?")
    second = handle_ask("alice", "What is tokenguard?")

    assert first == second
    tokenguard_harness.assert_cache_hits(1)
    tokenguard_harness.assert_cache_hits(1, user="alice")
    tokenguard_harness.assert_sent(1)
    tokenguard_harness.assert_spent(ONE_DEFAULT_CALL)
    assert [row.outcome for row in tokenguard_harness.rows()] == ["ok", "cache_hit"]
    assert tokenguard_harness.rows()[-1].cost_usd == 0


@app_marker
def test_app_a_rate_limit_is_retried_and_the_user_never_sees_it(tokenguard_harness: TokenguardHarness) -> None:
    tokenguard_harness.fail(429, headers={"retry-after": "20"})

    assert handle_ask("alice", "Hello?")[0] == 200

    tokenguard_harness.assert_retries(1)
    tokenguard_harness.assert_sent(2)
    tokenguard_harness.assert_calls(1)
    tokenguard_harness.assert_spent(ONE_DEFAULT_CALL)


@app_marker
def test_app_a_client_stuck_in_a_loop_is_stopped(tokenguard_harness: TokenguardHarness) -> None:
    for _ in range(3):
        answer("carol", "Are we there yet?")

    with pytest.raises(tokenguard.LoopDetected):
        answer("carol", "Are we there yet?")

    assert handle_ask("carol", "Are we there yet?")[0] == 429
    tokenguard_harness.assert_blocked(2, reason="loop", user="carol")
    tokenguard_harness.assert_sent(1)
    tokenguard_harness.assert_cache_hits(2)


# -- tokenguard_guard and the marker -----------------------------------------------------------


def test_guard_defaults(tokenguard_guard: tokenguard.Guard) -> None:
    """In memory, settled before a call returns, fast retries, no budgets / cache / loops."""
    assert tokenguard.default_guard() is tokenguard_guard
    assert tokenguard_guard.store.url == "memory://"
    assert tokenguard_guard.budgets == ()
    assert tokenguard_guard.cache is None
    assert tokenguard_guard.loops is None
    retry = tokenguard_guard.retry
    assert retry is not None
    assert (retry.attempts, retry.max_delay_s, retry.jitter, retry.retry_budget) == (4, 0.01, False, None)


@pytest.fixture
def previous_default() -> Any:
    """A default guard set before tokenguard_guard, which must find it again at teardown."""
    before = tokenguard.Guard(store="memory://")
    tokenguard.set_default_guard(before)
    yield before
    assert tokenguard.default_guard() is before, "tokenguard_guard did not restore the default guard"
    before.close()


def test_guard_restores_the_previous_default(
    previous_default: tokenguard.Guard, tokenguard_guard: tokenguard.Guard
) -> None:
    assert tokenguard.default_guard() is tokenguard_guard is not previous_default


@pytest.mark.tokenguard(cache=True, loops=True, retry=False, budgets=[tokenguard.Budget(limit_usd=1)])
def test_marker_passes_guard_arguments(tokenguard_guard: tokenguard.Guard) -> None:
    assert tokenguard_guard.cache is not None
    assert tokenguard_guard.cache.backend_name == "memory"  # never the user's disk cache
    assert tokenguard_guard.loops is not None
    assert tokenguard_guard.retry is None
    assert [b.usd for b in tokenguard_guard.budgets] == [Decimal(1)]


@pytest.mark.tokenguard(retry=True, store="memory://")
def test_marker_retry_true_is_the_fast_retry(tokenguard_guard: tokenguard.Guard) -> None:
    assert tokenguard_guard.retry is not None
    assert tokenguard_guard.retry.max_delay_s == 0.01


@pytest.mark.tokenguard(retry=False)
def test_without_retry_a_429_reaches_the_caller(tokenguard_harness: TokenguardHarness) -> None:
    tokenguard_harness.fail(429)
    with pytest.raises(openai.RateLimitError):
        tokenguard_harness.openai.chat.completions.create(model="gpt-4o-mini", messages=[])
    with pytest.raises(AssertionError, match=r"expected 1 retry, got 0 \(this guard does not retry: retry=False\)"):
        tokenguard_harness.assert_retries(1)


@pytest.mark.tokenguard(loops=True, cache=False)
class TestMarkersMerge:
    @pytest.mark.tokenguard(cache=True)
    def test_the_closest_marker_wins(self, tokenguard_guard: tokenguard.Guard) -> None:
        assert tokenguard_guard.loops is not None
        assert tokenguard_guard.cache is not None

    def test_the_class_marker_applies(self, tokenguard_guard: tokenguard.Guard) -> None:
        assert tokenguard_guard.loops is not None
        assert tokenguard_guard.cache is None


def test_bad_markers_fail_the_test_with_a_clear_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.tokenguard(caches=True)
        def test_typo(tokenguard_guard):
            pass

        @pytest.mark.tokenguard(retry=3)
        def test_bad_value(tokenguard_guard):
            pass

        @pytest.mark.tokenguard(True)
        def test_positional(tokenguard_guard):
            pass
        """
    )
    pytester.makeini(_INI)
    result = pytester.runpytest_inprocess(*_QUIET)
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.tokenguard(...): *unexpected keyword argument 'caches'*",
            "*@pytest.mark.tokenguard(...): retry=3: must be True, False or a tokenguard.Retry*",
            "*@pytest.mark.tokenguard takes keyword arguments only (Guard settings), got (True,)*",
        ]
    )


# -- the fake's clients ------------------------------------------------------------------------


def test_openai_fixture(
    tokenguard_openai: tokenguard.OpenAI, tokenguard_fake: FakeLLM, tokenguard_guard: tokenguard.Guard
) -> None:
    tokenguard_fake.reply(text="ok", input_tokens=1_000_000, output_tokens=0)
    out = tokenguard_openai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert out.choices[0].message.content == "ok"
    assert tokenguard_openai.guard is tokenguard_guard
    assert tokenguard_guard.spent() == Decimal("0.15")
    assert len(tokenguard_fake.money_requests) == 1


def test_anthropic_fixture(tokenguard_anthropic: tokenguard.Anthropic, tokenguard_guard: tokenguard.Guard) -> None:
    with tokenguard.scope(team="search"):
        tokenguard_anthropic.messages.create(
            model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
        )
    stats = tokenguard_guard.stats(team="search")
    assert (stats.calls, stats.input_tokens, stats.output_tokens) == (1, 9, 5)
    assert stats.spent_usd > 0


async def test_async_fixtures(
    tokenguard_async_openai: tokenguard.AsyncOpenAI,
    tokenguard_async_anthropic: tokenguard.AsyncAnthropic,
    tokenguard_guard: tokenguard.Guard,
) -> None:
    await tokenguard_async_openai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    await tokenguard_async_anthropic.messages.create(
        model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
    )
    assert tokenguard_guard.stats().calls == 2
    assert {row.vendor for row in tokenguard_guard.store.rows()} == {"openai", "anthropic"}


def test_docs_stream_example(
    tokenguard_openai: tokenguard.OpenAI, tokenguard_fake: FakeLLM, tokenguard_guard: tokenguard.Guard
) -> None:
    """The "Without the harness" example of docs/testing.md."""
    tokenguard_fake.reply(text="A long summary", output_tokens=50, stream_error_after=3)
    with pytest.raises(openai.APIConnectionError):
        for _ in tokenguard_openai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Summarise"}], stream=True
        ):
            pass
    assert tokenguard_guard.stats().estimated_calls == 1


async def test_harness_async_clients(tokenguard_harness: TokenguardHarness) -> None:
    await tokenguard_harness.async_openai.chat.completions.create(model="gpt-4o-mini", messages=[])
    await tokenguard_harness.async_anthropic.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=[])
    tokenguard_harness.assert_calls(2)
    tokenguard_harness.assert_sent(2)


def test_harness_scripting_delegates_to_the_fake(tokenguard_harness: TokenguardHarness) -> None:
    tokenguard_harness.queue(Reply(text="one"), ErrorReply(400, "bad")).reply(text="three")
    client = tokenguard_harness.openai
    assert client.chat.completions.create(model="gpt-4o-mini", messages=[]).choices[0].message.content == "one"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert client.chat.completions.create(model="gpt-4o-mini", messages=[]).choices[0].message.content == "three"
    tokenguard_harness.assert_calls(3)
    assert tokenguard_harness.stats().errors == 1
    assert tokenguard_harness.openai is client  # built once
    assert tokenguard_harness.anthropic.guard is tokenguard_harness.guard


# -- the helpers' checks and messages ----------------------------------------------------------


def test_assert_spent_takes_decimal_str_int_and_float(tokenguard_harness: TokenguardHarness) -> None:
    tokenguard_harness.reply(input_tokens=1_000_000, output_tokens=0)  # $0.15
    tokenguard_harness.openai.chat.completions.create(model="gpt-4o-mini", messages=[])
    for amount in (Decimal("0.15"), Decimal("0.150000"), "0.15", 0.15):
        tokenguard_harness.assert_spent(amount)
    tokenguard_harness.assert_spent(0, period="day", user="nobody")
    with pytest.raises(AssertionError, match=r"expected \$0\.1 spent \(total\), got \$0\.15"):
        tokenguard_harness.assert_spent("0.1")
    with pytest.raises(AssertionError, match=r"expected \$0\.15 spent \(day; user=alice\), got \$0\n"):
        tokenguard_harness.assert_spent(0.15, period="day", user="alice")
    with pytest.raises(ValueError, match="not an amount in USD: 'abc'"):
        tokenguard_harness.assert_spent("abc")
    with pytest.raises(TypeError, match="expected an amount in USD"):
        tokenguard_harness.assert_spent(True)


@pytest.mark.tokenguard(budgets=[tokenguard.Budget(limit_usd="0.01", per="user")])
def test_failure_messages_list_the_ledger(tokenguard_harness: TokenguardHarness) -> None:
    tokenguard_harness.reply(input_tokens=100_000, output_tokens=0)  # $0.015: over the cap
    with tokenguard.scope(user="alice"):
        tokenguard_harness.openai.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=10)
        with pytest.raises(tokenguard.BudgetExceeded):
            tokenguard_harness.openai.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=10)

    with pytest.raises(AssertionError) as failure:
        tokenguard_harness.assert_blocked(0, reason="budget", user="alice")
    lines = str(failure.value).splitlines()
    assert lines[0] == "tokenguard: expected 0 call(s) blocked for 'budget' (user=alice), got 1 (reasons seen: budget)"
    assert lines[1] == "ledger: 2 call(s), $0.015"
    assert re.fullmatch(
        r" +1\. ok +openai chat\.completions gpt-4o-mini +\[user=alice\] +\$0\.015 +attempts=1", lines[2]
    )
    assert re.fullmatch(
        r" +2\. blocked:budget +openai chat\.completions gpt-4o-mini +\[user=alice\] +- +attempts=0", lines[3]
    )
    assert lines[4] == "fake API: 1 money-spending request(s) received"

    with pytest.raises(
        AssertionError, match=r"expected 1 call\(s\) blocked for 'loop', got 0 \(reasons seen: budget\)"
    ):
        tokenguard_harness.assert_blocked(1, reason="loop")
    with pytest.raises(
        AssertionError, match=r"expected at least 1 call\(s\) blocked \(user=bob\), got 0 \(reasons seen: none\)"
    ):
        tokenguard_harness.assert_blocked(user="bob")
    with pytest.raises(AssertionError, match=r"expected 3 call\(s\) recorded, got 2"):
        tokenguard_harness.assert_calls(3)
    with pytest.raises(AssertionError, match=r"expected 2 request\(s\) to reach the fake API, got 1"):
        tokenguard_harness.assert_sent(2)
    with pytest.raises(AssertionError, match=r"expected 1 cache hit\(s\), got 0 \(this guard has no cache"):
        tokenguard_harness.assert_cache_hits(1)
    with pytest.raises(AssertionError, match=r"expected 2 retries, got 0\n"):
        tokenguard_harness.assert_retries(2)


def test_failure_messages_point_at_an_unguarded_client(tokenguard_harness: TokenguardHarness) -> None:
    plain = openai.OpenAI()  # the vendor's own client: the fake answers it, no guard sees it
    plain.chat.completions.create(model="gpt-4o-mini", messages=[])
    with pytest.raises(AssertionError, match=r"(?s)got 0\n.*1 of them are in no ledger row of this test's guard"):
        tokenguard_harness.assert_calls(1)
    tokenguard_harness.assert_sent(1)


def test_long_ledgers_are_cut_in_messages(tokenguard_harness: TokenguardHarness) -> None:
    for _ in range(25):
        tokenguard_harness.openai.embeddings.create(model="text-embedding-3-small", input="x")
    text = tokenguard_harness.describe()
    assert "... 5 earlier row(s) not shown" in text
    assert "   6. ok" in text
    assert "  25. ok" in text
    assert "   5. ok" not in text


# -- the application's own clients: interception -----------------------------------------------

# built at import time, long before any fixture, as applications do
IMPORT_TIME_CLIENT = tokenguard.OpenAI(api_key="sk-built-at-import")


def test_a_client_built_at_import_reaches_the_fake_and_the_test_guard(tokenguard_harness: TokenguardHarness) -> None:
    IMPORT_TIME_CLIENT.chat.completions.create(model="gpt-4o-mini", messages=[])
    tokenguard_harness.assert_calls(1)
    assert tokenguard_harness.sent[0].headers["authorization"] == "Bearer sk-built-at-import"


def test_every_kind_of_client_is_intercepted(tokenguard_harness: TokenguardHarness) -> None:
    tokenguard.Anthropic().messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=[])
    tokenguard.wrap(anthropic.Anthropic()).messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=[])
    with tokenguard.OpenAI().chat.completions.create(model="gpt-4o-mini", messages=[], stream=True) as stream:
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from the fake LLM!"
    azure = tokenguard.AzureOpenAI(azure_endpoint="https://my-resource.openai.azure.com", api_version="2024-10-21")
    azure.chat.completions.create(model="gpt-4o-mini", messages=[])
    tokenguard_harness.assert_calls(4)
    tokenguard_harness.assert_sent(4)
    assert [r.path for r in tokenguard_harness.sent] == [
        "/v1/messages",
        "/v1/messages",
        "/v1/chat/completions",
        "/openai/deployments/gpt-4o-mini/chat/completions",
    ]


async def test_async_clients_are_intercepted(tokenguard_harness: TokenguardHarness) -> None:
    await tokenguard.AsyncOpenAI().chat.completions.create(model="gpt-4o-mini", messages=[])
    await tokenguard.AsyncAnthropic().messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=[])
    tokenguard_harness.assert_calls(2)
    tokenguard_harness.assert_sent(2)


@pytest.mark.tokenguard(intercept_hosts=["llm-gateway.internal", "*.proxy.test"])
def test_more_hosts_from_the_marker(tokenguard_harness: TokenguardHarness) -> None:
    tokenguard.OpenAI(base_url="http://llm-gateway.internal/openai/v1").embeddings.create(
        model="text-embedding-3-small", input="x"
    )
    tokenguard.Anthropic(base_url="https://eu.proxy.test").messages.create(
        model="claude-sonnet-4-6", max_tokens=10, messages=[]
    )
    tokenguard_harness.assert_sent(2)


def test_hosts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gateway.corp.test:8080/v1")
    fake = FakeLLM()
    guard = tokenguard.Guard(store="memory://", settle_delay_s=0)
    with intercept(fake):
        tokenguard.OpenAI(guard=guard).chat.completions.create(model="gpt-4o-mini", messages=[])
    assert len(fake.money_requests) == 1
    assert guard.stats().calls == 1


def test_other_hosts_go_out_as_usual(tokenguard_harness: TokenguardHarness) -> None:
    with httpx2.Client() as http, pytest.raises(httpx2.ConnectError):
        http.get("http://127.0.0.1:9/", timeout=2)  # the discard port: nothing listens
    tokenguard_harness.assert_sent(0)


def test_intercept_patches_and_restores_exactly_what_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-key-of-the-developer")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    sync_before = vars(httpx2.HTTPTransport)["handle_request"]
    async_before = vars(httpx2.AsyncHTTPTransport)["handle_async_request"]
    with intercept(FakeLLM()) as fake:
        assert vars(httpx2.HTTPTransport)["handle_request"] is not sync_before
        assert vars(httpx2.AsyncHTTPTransport)["handle_async_request"] is not async_before
        assert {name: os.environ[name] for name in pytest_plugin.FAKE_KEYS} == dict(pytest_plugin.FAKE_KEYS)
        with intercept(fake, keys=False):  # nests
            openai.OpenAI().models.list()
    assert vars(httpx2.HTTPTransport)["handle_request"] is sync_before
    assert vars(httpx2.AsyncHTTPTransport)["handle_async_request"] is async_before
    assert os.environ["OPENAI_API_KEY"] == "sk-real-key-of-the-developer"
    assert "ANTHROPIC_API_KEY" not in os.environ
    assert [r.path for r in fake.requests] == ["/v1/models"]


@pytest.mark.tokenguard(intercept=False)
def test_intercept_can_be_turned_off(tokenguard_harness: TokenguardHarness) -> None:
    with intercept(FakeLLM()):
        patched = vars(httpx2.HTTPTransport)["handle_request"]
    assert vars(httpx2.HTTPTransport)["handle_request"] is not patched
    assert os.environ.get("OPENAI_API_KEY") != pytest_plugin.FAKE_KEYS["OPENAI_API_KEY"]


# -- fresh pytest processes: the entry point, and docs/testing.md as written -------------------


def _doc_files() -> dict[str, str]:
    """The code blocks of docs/testing.md that name a file (```python title="app.py")."""
    blocks = re.findall(r'```python title="([\w.]+)"\n(.*?)```', DOCS.read_text(), flags=re.S)
    return dict(blocks)


def test_docs_walkthrough_runs_in_a_fresh_pytest(pytester: pytest.Pytester) -> None:
    """A new pytest process, with no conftest and nothing but the entry point, loads the plugin
    (its marker passes --strict-markers) and runs the walkthrough of docs/testing.md."""
    files = _doc_files()
    assert sorted(files) == ["app.py", "test_app.py"]
    for name, source in files.items():
        pytester.path.joinpath(name).write_text(source)
    pytester.makeini(_INI)
    result = pytester.runpytest_subprocess(*_QUIET, "--strict-markers", "-W", "error", "-q")
    result.assert_outcomes(passed=5)


def test_the_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    """``-p no:tokenguard`` keeps the plugin, and tokenguard with it, out of a test run."""
    pytester.makepyfile(
        """
        import sys

        def test_uses_it(tokenguard_harness):
            pass

        def test_nothing_was_imported():
            assert "tokenguard" not in sys.modules
        """
    )
    pytester.makeini(_INI)
    result = pytester.runpytest_subprocess(*_QUIET, "-p", "no:tokenguard")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'tokenguard_harness' not found*"])
