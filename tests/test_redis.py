"""The Redis store against a real ``redis-server``: caps, loop history, cache and alerts shared by
processes; a dead or hanging Redis handled by the configured policy; the key layout a Redis
Cluster needs; exact money in the Lua scripts; a capped ledger whose totals stay exact; holds of
dead processes reclaimed; the async clients; and the store's URL options.

Every test talks to Redis through the official SDK clients and a guard (or the store's own
interface); the fake vendor APIs count what reaches them. Worker processes are forked from a
forkserver that has tokenguard imported already (spawned where there is none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import threading
import time
import traceback
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
import redis
from redis.crc import key_slot

import tokenguard
from chat_server import serve_chat
from redis_server import RedisServer
from tokenguard import Budget, BudgetExceeded, ConfigurationError, Guard, LoopDetected, LoopDetector, StoreUnavailable
from tokenguard._budget import Claim
from tokenguard._cache import CacheEntry, unpack
from tokenguard._ledger import LedgerRow, Stats
from tokenguard._usage import Usage
from tokenguard.providers.openai import CHAT, OpenAIAdapter
from tokenguard.stores import MemoryStore, redis_store
from tokenguard.stores.redis_store import RedisStore
from tokenguard.testing import FakeLLM, Reply

MODEL = "tg-redis-model"  # priced on every guard below: $1 / M input tokens, $4 / M output tokens
BIG = [{"role": "user", "content": "word " * 220}]  # its input bound covers the 1,000 tokens the servers report
BOUND = OpenAIAdapter().input_bound(CHAT, {"messages": BIG})
MAX_TOKENS = 500
IN_USD, OUT_USD = Decimal("0.000001"), Decimal("0.000004")
ACTUAL = 1000 * IN_USD + 200 * OUT_USD  # what one answer (1,000 in, 200 out) costs: $0.0018
WORST = BOUND * IN_USD + MAX_TOKENS * OUT_USD  # what each call reserves
CAP = 20 * ACTUAL  # room for 20 calls
NANO = Decimal("0.000000001")
PROMPT = [{"role": "user", "content": "Rebuild the search index for tenant 42"}]


def priced_guard(store: str, **kw: Any) -> Guard:
    """A guard on ``store`` that knows MODEL's price."""
    g = Guard(store=store, **kw)
    g.register_price(MODEL, input_mtok="1", output_mtok="4")
    return g


def prefix_of(url: str) -> str:
    """The ``?prefix=`` of a store URL."""
    return parse_qs(urlsplit(url).query)["prefix"][0]


def raw_client(url: str) -> Any:
    """A plain redis-py client on the server of ``url`` (tokenguard's options dropped)."""
    parts = urlsplit(url)
    return redis.Redis.from_url(f"{parts.scheme}://{parts.netloc}{parts.path}")


def keys_of(client: Any, prefix: str) -> list[str]:
    """Every key on the server that starts with ``prefix`` (and a colon)."""
    return sorted(k.decode() for k in client.scan_iter(match=prefix + ":*", count=1000))


def context() -> Any:
    """A multiprocessing context whose children start fast (forkserver with tokenguard preloaded)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["tokenguard", "tokenguard.testing", "redis"])
        return ctx
    return multiprocessing.get_context("spawn")


def collect(procs: list[Any], results: Any, timeout: float = 60) -> list[Any]:
    """One result per process (each worker puts exactly one), then the processes joined."""
    try:
        outcomes = [results.get(timeout=timeout) for _ in procs]
    except BaseException:
        for p in procs:
            p.kill()
            p.join(10)
        raise
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join(10)
    errors = [o[2] for o in outcomes if o[0] == "error"]
    assert not errors, errors[0]
    return outcomes


def served_usd(server: Any, user: str) -> Decimal:
    """The usage the server itself answered for ``user``, priced."""
    with server.lock:
        usd: Decimal = server.input_tokens[user] * IN_USD + server.output_tokens[user] * OUT_USD
    return usd


@pytest.fixture
def chat_server() -> Iterator[Any]:
    """A loopback chat-completions server counting the requests and tokens it answered."""
    with serve_chat() as server:
        yield server


def loopback_client(port: int, guard: Guard) -> Any:
    """A guarded ``tokenguard.OpenAI`` on the loopback server."""
    return tokenguard.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", guard=guard)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill."""
    server = RedisServer().start()
    yield server
    server.stop()


class _StallingProxy:
    """A TCP proxy to Redis that can stop answering: once ``stalled`` is set, it still accepts
    connections and reads what clients send, but passes nothing on (a Redis that hangs). With no
    upstream it never answers anything (a socket server that accepts and sleeps). ``delay_s``
    holds every chunk back that long each way (a Redis across a network)."""

    def __init__(self, upstream: int | None, delay_s: float = 0.0) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.stalled = threading.Event()
        if upstream is None:
            self.stalled.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.sockets.append(conn)
            if self.upstream is None:
                continue
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets.append(up)
            for src, dst in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.stalled.is_set():
                continue  # swallowed: the client waits for an answer that never comes
            time.sleep(self.delay_s)
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed = True
        self.thread.join(5)
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


# -- 1. processes sharing one cap ----------------------------------------------------------------


def _cap_worker(url: str, port: int, users: list[str], barrier: Any, results: Any) -> None:
    """Process worker: call through its own guard, spreading calls over ``users``, until the
    shared cap refuses each user while nothing is held; report what was admitted and the alerts."""
    try:
        alerts: list[tokenguard.Alert] = []
        per = "user" if users != ["-"] else None
        g = priced_guard(url, budgets=[Budget(limit_usd=CAP, period="day", per=per)], on_alert=alerts.append)
        client = loopback_client(port, g)
        barrier.wait(timeout=60)
        admitted: Counter[str] = Counter()
        refused = 0
        done: set[str] = set()
        for i in range(600):
            pending = [u for u in users if u not in done]
            if not pending:
                break
            user = pending[i % len(pending)]
            with tokenguard.scope(user=user) if per else contextlib.nullcontext():
                try:
                    client.chat.completions.create(
                        model=MODEL, messages=BIG, max_tokens=MAX_TOKENS, extra_headers={"x-user": user}
                    )
                except BudgetExceeded as err:
                    refused += 1
                    if err.held_usd == 0:  # nothing in flight anywhere and still no room: the cap is used
                        done.add(user)
                    else:
                        time.sleep(0.01)  # let the calls in flight land
                else:
                    admitted[user] += 1
        else:
            raise AssertionError("600 calls and no final refusal")
        client.close()
        g.close()
        fired = [(a.key, a.kind, a.threshold) for a in alerts]
        results.put(("ok", os.getpid(), dict(admitted), refused, fired))
    except BaseException:
        results.put(("error", os.getpid(), traceback.format_exc()))


