"""The loop detector (issue 6): runaway jobs, retry-clicking, counter and timestamp loops and
agents stuck on a tool call are refused before they are sent; legitimate workloads (distinct
prompts, growing conversations, many users, batch jobs over items) never are. Also: warn mode,
the cool-down, cache hits (the hot path too), retries, scopes, threads, bounded memory, the
settings' validation and the fingerprints themselves.

Processes sharing one SQLite store are in test_loops_processes.py. Time is moved with an
injectable clock, never slept.
"""

from __future__ import annotations

import itertools
import json
import logging
import pickle
import random
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tokenguard
from tokenguard import ConfigurationError, Guard, LoopDetected, LoopDetector
from tokenguard._loops import _VOLATILE, _collapse_space, _mask_volatile, _scan_volatile, prints_of
from tokenguard.stores import memory as memory_store
from tokenguard.stores import sqlite as sqlite_store
from tokenguard.stores.memory import MemoryStore
from tokenguard.testing import FakeLLM, Reply

OA = "gpt-4o"
AN = "claude-haiku-4-5"
PLAIN = "tg-loop-model"  # a model name without digits (priced on the guards that use it)
T0 = datetime(2026, 3, 18, 12, 0, 0, tzinfo=UTC)
PROMPT = "Reconcile the Q3 ledger for ACME Corp"
MSGS = [{"role": "user", "content": PROMPT}]
_WORDS = [  # 70 distinct words for varied prompts
    "apple", "bridge", "candle", "dolphin", "engine", "forest", "guitar", "harbor", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel",
    "umbrella", "valley", "window", "yogurt", "zebra", "anchor", "basket", "cactus", "desert", "eagle",
    "feather", "glacier", "hammer", "igloo", "jungle", "kitten", "ladder", "mirror", "nectar", "oyster",
    "parrot", "quilt", "rocket", "spider", "tomato", "violin", "walnut", "yacht", "zipper", "acorn",
    "beacon", "cobalt", "dagger", "ember", "falcon", "garnet", "hazel", "indigo", "jasper", "kernel",
    "lemon", "marble", "nickel", "olive", "pebble", "quartz", "raven", "silver", "timber", "velvet",
]  # fmt: skip
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# -- helpers ------------------------------------------------------------------------------------


class Clock:
    """A settable UTC clock for ``Guard(clock=...)``: the loop detector's time comes from it."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(clock: Clock) -> Iterator[Callable[..., Guard]]:
    """Builds guards with a loop detector (``LoopDetector(**kw)``), no retries, the test's clock
    and a memory store unless ``store=`` says otherwise; PLAIN is priced on each."""
    made: list[Guard] = []

    def build(
        *, store: Any = "memory://", cache: Any = False, retry: Any = False, budgets: Any = (), **kw: Any
    ) -> Guard:
        g = Guard(store=store, cache=cache, retry=retry, budgets=budgets, clock=clock, loops=LoopDetector(**kw))
        g.register_price(PLAIN, input_mtok="1", output_mtok="4")
        made.append(g)
        return g

    yield build
    for g in made:
        g.close()


def chat(client: Any, content: str | None = None, **kw: Any) -> Any:
    """One chat completion; ``content`` is the single user message (default: PROMPT)."""
    kw.setdefault("model", OA)
    if "messages" not in kw:
        kw["messages"] = [{"role": "user", "content": PROMPT if content is None else content}]
    return client.chat.completions.create(**kw)


def message(client: Any, content: str | None = None, **kw: Any) -> Any:
    """One Anthropic message."""
    kw.setdefault("model", AN)
    kw.setdefault("max_tokens", 100)
    if "messages" not in kw:
        kw["messages"] = [{"role": "user", "content": PROMPT if content is None else content}]
    return client.messages.create(**kw)


def outcome(send: Callable[[], Any]) -> str:
    """``"ok"``, or the level of the ``LoopDetected`` that refused the call."""
    try:
        send()
    except LoopDetected as err:
        return err.level
    return "ok"


def outcomes(client: Any, prompts: list[str], **kw: Any) -> list[str]:
    """The outcome of one chat completion per prompt, in order."""
    return [outcome(lambda p=p: chat(client, p, **kw)) for p in prompts]


def sent(fake: FakeLLM) -> int:
    """HTTP requests that reached the fake's money endpoints."""
    return len(fake.money_requests)


def blocked_loop_rows(g: Guard) -> list[tokenguard.LedgerRow]:
    return [r for r in g.store.rows() if r.outcome == "blocked" and r.error == "loop"]


def assert_no_loops(g: Guard, fake: FakeLLM, results: list[str]) -> None:
    """A legitimate workload: nothing refused, every request sent, nothing blocked in the ledger."""
    assert results == ["ok"] * len(results)
    assert sent(fake) == len(results)
    stats = g.stats()
    assert stats.loops_blocked == 0
    assert stats.calls == len(results)


# -- 1. a runaway job loop ------------------------------------------------------------------------


def test_runaway_job_is_refused_on_the_fourth_identical_request(make: Callable[..., Guard]) -> None:
    """Requests 1..3 are sent; the 4th raises LoopDetected (exact, repeats 4) without any HTTP
    request, and is a blocked/loop ledger row counted in loops_blocked."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for i in range(3):
        chat(client)
        assert sent(fake) == i + 1
    with pytest.raises(LoopDetected) as info:
        chat(client)
    err = info.value
    assert sent(fake) == 3
    assert (err.level, err.repeats, err.window_s, err.mode, err.scope) == ("exact", 4, 600.0, "block", {})
    assert g.stats().loops_blocked == 1
    rows = list(g.store.rows())
    assert [r.outcome for r in rows] == ["ok", "ok", "ok", "blocked"]
    assert rows[3].error == "loop"
    assert (rows[3].vendor, rows[3].endpoint, rows[3].model) == ("openai", "chat.completions", OA)
    assert rows[3].cost_usd in (None, 0)


async def test_runaway_job_is_refused_async(make: Callable[..., Guard]) -> None:
    """The same with the async OpenAI client."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g, async_=True)
    for _ in range(3):
        await chat(client)
    with pytest.raises(LoopDetected) as info:
        await chat(client)
    assert (info.value.level, info.value.repeats) == ("exact", 4)
    assert sent(fake) == 3
    assert g.stats().loops_blocked == 1


def test_loop_error_attributes_and_message_hold_no_prompt_text(make: Callable[..., Guard]) -> None:
    """The exception carries repeats, window, fingerprint (a hash), level, scope and mode; its
    message names the scope and the numbers but never the prompt."""
    g = make(max_repeats=2, window_s=120)
    client = FakeLLM().openai(guard=g)
    with tokenguard.scope(user="alice", job="nightly"):
        chat(client), chat(client)
        with pytest.raises(LoopDetected) as info:
            chat(client)
    err = info.value
    assert err.repeats == 3
    assert err.window_s == 120
    assert err.level == "exact"
    assert err.mode == "block"
    assert err.scope == {"user": "alice", "job": "nightly"}
    assert len(err.fingerprint) == 32
    int(err.fingerprint, 16)  # a hex digest
    text = f"{err!s} {err!r} {err.args!r}"
    for word in ("Reconcile", "ledger", "ACME", "Q3", OA):
        assert word not in text
    assert "user=alice" in str(err)
    assert "3 times within 120s" in str(err)
    assert "not sent" in str(err)
    assert err.fingerprint[:12] in str(err)


def test_loops_true_means_the_default_detector(fake: FakeLLM, clock: Clock) -> None:
    """Guard(loops=True): 3 repeats in 10 minutes allowed, the 4th refused; off by default."""
    g = Guard(store="memory://", retry=False, clock=clock, loops=True)
    assert g.loops == LoopDetector()
    client = fake.openai(guard=g)
    assert [outcome(lambda: chat(client)) for _ in range(4)] == ["ok", "ok", "ok", "exact"]
    off = Guard(store="memory://", retry=False, clock=clock)
    assert off.loops is None
    other = FakeLLM()
    off_client = other.openai(guard=off)
    for _ in range(10):
        chat(off_client)
    assert sent(other) == 10


def test_repeats_spread_over_more_than_the_window_are_not_a_loop(make: Callable[..., Guard], clock: Clock) -> None:
    """The window slides: one repeat every 4 minutes (window 10 minutes) never has 4 in a window."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    results = []
    for _ in range(12):
        results.append(outcome(lambda: chat(client)))
        clock.advance(240)
    assert_no_loops(g, fake, results)


def test_one_guard_counts_the_requests_of_all_its_clients(make: Callable[..., Guard]) -> None:
    """Two clients (even two client objects of one app) on one guard share the history."""
    g = make()
    fake = FakeLLM()
    first, second = fake.openai(guard=g), fake.openai(guard=g)
    chat(first), chat(second), chat(first)
    with pytest.raises(LoopDetected):
        chat(second)
    assert sent(fake) == 3


def test_streams_are_refused_before_they_start(make: Callable[..., Guard]) -> None:
    """A streamed request repeated in a loop is refused at create(): nothing is sent."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for _ in range(3):
        for _chunk in chat(client, stream=True, stream_options={"include_usage": True}):
            pass
    with pytest.raises(LoopDetected):
        chat(client, stream=True, stream_options={"include_usage": True})
    assert sent(fake) == 3


