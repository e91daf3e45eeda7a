"""Budget admissions on the Redis store: admitted calls per second from several processes, and zero overshoot.

What one "admitted call" is here — what a guard does for its budgets around each LLM call:

1. ``BudgetBook.admit(scope, worst_usd, worst_tokens)`` before the call is sent: the worst case
   (2,000 input tokens + ``max_tokens`` 1,000 at gpt-4o-mini's list price, $0.15 / $0.60 per
   million: $0.0009, 3,000 tokens) is reserved under two budgets at once — a shared
   ``Budget(limit_usd=cap, period="day")`` and a ``Budget(limit_usd=user_cap, period="day",
   per="user")`` — in one reserve script (one round trip; the store sends the admissions that
   a process's threads ask for meanwhile together in one script, ``_Batcher``). Latency is
   measured around this call.
2. The call's settle is queued (no LLM is called: the "response" is drawn at once), with an
   actual cost <= the worst case: the 2,000 input tokens plus a random 0..1,000 output tokens,
   so $0.0003..$0.0009, exact to the nano-dollar.
3. A settler thread per process does what the guard's background settler does
   (``Pipeline._defer`` / ``_drain_loop`` / ``drain``): it wakes when the queue turns non-empty,
   sleeps ``--defer-s`` (the guard's ``settle_delay_s``, 0.02 s) so a batch gathers, then settles
   everything queued with ONE ``BudgetBook.settle_many`` (one settle script for the batch).
   As in the guard, ``book.before_refusal`` drains the queue first, so a refusal is never
   caused by this process's own queued settles.

Each of ``--processes`` worker processes (spawned) opens one ``RedisStore`` (one redis-py
connection pool) and one ``BudgetBook``, shared by its ``--threads`` admitting threads and its
settler. The benchmark starts its own ``redis-server`` on a free loopback port (no
persistence), or uses ``--url``; every run gets a fresh key prefix.

Modes (``--modes``, both by default):

* ``throughput``: caps that are never hit ($1e9). Users are drawn uniformly from ``--users``
  (1,000). Before the clock starts, each process admits and settles one call for every user
  (the first use of a budget key in a process costs an extra round trip: ``RedisStore._index``
  lists the key for ``status_all``), so the window measures the steady state. Then every
  thread admits in a loop for ``--warmup`` + ``--seconds``; calls admitted in the last
  ``--seconds`` count. Reports admitted calls/s in total and per process, admission latency
  p50/p99 (a thread's wait for the GIL and for a batch in flight included), the settle
  batches, and over the same window the CPU per admitted call in the workers and in
  redis-server (``INFO cpu``; ``INFO commandstats`` deltas go to the JSON), and how many cores
  the workers, redis-server and the whole machine kept busy (``/proc/stat``: a noisy machine
  shows up as "all" well above workers + server).
* ``overshoot``: a shared cap that will be hit (``--cap``, $5: ~8,000 calls) and a per-user cap
  (``--user-cap``, $0.50) over 20 users drawn Zipf-like (user ``i`` with weight ``1/(i+1)``), so
  the busiest users hit their own cap before the shared one is spent. Every thread admits until
  the shared budget has refused it ``--stop-after`` times (per-user refusals just move on).
  Its calls/s include the refusals' cost (each drains the settle queue, retries, reclaims).

After every run (all settles done, all processes exited) the store is read back
(``RedisStore.totals`` of the shared key and of every user's key): the overshoot count —
budget keys whose settled spend exceeds their limit — must be 0; held USD and tokens must be 0;
and the store's settled spend must equal, exactly (``Decimal``), what the workers settled, in
total (shared key) and for every user. Any failure makes the exit status 1. Throughput is
reported against the target (>= 10,000/s with 4 processes) but never fails the run.

Run: ``python bench/bench_redis.py`` (4 processes x 8 threads, 5 s measured, then the
overshoot run); ``--processes 1 4`` to compare; ``--store sqlite`` for the SQLite store on a
temporary file, for reference; ``--quick`` for CI (short, no timing); ``--json PATH`` saves
the results.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from bisect import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from itertools import accumulate
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import tokenguard
from tokenguard._budget import Alert, Budget, BudgetBook, BudgetStore, Hold
from tokenguard._periods import period_start
from tokenguard.stores import open_store

sys.path.insert(0, str(Path(__file__).parent))
from _common import save

log = logging.getLogger("bench_redis")

# gpt-4o-mini list prices (USD per token): $0.15 / $0.60 per million
INPUT_PRICE = Decimal("0.00000015")
OUTPUT_PRICE = Decimal("0.0000006")
INPUT_TOKENS = 2000
MAX_OUTPUT_TOKENS = 1000
WORST_USD = INPUT_TOKENS * INPUT_PRICE + MAX_OUTPUT_TOKENS * OUTPUT_PRICE  # $0.0009
WORST_TOKENS = INPUT_TOKENS + MAX_OUTPUT_TOKENS
OUTPUT_COSTS = [INPUT_TOKENS * INPUT_PRICE + n * OUTPUT_PRICE for n in range(MAX_OUTPUT_TOKENS + 1)]

SHARED = "bench-shared"
PER_USER = "bench-per-user"
HUGE_CAP = Decimal("1e9")  # the throughput run's caps: never hit
OVERSHOOT_USERS = 20
TARGET_PER_S = 10_000
TARGET_PROCESSES = 4

Settle = tuple[Hold, Mapping[str, str], tokenguard.Usage, Decimal]


@dataclass(frozen=True)
class Plan:
    """One run: what every worker process does."""

    mode: str  # "throughput" or "overshoot"
    store: str  # "redis" or "sqlite"
    url: str  # the store URL (with this run's own prefix / file)
    processes: int
    threads: int
    warmup_s: float  # throughput only
    seconds: float  # throughput: the measured window; overshoot: a safety bound on the run
    cap_usd: Decimal
    user_cap_usd: Decimal
    users: tuple[str, ...]
    zipf: bool  # draw users with weight 1/(i+1), else uniformly
    defer_s: float
    stop_after: int  # overshoot: a thread stops after this many refusals by the shared budget
    seed: int


def budgets(plan: Plan) -> list[Budget]:
    return [
        Budget(limit_usd=plan.cap_usd, period="day", name=SHARED),
        Budget(limit_usd=plan.user_cap_usd, period="day", per="user", name=PER_USER),
    ]


# -- the worker side --------------------------------------------------------------------------


class Settler:
    """The guard's background settler, for budgets only: one ``settle_many`` per batch.

    As ``Pipeline._defer``/``_drain_loop``: a put that makes the queue non-empty wakes the
    thread, which sleeps ``defer_s`` for a batch to gather, then drains. ``drain`` is also
    the book's ``before_refusal``. Counts what it settled (exact ``Decimal``), per user too.
    """

    def __init__(self, book: BudgetBook, defer_s: float) -> None:
        self.book = book
        self.defer_s = defer_s
        self.queue: collections.deque[Settle] = collections.deque()
        self.cond = threading.Condition()
        self.lock = threading.Lock()
        self.closing = False
        self.settled = 0
        self.settled_usd = Decimal(0)
        self.by_user: dict[str, Decimal] = {}
        self.batch_sizes: list[int] = []
        self.batch_us: list[int] = []
        self.failed = 0
        self.thread = threading.Thread(target=self._run, name="bench-settle", daemon=True)
        self.thread.start()

    def put(self, item: Settle) -> None:
        with self.cond:
            self.queue.append(item)
            if len(self.queue) == 1:
                self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if self.closing and not self.queue:
                    return
            time.sleep(self.defer_s)  # let a batch gather
            self.drain()

    def drain(self) -> None:
        with self.lock:
            batch: list[Settle] = []
            while True:
                try:
                    batch.append(self.queue.popleft())
                except IndexError:
                    break
            if not batch:
                return
            began = time.perf_counter()
            try:
                self.book.settle_many(batch)
            except Exception:  # counted: the holds stay, and the run's checks fail
                log.exception("settling %d call(s) failed", len(batch))
                self.failed += len(batch)
                return
            self.batch_us.append(int((time.perf_counter() - began) * 1e6))
            self.batch_sizes.append(len(batch))
            self.settled += len(batch)
            for _, scope, _, cost in batch:
                self.settled_usd += cost
                user = scope["user"]
                self.by_user[user] = self.by_user.get(user, Decimal(0)) + cost

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()
        self.drain()


@dataclass
class ThreadCounts:
    admitted: int = 0  # in the measured window
    admitted_all: int = 0
    refused_shared: int = 0
    refused_user: int = 0
    errors: int = 0
    latency_us: list[int] = field(default_factory=list)  # admissions in the measured window


def _hammer(
    plan: Plan,
    book: BudgetBook,
    settler: Settler,
    index: int,
    t0: float,
    window: tuple[float, float],
    counts: ThreadCounts,
) -> None:
    rng = random.Random(plan.seed * 1_000_003 + index)
    users = plan.users
    weights = list(accumulate(1 / (i + 1) for i in range(len(users)))) if plan.zipf else None
    scopes = [{"user": u} for u in users]
    begin, end = window
    overshoot = plan.mode == "overshoot"
    deadline = t0 + plan.seconds if overshoot else end
    while (now := time.monotonic()) < t0:
        time.sleep(min(t0 - now, 0.01))
    while True:
        if weights is None:
            scope = scopes[rng.randrange(len(scopes))]
        else:
            scope = scopes[min(bisect(weights, rng.random() * weights[-1]), len(scopes) - 1)]
        out = rng.randrange(MAX_OUTPUT_TOKENS + 1)
        started = time.monotonic()
        if started >= deadline:
            return
        try:
            hold = book.admit(scope, WORST_USD, WORST_TOKENS)
        except tokenguard.BudgetExceeded as refusal:
            if refusal.budget.name == SHARED:
                counts.refused_shared += 1
                if counts.refused_shared >= plan.stop_after:
                    return
            else:
                counts.refused_user += 1
            continue
        except tokenguard.TokenguardError:
            counts.errors += 1  # e.g. StoreUnavailable (a command timed out)
            log.exception("admission failed")
            continue
        done = time.monotonic()
        counts.admitted_all += 1
        if begin <= done < end:
            counts.admitted += 1
            counts.latency_us.append(int((done - started) * 1e6))
        usage = tokenguard.Usage(input_tokens=INPUT_TOKENS, output_tokens=out)
        settler.put((hold, scope, usage, OUTPUT_COSTS[out]))


def worker(index: int, plan: Plan, ready: Queue[int], go: Event, start_at: Any, results: Queue[dict[str, Any]]) -> None:
    """One process: a store, a book, ``plan.threads`` admitting threads and a settler."""
    logging.basicConfig(level=logging.WARNING, format=f"worker {index}: %(message)s")
    store = open_store(plan.url)
    assert isinstance(store, BudgetStore)
    alerts: list[Alert] = []
    book = BudgetBook(budgets(plan), store=store, on_alert=alerts.append, clock=lambda: datetime.now(UTC), hold_s=900)
    settler = Settler(book, plan.defer_s)
    book.before_refusal = settler.drain
    if plan.mode == "throughput":  # first use of each budget key in this process, before the clock starts
        for user in plan.users:
            scope = {"user": user}
            hold = book.admit(scope, WORST_USD, WORST_TOKENS)
            settler.put((hold, scope, tokenguard.Usage(input_tokens=INPUT_TOKENS), OUTPUT_COSTS[0]))
        settler.drain()
    ready.put(index)
    go.wait()
    t0 = float(start_at.value)
    begin = t0 + (plan.warmup_s if plan.mode == "throughput" else 0.0)
    window = (begin, begin + plan.seconds)
    counts = [ThreadCounts() for _ in range(plan.threads)]
    threads = [
        threading.Thread(
            target=_hammer, args=(plan, book, settler, index * plan.threads + i, t0, window, c), name=f"admit-{i}"
        )
        for i, c in enumerate(counts)
    ]
    for t in threads:
        t.start()
    cpu_s = 0.0
    if plan.mode == "throughput":  # this process's CPU time (all its threads) over the window
        time.sleep(max(window[0] - time.monotonic(), 0))
        cpu0 = time.process_time()
        time.sleep(max(window[1] - time.monotonic(), 0))
        cpu_s = time.process_time() - cpu0
    else:
        cpu0 = time.process_time()
    for t in threads:
        t.join()
    finished = time.monotonic()
    backlog = len(settler.queue)
    if plan.mode == "overshoot":
        cpu_s = time.process_time() - cpu0
    settler.close()
    store.close()
    results.put(
        {
            "index": index,
            "primed": len(plan.users) if plan.mode == "throughput" else 0,
            "admitted": sum(c.admitted for c in counts),
            "admitted_all": sum(c.admitted_all for c in counts),
            "refused_shared": sum(c.refused_shared for c in counts),
            "refused_user": sum(c.refused_user for c in counts),
            "errors": sum(c.errors for c in counts),
            "latency_us": [x for c in counts for x in c.latency_us],
            "elapsed_s": (finished - t0) if plan.mode == "overshoot" else plan.seconds,
            "cpu_s": cpu_s,
            "settled": settler.settled,
            "settle_failed": settler.failed,
            "settled_usd": settler.settled_usd,
            "by_user": settler.by_user,
            "batch_sizes": settler.batch_sizes,
            "batch_us": settler.batch_us,
            "backlog_at_end": backlog,
            "alerts": len(alerts),
        }
    )


# -- the driver side --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A ``redis-server`` of our own on a free loopback port, without persistence; its base URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server), or pass --url")
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def _with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


def _server_client(url: str) -> Any:
    import redis

    from tokenguard.stores.redis_store import split_url

    return redis.Redis.from_url(split_url(url)[0], socket_timeout=10)


def _server_sample(client: Any) -> dict[str, Any]:
    """redis-server's CPU seconds and per-command counters (for deltas over a run)."""
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    return {
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "commands": {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in stats.items()},
    }


