"""Reports: the ledger (and the outcomes) added up by user, project, model, day or any scope
attribute — the data behind ``tokenguard report`` in every format.

Cost per outcome, not volume: a group's ``cost_per_outcome`` is its spend over the
outcomes the application recorded for it (``tokenguard.record_outcome``). Groups come out
in the order of their key (names, dates), never ranked by token volume.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final

from ._errors import ConfigurationError
from ._ledger import LedgerRow, OutcomeRow, OutcomeStore, Store, Tally
from ._redact import redact_url

__all__ = ["FIELDS", "Group", "Report", "build_report", "parse_when"]

NONE: Final = "(none)"
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# columns that are not scope attributes
_BUILTIN: Final = ("model", "vendor", "endpoint", "day", "month", "outcome")


@dataclass(slots=True)
class Group:
    """The totals of one group of calls."""

    key: tuple[str, ...]
    calls: int = 0
    sent: int = 0  # calls that reached the vendor (not hits, not blocked)
    cache_hits: int = 0
    spent_usd: Decimal = Decimal(0)
    saved_usd: Decimal = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0
    retries: int = 0
    errors: int = 0
    loops_blocked: int = 0
    budget_blocks: int = 0
    other_blocks: int = 0
    estimated: int = 0
    unpriced: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def outcome_count(self) -> int:
        """All outcomes recorded for the group."""
        return sum(self.outcomes.values())

    @property
    def cost_per_outcome(self) -> Decimal | None:
        """Spend per recorded outcome, to the nano-dollar (``None`` when the group has no
        outcome, or no calls: outcomes recorded under a scope its calls did not have)."""
        count = self.outcome_count
        if not count or not self.calls:
            return None
        return (self.spent_usd / count).quantize(Decimal("0.000000001"))

    @property
    def cache_hit_rate(self) -> float | None:
        """Cache hits over answers (hits plus calls sent and answered: errors and blocks left
        out, as ``Stats.cache_hit_rate`` does); ``None`` with no answers."""
        answered = self.sent - self.errors + self.cache_hits
        return self.cache_hits / answered if answered else None

    def add(self, row: LedgerRow, tally: Tally | None = None) -> None:
        """Count one call, or (with ``tally``) the run of calls with ``row``'s labels it sums."""
        outcome = row.outcome
        if tally is None:
            tally = Tally(
                1,
                row.usage.input_tokens,
                row.usage.output_tokens,
                max(row.attempts - 1, 0),
                int(row.estimated),
                int(row.cost_usd is None and outcome in ("ok", "incomplete")),
                row.cost_usd or Decimal(0),
                row.saved_usd or Decimal(0),
            )
        calls = tally.calls
        self.calls += calls
        self.cache_hits += calls if outcome == "cache_hit" else 0
        self.sent += calls if outcome not in ("cache_hit", "blocked") else 0
        self.errors += calls if outcome == "error" else 0
        if outcome == "blocked":
            if row.error == "loop":
                self.loops_blocked += calls
            elif row.error == "budget":
                self.budget_blocks += calls
            else:
                self.other_blocks += calls
        self.spent_usd += tally.spent_usd
        self.saved_usd += tally.saved_usd
        self.input_tokens += tally.input_tokens
        self.output_tokens += tally.output_tokens
        self.retries += tally.retries
        self.estimated += tally.estimated
        self.unpriced += tally.unpriced

    def as_dict(self, by: Sequence[str]) -> dict[str, Any]:
        """The group as plain JSON-able data (money as strings: exact)."""
        cost = self.cost_per_outcome
        return {
            **dict(zip(by, self.key, strict=True)),
            "calls": self.calls,
            "sent": self.sent,
            "cache_hits": self.cache_hits,
            "spent_usd": str(self.spent_usd),
            "saved_usd": str(self.saved_usd),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "retries": self.retries,
            "errors": self.errors,
            "loops_blocked": self.loops_blocked,
            "budget_blocks": self.budget_blocks,
            "other_blocks": self.other_blocks,
            "estimated_calls": self.estimated,
            "unpriced_calls": self.unpriced,
            "outcomes": self.outcome_count,
            "cost_per_outcome_usd": None if cost is None else str(cost),
        }


FIELDS: Final = (
    "calls",
    "sent",
    "cache_hits",
    "spent_usd",
    "saved_usd",
    "input_tokens",
    "output_tokens",
    "retries",
    "errors",
    "loops_blocked",
    "budget_blocks",
    "other_blocks",
    "estimated_calls",
    "unpriced_calls",
    "outcomes",
    "cost_per_outcome_usd",
)


