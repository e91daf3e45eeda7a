"""Unit tests of app.py with tokenguard's pytest plugin: no network, no API key.

The ``tokenguard_harness`` fixture gives each test a fresh in-memory guard with the
application's own settings (the ``tokenguard`` marker), points every client the application
builds at a fake OpenAI API, and checks what was spent, sent, refused, cached and retried.
Run from the repository root::

    python -m pytest examples/pytest_app
"""

from datetime import UTC, datetime

import app
import pytest

import tokenguard

pytestmark = pytest.mark.tokenguard(
    **app.GUARD_SETTINGS,
    clock=lambda: datetime(2025, 3, 14, 15, 0, tzinfo=UTC),  # a Friday afternoon, UTC
)


def test_under_budget_the_user_gets_an_answer(tokenguard_harness):
    tokenguard_harness.reply(text="Paris.", input_tokens=20, output_tokens=2)

    assert app.handle_ask("alice", "Capital of France?") == (200, {"answer": "Paris."})

    tokenguard_harness.assert_spent("0.0000042", user="alice")  # 20 x $0.15/M + 2 x $0.60/M, exactly
    tokenguard_harness.assert_sent(1)


def test_over_budget_the_user_gets_a_402_and_nothing_is_sent(tokenguard_harness):
    tokenguard_harness.reply(input_tokens=400_000, output_tokens=1_000)  # a huge document: $0.0606
    assert app.handle_ask("alice", "Summarise this contract: ...")[0] == 200

    status, body = app.handle_ask("alice", "And this one?")

    assert status == 402
    assert "exceeded" in body["detail"]
    assert body["resets_at"] == "2025-03-15T00:00:00+00:00"  # midnight UTC
    tokenguard_harness.assert_blocked(1, reason="budget", user="alice")
    tokenguard_harness.assert_sent(1)  # the refused call never reached the API
    assert app.handle_ask("bob", "Hello?")[0] == 200  # other users are not affected


def test_a_repeated_question_is_answered_from_the_cache_at_no_cost(tokenguard_harness):
    first = app.handle_ask("alice", "What is tokenguard?")
    second = app.handle_ask("alice", "What is tokenguard?")

    assert first == second
    tokenguard_harness.assert_cache_hits(1)
    tokenguard_harness.assert_sent(1)
    tokenguard_harness.assert_spent("0.00000435")  # one call paid; the hit cost $0
    assert tokenguard_harness.rows()[-1].cost_usd == 0


def test_a_rate_limit_is_retried_and_the_user_never_sees_it(tokenguard_harness):
    tokenguard_harness.fail(429, headers={"retry-after": "20"})  # retried after 10 ms in tests

    assert app.handle_ask("alice", "Hello?")[0] == 200

    tokenguard_harness.assert_retries(1)
    tokenguard_harness.assert_sent(2)
    tokenguard_harness.assert_calls(1)  # one call, two attempts


def test_an_outage_is_retried_a_bounded_number_of_times_then_reported(tokenguard_harness):
    tokenguard_harness.fail(500, times=4)  # every attempt fails

    status, body = app.handle_ask("alice", "Hello?")

    assert (status, body["detail"]) == (503, "InternalServerError")
    tokenguard_harness.assert_sent(4)  # Retry(attempts=4): never more
    tokenguard_harness.assert_retries(3)
    tokenguard_harness.assert_spent(0)  # a failed call costs nothing


def test_a_client_stuck_in_a_loop_is_stopped(tokenguard_harness):
    for _ in range(3):
        app.answer("carol", "Are we there yet?")

    with pytest.raises(tokenguard.LoopDetected):
        app.answer("carol", "Are we there yet?")  # the 4th time in 10 minutes

    assert app.handle_ask("carol", "Are we there yet?")[0] == 429
    tokenguard_harness.assert_blocked(2, reason="loop", user="carol")
    tokenguard_harness.assert_sent(1)  # the repeats were cache hits, then refused