def _server_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    commands = {}
    for name, (calls, usec) in after["commands"].items():
        calls0, usec0 = before["commands"].get(name, (0, 0))
        if calls > calls0:
            commands[name] = {"calls": calls - calls0, "usec_per_call": round((usec - usec0) / (calls - calls0), 2)}
    return {"cpu_s": round(after["cpu_s"] - before["cpu_s"], 3), "commands": commands}


def _machine_cpu() -> tuple[int, int] | None:
    """Busy and total CPU time of the whole machine so far, in ticks (Linux ``/proc/stat``)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # less idle and iowait


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(int(q * len(sorted_values)), len(sorted_values) - 1)])


def _check_store(plan: Plan, outcomes: list[dict[str, Any]], starts: set[float]) -> dict[str, Any]:
    """Read every budget key back: overshoot, what is still held, and the workers' sums."""
    store = open_store(plan.url)
    assert isinstance(store, BudgetStore)
    now = time.time()
    keys: list[tuple[str, str, Decimal]] = [(f"{SHARED}|", "", plan.cap_usd)]
    keys += [(f"{PER_USER}|{u}", u, plan.user_cap_usd) for u in plan.users]
    spent_by_key: dict[str, Decimal] = {}
    over: list[str] = []
    held_usd = Decimal(0)
    held_tokens = 0
    try:
        for key, _, limit in keys:
            spent = Decimal(0)
            for start in sorted(starts):  # two days' keys if the run crossed UTC midnight
                totals = store.totals(key, start, now=now)
                if totals.spent_usd > limit:
                    over.append(key)
                spent += totals.spent_usd
                held_usd += totals.held_usd
                held_tokens += totals.held_tokens
            spent_by_key[key] = spent
    finally:
        store.close()
    settled = sum((o["settled_usd"] for o in outcomes), Decimal(0))
    by_user: dict[str, Decimal] = {}
    for o in outcomes:
        for user, usd in o["by_user"].items():
            by_user[user] = by_user.get(user, Decimal(0)) + usd
    mismatched = [key for key, user, _ in keys[1:] if spent_by_key[key] != by_user.get(user, Decimal(0))]
    store_total = spent_by_key[f"{SHARED}|"]
    if store_total != settled:
        mismatched.insert(0, f"{SHARED}|")
    return {
        "overshoot_count": len(over),
        "overshoot_keys": over,
        "shared_spent_usd": store_total,
        "max_user_spent_usd": max((spent_by_key[k] for k, _, _ in keys[1:]), default=Decimal(0)),
        "users_at_cap": sum(1 for k, _, _ in keys[1:] if spent_by_key[k] + WORST_USD > plan.user_cap_usd),
        "held_after_usd": held_usd,
        "held_after_tokens": held_tokens,
        "workers_settled_usd": settled,
        "sums_equal": not mismatched,
        "mismatched_keys": mismatched,
    }


