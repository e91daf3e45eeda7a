"""``sqlite:///path``: the default ledger, an embedded SQLite file in WAL mode.

Safe across threads (one connection per store, behind a lock) and across processes
(WAL, a 30 s busy timeout, and a fresh connection after ``fork``). Money is stored as
exact decimal text and summed by a ``Decimal`` SQL aggregate, never as float.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from .._errors import StoreUnavailable
from .._ledger import LedgerRow, Stats
from .._usage import Usage

__all__ = ["SQLiteStore", "money_text"]

_SCHEMA_VERSION: Final = 1
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


class _DecimalSum:
    """SQL aggregate ``tg_dsum(text)``: the exact ``Decimal`` sum, returned as text."""

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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists()
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            if fresh:
                os.chmod(self.path, 0o600)
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
            raise StoreUnavailable("store", self.url, f"cannot open the SQLite ledger: {err}") from err
        self._conn = conn
        self._pid = os.getpid()
        return conn

    def _connection(self) -> sqlite3.Connection:
        # a forked child must not share the parent's connection
        if self._conn is None or self._pid != os.getpid():
            return self._connect()
        return self._conn

    def record(self, row: LedgerRow) -> None:
        """Append one row (committed before this returns)."""
        u = row.usage
        values = (
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
        try:
            with self._lock:
                self._connection().execute(_INSERT, values)
        except sqlite3.Error as err:
            raise StoreUnavailable("store", self.url, f"cannot write the ledger: {err}") from err

    def _query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
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
        return Decimal(self._query(f"SELECT tg_dsum(cost_usd) FROM calls{where}", params)[0][0])

    def stats(self, *, since: datetime | None, scope: Mapping[str, str]) -> Stats:
        """Totals of the matching rows, added up inside SQLite."""
        where, params = _where(since, None, scope)
        sql = f"""SELECT count(*),
            coalesce(sum(outcome = 'cache_hit'), 0), tg_dsum(saved_usd),
            coalesce(sum(max(attempts - 1, 0)), 0),
            coalesce(sum(outcome = 'blocked' AND error = 'loop'), 0),
            coalesce(sum(outcome = 'blocked' AND error = 'budget'), 0),
            coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), tg_dsum(cost_usd),
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

    def close(self) -> None:
        """Close this process's connection."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"
