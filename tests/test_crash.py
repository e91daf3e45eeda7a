"""Crashes, corruption and a full disk (issue 10, items 2 and 3).

Real processes, signals and files throughout: children are fresh interpreters
(``sys.executable tests/crash_worker.py``, never a fork of pytest; started together ahead of
their tests, so their seconds of SDK imports overlap) calling the loopback chat server of
tests/chat_server.py through real guarded ``tokenguard.OpenAI`` clients, with a SQLite ledger, a
diskcache directory and a budget on disk.

1. SIGKILL mid-call (three moments: calls in flight; write-behind rows pending; a tight loop of
   cache writes): the ledger passes ``PRAGMA integrity_check`` and reads back whole rows, the
   disk cache opens and answers every call that had returned, the dead process's reservations go
   (at once, as its pid is dead, or after ``budget_hold_s``), and the next guard can reserve the
   whole cap minus what was settled. What SIGKILL loses is measured: the rows of calls that had
   returned but were still queued (docs/architecture.md: "the settles of its last ~20 ms (with
   the ledger's write-behind, ~70 ms)").
2. A corrupt, truncated or read-only cache never fails a call. A corrupt ledger is refused with
   ``StoreUnavailable`` naming the file and the way out, and the file is left byte for byte as it
   was; one whose damage spares its header and schema opens, and then fails loudly.
3. A full disk (``RLIMIT_FSIZE`` in a child, SIGXFSZ ignored so writes fail with EFBIG): cache
   writes fail quietly (one warning), ledger writes fail loudly (ERROR records) and the rows wait
   in memory until the space returns; a budget that cannot be reserved refuses the call; rows
   that never could be written are reported at exit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

import tokenguard
from chat_server import serve_chat
from crash_worker import API_KEY, MAX_TOKENS, MODEL, bulk_body, bulk_key, messages
from tokenguard import Budget, BudgetExceeded, Cache, Guard, StoreUnavailable
from tokenguard._budget import from_nano, to_nano
from tokenguard.providers.openai import CHAT, OpenAIAdapter
from tokenguard.stores import SQLiteStore
from tokenguard.testing import FakeLLM, Reply

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "crash_worker.py"
SRC = TESTS.parent / "src"

PRICE_IN, PRICE_OUT = Decimal("0.000001"), Decimal("0.000004")  # the workers' price for MODEL
ACTUAL = 1000 * PRICE_IN + 200 * PRICE_OUT  # what one answer of the chat server costs: $0.0018
CHILD_CLAIM = from_nano(  # what each of the crash child's calls reserves (ids are fixed width)
    to_nano(OpenAIAdapter().input_bound(CHAT, {"messages": messages("t0-00000")}) * PRICE_IN + MAX_TOKENS * PRICE_OUT)
)
CAP = Decimal(2)  # the crash child's budget: far more than it can spend before it is killed
BUDGET_NAME = "crash-cap"
WRITE_BEHIND_WINDOW_S = 0.07  # docs/architecture.md: a SIGKILL loses the settles of the last ~70 ms
LOSS_WINDOW_CEILING_MS = 250  # what the tests accept: that window plus scheduling slack


# -- children ------------------------------------------------------------------------------------


def child_env(tiktoken_dir: Path) -> dict[str, str]:
    """The environment of a child: tokenguard from src, no real ledger, tiktoken with an empty cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TOKENGUARD_STORE"] = "memory://"
    env["TIKTOKEN_CACHE_DIR"] = str(tiktoken_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pump(stream: Any, into: list[str]) -> None:
    for line in iter(stream.readline, b""):
        into.append(line.decode(errors="replace"))
    stream.close()


class Child:
    """A worker process started ahead (``crash_worker.py --wait``), read through pipes (not files:
    the full-disk child's file-size limit would cut files short)."""

    def __init__(self, prefix: list[str], tiktoken_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(WORKER), "--wait"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(tiktoken_dir),
            cwd=str(tiktoken_dir.parent),
        )
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=_pump, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=_pump, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "READY\n" not in self._out:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"a worker did not start: {self.stderr()[-4000:]}")
            time.sleep(0.01)

    def order(self, mode: str, cfg: dict[str, Any], where: Path) -> None:
        """Run ``mode`` with ``cfg`` (written to a file under ``where``)."""
        self.wait_ready()
        where.mkdir(parents=True, exist_ok=True)
        config = where / f"{mode}.json"
        config.write_text(json.dumps(cfg))
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{mode} {config}\n".encode())
        self.proc.stdin.close()

    def finish(self, timeout: float) -> None:
        """Wait for the process to end, then for its output."""
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for reader in self._readers:
            reader.join(30)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def stdout(self) -> str:
        return "".join(self._out)

    def stderr(self) -> str:
        return "".join(self._err)

    def result(self) -> dict[str, Any]:
        lines = [line for line in self._out if line.startswith("RESULT ")]
        assert lines, f"the child printed no RESULT; stderr:\n{self.stderr()[-4000:]}"
        doc: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
        return doc

    def logs(self) -> list[tuple[str, str]]:
        """Every tokenguard record the child logged, in order: (level, message)."""
        out = []
        for line in self._err:
            if line.startswith("LOG "):
                level, _, message = line[4:].rstrip("\n").partition(" ")
                out.append((level, message))
        return out