@pytest.mark.parametrize("users", [["-"], ["alice", "bob"]], ids=["shared", "per-user"])
def test_four_processes_sharing_a_redis_cap_never_exceed_it(
    redis_server: RedisServer, chat_server: Any, users: list[str]
) -> None:
    """4 processes, each with its own guard on one Redis, call until refused: the usage the server
    answered, priced, is within one call of the cap and never above it (per user for a per-user
    cap); the store's settled spend and the ledger equal it, nothing stays held, and each alert
    was delivered once in total across the processes."""
    url = redis_server.fresh_url()
    chat_server.delay_s = 0.03
    ctx = context()
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    port = chat_server.server_address[1]
    procs = [ctx.Process(target=_cap_worker, args=(url, port, users, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = collect(procs, results)
    assert len({o[1] for o in outcomes}) == 4  # really four processes
    per = "user" if users != ["-"] else None
    check = priced_guard(url, budgets=[Budget(limit_usd=CAP, period="day", per=per)])
    for user in users:
        served = served_usd(chat_server, user)
        assert chat_server.answered[user] == sum(o[2].get(user, 0) for o in outcomes)  # only admitted calls sent
        assert served <= CAP
        assert served > CAP - WORST  # the cap was really reached, not trivially under
        [status] = check.budget_status(**({"user": user} if per else {}))
        assert (status.spent_usd, status.held_usd) == (served, Decimal(0))
        assert check.spent(period="day", **({"user": user} if per else {})) == served
    assert sum(o[3] for o in outcomes) >= 4 * len(users)  # every process was refused for every user
    assert sorted(str(s.key) for s in check.budget_overview()) == (["None"] if per is None else users)
    delivered = Counter((key, kind, threshold) for o in outcomes for key, kind, threshold in o[4])
    expected: Counter[tuple[str | None, str, float]] = Counter()
    for user in users:
        key = user if per else None
        for kind, threshold in [("threshold", 0.5), ("threshold", 0.75), ("threshold", 0.9), ("blocked", 1.0)]:
            expected[(key, kind, threshold)] = 1
    assert delivered == expected
    check.close()


def _forked_worker(guard: Guard, port: int, alerts: list[tokenguard.Alert], results: Any) -> None:
    """Forked worker: keep calling through the guard its parent made (on a client of its own: an
    HTTP connection cannot be shared by processes), until refused."""
    try:
        client = loopback_client(port, guard)
        admitted = refused = 0
        for _ in range(300):
            try:
                client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
            except BudgetExceeded as err:
                refused += 1
                if err.held_usd == 0:
                    break
                time.sleep(0.01)
            else:
                admitted += 1
        else:
            raise AssertionError("300 calls and no final refusal")
        guard.flush()
        results.put(("ok", os.getpid(), admitted, refused, [(a.kind, a.threshold) for a in alerts]))
    except BaseException:
        results.put(("error", os.getpid(), traceback.format_exc()))


def test_forked_children_of_one_guard_share_the_cap(redis_server: RedisServer, chat_server: Any) -> None:
    """A guard made (and used: its connection open) before a fork, as a pre-forking server does:
    the 4 children it forks each get their own Redis connection and together stay within the
    cap, and each alert is delivered once in total."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    url = redis_server.fresh_url()
    alerts: list[tokenguard.Alert] = []
    g = priced_guard(url, budgets=[Budget(limit_usd=CAP, period="day")], on_alert=alerts.append)
    port = chat_server.server_address[1]
    client = loopback_client(port, g)
    client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
    g.flush()
    chat_server.delay_s = 0.03
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_forked_worker, args=(g, port, alerts, results)) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork of a process with threads
        for p in procs:
            p.start()
    outcomes = collect(procs, results)
    served = served_usd(chat_server, "-")
    assert chat_server.answered["-"] == 1 + sum(o[2] for o in outcomes)
    assert CAP - WORST < served <= CAP
    [status] = g.budget_status()
    assert (status.spent_usd, status.held_usd) == (served, Decimal(0))
    assert g.spent() == served
    delivered = Counter(a for o in outcomes for a in o[4])
    assert delivered == {("threshold", 0.5): 1, ("threshold", 0.75): 1, ("threshold", 0.9): 1, ("blocked", 1.0): 1}
    client.close()
    g.close()


# -- 2. the loop detector across processes -------------------------------------------------------


def _loop_worker(url: str, port: int, requests: int, threads: int, barrier: Any, results: Any) -> None:
    """Process worker: ``threads`` threads send PROMPT ``requests`` times each, all at once;
    report (pid, sent, refusal levels)."""
    try:
        g = Guard(store=url, retry=False, loops=LoopDetector(max_repeats=3))
        client = loopback_client(port, g)
        lock = threading.Lock()
        start = threading.Barrier(threads)
        sent: list[int] = []
        levels: list[str] = []

        def send() -> None:
            start.wait(timeout=60)
            for _ in range(requests):
                try:
                    client.chat.completions.create(model="gpt-4o", messages=PROMPT)
                except LoopDetected as err:
                    with lock:
                        levels.append(err.level)
                else:
                    with lock:
                        sent.append(1)

        if barrier is not None:
            barrier.wait(timeout=60)
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(send) for _ in range(threads)]:
                future.result(timeout=60)
        client.close()
        g.close()
        results.put(("ok", os.getpid(), len(sent), levels))
    except BaseException:
        results.put(("error", os.getpid(), traceback.format_exc()))


def test_a_loop_is_detected_across_processes(redis_server: RedisServer, chat_server: Any) -> None:
    """The parent sends a prompt twice; a child process sharing the Redis store may send it once
    more (the 3rd), and its next (the 4th overall, max_repeats=3) is refused and never sent; so is
    the parent's next one."""
    url = redis_server.fresh_url()
    port = chat_server.server_address[1]
    g = Guard(store=url, retry=False, loops=LoopDetector(max_repeats=3))
    client = loopback_client(port, g)
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o", messages=PROMPT)
    ctx = context()
    results = ctx.Queue()
    child = ctx.Process(target=_loop_worker, args=(url, port, 2, 1, None, results))
    child.start()
    [(_, pid, sent, levels)] = collect([child], results)
    assert pid != os.getpid()
    assert (sent, levels) == (1, ["exact"])
    assert chat_server.answered["-"] == 3
    with pytest.raises(LoopDetected):
        client.chat.completions.create(model="gpt-4o", messages=PROMPT)
    assert chat_server.answered["-"] == 3
    client.close()
    g.close()


def test_processes_racing_send_a_repeat_exactly_max_repeats_times(redis_server: RedisServer, chat_server: Any) -> None:
    """4 processes of 4 threads each send the same prompt 3 times per thread, all at once, to a
    Redis 5 ms away (so each check's read and write are far apart): exactly 3 (max_repeats) of the
    48 reach the server, the 45 others are refused, and the shared ledger counts them as loops."""
    proxy = _StallingProxy(redis_server.port, delay_s=0.005)
    try:
        url = f"redis://127.0.0.1:{proxy.port}/0?prefix=t{uuid.uuid4().hex[:12]}"
        ctx = context()
        barrier = ctx.Barrier(4)
        results = ctx.Queue()
        port = chat_server.server_address[1]
        procs = [ctx.Process(target=_loop_worker, args=(url, port, 3, 4, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = collect(procs, results)
    finally:
        proxy.close()
    url = f"{redis_server.url}?prefix={prefix_of(url)}"
    assert len({o[1] for o in outcomes}) == 4
    assert chat_server.answered["-"] == 3
    assert sum(o[2] for o in outcomes) == 3
    assert sum(len(o[3]) for o in outcomes) == 45
    assert {level for o in outcomes for level in o[3]} <= {"exact", "cool-down"}
    check = Guard(store=url)
    stats = check.stats()
    assert (stats.calls, stats.loops_blocked) == (48, 45)
    check.close()


# -- 3. the shared cache -------------------------------------------------------------------------


def _cache_worker(url: str, results: Any) -> None:
    """Process worker: the same request through a fresh Cache on ``url``; report what reached its server."""
    try:
        fake = FakeLLM(Reply(text="child must not see this"))
        g = Guard(store="memory://", cache=tokenguard.Cache(url, ttl_s=300))
        r = fake.openai(guard=g).chat.completions.create(model="gpt-4o-mini", messages=PROMPT, temperature=0)
        hits = g.stats().cache_hits
        g.close()
        results.put(("ok", os.getpid(), r.choices[0].message.content, len(fake.requests), hits))
    except BaseException:
        results.put(("error", os.getpid(), traceback.format_exc()))


def test_the_cache_is_shared_by_guards_and_processes(redis_server: RedisServer) -> None:
    """A response cached through guard A is a hit for guard B (another Cache object) and for
    another process, with no request to their servers; the entry is zlib-compressed JSON (no
    pickle) with a TTL."""
    url = redis_server.fresh_url()
    first = FakeLLM(Reply(text="the cached answer"))
    a = Guard(store="memory://", cache=tokenguard.Cache(url, ttl_s=300))
    ra = first.openai(guard=a).chat.completions.create(model="gpt-4o-mini", messages=PROMPT, temperature=0)
    assert ra.choices[0].message.content == "the cached answer"
    assert len(first.money_requests) == 1

    second = FakeLLM(Reply(text="B must not see this"))
    b = Guard(store="memory://", cache=tokenguard.Cache(url, ttl_s=300))
    rb = second.openai(guard=b).chat.completions.create(model="gpt-4o-mini", messages=PROMPT, temperature=0)
    assert rb.choices[0].message.content == "the cached answer"
    assert second.requests == []
    assert b.stats().cache_hits == 1

    ctx = context()
    results = ctx.Queue()
    child = ctx.Process(target=_cache_worker, args=(url, results))
    child.start()
    [(_, pid, text, requests, hits)] = collect([child], results)
    assert pid != os.getpid()
    assert (text, requests, hits) == ("the cached answer", 0, 1)

    client = raw_client(url)
    [name] = keys_of(client, prefix_of(url))
    assert name.startswith(prefix_of(url) + ":c:")
    assert 0 < client.pttl(name) <= 300_000
    data = client.get(name)
    assert not data.startswith(b"\x80")  # no pickle protocol header
    doc = json.loads(unpack(data))  # JSON (zlib-compressed when large)
    assert isinstance(doc, dict)
    assert b"the cached answer" in CacheEntry.from_json(data).body
    client.close()
    a.close()
    b.close()


# -- 4. Redis killed or hanging mid-run ----------------------------------------------------------


def test_redis_killed_with_on_failure_closed_refuses_calls_quickly(own_redis: RedisServer) -> None:
    """on_failure=closed (the default): once Redis is killed, a call under a budget raises
    StoreUnavailable within a bounded time, nothing reaches the vendor, and the message names the
    store but not its password; a new closed store cannot even be opened."""
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("requirepass", "hunter2")
    admin.close()
    url = f"redis://:hunter2@127.0.0.1:{own_redis.port}/0?prefix=t{uuid.uuid4().hex[:12]}&retry_s=0.2"
    fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
    g = priced_guard(url, budgets=[Budget(limit_usd=CAP, period="day")], settle_delay_s=0)
    client = tokenguard.OpenAI(api_key="sk-test", guard=g, http_client=httpx2.Client(transport=fake.transport()))
    client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
    g.flush()
    own_redis.kill()

    for _ in range(2):  # the first finds Redis gone; the second fails fast without trying it
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        assert time.monotonic() - started < 5
        assert f"127.0.0.1:{own_redis.port}" in str(info.value)
        assert "hunter2" not in str(info.value)
        assert "hunter2" not in repr(info.value.value)
    assert len(fake.money_requests) == 1
    assert isinstance(info.value, ConfigurationError)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as opening:
        Guard(store=url)
    assert time.monotonic() - started < 5
    assert "hunter2" not in str(opening.value)
    with contextlib.suppress(StoreUnavailable):
        g.close()


def test_redis_killed_with_on_failure_open_keeps_calling_and_replays_the_spend(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """on_failure=open: with Redis killed, calls go on (an ERROR on "tokenguard" says so); once
    Redis is back (restarted, empty) the spend settled during the outage is added to its budget
    totals and the ledger rows written meanwhile are not lost."""
    url = own_redis.fresh_url(on_failure="open", retry_s="0.2")
    budget = Budget(limit_usd=CAP, period="day")
    fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
    g = priced_guard(url, budgets=[budget], settle_delay_s=0)
    client = fake.openai(guard=g)
    client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
    g.flush()
    own_redis.kill()
    with caplog.at_level(logging.ERROR, logger="tokenguard"):
        for _ in range(3):
            client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
    assert len(fake.money_requests) == 4
    assert any(
        r.levelno == logging.ERROR and r.name == "tokenguard" and "on_failure=open" in r.getMessage()
        for r in caplog.records
    )
    restarted = RedisServer(port=own_redis.port).start()
    try:
        time.sleep(0.3)  # past retry_s: the next call tries Redis again
        client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        g.flush()
        # a fresh guard reads Redis alone: the 3 calls of the outage plus the one after it
        # (the first call's spend died with the unpersisted server)
        check = priced_guard(url, budgets=[budget])
        [status] = check.budget_status()
        assert (status.spent_usd, status.held_usd) == (4 * ACTUAL, Decimal(0))
        assert check.spent() == 4 * ACTUAL
        check.close()
        g.close()
    finally:
        restarted.stop()


def test_a_hanging_redis_fails_calls_within_the_timeout(redis_server: RedisServer) -> None:
    """A Redis that accepts connections but stops answering: a call under a budget fails with
    StoreUnavailable within a bounded time (the command timeout) and is not sent; opening a
    closed store on a server that never answers fails the same way instead of hanging."""
    proxy = _StallingProxy(redis_server.port)
    blackhole = _StallingProxy(None)
    try:
        url = f"redis://127.0.0.1:{proxy.port}/0?prefix=t{uuid.uuid4().hex[:12]}&timeout=0.2&retry_s=5"
        fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
        g = priced_guard(url, budgets=[Budget(limit_usd=CAP, period="day")], settle_delay_s=0)
        client = fake.openai(guard=g)
        client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        g.flush()
        proxy.stalled.set()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        assert time.monotonic() - started < 5
        assert "Timeout" in str(info.value)
        assert len(fake.money_requests) == 1

        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            RedisStore(f"redis://127.0.0.1:{blackhole.port}/0?timeout=0.2")
        assert time.monotonic() - started < 5
        assert blackhole.sockets  # it did connect: the wait was for an answer
        with contextlib.suppress(StoreUnavailable):
            g.close()
    finally:
        proxy.close()
        blackhole.close()


def test_open_policy_replays_a_hang_exactly_once_redis_answers_again(redis_server: RedisServer) -> None:
    """on_failure=open through a Redis that hangs, then answers again with its data: a stream
    reserved before the hang and finished during it, and two calls made during it, all end up in
    Redis's totals exactly once, with nothing left held; no ledger row is lost."""
    proxy = _StallingProxy(redis_server.port)
    try:
        prefix = f"t{uuid.uuid4().hex[:12]}"
        url = f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}&on_failure=open&timeout=0.2&retry_s=0.3"
        budget = Budget(limit_usd=CAP, period="day")
        fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
        g = priced_guard(url, budgets=[budget], settle_delay_s=0)
        client = fake.openai(guard=g)
        client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        stream = client.chat.completions.create(
            model=MODEL, messages=BIG, max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}
        )
        [before] = g.budget_status()
        assert before.held_usd > 0  # the stream's reservation, in Redis
        proxy.stalled.set()
        started = time.monotonic()
        chunks = list(stream)  # ends during the hang: its settle waits for Redis
        assert chunks[-1].usage is not None
        for _ in range(2):
            client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        assert time.monotonic() - started < 5  # one timeout, then Redis is not tried for retry_s
        assert len(fake.money_requests) == 4
        proxy.stalled.clear()
        time.sleep(0.4)
        client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        g.flush()
        check = priced_guard(f"{redis_server.url}?prefix={prefix}", budgets=[budget])  # Redis itself
        [status] = check.budget_status()
        assert (status.spent_usd, status.held_usd) == (5 * ACTUAL, Decimal(0))
        assert check.spent() == 5 * ACTUAL
        assert check.stats().calls == 5
        check.close()
        g.close()
    finally:
        proxy.close()


# -- 5. key layout and alerts ---------------------------------------------------------------------


# <prefix>:b:{<digest of the budget key>}:<period start>[:<what>] (state, holds, alert markers ...)
_BUDGET_KEY = re.compile(r"^(?P<prefix>[^:]+):b:\{(?P<tag>[0-9a-f]{24})\}:(?P<period>[0-9.]+)(?::(?P<kind>.+))?$")


def test_key_layout_hash_slots_prefix_and_expiry(redis_server: RedisServer) -> None:
    """Every key starts with the prefix; all keys of one budget key (its spend, its holds and their
    leases, its alert markers) share one Redis Cluster hash slot, as do a loop scope's; a day
    budget's keys expire after the day ends, a "total" budget's never; ledger totals per hour and
    day expire, the all-time ones and the capped stream do not."""
    url = redis_server.fresh_url()
    prefix = prefix_of(url)
    fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
    day = Budget(limit_usd="1", period="day", per="user", alerts=(0.001,))
    total = Budget(limit_usd="1", period="total", alerts=(0.001,))
    g = priced_guard(url, budgets=[day, total], loops=True, settle_delay_s=0, on_alert=lambda a: None)
    client = fake.openai(guard=g)
    with tokenguard.scope(user="alice"):
        client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
    book = g.pipeline.budgets
    assert book is not None
    hold = book.admit({"user": "alice"}, WORST, 0)  # a reservation in flight: its holders and leases exist
    g.flush()
    client_r = raw_client(url)
    try:
        names = keys_of(client_r, prefix)
        assert names
        assert all(n.startswith(prefix + ":") for n in names)
        assert client_r.exists(prefix) == 0
        budget_keys: dict[str, list[re.Match[str]]] = {}
        for name in names:
            m = _BUDGET_KEY.match(name)
            if m:
                budget_keys.setdefault(m["tag"], []).append(m)
        assert len(budget_keys) == 2  # the day budget for alice, the total budget
        day_end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
        for matches in budget_keys.values():
            assert len({key_slot(m.string.encode()) for m in matches}) == 1
            assert "a:0.001" in {m["kind"] for m in matches}  # the alert marker, beside the key's state
            assert len(matches) >= 2
            [period] = {m["period"] for m in matches}
            for m in matches:
                if period == "0":  # the "total" budget: kept for ever
                    assert client_r.ttl(m.string) == -1, m.string
                else:
                    assert float(period) == (day_end - timedelta(days=1)).timestamp()
                    expires = client_r.expiretime(m.string)
                    assert day_end.timestamp() <= expires <= day_end.timestamp() + 2 * 86_400, m.string
        loop_keys = [n for n in names if n.startswith(prefix + ":l:")]
        assert loop_keys
        groups: dict[str, set[int]] = {}
        for name in loop_keys:
            tag = re.match(r"^[^:]+:l:(\{[^}]+\}):", name)
            assert tag is not None, name
            groups.setdefault(tag[1], set()).add(key_slot(name.encode()))
            assert client_r.ttl(name) > 0, name
        assert all(len(slots) == 1 for slots in groups.values())
        ledger = [n for n in names if n.startswith(prefix + ":s:")]
        assert any(":s:h:" in n for n in ledger)
        assert any(":s:d:" in n for n in ledger)
        for name in ledger:
            if ":s:t:all:" in name:
                assert client_r.ttl(name) == -1, name
            else:
                assert client_r.ttl(name) > 0, name
        for name in names:  # nothing else lives for ever
            budget_key = _BUDGET_KEY.match(name)
            if client_r.ttl(name) == -1:
                assert (
                    name == f"{prefix}:rows"
                    or ":s:t:all:" in name
                    or name == f"{prefix}:bk:0"
                    or (budget_key is not None and budget_key["period"] == "0")
                ), name
    finally:
        client_r.close()
    book.release(hold, {"user": "alice"})
    [status_day, status_total] = g.budget_status(user="alice")
    assert status_day.held_usd == status_total.held_usd == 0
    g.close()


def test_two_guards_crossing_a_threshold_alert_once_in_total(redis_server: RedisServer) -> None:
    """Two guards (two store connections, as two processes would have) take turns spending one
    cap: each threshold and the blocked alert are delivered once in total, whichever crossed it."""
    url = redis_server.fresh_url()
    fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
    delivered: list[tuple[str, str, float]] = []
    guards = [
        priced_guard(
            url,
            budgets=[Budget(limit_usd=CAP, period="day")],
            settle_delay_s=0,
            on_alert=lambda a, who=who: delivered.append((who, a.kind, a.threshold)),
        )
        for who in ("A", "B")
    ]
    clients = [fake.openai(guard=g) for g in guards]
    refused = [False, False]
    for i in range(100):
        if all(refused):
            break
        try:
            clients[i % 2].chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        except BudgetExceeded:
            refused[i % 2] = True
    assert all(refused)
    assert Counter((kind, threshold) for _, kind, threshold in delivered) == {
        ("threshold", 0.5): 1,
        ("threshold", 0.75): 1,
        ("threshold", 0.9): 1,
        ("blocked", 1.0): 1,
    }
    for g in guards:
        g.close()


# -- 6. exact money ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    [
        Decimal("20000000"),
        Decimal("20000000.123456789"),
        Decimal("1000000000000000.123456789"),
        Decimal("1000000000000000.999999999"),  # one nano-dollar more carries into the dollars
    ],
    ids=["20M", "20M-and-nanos", "1e15-and-nanos", "1e15-carry"],
)
def test_money_is_exact_in_lua_above_2_53_nano_dollars(redis_url: str, limit: Decimal) -> None:
    """A cap above 2^53 nano-dollars (about $9M) takes claims that fill it exactly to the
    nano-dollar and refuses one nano-dollar more; held and settled totals read back exactly."""
    assert limit * 10**9 > 2**53
    store = RedisStore(redis_url)
    owner = (socket.gethostname(), os.getpid())
    now = time.time()

    def claim(usd: Decimal) -> Claim:
        return Claim("exact|", 0.0, usd, 0, limit, None, True, (), "total")

    def reserve(usd: Decimal) -> Any:
        return store.reserve([claim(usd)], owner=owner, expires_at=now + 900, now=now)

    first = (limit / 3).quantize(NANO, rounding=ROUND_FLOOR)
    rest = limit - first
    assert reserve(first) is None
    refusal = reserve(rest + NANO)
    assert refusal is not None
    assert refusal.totals.held_usd == first
    assert reserve(rest) is None
    assert store.totals("exact|", 0.0, now=now).held_usd == limit
    refusal = reserve(NANO)
    assert refusal is not None
    assert refusal.totals == (Decimal(0), limit, 0, 0)
    store.settle([([claim(first), claim(rest)], [claim(limit - NANO)])], owner=owner, now=now)
    assert store.totals("exact|", 0.0, now=now) == (limit - NANO, Decimal(0), 0, 0)
    assert reserve(2 * NANO) is not None
    assert reserve(NANO) is None
    assert store.totals("exact|", 0.0, now=now) == (limit - NANO, NANO, 0, 0)
    store.close()


# -- 7. ledger retention --------------------------------------------------------------------------


def _rows(now: datetime, n: int) -> list[LedgerRow]:
    """``n`` rows, oldest first, a millisecond or more apart, over the last three days (the
    newest in the current hour), with money to 18 decimals and two scope attributes."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    out = []
    for i in range(n):
        if i < n // 4:
            ts = now - timedelta(days=3) + timedelta(seconds=i)  # hours ago: day totals only
        elif i < n // 2:
            ts = now - timedelta(hours=26) + timedelta(seconds=i)  # yesterday or so
        elif i < n * 3 // 4:
            ts = hour - timedelta(minutes=30) + timedelta(milliseconds=i)  # the previous hour
        else:
            ts = max(now - timedelta(milliseconds=(n - i) * 2), hour)  # the current hour
        ts = ts.replace(microsecond=ts.microsecond // 1000 * 1000)
        out.append(
            LedgerRow(
                ts=ts,
                vendor="openai",
                endpoint="chat",
                model=MODEL,
                scope=MappingProxyType({"user": f"u{i % 3}", "team": f"t{i % 2}"}),
                usage=Usage(input_tokens=100 + i, output_tokens=i % 7, reasoning_tokens=i % 2),
                cost_usd=Decimal(f"0.{i:06d}123456789012") if i % 11 else None,
                outcome="ok" if i % 5 else "cache_hit",
                saved_usd=Decimal("0.000000000000000001") if i % 5 == 0 else None,
                attempts=1 + i % 3,
                request_id=f"req-{i}",
            )
        )
    out.sort(key=lambda r: r.ts)
    return out


def test_ledger_keeps_exact_totals_past_its_retained_rows(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ?rows=1000 and 2,400 rows: stats() and spent() on no or one scope attribute equal the
    totals of every row; rows() holds only the newest ones; a query on two attributes reaching
    before them is a clear ConfigurationError; a Guard's spent(period="hour"/"day") is exact."""
    url = redis_server.fresh_url(rows="1000")
    store = RedisStore(url)
    now = datetime.now(UTC)
    rows = _rows(now, 2400)
    for row in rows:
        store.record(row)
    store.flush()

    assert store.stats(since=None, scope={}) == Stats.of(rows)
    assert store.spent(since=None, scope={}) == Stats.of(rows).spent_usd
    for attr, value in [("user", "u1"), ("team", "t0")]:
        mine = [r for r in rows if r.scope[attr] == value]
        assert store.stats(since=None, scope={attr: value}) == Stats.of(mine)
        assert store.spent(since=None, scope={attr: value}) == Stats.of(mine).spent_usd

    kept = list(store.rows())
    assert 1000 <= len(kept) < 2400
    assert [r.request_id for r in kept] == [r.request_id for r in rows[-len(kept) :]]
    assert kept == rows[-len(kept) :]
    held, kept_since, trimmed = store.retention()
    assert (held, trimmed) == (len(kept), True)
    assert kept_since is not None
    assert abs(kept_since - now) < timedelta(minutes=1)  # when the first kept row was written (server clock)

    two = {"user": "u1", "team": "t0"}
    with pytest.raises(ConfigurationError, match=r"rows="):
        store.stats(since=None, scope=two)
    with pytest.raises(ConfigurationError, match="stream"):
        store.spent(since=rows[0].ts, scope=two)
    # rows that start after the stream's first kept write (plus the margin for clock skew between
    # hosts and the server, cut to 1 s here) are all there: a two-attribute query over them is
    # answered from the stream, exactly
    monkeypatch.setattr(redis_store, "_SKEW_S", 1.0)
    time.sleep(1.2)
    recent = datetime.now(UTC)
    later = [
        LedgerRow(
            ts=recent + timedelta(milliseconds=i),
            vendor="openai",
            endpoint="chat",
            model=MODEL,
            scope=MappingProxyType({"user": "u1", "team": "t0" if i % 2 else "t1"}),
            cost_usd=Decimal("0.000123"),
        )
        for i in range(10)
    ]
    for row in later:
        store.record(row)
    store.flush()
    assert store.stats(since=recent, scope=two) == Stats.of([r for r in later if r.scope["team"] == "t0"])
    store.close()

    everything = rows + later
    g = Guard(store=url, clock=lambda: now)  # the hour and day of the rows, whenever this runs
    hour = now.replace(minute=0, second=0, microsecond=0)
    day = hour.replace(hour=0)
    since_hour = Stats.of([r for r in everything if r.ts >= hour]).spent_usd
    since_day = Stats.of([r for r in everything if r.ts >= day]).spent_usd
    assert since_day >= since_hour > 0
    assert g.spent(period="hour") == since_hour
    assert g.spent(period="day") == since_day
    u2_today = [r for r in everything if r.ts >= day and r.scope["user"] == "u2"]
    assert g.spent(period="day", user="u2") == Stats.of(u2_today).spent_usd
    assert g.spent() == Stats.of(everything).spent_usd
    g.close()


def test_a_query_the_trimmed_stream_cannot_answer_is_refused_even_when_rows_were_written_late(
    redis_server: RedisServer,
) -> None:
    """Rows are written when calls end, stamped when they started: 1,500 short calls from ten
    minutes on, then 1,500 long calls that started earlier. With ?rows=1000 the stream keeps only
    long calls; a two-attribute query since one second in needs the short ones it lost, so it must
    raise, not return a fraction of the true total."""
    url = redis_server.fresh_url(rows="1000")
    store = RedisStore(url)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    scope = MappingProxyType({"user": "u", "team": "t"})

    def row(ts: datetime, i: int) -> LedgerRow:
        return LedgerRow(ts=ts, vendor="openai", endpoint="chat", model=MODEL, scope=scope, cost_usd=Decimal("0.001"))

    short = [row(base + timedelta(minutes=10, milliseconds=i), i) for i in range(1500)]
    long = [row(base + timedelta(milliseconds=i), i) for i in range(1500)]
    for r in short + long:
        store.record(r)
    store.flush()
    since = base + timedelta(seconds=1)
    want = Stats.of([r for r in short + long if r.ts >= since])
    try:
        got: Stats | None = store.stats(since=since, scope=dict(scope))
    except ConfigurationError:
        got = None  # the clear error: also right
    finally:
        store.close()
    assert got is None or got == want, f"{got.calls if got else 0} of {want.calls} rows counted, silently"


# -- 8. holds of dead processes -------------------------------------------------------------------

HOLD_CAP = Decimal("0.01")
DEAD_HOLD = Decimal("0.009")  # leaves $0.001, less than one call's worst case


def _hold_and_hang(url: str, hold_s: float, ready: Any) -> None:
    """Process worker: reserve most of the cap, report (pid, when), then hang until killed."""
    g = priced_guard(url, budgets=[Budget(limit_usd=HOLD_CAP, period="day")], budget_hold_s=hold_s)
    book = g.pipeline.budgets
    assert book is not None
    book.admit({}, DEAD_HOLD, 0)
    ready.put((os.getpid(), time.time()))
    time.sleep(120)


def test_holds_of_a_killed_process_are_reclaimed_at_once(redis_server: RedisServer) -> None:
    """A process holding most of the cap is SIGKILLed: the next call on this host that the hold
    keeps out drops it at once (its pid is gone) and goes through."""
    url = redis_server.fresh_url()
    ctx = context()
    ready = ctx.Queue()
    child = ctx.Process(target=_hold_and_hang, args=(url, 3600.0, ready))
    child.start()
    try:
        pid, _ = ready.get(timeout=60)
        assert pid == child.pid
        fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
        g = priced_guard(url, budgets=[Budget(limit_usd=HOLD_CAP, period="day")], budget_hold_s=3600)
        client = fake.openai(guard=g)
        with pytest.raises(BudgetExceeded) as info:  # the live child's hold keeps the call out
            client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        assert info.value.held_usd == DEAD_HOLD
        os.kill(pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        started = time.monotonic()
        client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        assert time.monotonic() - started < 5
        assert len(fake.money_requests) == 1
        [status] = g.budget_status()
        assert (status.spent_usd, status.held_usd) == (ACTUAL, Decimal(0))
        g.close()
    finally:
        if child.is_alive():
            child.kill()
            child.join(30)


def test_holds_lapse_after_their_lease(redis_server: RedisServer) -> None:
    """A hold whose owner is alive but stuck (not reclaimable by pid) keeps calls out until its
    lease (budget_hold_s) runs out, then no longer."""
    url = redis_server.fresh_url()
    ctx = context()
    ready = ctx.Queue()
    child = ctx.Process(target=_hold_and_hang, args=(url, 2.5, ready))
    child.start()
    try:
        _, reserved_at = ready.get(timeout=60)
        fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
        g = priced_guard(url, budgets=[Budget(limit_usd=HOLD_CAP, period="day")], budget_hold_s=3600)
        client = fake.openai(guard=g)
        with pytest.raises(BudgetExceeded) as info:
            client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        assert info.value.held_usd == DEAD_HOLD  # refused while the lease ran
        time.sleep(max(reserved_at + 2.7 - time.time(), 0))
        client.chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        assert child.is_alive()  # dropped by its lease, not because its process was gone
        assert len(fake.money_requests) == 1
        [status] = g.budget_status()
        assert (status.spent_usd, status.held_usd) == (ACTUAL, Decimal(0))
        g.close()
    finally:
        child.kill()
        child.join(30)


# -- 9. async clients ----------------------------------------------------------------------------


class _SlowTransport(httpx2.AsyncBaseTransport):
    """The fake's async transport, answering after a pause (so concurrent calls overlap)."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await asyncio.sleep(0.03)
        return await self.inner.handle_async_request(request)


async def test_async_client_on_a_redis_store(redis_server: RedisServer) -> None:
    """tokenguard.AsyncOpenAI on a Redis store and a Redis cache: a repeated request is a cache hit;
    8 concurrent calls (each in flight 30 ms) hold their worst case, so those that would not fit
    beside them are refused; then the cap is reached but never exceeded, and the totals are exact."""
    url = redis_server.fresh_url()
    limit = 6 * ACTUAL
    fake = FakeLLM(Reply(input_tokens=1000, output_tokens=200))
    g = priced_guard(url, budgets=[Budget(limit_usd=limit, period="day")], cache=tokenguard.Cache(url, ttl_s=60))
    client = tokenguard.AsyncOpenAI(
        api_key="sk-test",
        base_url="http://fake-openai.test/v1",
        guard=g,
        http_client=httpx2.AsyncClient(transport=_SlowTransport(fake.transport(async_=True))),
    )

    async def call(i: int, **kw: Any) -> str | None:
        messages = [{"role": "user", "content": f"question {i} " + "word " * 220}]
        try:
            r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, **kw)
        except BudgetExceeded as err:
            return "refused-empty" if err.held_usd == 0 else "refused"
        return str(r.choices[0].message.content)

    first = await call(0, temperature=0)
    again = await call(0, temperature=0)
    assert first == again == "Hello from the fake LLM!"
    assert len(fake.money_requests) == 1
    outcomes = await asyncio.gather(*(call(i) for i in range(1, 9)))
    assert len(fake.money_requests) * ACTUAL <= limit
    for i in range(9, 30):
        if await call(i) == "refused-empty":
            break
    else:
        raise AssertionError("no final refusal")
    served = len(fake.money_requests) * ACTUAL
    assert limit - WORST < served <= limit
    assert "refused" in outcomes  # refused while other calls of the batch were in flight, holding
    [status] = g.budget_status()
    assert (status.spent_usd, status.held_usd) == (served, Decimal(0))
    stats = g.stats()
    assert (stats.cache_hits, stats.spent_usd) == (1, served)
    await client.close()
    g.close()


# -- 10. configuration ----------------------------------------------------------------------------


def test_tokenguard_store_env_selects_the_redis_store(
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, redis_url: str
) -> None:
    """TOKENGUARD_STORE=redis://... makes a guard (and the default guard of a client made without
    one) keep its ledger in that Redis, under its prefix."""
    monkeypatch.setenv("TOKENGUARD_STORE", redis_url)
    g = Guard()
    assert repr(g.store).startswith(f"RedisStore({redis_server.url!r}, prefix={prefix_of(redis_url)!r}")
    g.close()
    fake = FakeLLM()
    client = tokenguard.OpenAI(api_key="sk-test", http_client=httpx2.Client(transport=fake.transport()))
    client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
    default = tokenguard.default_guard()
    default.flush()
    r = raw_client(redis_url)
    assert r.xlen(prefix_of(redis_url) + ":rows") == 1
    r.close()
    default.close()


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ("on_failure=maybe", "on_failure"),
        ("timeout=x", "timeout"),
        ("prefix=a{b}", "prefix"),
        ("rows=10", "rows"),
        ("retry_s=-1", "retry_s"),
        ("days=0", "days"),
        ("cluster=maybe", "cluster"),
    ],
)
def test_a_bad_store_option_is_a_configuration_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, query: str, option: str
) -> None:
    """A bad option in the store URL (given to Guard or through TOKENGUARD_STORE) is a
    ConfigurationError naming the option, and never echoes the URL's password."""
    url = f"redis://:hunter2@127.0.0.1:1/0?{query}"
    with pytest.raises(ConfigurationError) as info:
        Guard(store=url)
    assert not isinstance(info.value, StoreUnavailable)
    assert option in info.value.setting
    assert f"?{option}=" in str(info.value)
    assert "hunter2" not in str(info.value)
    monkeypatch.setenv("TOKENGUARD_STORE", url)
    with pytest.raises(ConfigurationError, match=re.escape(f"?{option}=")):
        Guard()


def test_a_unix_socket_url_reaches_redis(tmp_path: Path) -> None:
    """``unix:///path/redis.sock?db=0`` (with tokenguard's own options after it) opens the store
    over the socket: the path keeps its three slashes when the options are taken out."""
    server = RedisServer()
    socket_path = tmp_path / "redis.sock"
    server.extra = ["--unixsocket", str(socket_path), "--unixsocketperm", "700"]
    server.start()
    try:
        g = priced_guard(f"unix://{socket_path}?db=0&prefix=sock", budgets=[Budget(limit_usd="1", period="day")])
        FakeLLM().openai(guard=g).chat.completions.create(model=MODEL, messages=BIG, max_tokens=MAX_TOKENS)
        [status] = g.budget_status()
        assert status.spent_usd > 0
        assert g.stats().calls == 1
        g.close()
    finally:
        server.stop()


def test_report_reaches_past_the_stream_through_daily_tallies(redis_server: RedisServer) -> None:
    """With ?rows=1000 and 3,000 rows over six days, `tokenguard report` (build_report) gives the
    same groups as over every row — by user, team, model, outcome, day and month — though the
    stream holds a third of them: the older days come from their daily tallies. The CLI says
    so, and that a --since in the middle of such a day takes in the whole day."""
    from click.testing import CliRunner

    from tokenguard._report import build_report
    from tokenguard.cli import main as cli

    url = redis_server.fresh_url(rows="1000")
    store = RedisStore(url)
    start = datetime.now(UTC) - timedelta(days=5)
    rows = [
        LedgerRow(
            ts=start + timedelta(minutes=7 * i),
            vendor="openai",
            endpoint="chat.completions",
            model=f"m{i % 2}",
            scope=MappingProxyType({"user": f"u{i % 3}", "team": f"t{i % 2}"}),
            usage=Usage(input_tokens=100 + i, output_tokens=i % 9),
            cost_usd=None if i % 13 == 0 else Decimal("0.000001234567") * i,
            saved_usd=Decimal("0.00002") if i % 4 == 0 else None,
            outcome="cache_hit" if i % 4 == 0 else ("blocked" if i % 17 == 0 else "ok"),
            error="loop" if i % 4 and i % 17 == 0 else None,
            attempts=0 if i % 4 == 0 else 1 + i % 3,
            estimated=i % 11 == 0,
        )
        for i in range(1000)
    ]
    rows += [
        LedgerRow(
            ts=datetime.now(UTC) - timedelta(seconds=2000 - i),
            vendor="openai",
            endpoint="chat.completions",
            model="m0",
            scope=MappingProxyType({"user": "u9", "team": "t0"}),
            usage=Usage(5, 1),
            cost_usd=Decimal("0.000002"),
        )
        for i in range(2000)
    ]
    reference = MemoryStore()
    for row in rows:
        store.record(row)
        reference.record(row)
    store.flush()
    assert store.summarised_before() is not None  # the stream was trimmed

    def exact(data: Any) -> Any:  # money as Decimal: "0.004" and "0.004000" are the same amount
        if isinstance(data, dict):
            return {k: Decimal(v) if k.endswith("_usd") and v is not None else exact(v) for k, v in data.items()}
        return [exact(v) for v in data] if isinstance(data, list) else data

    for by in (["user"], ["team", "model"], ["outcome"], ["day"], ["month", "user"]):
        got = exact(build_report(store, by=by).as_dict())
        want = exact(build_report(reference, by=by).as_dict())
        assert got["groups"] == want["groups"], by
        assert got["total"] == want["total"], by
        assert got["daily"] == want["daily"], by
    assert len(list(store.rows())) < 1500  # the stream alone could not have said this

    mid_day = (start + timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)
    result = CliRunner().invoke(cli, ["report", "--store", url, "--since", mid_day.isoformat(), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "daily totals" in result.stderr
    assert "count whole" in result.stderr
    store.close()


def test_open_policy_fallback_starts_from_where_the_fleet_stood(own_redis: RedisServer) -> None:
    """on_failure=open: when Redis dies, this process's fallback starts from the spend it last
    saw in Redis (spent plus held), not from zero: $0.80 of a $1 cap spent, Redis killed, a
    $0.30 reservation is refused locally and a $0.10 one is held."""
    store = RedisStore(own_redis.fresh_url(on_failure="open", timeout="0.2"))
    owner = ("host-a", os.getpid())
    t = time.time()

    def claim(usd: str) -> Claim:
        return Claim("seeded|", 0.0, Decimal(usd), 0, Decimal(1), None, True, (), "total")

    first = claim("0.8")
    assert store.reserve([first], owner=owner, expires_at=t + 900, now=t) is None
    store.settle([([first], [claim("0.8")])], owner=owner, now=t)
    assert store.reserve([claim("0.05")], owner=owner, expires_at=t + 900, now=t) is None  # seen: 0.8 + 0.05
    own_redis.kill()
    refused = store.reserve([claim("0.3")], owner=owner, expires_at=t + 900, now=t)
    assert store.degraded
    assert refused is not None
    assert refused.totals.spent_usd == Decimal("0.85")
    assert store.reserve([claim("0.1")], owner=owner, expires_at=t + 900, now=t) is None
    store.close()


def test_an_operation_under_way_when_redis_failed_does_not_end_the_outage(redis_url: str) -> None:
    """Two threads: one's command is under way when another's fails. The slow one succeeding
    proves nothing about Redis now, so the outage goes on (and the settles it owes stay owed
    until an operation begun after the failure succeeds) — ending it early had left those
    settles unreplayed for good."""
    store = RedisStore(redis_url + "&on_failure=open&retry_s=0.2")
    under_way = threading.Event()
    release = threading.Event()

    def slow() -> int:
        under_way.set()
        release.wait(10)
        return 1

    def failing() -> int:
        raise redis.ConnectionError("connection reset")

    slow_call = threading.Thread(target=lambda: store._call("a slow command", slow))
    slow_call.start()
    under_way.wait(10)
    with pytest.raises(StoreUnavailable):
        store._call("a failing command", failing)
    assert store.degraded
    release.set()
    slow_call.join(10)
    assert store.degraded  # still down: the slow command began before the failure
    time.sleep(0.25)  # past retry_s
    assert store._call("a fresh command", lambda: 2) == 2
    assert not store.degraded
    store.close()
