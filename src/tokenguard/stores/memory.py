"""``memory://``: the ledger in a list, for tests and short-lived programs. Lost at exit."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal

from .._budget import Claim, Fired, Refusal, Totals, crossed, fits
from .._ledger import LedgerRow, Stats, matches_scope

__all__ = ["MemoryStore"]


class MemoryStore:
    """A thread-safe in-process ledger. Not shared between processes."""

    url = "memory://"

    def __init__(self) -> None:
        self._rows: list[LedgerRow] = []
        self._lock = threading.Lock()
        # budgets: settled spend, holds (by key and by hold id) and alerts fired
        self._spend: dict[tuple[str, float], tuple[Decimal, int]] = {}
        self._holds: dict[tuple[str, float], dict[str, tuple[Decimal, int, float, tuple[str, int]]]] = {}
        self._hold_keys: dict[str, list[tuple[str, float]]] = {}
        self._alerts: set[tuple[str, float, float]] = set()

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

    def flush(self) -> None:
        """Nothing is queued."""

    def close(self) -> None:
        """Nothing to release."""

    # -- budgets ------------------------------------------------------------------------------

    def _totals(self, key: str, period: float, now: float) -> Totals:
        usd, tokens = self._spend.get((key, period), (Decimal(0), 0))
        held_usd, held_tokens = Decimal(0), 0
        for h_usd, h_tokens, expires, _ in self._holds.get((key, period), {}).values():
            if expires > now:
                held_usd += h_usd
                held_tokens += h_tokens
        return Totals(usd, held_usd, tokens, held_tokens)

    def reserve(
        self, claims: Sequence[Claim], *, hold_id: str, expires_at: float, now: float, owner: tuple[str, int]
    ) -> Refusal | None:
        """Hold every enforced claim if all fit, atomically."""
        with self._lock:
            for claim in claims:
                if claim.enforce:
                    totals = self._totals(claim.key, claim.period_start, now)
                    if not fits(claim, totals):
                        return Refusal(claim, totals)
            keys = self._hold_keys.setdefault(hold_id, [])
            for claim in claims:
                if claim.enforce:
                    k = (claim.key, claim.period_start)
                    self._holds.setdefault(k, {})[hold_id] = (claim.usd, claim.tokens, expires_at, owner)
                    keys.append(k)
        return None

    def settle(self, hold_id: str | None, actual: Sequence[Claim], *, now: float) -> list[Fired]:
        """Drop the hold, add the actual amounts, and return thresholds newly crossed."""
        fired: list[Fired] = []
        with self._lock:
            for k in self._hold_keys.pop(hold_id, []) if hold_id else []:
                self._holds.get(k, {}).pop(hold_id, None)  # type: ignore[arg-type]
            for claim in actual:
                k = (claim.key, claim.period_start)
                usd, tokens = self._spend.get(k, (Decimal(0), 0))
                usd, tokens = usd + claim.usd, tokens + claim.tokens
                self._spend[k] = (usd, tokens)
                for threshold in crossed(claim, usd, tokens):
                    marker = (claim.key, claim.period_start, threshold)
                    if marker not in self._alerts:
                        self._alerts.add(marker)
                        fired.append(Fired(claim.key, claim.period_start, threshold, usd, tokens))
        return fired

    def totals(self, key: str, period_start: float, *, now: float) -> Totals:
        """Settled and held amounts of one key."""
        with self._lock:
            return self._totals(key, period_start, now)

    def mark_alert(self, key: str, period_start: float, threshold: float) -> bool:
        """Record an alert; ``True`` the first time only."""
        with self._lock:
            marker = (key, period_start, threshold)
            if marker in self._alerts:
                return False
            self._alerts.add(marker)
            return True

    def reclaim(self, *, now: float, host: str, alive: Callable[[int], bool]) -> int:
        """Drop expired holds and holds of dead local processes."""
        dropped = 0
        with self._lock:
            for holds in self._holds.values():
                for hold_id, (_, _, expires, (h_host, pid)) in list(holds.items()):
                    if expires <= now or (h_host == host and not alive(pid)):
                        del holds[hold_id]
                        dropped += 1
        return dropped

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._rows)} rows)"