def _read_only_prefix(scratch: Path) -> list[str] | None:
    """How to start a child for which chmod 0o500 really makes a directory read-only: as is for a
    normal user; as root (CAP_DAC_OVERRIDE writes anyway) under setpriv without the DAC
    capabilities, if that works here (checked on a scratch directory); else ``None``."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all"]
    locked = scratch / "read-only-probe"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = subprocess.run(
            [*prefix, sys.executable, "-S", "-c", f"open({str(locked / 'x')!r}, 'w')"],
            capture_output=True,
            timeout=30,
        )
    finally:
        locked.chmod(0o700)
    return prefix if b"PermissionError" in probe.stderr else None


class Workers:
    """Every child the module needs, started together at the module's first use (their seconds of
    imports overlap), all ready before any test uses one, so no test is timed against another's
    start-up. "disk" runs the read-only and full-disk phases (as root: under setpriv)."""

    KINDS: tuple[str, ...] = ("crash", "crash", "crash", "disk")

    def __init__(self, tiktoken_dir: Path, scratch: Path) -> None:
        self.read_only_prefix = _read_only_prefix(scratch)
        self.tiktoken_dir = tiktoken_dir
        self.idle: dict[str, list[Child]] = {}
        self.all: list[Child] = []
        for kind in self.KINDS:
            self.idle.setdefault(kind, []).append(self._start(kind))

    def _start(self, kind: str) -> Child:
        child = Child((self.read_only_prefix or []) if kind == "disk" else [], self.tiktoken_dir)
        self.all.append(child)
        return child

    def take(self, kind: str) -> Child:
        for child in self.all:
            child.wait_ready()
        if self.idle.get(kind):
            return self.idle[kind].pop(0)
        return self._start(kind)  # (a test run again, e.g. by a plugin: start one more)

    def stop(self) -> None:
        for child in self.all:
            child.stop()


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    pool = Workers(tmp_path_factory.mktemp("tiktoken-empty"), tmp_path_factory.mktemp("scratch"))
    try:
        yield pool
    finally:
        pool.stop()


# -- helpers -------------------------------------------------------------------------------------


@contextmanager
def serve() -> Iterator[Any]:
    """tests/chat_server.py's server, quiet about the connections a killed child breaks mid-request."""
    with serve_chat() as server:
        server.handle_error = lambda request, client_address: None
        yield server


def ledger_rows(path: Path) -> list[Any]:
    """Every row of a SQLite ledger, read by tokenguard's own store."""
    store = SQLiteStore(path)
    try:
        return list(store.rows())
    finally:
        store.close()


