"""``memory://``: the ledger in a list, for tests and short-lived programs. Lost at exit."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from datetime import datetime
from decimal import Decimal

from .._ledger import LedgerRow, Stats, matches_scope

__all__ = ["MemoryStore"]


class MemoryStore:
    """A thread-safe in-process ledger. Not shared between processes."""

    url = "memory://"

    def __init__(self) -> None:
        self._rows: list[LedgerRow] = []
        self._lock = threading.Lock()

    def record(self, row: LedgerRow) -> None:
        """Append one row."""
        with self._lock:
            self._rows.append(row)

    def rows(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[LedgerRow]:
        """The matching rows, oldest first."""
        with self._lock:
            snapshot = list(self._rows)
        for row in sorted(snapshot, key=lambda r: r.ts):
            if since is not None and row.ts < since:
                continue
            if until is not None and row.ts >= until:
                continue
            if scope and not matches_scope(row.scope, scope):
                continue
            yield row

    def spent(self, *, since: datetime | None, scope: Mapping[str, str]) -> Decimal:
        """Settled USD of the matching rows."""
        return sum((r.cost_usd or Decimal(0) for r in self.rows(since=since, scope=scope)), Decimal(0))

    def stats(self, *, since: datetime | None, scope: Mapping[str, str]) -> Stats:
        """Totals of the matching rows."""
        return Stats.of(self.rows(since=since, scope=scope))

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._rows)} rows)"