def _day_start() -> float:
    begins = period_start("day", datetime.now(UTC))
    assert begins is not None
    return begins.timestamp()


def run(plan: Plan) -> dict[str, Any]:
    """Run one plan in ``plan.processes`` fresh processes and check the store afterwards."""
    ctx = multiprocessing.get_context("spawn")
    ready: Queue[int] = ctx.Queue()
    results: Queue[dict[str, Any]] = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    starts = {_day_start()}
    server = _server_client(plan.url) if plan.store == "redis" else None
    server0 = server1 = None
    procs = [
        ctx.Process(target=worker, args=(i, plan, ready, go, start_at, results), daemon=True)
        for i in range(plan.processes)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        t0 = time.monotonic() + 0.2
        start_at.value = t0
        go.set()
        # the server's and the machine's CPU over the same window as the workers'
        if plan.mode == "throughput":
            time.sleep(max(t0 + plan.warmup_s - time.monotonic(), 0))
        server0, machine0 = (_server_sample(server) if server is not None else None), _machine_cpu()
        if plan.mode == "throughput":
            time.sleep(max(t0 + plan.warmup_s + plan.seconds - time.monotonic(), 0))
        else:
            results_ready = [results.get(timeout=plan.seconds + 120) for _ in procs]
        server1, machine1 = (_server_sample(server) if server is not None else None), _machine_cpu()
        if plan.mode == "throughput":
            results_ready = [results.get(timeout=120) for _ in procs]
        outcomes = sorted(results_ready, key=lambda o: int(o["index"]))
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    starts.add(_day_start())
    if server is not None:
        server.close()
    latency = sorted(x for o in outcomes for x in o["latency_us"])
    sizes = [s for o in outcomes for s in o["batch_sizes"]]
    batch_us = sorted(x for o in outcomes for x in o["batch_us"])
    admitted = sum(int(o["admitted"]) for o in outcomes)
    elapsed = max(float(o["elapsed_s"]) for o in outcomes)
    cpu_s = sum(float(o["cpu_s"]) for o in outcomes)
    result: dict[str, Any] = {
        "mode": plan.mode,
        "store": plan.store,
        "processes": plan.processes,
        "threads": plan.threads,
        "seconds": round(elapsed, 3),
        "admitted": admitted,
        "calls_per_s": round(admitted / elapsed, 1),
        "per_process_per_s": [round(int(o["admitted"]) / elapsed, 1) for o in outcomes],
        "admit_p50_ms": round(_percentile(latency, 0.50) / 1000, 3),
        "admit_p99_ms": round(_percentile(latency, 0.99) / 1000, 3),
        "refused_shared": sum(int(o["refused_shared"]) for o in outcomes),
        "refused_user": sum(int(o["refused_user"]) for o in outcomes),
        "errors": sum(int(o["errors"]) for o in outcomes),
        "admitted_all": sum(int(o["admitted_all"]) for o in outcomes),
        "primed": sum(int(o["primed"]) for o in outcomes),  # settled too, before the clock started
        "settled": sum(int(o["settled"]) for o in outcomes),
        "settle_failed": sum(int(o["settle_failed"]) for o in outcomes),
        "settle_batches": len(sizes),
        "settle_batch_mean": round(sum(sizes) / len(sizes), 1) if sizes else 0,
        "settle_batch_p50_ms": round(_percentile(batch_us, 0.50) / 1000, 3),
        "settle_batch_p99_ms": round(_percentile(batch_us, 0.99) / 1000, 3),
        "settle_backlog_at_end": sum(int(o["backlog_at_end"]) for o in outcomes),
        "alerts": sum(int(o["alerts"]) for o in outcomes),
        "worker_cpu_us_per_call": round(cpu_s / admitted * 1e6, 1) if admitted else None,
        "worker_cores": round(cpu_s / elapsed, 2),
        "cap_usd": plan.cap_usd,
        "user_cap_usd": plan.user_cap_usd,
    }
    if server0 is not None and server1 is not None:
        server_stats = _server_delta(server0, server1)
        result["server_cpu_us_per_call"] = round(server_stats["cpu_s"] / admitted * 1e6, 1) if admitted else None
        result["server_cores"] = round(server_stats["cpu_s"] / elapsed, 2)
        result["server"] = server_stats
    if machine0 is not None and machine1 is not None:  # all processes, ours or not
        busy, total = machine1[0] - machine0[0], machine1[1] - machine0[1]
        result["machine_busy_cores"] = round(busy / total * (os.cpu_count() or 1), 2) if total else None
        result["machine_cores"] = os.cpu_count()
    result.update(_check_store(plan, outcomes, starts))
    result["ok"] = (
        result["overshoot_count"] == 0
        and result["held_after_usd"] == 0
        and result["held_after_tokens"] == 0
        and result["sums_equal"]
        and result["settle_failed"] == 0
        and result["errors"] == 0
    )
    return result


def _usd(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _print_row(r: dict[str, Any]) -> None:
    rates = "/".join(f"{x:.0f}" for x in r["per_process_per_s"])
    cores = f"{r['worker_cores']:.2f}/{r.get('server_cores', 0):.2f}/{r.get('machine_busy_cores') or 0:.2f}"
    print(
        f"{r['mode']:>10} {r['store']:>6} {r['processes']:>2}x{r['threads']:<2} {r['calls_per_s']:>8.0f} "
        f"{rates:>23} {r['admit_p50_ms']:>6.2f} {r['admit_p99_ms']:>7.2f} {r['settle_batch_mean']:>5.1f} "
        f"{r['worker_cpu_us_per_call'] or 0:>6.0f} {r.get('server_cpu_us_per_call') or 0:>6.0f} {cores:>14} "
        f"{r['overshoot_count']:>4} {_usd(r['held_after_usd']):>4} {'yes' if r['sums_equal'] else 'NO':>4} "
        f"{_usd(r['shared_spent_usd']):>12} {r['refused_shared'] + r['refused_user']:>7}"
    )


HEADER = (
    f"{'mode':>10} {'store':>6} {'proc':>5} {'calls/s':>8} {'per process /s':>23} {'p50 ms':>6} {'p99 ms':>7} "
    f"{'batch':>5} {'cli us':>6} {'srv us':>6} {'cores w/s/all':>14} {'over':>4} {'held':>4} {'sum=':>4} "
    f"{'shared spent':>12} {'refused':>7}"
)
LEGEND = (
    "calls/s: admitted (reserve + settle) per second, all processes; p50/p99: admit() latency; batch: calls per\n"
    "settle_many; cli/srv us: CPU per admitted call in the workers / in redis-server; cores: CPU cores busy in the\n"
    "workers / redis-server / the whole machine; over: budget keys settled past their cap; held: USD still held\n"
    "after the run; sum=: the store's settled spend == the workers' sums (exact, shared key and every user)"
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[TARGET_PROCESSES], help="e.g. --processes 1 4")
    parser.add_argument("--threads", type=int, default=8, help="admitting threads per process")
    parser.add_argument("--modes", nargs="+", choices=("throughput", "overshoot"), default=["throughput", "overshoot"])
    parser.add_argument("--seconds", type=float, default=5.0, help="the measured window (throughput)")
    parser.add_argument("--warmup", type=float, default=1.0, help="admitting before the window (throughput)")
    parser.add_argument("--users", type=int, default=1000, help="user pool of the throughput run (uniform)")
    parser.add_argument("--cap", type=Decimal, default=Decimal(5), help="shared cap of the overshoot run, USD")
    parser.add_argument("--user-cap", type=Decimal, default=Decimal("0.5"), help="per-user cap of the overshoot run")
    parser.add_argument("--stop-after", type=int, default=20, help="overshoot: shared-budget refusals per thread")
    parser.add_argument("--defer-s", type=float, default=0.02, help="settle batching delay (Guard settle_delay_s)")
    parser.add_argument("--store", choices=("redis", "sqlite"), default="redis")
    parser.add_argument("--url", help="an existing Redis (redis://host:port/db); default: start redis-server")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a short run for CI: correctness only, no timing")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.cap, args.user_cap = 0.5, 0.2, Decimal("0.5"), Decimal("0.05")
        args.stop_after = min(args.stop_after, 5)
    logging.basicConfig(level=logging.WARNING)

    with contextlib.ExitStack() as stack:
        base = ""
        if args.store == "redis":
            base = args.url or stack.enter_context(redis_server())
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-redis-")))
        results: list[dict[str, Any]] = []
        print(f"worst case ${WORST_USD} ({WORST_TOKENS} tokens) per call; actual $0.0003..$0.0009")
        print(LEGEND)
        print(HEADER)
        for mode in args.modes:
            for processes in args.processes:
                run_id = uuid.uuid4().hex[:10]
                if args.store == "redis":
                    url = _with_prefix(base, f"bench{run_id}")
                else:
                    url = f"sqlite:///{folder / f'{run_id}.db'}"
                throughput = mode == "throughput"
                plan = Plan(
                    mode=mode,
                    store=args.store,
                    url=url,
                    processes=processes,
                    threads=args.threads,
                    warmup_s=args.warmup if throughput else 0.0,
                    seconds=args.seconds if throughput else max(60.0, args.seconds),
                    cap_usd=HUGE_CAP if throughput else args.cap,
                    user_cap_usd=HUGE_CAP if throughput else args.user_cap,
                    users=tuple(f"u{i:05d}" for i in range(args.users if throughput else OVERSHOOT_USERS)),
                    zipf=not throughput,
                    defer_s=args.defer_s,
                    stop_after=args.stop_after,
                    seed=args.seed,
                )
                result = run(plan)
                results.append(result)
                _print_row(result)
                if args.url and args.store == "redis":
                    client = _server_client(base)
                    for key in client.scan_iter(match=f"bench{run_id}:*", count=1000):
                        client.unlink(key)
                    client.close()

    ok = all(r["ok"] for r in results)
    for r in results:
        if not r["ok"]:
            print(f"FAILED {r['mode']} x{r['processes']}: " + json.dumps(_jsonable(r))[:2000], file=sys.stderr)
    target = [r for r in results if r["mode"] == "throughput" and r["processes"] == TARGET_PROCESSES]
    if target and not args.quick:
        best = max(r["calls_per_s"] for r in target)
        verdict = "met" if best >= TARGET_PER_S else "NOT met"
        print(f"target >= {TARGET_PER_S:,}/s admitted from {TARGET_PROCESSES} processes: {verdict} ({best:,.0f}/s)")
    print("checks (zero overshoot, nothing held, store == workers' sums):", "ok" if ok else "FAILED")
    save(args.json, f"ledger-{args.store}", _jsonable(results), quick=args.quick, store=args.store)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