def integrity(path: Path) -> list[tuple[Any, ...]]:
    """``PRAGMA integrity_check`` of a SQLite file, opened with sqlite3 directly."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def priced(guard: Guard) -> Guard:
    guard.register_price(MODEL, input_mtok="1", output_mtok="4")
    return guard


def chat(client: Any, cid: str, **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages(cid), **kw)


def client_on(server: Any, guard: Guard, user: str) -> Any:
    return tokenguard.OpenAI(
        base_url=f"http://127.0.0.1:{server.server_port}/v1",
        api_key=API_KEY,
        guard=guard,
        default_headers={"x-user": user},
    )


def tokenguard_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tokenguard" and r.levelno >= level]


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- 1. SIGKILL mid-call ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Moment:
    """When the child is killed, and what it is doing then."""

    name: str
    delay_s: float  # how long the server keeps each call in flight
    cached: bool  # temperature=0 calls (stored in the disk cache before they return)
    bulk: bool  # a thread also stores large cache entries in a tight loop
    hold_s: float  # the child's budget_hold_s
    kill_after: int  # kill once this many calls have returned ...
    linger_s: float  # ... and this much later
    threads: int = 8


MOMENTS = [
    # every thread's call is inside the server's 0.3 s sleep; the rows of the calls that returned
    # 0.15 s ago have been written; the holds stay until the pid is seen dead
    Moment("calls_in_flight", delay_s=0.3, cached=True, bulk=False, hold_s=3600, kill_after=16, linger_s=0.15),
    # uncached calls finishing ~150 a second: the kill lands while the settle queue (20 ms) and the
    # write-behind buffer (50 ms) hold the last calls; the holds lapse after budget_hold_s=1
    Moment("write_behind_pending", delay_s=0.01, cached=False, bulk=False, hold_s=1.0, kill_after=150, linger_s=0),
    # cached calls back to back, plus 48 KB entries stored in a loop: the kill lands mid cache write
    Moment("cache_write_loop", delay_s=0.0, cached=True, bulk=True, hold_s=3600, kill_after=150, linger_s=0),
]


@dataclass
class Events:
    """What the killed child logged (times are ``time.monotonic()``, comparable across processes)."""

    started: dict[str, float] = field(default_factory=dict)
    done: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    bulk_started: set[int] = field(default_factory=set)
    bulk_done: set[int] = field(default_factory=set)
    pid: int | None = None

    @classmethod
    def read(cls, path: Path) -> Events:
        ev = cls()
        if not path.exists():
            return ev
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) < 2:
                continue  # (a line is one write(2): never torn, but be safe)
            kind = parts[0]
            if kind == "ready":
                ev.pid = int(parts[1])
            elif kind == "start":
                ev.started[parts[1]] = float(parts[-1])
            elif kind == "done":
                assert parts[2] == "ChatCompletion", line
                ev.done[parts[1]] = float(parts[-1])
            elif kind == "fail":
                ev.failed.append(line)
            elif kind == "bulk-start":
                ev.bulk_started.add(int(parts[1]))
            elif kind == "bulk-done":
                ev.bulk_done.add(int(parts[1]))
        return ev


def run_and_kill(moment: Moment, tmp_path: Path, server: Any, workers: Workers) -> tuple[Events, float]:
    """Start the crash child, wait for the moment, SIGKILL it; return its events and the kill time."""
    events = tmp_path / "events.log"
    cfg = {
        "base_url": f"http://127.0.0.1:{server.server_port}/v1",
        "db": str(tmp_path / "ledger.db"),
        "cache": str(tmp_path / "cache"),
        "events": str(events),
        "threads": moment.threads,
        "per_thread": 5000,
        "cached": moment.cached,
        "bulk": moment.bulk,
        "hold_s": moment.hold_s,
        "cap": str(CAP),
    }
    child = workers.take("crash")
    try:
        child.order("crash", cfg, tmp_path / "child")
        deadline = time.monotonic() + 60
        while True:
            text = events.read_text() if events.exists() else ""
            if text.count("\ndone ") >= moment.kill_after:
                break
            if "\nfail " in text or child.proc.poll() is not None or time.monotonic() > deadline:
                child.stop()
                raise AssertionError(f"the child failed or stalled:\n{text[-2000:]}\n{child.stderr()[-4000:]}")
            time.sleep(0.002)
        if moment.linger_s:
            time.sleep(moment.linger_s)
        killed_at = time.monotonic()
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(30)
    finally:
        child.stop()
    assert child.proc.returncode == -signal.SIGKILL
    return Events.read(events), killed_at


def probe_tokens(remaining: Decimal, cid: str) -> tuple[int, int]:
    """``max_tokens`` for a call whose worst case is exactly ``remaining`` or just under (fits), and
    one past it by more than any tighter input count could take back (refused)."""
    bound = OpenAIAdapter().input_bound(CHAT, {"messages": messages(cid)})
    fit = int((remaining - bound * PRICE_IN) / PRICE_OUT)
    assert fit > MAX_TOKENS
    return fit, fit + bound + 1


@pytest.mark.parametrize("moment", MOMENTS, ids=[m.name for m in MOMENTS])
def test_sigkill_mid_call_leaves_ledger_cache_and_budget_consistent(
    moment: Moment, tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: Workers
) -> None:
    """A child making calls in 8 threads (SQLite ledger, disk cache, $2 budget) is SIGKILLed at one
    moment; then: the ledger's integrity_check is ok and every row reads back whole; rows are lost
    only for calls that returned within the write-behind window before the kill; every call that
    returned is a cache hit (the vendor's type) and nothing the child never sent is; the budget's
    settled and held amounts are whole calls; the dead child's holds go (pid path or expiry
    path); a new guard can reserve the cap minus what was settled, and no more; its
    calls work and are recorded."""
    caplog.set_level(logging.WARNING, logger="tokenguard")
    db, cache_dir = tmp_path / "ledger.db", tmp_path / "cache"
    with serve() as server:
        server.delay_s = moment.delay_s
        ev, killed_at = run_and_kill(moment, tmp_path, server, workers)
        server.delay_s = 0.0
        with server.lock:
            answered_by_child = server.answered["child"]
        assert not ev.failed, ev.failed
        assert ev.pid is not None
        started, done = set(ev.started), set(ev.done)
        assert done <= started
        assert len(done) >= moment.kill_after

        # -- the ledger: a valid SQLite file, every row whole --------------------------------------
        assert integrity(db) == [("ok",)]
        rows = ledger_rows(db)
        conn = sqlite3.connect(db)
        try:
            (raw_count,) = conn.execute("SELECT count(*) FROM calls").fetchone()
            (null_money,) = conn.execute("SELECT count(*) FROM calls WHERE cost_usd IS NULL").fetchone()
        finally:
            conn.close()
        assert raw_count == len(rows)
        assert null_money == 0
        recorded: set[str] = set()
        for row in rows:
            assert (row.vendor, row.endpoint, row.model, row.outcome, row.error) == (
                "openai",
                "chat.completions",
                MODEL,
                "ok",
                None,
            ), row
            assert (row.usage.input_tokens, row.usage.output_tokens, row.cost_usd, row.estimated) == (
                1000,
                200,
                ACTUAL,
                False,
            ), row
            assert set(row.scope) == {"call"}, row
            assert row.scope["call"] not in recorded, f"row written twice: {row}"
            recorded.add(row.scope["call"])
        assert recorded <= started, recorded - started  # no row for a call that never began

        # -- what SIGKILL lost: rows of calls that had returned but were still queued --------------
        lost = done - recorded
        ages_ms = sorted(round((killed_at - ev.done[c]) * 1000, 1) for c in lost)
        recent = sum(1 for c in done if killed_at - ev.done[c] <= WRITE_BEHIND_WINDOW_S)
        print(
            f"\n[{moment.name}] started={len(started)} returned={len(done)} rows={len(rows)} "
            f"lost={len(lost)} (returned within {WRITE_BEHIND_WINDOW_S * 1000:.0f} ms of the kill: {recent}) "
            f"lost_ages_ms={ages_ms[:5]}..{ages_ms[-3:]} in_flight={len(started - done)} "
            f"answered_by_server={answered_by_child}"
        )
        assert len(rows) > 0
        # docs: ~70 ms (20 ms settle queue + 50 ms write-behind). Measured on 2 busy cores: up to
        # ~60 ms, and once 88 ms with the bulk writer competing for the GIL and the SQLite writer
        # lock; the assertion allows that much again for a slower CI machine
        assert not ages_ms or ages_ms[-1] <= LOSS_WINDOW_CEILING_MS, f"rows lost for calls long returned: {ages_ms}"
        assert len(lost) <= sum(1 for c in done if killed_at - ev.done[c] <= LOSS_WINDOW_CEILING_MS / 1000)

        # -- the budget: whole settles, whole holds -------------------------------------------------
        guard = priced(
            Guard(
                store=f"sqlite:///{db}",
                cache=Cache(path=cache_dir),
                budgets=[Budget(limit_usd=CAP, period="total", name=BUDGET_NAME)],
                budget_hold_s=3600,
                retry=False,
            )
        )
        client = client_on(server, guard, "after")
        try:
            [status] = guard.budget_status()
            settled, held = status.spent_usd, status.held_usd
            settled_calls, rest = divmod(settled, ACTUAL)
            held_calls, held_rest = divmod(held, CHILD_CLAIM)
            print(
                f"[{moment.name}] budget after the kill: settled={settled} ({settled_calls} calls) "
                f"held={held} ({held_calls} holds)"
            )
            assert rest == 0, settled
            assert held_rest == 0, held
            assert settled_calls + held_calls <= len(started)
            assert settled_calls <= answered_by_child
            # a call's budget settle is queued (~20 ms), a cached call's too (its answer is stored
            # before it returns): the settles still queued at the kill are lost, never doubled
            assert settled_calls >= len(rows)
            if moment.delay_s > 0:  # every thread was inside a call when the kill came
                assert held_calls >= 1, "the kill found no call holding a reservation: the moment was missed"

            # -- the dead child's holds go ---------------------------------------------------------
            if moment.hold_s < 60:
                # expiry path: no refusal has happened, so nothing has looked at the pid; the
                # lapsed lease alone drops the holds (budget_status() sweeps expired holds)
                time.sleep(max(0.0, killed_at + moment.hold_s + 0.3 - time.monotonic()))
                [status] = guard.budget_status()
                assert (status.spent_usd, status.held_usd) == (settled, Decimal(0))
                conn = sqlite3.connect(db)
                try:
                    left = conn.execute("SELECT count(*) FROM budget_holders WHERE pid = ?", (ev.pid,)).fetchone()
                finally:
                    conn.close()
                assert left == (0,)  # swept as expired, before any refusal could look at the pid
            else:
                # pid path: the lease (1 h) is still good, so the holds are still there...
                [status] = guard.budget_status()
                assert status.held_usd == held
            remaining = CAP - settled
            fit, over = probe_tokens(remaining, "probe-000")
            with tokenguard.scope(phase="after", call="probe-over"), pytest.raises(BudgetExceeded) as info:
                chat(client, "probe-000", max_tokens=over, temperature=0.5)
            # ... until this refusal finds the pid dead and drops them: nothing is held any more
            assert (info.value.spent_usd, info.value.held_usd) == (settled, Decimal(0))
            with tokenguard.scope(phase="after", call="probe-fit"):
                answer = chat(client, "probe-000", max_tokens=fit, temperature=0.5)
            assert isinstance(answer, openai.types.chat.ChatCompletion)
            [status] = guard.budget_status()
            assert (status.spent_usd, status.held_usd) == (settled + ACTUAL, Decimal(0))
            conn = sqlite3.connect(db)
            try:
                owners = conn.execute("SELECT DISTINCT pid FROM budget_holders WHERE nusd > 0").fetchall()
            finally:
                conn.close()
            assert (ev.pid,) not in owners

            # -- the disk cache: opens, answers what was stored, nothing else ------------------------
            assert integrity(cache_dir / "cache.db") == [("ok",)]
            probes = 2  # the two budget probes
            hits: set[str] = set()
            never_started = [f"t0-{n:05d}" for n in range(4000, 4003)]
            if moment.cached:
                for cid in sorted(started) + never_started:
                    with server.lock:
                        before = server.answered["after"]
                    with tokenguard.scope(phase="after", call=cid):
                        answer = chat(client, cid, max_tokens=MAX_TOKENS, temperature=0)
                    probes += 1
                    assert isinstance(answer, openai.types.chat.ChatCompletion)
                    assert answer.choices[0].message.content == "ok"
                    with server.lock:
                        if server.answered["after"] == before:
                            hits.add(cid)
                print(f"[{moment.name}] cache hits after the kill: {len(hits)} of {len(started)} started")
                assert done <= hits, sorted(done - hits)[:10]  # every returned call was stored
                assert hits <= started  # nothing the child never asked for
            if moment.bulk:
                cache = guard.cache
                assert cache is not None
                for i in sorted(ev.bulk_started):
                    entry = cache.lookup(bulk_key(i))
                    if i in ev.bulk_done:
                        assert entry is not None, i
                    if entry is not None:
                        assert entry.body == bulk_body(i), i
                print(f"[{moment.name}] bulk entries: {len(ev.bulk_done)} stored, {len(ev.bulk_started)} begun")
                assert ev.bulk_done
            cache_trouble = [m for m in tokenguard_records(caplog, logging.WARNING) if "cache" in m]
            assert not cache_trouble  # (the refused probe's "blocked" alert is the only warning)

            # -- the next guard's calls are recorded --------------------------------------------------
            after = list(guard.store.rows(scope={"phase": "after"}))
            assert len(after) == probes
            outcomes = sorted(r.outcome for r in after)
            assert outcomes.count("blocked") == 1
            assert outcomes.count("cache_hit") == len(hits)
            assert guard.stats().calls == len(rows) + probes
        finally:
            client.close()
            guard.close()
    assert integrity(db) == [("ok",)]


# -- 2. a corrupt, truncated or read-only cache ------------------------------------------------------


def _garbage_over_every_file(cache_dir: Path) -> None:
    for path in cache_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(os.urandom(max(path.stat().st_size, 512)))


def _garbage_over_header(cache_dir: Path) -> None:
    db = cache_dir / "cache.db"
    data = bytearray(db.read_bytes())
    data[:100] = os.urandom(100)
    db.write_bytes(bytes(data))


def _garbage_over_data_pages(cache_dir: Path) -> None:
    db = cache_dir / "cache.db"
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    data[page:] = os.urandom(len(data) - page)  # the first page (schema) stays readable
    db.write_bytes(bytes(data))


def _truncated_to_half(cache_dir: Path) -> None:
    db = cache_dir / "cache.db"
    os.truncate(db, db.stat().st_size // 2)


def _truncated_to_50_bytes(cache_dir: Path) -> None:
    os.truncate(cache_dir / "cache.db", 50)


CACHE_DAMAGE = {
    "garbage_over_every_file": _garbage_over_every_file,
    "garbage_over_header": _garbage_over_header,
    "garbage_over_data_pages": _garbage_over_data_pages,
    "truncated_to_half": _truncated_to_half,
    "truncated_to_50_bytes": _truncated_to_50_bytes,
}
CACHED_CALLS = [f"c{i}-000" for i in range(4)]


def populate_cache(server: Any, cache_dir: Path) -> None:
    """Store CACHED_CALLS in a disk cache through a real guarded client, and check they hit."""
    guard = priced(Guard(store="memory://", cache=Cache(path=cache_dir), retry=False))
    client = client_on(server, guard, "populate")
    try:
        for _ in range(2):
            for cid in CACHED_CALLS:
                chat(client, cid, temperature=0)
        with server.lock:
            assert server.answered["populate"] == len(CACHED_CALLS)  # the second round hit
    finally:
        client.close()
        guard.close()  # diskcache checkpoints its WAL into cache.db


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_corrupt_disk_cache_sends_calls_to_the_provider_with_a_warning(
    damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk cache damaged on disk (garbage over its files, its header or its data pages; cut
    short): a new guard on it answers every call (sent to the provider, the vendor's type), no
    exception reaches the caller, and a tokenguard warning says so (once per kind of problem; no
    error-level records)."""
    cache_dir = tmp_path / "cache"
    with serve() as server:
        populate_cache(server, cache_dir)
        wal = cache_dir / "cache.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0  # every entry is in cache.db itself
        CACHE_DAMAGE[damage](cache_dir)
        caplog.set_level(logging.WARNING, logger="tokenguard")
        guard = priced(Guard(store="memory://", cache=Cache(path=cache_dir), retry=False))
        client = client_on(server, guard, "after")
        try:
            for round_ in range(2):
                for cid in CACHED_CALLS:
                    answer = chat(client, cid, temperature=0)
                    assert isinstance(answer, openai.types.chat.ChatCompletion)
                    assert answer.choices[0].message.content == "ok"
                if round_ == 0:
                    with server.lock:
                        assert server.answered["after"] == len(CACHED_CALLS)  # no entry was served
            stats = guard.stats()
        finally:
            client.close()
            guard.close()
    assert stats.calls == 2 * len(CACHED_CALLS)
    warnings = tokenguard_records(caplog, logging.WARNING)
    assert warnings, "a damaged cache was not reported"
    assert all("cache" in w for w in warnings), warnings
    assert len(warnings) <= 3, warnings  # logged once per kind, not once per call
    assert not tokenguard_records(caplog, logging.ERROR)


