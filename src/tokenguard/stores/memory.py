"""``memory://``: the ledger in a list, for tests and short-lived programs. Lost at exit."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from .._budget import Claim, Fired, Refusal, Totals, crossed, fits
from .._ledger import LedgerRow, OutcomeRow, Stats, matches_scope
from .._loops import Decision

__all__ = ["MemoryStore"]

_LOOP_KEYS = 100_000  # the loop detector's keys kept (least recently seen go first)


class MemoryStore:
    """A thread-safe in-process ledger. Not shared between processes."""

    url = "memory://"

    def __init__(self) -> None:
        self._rows: list[LedgerRow] = []
        self._outcomes: list[OutcomeRow] = []
        self._lock = threading.Lock()
        # budgets: per key and period [spent, held, spent tokens, held tokens]; holds per owner
        self._spend: dict[tuple[str, float], list[Any]] = {}
        self._holders: dict[tuple[str, int, str, float], list[Any]] = {}
        self._alerts: set[tuple[str, float, float]] = set()
        self._claimed: dict[int, list[Any]] = {}  # id(held claim) -> the holder it was reserved in
        # the loop detector: per key, its latest (time, detail) entries; quarantines
        self._loops: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()
        self._loop_cooldowns: dict[str, tuple[float, str]] = {}

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

    def record_outcome(self, row: OutcomeRow) -> None:
        """Keep one outcome."""
        with self._lock:
            self._outcomes.append(row)

    def outcomes(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[OutcomeRow]:
        """The matching outcomes, oldest first."""
        with self._lock:
            snapshot = list(self._outcomes)
        for row in sorted(snapshot, key=lambda r: r.ts):
            in_time = (since is None or row.ts >= since) and (until is None or row.ts < until)
            if in_time and (not scope or matches_scope(row.scope, scope)):
                yield row

    def spent(self, *, since: datetime | None, scope: Mapping[str, str]) -> Decimal:
        """Settled USD of the matching rows."""
        return sum((r.cost_usd or Decimal(0) for r in self.rows(since=since, scope=scope)), Decimal(0))

    def stats(self, *, since: datetime | None, scope: Mapping[str, str]) -> Stats:
        """Totals of the matching rows."""
        return Stats.of(self.rows(since=since, scope=scope))

    def budget_keys(self, prefix: str, period_start: float) -> list[str]:
        """The budget keys starting with ``prefix`` that have spend or holds in the period."""
        with self._lock:
            return [key for key, start in self._spend if start == period_start and key.startswith(prefix)]

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
        """See ``tokenguard._loops.LoopStore`` (atomic across this process's threads)."""
        with self._lock:
            histories: list[list[tuple[float, str]]] = []
            blocked: list[tuple[float, str]] = []
            for key in keys:
                entries = self._loops.get(key)
                if entries is not None:
                    while entries and entries[0][0] <= now - window_s:
                        entries.popleft()
                histories.append(list(entries) if entries else [])
                blocked.append(self._loop_cooldowns.get(key, (0.0, "")))
            decision = decide(histories, blocked)
            if decision.record:
                for key, detail in zip(keys, details, strict=True):
                    entries = self._loops.get(key)
                    if entries is None or entries.maxlen != keep:
                        entries = self._loops[key] = deque(entries or (), maxlen=keep)
                    self._loops.move_to_end(key)
                    entries.append((now, detail))
                while len(self._loops) > _LOOP_KEYS:
                    self._loops.popitem(last=False)
            for key, detail in decision.quarantine:
                self._loop_cooldowns[key] = (decision.until, detail)
            if len(self._loop_cooldowns) > _LOOP_KEYS:
                self._loop_cooldowns = {k: b for k, b in self._loop_cooldowns.items() if b[0] > now}
            return decision

    def flush(self) -> None:
        """Nothing is queued."""

    def close(self) -> None:
        """Nothing to release."""

    # -- budgets ------------------------------------------------------------------------------

    def _counter(self, key: str, period: float) -> list[Any]:
        return self._spend.setdefault((key, period), [Decimal(0), Decimal(0), 0, 0])

    def _totals(self, key: str, period: float) -> Totals:
        spent, held, spent_tokens, held_tokens = self._spend.get((key, period), (Decimal(0), Decimal(0), 0, 0))
        return Totals(spent, held, spent_tokens, held_tokens)

    def seed(self, key: str, period_start: float, spent_usd: Decimal, spent_tokens: int) -> None:
        """Start a budget key's period from amounts already spent elsewhere (a Redis store's
        fail-open fallback starts from where the fleet stood)."""
        with self._lock:
            counter = self._counter(key, period_start)
            counter[0] += spent_usd
            counter[2] += spent_tokens

    def reserve(
        self, claims: Sequence[Claim], *, owner: tuple[str, int], expires_at: float, now: float
    ) -> Refusal | None:
        """Hold every enforced claim if all fit, atomically."""
        with self._lock:
            enforced = [c for c in claims if c.enforce]
            for claim in enforced:
                totals = self._totals(claim.key, claim.period_start)
                if not fits(claim, totals):
                    return Refusal(claim, totals)
            for claim in enforced:
                counter = self._counter(claim.key, claim.period_start)
                counter[1] += claim.usd
                counter[3] += claim.tokens
                holder = self._holders.setdefault((*owner, claim.key, claim.period_start), [Decimal(0), 0, 0.0])
                # a hold reclaimed while its owner lives comes back as a new holder object: a settle
                # releases only from the holder its claim was reserved in
                self._claimed[id(claim)] = holder
                holder[0] += claim.usd
                holder[1] += claim.tokens
                holder[2] = expires_at
        return None

    def settle(
        self,
        batch: Sequence[tuple[Sequence[Claim], Sequence[Claim]]],
        *,
        owner: tuple[str, int],
        now: float,
    ) -> list[Fired]:
        """Release the holds, add the actual amounts, and return thresholds newly crossed."""
        fired: list[Fired] = []
        with self._lock:
            for held, actual in batch:
                self._settle_one(held, actual, owner, fired)
        return fired

    def _settle_one(
        self, held: Sequence[Claim], actual: Sequence[Claim], owner: tuple[str, int], fired: list[Fired]
    ) -> None:
        """One call of a batch (``settle()`` holds the lock)."""
        for claim in held:
            holder = self._holders.get((*owner, claim.key, claim.period_start))
            reserved_in = self._claimed.pop(id(claim), None)
            if holder is None or (reserved_in is not None and reserved_in is not holder):
                continue  # reclaimed already: its amounts were taken off then
            # only what the owner still holds (it may hold less than the claim since a reclaim)
            usd, tokens = min(claim.usd, holder[0]), min(claim.tokens, holder[1])
            holder[0] -= usd
            holder[1] -= tokens
            counter = self._counter(claim.key, claim.period_start)
            counter[1] = max(counter[1] - usd, Decimal(0))
            counter[3] = max(counter[3] - tokens, 0)
        for claim in actual:
            counter = self._counter(claim.key, claim.period_start)
            counter[0] += claim.usd
            counter[2] += claim.tokens
            for threshold in crossed(claim, counter[0], counter[2]):
                marker = (claim.key, claim.period_start, threshold)
                if marker not in self._alerts:
                    self._alerts.add(marker)
                    fired.append(Fired(claim.key, claim.period_start, threshold, counter[0], counter[2]))

    def totals(self, key: str, period_start: float, *, now: float) -> Totals:
        """Settled and held amounts of one key (lapsed leases dropped first)."""
        with self._lock:
            self._drop(lambda host, pid, expires: expires <= now)
            return self._totals(key, period_start)

    def mark_alert(self, key: str, period_start: float, threshold: float) -> bool:
        """Record an alert; ``True`` the first time only."""
        with self._lock:
            marker = (key, period_start, threshold)
            if marker in self._alerts:
                return False
            self._alerts.add(marker)
            return True

    def _drop(self, doomed: Callable[[str, int, float], bool]) -> int:
        dropped = 0
        for ident, (usd, tokens, expires) in list(self._holders.items()):
            host, pid, key, period = ident
            if doomed(host, pid, expires):
                del self._holders[ident]
                counter = self._counter(key, period)
                counter[1] = max(counter[1] - usd, Decimal(0))
                counter[3] = max(counter[3] - tokens, 0)
                dropped += bool(usd or tokens)
        return dropped

    def reclaim(
        self, *, now: float, host: str, alive: Callable[[int], bool], keys: Sequence[tuple[str, float]] = ()
    ) -> int:
        """Drop the holds of owners whose lease lapsed or, on ``host``, whose process is gone (every
        key: ``keys`` is only a hint)."""
        with self._lock:
            return self._drop(lambda h, pid, expires: expires <= now or (h == host and not alive(pid)))
