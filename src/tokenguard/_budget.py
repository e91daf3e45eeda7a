"""Budgets: hard caps reserved before a call is sent, settled after, with threshold alerts.

Owns the configuration objects (``Budget``, ``SpendRate``), the ``Alert`` value, and the
``BudgetBook``: which budgets a call falls under, its worst-case cost, and turning the
store's answers into ``BudgetExceeded`` or alerts. The atomic part — check every claim
and hold them all, in one transaction, across threads and processes — belongs to the
store (``BudgetStore`` below), so a Redis store can do it in one Lua script later.

The promise: a call is sent only after every budget that applies to it has *reserved*
the call's worst-case cost; when the call ends the reservation is replaced by what it
actually cost (or released, when the vendor bills nothing). So settled spend never
exceeds a cap as long as the vendor honours the output limit. See docs/budgets.md.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Literal, NamedTuple, Protocol, runtime_checkable

from ._errors import BudgetExceeded, ConfigurationError
from ._periods import PERIODS, period_end, period_start
from ._redact import redact_url
from ._usage import Usage

__all__ = [
    "Alert",
    "Budget",
    "BudgetBook",
    "BudgetStatus",
    "BudgetStore",
    "Claim",
    "Fired",
    "Refusal",
    "SpendRate",
    "Totals",
    "WebhookAlerts",
    "from_nano",
    "log_alert",
    "to_nano",
]

log = logging.getLogger("tokenguard")

NO_VALUE: Final = "(none)"
"""The ``per=`` key of calls that carry no value for the budget's attribute: they share one budget."""

_HOST: Final = socket.gethostname()


def _money(setting: str, value: object) -> Decimal:
    if isinstance(value, bool):
        raise ConfigurationError(setting, value, "must be a number of US dollars")
    try:
        # a float is taken as the decimal it prints as (50.1 -> 50.1), never its binary expansion
        dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)  # type: ignore[arg-type]
    except (InvalidOperation, TypeError, ValueError):
        raise ConfigurationError(setting, value, "must be a number of US dollars") from None
    if not dec.is_finite() or dec < 0:
        raise ConfigurationError(setting, value, "must be a finite, non-negative number of US dollars")
    return dec


@dataclass(frozen=True, slots=True)
class Budget:
    """A cap on spend in a calendar period (UTC), shared or per scope attribute.

    Args:
        limit_usd: the cap in USD (``Decimal``, ``int``, ``str``; a float is read as the
            decimal it prints as). ``None`` for a token-only budget.
        period: ``"minute"``, ``"hour"``, ``"day"``, ``"week"``, ``"month"`` or ``"total"``.
        per: ``None`` for one shared budget, or a scope attribute (``"user"``, ``"project"``
            ...) for one budget of this size per distinct value. Calls with no value for the
            attribute share one budget under the key ``"(none)"``, so unattributed work
            cannot slip past a per-user cap.
        alerts: fractions of the limit, each in (0, 1], at which ``on_alert`` fires once per
            period and key.
        limit_tokens: a cap on input + output tokens, alone or besides ``limit_usd``.
        action: ``"block"`` (refuse calls that could overrun) or ``"alert"`` (count and alert only).
        name: a stable name (default: derived from the settings); processes that share a
            store share a budget's spend when they give it the same name / settings.
    """

    limit_usd: Decimal | int | str | float | None = None
    period: str = "day"
    per: str | None = None
    alerts: tuple[float, ...] = (0.5, 0.75, 0.9)
    limit_tokens: int | None = None
    action: Literal["block", "alert"] = "block"
    name: str | None = None
    id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.limit_usd is None and self.limit_tokens is None:
            raise ConfigurationError("Budget.limit_usd", None, "give limit_usd, limit_tokens or both")
        if self.limit_usd is not None:
            object.__setattr__(self, "limit_usd", _money("Budget.limit_usd", self.limit_usd))
        if self.limit_tokens is not None and (
            isinstance(self.limit_tokens, bool) or not isinstance(self.limit_tokens, int) or self.limit_tokens < 0
        ):
            raise ConfigurationError("Budget.limit_tokens", self.limit_tokens, "must be a non-negative int")
        if self.period not in PERIODS:
            raise ConfigurationError("Budget.period", self.period, f"must be one of {', '.join(PERIODS)}")
        if self.per is not None and (not isinstance(self.per, str) or not self.per.isidentifier()):
            raise ConfigurationError("Budget.per", self.per, "must be None or a scope attribute name")
        alerts = tuple(self.alerts)
        for threshold in alerts:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
                raise ConfigurationError("Budget.alerts", self.alerts, "every threshold must be in (0, 1]")
        object.__setattr__(self, "alerts", tuple(sorted({float(t) for t in alerts})))
        if self.action not in ("block", "alert"):
            raise ConfigurationError("Budget.action", self.action, 'must be "block" or "alert"')
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ConfigurationError("Budget.name", self.name, "must be a non-empty string")
        ident = self.name or (
            f"{self.period}/{self.per or '*'}/usd={self.limit_usd}/tokens={self.limit_tokens}/{self.action}"
        )
        object.__setattr__(self, "id", ident)

    @property
    def usd(self) -> Decimal | None:
        """``limit_usd`` as a ``Decimal`` (or ``None``)."""
        return self.limit_usd  # type: ignore[return-value]  # normalised in __post_init__

    def describe(self) -> str:
        """A short human name: ``$50/day per user``."""
        parts = []
        if self.usd is not None:
            parts.append(f"${self.usd}")
        if self.limit_tokens is not None:
            parts.append(f"{self.limit_tokens:,} tokens")
        text = " + ".join(parts) + f"/{self.period}"
        if self.per:
            text += f" per {self.per}"
        return f"{self.name} ({text})" if self.name else text


