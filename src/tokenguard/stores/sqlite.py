"""``sqlite:///path``: the default ledger, an embedded SQLite file in WAL mode.

Safe across threads (one connection per store, behind a lock) and across processes
(WAL, a 30 s busy timeout, and a fresh connection after ``fork``). Money is stored as
exact decimal text and summed by a ``Decimal`` SQL aggregate, never as float.

Writes are **write-behind** by default: ``record()`` queues the row and a background
thread commits queued rows in one transaction at most ``write_behind_s`` (50 ms) later,
so a call pays microseconds, not a commit. Every read through the store, ``flush()``,
``close()``, interpreter exit and multiprocessing worker exit write the queue first, so
this process always reads its own rows; other processes see them within
``write_behind_s``. A process killed with SIGKILL loses at most that window.
``write_behind_s=0`` commits every row before ``record()`` returns.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing.util
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from .._budget import Claim, Fired, Refusal, Totals, crossed, fits
from .._errors import ConfigurationError, StoreUnavailable
from .._ledger import LedgerRow, Stats
from .._usage import Usage

__all__ = ["SQLiteStore", "money_text"]

log = logging.getLogger("tokenguard")
_MAX_QUEUE = 2000  # past this many queued rows, record() commits them itself

_SCHEMA_VERSION: Final = 2
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    vendor TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    scope TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cache_write_1h_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost_usd TEXT,
    saved_usd TEXT,
    estimated INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT,
    attempts INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    stream INTEGER NOT NULL,
    request_id TEXT
);
CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts);
CREATE TABLE IF NOT EXISTS budget_spend (
    key TEXT NOT NULL,
    period_start REAL NOT NULL,
    usd TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (key, period_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_holds (
    hold_id TEXT NOT NULL,
    key TEXT NOT NULL,
    period_start REAL NOT NULL,
    usd TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    PRIMARY KEY (hold_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS budget_holds_key ON budget_holds (key, period_start);
CREATE TABLE IF NOT EXISTS budget_alerts (
    key TEXT NOT NULL,
    period_start REAL NOT NULL,
    threshold REAL NOT NULL,
    PRIMARY KEY (key, period_start, threshold)
) WITHOUT ROWID;
"""
_COLUMNS: Final = (
    "ts, vendor, endpoint, model, scope, input_tokens, output_tokens, cache_read_tokens, "
    "cache_write_tokens, cache_write_1h_tokens, reasoning_tokens, cost_usd, saved_usd, estimated, "
    "outcome, error, attempts, latency_s, stream, request_id"
)
_INSERT: Final = f"INSERT INTO calls ({_COLUMNS}) VALUES ({', '.join('?' * 20)})"


def money_text(value: Decimal | None) -> str | None:
    """Exact decimal text for a USD amount (no exponent), or ``None``."""
    if value is None:
        return None
    return format(value, "f")


def _values(row: LedgerRow) -> tuple[Any, ...]:
    u = row.usage
    return (
        row.ts.timestamp(),
        row.vendor,
        row.endpoint,
        row.model,
        json.dumps(dict(row.scope), sort_keys=True, separators=(",", ":")),
        u.input_tokens,
        u.output_tokens,
        u.cache_read_tokens,
        u.cache_write_tokens,
        u.cache_write_1h_tokens,
        u.reasoning_tokens,
        money_text(row.cost_usd),
        money_text(row.saved_usd),
        int(row.estimated),
        row.outcome,
        row.error,
        row.attempts,
        row.latency_s,
        int(row.stream),
        row.request_id,
    )


def _writer_loop(ref: weakref.ref[SQLiteStore]) -> None:
    """Commit queued rows in batches until the store is closed or collected.

    Holds the store only while flushing, so a store dropped without ``close()`` can be
    collected (its finalizer then writes what was still queued).
    """
    store = ref()
    if store is None:
        return
    cond, queue, delay = store._cond, store._queue, store.write_behind_s
    del store
    while True:
        with cond:
            while not queue:
                cond.wait(1.0)
                alive = ref()
                if alive is None or alive._closed:
                    return
                del alive
        time.sleep(delay)  # let rows gather into one transaction
        store = ref()
        if store is None:
            return
        try:
            store.flush()
        except StoreUnavailable as err:
            log.error("tokenguard: ledger write failed; rows stay queued and are retried: %s", err)
            time.sleep(1.0)
        del store


_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