def test_cache_clear_repairs_a_corrupt_cache_or_says_it_cannot(tmp_path: Path) -> None:
    """The documented way to empty the cache, run on a corrupt one, either leaves a working cache
    (the next repeat is a hit) or fails saying so; it does not report success over a broken cache."""
    from click.testing import CliRunner

    from tokenguard.cli import main

    cache_dir = tmp_path / "cache"
    with serve() as server:
        populate_cache(server, cache_dir)
        _garbage_over_header(cache_dir)
        result = CliRunner().invoke(main, ["cache", "clear", "--yes", "--path", str(cache_dir)])
        if result.exit_code != 0:
            return  # it said it could not: fine
        guard = priced(Guard(store="memory://", cache=Cache(path=cache_dir), retry=False))
        client = client_on(server, guard, "after-clear")
        try:
            for _ in range(2):
                chat(client, CACHED_CALLS[0], temperature=0)
            with server.lock:
                sent = server.answered["after-clear"]
        finally:
            client.close()
            guard.close()
    assert sent == 1, f"`tokenguard cache clear` said {result.output!r}, and the cache still cannot be used"


def _chmod_tree(root: Path, dirs: int, files: int) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(dirs if path.is_dir() else files)


def test_read_only_cache_directory_never_fails_a_call(disk_run: DiskRun) -> None:
    """A populated cache directory made read-only (0o500 directories, 0o400 files) for a fresh
    process: every call succeeds with the vendor's type, a warning names the cache, and the cache's
    files are byte for byte unchanged. As root, chmod alone stops nothing (CAP_DAC_OVERRIDE), so the
    child runs under ``setpriv`` without the DAC capabilities; the child proves the directory is
    read-only with a probe write before it calls."""
    doc = disk_run.doc["readonly"]
    if doc["writable"]:
        pytest.skip(f"no way to make a directory read-only for the child here: {doc['why']}")
    assert doc["errors"] == []
    assert [a[1:] for a in doc["answers"]] == [["ChatCompletion", "ok"]] * len(READ_ONLY_CALLS)
    warnings = [message for level, message in doc["logs"] if level == "WARNING"]
    assert any("cache" in w for w in warnings), doc["logs"]
    assert len(doc["logs"]) <= 2, doc["logs"]
    assert disk_run.read_only_after == disk_run.read_only_before  # nothing written, nothing cut
    sent = disk_run.answered.get("readonly", 0)
    print(f"\n[read-only cache] {sent} of {len(doc['answers'])} calls went to the provider; logs: {doc['logs']}")
    assert len(READ_ONLY_CALLS) - len(CACHED_CALLS) <= sent <= len(READ_ONLY_CALLS)