@dataclass(frozen=True, slots=True)
class SpendRate:
    """A spend-rate trip: at most ``max_usd_per_minute`` per (calendar) minute, per scope.

    Catches runaway jobs whose prompts change every time (which a loop detector cannot).
    ``action="block"`` refuses calls past the rate; ``"alert"`` only alerts.
    """

    max_usd_per_minute: Decimal | int | str | float
    per: str | None = None
    action: Literal["block", "alert"] = "block"

    def __post_init__(self) -> None:
        _money("SpendRate.max_usd_per_minute", self.max_usd_per_minute)
        if self.per is not None and (not isinstance(self.per, str) or not self.per.isidentifier()):
            raise ConfigurationError("SpendRate.per", self.per, "must be None or a scope attribute name")
        if self.action not in ("block", "alert"):
            raise ConfigurationError("SpendRate.action", self.action, 'must be "block" or "alert"')

    def as_budget(self) -> Budget:
        """The per-minute ``Budget`` this trip is."""
        return Budget(
            limit_usd=_money("SpendRate.max_usd_per_minute", self.max_usd_per_minute),
            period="minute",
            per=self.per,
            alerts=(),
            action=self.action,
            name=f"spend-rate/{self.per or '*'}/{self.max_usd_per_minute}/{self.action}",
        )


@dataclass(frozen=True, slots=True)
class Alert:
    """What ``on_alert`` receives.

    ``kind`` is ``"threshold"`` (``threshold`` of the limit reached), ``"blocked"`` (a call
    was refused; ``threshold`` is 1.0) or ``"exceeded"`` (an alert-only budget went past
    its limit). ``key`` is the scope value for a ``per=`` budget, else ``None``.
    """

    budget: Budget
    key: str | None
    threshold: float
    spent_usd: Decimal
    limit_usd: Decimal | None
    period_start: datetime | None
    kind: Literal["threshold", "blocked", "exceeded"] = "threshold"
    spent_tokens: int = 0
    limit_tokens: int | None = None

    @property
    def message(self) -> str:
        """One line for a log or a chat message."""
        who = f" for {self.budget.per}={self.key}" if self.budget.per else ""
        spent = f"${self.spent_usd}" if self.limit_usd is not None else f"{self.spent_tokens:,} tokens"
        if self.kind == "blocked":
            return f"tokenguard: budget {self.budget.describe()}{who} blocked a call ({spent} spent)"
        if self.kind == "exceeded":
            return f"tokenguard: budget {self.budget.describe()}{who} exceeded ({spent} spent)"
        return f"tokenguard: budget {self.budget.describe()}{who} at {self.threshold:.0%} ({spent} spent)"