def _write_leftovers(path: Path, queue: list[LedgerRow]) -> None:
    """Write the rows a store still had queued when it was dropped without ``close()``."""
    if not queue:
        return
    rows = queue[:]
    queue.clear()
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, [_values(row) for row in rows])
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as err:
        log.error("tokenguard: %d ledger row(s) of a dropped store could not be written: %s", len(rows), err)


def _flush_all() -> None:
    """Write every store's queue (at exit)."""
    for store in list(_stores):
        if store._pid != os.getpid():
            continue
        try:
            store.flush()
        except Exception as err:  # exit must go on
            log.error("tokenguard: %d ledger row(s) could not be written at exit: %s", store.queued, err)


class _ExitHook:
    """Registers ``_flush_all`` with multiprocessing, whose workers leave through ``os._exit``
    (skipping atexit) but run its finalizers; a forked worker re-registers after its fork."""

    def register(self) -> None:
        multiprocessing.util.Finalize(None, _flush_all, exitpriority=10)
        multiprocessing.util.register_after_fork(self, _ExitHook.register)


_exit_hook = _ExitHook()
_exit_hook.register()
atexit.register(_flush_all)


def _after_fork_in_child() -> None:
    for store in list(_stores):
        # rows queued in the parent are the parent's to write
        store._reset_after_fork()
        store._conn = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class _DecimalSum:
    """SQL aggregate ``tg_dsum(text)``: the exact ``Decimal`` sum as text (NULL over no rows: coalesce it)."""

    def __init__(self) -> None:
        self.total = Decimal(0)

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total += Decimal(value)

    def finalize(self) -> str:
        return money_text(self.total) or "0"


