"""Scaling: what guarding costs as the ledger and the prompt grow — flat where it should be
flat, linear where it must be, no hidden O(n).

1. Ledger size. For N = 10^3, 10^4, 10^5, 10^6 a fresh SQLite ledger of N realistic rows,
   inserted straight into the store's own ``calls`` table (``_INSERT`` of
   ``tokenguard.stores.sqlite``) in one transaction, oldest first as a ledger is written,
   over 120 days, 1,000 users in 20 projects, four models and every outcome; the
   ``budget_spend`` counters those rows would have left (per user and day, shared per month)
   are added from them. At each N a fresh guard with every protection on (that ledger, a
   disk cache, a per-user day cap and a shared month cap, the loop detector, retry) makes
   cache-MISS calls (each prompt unique,
   ``temperature=0``), interleaved with the bare SDK call, over an in-process
   ``httpx2.MockTransport``; then the read paths are timed: ``spent(period="month")``,
   ``spent(period="day", user=...)``, ``stats()``, ``budget_status(user=...)``,
   ``budget_overview()`` and ``tokenguard report``'s builder (``build_report(by=("user",))``).
   The per-call overhead must be flat in N. ``spent()`` may grow with the rows of its period,
   ``stats()`` and the report (all time) with N: their growth is measured, not asserted.
2. Prompt size. Prompts of 1 ... 100k tokens (counted as tokenguard counts them offline, see
   ``tokenguard._tokens``) over a transport that echoes the request's size as its usage: the
   guarded cache miss (cache, budgets and loops on) against the bare call, and a cache hit
   (the clients' hot path: a repeat of an answered call) against the bare call. The added
   µs must grow at most linearly (the key hash, the loop fingerprints and the worst-case
   bound each read the prompt once) with a small constant per 1k tokens.

Each series gets a log-log least-squares slope and a verdict: "flat" (slope < 0.1),
"linear" (0.8-1.2), else "CHECK". Ledger series are fitted against N and against what each
one reads (the rows of its period, all rows, or the budget counters); the verdict is on the
latter. Prompt series: a µs value is a fixed cost plus a size-dependent part, so the verdict
is on the slope of that part (the value less its value at 1 token) over the sizes >= 1k
tokens (the raw slopes are printed too), and the local slopes between neighbouring sizes
show anything super-linear. Exit status 1 only on a correctness failure (a call raising, a
miss that hit, a hit that missed, a ledger that lost rows), never on a timing.

``--profile`` adds pyinstrument call trees of the guarded call at the largest N and the
largest prompt (where the time goes when a series is not what it should be).

tiktoken is pointed at an empty directory, so no encoding can be downloaded and token
counts are tokenguard's offline estimate (~4 ASCII characters a token) on every machine.

Run: ``python bench/bench_scaling.py`` (``--quick``: N <= 10^4, prompts <= 1k tokens, few
calls; ``--json PATH``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# before tokenguard (and tiktoken) are imported: no encoding file, so nothing to download
_TIKTOKEN_DIR = tempfile.mkdtemp(prefix="bench-scaling-tiktoken-")
os.environ["TIKTOKEN_CACHE_DIR"] = _TIKTOKEN_DIR
atexit.register(shutil.rmtree, _TIKTOKEN_DIR, True)

import argparse  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from decimal import Decimal  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx2  # noqa: E402
import openai  # noqa: E402

import tokenguard  # noqa: E402
from tokenguard._report import build_report  # noqa: E402
from tokenguard._tokens import estimate_tokens, tiktoken_encoding  # noqa: E402
from tokenguard.stores.sqlite import _INSERT, SQLiteStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, save, time_pairs  # noqa: E402

# -- the fake API: a chat completion whose usage echoes the request's size -----------------------

_REPLY = (
    '{"id":"chatcmpl-s","object":"chat.completion","created":0,"model":"gpt-4o-2024-08-06",'
    '"choices":[{"index":0,"finish_reason":"stop","logprobs":null,"message":{"role":"assistant",'
    '"content":"Revenue rose on strong cloud demand.","refusal":null}}],'
    '"usage":{"prompt_tokens":%d,"completion_tokens":12,"total_tokens":%d}}'
)
_HEADERS = {"content-type": "application/json"}


def _handler(request: httpx2.Request) -> httpx2.Response:
    prompt = max(len(request.content) // 4, 1)  # ~4 bytes a token, as the offline count has it
    return httpx2.Response(200, content=(_REPLY % (prompt, prompt + 12)).encode(), headers=_HEADERS)


def _client(guard: tokenguard.Guard | None) -> Any:
    http = httpx2.Client(transport=httpx2.MockTransport(_handler))
    if guard is None:
        return openai.OpenAI(api_key="sk-bench", base_url="http://bench.test/v1", http_client=http, max_retries=0)
    return tokenguard.OpenAI(api_key="sk-bench", base_url="http://bench.test/v1", http_client=http, guard=guard)


# -- prompts of a known token count; every call's unique (a cache miss, never a loop) ------------

# letters g-z only: no digit and no hex, so the loop detector's normalized level sees each nonce
# as different text (not "a counter that moved"), and every prompt is a new request
_NONCE_LETTERS = "ghijklmnopqrstuvwxyz"
_NONCES = len(_NONCE_LETTERS) ** 4
_FILLER_WORDS = (
    "the quarterly report shows revenue growing on strong cloud demand while costs held steady "
    "and the board asked for a short summary of risks plans and hiring across every region "
)


def _nonce(i: int) -> str:
    if not 0 <= i < _NONCES:
        raise ValueError(f"nonce {i} out of range")
    out = []
    for _ in range(4):
        i, d = divmod(i, len(_NONCE_LETTERS))
        out.append(_NONCE_LETTERS[d])
    return "".join(out)


def _filler(chars: int) -> str:
    repeats = chars // len(_FILLER_WORDS) + 1
    return (_FILLER_WORDS * repeats)[:chars]


class Prompts:
    """Prompt texts of ``tokens`` tokens (tokenguard's offline count), each with its own nonce."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        # the nonce (4 characters, 1 token) then filler: 4 * tokens ASCII characters in all
        self.tail = "" if tokens == 1 else " " + _filler(4 * tokens - 5)

    def text(self, i: int) -> str:
        return _nonce(i) + self.tail

    def check(self) -> bool:
        return estimate_tokens(self.text(0)) == self.tokens


_counter = 0


def _next_id() -> int:
    """A run-wide unique prompt number (nonces never repeat within the run)."""
    global _counter
    _counter += 1
    return _counter


def _body(text: str) -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,  # cacheable: every guarded call looks the cache up, and stores its answer
        "max_tokens": 64,
    }