# -- 3. a corrupt ledger ----------------------------------------------------------------------------


def build_ledger(db: Path) -> None:
    """A real ledger: calls under a budget through a guarded client (rows, spend, holder rows).
    (FakeLLM's in-process transport: the loopback server's ~40 ms a call would make this slow.)"""
    guard = priced(Guard(store=f"sqlite:///{db}", budgets=[Budget(limit_usd=1, period="total", name="c")], retry=False))
    client = FakeLLM(Reply(text="ok", input_tokens=1000, output_tokens=200)).openai(guard=guard)
    try:
        for i in range(40):
            with tokenguard.scope(user=f"u{i % 3}"):
                chat(client, f"b{i:02d}-000", max_tokens=MAX_TOKENS)
    finally:
        client.close()
        guard.close()
    assert integrity(db) == [("ok",)]
    assert len(ledger_rows(db)) == 40
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0


def _ledger_garbage_over_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:100] = os.urandom(100)
    db.write_bytes(bytes(data))


def _ledger_truncated_to_half(db: Path) -> None:
    os.truncate(db, db.stat().st_size // 2)


def _ledger_truncated_to_50_bytes(db: Path) -> None:
    os.truncate(db, 50)


def _ledger_not_sqlite(db: Path) -> None:
    db.write_text(json.dumps({"calls": [{"model": MODEL, "cost_usd": "0.0018"}] * 50}, indent=2))


LEDGER_DAMAGE = {
    "garbage_over_header": _ledger_garbage_over_header,
    "truncated_to_half": _ledger_truncated_to_half,
    "truncated_to_50_bytes": _ledger_truncated_to_50_bytes,
    "not_sqlite": _ledger_not_sqlite,
}


@pytest.fixture
def damaged_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, bytes]:
    db = tmp_path / "ledger" / "ledger.db"
    db.parent.mkdir()
    build_ledger(db)
    LEDGER_DAMAGE[request.param](db)
    return db, db.read_bytes()