# -- 2. retry-clicking after a failure, and the cool-down ----------------------------------------


def test_clicking_retry_on_a_failing_prompt_is_refused_on_the_fourth_click(make: Callable[..., Guard]) -> None:
    """A prompt that fails (500) clicked again and again: 3 failures reach the vendor, the 4th
    click is refused before sending; failures count as repeats."""
    g = make()
    fake = FakeLLM().fail(500, times=10)
    client = fake.openai(guard=g)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            chat(client)
    with pytest.raises(LoopDetected) as info:
        chat(client)
    assert info.value.level == "exact"
    assert sent(fake) == 3
    stats = g.stats()
    assert (stats.errors, stats.loops_blocked) == (3, 1)


def test_cool_down_refuses_repeats_even_when_the_window_would_allow_them(
    make: Callable[..., Guard], clock: Clock
) -> None:
    """After a block, repeats are refused at level "cool-down" for cool_down_s, although the
    (shorter) window has emptied; once it is over the request goes through."""
    g = make(window_s=10, cool_down_s=60)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for _ in range(3):
        chat(client)
    with pytest.raises(LoopDetected) as info:
        chat(client)
    assert info.value.level == "exact"
    clock.advance(30)  # the window (10 s) has passed: only the cool-down refuses now
    with pytest.raises(LoopDetected) as info:
        chat(client)
    assert info.value.level == "cool-down"
    assert "cool-down" in str(info.value)
    assert sent(fake) == 3
    clock.advance(61)  # the cool-down of the refusal at +30 s is over too
    chat(client)
    assert sent(fake) == 4
    assert g.stats().loops_blocked == 2


def test_after_a_block_the_request_is_allowed_again_once_the_window_has_passed(
    make: Callable[..., Guard], clock: Clock
) -> None:
    """Default settings: a minute later the 3 requests are still in the window (refused again);
    ten minutes later they are gone — the refused clicks were never added to the history."""
    g = make()
    fake = FakeLLM().fail(500, times=3)
    client = fake.openai(guard=g)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            chat(client)
    for _ in range(5):  # clicking on: all refused, none recorded
        with pytest.raises(LoopDetected):
            chat(client)
        clock.advance(1)
    clock.advance(61)
    with pytest.raises(LoopDetected) as info:
        chat(client)
    assert info.value.level == "exact"  # cool-down over, but the window still holds 3
    clock.advance(600)
    assert [outcome(lambda: chat(client)) for _ in range(4)] == ["ok", "ok", "ok", "exact"]
    assert sent(fake) == 6


def test_refused_requests_are_not_added_to_the_history(make: Callable[..., Guard], clock: Clock) -> None:
    """Refusals in the middle of the window do not keep the request refused once the requests
    that were sent have left the window."""
    g = make(window_s=600, cool_down_s=0)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for _ in range(3):
        chat(client)
    clock.advance(300)
    assert [outcome(lambda: chat(client)) for _ in range(5)] == ["exact"] * 5
    clock.advance(301)  # the 3 sent requests are out of the window; the 5 refusals would not be
    assert [outcome(lambda: chat(client)) for _ in range(4)] == ["ok", "ok", "ok", "exact"]
    assert sent(fake) == 6


def test_zero_cool_down_refuses_only_what_the_window_refuses(make: Callable[..., Guard], clock: Clock) -> None:
    """cool_down_s=0: no quarantine; with the window passed the request goes through at once."""
    g = make(window_s=10, cool_down_s=0)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    assert [outcome(lambda: chat(client)) for _ in range(4)] == ["ok", "ok", "ok", "exact"]
    clock.advance(11)
    chat(client)
    assert sent(fake) == 4


def test_a_loop_on_one_item_does_not_cool_down_the_other_items_of_a_batch(make: Callable[..., Guard]) -> None:
    """One ticket clicked 4 times is refused; the batch's next tickets are not repeats of it."""
    g = make()
    fake = FakeLLM()
    prompts = ["Summarize ticket #4312"] * 4 + ["Summarize ticket #1187", "Summarize ticket #9051"]
    assert outcomes(fake.openai(guard=g), prompts) == ["ok", "ok", "ok", "exact", "ok", "ok"]


# -- 3. counters and timestamps in the prompt -----------------------------------------------------


def test_counter_in_prompt_loop_is_refused_at_the_normalized_level(make: Callable[..., Guard]) -> None:
    """A prompt counting its attempts ("Attempt 1: ...", "Attempt 2: ..."): each request differs, the run is a loop."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    prompts = [f"Attempt {n}: parse the invoice and return JSON" for n in range(1, 6)]
    assert outcomes(client, prompts) == ["ok", "ok", "ok", "normalized", "cool-down"]
    assert sent(fake) == 3
    assert g.stats().loops_blocked == 2


async def test_counter_in_prompt_loop_async(make: Callable[..., Guard]) -> None:
    """The same with the async client."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g, async_=True)
    for n in range(1, 4):
        await chat(client, f"Attempt {n}: parse the invoice")
    with pytest.raises(LoopDetected) as info:
        await chat(client, "Attempt 4: parse the invoice")
    assert (info.value.level, info.value.repeats) == ("normalized", 4)
    assert sent(fake) == 3


@pytest.mark.parametrize(
    "stamps",
    [
        pytest.param(
            ["2026-03-18T12:00:01Z", "2026-03-18T12:00:09Z", "2026-03-18T12:03:44Z", "2026-03-18T13:10:02Z"], id="iso"
        ),
        pytest.param(
            ["2026-03-18 12:00:01", "2026-03-18 12:00:05.25", "2026-03-18 12:00:09", "2026-03-18 12:01:00"],
            id="iso-space",
        ),
        pytest.param(["08:41:07", "08:41:19", "08:45:00", "09:02:33"], id="hh-mm-ss"),
        pytest.param(["1773835201", "1773835211", "1773835399", "1773839000"], id="epoch-s"),
        pytest.param(["1773835201000", "1773835211523", "1773835399001", "1773839000999"], id="epoch-ms"),
    ],
)
def test_timestamp_in_prompt_loop_is_refused(make: Callable[..., Guard], stamps: list[str]) -> None:
    """A prompt carrying the current time (jumping by any amount) is still the same request."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    prompts = [f"[{stamp}] Check the deploy status and report" for stamp in stamps]
    assert outcomes(client, prompts) == ["ok", "ok", "ok", "normalized"]
    assert sent(fake) == 3


def test_counter_and_timestamp_together(make: Callable[..., Guard]) -> None:
    """A retry loop logging both a timestamp and an attempt counter."""
    g = make()
    client = FakeLLM().openai(guard=g)
    prompts = [f"{10 + n}:00:00 attempt {n}: sync the CRM" for n in range(4)]
    assert outcomes(client, prompts) == ["ok", "ok", "ok", "normalized"]


def test_case_and_whitespace_only_changes_are_counted(make: Callable[..., Guard]) -> None:
    """Case changes and runs of blanks inside the text do not make another request."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    prompts = ["Summarize the incident report", "summarize  the incident report", "SUMMARIZE THE INCIDENT REPORT"]
    prompts.append("Summarize the\tincident\n report")
    assert outcomes(client, prompts) == ["ok", "ok", "ok", "normalized"]
    assert sent(fake) == 3


def test_case_and_whitespace_changes_are_counted_whatever_the_model_name(make: Callable[..., Guard]) -> None:
    """The same with a model whose name has no digit, and the last request already lower-case."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    prompts = ["Summarize the incident report", "SUMMARIZE THE INCIDENT REPORT", "Summarize  the Incident Report"]
    prompts.append("summarize the incident report")
    assert outcomes(client, prompts, model=PLAIN) == ["ok", "ok", "ok", "normalized"]


def test_leading_and_trailing_whitespace_changes_are_counted(make: Callable[..., Guard]) -> None:
    """A prompt re-sent with a trailing newline or a leading blank is still the same request."""
    g = make()
    client = FakeLLM().openai(guard=g)
    prompts = ["Summarize the incident report", "Summarize the incident report\n", " Summarize the incident report"]
    prompts.append("Summarize the incident report \n")
    assert outcomes(client, prompts) == ["ok", "ok", "ok", "normalized"]


def test_counter_step_sets_what_looks_like_a_counter(make: Callable[..., Guard]) -> None:
    """counter_step=5: a counter stepping by 5 is a loop; with the default (1) it is a batch."""
    prompts = [f"Fetch page {n} of the export" for n in (5, 10, 15, 20)]
    wide = make(counter_step=5)
    assert outcomes(FakeLLM().openai(guard=wide), prompts) == ["ok", "ok", "ok", "normalized"]
    default = make()
    fake = FakeLLM()
    assert_no_loops(default, fake, outcomes(fake.openai(guard=default), prompts))


def test_normalized_loop_counts_the_run_not_the_shape(make: Callable[..., Guard]) -> None:
    """A counter loop interrupted by another item starts counting again from that item."""
    g = make()
    client = FakeLLM().openai(guard=g)
    prompts = [f"Retry job {n}" for n in (1, 2, 3)] + ["Retry job 4711"] + [f"Retry job {n}" for n in (4, 5, 6)]
    assert outcomes(client, prompts) == ["ok"] * 7
    assert outcome(lambda: chat(client, "Retry job 7")) == "normalized"  # 4711 → 4..7: four in a run


# -- 4. tool-call loops (ping-pong) ----------------------------------------------------------------


def openai_agent(steps: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """A chat conversation where the assistant called ``steps`` (name, JSON arguments) in turn, each
    answered by a tool message: the request now answers the latest call."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "What should I pack for my trip?"}]
    for i, (name, args) in enumerate(steps):
        call_id = f"call_{i}"
        msgs.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}],
            }
        )
        msgs.append({"role": "tool", "tool_call_id": call_id, "content": f"result {i * 37 % 11}"})
    return msgs