@dataclass(slots=True)
class Report:
    """A report: the groups, their total, and spend per day (for a chart)."""

    by: tuple[str, ...]
    since: datetime | None
    until: datetime | None
    groups: list[Group]
    total: Group
    daily: list[tuple[date, Decimal, Decimal]]  # (day, spent, saved), the days with calls
    store: str
    generated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        """The whole report as JSON-able data."""
        return {
            "store": self.store,
            "generated_at": self.generated_at.isoformat(),
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "by": list(self.by),
            "groups": [g.as_dict(self.by) for g in self.groups],
            "total": self.total.as_dict([]) if not self.by else {**self.total.as_dict(self.by)},
            "daily": [{"day": d.isoformat(), "spent_usd": str(s), "saved_usd": str(v)} for d, s, v in self.daily],
        }

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps(self.as_dict(), indent=2)

    def to_csv(self) -> str:
        """One CSV row per group (a header first)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*self.by, *FIELDS])
        for group in self.groups:
            data = group.as_dict(self.by)
            writer.writerow([*group.key, *("" if data[f] is None else data[f] for f in FIELDS)])
        return out.getvalue()


def _label(name: str) -> Callable[[LedgerRow], str]:
    if name == "model":
        return lambda row: row.model
    if name == "vendor":
        return lambda row: row.vendor
    if name == "endpoint":
        return lambda row: row.endpoint
    if name == "day":
        return lambda row: row.ts.astimezone(UTC).date().isoformat()
    if name == "month":
        return lambda row: row.ts.astimezone(UTC).strftime("%Y-%m")
    if name == "outcome":
        return lambda row: row.outcome if row.outcome != "blocked" else f"blocked ({row.error})"
    return lambda row: row.scope.get(name, NONE)


def _outcome_label(name: str) -> Callable[[OutcomeRow], str | None]:
    """How an outcome is grouped: ``None`` when the grouping does not apply to outcomes (a
    model, a vendor: an outcome belongs to no single call)."""
    if name in ("model", "vendor", "endpoint", "outcome"):
        return lambda row: None
    if name == "day":
        return lambda row: row.ts.astimezone(UTC).date().isoformat()
    if name == "month":
        return lambda row: row.ts.astimezone(UTC).strftime("%Y-%m")
    return lambda row: row.scope.get(name, NONE)


def _natural(key: tuple[str, ...]) -> tuple[tuple[int, int, str], ...]:
    """Sort key: numbers as numbers ("9" before "10"), then text."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in key)


def _utc(when: datetime | None) -> datetime | None:
    """``when`` with a time zone (a naive one is UTC)."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=UTC)


def check_by(by: Iterable[str]) -> tuple[str, ...]:
    """The grouping attributes, checked (``--by user,day``)."""
    names = tuple(n.strip() for n in by if n.strip())
    for name in names:
        if name not in _BUILTIN and not _IDENTIFIER.fullmatch(name):
            raise ConfigurationError(
                "--by", name, f"group by {', '.join(_BUILTIN)} or a scope attribute name (an identifier)"
            )
    if len(set(names)) != len(names):
        raise ConfigurationError("by", ",".join(names), "names an attribute twice")
    return names


def parse_when(text: str | None, *, setting: str, now: datetime | None = None) -> datetime | None:
    """A ``--since`` / ``--until`` value: an ISO date or date-time (UTC unless it says), or a
    span back from now: ``7d``, ``12h``, ``30m``."""
    if text is None or text == "":
        return None
    now = now or datetime.now(UTC)
    spans = {"d": 86_400, "h": 3_600, "m": 60}
    if text[-1:] in spans and text[:-1].isdigit():
        return datetime.fromtimestamp(now.timestamp() - int(text[:-1]) * spans[text[-1]], tz=UTC)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(
            setting, text, "use an ISO date (2026-11-01), a date-time, or 7d / 12h / 30m"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def build_report(
    store: Store,
    *,
    by: Sequence[str] = ("user",),
    since: datetime | None = None,
    until: datetime | None = None,
    scope: Mapping[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    now: datetime | None = None,
) -> Report:
    """Add up the store's rows (and outcomes) in ``[since, until)`` matching ``scope``,
    grouped by ``by``. ``progress`` is called with the rows read so far, every 10,000.

    A store that keeps single rows for a recent window only (Redis) hands older calls over as
    daily tallies (``report_source``): those days count whole."""
    names = check_by(by)
    since, until = _utc(since), _utc(until)
    labels = [_label(n) for n in names]
    groups: dict[tuple[str, ...], Group] = {}
    total = Group(key=tuple("(all)" for _ in names))
    daily: dict[date, list[Decimal]] = {}
    source: Iterable[tuple[LedgerRow, Tally | None]]
    report_source = getattr(store, "report_source", None)
    if report_source is not None:
        source = report_source(since=since, until=until, scope=dict(scope or {}))
    else:
        source = ((row, None) for row in store.rows(since=since, until=until, scope=dict(scope or {})))
    for i, (row, tally) in enumerate(source):
        key = tuple(label(row) for label in labels)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(key=key)
        group.add(row, tally)
        total.add(row, tally)
        day = daily.setdefault(row.ts.astimezone(UTC).date(), [Decimal(0), Decimal(0)])
        day[0] += (row.cost_usd or 0) if tally is None else tally.spent_usd
        day[1] += (row.saved_usd or 0) if tally is None else tally.saved_usd
        if progress is not None and (i + 1) % 10_000 == 0:
            progress(i + 1)
    if isinstance(store, OutcomeStore):
        outcome_labels = [_outcome_label(n) for n in names]
        for outcome in store.outcomes(since=since, until=until, scope=dict(scope or {})):
            total.outcomes[outcome.name] = total.outcomes.get(outcome.name, 0) + outcome.count
            parts = [label(outcome) for label in outcome_labels]
            if any(p is None for p in parts):
                continue
            key = tuple(p for p in parts if p is not None)
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(key=key)
            group.outcomes[outcome.name] = group.outcomes.get(outcome.name, 0) + outcome.count
    generated = now or datetime.now(UTC)
    return Report(
        by=names,
        since=since,
        until=until,
        groups=[groups[k] for k in sorted(groups, key=_natural)],
        total=total,
        daily=[(d, v[0], v[1]) for d, v in sorted(daily.items())],
        store=redact_url(str(getattr(store, "url", type(store).__name__))),
        generated_at=generated,
    )