def log_alert(alert: Alert) -> None:
    """The default alert sink: a warning on the ``tokenguard`` logger with structured ``extra``."""
    log.warning(
        alert.message,
        extra={
            "tokenguard_event": "budget_alert",
            "budget": alert.budget.id,
            "key": alert.key,
            "threshold": alert.threshold,
            "kind": alert.kind,
            "spent_usd": str(alert.spent_usd),
            "limit_usd": None if alert.limit_usd is None else str(alert.limit_usd),
        },
    )


# -- the store's side --------------------------------------------------------------------------


class Claim(NamedTuple):
    """One budget's share of a call: hold (or add) ``usd`` and ``tokens`` under ``key`` for the period.

    (A ``NamedTuple``: built twice per call on the hot path, where a frozen dataclass is slow.)
    """

    key: str
    period_start: float
    usd: Decimal
    tokens: int
    limit_usd: Decimal | None
    limit_tokens: int | None
    enforce: bool
    thresholds: tuple[float, ...] = ()
    period: str = ""  # the budget's period ("day", ...): how long a shared store keeps the key


class Totals(NamedTuple):
    """Settled and held amounts of one budget key in one period."""

    spent_usd: Decimal = Decimal(0)
    held_usd: Decimal = Decimal(0)
    spent_tokens: int = 0
    held_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """The claim that did not fit, and the key's totals at that moment."""

    claim: Claim
    totals: Totals


@dataclass(frozen=True, slots=True)
class Fired:
    """A threshold newly crossed in a settle (recorded by the store so it fires once, everywhere)."""

    key: str
    period_start: float
    threshold: float
    spent_usd: Decimal
    spent_tokens: int


@runtime_checkable
class BudgetStore(Protocol):
    """The atomic side of budgets; implemented by every store (memory, SQLite, Redis).

    Holds are kept per owner process (``(host, pid)``) and key: a reservation adds to the
    owner's held amount and renews its lease (``expires_at``); a settle takes it off. A
    process that dies stops renewing, so its holds lapse after the lease, or at once when
    ``reclaim`` sees (on the same host) that the pid is gone.
    """

    def reserve(
        self, claims: Sequence[Claim], *, owner: tuple[str, int], expires_at: float, now: float
    ) -> Refusal | None:
        """Hold every enforced claim if each fits under its limit, atomically; else hold nothing."""

    def settle(
        self,
        batch: Sequence[tuple[Sequence[Claim], Sequence[Claim]]],
        *,
        owner: tuple[str, int],
        now: float,
    ) -> list[Fired]:
        """For each ``(held, actual)`` of the batch, in one transaction: release ``held`` (if this
        owner still holds it) and add ``actual``; record and return thresholds newly crossed."""

    def totals(self, key: str, period_start: float, *, now: float) -> Totals:
        """The key's settled and held amounts."""

    def mark_alert(self, key: str, period_start: float, threshold: float) -> bool:
        """Record that an alert fired; ``True`` only the first time, across processes."""

    def reclaim(
        self, *, now: float, host: str, alive: Callable[[int], bool], keys: Sequence[tuple[str, float]] = ()
    ) -> int:
        """Drop the holds of owners whose lease expired or, on ``host``, whose pid is gone; return how
        many. ``keys`` ((key, period start) pairs) names where a refusal happened: a store may look
        only there."""


_ZERO: Final = Decimal(0)


