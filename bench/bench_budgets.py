"""Budget reservation throughput: reserve + settle per second on the SQLite store.

Each "call" is what a guarded call does for its budgets: reserve the worst case under
every budget that applies (one IMMEDIATE transaction, before the call is sent), then
settle to the actual cost. As in a guard, settles are batched: queued and committed
together every 20 ms (and at once when a reservation would otherwise be refused);
``--sync-settle`` settles each call in its own transaction instead. By default two
budgets apply to each call (a per-user day cap and a shared month cap); ``--budgets 1``
keeps only the per-user one. Workers hammer one shared
SQLite file with a cap that admits exactly ``--cap-calls`` calls' worth of *actual*
cost; the run checks there is zero overshoot (settled spend <= cap) and reports admitted
calls per second in total.

Run: ``python bench/bench_budgets.py`` (``--processes 1 4``, ``--seconds``). Target: >= 10,000/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import tokenguard
from tokenguard._budget import BudgetBook

sys.path.insert(0, str(Path(__file__).parent))
from _common import save

WORST = Decimal("0.0010")  # reserved per call
ACTUAL = Decimal("0.0004")  # settled per call
USAGE = tokenguard.Usage(input_tokens=100, output_tokens=20)


def _guard(path: str, cap: Decimal, budgets: int) -> tokenguard.Guard:
    every = [
        tokenguard.Budget(limit_usd=cap, period="day", per="user", name="bench-per-user"),
        tokenguard.Budget(limit_usd=cap, period="month", name="bench-shared"),
    ]
    return tokenguard.Guard(store=f"sqlite:///{path}", budgets=every[:budgets], on_alert=lambda alert: None)


def worker(
    path: str,
    cap: Decimal,
    budgets: int,
    seconds: float,
    sync_settle: bool,
    results: multiprocessing.Queue[tuple[int, int, float]],
) -> None:
    guard = _guard(path, cap, budgets)
    book = guard.pipeline.budgets
    assert isinstance(book, BudgetBook)
    scope = {"user": "bench"}
    queued: list[tuple[Any, dict[str, str], tokenguard.Usage, Decimal]] = []

    def settle_queued() -> None:
        if queued:
            book.settle_many(queued)
            queued.clear()

    book.before_refusal = settle_queued  # as the guard's settler: queued settles free their holds
    admitted = refused = 0
    start = last_settle = time.perf_counter()
    deadline = start + seconds
    while (now := time.perf_counter()) < deadline:
        try:
            hold = book.admit(scope, WORST, 120)
        except tokenguard.BudgetExceeded:
            refused += 1
            if refused > 2000:  # the cap is spent: stop hammering
                break
            continue
        admitted += 1
        if sync_settle:
            book.settle(hold, scope, USAGE, ACTUAL)
            continue
        queued.append((hold, scope, USAGE, ACTUAL))
        if now - last_settle > 0.02:
            settle_queued()
            last_settle = now
    settle_queued()
    elapsed = time.perf_counter() - start
    guard.close()
    results.put((admitted, refused, elapsed))


def run(processes: int, seconds: float, cap_calls: int, budgets: int, sync_settle: bool) -> dict[str, float]:
    cap = ACTUAL * cap_calls
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "budgets.db")
        _guard(path, cap, budgets).close()  # create the schema once
        ctx = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue[tuple[int, int, float]] = ctx.Queue()
        procs = [
            ctx.Process(target=worker, args=(path, cap, budgets, seconds, sync_settle, results))
            for _ in range(processes)
        ]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join()
        guard = _guard(path, cap, budgets)
        status = guard.budget_status(user="bench")
        guard.close()
    admitted = sum(o[0] for o in outcomes)
    wall = max(o[2] for o in outcomes)
    spent = max(s.spent_usd for s in status)
    return {
        "processes": processes,
        "admitted": admitted,
        "refused": sum(o[1] for o in outcomes),
        "calls_per_s": admitted / wall,
        "spent_usd": float(spent),
        "cap_usd": float(cap),
        "overshoot_usd": float(max(spent - cap, Decimal(0))),
        "held_after_usd": float(max(s.held_usd for s in status)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each worker hammers")
    parser.add_argument("--cap-calls", type=int, default=20_000, help="calls' worth of actual cost the cap allows")
    parser.add_argument("--budgets", type=int, choices=(1, 2), default=2, help="budgets per call: per-user (+ shared)")
    parser.add_argument("--sync-settle", action="store_true", help="settle each call in its own transaction")
    parser.add_argument("--json", metavar="PATH", help="save the results as JSON")
    parser.add_argument("--quick", action="store_true", help="a short run for CI (no timing claims)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.cap_calls = 0.5, 2_000
    results = []
    header = ("processes", "admitted", "refused", "calls/s", "spent $", "cap $", "overshoot")
    print(" ".join(f"{h:>9}" for h in header))
    ok = True
    for n in args.processes:
        r = run(n, args.seconds, args.cap_calls, args.budgets, args.sync_settle)
        results.append(r)
        ok &= r["overshoot_usd"] == 0 and r["held_after_usd"] == 0
        print(
            f"{n:>9} {r['admitted']:>9} {r['refused']:>8} {r['calls_per_s']:>9.0f} {r['spent_usd']:>9.4f} "
            f"{r['cap_usd']:>7.2f} {r['overshoot_usd']:>9}"
        )
    save(args.json, "budgets-sqlite", results, seconds=args.seconds, budgets=args.budgets, quick=args.quick)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