def anthropic_agent(steps: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The same conversation in Anthropic's shape: tool_use blocks, then tool_result blocks."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "What should I pack for my trip?"}]
    for i, (name, args) in enumerate(steps):
        tool_id = f"toolu_{i}"
        msgs.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": tool_id, "name": name, "input": args},
                ],
            }
        )
        msgs.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "ok"}]})
    return msgs


def responses_agent(steps: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The same as Responses API input items: function_call, then function_call_output."""
    items: list[dict[str, Any]] = [{"role": "user", "content": "What should I pack for my trip?"}]
    for i, (name, args) in enumerate(steps):
        items.append({"type": "function_call", "call_id": f"fc_{i}", "name": name, "arguments": args})
        items.append({"type": "function_call_output", "call_id": f"fc_{i}", "output": "ok"})
    return items


PARIS = ("get_weather", '{"city": "Paris"}')


def run_openai_agent(client: Any, steps: list[tuple[str, str]]) -> list[str]:
    """One request per turn: turn k answers the k-th step."""
    return [
        outcome(lambda k=k: chat(client, messages=openai_agent(steps[: k + 1]), tools=[WEATHER]))
        for k in range(len(steps))
    ]


def test_agent_calling_the_same_tool_again_and_again_is_refused(make: Callable[..., Guard]) -> None:
    """OpenAI chat: the conversation grows, its latest turn calls get_weather(Paris) each time: the
    4th such step is refused at the tool_calls level."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    assert run_openai_agent(client, [PARIS] * 5) == ["ok", "ok", "ok", "tool_calls", "cool-down"]
    assert sent(fake) == 3
    assert g.stats().loops_blocked == 2


async def test_agent_tool_loop_async(make: Callable[..., Guard]) -> None:
    """The same with the async OpenAI client."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g, async_=True)
    for k in range(3):
        await chat(client, messages=openai_agent([PARIS] * (k + 1)), tools=[WEATHER])
    with pytest.raises(LoopDetected) as info:
        await chat(client, messages=openai_agent([PARIS] * 4), tools=[WEATHER])
    assert (info.value.level, info.value.repeats) == ("tool_calls", 4)
    assert sent(fake) == 3


def test_anthropic_tool_use_loop_is_refused(make: Callable[..., Guard]) -> None:
    """Anthropic: tool_use blocks followed by a user turn of only tool_result blocks."""
    g = make()
    fake = FakeLLM()
    client = fake.anthropic(guard=g)
    step = ("get_weather", {"city": "Paris"})
    results = [outcome(lambda k=k: message(client, messages=anthropic_agent([step] * k))) for k in range(1, 6)]
    assert results == ["ok", "ok", "ok", "tool_calls", "cool-down"]
    assert sent(fake) == 3


async def test_anthropic_tool_use_loop_async(make: Callable[..., Guard]) -> None:
    """The same with the async Anthropic client."""
    g = make()
    fake = FakeLLM()
    client = fake.anthropic(guard=g, async_=True)
    step = ("get_weather", {"city": "Paris"})
    for k in range(1, 4):
        await message(client, messages=anthropic_agent([step] * k))
    with pytest.raises(LoopDetected) as info:
        await message(client, messages=anthropic_agent([step] * 4))
    assert info.value.level == "tool_calls"
    assert sent(fake) == 3


def test_responses_function_call_loop_is_refused(make: Callable[..., Guard]) -> None:
    """Responses API: function_call items followed by their function_call_output items."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    results = [
        outcome(lambda k=k: client.responses.create(model=OA, input=responses_agent([PARIS] * k))) for k in range(1, 6)
    ]
    assert results == ["ok", "ok", "ok", "tool_calls", "cool-down"]
    assert sent(fake) == 3


def test_arguments_with_keys_in_another_order_are_the_same_call(make: Callable[..., Guard]) -> None:
    """The arguments are compared as data: key order and JSON spacing do not matter."""
    g = make()
    client = FakeLLM().openai(guard=g)
    variants = [
        '{"city": "Paris", "unit": "celsius"}',
        '{"unit":"celsius","city":"Paris"}',
        '{ "city" : "Paris" ,\n "unit" : "celsius" }',
        '{"unit": "celsius", "city": "Paris"}',
    ]
    steps = [("get_weather", v) for v in variants]
    assert run_openai_agent(client, steps) == ["ok", "ok", "ok", "tool_calls"]


def test_agent_bouncing_between_two_tool_calls_is_refused(make: Callable[..., Guard]) -> None:
    """A-B-A-B...: refused when one of the two steps comes back the 4th time (the 7th turn)."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    a, b = PARIS, ("get_time", '{"city": "Paris"}')
    results = run_openai_agent(client, [a, b, a, b, a, b, a, b])
    assert results == ["ok"] * 6 + ["tool_calls", "tool_calls"]  # A's 4th, then B's 4th
    assert sent(fake) == 6


def test_tool_calls_with_different_arguments_each_time_are_not_a_loop(make: Callable[..., Guard]) -> None:
    """An agent looking up one city after another is making progress."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    cities = ["Paris", "Lyon", "Nice", "Lille", "Nantes", "Brest", "Rennes", "Dijon", "Metz", "Tours"]
    steps = [("get_weather", json.dumps({"city": c})) for c in cities]
    assert_no_loops(g, fake, run_openai_agent(client, steps))


def test_tool_level_is_off_with_tool_calls_false(make: Callable[..., Guard]) -> None:
    """LoopDetector(tool_calls=False): the same growing agent conversation is never refused."""
    g = make(tool_calls=False)
    fake = FakeLLM()
    assert_no_loops(g, fake, run_openai_agent(fake.openai(guard=g), [PARIS] * 6))


def test_a_conversation_that_went_on_after_the_tool_call_is_not_counted(make: Callable[..., Guard]) -> None:
    """Only a request answering the latest tool call counts at the tool level: after the assistant
    answered in text and the user asked something new, the old call is history."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    results = []
    msgs = openai_agent([PARIS])
    for turn in range(6):
        msgs = [*msgs, {"role": "assistant", "content": f"Answer {turn}"}, {"role": "user", "content": f"And {turn}?"}]
        results.append(outcome(lambda m=msgs: chat(client, messages=m, tools=[WEATHER])))
    assert_no_loops(g, fake, results)


def test_the_same_tool_call_in_different_conversations_is_not_a_loop(make: Callable[..., Guard]) -> None:
    """A job processing distinct documents, each conversation starting with the same tool call."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    results = []
    with tokenguard.scope(job="digest"):
        for doc in ["invoice 4312", "contract for Dupont", "minutes of the board", "press release", "HR memo"]:
            msgs = [
                {"role": "user", "content": f"Summarize the {doc} and say how old it is."},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "get_current_date", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "2026-03-18"},
            ]
            results.append(outcome(lambda m=msgs: chat(client, messages=m)))
    assert results == ["ok"] * 5


# -- 5. zero false blocks on a legitimate workload -------------------------------------------------