def to_nano(usd: Decimal) -> int:
    """USD as whole nano-dollars, rounded up (budgets never under-count); exact at any size
    (integer arithmetic: ``Decimal.scaleb`` would round to the context's 28 digits first)."""
    if not usd:
        return 0
    numerator, denominator = usd.as_integer_ratio()
    return -(-numerator * 1_000_000_000 // denominator)


def from_nano(nusd: int) -> Decimal:
    """Whole nano-dollars as USD, exact at any size and with no trailing zeros after the point
    (``0``, ``0.00000435``, ``50``: as the ledger writes amounts, never ``0E-9``)."""
    digits = str(abs(nusd)).rjust(10, "0")
    whole, fraction = digits[:-9], digits[-9:].rstrip("0")
    text = f"{whole}.{fraction}" if fraction else whole
    return Decimal(f"-{text}" if nusd < 0 else text)  # from text: exact whatever the context


def crossed(claim: Claim, after_usd: Decimal, after_tokens: int) -> list[float]:
    """The thresholds of ``claim`` reached by the settled amounts ``after_*``."""
    ratio = 0.0
    if claim.limit_usd is not None:
        ratio = float(after_usd / claim.limit_usd) if claim.limit_usd else (1.0 if after_usd > 0 else 0.0)
    if claim.limit_tokens is not None:
        tokens_ratio = (after_tokens / claim.limit_tokens) if claim.limit_tokens else float(after_tokens > 0)
        ratio = max(ratio, tokens_ratio)
    return [t for t in claim.thresholds if ratio >= t]


def fits(claim: Claim, totals: Totals) -> bool:
    """Whether ``claim`` fits on top of ``totals`` under both of its limits."""
    if claim.limit_usd is not None and totals.spent_usd + totals.held_usd + claim.usd > claim.limit_usd:
        return False
    return not (
        claim.limit_tokens is not None and totals.spent_tokens + totals.held_tokens + claim.tokens > claim.limit_tokens
    )


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the guard's side --------------------------------------------------------------------------


@dataclass(slots=True)
class Hold:
    """The reservation a call holds until it settles."""

    claims: list[tuple[Budget, str | None, Claim]]
    settled: bool = False


AlertSink = Callable[[Alert], Any]


class BudgetBook:
    """Applies a guard's budgets to calls. Thread-safe; all shared state lives in the store."""

    def __init__(
        self,
        budgets: Iterable[Budget | SpendRate],
        *,
        store: BudgetStore,
        on_alert: AlertSink | Sequence[AlertSink] | None,
        clock: Callable[[], datetime],
        hold_s: float,
    ) -> None:
        items: list[Budget] = []
        for item in budgets:
            if isinstance(item, SpendRate):
                items.append(item.as_budget())
            elif isinstance(item, Budget):
                items.append(item)
            else:
                raise ConfigurationError("budgets", item, "each item must be a tokenguard.Budget or SpendRate")
        ids = [b.id for b in items]
        if len(set(ids)) != len(ids):
            raise ConfigurationError("budgets", ids, "two budgets have the same name/settings; give them names")
        self.budgets = tuple(items)
        self.has_usd = any(b.usd is not None and b.action == "block" for b in items)
        self._store = store
        self._clock = clock
        self._hold_s = hold_s
        if on_alert is None:
            self._sinks: tuple[AlertSink, ...] = (log_alert,)
        elif callable(on_alert):
            self._sinks = (on_alert,)
        else:
            sinks = tuple(on_alert)
            for sink in sinks:
                if not callable(sink):
                    raise ConfigurationError("on_alert", sink, "must be a callable taking a tokenguard.Alert")
            self._sinks = sinks
        self._fired_here: set[tuple[str, float, float]] = set()
        self._lock = threading.Lock()
        # settles still queued keep their holds: settle them before calling a budget full
        self.before_refusal: Callable[[], None] | None = None

    def __bool__(self) -> bool:
        return bool(self.budgets)

    def _claims(
        self, scope: Mapping[str, str], usd: Decimal, tokens: int, now: datetime
    ) -> list[tuple[Budget, str | None, Claim]]:
        rounded = from_nano(to_nano(usd))  # budgets count whole nano-dollars, rounded up
        starts: dict[str, float] = {}
        out = []
        for budget in self.budgets:
            value = None
            if budget.per is not None:
                value = scope.get(budget.per) or NO_VALUE
            start = starts.get(budget.period)
            if start is None:
                begins = period_start(budget.period, now)
                start = starts[budget.period] = 0.0 if begins is None else begins.timestamp()
            out.append(
                (
                    budget,
                    value,
                    Claim(
                        f"{budget.id}|{value or ''}",
                        start,
                        rounded if budget.usd is not None else _ZERO,
                        tokens,
                        budget.usd,
                        budget.limit_tokens,
                        budget.action == "block",
                        budget.alerts + ((1.0,) if budget.action == "alert" else ()),
                        budget.period,
                    ),
                )
            )
        return out

    def admit(
        self,
        scope: Mapping[str, str],
        usd: Decimal,
        tokens: int,
        *,
        retry_with: Callable[[], tuple[Decimal, int] | None] | None = None,
    ) -> Hold:
        """Reserve ``usd`` / ``tokens`` under every budget that applies, or raise ``BudgetExceeded``.

        ``retry_with`` may offer a tighter worst case (an exact token count) to try once if
        the first reservation does not fit.
        """
        now = self._clock()
        claims = self._claims(scope, usd, tokens, now)
        hold = Hold(claims)
        ts = now.timestamp()
        refusal = self._reserve(hold, ts)
        if refusal is not None and retry_with is not None:
            tighter = retry_with()
            if tighter is not None and (tighter[0] < usd or tighter[1] < tokens):
                hold = Hold(self._claims(scope, tighter[0], tighter[1], now))
                refusal = self._reserve(hold, ts)
        if refusal is None:
            return hold
        budget, value = next((b, v) for b, v, c in hold.claims if c is refusal.claim)
        self._blocked_alert(budget, value, refusal)
        totals, claim = refusal.totals, refusal.claim
        # report in the unit of the limit that refused (a budget may have both)
        in_usd = budget.usd is not None and totals.spent_usd + totals.held_usd + claim.usd > budget.usd
        if in_usd:
            assert budget.usd is not None
            limit, spent, needed, held = budget.usd, totals.spent_usd, claim.usd, totals.held_usd
        else:
            limit, spent = Decimal(budget.limit_tokens or 0), Decimal(totals.spent_tokens)
            needed, held = Decimal(claim.tokens), Decimal(totals.held_tokens)
        raise BudgetExceeded(
            budget=budget,
            scope={budget.per: value} if budget.per and value else dict(scope),
            spent_usd=spent,
            limit_usd=limit,
            needed_usd=needed,
            held_usd=held,
            resets_at=period_end(budget.period, now),
            unit="USD" if in_usd else "tokens",
        )

    def _reserve(self, hold: Hold, ts: float) -> Refusal | None:
        claims = [c for _, _, c in hold.claims]
        owner = (_HOST, os.getpid())
        refusal = self._store.reserve(claims, owner=owner, expires_at=ts + self._hold_s, now=ts)
        if refusal is not None and self.before_refusal is not None:
            self.before_refusal()
            refusal = self._store.reserve(claims, owner=owner, expires_at=ts + self._hold_s, now=ts)
        if refusal is not None and self._store.reclaim(
            now=ts, host=_HOST, alive=pid_alive, keys=[(refusal.claim.key, refusal.claim.period_start)]
        ):
            refusal = self._store.reserve(claims, owner=owner, expires_at=ts + self._hold_s, now=ts)
        return refusal

    def settle(self, hold: Hold | None, scope: Mapping[str, str], usage: Usage, cost: Decimal | None) -> None:
        """Replace the hold with what the call cost (``cost=None``: unpriced, counts tokens only)."""
        self.settle_many([(hold, scope, usage, cost)])

    def settle_many(self, calls: Sequence[tuple[Hold | None, Mapping[str, str], Usage, Decimal | None]]) -> None:
        """Settle several calls in one store transaction (the background settler batches them)."""
        if not self.budgets or not calls:
            return
        batch: list[tuple[list[Claim], list[Claim]]] = []
        meta: dict[tuple[str, float], tuple[Budget, str | None, Claim]] = {}
        now = self._clock()
        for hold, scope, usage, cost in calls:
            tokens = usage.input_tokens + usage.output_tokens
            if hold is not None and not hold.settled:
                hold.settled = True
                claims = hold.claims
                held = [c for _, _, c in claims if c.enforce]
            else:  # a second billed response of the same call: add it, there is no hold left
                claims = self._claims(scope, Decimal(0), 0, now)
                held = []
            spent = from_nano(to_nano(cost or _ZERO))
            actual = []
            for budget, value, claim in claims:
                done = claim._replace(usd=spent if claim.limit_usd is not None else _ZERO, tokens=tokens)
                actual.append(done)
                meta[(done.key, done.period_start)] = (budget, value, done)
            batch.append((held, actual))
        fired = self._store.settle(batch, owner=(_HOST, os.getpid()), now=now.timestamp())
        for event in fired:
            budget, value, claim = meta[(event.key, event.period_start)]
            self._emit(budget, value, event.threshold, event.spent_usd, event.spent_tokens, claim)

    def release(self, hold: Hold | None, scope: Mapping[str, str]) -> None:
        """Give the whole hold back (the vendor did not bill)."""
        if hold is not None and not hold.settled:
            self.settle(hold, scope, Usage(), Decimal(0))

    def _blocked_alert(self, budget: Budget, value: str | None, refusal: Refusal) -> None:
        claim = refusal.claim
        try:
            if self._store.mark_alert(claim.key, claim.period_start, 2.0):  # 2.0: the "blocked" marker
                totals = refusal.totals
                self._dispatch(
                    Alert(
                        budget=budget,
                        key=value,
                        threshold=1.0,
                        spent_usd=totals.spent_usd,
                        limit_usd=budget.usd,
                        period_start=_when(claim.period_start, budget),
                        kind="blocked",
                        spent_tokens=totals.spent_tokens,
                        limit_tokens=budget.limit_tokens,
                    )
                )
        except Exception:
            log.exception("tokenguard: could not raise the blocked-call alert")

    def _emit(
        self, budget: Budget, value: str | None, threshold: float, usd: Decimal, tokens: int, claim: Claim
    ) -> None:
        kind: Literal["threshold", "exceeded"] = (
            "exceeded" if budget.action == "alert" and threshold >= 1.0 and 1.0 not in budget.alerts else "threshold"
        )
        self._dispatch(
            Alert(
                budget=budget,
                key=value,
                threshold=threshold,
                spent_usd=usd,
                limit_usd=budget.usd,
                period_start=_when(claim.period_start, budget),
                kind=kind,
                spent_tokens=tokens,
                limit_tokens=budget.limit_tokens,
            )
        )

    def _dispatch(self, alert: Alert) -> None:
        for sink in self._sinks:
            try:
                sink(alert)
            except Exception:  # a failing sink never fails the user's call
                log.exception("tokenguard: alert sink %r failed", sink)

    def status(self, scope: Mapping[str, str] | None = None) -> list[BudgetStatus]:
        """Where every budget stands now, for the scope given (``per=`` budgets need its value)."""
        now = self._clock()
        out = []
        for budget, value, claim in self._claims(scope or {}, Decimal(0), 0, now):
            totals = self._store.totals(claim.key, claim.period_start, now=now.timestamp())
            out.append(
                BudgetStatus(
                    budget=budget,
                    key=value,
                    spent_usd=totals.spent_usd,
                    held_usd=totals.held_usd,
                    spent_tokens=totals.spent_tokens,
                    held_tokens=totals.held_tokens,
                    period_start=_when(claim.period_start, budget),
                    resets_at=period_end(budget.period, now),
                )
            )
        return out

    def status_all(self) -> list[BudgetStatus]:
        """Where every budget stands now, each ``per=`` budget for every value seen this period."""
        out: list[BudgetStatus] = []
        lister = getattr(self._store, "budget_keys", None)
        for budget in self.budgets:
            if budget.per is None or lister is None:
                out.extend(s for s in self.status({}) if s.budget is budget)
                continue
            begins = period_start(budget.period, self._clock())
            start = 0.0 if begins is None else begins.timestamp()
            prefix = f"{budget.id}|"
            for key in sorted(lister(prefix, start)):
                value = key[len(prefix) :]
                out.extend(s for s in self.status({budget.per: value}) if s.budget is budget)
        return out


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """One budget key's position in the current period."""

    budget: Budget
    key: str | None
    spent_usd: Decimal
    held_usd: Decimal
    spent_tokens: int
    held_tokens: int
    period_start: datetime | None
    resets_at: datetime | None

    @property
    def remaining_usd(self) -> Decimal | None:
        """USD still available (``None`` for a token-only budget)."""
        if self.budget.usd is None:
            return None
        return max(self.budget.usd - self.spent_usd - self.held_usd, Decimal(0))


def _when(ts: float, budget: Budget) -> datetime | None:
    return None if budget.period == "total" else datetime.fromtimestamp(ts, tz=UTC)


class WebhookAlerts:
    """An alert sink that POSTs each alert as JSON to a URL (Slack-compatible: a ``text`` field).

    Sends from a background thread with a timeout, so a slow or failing endpoint never
    delays or fails a call; failures are logged. ``WebhookAlerts(url)(alert)``.
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0, headers: Mapping[str, str] | None = None) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            shown = redact_url(url, keep_path=False) if isinstance(url, str) else url
            raise ConfigurationError("WebhookAlerts.url", shown, "must be an http:// or https:// URL")
        if not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise ConfigurationError("WebhookAlerts.timeout_s", timeout_s, "must be a positive number of seconds")
        self.url = url
        self.timeout_s = float(timeout_s)
        self.headers = dict(headers or {})

    @staticmethod
    def payload(alert: Alert) -> dict[str, Any]:
        """The JSON body sent for ``alert``."""
        return {
            "text": alert.message,
            "budget": alert.budget.id,
            "key": alert.key,
            "kind": alert.kind,
            "threshold": alert.threshold,
            "spent_usd": str(alert.spent_usd),
            "limit_usd": None if alert.limit_usd is None else str(alert.limit_usd),
            "spent_tokens": alert.spent_tokens,
            "limit_tokens": alert.limit_tokens,
            "period_start": None if alert.period_start is None else alert.period_start.isoformat(),
        }

    def send(self, alert: Alert) -> None:
        """POST ``alert`` now, in this thread (raises on failure).

        Sent with the standard library's ``urllib``, not httpx2: httpx2 logs every request's
        full URL at INFO, and a webhook's URL is its secret."""
        import urllib.request

        request = urllib.request.Request(
            self.url,
            data=json.dumps(self.payload(alert)).encode(),
            headers={"content-type": "application/json", **self.headers},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # http(s) only: checked in __init__
            response.read()

    def __call__(self, alert: Alert) -> None:
        def run() -> None:
            try:
                self.send(alert)
            except Exception as err:
                log.error("tokenguard: webhook alert to %s failed: %s", self.shown_url, self._failure(err))

        threading.Thread(target=run, name="tokenguard-webhook-alert", daemon=True).start()

    @property
    def shown_url(self) -> str:
        """The URL fit for a log line or a repr: scheme and host only (a webhook's path and
        query are its secret, e.g. Slack's ``/services/T0/B0/XXXX``)."""
        return redact_url(self.url, keep_path=False)

    def _failure(self, err: Exception) -> str:
        """What went wrong, without the URL."""
        import urllib.error

        if isinstance(err, urllib.error.HTTPError):
            return f"HTTP {err.code}"
        text = str(err).replace(self.url, self.shown_url)
        return f"{type(err).__name__}: {text}" if text else type(err).__name__

    def __repr__(self) -> str:
        return f"WebhookAlerts({self.shown_url!r})"
