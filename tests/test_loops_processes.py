"""The loop detector across processes: processes sharing one SQLite store share one history, so
together they send a repeated request exactly ``max_repeats`` times.

Each process has its own ``FakeLLM``, so each reports how many of its requests were sent; the
parent adds them up. Children are forked from a forkserver that has tokenguard imported already
(spawned where there is none), which keeps this fast.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

import tokenguard
from tokenguard import Guard, LoopDetected, LoopDetector
from tokenguard.testing import FakeLLM

MODEL = "gpt-4o"
PROMPT = "Rebuild the search index for tenant 42"


def _context() -> Any:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["tokenguard", "tokenguard.testing"])
        return ctx
    return multiprocessing.get_context("spawn")


class _SlowDecisions:
    """A loop store whose decisions take a while inside its transaction, widening any race."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def loop_observe(self, keys: Any, details: Any, *, decide: Any, **kw: Any) -> Any:
        def slow(*args: Any) -> Any:
            time.sleep(0.005)
            return decide(*args)

        return self.store.loop_observe(keys, details, decide=slow, **kw)


def _send_worker(db: str, requests: int, max_repeats: int, barrier: Any, results: Any) -> None:
    """Process worker: send the same request ``requests`` times through a guard on the shared file;
    report (pid, sent, refused, refusal levels)."""
    try:
        g = Guard(store=f"sqlite:///{db}", retry=False, loops=LoopDetector(max_repeats=max_repeats))
        g.pipeline.loops._store = _SlowDecisions(g.pipeline.loops._store)  # type: ignore[union-attr]
        fake = FakeLLM()
        client = fake.openai(guard=g)
        barrier.wait(timeout=60)
        levels = []
        for _ in range(requests):
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
            except LoopDetected as err:
                levels.append(err.level)
        g.close()
        results.put(("ok", os.getpid(), len(fake.money_requests), len(levels), levels))
    except BaseException:
        results.put(("error", os.getpid(), traceback.format_exc()))


@pytest.mark.parametrize(("processes", "max_repeats"), [(4, 3), (2, 1)])
def test_processes_sharing_a_sqlite_store_send_a_repeat_exactly_max_repeats_times(
    tmp_path: Path, processes: int, max_repeats: int
) -> None:
    """N processes send the same request 5 times each, all at once (each decision taking a few
    milliseconds): exactly max_repeats are sent in total, the rest are refused (and recorded as
    loops_blocked in the shared ledger)."""
    ctx = _context()
    db = str(tmp_path / "shared.db")
    Guard(store=f"sqlite:///{db}").close()  # the file and its tables exist before the race
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    per_process = 5
    procs = [
        ctx.Process(target=_send_worker, args=(db, per_process, max_repeats, barrier, results))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    errors = [o[2] for o in outcomes if o[0] == "error"]
    assert not errors, errors[0]
    assert len({o[1] for o in outcomes}) == processes  # really separate processes
    total = processes * per_process
    assert sum(o[2] for o in outcomes) == max_repeats
    assert sum(o[3] for o in outcomes) == total - max_repeats
    assert {level for o in outcomes for level in o[4]} <= {"exact", "cool-down"}
    check = Guard(store=f"sqlite:///{db}")
    stats = check.stats()
    assert (stats.calls, stats.loops_blocked) == (total, total - max_repeats)
    check.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM loop_cooldowns").fetchone()[0] >= 1


def test_separate_sqlite_files_do_not_share(tmp_path: Path) -> None:
    """Two guards on two SQLite files (in one process) each allow max_repeats."""
    fake = FakeLLM()
    guards = [Guard(store=f"sqlite:///{tmp_path / f'l{i}.db'}", retry=False, loops=True) for i in range(2)]
    clients = [fake.openai(guard=g) for g in guards]
    for _ in range(3):
        for client in clients:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
    assert len(fake.money_requests) == 6
    for client in clients:
        with pytest.raises(tokenguard.LoopDetected):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
    for g in guards:
        g.close()


def test_two_guards_on_one_sqlite_file_share_the_history(tmp_path: Path) -> None:
    """The history is in the file: a second guard (as a second process would) sees the first's requests."""
    db = tmp_path / "shared.db"
    fake = FakeLLM()
    first = Guard(store=f"sqlite:///{db}", retry=False, loops=True)
    second = Guard(store=f"sqlite:///{db}", retry=False, loops=True)
    a, b = fake.openai(guard=first), fake.openai(guard=second)
    for client in (a, b, a):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
    with pytest.raises(tokenguard.LoopDetected):
        b.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
    assert len(fake.money_requests) == 3
    first.close()
    second.close()
