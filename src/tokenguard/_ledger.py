"""The ledger: one row per call, and the store contract every backend implements.

Owns ``LedgerRow`` (what is recorded about a call), ``Stats`` (what the rows add up
to) and the ``Store`` protocol. Backends live in ``tokenguard.stores``; the pipeline
only ever talks to a ``Store``. Rows never hold request or response content, headers
or API keys: only counts, money, labels and timings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Final, Literal, NamedTuple, Protocol, runtime_checkable

from ._usage import Usage

__all__ = [
    "COUNTS",
    "OUTCOMES",
    "LedgerRow",
    "Outcome",
    "OutcomeRow",
    "OutcomeStore",
    "Stats",
    "Store",
    "Tally",
    "counts_of",
    "matches_scope",
]

Outcome = Literal["ok", "error", "incomplete", "cache_hit", "blocked"]
OUTCOMES: Final = ("ok", "error", "incomplete", "cache_hit", "blocked")


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """What tokenguard records about one call.

    ``outcome`` is ``"ok"``; ``"error"`` (``error`` names the exception class);
    ``"incomplete"`` (a stream closed or abandoned before its end: the output received is
    charged and the row is ``estimated``; a stream whose connection broke is an ``"error"``
    row charged the same way); ``"cache_hit"``; or ``"blocked"`` (``error`` says why:
    ``"budget"``, ``"loop"``, ``"unpriced"``, ``"circuit_open"``).
    ``cost_usd`` is ``None`` when the model has no known price. ``ts`` is when the call
    started (UTC); ``latency_s`` runs to the end of the response body.
    """

    ts: datetime
    vendor: str
    endpoint: str
    model: str
    scope: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    usage: Usage = field(default_factory=Usage)
    cost_usd: Decimal | None = Decimal(0)
    estimated: bool = False
    outcome: Outcome = "ok"
    error: str | None = None
    attempts: int = 1
    latency_s: float = 0.0
    stream: bool = False
    request_id: str | None = None
    saved_usd: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    """Totals over the ledger rows that match a scope filter (money as ``Decimal``)."""

    calls: int = 0
    cache_hits: int = 0
    saved_usd: Decimal = Decimal(0)
    retries: int = 0
    attempts: int = 0
    loops_blocked: int = 0
    budget_blocks: int = 0
    blocked: int = 0  # every call refused before it was sent (budget, loop, unpriced, open circuit)
    input_tokens: int = 0
    output_tokens: int = 0
    spent_usd: Decimal = Decimal(0)
    errors: int = 0
    incomplete: int = 0
    estimated_calls: int = 0
    unpriced_calls: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def cache_hit_rate(self) -> float:
        """Cache hits over calls answered (hits plus calls sent and answered); 0.0 with none."""
        answered = self.calls - self.blocked - self.errors
        return self.cache_hits / answered if answered > 0 else 0.0

    @classmethod
    def of(cls, rows: Iterable[LedgerRow]) -> Stats:
        """Add up ``rows`` (the reference every store's ``stats()`` must agree with)."""
        totals = [0] * len(COUNTS)
        spent = saved = Decimal(0)
        for row in rows:
            for i, value in enumerate(counts_of(row)):
                totals[i] += value
            spent += row.cost_usd or 0
            saved += row.saved_usd or 0
        return cls(spent_usd=spent, saved_usd=saved, **dict(zip(COUNTS, totals, strict=True)))


COUNTS: Final = (
    "calls",
    "cache_hits",
    "retries",
    "attempts",
    "loops_blocked",
    "budget_blocks",
    "blocked",
    "input_tokens",
    "output_tokens",
    "errors",
    "incomplete",
    "estimated_calls",
    "unpriced_calls",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
"""The count fields of ``Stats``, in the order ``counts_of`` gives them."""


def counts_of(row: LedgerRow) -> tuple[int, ...]:
    """What one row adds to each of ``COUNTS`` (money aside)."""
    u = row.usage
    blocked = row.outcome == "blocked"
    return (
        1,
        row.outcome == "cache_hit",
        max(row.attempts - 1, 0),
        row.attempts,
        blocked and row.error == "loop",
        blocked and row.error == "budget",
        blocked,
        u.input_tokens,
        u.output_tokens,
        row.outcome == "error",
        row.outcome == "incomplete",
        row.estimated,
        row.cost_usd is None and row.outcome in ("ok", "incomplete"),
        u.cache_read_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
    )


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    """Something an application got out of its calls (``tokenguard.record_outcome``): an
    answer accepted, a ticket resolved. Reports divide spend by outcomes, not by tokens."""

    ts: datetime
    name: str
    scope: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    count: int = 1


@runtime_checkable
class OutcomeStore(Protocol):
    """A store that keeps outcomes next to the ledger (memory, SQLite)."""

    def record_outcome(self, row: OutcomeRow) -> None:
        """Keep one outcome."""

    def outcomes(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[OutcomeRow]:
        """The matching outcomes, oldest first (``since`` inclusive, ``until`` exclusive)."""


class Tally(NamedTuple):
    """What a run of calls that share their labels (vendor, endpoint, model, scope, outcome,
    error) adds up to: a store that keeps only daily summaries of old calls reports those."""

    calls: int
    input_tokens: int
    output_tokens: int
    retries: int
    estimated: int
    unpriced: int
    spent_usd: Decimal
    saved_usd: Decimal


def matches_scope(row_scope: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """True when every wanted attribute is present in the row with the same value."""
    return all(row_scope.get(k) == v for k, v in wanted.items())


@runtime_checkable
class Store(Protocol):
    """Where ledger rows are kept. One contract test suite runs against every store.

    Implementations are safe to share between threads; the SQLite and Redis stores are
    also safe between processes.
    """

    url: str

    def record(self, row: LedgerRow) -> None:
        """Append one row durably (raise ``StoreUnavailable`` if that is impossible)."""

    def spent(self, *, since: datetime | None, scope: Mapping[str, str]) -> Decimal:
        """Sum of ``cost_usd`` of rows since ``since`` (all time if ``None``) matching ``scope``."""

    def stats(self, *, since: datetime | None, scope: Mapping[str, str]) -> Stats:
        """``Stats.of`` the rows since ``since`` matching ``scope``."""

    def rows(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        scope: Mapping[str, str] | None = None,
    ) -> Iterator[LedgerRow]:
        """The matching rows, oldest first (``since`` inclusive, ``until`` exclusive)."""

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