# -- the ledger: realistic rows, inserted fast ----------------------------------------------------

DAYS = 120
USERS = [f"u{i:04d}" for i in range(1000)]
_SCOPES = [f'{{"project":"p{i % 20:02d}","user":"{u}"}}' for i, u in enumerate(USERS)]
_MODELS = (  # vendor, endpoint, model, USD per 1M input, per 1M output
    ("openai", "chat.completions", "gpt-4o", Decimal("2.5"), Decimal(10)),
    ("openai", "chat.completions", "gpt-4o-mini", Decimal("0.15"), Decimal("0.6")),
    ("anthropic", "messages", "claude-haiku-4-5", Decimal(1), Decimal(5)),
    ("anthropic", "messages", "claude-sonnet-4-5", Decimal(3), Decimal(15)),
)
USER_DAY = "scale-user-day"
SHARED_MONTH = "scale-shared-month"


def _templates(rng: random.Random) -> list[tuple[Any, ...]]:
    """Row shapes (everything but the time, the scope and the request id), each with its cost
    in nano-USD and its tokens as a budget counts them: 85% ok, 8% cache hits, 4% errors, 3%
    blocked."""
    out: list[tuple[Any, ...]] = []
    for vendor, endpoint, model, pin, pout in _MODELS:
        for k in range(25):
            tin, tout = rng.randint(50, 8000), rng.randint(5, 1200)
            cached = rng.choice((0, 0, 0, tin // 2))
            cost = (Decimal(tin - cached) * pin + Decimal(cached) * pin / 10 + Decimal(tout) * pout) / 1_000_000
            latency = round(rng.uniform(0.3, 9.0), 3)
            stream = int(rng.random() < 0.3)
            usage = (tin, tout, cached, 0, 0, 0)
            charged = (int(cost * 10**9), tin + tout)
            if k < 21:  # ok
                shape = (*usage, format(cost, "f"), None, 0, "ok", None, 1 + (k == 20), latency, stream)
            elif k < 23:  # a cache hit: free, saved the original cost
                shape = (0, 0, 0, 0, 0, 0, "0", format(cost, "f"), 0, "cache_hit", None, 0, 0.0004, stream)
                charged = (0, 0)
            elif k < 24:  # an error after retries
                shape = (0, 0, 0, 0, 0, 0, "0", None, 0, "error", "RateLimitError", 4, latency, stream)
                charged = (0, 0)
            else:  # blocked by a budget or the loop detector
                why = "budget" if rng.random() < 0.5 else "loop"
                shape = (0, 0, 0, 0, 0, 0, None, None, 0, "blocked", why, 0, 0.0001, stream)
                charged = (0, 0)
            out.append(((vendor, endpoint, model, *shape), charged))
    return out


def _row_values(
    start: int, count: int, now: float, rng: random.Random, spend: dict[tuple[int, int], list[int]], hits: list[int]
) -> Iterator[tuple[Any, ...]]:
    """``count`` rows over the last ``DAYS`` days, oldest first (as a ledger is written); what
    each (user, UTC day) was charged is added up in ``spend``, the cache hits in ``hits[0]``."""
    templates = _templates(random.Random(11))
    span = DAYS * 86_400.0
    rnd, pick = rng.random, rng.randrange
    nt, ns = len(templates), len(_SCOPES)
    for j in range(count):
        (vendor, endpoint, model, *rest), (nusd, tokens) = templates[pick(nt)]
        ts = now - span + span * (j + rnd()) / count
        who = pick(ns)
        if nusd:
            total = spend.get((who, int(ts // 86_400)))
            if total is None:
                spend[(who, int(ts // 86_400))] = [nusd, tokens]
            else:
                total[0] += nusd
                total[1] += tokens
        elif rest[9] == "cache_hit":
            hits[0] += 1
        request_id = f"req_{start + j:09d}" if rest[9] == "ok" else None
        yield (ts, vendor, endpoint, model, _SCOPES[who], *rest, request_id)


_ADD_SPEND = (
    "INSERT INTO budget_spend VALUES (?, ?, ?, 0, ?, 0) ON CONFLICT (key, period_start) DO UPDATE "
    "SET spent_nusd = spent_nusd + excluded.spent_nusd, spent_tokens = spent_tokens + excluded.spent_tokens"
)


def grow_ledger(path: Path, start: int, count: int, seed: int) -> tuple[float, int]:
    """Insert ``count`` rows in one transaction, and the budget counters they imply (per user
    and day, shared per month); the seconds it took, and how many of the rows are cache hits."""
    from datetime import UTC, datetime

    began = time.perf_counter()
    spend: dict[tuple[int, int], list[int]] = {}
    hits = [0]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA cache_size=-262144")  # 256 MB: the ts index's pages stay in memory
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, _row_values(start, count, time.time(), random.Random(seed), spend, hits))
        months: dict[float, list[int]] = {}
        per_user = []
        for (who, day), (nusd, tokens) in spend.items():
            per_user.append((f"{USER_DAY}|{USERS[who]}", day * 86_400.0, nusd, tokens))
            first = datetime.fromtimestamp(day * 86_400, UTC).replace(day=1).timestamp()
            total = months.setdefault(first, [0, 0])
            total[0] += nusd
            total[1] += tokens
        conn.executemany(_ADD_SPEND, per_user)
        conn.executemany(_ADD_SPEND, [(f"{SHARED_MONTH}|", m, v[0], v[1]) for m, v in months.items()])
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - began, hits[0]


# -- measuring ------------------------------------------------------------------------------------


class Failed(Exception):
    """A correctness failure: the run exits 1."""


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def interleaved(
    bare: Callable[[], Any],
    guarded: Callable[[], Any],
    *,
    calls: int,
    warm: int,
    flush: Callable[[], None],
    max_s: float | None = None,
) -> dict[str, float]:
    """Bare and guarded calls in pairs, the order flipped every pair; p50/p99 of each (µs).

    ``max_s`` ends the measured loop early (after at least 20 pairs) for slow calls, and the
    warm-up after a third of it."""
    began = time.perf_counter()
    for i in range(warm):
        bare()
        guarded()
        if max_s is not None and i >= 5 and time.perf_counter() - began > max_s / 3:
            break
    warmed = i + 1 if warm else 0
    flush()
    t_bare, t_guarded = time_pairs(bare, guarded, calls, max_s=max_s)
    clock = time.perf_counter
    start = clock()
    flush()  # settling still queued: off the caller's path, reported apart
    leftover = clock() - start
    b50, g50 = statistics.median(t_bare), statistics.median(t_guarded)
    b99, g99 = _pct(t_bare, 0.99), _pct(t_guarded, 0.99)
    return {
        "warm": warmed,
        "pairs": len(t_bare),
        "bare_p50_us": b50 * 1e6,
        "guarded_p50_us": g50 * 1e6,
        "added_p50_us": (g50 - b50) * 1e6,
        "ratio_p50": g50 / b50,
        "bare_p99_us": b99 * 1e6,
        "guarded_p99_us": g99 * 1e6,
        "added_p99_us": (g99 - b99) * 1e6,
        "ratio_p99": g99 / b99,
        "flush_after_ms": leftover * 1e3,
    }


def timed(fn: Callable[[], Any], *, budget_s: float, max_reps: int) -> dict[str, Any]:
    """Median wall time of ``fn`` (ms), repeated until ``budget_s`` is spent (at least once)."""
    times: list[float] = []
    value: Any = None
    spent = 0.0
    while len(times) < max_reps and (not times or spent < budget_s):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return {"ms": statistics.median(times) * 1e3, "reps": len(times), "value": value}


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) on log(x); ``None`` with a non-positive y or < 2 points."""
    if len(xs) < 2 or any(y <= 0 for y in ys):
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den


def verdict(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 0.1:
        return "flat"
    if 0.8 <= s <= 1.2:
        return "linear"
    return "CHECK"


def _guard(db: Path, cache_dir: Path) -> tokenguard.Guard:
    return tokenguard.Guard(
        store=f"sqlite:///{db}",
        cache=tokenguard.Cache(path=cache_dir),
        budgets=[
            tokenguard.Budget(limit_usd=10**9, period="day", per="user", name=USER_DAY),
            tokenguard.Budget(limit_usd=10**12, period="month", name=SHARED_MONTH),
        ],
        loops=tokenguard.LoopDetector(max_repeats=3, window_s=600),
        on_alert=lambda alert: None,
    )


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- 1. ledger size -------------------------------------------------------------------------------


def ledger_series(
    tmp: Path, sizes: Sequence[int], *, calls: int, warm: int, max_s: float, read_budget_s: float, profile: bool
) -> list[dict[str, Any]]:
    return [
        ledger_point(
            tmp,
            n,
            calls=calls,
            warm=warm,
            max_s=max_s,
            read_budget_s=read_budget_s,
            profile=profile and n == sizes[-1],
        )
        for n in sizes
    ]


def ledger_point(
    tmp: Path, n: int, *, calls: int, warm: int, max_s: float, read_budget_s: float, profile: bool
) -> dict[str, Any]:
    """One ledger size: fill, guarded vs bare calls, the read paths."""
    prompts = Prompts(40)
    # a fresh ledger per N, its rows in time order as a real one is written
    db = tmp / f"scaling-ledger-{n}.db"
    SQLiteStore(db).close()  # the store's own schema
    fill_s, prefilled_hits = grow_ledger(db, 0, n, seed=n)
    cache_dir = tmp / f"cache-ledger-{n}"
    guard = _guard(db, cache_dir)
    bare, guarded = _client(None), _client(guard)
    state = {"i": 0}

    def call(client: Any, state: dict[str, int] = state) -> Any:
        state["i"] += 1
        with tokenguard.scope(user=USERS[state["i"] % len(USERS)]):
            return client.chat.completions.create(**_body(prompts.text(_next_id())))

    result = interleaved(
        lambda: call(bare), lambda: call(guarded), calls=calls, warm=warm, flush=guard.flush, max_s=max_s
    )
    rows_in = n + result["warm"] + result["pairs"]
    if profile:
        _profile(f"guarded cache-miss calls, N={n:,}", lambda: call(guarded), 100, guard.flush)
        rows_in += 100
    user = USERS[7]
    reads: dict[str, dict[str, Any]] = {
        "spent_month": timed(lambda: guard.spent(period="month"), budget_s=read_budget_s, max_reps=50),
        "spent_day_user": timed(lambda: guard.spent(period="day", user=user), budget_s=read_budget_s, max_reps=50),
        "stats": timed(guard.stats, budget_s=read_budget_s, max_reps=50),
        "budget_status_user": timed(lambda: guard.budget_status(user=user), budget_s=read_budget_s, max_reps=50),
        "budget_overview": timed(guard.budget_overview, budget_s=read_budget_s, max_reps=20),
    }
    rss_before = _maxrss_mb()
    reads["report_by_user"] = timed(
        lambda: build_report(guard.store, by=("user",)), budget_s=read_budget_s, max_reps=10
    )
    rss_after = _maxrss_mb()
    stats = reads["stats"]["value"]
    report = reads["report_by_user"]["value"]
    with sqlite3.connect(db) as conn:
        month_rows = conn.execute("SELECT count(*) FROM calls WHERE ts >= ?", (_period_ts("month"),)).fetchone()[0]
        day_rows = conn.execute("SELECT count(*) FROM calls WHERE ts >= ?", (_period_ts("day"),)).fetchone()[0]
        budget_rows = conn.execute("SELECT count(*) FROM budget_spend").fetchone()[0]
        keys_today = conn.execute(
            "SELECT count(*) FROM budget_spend WHERE period_start = ?", (_period_ts("day"),)
        ).fetchone()[0]
    guard.close()
    db_mb = db.stat().st_size / 2**20
    shutil.rmtree(cache_dir, ignore_errors=True)
    for leftover in tmp.glob(f"{db.name}*"):
        leftover.unlink()
    problems = []
    if stats.calls != rows_in:
        problems.append(f"the ledger holds {stats.calls} rows, expected {rows_in}")
    if stats.cache_hits != prefilled_hits:
        problems.append(f"{stats.cache_hits - prefilled_hits} of the cache-miss calls hit")
    if report.total.calls != rows_in:
        problems.append(f"the report counts {report.total.calls} calls, expected {rows_in}")
    if problems:
        raise Failed(f"N={n}: " + "; ".join(problems))
    point = {
        "n": n,
        "rows": rows_in,
        "month_rows": month_rows,
        "day_rows": day_rows,
        "budget_spend_rows": budget_rows,
        "budget_keys_today": keys_today,
        "fill_s": fill_s,
        "db_mb": db_mb,
        "call": result,
        "reads_ms": {name: r["ms"] for name, r in reads.items()},
        "reads_reps": {name: r["reps"] for name, r in reads.items()},
        "report_groups": len(report.groups),
        "report_peak_rss_growth_mb": rss_after - rss_before,
    }
    print(
        f"  N={n:>9,}: filled in {fill_s:5.2f} s, guarded p50 {result['guarded_p50_us']:.0f} µs "
        f"(+{result['added_p50_us']:.0f}), report {reads['report_by_user']['ms']:.0f} ms",
        file=sys.stderr,
    )
    return point


def _profile(title: str, fn: Callable[[], Any], calls: int, flush: Callable[[], None]) -> None:
    """``--profile``: pyinstrument's call tree of ``calls`` runs of ``fn`` (if installed)."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("--profile: pyinstrument is not installed", file=sys.stderr)
        return
    profiler = Profiler(interval=0.0005)
    profiler.start()
    for _ in range(calls):
        fn()
    profiler.stop()
    flush()
    print(f"\n--- profile: {title} ({calls} calls) ---")
    print(profiler.output_text(unicode=False, color=False))


def _period_ts(period: str) -> float:
    from datetime import UTC, datetime

    from tokenguard._periods import period_start

    start = period_start(period, datetime.now(UTC))
    assert start is not None
    return start.timestamp()


# -- 2. prompt size -------------------------------------------------------------------------------


def prompt_series(
    tmp: Path, sizes: Sequence[int], *, calls: int, warm: int, max_s: float, profile: bool
) -> list[dict[str, Any]]:
    db = tmp / "scaling-prompts.db"
    cache_dir = tmp / "cache-prompts"
    guard = _guard(db, cache_dir)
    bare, guarded = _client(None), _client(guard)
    out: list[dict[str, Any]] = []
    hit_user = [0]
    for tokens in sizes:
        prompts = Prompts(tokens)
        if not prompts.check():
            raise Failed(f"a {tokens}-token prompt counts {estimate_tokens(prompts.text(0))} tokens")
        # fewer calls for big prompts: each costs milliseconds
        n_calls = max(30, min(calls, int(calls * 1000 / max(tokens, 1000))))
        n_warm = max(5, min(warm, int(warm * 1000 / max(tokens, 1000))))
        scope_i = [0]

        def miss(client: Any, prompts: Prompts = prompts, scope_i: list[int] = scope_i) -> Any:
            scope_i[0] += 1
            with tokenguard.scope(user=USERS[scope_i[0] % len(USERS)]):
                return client.chat.completions.create(**_body(prompts.text(_next_id())))

        stats0 = guard.stats()
        missed = interleaved(
            lambda: miss(bare), lambda: miss(guarded), calls=n_calls, warm=n_warm, flush=guard.flush, max_s=max_s
        )
        stats1 = guard.stats()
        if stats1.cache_hits != stats0.cache_hits:
            raise Failed(f"{tokens} tokens: {stats1.cache_hits - stats0.cache_hits} cache-miss calls hit")

        # a cache hit: one prompt answered once, then repeated; each repeat by another user, so
        # the loop detector (which counts hits) sees no loop
        fixed = _body(prompts.text(_next_id()))
        guarded.chat.completions.create(**fixed)  # the miss that stores the answer

        def hit(client: Any, fixed: dict[str, Any] = fixed) -> Any:
            hit_user[0] += 1
            with tokenguard.scope(user=f"hit-{_nonce(hit_user[0] % _NONCES)}"):
                return client.chat.completions.create(**fixed)

        hit_calls = max(50, min(calls, int(calls * 1000 / max(tokens, 1000))))
        hits = interleaved(
            lambda: hit(bare), lambda: hit(guarded), calls=hit_calls, warm=n_warm, flush=guard.flush, max_s=max_s / 2
        )
        stats2 = guard.stats()
        expected = hits["warm"] + hits["pairs"]
        if stats2.cache_hits - stats1.cache_hits != expected:
            raise Failed(f"{tokens} tokens: {stats2.cache_hits - stats1.cache_hits} hits, expected {expected}")
        out.append({"tokens": tokens, "prompt_chars": len(prompts.text(0)), "miss": missed, "hit": hits})
        if profile and tokens == sizes[-1]:
            _profile(f"guarded cache-miss calls, {tokens:,}-token prompts", lambda: miss(guarded), 20, guard.flush)
        print(
            f"  {tokens:>7,} tokens: miss +{missed['added_p50_us']:.0f} µs (x{missed['ratio_p50']:.2f}), "
            f"hit x{hits['ratio_p50']:.2f}",
            file=sys.stderr,
        )
    guard.close()
    return out


# -- the report -----------------------------------------------------------------------------------


def _fmt_slope(s: float | None) -> str:
    return "   n/a" if s is None else f"{s:6.2f}"


def print_ledger(rows: list[dict[str, Any]]) -> dict[str, Any]:
    print("\n1. Ledger size: a guarded cache-miss call (SQLite ledger, disk cache, 2 budgets, loops, retry)")
    print("   against the bare SDK call, interleaved; then the read paths (median ms)")
    print(
        f"{'N rows':>10} {'fill s':>7} {'DB MB':>7} {'pairs':>6} {'bare p50':>9} {'guard p50':>10} {'+µs p50':>8} "
        f"{'ratio':>6} {'bare p99':>9} {'guard p99':>10} {'+µs p99':>8} {'ratio':>6}"
    )
    for r in rows:
        c = r["call"]
        print(
            f"{r['n']:>10,} {r['fill_s']:7.2f} {r['db_mb']:7.1f} {c['pairs']:>6} {c['bare_p50_us']:9.1f} "
            f"{c['guarded_p50_us']:10.1f} {c['added_p50_us']:8.1f} {c['ratio_p50']:6.2f} {c['bare_p99_us']:9.1f} "
            f"{c['guarded_p99_us']:10.1f} {c['added_p99_us']:8.1f} {c['ratio_p99']:6.2f}"
        )
    names = list(rows[0]["reads_ms"])
    print(
        f"\n{'N rows':>10} {'month rows':>10} {'day rows':>9} {'budget rows':>11} {'keys today':>10} "
        + " ".join(f"{n:>18}" for n in names)
    )
    for r in rows:
        print(
            f"{r['n']:>10,} {r['month_rows']:>10,} {r['day_rows']:>9,} {r['budget_spend_rows']:>11,} "
            f"{r['budget_keys_today']:>10,} " + " ".join(f"{r['reads_ms'][n]:18.3f}" for n in names)
        )
    print(
        f"{'':>10} {'':>10} {'':>9} {'':>11} {'':>10} "
        + " ".join(f"{'(' + str(r) + ' reps)':>18}" for r in rows[-1]["reads_reps"].values())
        + "  <- reps at the largest N"
    )
    print(
        "   report: peak RSS growth "
        + ", ".join(f"N={r['n']:,}: {r['report_peak_rss_growth_mb']:.0f} MB" for r in rows)
    )
    print("   budget rows: budget_spend counters (per user and day, shared per month) the prefilled rows imply")
    xs = [r["n"] for r in rows]
    # each series against N, and against what it has to read (its verdict is on that one)
    per = {
        "calls": [r["rows"] for r in rows],
        "month rows": [r["month_rows"] for r in rows],
        "day rows": [r["day_rows"] for r in rows],
        "budget rows": [r["budget_spend_rows"] for r in rows],
    }
    series: dict[str, tuple[list[float], str, str]] = {
        "guarded call p50": ([r["call"]["guarded_p50_us"] for r in rows], "calls", "flat"),
        "added µs p50": ([r["call"]["added_p50_us"] for r in rows], "calls", "flat"),
        "guarded call p99": ([r["call"]["guarded_p99_us"] for r in rows], "calls", "flat"),
        "ratio p50": ([r["call"]["ratio_p50"] for r in rows], "calls", "flat"),
        "added µs p50 ": ([r["call"]["added_p50_us"] for r in rows], "budget rows", "flat (a call reads its own keys)"),
        "spent_month": ([r["reads_ms"]["spent_month"] for r in rows], "month rows", "linear in the month's rows"),
        "spent_day_user": (
            [r["reads_ms"]["spent_day_user"] for r in rows],
            "day rows",
            "linear in the day's rows (of every user)",
        ),
        "stats": ([r["reads_ms"]["stats"] for r in rows], "calls", "linear in all rows (all time)"),
        "budget_status_user": ([r["reads_ms"]["budget_status_user"] for r in rows], "calls", "flat"),
        "budget_overview": (
            [r["reads_ms"]["budget_overview"] for r in rows],
            "budget rows",
            "keys this period, + a scan of budget rows",
        ),
        "report_by_user": ([r["reads_ms"]["report_by_user"] for r in rows], "calls", "linear in all rows"),
    }
    print(
        f"\n{'series':20} {'slope vs N':>10} {'verdict':>8}  {'slope vs':>10} {'what it reads':13} "
        f"{'verdict':>8}   expected"
    )
    slopes = {}
    for name, (ys, against, want) in series.items():
        s_n = slope(xs, ys)
        s_x = slope(per[against], ys)
        slopes[name] = {
            "slope_vs_n": s_n,
            "verdict_vs_n": verdict(s_n),
            "against": against,
            "slope": s_x,
            "verdict": verdict(s_x),
            "expected": want,
        }
        print(
            f"{name:20} {_fmt_slope(s_n):>10} {verdict(s_n):>8}  {_fmt_slope(s_x):>10} {against:13} "
            f"{verdict(s_x):>8}   {want}"
        )
    return slopes


def print_prompts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    print("\n2. Prompt size: guarded cache MISS (cache, budgets, loops on) and cache HIT, against bare")
    print(
        f"{'tokens':>8} {'pairs':>6} {'bare p50':>9} {'miss p50':>9} {'+µs p50':>9} {'ratio':>6} "
        f"{'bare p99':>9} {'miss p99':>9} {'+µs p99':>9} {'ratio':>6} | {'bare p50':>9} {'hit p50':>9} "
        f"{'hit/bare':>8} {'hit p99':>9} {'p99 ratio':>9}"
    )
    for r in rows:
        m, h = r["miss"], r["hit"]
        print(
            f"{r['tokens']:>8,} {m['pairs']:>6} {m['bare_p50_us']:9.1f} {m['guarded_p50_us']:9.1f} "
            f"{m['added_p50_us']:9.1f} {m['ratio_p50']:6.2f} {m['bare_p99_us']:9.1f} {m['guarded_p99_us']:9.1f} "
            f"{m['added_p99_us']:9.1f} {m['ratio_p99']:6.2f} | {h['bare_p50_us']:9.1f} {h['guarded_p50_us']:9.1f} "
            f"{h['ratio_p50']:8.3f} {h['guarded_p99_us']:9.1f} {h['ratio_p99']:9.3f}"
        )
    xs = [r["tokens"] for r in rows]
    big = [i for i, x in enumerate(xs) if x >= 1000]  # where the size part is well above the noise
    tail = big if len(big) >= 2 else list(range(max(0, len(xs) - 2), len(xs)))
    # µs series: the slope of the raw value, and of its size-dependent part (the value less its
    # value at the smallest prompt), which is what must be at most linear; the verdict is on that
    # part over the sizes >= 1k tokens, where it is well above the noise
    series = {
        "bare p50": [r["miss"]["bare_p50_us"] for r in rows],
        "miss added µs p50": [r["miss"]["added_p50_us"] for r in rows],
        "miss guarded p50": [r["miss"]["guarded_p50_us"] for r in rows],
        "hit p50": [r["hit"]["guarded_p50_us"] for r in rows],
    }
    lo = f"{xs[tail[0]]:,}"
    print(
        f"\n{'series (against tokens)':24} {'slope, all':>10} {'slope ≥' + lo:>13} "
        f"{'size part ≥1,000':>17} {'verdict':>8}"
    )
    slopes: dict[str, Any] = {}
    for name, ys in series.items():
        s_all = slope(xs, ys)
        s_tail = slope([xs[i] for i in tail], [ys[i] for i in tail])
        s_part = slope([xs[i] for i in big], [ys[i] - ys[0] for i in big]) if len(big) >= 2 else None
        slopes[name] = {
            "slope_all": s_all,
            "slope_tail": s_tail,
            "slope_size_part": s_part,
            "tail_from": xs[tail[0]],
            "verdict": verdict(s_part),
        }
        print(
            f"{name:24} {_fmt_slope(s_all):>10} {_fmt_slope(s_tail):>13} {_fmt_slope(s_part):>17} {verdict(s_part):>8}"
        )
    hit_ratios = [r["hit"]["ratio_p50"] for r in rows]
    print(
        f"{'hit/bare p50':24} {'':>10} {'':>13} {'':>17}   {min(hit_ratios):.2f}-{max(hit_ratios):.2f}"
        " (a hit must stay < 1)"
    )
    slopes["hit/bare p50"] = {"min": min(hit_ratios), "max": max(hit_ratios)}
    # the per-token cost: the least-squares line through the added µs (sizes >= 1k, or the top two)
    tx = [xs[i] for i in tail]
    ty = [rows[i]["miss"]["added_p50_us"] for i in tail]
    mx, my = statistics.fmean(tx), statistics.fmean(ty)
    per_token = sum((a - mx) * (b - my) for a, b in zip(tx, ty, strict=True)) / sum((a - mx) ** 2 for a in tx)
    fixed = my - per_token * mx
    # local slopes of the size-dependent part between neighbouring sizes: > 1.2 is super-linear
    part = [r["miss"]["added_p50_us"] - rows[0]["miss"]["added_p50_us"] for r in rows]
    local = [slope(xs[i : i + 2], part[i : i + 2]) for i in range(len(xs) - 1)]
    super_linear = [f"{xs[i]:,}→{xs[i + 1]:,}" for i, s in enumerate(local) if i in big and s and s > 1.2]
    print(
        f"\nmiss: added ≈ {fixed:.0f} µs + {per_token * 1000:.1f} µs per 1k tokens (fit over ≥{lo} tokens); "
        f"bare costs {_per_1k(rows, 'bare_p50_us', tail):.1f} µs per 1k tokens"
    )
    print(
        "local slopes of the added µs' size part: "
        + ", ".join(f"{xs[i]:,}→{xs[i + 1]:,}: {_fmt_slope(s).strip()}" for i, s in enumerate(local))
        + (
            f"; SUPER-LINEAR at {', '.join(super_linear)}"
            if super_linear
            else "; nothing super-linear at ≥1,000 tokens"
            if len(big) >= 2
            else " (noise below 1,000 tokens: run without --quick)"
        )
    )
    return {
        "series": slopes,
        "added_fixed_us": fixed,
        "added_us_per_1k_tokens": per_token * 1000,
        "bare_us_per_1k_tokens": _per_1k(rows, "bare_p50_us", tail),
        "local_slopes_size_part": local,
        "super_linear": super_linear,
    }


def _per_1k(rows: list[dict[str, Any]], key: str, idx: list[int]) -> float:
    xs = [rows[i]["tokens"] for i in idx]
    ys = [rows[i]["miss"][key] for i in idx]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return 1000 * sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N <= 10^4, prompts <= 1k tokens, few calls")
    parser.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    parser.add_argument("--calls", type=int, help="measured pairs per ledger size (default 2000; --quick 150)")
    parser.add_argument("--profile", action="store_true", help="print pyinstrument call trees at the largest sizes")
    args = parser.parse_args(argv)
    quick = args.quick
    sizes = [10**3, 10**4] if quick else [10**3, 10**4, 10**5, 10**6]
    tokens = [1, 10, 100, 1000] if quick else [1, 10, 100, 1000, 10_000, 100_000]
    calls = args.calls or (150 if quick else 2000)
    warm = 20 if quick else 200
    if tiktoken_encoding("gpt-4o") is not None:  # cannot happen with an empty cache directory
        print("a tiktoken encoding is loaded: token counts are exact, not estimated", file=sys.stderr)
    m = machine()
    print(f"{m['cpu']} ({m['cores']} cores), python {m['python']}; tokens: tokenguard's offline estimate")
    began = time.perf_counter()
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
            print("ledger size ...", file=sys.stderr)
            ledger = ledger_series(
                Path(tmp),
                sizes,
                calls=calls,
                warm=warm,
                max_s=3.0 if quick else 7.0,
                read_budget_s=0.05 if quick else 0.3,
                profile=args.profile,
            )
            print("prompt size ...", file=sys.stderr)
            prompts = prompt_series(
                Path(tmp),
                tokens,
                calls=calls // 2,
                warm=warm // 2,
                max_s=2.0 if quick else 5.0,
                profile=args.profile,
            )
    except Failed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print("FAILED: a call raised", file=sys.stderr)
        return 1
    results["ledger"] = ledger
    results["ledger_slopes"] = print_ledger(ledger)
    results["prompts"] = prompts
    results["prompt_fit"] = print_prompts(prompts)
    wall = time.perf_counter() - began
    results["wall_s"] = wall
    print(f"\nwall time {wall:.1f} s")
    save(args.json, "scaling", results, quick=quick, calls=calls, ledger_sizes=sizes, prompt_tokens=tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