def test_hundreds_of_distinct_prompts_are_never_refused(make: Callable[..., Guard]) -> None:
    """300 varied prompts, all sent."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    rng = random.Random(6)
    subjects = ["the French Revolution", "photosynthesis", "a binary heap", "TCP slow start", "Kafka", "sourdough"]
    subjects += ["black holes", "the stock market"]
    tasks = ["Explain", "Give three facts about", "Write a haiku on", "List pitfalls of", "Compare Rust and Go on"]
    tasks += ["Tell a joke about"]
    audiences = ["a child", "an engineer", "my manager", "a historian", "a chef", "a sailor"]
    prompts = list(dict.fromkeys(f"{t} {s} for {a}." for t in tasks for s in subjects for a in audiences))
    prompts += [f"Translate '{w}' into German, then French." for w in rng.sample(_WORDS, len(_WORDS))]
    prompts = prompts[:300]
    assert len(set(prompts)) == 300
    rng.shuffle(prompts)
    assert_no_loops(g, fake, outcomes(client, prompts))


def test_conversation_growing_with_the_same_user_word_each_turn_is_not_a_loop(make: Callable[..., Guard]) -> None:
    """The user types "continue" every turn, the assistant answers differently: 40 turns, all sent."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You write a long story."}]
    results = []
    for turn in range(40):
        msgs.append({"role": "user", "content": "continue"})
        results.append(outcome(lambda m=list(msgs): chat(client, messages=m)))
        msgs.append({"role": "assistant", "content": f"Chapter {turn + 1}: {_WORDS[turn]} and {_WORDS[-turn - 1]}..."})
    assert_no_loops(g, fake, results)


def test_anthropic_conversation_growing_with_continue_is_not_a_loop(make: Callable[..., Guard]) -> None:
    """The same on Anthropic, with a system prompt."""
    g = make()
    fake = FakeLLM()
    client = fake.anthropic(guard=g)
    msgs: list[dict[str, Any]] = []
    results = []
    for turn in range(20):
        msgs.append({"role": "user", "content": "continue"})
        results.append(outcome(lambda m=list(msgs): message(client, messages=m, system="Tell a story.")))
        msgs.append({"role": "assistant", "content": f"Part {turn + 1}: the {_WORDS[turn]}."})
    assert_no_loops(g, fake, results)


def test_the_same_faq_asked_by_50_users_is_not_a_loop(make: Callable[..., Guard]) -> None:
    """Each user has their own history."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    results = []
    for n in range(50):
        with tokenguard.scope(user=f"user-{n}"):
            results.append(outcome(lambda: chat(client, "How do I reset my password?")))
    assert_no_loops(g, fake, results)


def test_batch_over_random_ticket_numbers_is_not_a_loop(make: Callable[..., Guard]) -> None:
    """A batch over tickets ("Summarize ticket #4312", "#1187", ...): the number jumps, each ticket is another item."""
    g = make()
    fake = FakeLLM()
    tickets = random.Random(42).sample(range(1000, 10000), 200)
    assert all(abs(a - b) > 1 for a, b in itertools.pairwise(tickets))
    prompts = [f"Summarize ticket #{t}" for t in tickets]
    assert_no_loops(g, fake, outcomes(fake.openai(guard=g), prompts))


def test_batch_over_uuids_is_not_a_loop(make: Callable[..., Guard]) -> None:
    """A batch over records identified by UUIDs (and one over hex ids)."""
    g = make()
    fake = FakeLLM()
    rng = random.Random(7)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(50)]
    hexes = [f"{rng.getrandbits(48):012x}a1" for _ in range(50)]
    prompts = [f"Classify the support case {i} as urgent or not" for i in ids]
    prompts += [f"Explain commit {h} in one line" for h in hexes]
    assert_no_loops(g, fake, outcomes(fake.openai(guard=g), prompts))


def test_batch_over_dates_is_not_a_loop(make: Callable[..., Guard]) -> None:
    """A batch over dates ("2026-01-05", "2026-02-11", ...): another date is another item — consecutive days too."""
    g = make()
    fake = FakeLLM()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    days = [start + timedelta(days=n) for n in random.Random(3).sample(range(365), 40)]
    days += [datetime(2025, 6, 1, tzinfo=UTC) + timedelta(days=n) for n in range(30)]  # a daily report
    prompts = [f"Write the sales summary for {d:%Y-%m-%d}" for d in days]
    assert_no_loops(g, fake, outcomes(fake.openai(guard=g), prompts))


def test_timestamped_batch_over_items_is_not_a_loop(make: Callable[..., Guard], clock: Clock) -> None:
    """A batch job stamping each prompt with the current time: the time is loop-like, but the
    ticket number changes to another item each time."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    results = []
    for t in random.Random(5).sample(range(1000, 10000), 60):
        results.append(outcome(lambda t=t: chat(client, f"[{clock.now.isoformat()}] attempt 1: summarize ticket #{t}")))
        clock.advance(2)
    assert_no_loops(g, fake, results)


def test_batch_over_items_on_anthropic_and_responses_is_not_a_loop(make: Callable[..., Guard]) -> None:
    """The other endpoints treat batches the same way."""
    g = make()
    fake = FakeLLM()
    oa, an = fake.openai(guard=g), fake.anthropic(guard=g)
    tickets = random.Random(9).sample(range(1000, 10000), 30)
    results = [outcome(lambda t=t: message(an, f"Summarize ticket #{t}")) for t in tickets]
    results += [outcome(lambda t=t: oa.responses.create(model=OA, input=f"Summarize ticket #{t}")) for t in tickets]
    assert_no_loops(g, fake, results)


def test_batch_differing_only_by_a_sequential_index_is_refused_by_default(make: Callable[..., Guard]) -> None:
    """The documented limitation: "row 1", "row 2", ... looks like an attempt counter."""
    g = make()
    fake = FakeLLM()
    prompts = [f"Summarize row {n}" for n in range(1, 7)]
    assert outcomes(fake.openai(guard=g), prompts) == ["ok", "ok", "ok", "normalized", "cool-down", "cool-down"]
    assert sent(fake) == 3


@pytest.mark.parametrize("settings", [{"counter_step": 0}, {"normalized": False}], ids=["counter_step=0", "off"])
def test_sequential_index_batch_goes_through_with_counter_step_0_or_normalized_off(
    make: Callable[..., Guard], settings: dict[str, Any]
) -> None:
    """The documented way out: counter_step=0 (any changed number is another item), or the
    normalized level off. Timestamps and exact repeats are still caught with counter_step=0."""
    g = make(**settings)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    assert_no_loops(g, fake, outcomes(client, [f"Summarize row {n}" for n in range(1, 51)]))
    assert outcomes(client, ["Summarize row 7"] * 3) == ["ok", "ok", "exact"]  # exact repeats are still loops
    if settings.get("counter_step") == 0:
        stamps = [f"[08:0{n}:00] Summarize row 99" for n in range(4)]
        assert outcomes(client, stamps) == ["ok", "ok", "ok", "normalized"]  # and so are timestamp loops


# -- 6. warn mode ------------------------------------------------------------------------------


