"""The ``Guard``: one configured set of protections, shared by every client that uses it.

Owns configuration (validated at construction, keyword-only) and the components built
from it (store, price book, pipeline). Also owns the process-wide default guard that
clients use when given no ``guard=``, configured from the environment, so that
changing only an import line already protects a program.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any, TypeVar

from ._budget import Alert, Budget, BudgetBook, BudgetStatus, BudgetStore, SpendRate
from ._cache import Cache
from ._errors import ConfigurationError
from ._ledger import LedgerRow, OutcomeRow, OutcomeStore, Stats, Store
from ._loops import LoopBook, LoopDetector, LoopStore
from ._periods import period_start
from ._pipeline import Pipeline
from ._pricing import PriceBook
from ._retry import Retrier, Retry
from ._scope import current_scope, validate_scope
from ._telemetry import Telemetry
from .stores import open_store

__all__ = ["Guard", "default_guard", "record_outcome", "set_default_guard"]


class Guard:
    """Accounting and protection for every call made through the clients that use it.

    Args:
        store: where the ledger (and the budgets' spend) lives: ``"sqlite:///relative.db"``,
            ``"sqlite:////abs/path.db"``, ``"memory://"``, a ``Store`` object, or ``None`` for
            ``TOKENGUARD_STORE`` and then the default SQLite file in the user data directory.
        cache: ``True`` for the default response cache (on disk, in the user cache
            directory), a ``tokenguard.Cache(...)``, or ``False`` (default) for none. Only
            repeatable requests (``temperature=0``, a fixed ``seed``, embeddings) are cached
            unless ``Cache(cache_all=True)``.
        retry: ``True`` (default) for ``tokenguard.Retry()`` — up to 4 attempts, backoff from
            0.5 s to 30 s, a 120 s deadline, a 20% retry budget — a ``tokenguard.Retry(...)``,
            or ``False`` to never retry. The vendor SDK's own retries are always off in a
            guarded client, so attempts never multiply (see docs/retry.md).
        loops: ``True`` for ``tokenguard.LoopDetector()`` (a request repeated more than 3
            times in 10 minutes, per scope, is refused), a ``tokenguard.LoopDetector(...)``,
            or ``False`` (default) for none. Off by default: without scopes, every user of
            an app shares one history (see docs/loops.md).
        otel: emit an OpenTelemetry span per call (GenAI semantic conventions, with the
            cost) and the GenAI token and duration metrics, through the providers the
            application configured. Off by default.
        budgets: ``Budget`` and ``SpendRate`` caps; a call is sent only if every one that
            applies can reserve its worst-case cost (see docs/budgets.md).
        on_alert: a callable (or several) receiving each ``Alert``; default: log a warning.
            ``tokenguard.WebhookAlerts(url)`` posts them to a webhook.
        require_prices: refuse (before sending) calls to models with no known price,
            instead of recording them unpriced with a warning. Always on for calls under a
            USD budget.
        budget_hold_s: how long a reservation outlives a process that died holding it
            (holds of dead processes on this host are reclaimed at once when a cap is hit).
        default_max_output_tokens: the output bound for a request that sets no
            ``max_tokens`` when the model's context window is unknown either.
        settle_delay_s: settling a finished call (pricing it, writing its ledger row,
            settling its budgets, raising alerts) runs on a background thread within this
            many seconds, off the caller's path; ``0`` settles in the caller's thread before
            the call returns. Reads through the guard settle what is queued first.
        clock: returns the current UTC time; injectable for tests.
    """

    def __init__(
        self,
        *,
        store: str | os.PathLike[str] | Store | None = None,
        budgets: Iterable[Budget | SpendRate] = (),
        cache: bool | Cache = False,
        retry: bool | Retry = True,
        loops: bool | LoopDetector = False,
        otel: bool = False,
        on_alert: Callable[[Alert], object] | Sequence[Callable[[Alert], object]] | None = None,
        require_prices: bool = False,
        budget_hold_s: float = 900.0,
        default_max_output_tokens: int = 32_768,
        settle_delay_s: float = 0.02,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not isinstance(otel, bool):
            raise ConfigurationError("otel", otel, "must be True or False")
        if not isinstance(require_prices, bool):
            raise ConfigurationError("require_prices", require_prices, "must be True or False")
        if clock is not None and not callable(clock):
            raise ConfigurationError("clock", clock, "must be a callable returning a UTC datetime")
        if isinstance(budget_hold_s, bool) or not isinstance(budget_hold_s, int | float) or budget_hold_s <= 0:
            raise ConfigurationError("budget_hold_s", budget_hold_s, "must be a positive number of seconds")
        if (
            isinstance(default_max_output_tokens, bool)
            or not isinstance(default_max_output_tokens, int)
            or default_max_output_tokens <= 0
        ):
            raise ConfigurationError("default_max_output_tokens", default_max_output_tokens, "must be a positive int")
        if (
            isinstance(settle_delay_s, bool)
            or not isinstance(settle_delay_s, int | float)
            or not (0 <= settle_delay_s <= 10)
        ):
            raise ConfigurationError("settle_delay_s", settle_delay_s, "must be between 0 and 10 seconds")
        response_cache = _protection("cache", cache, Cache)
        self.cache = response_cache
        retrying = _protection("retry", retry, Retry)
        self.retry = retrying
        detector = _protection("loops", loops, LoopDetector)
        self.loops = detector
        if isinstance(budgets, Budget | SpendRate):
            budgets = [budgets]
        if store is None and "TOKENGUARD_STORE" in os.environ:
            store = os.environ["TOKENGUARD_STORE"]
            if not store.strip():  # as the configuration reads it: set but blank is a mistake
                raise ConfigurationError("TOKENGUARD_STORE", store, "must be a non-empty string (or unset)")
        self._clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self._store = open_store(store)
        book = None
        budget_list = list(budgets)
        if budget_list:
            if not isinstance(self._store, BudgetStore):
                raise ConfigurationError("store", self._store, "this store cannot hold budgets")
            book = BudgetBook(
                budget_list, store=self._store, on_alert=on_alert, clock=self._clock, hold_s=float(budget_hold_s)
            )
        self._budgets = book
        loop_book = None
        if detector is not None:
            if not isinstance(self._store, LoopStore):
                raise ConfigurationError("store", self._store, "this store cannot hold the loop detector's history")
            loop_book = LoopBook(detector, self._store, clock=lambda: self._clock().timestamp())
        self._prices = PriceBook(clock=lambda: self._clock().timestamp())
        self._pipeline = Pipeline(
            store=self._store,
            prices=self._prices,
            require_prices=require_prices,
            budgets=book,
            cache=response_cache,
            retrier=Retrier(retrying) if retrying is not None else None,
            loops=loop_book,
            telemetry=Telemetry() if otel else None,
            default_max_output_tokens=default_max_output_tokens,
            wall_clock=self._clock,
            defer_s=float(settle_delay_s),
        )
        self.require_prices = require_prices

    @property
    def store(self) -> Store:
        """The ledger store (reads through it see every call settled so far: queued ones are settled first)."""
        return _DrainingStore(self._store, self._pipeline)

    @property
    def pipeline(self) -> Pipeline:
        """The call path the guarded clients run (internal; for clients and tests)."""
        return self._pipeline

    def spent(self, period: str = "total", **scope: str | int) -> Decimal:
        """Settled USD in the current UTC ``period`` for the calls matching ``scope``.

        ``period`` is ``"minute"``, ``"hour"``, ``"day"``, ``"week"``, ``"month"`` or ``"total"``:
        ``guard.spent(period="day", user="alice")``.
        """
        since = period_start(period, self._clock())
        self._pipeline.drain()
        return self._store.spent(since=since, scope=validate_scope(scope))

    def stats(self, **scope: str | int) -> Stats:
        """Totals over every recorded call matching ``scope`` (all time)."""
        self._pipeline.drain()
        return self._store.stats(since=None, scope=validate_scope(scope))

    @property
    def budgets(self) -> tuple[Budget, ...]:
        """The budgets this guard enforces (a ``SpendRate`` appears as its per-minute ``Budget``)."""
        return self._budgets.budgets if self._budgets is not None else ()

    def budget_status(self, **scope: str | int) -> list[BudgetStatus]:
        """Where each budget stands in its current period for ``scope``
        (``guard.budget_status(user="alice")``; a ``per=`` budget reports the key ``scope`` gives)."""
        if self._budgets is None:
            return []
        self._pipeline.drain()
        return self._budgets.status(validate_scope(scope))

    def budget_overview(self) -> list[BudgetStatus]:
        """Where every budget stands in its current period; a ``per=`` budget once for each
        value that spent (or holds) something this period."""
        if self._budgets is None:
            return []
        self._pipeline.drain()
        return self._budgets.status_all()

    def record_outcome(self, name: str, count: int = 1, **scope: str | int) -> None:
        """Record that the application got something out of its calls — an answer accepted,
        a ticket resolved — so that ``tokenguard report`` shows the cost per outcome. The
        scope is the current ``tokenguard.scope()`` plus the attributes given."""
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            raise ConfigurationError(
                "record_outcome.name", name, "must be a non-empty string of at most 128 characters"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError("record_outcome.count", count, "must be an int >= 1")
        if not isinstance(self._store, OutcomeStore):
            raise ConfigurationError("store", self._store, "this store cannot keep outcomes")
        attrs = {**current_scope(), **validate_scope(scope, setting="record_outcome")}
        self._store.record_outcome(OutcomeRow(self._clock(), name.strip(), MappingProxyType(attrs), count))

    def register_price(
        self,
        model: str,
        *,
        input_mtok: Decimal | str | int,
        output_mtok: Decimal | str | int,
        cache_read_mtok: Decimal | str | int | None = None,
        cache_write_mtok: Decimal | str | int | None = None,
        vendor: str | None = None,
    ) -> None:
        """Price a private or self-hosted model for this guard (USD per million tokens)."""
        self._prices.register(
            model,
            input_mtok=input_mtok,
            output_mtok=output_mtok,
            cache_read_mtok=cache_read_mtok,
            cache_write_mtok=cache_write_mtok,
            vendor=vendor,
        )

    def flush(self) -> None:
        """Settle every call still queued (price it, record it, settle its budgets) now.

        Settling runs off the caller's path, within ~20 ms; ``spent()``, ``stats()``,
        ``budget_status()``, reads through ``guard.store`` and ``close()`` flush first, so
        this is needed only before reading a ``Store`` object directly or waiting for alerts.
        """
        self._pipeline.drain()
        flush = getattr(self._store, "flush", None)
        if callable(flush):
            flush()

    def close(self) -> None:
        """Settle what is queued, close the store and release the cache's connections. Clients
        using this guard must not be used afterwards."""
        self._pipeline.drain()
        try:
            self._store.close()
        finally:
            if self.cache is not None:
                self.cache.close()

    def __repr__(self) -> str:
        return f"Guard(store={self._store.url!r}, require_prices={self.require_prices})"


class _DrainingStore:
    """The guard's store as users see it: every read first settles the calls still queued."""

    def __init__(self, store: Store, pipeline: Pipeline) -> None:
        self._store = store
        self._pipeline = pipeline
        self.url = store.url

    def record(self, row: LedgerRow) -> None:
        """Append one row."""
        self._store.record(row)

    def rows(
        self, *, since: datetime | None = None, until: datetime | None = None, scope: Mapping[str, str] | None = None
    ) -> Iterator[LedgerRow]:
        """The matching rows, oldest first (queued calls settled first)."""
        self._pipeline.drain()
        return self._store.rows(since=since, until=until, scope=scope)

    def spent(self, *, since: datetime | None, scope: Mapping[str, str]) -> Decimal:
        """Settled USD of the matching rows (queued calls settled first)."""
        self._pipeline.drain()
        return self._store.spent(since=since, scope=scope)

    def stats(self, *, since: datetime | None, scope: Mapping[str, str]) -> Stats:
        """Totals of the matching rows (queued calls settled first)."""
        self._pipeline.drain()
        return self._store.stats(since=since, scope=scope)

    def close(self) -> None:
        """Settle what is queued, then close the store."""
        self._pipeline.drain()
        self._store.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def __repr__(self) -> str:
        return repr(self._store)


_default: Guard | None = None
_default_lock = threading.Lock()


_P = TypeVar("_P")


def _protection(setting: str, value: object, kind: type[_P]) -> _P | None:
    """A protection setting: ``True`` for ``kind()`` with its defaults, ``False`` (or ``None``)
    for none, or a configured ``kind`` instance."""
    if value is True:
        return kind()
    if value is False or value is None:
        return None
    if isinstance(value, kind):
        return value
    raise ConfigurationError(setting, value, f"must be True, False or a tokenguard.{kind.__name__}")


def default_guard() -> Guard:
    """The process-wide guard used by clients created without ``guard=``.

    Built on first use from the configuration: environment variables (``TOKENGUARD_STORE``,
    ``TOKENGUARD_CACHE``, ``TOKENGUARD_RETRY_ATTEMPTS`` ...), then ``tokenguard.toml``, then
    ``[tool.tokenguard]`` in ``pyproject.toml`` (``tokenguard config`` shows the effective
    values and where each came from).
    """
    global _default
    with _default_lock:
        if _default is None:
            from ._config import load_config

            _default = Guard(**load_config().guard_kwargs())
        return _default


def record_outcome(name: str, count: int = 1, *, guard: Guard | None = None, **scope: str | int) -> None:
    """Record an outcome (an answer accepted, a ticket resolved) on ``guard`` (default: the
    process-wide guard): ``tokenguard report`` shows spend per outcome, never a ranking by
    token volume. See ``Guard.record_outcome``."""
    (guard if guard is not None else default_guard()).record_outcome(name, count, **scope)


def set_default_guard(guard: Guard | None) -> Guard | None:
    """Replace the process-wide default guard (``None``: rebuild it from the configuration on
    next use). Returns the one it replaces (``None`` if none was built yet), so a test can put
    it back."""
    global _default
    if guard is not None and not isinstance(guard, Guard):
        raise ConfigurationError("guard", guard, "must be a tokenguard.Guard")
    with _default_lock:
        previous, _default = _default, guard
    return previous