def _where(since: datetime | None, until: datetime | None, scope: Mapping[str, str] | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since.timestamp())
    if until is not None:
        clauses.append("ts < ?")
        params.append(until.timestamp())
    for name, value in (scope or {}).items():
        clauses.append("json_extract(scope, ?) = ?")
        params.extend((f'$."{name}"', value))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class SQLiteStore:
    """The ledger in one SQLite file (created, with its directory, on first use)."""

    def __init__(self, path: str | os.PathLike[str], *, write_behind_s: float = 0.05) -> None:
        # absolute: a process that forks and changes directory must reopen the same file
        self.path = Path(path).expanduser().absolute()
        self.url = f"sqlite:///{self.path}"
        if (
            isinstance(write_behind_s, bool)
            or not isinstance(write_behind_s, int | float)
            or not (0 <= write_behind_s <= 60)
        ):
            raise ConfigurationError("write_behind_s", write_behind_s, "must be between 0 and 60 seconds")
        self.write_behind_s = float(write_behind_s)
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        # one list object for the store's life (mutated in place), so the finalizer below
        # can write what a store dropped without close() still had queued
        self._queue: list[LedgerRow] = []
        self._reset_after_fork()
        self._connect()
        _stores.add(self)
        weakref.finalize(self, _write_leftovers, self.path, self._queue)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # guards the connection
        self._flush_lock = threading.Lock()  # one batch at a time
        self._cond = threading.Condition()  # guards the queue
        self._queue.clear()
        self._writer: threading.Thread | None = None
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # created private from the start (not chmod-ed after): the ledger names users and spend
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise StoreUnavailable(
                    "store", self.url, f"written by a newer tokenguard (schema {version} > {_SCHEMA_VERSION})"
                )
            if version < _SCHEMA_VERSION:
                conn.executescript(_SCHEMA + f"PRAGMA user_version={_SCHEMA_VERSION};")
            conn.create_aggregate("tg_dsum", 1, _DecimalSum)  # type: ignore[arg-type]  # step/finalize duck-typed
        except (sqlite3.Error, OSError) as err:
            if conn is not None:
                conn.close()
            raise StoreUnavailable("store", self.url, f"cannot open the SQLite ledger: {err}") from err
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        self._pid = os.getpid()
        return conn

    def _connection(self) -> sqlite3.Connection:
        # a forked child must not share the parent's connection
        if self._conn is None or self._pid != os.getpid():
            return self._connect()
        return self._conn

    def record(self, row: LedgerRow) -> None:
        """Queue one row for the writer thread (or commit it now when ``write_behind_s=0``)."""
        if self.write_behind_s <= 0:
            self._commit([row])
            return
        with self._cond:
            self._queue.append(row)
            backlog = len(self._queue)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=_writer_loop, args=(weakref.ref(self),), name="tokenguard-ledger-writer", daemon=True
                )
                self._writer.start()
            if backlog == 1:
                self._cond.notify()
        if backlog >= _MAX_QUEUE:
            self.flush()

    def flush(self) -> None:
        """Commit every queued row now (raises ``StoreUnavailable`` if that fails; the rows stay queued)."""
        with self._flush_lock:
            with self._cond:
                batch = self._queue[:]
                self._queue.clear()
            if not batch:
                return
            try:
                self._commit(batch)
            except BaseException:
                with self._cond:
                    self._queue[:0] = batch
                raise

    @property
    def queued(self) -> int:
        """Rows recorded but not yet committed."""
        return len(self._queue)

    def _commit(self, rows: list[LedgerRow]) -> None:
        values = [_values(row) for row in rows]
        try:
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_INSERT, values)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise StoreUnavailable("store", self.url, f"cannot write the ledger: {err}") from err

    def _query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        self.flush()
        try:
            with self._lock:
                return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as err:
            raise StoreUnavailable("store", self.url, f"cannot read the ledger: {err}") from err

    def rows(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[LedgerRow]:
        """The matching rows, oldest first."""
        where, params = _where(since, until, scope)
        for r in self._query(f"SELECT {_COLUMNS} FROM calls{where} ORDER BY ts, id", params):
            yield LedgerRow(
                ts=datetime.fromtimestamp(r[0], tz=UTC),
                vendor=r[1],
                endpoint=r[2],
                model=r[3],
                scope=MappingProxyType(json.loads(r[4])),
                usage=Usage(r[5], r[6], r[7], r[8], r[9], r[10]),
                cost_usd=None if r[11] is None else Decimal(r[11]),
                saved_usd=None if r[12] is None else Decimal(r[12]),
                estimated=bool(r[13]),
                outcome=r[14],
                error=r[15],
                attempts=r[16],
                latency_s=r[17],
                stream=bool(r[18]),
                request_id=r[19],
            )

    def spent(self, *, since: datetime | None, scope: Mapping[str, str]) -> Decimal:
        """Settled USD of the matching rows (exact)."""
        where, params = _where(since, None, scope)
        return Decimal(self._query(f"SELECT coalesce(tg_dsum(cost_usd), '0') FROM calls{where}", params)[0][0])

    def stats(self, *, since: datetime | None, scope: Mapping[str, str]) -> Stats:
        """Totals of the matching rows, added up inside SQLite."""
        where, params = _where(since, None, scope)
        sql = f"""SELECT count(*),
            coalesce(sum(outcome = 'cache_hit'), 0), coalesce(tg_dsum(saved_usd), '0'),
            coalesce(sum(max(attempts - 1, 0)), 0),
            coalesce(sum(outcome = 'blocked' AND error = 'loop'), 0),
            coalesce(sum(outcome = 'blocked' AND error = 'budget'), 0),
            coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), coalesce(tg_dsum(cost_usd), '0'),
            coalesce(sum(outcome = 'error'), 0), coalesce(sum(outcome = 'incomplete'), 0),
            coalesce(sum(estimated), 0),
            coalesce(sum(cost_usd IS NULL AND outcome IN ('ok', 'incomplete')), 0),
            coalesce(sum(cache_read_tokens), 0), coalesce(sum(cache_write_tokens), 0),
            coalesce(sum(reasoning_tokens), 0)
            FROM calls{where}"""
        r = self._query(sql, params)[0]
        return Stats(
            calls=r[0],
            cache_hits=r[1],
            saved_usd=Decimal(r[2]),
            retries=r[3],
            loops_blocked=r[4],
            budget_blocks=r[5],
            input_tokens=r[6],
            output_tokens=r[7],
            spent_usd=Decimal(r[8]),
            errors=r[9],
            incomplete=r[10],
            estimated_calls=r[11],
            unpriced_calls=r[12],
            cache_read_tokens=r[13],
            cache_write_tokens=r[14],
            reasoning_tokens=r[15],
        )

    # -- budgets: each operation is one IMMEDIATE transaction, so it is atomic across processes --

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result
        except sqlite3.Error as err:
            raise StoreUnavailable("store", self.url, f"budget bookkeeping failed: {err}") from err

    @staticmethod
    def _totals_in(conn: sqlite3.Connection, key: str, period: float, now: float) -> Totals:
        row = conn.execute(
            "SELECT usd, tokens FROM budget_spend WHERE key = ? AND period_start = ?", (key, period)
        ).fetchone()
        held = conn.execute(
            "SELECT coalesce(tg_dsum(usd), '0'), coalesce(sum(tokens), 0) FROM budget_holds "
            "WHERE key = ? AND period_start = ? AND expires_at > ?",
            (key, period, now),
        ).fetchone()
        spent_usd, spent_tokens = (Decimal(row[0]), row[1]) if row else (Decimal(0), 0)
        return Totals(spent_usd, Decimal(held[0]), spent_tokens, held[1])

    def reserve(
        self, claims: Sequence[Claim], *, hold_id: str, expires_at: float, now: float, owner: tuple[str, int]
    ) -> Refusal | None:
        """Hold every enforced claim if all fit, in one transaction."""

        def work(conn: sqlite3.Connection) -> Refusal | None:
            enforced = [c for c in claims if c.enforce]
            for claim in enforced:
                totals = self._totals_in(conn, claim.key, claim.period_start, now)
                if not fits(claim, totals):
                    return Refusal(claim, totals)
            conn.executemany(
                "INSERT OR REPLACE INTO budget_holds VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (hold_id, c.key, c.period_start, money_text(c.usd), c.tokens, expires_at, owner[0], owner[1])
                    for c in enforced
                ],
            )
            return None

        result: Refusal | None = self._transaction(work)
        return result

    def settle(self, hold_id: str | None, actual: Sequence[Claim], *, now: float) -> list[Fired]:
        """Drop the hold, add the actual amounts and record thresholds newly crossed, in one transaction."""

        def work(conn: sqlite3.Connection) -> list[Fired]:
            if hold_id is not None:
                conn.execute("DELETE FROM budget_holds WHERE hold_id = ?", (hold_id,))
            fired: list[Fired] = []
            for claim in actual:
                row = conn.execute(
                    "SELECT usd, tokens FROM budget_spend WHERE key = ? AND period_start = ?",
                    (claim.key, claim.period_start),
                ).fetchone()
                usd = (Decimal(row[0]) if row else Decimal(0)) + claim.usd
                tokens = (row[1] if row else 0) + claim.tokens
                conn.execute(
                    "INSERT OR REPLACE INTO budget_spend VALUES (?, ?, ?, ?)",
                    (claim.key, claim.period_start, money_text(usd), tokens),
                )
                for threshold in crossed(claim, usd, tokens):
                    inserted = conn.execute(
                        "INSERT OR IGNORE INTO budget_alerts VALUES (?, ?, ?)",
                        (claim.key, claim.period_start, threshold),
                    ).rowcount
                    if inserted:
                        fired.append(Fired(claim.key, claim.period_start, threshold, usd, tokens))
            return fired

        result: list[Fired] = self._transaction(work)
        return result

    def totals(self, key: str, period_start: float, *, now: float) -> Totals:
        """Settled and held amounts of one key."""
        result: Totals = self._transaction(lambda conn: self._totals_in(conn, key, period_start, now))
        return result

    def mark_alert(self, key: str, period_start: float, threshold: float) -> bool:
        """Record an alert; ``True`` the first time only, across processes."""
        inserted: int = self._transaction(
            lambda conn: (
                conn.execute(
                    "INSERT OR IGNORE INTO budget_alerts VALUES (?, ?, ?)", (key, period_start, threshold)
                ).rowcount
            )
        )
        return inserted > 0

    def reclaim(self, *, now: float, host: str, alive: Callable[[int], bool]) -> int:
        """Drop expired holds and holds of processes on ``host`` that no longer exist."""

        def work(conn: sqlite3.Connection) -> int:
            dropped = conn.execute("DELETE FROM budget_holds WHERE expires_at <= ?", (now,)).rowcount
            pids = [r[0] for r in conn.execute("SELECT DISTINCT pid FROM budget_holds WHERE host = ?", (host,))]
            for pid in pids:
                if not alive(pid):
                    dropped += conn.execute("DELETE FROM budget_holds WHERE host = ? AND pid = ?", (host, pid)).rowcount
            return dropped

        result: int = self._transaction(work)
        return result

    def close(self) -> None:
        """Write queued rows, stop the writer and close this process's connection."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            with self._lock:
                if self._conn is not None and self._pid == os.getpid():
                    self._conn.close()
                self._conn = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"