def test_warn_mode_lets_the_loop_through_logs_and_reports(
    make: Callable[..., Guard], caplog: pytest.LogCaptureFixture
) -> None:
    """mode="warn": every request is sent, a WARNING is logged for the loop (once per cool-down:
    its repeats go to DEBUG, so a runaway job cannot flood the log), on_loop receives a
    LoopDetected for each repeat past max_repeats, nothing is counted as blocked."""
    seen: list[LoopDetected] = []
    g = make(mode="warn", on_loop=seen.append)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    with caplog.at_level(logging.DEBUG, logger="tokenguard"), tokenguard.scope(user="bob"):
        for _ in range(6):
            chat(client)
    assert sent(fake) == 6
    assert [(e.level, e.mode, e.scope) for e in seen] == [("exact", "warn", {"user": "bob"})] * 3
    assert seen[0].repeats == 4
    assert all(isinstance(e, LoopDetected) for e in seen)
    warnings = [r for r in caplog.records if r.name == "tokenguard" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    quiet = [
        r
        for r in caplog.records
        if r.name == "tokenguard" and r.levelno == logging.DEBUG and "loop detected" in r.getMessage()
    ]
    assert len(quiet) == 2
    assert "loop detected" in warnings[0].getMessage()
    assert "warn mode" in warnings[0].getMessage()
    assert PROMPT not in caplog.text
    stats = g.stats()
    assert (stats.loops_blocked, stats.calls) == (0, 6)


def test_warn_mode_reports_how_many_times_the_request_was_seen(make: Callable[..., Guard]) -> None:
    """LoopDetected.repeats "counts this request": in warn mode it keeps counting."""
    seen: list[LoopDetected] = []
    g = make(mode="warn", on_loop=seen.append)
    client = FakeLLM().openai(guard=g)
    for _ in range(10):
        chat(client)
    assert [e.repeats for e in seen] == [4, 5, 6, 7, 8, 9, 10]


def test_warn_mode_has_no_cool_down(make: Callable[..., Guard], clock: Clock) -> None:
    """In warn mode nothing is quarantined: a counter loop is reported (normalized) on each request
    past max_repeats, never refused as a cool-down."""
    seen: list[LoopDetected] = []
    g = make(mode="warn", on_loop=seen.append)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for n in range(1, 7):
        chat(client, f"Attempt {n}: go")
        clock.advance(1)
    assert sent(fake) == 6
    assert {e.level for e in seen} == {"normalized"}


def test_on_loop_that_raises_does_not_fail_the_call(
    make: Callable[..., Guard], caplog: pytest.LogCaptureFixture
) -> None:
    """Warn mode: a broken callback is logged with its traceback; the call still succeeds."""

    def broken(err: LoopDetected) -> None:
        raise RuntimeError("pager is down")

    g = make(mode="warn", on_loop=broken)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    with caplog.at_level(logging.WARNING, logger="tokenguard"):
        for _ in range(5):
            chat(client)
    assert sent(fake) == 5
    failures = [r for r in caplog.records if "on_loop" in r.getMessage()]
    assert len(failures) == 2
    assert failures[0].levelno == logging.ERROR
    assert failures[0].exc_info is not None
    assert "pager is down" in caplog.text


def test_on_loop_is_called_in_block_mode_and_its_failure_does_not_replace_the_refusal(
    make: Callable[..., Guard], caplog: pytest.LogCaptureFixture
) -> None:
    """Block mode: on_loop sees the refusal (mode "block"); a callback that raises does not turn
    LoopDetected into its own error."""
    seen: list[LoopDetected] = []

    def record_then_fail(err: LoopDetected) -> None:
        seen.append(err)
        raise ValueError("callback bug")

    g = make(on_loop=record_then_fail)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for _ in range(3):
        chat(client)
    with caplog.at_level(logging.ERROR, logger="tokenguard"), pytest.raises(LoopDetected) as info:
        chat(client)
    assert seen == [info.value]
    assert seen[0].mode == "block"
    assert "callback bug" in caplog.text
    assert sent(fake) == 3


def test_block_mode_logs_a_warning(make: Callable[..., Guard], caplog: pytest.LogCaptureFixture) -> None:
    """A refusal is logged too (as blocked), without the prompt."""
    g = make(max_repeats=1)
    client = FakeLLM().openai(guard=g)
    chat(client)
    with caplog.at_level(logging.WARNING, logger="tokenguard"), pytest.raises(LoopDetected):
        chat(client)
    [record] = [r for r in caplog.records if r.name == "tokenguard"]
    assert record.levelno == logging.WARNING
    assert "blocked" in record.getMessage()
    assert "ACME" not in caplog.text


# -- 7. cache hits ---------------------------------------------------------------------------------


class CountingRequests:
    """Counts how often the SDK's request path is entered on a client (the cache's hot path skips it)."""

    def __init__(self, client: Any) -> None:
        self.entered = 0
        original = client.request

        def request(*args: Any, **kwargs: Any) -> Any:
            self.entered += 1
            return original(*args, **kwargs)

        client.request = request


def test_cache_hits_count_as_repeats_the_hot_path_too(make: Callable[..., Guard]) -> None:
    """temperature=0 with a memory cache: a miss, a hit, a hot-path hit, then the 4th repeat —
    answered on the hot path, before the SDK builds a request — is refused."""
    g = make(cache=tokenguard.Cache("memory"))
    fake = FakeLLM()
    client = fake.openai(guard=g)
    chat(client, temperature=0), chat(client, temperature=0)
    counting = CountingRequests(client)
    chat(client, temperature=0)  # the hot path
    with pytest.raises(LoopDetected) as info:
        chat(client, temperature=0)
    assert counting.entered == 0  # refused on the hot path itself
    assert (info.value.level, info.value.repeats) == ("exact", 4)
    assert sent(fake) == 1
    assert [r.outcome for r in g.store.rows()] == ["ok", "cache_hit", "cache_hit", "blocked"]
    stats = g.stats()
    assert (stats.cache_hits, stats.loops_blocked) == (2, 1)


async def test_cache_hits_count_async(make: Callable[..., Guard]) -> None:
    """The same with the async client (its hot path too)."""
    g = make(cache=tokenguard.Cache("memory"))
    fake = FakeLLM()
    client = fake.openai(guard=g, async_=True)
    for _ in range(3):
        await chat(client, temperature=0)
    with pytest.raises(LoopDetected):
        await chat(client, temperature=0)
    assert sent(fake) == 1
    assert g.stats().loops_blocked == 1


def test_anthropic_cache_hits_count(make: Callable[..., Guard]) -> None:
    """Anthropic messages answered from a cache_all cache (hot path included) are counted too."""
    g = make(cache=tokenguard.Cache("memory", cache_all=True))
    fake = FakeLLM()
    client = fake.anthropic(guard=g)
    assert [outcome(lambda: message(client)) for _ in range(4)] == ["ok", "ok", "ok", "exact"]
    assert sent(fake) == 1
    assert g.stats().cache_hits == 2


def test_with_count_cache_hits_false_hits_are_not_counted(make: Callable[..., Guard]) -> None:
    """count_cache_hits=False: the 10th identical cached request still succeeds (one HTTP request)."""
    g = make(cache=tokenguard.Cache("memory"), count_cache_hits=False)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for _ in range(10):
        chat(client, temperature=0)
    assert sent(fake) == 1
    stats = g.stats()
    assert (stats.cache_hits, stats.loops_blocked) == (9, 0)


def test_with_count_cache_hits_false_misses_still_count(make: Callable[..., Guard]) -> None:
    """count_cache_hits=False: requests that reach the vendor are still counted — uncacheable
    ones (temperature 1), and a cacheable one missing again after the cache was cleared."""
    cache = tokenguard.Cache("memory")
    g = make(cache=cache, count_cache_hits=False)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    assert [outcome(lambda: chat(client, temperature=1)) for _ in range(4)] == ["ok", "ok", "ok", "exact"]
    strict = make(cache=tokenguard.Cache("memory"), count_cache_hits=False, max_repeats=1)
    other = FakeLLM()
    strict_client = other.openai(guard=strict)
    chat(strict_client, temperature=0)
    chat(strict_client, temperature=0)  # a hit: not counted
    strict.cache.clear()  # type: ignore[union-attr]
    with pytest.raises(LoopDetected):
        chat(strict_client, temperature=0)  # a miss: the 2nd counted
    assert sent(other) == 1


# -- 8. retries are not repeats ---------------------------------------------------------------------


@pytest.mark.parametrize("count_cache_hits", [True, False])
def test_retries_of_one_call_are_not_repeats(make: Callable[..., Guard], count_cache_hits: bool) -> None:
    """max_repeats=1 and a call answered 429, 429, 200: it succeeds after 3 attempts; the next
    identical call is the first repeat and is refused."""
    g = make(
        retry=tokenguard.Retry(attempts=4, initial_delay_s=0.001, max_delay_s=0.01),
        max_repeats=1,
        count_cache_hits=count_cache_hits,
    )
    fake = FakeLLM().fail(429, times=2)
    client = fake.openai(guard=g)
    assert chat(client).choices[0].message.content == Reply().text
    assert sent(fake) == 3
    with pytest.raises(LoopDetected) as info:
        chat(client)
    assert info.value.repeats == 2
    assert sent(fake) == 3
    stats = g.stats()
    assert (stats.retries, stats.loops_blocked) == (2, 1)


async def test_retries_are_not_repeats_async(make: Callable[..., Guard]) -> None:
    """The same with the async Anthropic client (529, 529, 200)."""
    g = make(retry=tokenguard.Retry(attempts=4, initial_delay_s=0.001, max_delay_s=0.01), max_repeats=1)
    fake = FakeLLM().fail(529, times=2)
    client = fake.anthropic(guard=g, async_=True)
    await message(client)
    assert sent(fake) == 3
    with pytest.raises(LoopDetected):
        await message(client)


def test_loop_detected_is_never_retried(make: Callable[..., Guard]) -> None:
    """With retries on, a refusal is raised at once: no request, one blocked row."""
    g = make(retry=tokenguard.Retry(attempts=4, initial_delay_s=0.001), max_repeats=1)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    chat(client)
    with pytest.raises(LoopDetected):
        chat(client)
    assert sent(fake) == 1
    assert [r.outcome for r in g.store.rows()] == ["ok", "blocked"]


# -- 9. scopes and guards are separate ---------------------------------------------------------------


def test_each_scope_has_its_own_count(make: Callable[..., Guard]) -> None:
    """Alice and Bob send the same prompt: each gets 3; the 4th of each is refused, in their scope."""
    g = make()
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for _ in range(3):
        for user in ("alice", "bob"):
            with tokenguard.scope(user=user):
                chat(client)
    assert sent(fake) == 6
    for user in ("alice", "bob"):
        with tokenguard.scope(user=user), pytest.raises(LoopDetected) as info:
            chat(client)
        assert info.value.scope == {"user": user}
    with tokenguard.scope(user="carol"):
        chat(client)
    assert sent(fake) == 7
    assert [dict(r.scope) for r in blocked_loop_rows(g)] == [{"user": "alice"}, {"user": "bob"}]
    assert g.stats(user="alice").loops_blocked == 1


def test_nested_scopes_are_other_histories(make: Callable[..., Guard]) -> None:
    """Another attribute (project) under the same user is another history; the same one is not."""
    g = make()
    client = FakeLLM().openai(guard=g)
    with tokenguard.scope(user="alice"):
        for _ in range(3):
            chat(client)
        with tokenguard.scope(project="x"):
            for _ in range(3):
                chat(client)
            with pytest.raises(LoopDetected) as info:
                chat(client)
            assert info.value.scope == {"user": "alice", "project": "x"}


def test_two_guards_on_separate_memory_stores_do_not_share(clock: Clock) -> None:
    """Two guards, each with its own memory store, each allow 3."""
    fake = FakeLLM()
    guards = [Guard(store="memory://", retry=False, clock=clock, loops=True) for _ in range(2)]
    clients = [fake.openai(guard=g) for g in guards]
    for _ in range(3):
        for client in clients:
            chat(client)
    assert sent(fake) == 6
    for g, client in zip(guards, clients, strict=True):
        with pytest.raises(LoopDetected):
            chat(client)
        assert g.stats().loops_blocked == 1


def test_two_guards_sharing_one_store_share_the_history(clock: Clock) -> None:
    """The history lives in the store: two guards on one MemoryStore object count together."""
    store = MemoryStore()
    fake = FakeLLM()
    first, second = (Guard(store=store, retry=False, clock=clock, loops=True) for _ in range(2))
    chat(fake.openai(guard=first)), chat(fake.openai(guard=second)), chat(fake.openai(guard=first))
    with pytest.raises(LoopDetected):
        chat(fake.openai(guard=second))
    assert sent(fake) == 3


def test_different_vendors_models_and_endpoints_are_different_requests(make: Callable[..., Guard]) -> None:
    """The same text to another model, vendor or endpoint is not a repeat."""
    g = make()
    fake = FakeLLM()
    oa, an = fake.openai(guard=g), fake.anthropic(guard=g)
    for _ in range(3):
        chat(oa)
        chat(oa, model="gpt-4o-mini")
        message(an)
        oa.responses.create(model=OA, input=PROMPT)
    assert sent(fake) == 12
    assert g.stats().loops_blocked == 0


# -- 10. threads ---------------------------------------------------------------------------------


class SlowDecisions:
    """A loop store whose decisions take a while (inside the store's atomic section), so that a
    check that is not atomic lets racing threads all see the same history."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def loop_observe(self, keys: Any, details: Any, *, decide: Callable[..., Any], **kw: Any) -> Any:
        def slow(*args: Any) -> Any:
            time.sleep(0.005)
            return decide(*args)

        return self.store.loop_observe(keys, details, decide=slow, **kw)


@pytest.mark.parametrize("store_kind", ["memory", "sqlite", "redis"])
def test_threads_sending_the_same_request_at_once_let_exactly_max_repeats_through(
    make: Callable[..., Guard],
    tmp_path: Path,
    store_kind: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """8 threads, one guard, the same request at the same moment: exactly 3 are sent, even when
    each decision takes a few milliseconds (on Redis: compare-and-set retries the losers)."""
    if store_kind == "redis":
        store = request.getfixturevalue("redis_url")
    else:
        store = "memory://" if store_kind == "memory" else f"sqlite:///{tmp_path / 'ledger.db'}"
    g = make(store=store)
    book = g.pipeline.loops
    assert book is not None
    monkeypatch.setattr(book, "_store", SlowDecisions(book._store))
    fake = FakeLLM()
    clients = [fake.openai(guard=g) for _ in range(8)]
    barrier = threading.Barrier(8)
    results: list[str] = []
    lock = threading.Lock()

    def work(client: Any) -> None:
        barrier.wait(timeout=10)
        result = outcome(lambda: chat(client))
        with lock:
            results.append(result)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert results.count("ok") == 3
    assert set(results) - {"ok"} <= {"exact", "cool-down"}
    assert sent(fake) == 3
    assert g.stats().loops_blocked == 5


# -- 11. bounded memory and a failing store -----------------------------------------------------------


def test_memory_store_keeps_a_bounded_number_of_keys(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the key limit, the least recently seen keys go."""
    monkeypatch.setattr(memory_store, "_LOOP_KEYS", 20)
    store = MemoryStore()
    g = Guard(store=store, retry=False, clock=clock, loops=True)
    client = FakeLLM().openai(guard=g)
    for word in _WORDS:
        chat(client, f"Define {word}.")
    assert 0 < len(store._loops) <= 20
    assert len(store._loop_cooldowns) == 0


def test_memory_store_keeps_a_bounded_history_per_key(clock: Clock) -> None:
    """Warn mode records every repeat, yet each key keeps at most 10 x (max_repeats + 1) entries
    (block mode: max_repeats + 1)."""
    store = MemoryStore()
    g = Guard(store=store, retry=False, clock=clock, loops=LoopDetector(mode="warn", on_loop=lambda e: None))
    client = FakeLLM().openai(guard=g)
    for n in range(50):
        chat(client)
        chat(client, f"Attempt {n}: go")
    assert store._loops
    assert max(len(entries) for entries in store._loops.values()) == 40


def test_memory_store_quarantines_are_bounded(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Expired quarantines are dropped once there are more than the key limit."""
    monkeypatch.setattr(memory_store, "_LOOP_KEYS", 5)
    store = MemoryStore()
    g = Guard(store=store, retry=False, clock=clock, loops=LoopDetector(max_repeats=1, cool_down_s=1))
    client = FakeLLM().openai(guard=g)
    for word in _WORDS[:20]:
        chat(client, f"Define {word}.")
        with pytest.raises(LoopDetected):
            chat(client, f"Define {word}.")
        clock.advance(2)
    assert 0 < len(store._loop_cooldowns) <= 5


def loop_rows_by_key(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT key, count(*) FROM loop_events GROUP BY key").fetchall())


def test_sqlite_store_keeps_a_bounded_history_per_key(make: Callable[..., Guard], tmp_path: Path) -> None:
    """Warn mode, a frozen clock (every entry has the same time): still at most 10 x 4 rows per key."""
    path = tmp_path / "ledger.db"
    g = make(store=f"sqlite:///{path}", mode="warn", on_loop=lambda e: None)
    client = FakeLLM().openai(guard=g)
    for n in range(50):
        chat(client)
        chat(client, f"Attempt {n}: go")
    counts = loop_rows_by_key(path)
    assert counts
    assert max(counts.values()) == 40


def test_sqlite_store_sweeps_entries_out_of_the_window(
    make: Callable[..., Guard], clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries of keys never asked about again are swept once the window has passed, so the table
    does not grow without bound; so are lapsed cool-downs."""
    monkeypatch.setattr(sqlite_store, "_LOOP_SWEEP_EVERY", 16)
    path = tmp_path / "ledger.db"
    g = make(store=f"sqlite:///{path}", window_s=60, cool_down_s=30, max_repeats=1)
    client = FakeLLM().openai(guard=g)
    for word in _WORDS[:40]:
        chat(client, f"Define {word}.")
    with pytest.raises(LoopDetected):
        chat(client, "Define apple.")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM loop_events").fetchone()[0] >= 40
        assert conn.execute("SELECT count(*) FROM loop_cooldowns").fetchone()[0] >= 1
    for _ in range(3):  # three more windows of 16 requests (the same 16 each time)
        clock.advance(61)
        last_start = clock().timestamp()
        for word in _WORDS[40:56]:
            chat(client, f"Spell {word} backwards.")
            clock.advance(0.01)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM loop_events WHERE ts < ?", (last_start,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM loop_cooldowns").fetchone() == (0,)
        per_request = conn.execute("SELECT count(DISTINCT key) FROM loop_events").fetchone()[0] // 16
        assert conn.execute("SELECT count(*) FROM loop_events").fetchone() == (16 * per_request,)


def test_a_failing_loop_store_is_logged_and_the_check_skipped(
    make: Callable[..., Guard], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store raising in loop_observe: every call still goes through, each failure is logged."""
    store = MemoryStore()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(store, "loop_observe", broken)
    g = make(store=store)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    with caplog.at_level(logging.ERROR, logger="tokenguard"):
        for _ in range(5):
            chat(client)
    assert sent(fake) == 5
    failures = [r for r in caplog.records if "loop detector could not check" in r.getMessage()]
    assert len(failures) == 5
    assert failures[0].exc_info is not None
    assert g.stats().loops_blocked == 0


# -- 12. configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_repeats", 0),
        ("max_repeats", -1),
        ("max_repeats", 2.5),
        ("max_repeats", True),
        ("max_repeats", "3"),
        ("window_s", 0),
        ("window_s", -5),
        ("window_s", float("inf")),
        ("window_s", float("nan")),
        ("window_s", True),
        ("window_s", "600"),
        ("cool_down_s", -1),
        ("cool_down_s", float("inf")),
        ("cool_down_s", None),
        ("counter_step", -1),
        ("counter_step", float("nan")),
        ("counter_step", False),
        ("normalized", "yes"),
        ("normalized", 1),
        ("tool_calls", None),
        ("count_cache_hits", 0),
        ("mode", "log"),
        ("mode", "BLOCK"),
        ("on_loop", 42),
        ("on_loop", "print"),
    ],
)
def test_bad_settings_raise_configuration_error_naming_the_setting(setting: str, value: Any) -> None:
    """Every bad value is refused at construction, naming LoopDetector.<setting>."""
    with pytest.raises(ConfigurationError) as info:
        LoopDetector(**{setting: value})
    assert info.value.setting == f"LoopDetector.{setting}"
    assert f"LoopDetector.{setting}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_edge_settings_are_accepted() -> None:
    """Zero cool-down and counter step, one repeat, fractional windows, and warn mode are valid."""
    detector = LoopDetector(
        max_repeats=1, window_s=0.5, cool_down_s=0, counter_step=0, mode="warn", on_loop=print, normalized=False
    )
    assert (detector.max_repeats, detector.window_s, detector.cool_down_s, detector.counter_step) == (1, 0.5, 0, 0)
    with pytest.raises(AttributeError):
        detector.max_repeats = 5  # type: ignore[misc]


@pytest.mark.parametrize("value", ["yes", 1, 3, LoopDetector, {"max_repeats": 3}])
def test_guard_loops_must_be_a_bool_or_a_detector(value: Any) -> None:
    """Guard(loops=...) refuses anything but True, False or a LoopDetector, naming "loops"."""
    with pytest.raises(ConfigurationError) as info:
        Guard(store="memory://", loops=value)
    assert info.value.setting == "loops"


def test_a_store_that_cannot_hold_the_history_is_refused() -> None:
    """A custom ledger store without loop_observe cannot back a loop detector."""

    class LedgerOnly:
        url = "custom://"

        def record(self, row: Any) -> None: ...
        def spent(self, *, since: Any, scope: Any) -> Any: ...
        def stats(self, *, since: Any, scope: Any) -> Any: ...
        def rows(self, *, since: Any = None, until: Any = None, scope: Any = None) -> Any: ...
        def close(self) -> None: ...

    Guard(store=LedgerOnly())  # fine without loops
    with pytest.raises(ConfigurationError) as info:
        Guard(store=LedgerOnly(), loops=True)
    assert info.value.setting == "store"


# -- 13. the exception ----------------------------------------------------------------------------


def test_loop_detected_is_a_tokenguard_error_and_no_vendor_error() -> None:
    """Callers catching the vendors' errors do not swallow it by accident."""
    assert issubclass(LoopDetected, tokenguard.TokenguardError)
    assert not issubclass(LoopDetected, openai.OpenAIError)
    assert not issubclass(LoopDetected, anthropic.AnthropicError)
    assert not issubclass(LoopDetected, ConfigurationError)
    assert tokenguard.LoopDetected is LoopDetected
    assert tokenguard.LoopDetector is LoopDetector


def test_anthropic_loop_is_refused_with_no_request(make: Callable[..., Guard]) -> None:
    """Anthropic sync client: the 4th identical message is refused before sending."""
    g = make()
    fake = FakeLLM()
    client = fake.anthropic(guard=g)
    assert [outcome(lambda: message(client)) for _ in range(4)] == ["ok", "ok", "ok", "exact"]
    assert sent(fake) == 3
    [row] = blocked_loop_rows(g)
    assert (row.vendor, row.model) == ("anthropic", AN)


async def test_anthropic_async_loop_is_refused(make: Callable[..., Guard]) -> None:
    """Anthropic async client."""
    g = make()
    fake = FakeLLM()
    client = fake.anthropic(guard=g, async_=True)
    for _ in range(3):
        await message(client)
    with pytest.raises(LoopDetected):
        await message(client)
    assert sent(fake) == 3


def test_loop_detected_survives_pickling() -> None:
    """A worker process's LoopDetected reaches the parent with its attributes."""
    err = LoopDetected(repeats=4, window_s=600, fingerprint="ab" * 16, level="normalized", scope={"user": "a"})
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.repeats, copy.level, copy.scope, str(copy)) == (4, "normalized", {"user": "a"}, str(err))


# -- 14. fingerprints ----------------------------------------------------------------------------------


DETECTOR = LoopDetector()
BODY: dict[str, Any] = {"model": OA, "messages": MSGS}


def exact(body: dict[str, Any], vendor: str = "openai", endpoint: str = "chat.completions") -> str:
    return prints_of(DETECTOR, vendor, endpoint, body).exact


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0.9},
        {"max_tokens": 17},
        {"max_completion_tokens": 99},
        {"top_p": 0.5},
        {"seed": 123},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"n": 2},
        {"user": "end-user-7"},
        {"metadata": {"run": "42"}},
        {"presence_penalty": 1.0},
    ],
)
def test_sampling_and_bookkeeping_settings_do_not_change_the_fingerprint(extra: dict[str, Any]) -> None:
    """A loop that also varies its temperature or max_tokens is still the same request."""
    assert exact({**BODY, **extra}) == exact(BODY)


