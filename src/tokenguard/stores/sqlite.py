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

import contextlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from .._budget import Claim, Fired, Refusal, Totals, crossed, fits, from_nano, to_nano
from .._errors import StoreUnavailable
from .._ledger import LedgerRow, OutcomeRow, Stats
from .._loops import Decision
from .._usage import Usage
from ._writebehind import WriteBehind

__all__ = ["SQLiteStore", "Salvaged", "money_text", "recover_ledger"]

fcntl: Any
try:
    import fcntl
except ImportError:  # Windows: writers wait on SQLite's lock alone
    fcntl = None

log = logging.getLogger("tokenguard")

_SCHEMA_VERSION: Final = 4  # 3: the loop detector's tables, outcomes; 4: hold generations
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
    spent_nusd INTEGER NOT NULL,
    held_nusd INTEGER NOT NULL,
    spent_tokens INTEGER NOT NULL,
    held_tokens INTEGER NOT NULL,
    PRIMARY KEY (key, period_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_holders (
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    key TEXT NOT NULL,
    period_start REAL NOT NULL,
    nusd INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    gen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (host, pid, key, period_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_alerts (
    key TEXT NOT NULL,
    period_start REAL NOT NULL,
    threshold REAL NOT NULL,
    PRIMARY KEY (key, period_start, threshold)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outcomes_ts ON outcomes (ts);
CREATE TABLE IF NOT EXISTS loop_events (
    key TEXT NOT NULL,
    ts REAL NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS loop_events_key ON loop_events (key, ts);
CREATE INDEX IF NOT EXISTS loop_events_ts ON loop_events (ts);
CREATE TABLE IF NOT EXISTS loop_cooldowns (
    key TEXT PRIMARY KEY,
    until REAL NOT NULL,
    detail TEXT NOT NULL
) WITHOUT ROWID;
"""
_COLUMNS: Final = (
    "ts, vendor, endpoint, model, scope, input_tokens, output_tokens, cache_read_tokens, "
    "cache_write_tokens, cache_write_1h_tokens, reasoning_tokens, cost_usd, saved_usd, estimated, "
    "outcome, error, attempts, latency_s, stream, request_id"
)
_PAGE: Final = 5_000  # rows per query when reading the ledger
_INSERT: Final = f"INSERT INTO calls ({_COLUMNS}) VALUES ({', '.join('?' * 20)})"


def money_text(value: Decimal | None) -> str | None:
    """Exact decimal text for a USD amount (no exponent), or ``None``."""
    if value is None:
        return None
    return format(value, "f")


_BUSY_DEADLINE_S: Final = 30.0
_NO_TOTALS: Final = Totals()
_LOOP_SWEEP_EVERY: Final = 512  # loop-detector writes between sweeps of entries out of the window


def _advice(err: BaseException, path: Path) -> str:
    """What to do about a SQLite failure that will not go away by itself (empty for the rest)."""
    name = getattr(err, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        return (
            f". {path} is damaged or is not a tokenguard ledger; tokenguard does not touch it. Copy what can be "
            f"read into a new ledger with `tokenguard ledger recover {path} <new.db>`, then move the new file into "
            'its place (docs/reliability.md, "A corrupt ledger")'
        )
    if name.startswith("SQLITE_FULL"):
        return f". The disk holding {path} is full: free space; queued rows are kept and retried meanwhile"
    if name.startswith("SQLITE_IOERR"):
        return (
            f". The system refused to read or write {path} (a full disk, a quota or a file-size limit?); "
            "queued rows are kept and retried meanwhile"
        )
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return f". Check that this user can write {path} and its directory"
    return ""


def _retry_busy(attempt: Callable[[], Any]) -> Any:
    """Run ``attempt``, retrying while another process holds the write lock.

    SQLite's own busy handler sleeps 1, 2, 5, 10 ... ms between tries, which starves a
    process that wants the lock for 20 µs; this one retries after 20-500 µs, with jitter.
    """
    deadline = time.monotonic() + _BUSY_DEADLINE_S
    pause = 20e-6
    while True:
        try:
            return attempt()
        except sqlite3.OperationalError as err:
            if ("locked" not in str(err) and "busy" not in str(err)) or time.monotonic() > deadline:
                raise
        time.sleep(pause * (0.5 + random.random()))
        pause = min(pause * 2, 500e-6)


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
        log.error(
            "tokenguard: %d ledger row(s) of a dropped store could not be written to %s: %s", len(rows), path, err
        )


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


class SQLiteStore(WriteBehind):
    """The ledger in one SQLite file (created, with its directory, on first use)."""

    def __init__(self, path: str | os.PathLike[str], *, write_behind_s: float = 0.05) -> None:
        # absolute: a process that forks and changes directory must reopen the same file
        self.path = Path(path).expanduser().absolute()
        self.url = f"sqlite:///{self.path}"
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._loop_writes = 0
        self._generations: dict[int, int] = {}  # id(held claim) -> its hold's generation
        self._lock_pid = -1
        self._lock = threading.Lock()  # guards the connection
        self._start_write_behind(write_behind_s)
        self._connect()
        # for a store dropped without close(); at exit _flush_all writes the live stores' rows
        weakref.finalize(self, _write_leftovers, self.path, self._queue).atexit = False

    def _after_fork(self) -> None:
        super()._after_fork()
        self._lock = threading.Lock()
        self._conn = None

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # created private from the start (not chmod-ed after): the ledger names users and spend
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            opened = conn
            _retry_busy(lambda: self._prepare(opened))
            conn.create_aggregate("tg_dsum", 1, _DecimalSum)  # type: ignore[arg-type]  # step/finalize duck-typed
        except (sqlite3.Error, OSError) as err:
            if conn is not None:
                conn.close()
            raise StoreUnavailable(
                "store", self.url, f"cannot open the SQLite ledger: {err}{_advice(err, self.path)}"
            ) from err
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        self._pid = os.getpid()
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        # small pages make each commit write less (a budget reserve touches two pages): set before
        # the file's first write, a no-op on an existing file
        conn.execute("PRAGMA page_size=1024")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # lock waits are retried by _retry_busy (fast), not by SQLite's slow busy handler
        conn.execute("PRAGMA busy_timeout=0")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise StoreUnavailable(
                "store", self.url, f"written by a newer tokenguard (schema {version} > {_SCHEMA_VERSION})"
            )
        if version < _SCHEMA_VERSION:
            conn.executescript(_SCHEMA)
            columns = [row[1] for row in conn.execute("PRAGMA table_info(budget_holders)")]
            if "gen" not in columns:  # a ledger from schema 3 or older
                conn.execute("ALTER TABLE budget_holders ADD COLUMN gen INTEGER NOT NULL DEFAULT 0")
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def _connection(self) -> sqlite3.Connection:
        # a forked child must not share the parent's connection
        if self._conn is None or self._pid != os.getpid():
            return self._connect()
        return self._conn

    def _commit(self, rows: list[LedgerRow]) -> None:
        values = [_values(row) for row in rows]
        try:
            self._write(lambda conn: conn.executemany(_INSERT, values))
        except sqlite3.Error as err:
            raise StoreUnavailable(
                "store", self.url, f"cannot write the ledger: {err}{_advice(err, self.path)}"
            ) from err

    def _query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        self.flush()

        def attempt() -> list[tuple[Any, ...]]:
            with self._lock:
                return self._connection().execute(sql, params).fetchall()

        try:
            result: list[tuple[Any, ...]] = _retry_busy(attempt)
        except sqlite3.Error as err:
            raise StoreUnavailable(
                "store", self.url, f"cannot read the ledger: {err}{_advice(err, self.path)}"
            ) from err
        return result

    def _pages(
        self,
        table: str,
        columns: str,
        since: datetime | None,
        until: datetime | None,
        scope: Mapping[str, str] | None,
    ) -> Iterator[tuple[Any, ...]]:
        """The matching rows of ``table`` in (ts, id) order, ``_PAGE`` per query: each page
        picks up after the last key seen, by the ts index, so no read holds the connection,
        a transaction or the whole result for long."""
        where, params = _where(since, until, scope)
        after = " AND " if where else " WHERE "
        sql = f"SELECT {columns}, id FROM {table}{where} ORDER BY ts, id LIMIT {_PAGE}"
        page = self._query(sql, params)
        while page:
            for row in page:
                yield row[:-1]
            if len(page) < _PAGE:
                return
            last_ts, last_id = page[-1][0], page[-1][-1]
            sql = f"SELECT {columns}, id FROM {table}{where}{after}(ts, id) > (?, ?) ORDER BY ts, id LIMIT {_PAGE}"
            page = self._query(sql, [*params, last_ts, last_id])

    def rows(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[LedgerRow]:
        """The matching rows, oldest first, read a page at a time (memory stays flat at any
        ledger size; rows written meanwhile after the page being read may be included)."""
        for r in self._pages("calls", _COLUMNS, since, until, scope):
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

    def record_outcome(self, row: OutcomeRow) -> None:
        """Keep one outcome (its own transaction: outcomes are few)."""
        values = (row.ts.timestamp(), row.name, json.dumps(dict(row.scope), sort_keys=True), row.count)
        self._transaction(
            lambda conn: conn.execute("INSERT INTO outcomes (ts, name, scope, count) VALUES (?, ?, ?, ?)", values)
        )

    def outcomes(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[OutcomeRow]:
        """The matching outcomes, oldest first, read a page at a time."""
        for ts, name, row_scope, count in self._pages("outcomes", "ts, name, scope, count", since, until, scope):
            yield OutcomeRow(
                datetime.fromtimestamp(ts, tz=UTC), name, MappingProxyType(json.loads(row_scope)), int(count)
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
            coalesce(sum(reasoning_tokens), 0), coalesce(sum(attempts), 0),
            coalesce(sum(outcome = 'blocked'), 0)
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
            attempts=r[16],
            blocked=r[17],
        )

    # -- budgets: each operation is one IMMEDIATE transaction, so it is atomic across processes.
    # Amounts are integer nano-dollars here (claims arrive already rounded up to 1e-9 USD), so
    # SQLite adds them exactly and a counter holds up to $9.2 billion.

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work`` in one IMMEDIATE transaction.

        Writers of this file queue on an ``flock`` of a side file first, so under contention
        the kernel hands the lock straight to the next process instead of every process
        polling SQLite's lock; a writer that is not tokenguard is still waited for by
        ``_retry_busy``.
        """

        def attempt(conn: sqlite3.Connection) -> Any:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        with self._lock:
            conn = self._connection()
            fd = self._writer_lock_fd()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                return _retry_busy(lambda: attempt(conn))
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _writer_lock_fd(self) -> int | None:
        if fcntl is None:
            return None
        if self._lock_fd is None or self._lock_pid != os.getpid():
            # a forked child must not share the parent's open file (and so its lock)
            self._lock_fd = os.open(f"{self.path}-writer.lock", os.O_CREAT | os.O_RDWR, 0o600)
            self._lock_pid = os.getpid()
        return self._lock_fd

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            return self._write(work)
        except sqlite3.Error as err:
            raise StoreUnavailable(
                "store", self.url, f"budget bookkeeping failed: {err}{_advice(err, self.path)}"
            ) from err

    @staticmethod
    def _totals_in(conn: sqlite3.Connection, key: str, period: float) -> Totals:
        row = conn.execute(
            "SELECT spent_nusd, held_nusd, spent_tokens, held_tokens FROM budget_spend "
            "WHERE key = ? AND period_start = ?",
            (key, period),
        ).fetchone()
        if row is None:
            return Totals()
        return Totals(from_nano(row[0]), from_nano(row[1]), row[2], row[3])

    def reserve(
        self, claims: Sequence[Claim], *, owner: tuple[str, int], expires_at: float, now: float
    ) -> Refusal | None:
        """Hold every enforced claim if all fit, in one transaction."""
        enforced = [c for c in claims if c.enforce]
        if not enforced:
            return None

        def work(conn: sqlite3.Connection) -> Refusal | None:
            current = self._totals_many(conn, enforced)
            for claim in enforced:
                totals = current.get((claim.key, claim.period_start), _NO_TOTALS)
                if not fits(claim, totals):
                    return Refusal(claim, totals)
            amounts = [(c.key, c.period_start, to_nano(c.usd), c.tokens) for c in enforced]
            conn.executemany(
                "INSERT INTO budget_spend VALUES (?, ?, 0, ?, 0, ?) ON CONFLICT (key, period_start) DO UPDATE "
                "SET held_nusd = held_nusd + excluded.held_nusd, held_tokens = held_tokens + excluded.held_tokens",
                amounts,
            )
            # a hold reclaimed while its owner lives (its lease lapsed) comes back as a new generation:
            # settles release only what the generation they reserved in still holds
            fresh = random.getrandbits(62)
            for claim, (key, period, nusd, tokens) in zip(enforced, amounts, strict=True):
                (generation,) = conn.execute(
                    "INSERT INTO budget_holders VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (host, pid, key, period_start) DO UPDATE SET nusd = nusd + excluded.nusd, "
                    "tokens = tokens + excluded.tokens, expires_at = excluded.expires_at RETURNING gen",
                    (owner[0], owner[1], key, period, nusd, tokens, expires_at, fresh),
                ).fetchone()
                self._generations[id(claim)] = generation
            return None

        result: Refusal | None = self._transaction(work)
        return result

    @staticmethod
    def _totals_many(conn: sqlite3.Connection, claims: Sequence[Claim]) -> dict[tuple[str, float], Totals]:
        """The totals of every claim's key in one query, each found by the primary key.

        (``(key, period_start) IN (VALUES ...)`` made SQLite scan the whole table, which gains
        a row per key and period: every admitted call grew slower as the ledger aged.)"""
        where = " OR ".join("(key = ? AND period_start = ?)" for _ in claims)
        params: list[Any] = [v for c in claims for v in (c.key, c.period_start)]
        rows = conn.execute(
            "SELECT key, period_start, spent_nusd, held_nusd, spent_tokens, held_tokens FROM budget_spend "
            f"WHERE {where}",
            params,
        ).fetchall()
        return {(r[0], r[1]): Totals(from_nano(r[2]), from_nano(r[3]), r[4], r[5]) for r in rows}

    @staticmethod
    def _drop_holders(conn: sqlite3.Connection, where: str, params: tuple[Any, ...]) -> int:
        """Delete holder rows and take their amounts off the counters; return how many held anything."""
        dropped = conn.execute(
            f"DELETE FROM budget_holders WHERE {where} RETURNING key, period_start, nusd, tokens", params
        ).fetchall()
        conn.executemany(
            "UPDATE budget_spend SET held_nusd = max(held_nusd - ?, 0), held_tokens = max(held_tokens - ?, 0) "
            "WHERE key = ? AND period_start = ?",
            [(nusd, tokens, key, period) for key, period, nusd, tokens in dropped],
        )
        return sum(1 for _, _, nusd, tokens in dropped if nusd or tokens)

    def settle(
        self,
        batch: Sequence[tuple[Sequence[Claim], Sequence[Claim]]],
        *,
        owner: tuple[str, int],
        now: float,
    ) -> list[Fired]:
        """Release the holds, add the actual amounts and record thresholds newly crossed: the
        whole batch in one transaction."""

        def work(conn: sqlite3.Connection) -> list[Fired]:
            fired: list[Fired] = []
            for held, actual in batch:
                self._settle_one(conn, held, actual, owner, fired)
            return fired

        result: list[Fired] = self._transaction(work)
        return result

    def _settle_one(
        self,
        conn: sqlite3.Connection,
        held: Sequence[Claim],
        actual: Sequence[Claim],
        owner: tuple[str, int],
        fired: list[Fired],
    ) -> None:
        """One call of a batch, inside ``settle()``'s transaction."""
        released: dict[tuple[str, float], tuple[int, int]] = {}
        for claim in held:
            ident = (owner[0], owner[1], claim.key, claim.period_start)
            # only what this owner still holds is released: a hold reclaimed (its lease lapsed)
            # was taken off the key already, and the owner may hold less now than this claim
            row = conn.execute(
                "SELECT nusd, tokens, gen FROM budget_holders "
                "WHERE host = ? AND pid = ? AND key = ? AND period_start = ?",
                ident,
            ).fetchone()
            generation = self._generations.pop(id(claim), None)
            if row is None or (generation is not None and generation != row[2]):
                continue
            nusd, tokens = min(to_nano(claim.usd), row[0]), min(claim.tokens, row[1])
            conn.execute(
                "UPDATE budget_holders SET nusd = nusd - ?, tokens = tokens - ? "
                "WHERE host = ? AND pid = ? AND key = ? AND period_start = ?",
                (nusd, tokens, *ident),
            )
            before = released.get((claim.key, claim.period_start), (0, 0))
            released[(claim.key, claim.period_start)] = (before[0] + nusd, before[1] + tokens)
        for claim in actual:
            held_nusd, held_tokens = released.pop((claim.key, claim.period_start), (0, 0))
            spent_nusd, spent_tokens = conn.execute(
                "INSERT INTO budget_spend VALUES (?, ?, ?, 0, ?, 0) ON CONFLICT (key, period_start) DO UPDATE "
                "SET spent_nusd = spent_nusd + excluded.spent_nusd, "
                "spent_tokens = spent_tokens + excluded.spent_tokens, "
                "held_nusd = max(held_nusd - ?, 0), held_tokens = max(held_tokens - ?, 0) "
                "RETURNING spent_nusd, spent_tokens",
                (claim.key, claim.period_start, to_nano(claim.usd), claim.tokens, held_nusd, held_tokens),
            ).fetchone()
            usd = from_nano(spent_nusd)
            for threshold in crossed(claim, usd, spent_tokens):
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO budget_alerts VALUES (?, ?, ?)",
                    (claim.key, claim.period_start, threshold),
                ).rowcount
                if inserted:
                    fired.append(Fired(claim.key, claim.period_start, threshold, usd, spent_tokens))

    def totals(self, key: str, period_start: float, *, now: float) -> Totals:
        """Settled and held amounts of one key (expired holds dropped first)."""

        def work(conn: sqlite3.Connection) -> Totals:
            self._drop_holders(conn, "expires_at <= ?", (now,))
            return self._totals_in(conn, key, period_start)

        result: Totals = self._transaction(work)
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

    def reclaim(
        self, *, now: float, host: str, alive: Callable[[int], bool], keys: Sequence[tuple[str, float]] = ()
    ) -> int:
        """Drop the holds of owners whose lease expired, or whose process on ``host`` is gone (every
        key: ``keys`` is only a hint)."""

        def work(conn: sqlite3.Connection) -> int:
            dropped = self._drop_holders(conn, "expires_at <= ?", (now,))
            pids = [r[0] for r in conn.execute("SELECT DISTINCT pid FROM budget_holders WHERE host = ?", (host,))]
            for pid in pids:
                if not alive(pid):
                    dropped += self._drop_holders(conn, "host = ? AND pid = ?", (host, pid))
            return dropped

        result: int = self._transaction(work)
        return result

    def budget_keys(self, prefix: str, period_start: float) -> list[str]:
        """The budget keys starting with ``prefix`` that have spend or holds in the period."""
        rows = self._query(
            "SELECT key FROM budget_spend WHERE period_start = ? AND substr(key, 1, ?) = ?",
            [period_start, len(prefix), prefix],
        )
        return [str(r[0]) for r in rows]

    # -- the loop detector's history: one IMMEDIATE transaction per request ----------------------

    def loop_observe(
        self,
        keys: Sequence[str],
        details: Sequence[str],
        *,
        now: float,
        window_s: float,
        keep: int,
        decide: Callable[[list[list[tuple[float, str]]], list[tuple[float, str]]], Decision],
        group: str = "",
    ) -> Decision:
        """See ``tokenguard._loops.LoopStore``: atomic across the processes sharing this file."""

        marks = ", ".join("?" * len(keys))
        order = "ORDER BY key, ts DESC, rowid DESC"
        select_events = f"SELECT key, ts, detail FROM loop_events WHERE key IN ({marks}) AND ts > ? {order}"
        select_blocks = f"SELECT key, until, detail FROM loop_cooldowns WHERE key IN ({marks}) AND until > ?"

        def work(conn: sqlite3.Connection) -> Decision:
            found: dict[str, list[tuple[float, str]]] = {key: [] for key in keys}
            for key, ts, detail in conn.execute(select_events, (*keys, now - window_s)):
                entries = found[key]
                if len(entries) < keep:
                    entries.append((float(ts), str(detail)))
            histories = [found[key][::-1] for key in keys]
            blocks = {
                key: (float(until), str(detail)) for key, until, detail in conn.execute(select_blocks, (*keys, now))
            }
            decision = decide(histories, [blocks.get(key, (0.0, "")) for key in keys])
            if decision.record:
                rows = [(key, now, detail) for key, detail in zip(keys, details, strict=True)]
                conn.executemany("INSERT INTO loop_events VALUES (?, ?, ?)", rows)
                for key, history in zip(keys, histories, strict=True):
                    if len(history) >= keep:  # at capacity: keep the newest ``keep``
                        conn.execute(
                            "DELETE FROM loop_events WHERE key = ? AND rowid NOT IN (SELECT rowid FROM loop_events "
                            "WHERE key = ? ORDER BY ts DESC, rowid DESC LIMIT ?)",
                            (key, key, keep),
                        )
            for key, detail in decision.quarantine:
                conn.execute("INSERT OR REPLACE INTO loop_cooldowns VALUES (?, ?, ?)", (key, decision.until, detail))
            self._loop_writes += 1
            if self._loop_writes % _LOOP_SWEEP_EVERY == 0:  # entries out of the window, of any key
                conn.execute("DELETE FROM loop_events WHERE ts <= ?", (now - window_s,))
                conn.execute("DELETE FROM loop_cooldowns WHERE until <= ?", (now,))
            return decision

        result: Decision = self._transaction(work)
        return result

    def close(self) -> None:
        """Write queued rows, stop the writer and close this process's connection."""
        try:
            self._stop_writer()
        finally:
            with self._lock:
                if self._conn is not None and self._pid == os.getpid():
                    self._conn.close()
                self._conn = None
                if self._lock_fd is not None and self._lock_pid == os.getpid():
                    os.close(self._lock_fd)
                self._lock_fd = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"


# -- recovering a damaged ledger -------------------------------------------------------------------

# what a recovery copies: the calls and outcomes (by rowid, so a damaged page loses only its own
# rows), and the budgets' settled spend and alerts sent (by key: a damaged page ends the scan).
# Holds are not copied (their processes are gone), nor is the loop detector's short-lived history.
_SALVAGED: Final = (  # (table, what to read, the columns it goes to, read by rowid)
    ("calls", _COLUMNS, _COLUMNS, True),
    ("outcomes", "ts, name, scope, count", "ts, name, scope, count", True),
    (
        "budget_spend",
        "key, period_start, spent_nusd, 0, spent_tokens, 0",
        "key, period_start, spent_nusd, held_nusd, spent_tokens, held_tokens",
        False,
    ),
    ("budget_alerts", "key, period_start, threshold", "key, period_start, threshold", False),
)


@dataclass(frozen=True)
class Salvaged:
    """What ``recover_ledger`` copied of one table.

    ``missing`` (calls and outcomes) counts the row ids between the first and the last row
    that gave no row: the rows lost, at most (``None`` when the last row id itself cannot be
    read). The budget tables have no row ids: ``complete`` says whether their scan reached the
    end.
    """

    table: str
    copied: int
    missing: int | None
    complete: bool


def recover_ledger(broken: str | os.PathLike[str], into: str | os.PathLike[str]) -> list[Salvaged]:
    """Copy every row that can still be read from a damaged SQLite ledger into a new one.

    ``broken`` is never written: it is read from a private copy (with its ``-wal`` file, whose
    committed rows count). ``into`` must not exist; it becomes a ledger of this version. Stop
    the processes that use the ledger first, and move ``into`` into place after. Raises
    ``StoreUnavailable`` when nothing at all can be read (e.g. the file's header is gone).
    """
    import shutil
    import tempfile

    source, target = Path(broken).expanduser().absolute(), Path(into).expanduser().absolute()
    if not source.is_file():
        raise StoreUnavailable("ledger", str(source), "no such file")
    if target.exists():
        raise StoreUnavailable("ledger", str(target), "exists already: a recovery writes a new file, never over one")
    SQLiteStore(target).close()  # the new ledger, with this version's schema
    with tempfile.TemporaryDirectory(prefix="tokenguard-recover-") as scratch:
        copy = Path(scratch) / "ledger.db"
        shutil.copyfile(source, copy)
        if Path(f"{source}-wal").is_file():
            shutil.copyfile(f"{source}-wal", f"{copy}-wal")
        old = sqlite3.connect(copy, isolation_level=None)
        new = sqlite3.connect(target, isolation_level=None)
        try:
            try:
                old.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.DatabaseError as err:
                target.unlink()
                raise StoreUnavailable(
                    "ledger", str(source), f"nothing can be read: {err} (the file's header or schema is damaged)"
                ) from None
            new.execute("BEGIN")
            report = [_salvage(old, new, *table) for table in _SALVAGED]
            new.execute("COMMIT")
        finally:
            old.close()
            new.close()
    return report


def _salvage(
    old: sqlite3.Connection, new: sqlite3.Connection, table: str, columns: str, into: str, by_rowid: bool
) -> Salvaged:
    # the new file numbers calls and outcomes itself; a budget key read twice is kept once
    insert = f"INSERT OR IGNORE INTO {table} ({into}) VALUES ({', '.join('?' * len(into.split(',')))})"
    copied = 0
    if not by_rowid:
        try:
            for row in old.execute(f"SELECT {columns} FROM {table}"):
                new.execute(insert, row)
                copied += 1
        except sqlite3.DatabaseError:
            return Salvaged(table, copied, None, complete=False)
        return Salvaged(table, copied, None, complete=True)
    select = f"SELECT {columns} FROM {table} WHERE rowid"
    edges: list[int | None] = []
    damaged = False
    for edge in ("min", "max"):
        try:
            edges.append(old.execute(f"SELECT {edge}(rowid) FROM {table}").fetchone()[0])
        except sqlite3.DatabaseError:  # that edge of the tree is damaged
            edges.append(None)
            damaged = True
    if not damaged and edges[1] is None:
        return Salvaged(table, 0, 0, complete=True)  # an empty table
    lowest, highest = edges[0] or 1, edges[1]
    # 256 row ids at a time; a range that meets a damaged page is read one id at a time, so only
    # the rows on that page are lost; with the right edge damaged, ids are probed until 100,000
    # in a row give nothing
    last_found, start = lowest - 1, lowest
    while start <= (highest if highest is not None else last_found + 100_000):
        end = start + 255
        try:
            rows = old.execute(f"{select} BETWEEN ? AND ? ORDER BY rowid", (start, end)).fetchall()
            found = [r[0] for r in old.execute(f"SELECT rowid FROM {table} WHERE rowid BETWEEN ? AND ?", (start, end))]
        except sqlite3.DatabaseError:
            rows, found = [], []
            for rowid in range(start, end + 1):
                with contextlib.suppress(sqlite3.DatabaseError):
                    row = old.execute(f"{select} = ?", (rowid,)).fetchone()
                    if row is not None:
                        rows.append(row)
                        found.append(rowid)
        new.executemany(insert, rows)
        copied += len(rows)
        last_found = max([last_found, *found])
        start = end + 1
    missing = None if highest is None else highest - lowest + 1 - copied
    return Salvaged(table, copied, missing, complete=missing == 0)
