"""Budgets under concurrency: threads and processes racing for one cap never overspend it,
alerts fire once in total, and the holds of a killed process are reclaimed."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import tokenguard
from chat_server import serve_chat
from tokenguard import Budget, BudgetExceeded, Guard
from tokenguard.providers.openai import CHAT, OpenAIAdapter
from tokenguard.testing import FakeLLM, Reply

MODEL = "tg-budget-model"  # priced on every guard below: $1 / M input tokens, $4 / M output tokens
BIG = [{"role": "user", "content": "word " * 220}]  # 1,100 bytes: its input bound (1,149) covers 1,000 tokens
BOUND = OpenAIAdapter().input_bound(CHAT, {"messages": BIG})
MAX_TOKENS = 500
ACTUAL = 1000 * Decimal("0.000001") + 200 * Decimal("0.000004")  # what the server's usage costs: $0.0018
WORST = BOUND * Decimal("0.000001") + MAX_TOKENS * Decimal("0.000004")  # what each call reserves: $0.003149
CAP = 20 * ACTUAL  # room for 20 calls: $0.036


def priced_guard(store: str, **kw: Any) -> Guard:
    g = Guard(store=store, **kw)
    g.register_price(MODEL, input_mtok="1", output_mtok="4")
    return g


def call_until_refused_with_nothing_held(client: Any, limit: int = 200, **kw: Any) -> tuple[int, int]:
    """Call until a refusal comes while no other call holds anything (the cap is then truly used).

    Returns (admitted, refused).
    """
    admitted = refused = 0
    for _ in range(limit):
        try:
            client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS, **kw)
        except BudgetExceeded as err:
            refused += 1
            if err.held_usd == 0:
                return admitted, refused
        else:
            admitted += 1
    raise AssertionError(f"{limit} calls and no final refusal")


# -- threads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_threads_racing_for_one_cap_never_overspend(store_kind: str, tmp_path: Path) -> None:
    """8 threads on one cap: the server answers at most cap / cost calls, nearly all of it; refusals never reach it."""
    fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
    store = "memory://" if store_kind == "memory" else f"sqlite:///{tmp_path / 'ledger.db'}"
    g = priced_guard(store, budgets=[Budget(limit_usd=CAP, period="total")])
    barrier = threading.Barrier(8)
    lock = threading.Lock()
    admitted_ids: list[str] = []
    refused_ids: list[str] = []

    def work(thread: int) -> None:
        client = fake.openai(guard=g)
        barrier.wait(timeout=30)
        deadline = time.monotonic() + 30
        # refusals while other threads still hold are quick: retry until one finds nothing held
        for i in itertools.count():
            if time.monotonic() > deadline:
                break
            call_id = f"{thread}-{i}"
            try:
                client.chat.completions.create(
                    model=MODEL, messages=BIG, max_tokens=MAX_TOKENS, extra_headers={"x-call-id": call_id}
                )
            except BudgetExceeded as err:
                with lock:
                    refused_ids.append(call_id)
                if err.held_usd == 0:
                    return
            else:
                with lock:
                    admitted_ids.append(call_id)
        raise AssertionError("no final refusal")

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, t) for t in range(8)]:
            future.result(timeout=60)

    served = fake.money_requests
    served_ids = Counter({k.lower(): v for k, v in r.headers.items()}["x-call-id"] for r in served)
    assert served_ids == Counter(admitted_ids)  # each admitted call reached the server exactly once
    assert not set(served_ids) & set(refused_ids)  # no refused call did
    assert len(refused_ids) >= 8
    assert len(served) * ACTUAL <= CAP
    assert len(served) * ACTUAL >= CAP - WORST  # no gross under-use
    [status] = g.budget_status()
    assert status.spent_usd == len(served) * ACTUAL
    assert status.held_usd == 0
    assert g.spent() == len(served) * ACTUAL
    assert g.stats().budget_blocks == len(refused_ids)
    g.close()


# -- processes ----------------------------------------------------------------------------------


@pytest.fixture
def chat_server() -> Iterator[Any]:
    """A loopback chat-completions server counting the requests it answered."""
    with serve_chat() as server:
        yield server


def _spend_worker(db: str, port: int, barrier: Any, results: Any) -> None:
    """Process worker: call the loopback server through its own Guard until the shared cap refuses."""
    try:
        alerts: list[tokenguard.Alert] = []
        g = priced_guard(f"sqlite:///{db}", budgets=[Budget(limit_usd=CAP, period="total")], on_alert=alerts.append)
        client = tokenguard.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", guard=g)
        barrier.wait(timeout=60)
        admitted, refused = call_until_refused_with_nothing_held(client)
        g.close()
        results.put(("ok", os.getpid(), admitted, refused, [(a.kind, a.threshold, a.key) for a in alerts]))
    except BaseException:
        results.put(("error", os.getpid(), traceback.format_exc()))


def test_processes_sharing_a_sqlite_cap_never_overspend(tmp_path: Path, chat_server: Any) -> None:
    """4 processes against one server: served spend stays under the cap and each alert is delivered once in total."""
    ctx = multiprocessing.get_context("spawn")
    db = str(tmp_path / "shared.db")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    port = chat_server.server_address[1]
    procs = [ctx.Process(target=_spend_worker, args=(db, port, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    errors = [o[2] for o in outcomes if o[0] == "error"]
    assert not errors, errors[0]
    answered = sum(chat_server.answered.values())
    assert sum(o[2] for o in outcomes) == answered  # every admitted call was answered, and only those
    assert answered * ACTUAL <= CAP
    assert answered * ACTUAL >= CAP - WORST
    delivered = Counter((kind, threshold) for o in outcomes for kind, threshold, _ in o[4])
    assert delivered == {("threshold", 0.5): 1, ("threshold", 0.75): 1, ("threshold", 0.9): 1, ("blocked", 1.0): 1}
    check = priced_guard(f"sqlite:///{db}", budgets=[Budget(limit_usd=CAP, period="total")])
    [status] = check.budget_status()
    assert (status.spent_usd, status.held_usd) == (answered * ACTUAL, Decimal(0))
    assert check.spent() == answered * ACTUAL
    check.close()


HOLD_CAP = Decimal("0.01")
DEAD_HOLD = Decimal("0.009")  # leaves $0.001, less than one call's worst case


def _hold_and_hang(db: str, ready: Any) -> None:
    """Process worker: reserve most of the cap, report, then hang until killed."""
    g = priced_guard(f"sqlite:///{db}", budgets=[Budget(limit_usd=HOLD_CAP, period="total")], budget_hold_s=3600)
    g.pipeline.budgets.admit({}, DEAD_HOLD, 0)  # type: ignore[union-attr]
    ready.put(os.getpid())
    time.sleep(120)


def test_holds_of_a_killed_process_are_reclaimed(tmp_path: Path) -> None:
    """A hold left by a SIGKILLed process on this host is dropped as soon as it keeps a call out."""
    ctx = multiprocessing.get_context("spawn")
    db = str(tmp_path / "shared.db")
    ready = ctx.Queue()
    child = ctx.Process(target=_hold_and_hang, args=(db, ready))
    child.start()
    try:
        assert ready.get(timeout=60) == child.pid
        fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
        g = priced_guard(f"sqlite:///{db}", budgets=[Budget(limit_usd=HOLD_CAP, period="total")], budget_hold_s=3600)
        client = fake.openai(guard=g)
        with pytest.raises(BudgetExceeded) as info:  # the live child's hold keeps the call out
            client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        assert info.value.held_usd == DEAD_HOLD
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        assert len(fake.money_requests) == 1
        [status] = g.budget_status()
        assert (status.spent_usd, status.held_usd) == (ACTUAL, Decimal(0))
        g.close()
    finally:
        if child.is_alive():
            child.kill()
            child.join(30)