@pytest.mark.parametrize(
    "extra",
    [
        {"model": "gpt-4o-mini"},
        {"messages": [{"role": "user", "content": PROMPT + "!"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, *MSGS]},
        {"system": "Be brief."},
        {"tools": [WEATHER]},
        {"tool_choice": "required"},
        {"response_format": {"type": "json_object"}},
        {"instructions": "Answer in French."},
        {"previous_response_id": "resp_123"},
        {"text": {"format": {"type": "text"}}},
        {"functions": [WEATHER["function"]]},
        {"output_config": {"effort": "low"}},
    ],
)
def test_what_decides_the_answer_changes_the_fingerprint(extra: dict[str, Any]) -> None:
    """Model, system, messages, tools, tool choice, response format ... each make another request."""
    assert exact({**BODY, **extra}) != exact(BODY)


def test_vendor_and_endpoint_are_part_of_the_fingerprint() -> None:
    assert exact(BODY, vendor="anthropic") != exact(BODY)
    assert exact(BODY, endpoint="responses") != exact(BODY)


def test_json_key_order_does_not_matter() -> None:
    """The same body built in another key order (top level and nested) has the same fingerprints."""
    body = {"model": OA, "messages": [{"role": "user", "content": "Attempt 3: x"}], "tools": [WEATHER]}
    reordered = {
        "tools": [{"function": dict(reversed(list(WEATHER["function"].items()))), "type": "function"}],
        "messages": [{"content": "Attempt 3: x", "role": "user"}],
        "model": OA,
    }
    assert prints_of(DETECTOR, "openai", "chat.completions", body) == prints_of(
        DETECTOR, "openai", "chat.completions", reordered
    )


def normal(text: str) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """The normalized fingerprint and masked values of a one-message request (to a model without digits)."""
    body = {"model": PLAIN, "messages": [{"role": "user", "content": text}]}
    p = prints_of(DETECTOR, "openai", "chat.completions", body, now=NEAR_MARCH_18)
    return p.normal, p.values


NEAR_MARCH_18 = datetime(2026, 3, 18, 12, tzinfo=UTC).timestamp()  # the time the stamps below are "now"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("case 0b9e7c1e-4f5a-4b8e-9a61-3c2d1e0f9a7b", "item"),
        ("commit 3f9a2c7e1b", "item"),
        ("report for 2026-01-05", "item"),
        ("at 2026-03-18T12:00:01Z", "clock"),
        ("at 2026-03-18T12:00:01.250+01:00", "clock"),
        ("at 08:41:07", "clock"),
        ("since 1773835201", "clock"),
        ("at 2025-07-01T09:00:00Z", "item"),  # far from now: an event's time, not a clock
        ("order 1234567890", "item"),  # an id that reads as an epoch far from now
        ("report for 2026/01/05", "item"),
        ("report for 05.01.2026", "item"),
        ("page 7", "number"),
        ("ratio 0.75", "number"),
    ],
)
def test_volatile_tokens_are_masked_by_kind(text: str, kind: str) -> None:
    """UUIDs, hex ids and dates are items; timestamps, clock times and epochs are clocks; other numbers numbers."""
    shape, values = normal(text)
    assert shape is not None
    assert [k for k, _ in values] == [kind]
    assert values[0][1].lower() in text.lower()