@pytest.mark.parametrize("damaged_ledger", list(LEDGER_DAMAGE), indirect=True)
def test_corrupt_ledger_is_refused_naming_the_file_and_left_untouched(
    damaged_ledger: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged ledger (garbage over the header, cut short, not SQLite at all): opening a guard on
    it, by store= or by TOKENGUARD_STORE, or the store itself, raises StoreUnavailable (a
    ConfigurationError naming "store") whose message names the file; the file is not replaced,
    truncated or touched."""
    db, before = damaged_ledger
    opens = [
        lambda: Guard(store=f"sqlite:///{db}"),
        lambda: Guard(store=f"sqlite:///{db}", budgets=[Budget(limit_usd=1, period="total", name="c")]),
        lambda: SQLiteStore(db),
    ]
    for open_ in opens:
        with pytest.raises(StoreUnavailable) as info:
            open_()
        assert isinstance(info.value, tokenguard.ConfigurationError)
        assert info.value.setting == "store"
        assert str(db) in str(info.value)
        assert db.read_bytes() == before
    monkeypatch.setenv("TOKENGUARD_STORE", f"sqlite:///{db}")
    with pytest.raises(StoreUnavailable, match=re.escape(str(db))):
        Guard()
    assert db.read_bytes() == before
    leftover_wal = Path(f"{db}-wal")
    assert not leftover_wal.exists() or leftover_wal.stat().st_size == 0  # nothing was written beside it


@pytest.mark.parametrize("damaged_ledger", ["garbage_over_header", "truncated_to_half"], indirect=True)
def test_corrupt_ledger_error_says_how_to_recover(damaged_ledger: tuple[Path, bytes]) -> None:
    """The error for a corrupt ledger tells the user what to do about it (move / recover / restore
    the file ...) and names the document that explains how."""
    db, _ = damaged_ledger
    with pytest.raises(StoreUnavailable) as info:
        Guard(store=f"sqlite:///{db}")
    message = str(info.value)
    assert re.search(r"\b(move|rename|restore|recover|copy|replace)\b", message, re.I), message
    assert re.search(r"docs/[\w.-]+\.md", message), message


@pytest.mark.parametrize("damaged_ledger", ["garbage_over_header"], indirect=True)
def test_corrupt_ledger_error_points_to_a_doc_that_exists(damaged_ledger: tuple[Path, bytes]) -> None:
    """The document (and section) the recovery hint names is there to read."""
    db, _ = damaged_ledger
    with pytest.raises(StoreUnavailable) as info:
        Guard(store=f"sqlite:///{db}")
    found = re.search(r"(docs/[\w.-]+\.md), \"([^\"]+)\"", str(info.value))
    assert found, str(info.value)
    doc = TESTS.parent / found.group(1)
    assert doc.is_file(), doc
    assert re.search(rf"^#+ .*{re.escape(found.group(2))}", doc.read_text(), re.I | re.M), found.group(2)


def test_ledger_with_a_damaged_table_is_refused_or_fails_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger whose header and schema are intact but whose ``calls`` table's root page is garbage:
    either opening it is refused (StoreUnavailable naming the file), or the guard opens and nothing
    is lost silently: calls still succeed, every write of their rows fails with an ERROR naming the
    file, ``flush()`` raises StoreUnavailable naming it, and the rows stay queued in memory. Either
    way the file is left untouched."""
    db = tmp_path / "ledger" / "ledger.db"
    db.parent.mkdir()
    build_ledger(db)
    conn = sqlite3.connect(db)
    try:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'calls'").fetchone()
        (page,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    with db.open("r+b") as f:
        f.seek((root - 1) * page)
        f.write(os.urandom(page))
    before = db.read_bytes()
    caplog.set_level(logging.WARNING, logger="tokenguard")
    with serve() as server:
        try:
            guard = priced(Guard(store=f"sqlite:///{db}", retry=False))
        except StoreUnavailable as err:  # refused at open: as good as it gets
            refusal = str(err)
        else:
            refusal = None
        if refusal is not None:
            print(f"\n[damaged calls table] refused at open: {refusal}")
            assert str(db) in refusal
            assert db.read_bytes() == before
            return
        print("\n[damaged calls table] opened; the failures come at the first write")
        store: Any = guard.store
        client = client_on(server, guard, "after")
        try:
            for i in range(3):
                answer = chat(client, f"p{i}-000", max_tokens=MAX_TOKENS)
                assert isinstance(answer, openai.types.chat.ChatCompletion)
            with server.lock:
                assert server.answered["after"] == 3
            time.sleep(0.3)  # the write-behind thread tries (and fails) at least once
            with pytest.raises(StoreUnavailable, match=re.escape(str(db))):
                guard.flush()
            assert store.queued == 3  # kept in memory, not dropped
            errors = tokenguard_records(caplog, logging.ERROR)
            assert errors
            assert all("ledger write failed" in e and str(db) in e for e in errors), errors
        finally:
            client.close()
            store._queue.clear()  # (these rows cannot be written: keep them out of a later test's log)
            guard.close()
    assert db.read_bytes() == before


# -- 4. a full disk ----------------------------------------------------------------------------------

FSIZE_LIMIT = 1024  # bytes: every SQLite file of the child is past it, so each append fails


READ_ONLY_CALLS = [*CACHED_CALLS, "n0-000", "n1-000"]


@dataclass
class DiskRun:
    """What the "disk" child did: its RESULT, what the server answered per phase (by x-user), its
    directory, and the read-only cache directory's files before and after."""

    child: Child
    doc: dict[str, Any]
    answered: dict[str, int]
    root: Path
    read_only_before: dict[str, bytes]
    read_only_after: dict[str, bytes]


@pytest.fixture(scope="module")
def disk_run(tmp_path_factory: pytest.TempPathFactory, workers: Workers) -> DiskRun:
    """One child runs the read-only cache phase and every full-disk phase (a cold interpreter costs
    seconds); the tests below each check one phase."""
    root = tmp_path_factory.mktemp("disk")
    read_only = root / "read-only-cache"
    with serve() as server:
        populate_cache(server, read_only)
        before = files_of(read_only)
        base_url = f"http://127.0.0.1:{server.server_port}/v1"
        cfg = {
            "base_url": base_url,
            "dir": str(root),
            "limit": FSIZE_LIMIT,
            "readonly": {"base_url": base_url, "cache": str(read_only), "calls": READ_ONLY_CALLS},
        }
        child = workers.take("disk")
        _chmod_tree(read_only, 0o500, 0o400)
        try:
            child.order("fulldisk", cfg, root / "child")
            child.finish(120)
        finally:
            _chmod_tree(read_only, 0o700, 0o600)
        with server.lock:
            answered = dict(server.answered)
    assert child.proc.returncode == 0, child.stderr()[-4000:]
    return DiskRun(child, child.result(), answered, root, before, files_of(read_only))


def _ok(calls: list[list[Any]]) -> bool:
    return all(c[1:] == ["ok", "ChatCompletion", "ok"] for c in calls)


def test_full_disk_cache_only_never_fails_a_call(disk_run: DiskRun) -> None:
    """Cache on a full disk, ledger in memory: every call succeeds; the cache write failure is one
    warning; answers that could not be stored are fetched again, those stored before still hit."""
    doc, answered = disk_run.doc, disk_run.answered
    phase = doc["cache_only"]
    assert _ok(phase["warm"]), phase
    assert _ok(phase["during"]), phase
    warnings = [m for level, m in phase["logs"] if level == "WARNING"]
    assert len(warnings) == 1, phase["logs"]
    assert "could not be stored in the cache" in warnings[0]
    assert not [m for level, m in phase["logs"] if level == "ERROR"]
    # 3 warm calls stored; 5 new calls twice each, none stored; the 3 warm ones again: hits
    assert answered["cache-only"] == 3 + 10


def test_full_disk_ledger_rows_wait_in_memory_until_space_returns(disk_run: DiskRun) -> None:
    """Ledger and cache on a full disk: every call succeeds; each failed ledger write is an ERROR
    naming the file; flush() raises StoreUnavailable; the rows wait in memory; when the space
    returns, close() writes them all: the ledger has one whole row per call and passes its
    integrity check."""
    doc, answered, root = disk_run.doc, disk_run.answered, disk_run.root
    phase = doc["ledger"]
    db = root / "ledger.db"
    assert _ok(phase["warm"]), phase
    assert _ok(phase["during"]), phase
    errors = [m for level, m in phase["logs"] if level == "ERROR"]
    assert errors, phase["logs"]
    assert all("ledger write failed" in e and str(db) in e for e in errors), errors
    assert str(phase["flush_error"]).startswith("StoreUnavailable")
    assert str(db) in phase["flush_error"]
    calls = len(phase["warm"]) + len(phase["during"])
    assert phase["queued"] >= len(phase["during"]) - 3  # (a few may have been written before the limit)
    assert phase["close_error"] is None
    print(f"\n[full disk] ledger rows queued in memory while full: {phase['queued']} of {calls}")
    assert integrity(db) == [("ok",)]
    rows = ledger_rows(db)
    assert len(rows) == calls
    assert sorted(r.outcome for r in rows) == ["cache_hit"] * 3 + ["ok"] * (calls - 3)
    assert answered["ledger"] == calls - 3


def test_full_disk_under_a_budget_refuses_calls_without_sending_them(disk_run: DiskRun) -> None:
    """A budget on a full disk cannot be reserved: calls under it raise StoreUnavailable naming the
    ledger and nothing is sent; when the space returns calls go through, and the budget holds
    nothing it should not."""
    doc, answered, root = disk_run.doc, disk_run.answered, disk_run.root
    phase = doc["budget"]
    db = root / "budget.db"
    assert _ok(phase["warm"]), phase
    assert _ok(phase["after"]), phase
    for _cid, outcome, kind, message in phase["during"]:
        assert (outcome, kind) == ("error", "StoreUnavailable")
        assert str(db) in message
    assert answered["budget"] == len(phase["warm"]) + len(phase["after"])  # nothing sent while full
    guard = priced(Guard(store=f"sqlite:///{db}", budgets=[Budget(limit_usd=10, period="total", name="full-disk-cap")]))
    try:
        [status] = guard.budget_status()
        rows = list(guard.store.rows())
    finally:
        guard.close()
    assert (status.spent_usd, status.held_usd) == (3 * ACTUAL, Decimal(0))
    assert [r.outcome for r in rows] == ["ok"] * 3  # the refused calls left no row (nothing was sent)


def _exit_reports(child: Child) -> tuple[list[str], int]:
    """The ERROR records about rows not written at exit, and the rows they add up to."""
    errors = [m for level, m in child.logs() if level == "ERROR" and "could not be written" in m]
    return errors, sum(int(re.search(r"(\d+) ledger row", m).group(1)) for m in errors)  # type: ignore[union-attr]


def test_full_disk_at_exit_reports_the_rows_it_could_not_write(disk_run: DiskRun) -> None:
    """The process exits while the disk is still full (its last calls' settles still queued): the
    rows it could not write are not dropped silently: ERROR records at exit name the ledger and
    account for at least every row the ledger is missing."""
    child, doc, answered, root = disk_run.child, disk_run.doc, disk_run.answered, disk_run.root
    phase = doc["exit"]
    db = root / "exit.db"
    assert _ok(phase["warm"]), phase
    assert _ok(phase["during"]), phase
    assert answered["exit"] == len(phase["warm"]) + len(phase["during"])
    errors, reported = _exit_reports(child)
    print(f"\n[full disk] at exit: {errors}")
    rows = ledger_rows(db)
    assert len(rows) == len(phase["warm"])  # the rows of the calls made while full are lost ...
    assert reported >= len(phase["during"]), errors  # ... but not silently
    assert any(str(db) in e for e in errors), errors


def test_full_disk_at_exit_reports_each_lost_row_once(disk_run: DiskRun) -> None:
    """The exit-time ERROR records add up to exactly the rows the ledger is missing."""
    child, doc = disk_run.child, disk_run.doc
    errors, reported = _exit_reports(child)
    assert reported == len(doc["exit"]["during"]), errors