def test_the_normalized_shape_ignores_case_whitespace_and_volatile_values() -> None:
    """Same shape up to case, blanks and masked values; another wording is another shape."""
    base = normal("Attempt 1 at 08:00:00: fetch the report")[0]
    assert normal("ATTEMPT  2 at 09:15:30:\tfetch the Report")[0] == base
    assert normal("Attempt 1 at 08:00:00: fetch the invoice")[0] != base


def _collapse_by_regex(text: str) -> str:
    """What ``_collapse_space`` replaced: the two regexes it must agree with."""
    return re.sub(r'(?<=")\s|\s(?=")', "", re.sub(r"(?:\s|\\[nrt])+", " ", text))


# blanks (ASCII and not), escapes, quotes, and letters that make or break an escape
_SPACE_ALPHABET = ["a", "n", "t", "r", '"', " ", "\\", "\t", "\n", "\x1c", "\u2003", "\x85"]


def test_whitespace_collapse_equals_the_regexes_on_every_short_string() -> None:
    """Every string of up to 5 characters over blanks, escapes and quotes collapses as the regexes did."""
    for size in range(6):
        for chars in itertools.product(_SPACE_ALPHABET, repeat=size):
            text = "".join(chars)
            assert _collapse_space(text) == _collapse_by_regex(text), repr(text)


@given(st.text(alphabet=st.sampled_from(_SPACE_ALPHABET) | st.characters(), max_size=200))
def test_whitespace_collapse_equals_the_regexes(text: str) -> None:
    """Any text collapses exactly as the regexes did."""
    assert _collapse_space(text) == _collapse_by_regex(text)


def _show(match: re.Match[str]) -> str:
    return f"<{match.lastgroup}:{match.group(0)}>"


# characters volatile tokens are made of, and their neighbours
_TOKEN_ALPHABET = ["a", "f", "g", "z", "t", "0", "1", "9", "-", ":", ".", "/", "+", " "]
_TOKENS = st.sampled_from(
    [
        "deadbeef-dead-beef-dead-beefdeadbeef",
        "123e4567-e89b-12d3-a456-426614174000",
        "2026-11-30t12:00:00z",
        "2026-11-30 12:00:00.25+01:00",
        "2026-11-30t12:00",
        "12:00:00",
        "9:15:30.5",
        "2026-11-30",
        "30/11/2026",
        "1764504000",
        "1764504000123.5",
        "ab12cd34ef",
        "cafebabe1",
        "0x1f",
        "12.5",
        "3.",
        "attempt",
        "face",
    ]
)


def test_volatile_masking_equals_the_regex_on_every_short_string() -> None:
    """Every string of up to 5 token characters is masked exactly as ``_VOLATILE.sub`` masks it."""
    for size in range(6):
        for chars in itertools.product(_TOKEN_ALPHABET, repeat=size):
            text = "".join(chars)
            assert _scan_volatile(text, _show) == _VOLATILE.sub(_show, text), repr(text)


@given(st.lists(_TOKENS | st.sampled_from(_TOKEN_ALPHABET) | st.text(max_size=3), max_size=40))
def test_volatile_masking_equals_the_regex(parts: list[str]) -> None:
    """Tokens, their parts and any text, glued in any order: masked exactly as ``_VOLATILE.sub`` masks them."""
    text = "".join(parts)
    assert _scan_volatile(text, _show) == _VOLATILE.sub(_show, text)
    assert _mask_volatile(text, _show) == _VOLATILE.sub(_show, text)


def test_levels_that_are_off_compute_no_fingerprint() -> None:
    """normalized=False / tool_calls=False: no normalized / tool fingerprint at all."""
    body = {"model": OA, "messages": openai_agent([PARIS])}
    on = prints_of(DETECTOR, "openai", "chat.completions", body)
    assert on.normal is not None
    assert on.tool is not None
    off = prints_of(LoopDetector(normalized=False, tool_calls=False), "openai", "chat.completions", body)
    assert (off.exact, off.normal, off.values, off.tool) == (on.exact, None, (), None)


def test_the_tool_fingerprint_is_the_latest_step_answered() -> None:
    """Only a request answering the latest assistant tool calls has one; it ignores the call ids,
    the tool results and earlier turns, but not the model, the name or the arguments."""

    def tool(body: dict[str, Any]) -> str | None:
        return prints_of(DETECTOR, "openai", "chat.completions", body).tool

    one = tool({"model": OA, "messages": openai_agent([PARIS])})
    assert one is not None
    other_ids = openai_agent([PARIS])
    other_ids[1]["tool_calls"][0]["id"] = other_ids[2]["tool_call_id"] = "call_zz9"
    other_ids[2]["content"] = "rain"
    assert tool({"model": OA, "messages": other_ids}) == one
    assert tool({"model": OA, "messages": openai_agent([PARIS, PARIS])}) == one
    assert tool({"model": OA, "messages": openai_agent([PARIS, ("get_time", "{}")])}) != one
    assert tool({"model": OA, "messages": openai_agent([("get_weather", '{"city": "Lyon"}')])}) != one
    assert tool({"model": "gpt-4o-mini", "messages": openai_agent([PARIS])}) != one
    answered = openai_agent([PARIS])
    assert tool({"model": OA, "messages": [*answered, {"role": "user", "content": "thanks"}]}) is None
    assert tool({"model": OA, "messages": [*answered, {"role": "assistant", "content": "Sunny."}]}) is None
    assert tool({"model": OA, "messages": MSGS}) is None
    anthropic_one = prints_of(DETECTOR, "anthropic", "messages", {"model": AN, "messages": anthropic_agent([])})
    assert anthropic_one.tool is None
    mixed = anthropic_agent([("get_weather", {"city": "Paris"})])
    mixed[-1]["content"].append({"type": "text", "text": "and hurry"})  # a user turn that says more
    assert prints_of(DETECTOR, "anthropic", "messages", {"model": AN, "messages": mixed}).tool is None
    responses = prints_of(DETECTOR, "openai", "responses", {"model": OA, "input": responses_agent([PARIS])})
    assert responses.tool is not None
    assert prints_of(DETECTOR, "openai", "responses", {"model": OA, "input": "hi"}).tool is None


# -- what is not a repeat ------------------------------------------------------------------------


def test_embeddings_are_not_loop_checked(make: Callable[..., Guard]) -> None:
    """Ingestion re-embeds boilerplate chunks ("Page 1 of 12", a disclaimer) by design: embeddings
    are never counted, however often the same input comes."""
    g = make(max_repeats=1)
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for _ in range(6):
        client.embeddings.create(model="text-embedding-3-small", input="Confidential - do not distribute")
    assert len(fake.money_requests) == 6
    assert g.stats().loops_blocked == 0


def test_calls_refused_by_a_budget_are_not_repeats(make: Callable[..., Guard]) -> None:
    """A request refused by a budget was not sent: clicking again keeps getting BudgetExceeded,
    never LoopDetected, and once the budget allows it the request counts from one."""
    g = make(max_repeats=2, budgets=[tokenguard.Budget(limit_usd=Decimal("0.000001"))])
    fake = FakeLLM()
    client = fake.openai(guard=g)
    for _ in range(5):
        with pytest.raises(tokenguard.BudgetExceeded):
            chat(client, model=PLAIN)
    assert g.stats().loops_blocked == 0
    assert g.stats().budget_blocks == 5
    assert fake.money_requests == []


def test_a_refused_loop_gives_back_its_budget_reservation(make: Callable[..., Guard]) -> None:
    """The loop check runs after the budget reservation; a refused loop releases it at once."""
    g = make(max_repeats=1, budgets=[tokenguard.Budget(limit_usd=10)])
    client = FakeLLM().openai(guard=g)
    chat(client, model=PLAIN)
    with pytest.raises(LoopDetected):
        chat(client, model=PLAIN)
    (status,) = g.budget_status()
    assert status.held_usd == 0


def test_a_ledger_written_before_the_loop_detector_is_upgraded(tmp_path: Path, clock: Clock) -> None:
    """A SQLite ledger from an earlier release (schema 2: no loop tables) gets them when opened."""
    path = tmp_path / "old.db"
    Guard(store=f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.executescript("DROP TABLE loop_events; DROP TABLE loop_cooldowns; PRAGMA user_version=2;")
    g = Guard(store=f"sqlite:///{path}", retry=False, clock=clock, loops=LoopDetector(max_repeats=1))
    client = FakeLLM().openai(guard=g)
    chat(client)
    with pytest.raises(LoopDetected):
        chat(client)
    g.close()


def test_calls_refused_by_an_open_circuit_are_not_repeats(fake: FakeLLM) -> None:
    """A call an open circuit refuses was not sent, so it is not a repeat: once the circuit
    closes, the same request goes out (it was LoopDetected after three refusals)."""
    now = [1000.0]
    breaker = tokenguard.CircuitBreaker(failures=1, cool_down_s=60)
    retry = tokenguard.Retry(attempts=1, circuit_breaker=breaker)
    guard = tokenguard.Guard(store="memory://", retry=retry, loops=tokenguard.LoopDetector(max_repeats=3))
    guard.pipeline.retrier._breakers._clock = lambda: now[0]  # type: ignore[union-attr]
    client = fake.openai(guard=guard)
    fake.fail(429)
    ask = [{"role": "user", "content": "my question"}]
    with tokenguard.scope(user="alice"):
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "another"}])
        for _ in range(5):
            with pytest.raises(tokenguard.CircuitOpen):
                client.chat.completions.create(model="gpt-4o", messages=ask)
        now[0] += 61  # the circuit half-opens: the next call is its trial
        reply = client.chat.completions.create(model="gpt-4o", messages=ask)
    assert reply.choices[0].message.content
    assert len(fake.money_requests) == 2
    guard.flush()
    assert [r.error for r in guard.store.rows()][1:6] == ["circuit_open"] * 5
